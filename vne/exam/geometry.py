"""Plane maths and resampling in patient coordinates (mm). Pure functions.

One definition of the slice-matching rule lives here (:data:`MATCH_MIN_ABS_COS`,
:data:`MATCH_MAX_DISTANCE_MM`, after the VNE paper: plane cosine similarity > 0.9 and slice
location difference < 4 mm) and every entry point (gadget, DICOM training pipeline, simulator
cache) imports it.

Pixel convention: see :mod:`vne.exam` (``position`` is the image centre; ``read_dir`` runs along
columns, ``phase_dir`` along rows).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .data import Geometry
from .resampling import _bilinear_operator, grid_map, pixel_centres_mm  # noqa: F401  (pixel_centres_mm: re-exported)

MATCH_MIN_ABS_COS = 0.9
MATCH_MAX_DISTANCE_MM = 4.0
# "the same plane" (images of one slice: grouping a series into slices, frames of a DICOM-SEG):
# within 1 degree and 0.5 mm
SAME_PLANE_MIN_ABS_COS = 0.9998
SAME_PLANE_MAX_DISTANCE_MM = 0.5


def centre_from_first_pixel(first_pixel_mm, read_dir, phase_dir, pixel_spacing_mm, shape) -> np.ndarray:
    """Image centre from DICOM ImagePositionPatient (the centre of the first, top-left pixel).

    Args:
        first_pixel_mm: (3,) ImagePositionPatient.
        read_dir, phase_dir: (3,) ImageOrientationPatient row and column cosines.
        pixel_spacing_mm: (dy, dx) PixelSpacing.
        shape: (ny, nx) Rows, Columns.
    """
    ny, nx = shape
    dy, dx = pixel_spacing_mm
    return (
        np.asarray(first_pixel_mm, float)
        + (nx - 1) / 2.0 * dx * np.asarray(read_dir, float)
        + (ny - 1) / 2.0 * dy * np.asarray(phase_dir, float)
    )


def first_pixel_from_centre(geom: Geometry) -> np.ndarray:
    """DICOM ImagePositionPatient (first pixel centre) from the image centre."""
    ny, nx = geom.shape
    dy, dx = geom.pixel_spacing_mm
    return (
        np.asarray(geom.position_mm, float)
        - (nx - 1) / 2.0 * dx * np.asarray(geom.read_dir, float)
        - (ny - 1) / 2.0 * dy * np.asarray(geom.phase_dir, float)
    )


def plane_abs_cosine(a: Geometry, b: Geometry) -> float:
    """|cos| of the angle between the two plane normals."""
    return float(abs(a.slice_dir @ b.slice_dir))


def plane_distance_mm(source: Geometry, target: Geometry) -> float:
    """Distance of the source image centre from the target plane, along the target normal (mm)."""
    d = np.asarray(source.position_mm, float) - np.asarray(target.position_mm, float)
    return float(abs(d @ target.slice_dir))


def same_plane(a: Geometry, b: Geometry) -> bool:
    """The same slice position and orientation (within 0.5 mm and 1 degree): one slice, not a
    neighbour. Looser, the paper's rule for matching different scans is :func:`planes_match`."""
    return abs(float(a.slice_dir @ b.slice_dir)) > SAME_PLANE_MIN_ABS_COS and plane_distance_mm(a, b) < SAME_PLANE_MAX_DISTANCE_MM


def planes_match(source: Geometry, target: Geometry) -> tuple[bool, str]:
    """The paper's matching rule: |cos| > 0.9 and distance < 4 mm.

    Returns:
        (matched, reason): reason says why not, or gives the figures when matched.
    """
    cos = plane_abs_cosine(source, target)
    dist = plane_distance_mm(source, target)
    if not np.isfinite(cos) or cos <= MATCH_MIN_ABS_COS:
        return False, f"plane orientation differs (|cos| = {cos:.3f} <= {MATCH_MIN_ABS_COS})"
    if not np.isfinite(dist) or dist >= MATCH_MAX_DISTANCE_MM:
        return False, f"planes are {dist:.1f} mm apart (>= {MATCH_MAX_DISTANCE_MM} mm)"
    return True, f"|cos| = {cos:.3f}, {dist:.1f} mm apart"


def resample_to_grid(image: np.ndarray, source: Geometry, target: Geometry, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 2D image (or a stack) onto another plane's grid, in patient coordinates.

    Each target pixel centre is projected onto the source plane and interpolated there
    (through-plane offsets are ignored; use :func:`planes_match` first).

    Args:
        image: (ny_s, nx_s) or (n, ny_s, nx_s) array on the ``source`` grid.
        source: geometry of ``image``.
        target: the output grid.
        order: spline order (1 = bilinear).

    Returns:
        (resampled, inside): ``resampled`` is (ny_t, nx_t) or (n, ny_t, nx_t) float32, zero
        outside the source field of view; ``inside`` is the (ny_t, nx_t) bool mask of target
        pixels that fall within the source image.
    """
    source.validate()
    target.validate()
    arr = np.asarray(image)
    ny, nx = source.shape
    if arr.ndim == 3 and arr.shape[1:] == (ny, nx) and order == 1:
        # a stack (cine frames): one sparse bilinear operator, cached per geometry pair
        # (vne.exam.resampling), applied to every frame at once

        m = grid_map(source, target)
        return m.apply(arr), np.array(m.inside)
    src = source.normalised()
    pts = pixel_centres_mm(target) - np.asarray(src.position_mm, float)
    dy, dx = src.pixel_spacing_mm
    j = pts @ np.asarray(src.read_dir, float) / dx + (nx - 1) / 2.0
    i = pts @ np.asarray(src.phase_dir, float) / dy + (ny - 1) / 2.0
    inside = (i >= -0.5) & (i <= ny - 0.5) & (j >= -0.5) & (j <= nx - 0.5)
    from scipy import ndimage  # on use: importing it costs ~0.2 s, and the gadget path never needs it

    coords = np.stack([i, j])
    if arr.ndim == 2:
        out = ndimage.map_coordinates(arr.astype(np.float32), coords, order=order, mode="nearest")
        out[~inside] = 0.0
        return out.astype(np.float32), inside
    if arr.ndim != 3 or arr.shape[1:] != (ny, nx):
        raise InputError(f"image shape {arr.shape} does not match its geometry {source.shape}")
    out = np.stack(
        [ndimage.map_coordinates(a.astype(np.float32), coords, order=order, mode="nearest") for a in arr]
    )
    out[:, ~inside] = 0.0
    return out.astype(np.float32), inside


def resample_cycle(frames: np.ndarray, trigger_times_ms: np.ndarray, rr_interval_ms: float, n_out: int) -> np.ndarray:
    """Resample one cardiac cycle of cine frames to ``n_out`` equally spaced phases.

    Interpolation is linear in time and cyclic (the last frame wraps to the first).

    Args:
        frames: (n_in, ny, nx) frames.
        trigger_times_ms: (n_in,) time after the R wave of each frame.
        rr_interval_ms: the cycle length; if not finite, estimated from the trigger times.
        n_out: number of output phases.

    Returns:
        (n_out, ny, nx) float32 frames at phases k * RR / n_out.
    """
    frames = np.asarray(frames, np.float32)
    t = np.asarray(trigger_times_ms, float)
    if frames.shape[0] != t.shape[0] or frames.shape[0] < 2:
        raise InputError(f"need >= 2 cine frames with trigger times, got {frames.shape[0]} frames and {t.shape[0]} times")
    order = np.argsort(t)
    frames, t = frames[order], t[order]
    if not (rr_interval_ms and np.isfinite(rr_interval_ms) and rr_interval_ms > t[-1]):
        step = np.median(np.diff(t)) if t.size > 1 else 1.0
        rr_interval_ms = t[-1] + step
    phase = (t - t[0]) / rr_interval_ms  # in [0, 1)
    out_phase = np.arange(n_out) / n_out
    ext_phase = np.concatenate([phase, [1.0]])
    idx = np.searchsorted(ext_phase, out_phase, side="right") - 1
    idx = np.clip(idx, 0, len(phase) - 1)
    lo = ext_phase[idx]
    hi = ext_phase[idx + 1]
    w = ((out_phase - lo) / np.maximum(hi - lo, 1e-9)).astype(np.float32)
    nxt = (idx + 1) % len(phase)
    # one (n_out, n_in) interpolation matrix applied to all pixels at once (a BLAS product; the
    # two fancy-indexed copies of the whole stack it replaces cost ~5x as much)
    weights = np.zeros((n_out, len(phase)), np.float32)
    np.add.at(weights, (np.arange(n_out), idx), 1 - w)
    np.add.at(weights, (np.arange(n_out), nxt), w)
    flat = np.ascontiguousarray(frames).reshape(frames.shape[0], -1)
    return (weights @ flat).reshape((n_out,) + frames.shape[1:]).astype(np.float32, copy=False)


def crop_geometry(geom: Geometry, rows: slice, cols: slice) -> Geometry:
    """The geometry of ``pixels[rows, cols]`` (a sub-grid with the same plane and spacing)."""
    ny, nx = geom.shape
    i0, i1, _ = rows.indices(ny)
    j0, j1, _ = cols.indices(nx)
    dy, dx = geom.pixel_spacing_mm
    ci = (i0 + i1 - 1) / 2.0 - (ny - 1) / 2.0
    cj = (j0 + j1 - 1) / 2.0 - (nx - 1) / 2.0
    centre = np.asarray(geom.position_mm, float) + ci * dy * np.asarray(geom.phase_dir, float) + cj * dx * np.asarray(geom.read_dir, float)
    from dataclasses import replace

    return replace(geom, position_mm=tuple(float(v) for v in centre), shape=(i1 - i0, j1 - j0))


def same_grid(a: Geometry, b: Geometry) -> bool:
    """Same shape and every pixel centre of ``a`` within 1% of a pixel of ``b``'s: a resampling
    from ``a`` onto ``b`` is the identity (masks from files, :mod:`vne.io.nifti`, :mod:`vne.io.dicom_seg`)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    ca, cb = pixel_centres_mm(a), pixel_centres_mm(b)
    corners = (0, -1)
    d = max(float(np.linalg.norm(ca[i, j] - cb[i, j])) for i in corners for j in corners)
    return d < 0.01 * min(min(a.pixel_spacing_mm), min(b.pixel_spacing_mm))
