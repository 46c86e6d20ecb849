"""Match an exam's images slice by slice and bring each slice onto its T1 map's grid.

This is the one place where the paper's matching pipeline lives, used by the gadget, ``vne
infer``, the real-DICOM training pipeline and the simulator's training cache:

1. every T1 map is an anchor slice;
2. IR magnitude/phase images, cine frames and LGE images are attached to the T1 map whose plane
   they match (|cos| > 0.9 and < 4 mm, :func:`vne.exam.geometry.planes_match`); cine and LGE
   images are grouped into slices first and the nearest matching slice wins;
3. :func:`on_t1_grid` resamples everything onto the T1 grid in patient coordinates and restores
   the sign of the IR recovery (from phase images, else by polarity search).

Problems never raise out of :func:`build_slices`: each T1 map that cannot be completed comes
back with a specific reason instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..exam.data import Geometry, MRImage, Role, SliceSet
from ..exam.geometry import plane_distance_mm, planes_match, resample_to_grid, same_plane
from .roi import cine_motion_from_frames

log = logging.getLogger(__name__)

MIN_CINE_FRAMES = 8


@dataclass
class SliceOnGrid:
    """One slice with every input on the T1 grid.

    Attributes:
        t1_map_ms: (H, W) native T1 (ms).
        ir_signed: (n, H, W) IR images with the recovery sign restored, sorted by TI.
        ir_ti_ms: (n,) TIs (ms), sorted.
        cine_frames: (m, H, W) cine frames sorted by trigger time.
        cine_trigger_ms: (m,) trigger times (ms).
        rr_interval_ms: RR interval (ms), or None.
        lge: (H, W) LGE on the T1 grid, or None.
        cine_coverage: fraction of the T1 grid covered by the cine field of view.
        cine_motion: (H, W) the cine's motion map (:func:`vne.prepare.roi.cine_motion_from_frames`,
            as the gadget computes it), or None for fewer than 4 frames.
    """

    key: str
    t1: MRImage
    t1_map_ms: np.ndarray
    ir_signed: np.ndarray
    ir_ti_ms: np.ndarray
    cine_frames: np.ndarray
    cine_trigger_ms: np.ndarray
    rr_interval_ms: float | None
    lge: np.ndarray | None
    cine_coverage: float
    cine_motion: np.ndarray | None = None


def slice_key(geom: Geometry) -> str:
    p = geom.position_mm
    return f"slice@({p[0]:.1f},{p[1]:.1f},{p[2]:.1f})"


def group_by_plane(images: list[MRImage]) -> list[list[MRImage]]:
    """Group images of one role into slices: same series and same plane."""
    groups: list[list[MRImage]] = []
    for im in images:
        for g in groups:
            if g[0].series == im.series and same_plane(g[0].geometry, im.geometry):
                g.append(im)
                break
        else:
            groups.append([im])
    return groups


def _nearest_matching(groups: list[list[MRImage]], target: Geometry) -> tuple[list[MRImage] | None, str]:
    best, best_d, reasons = None, np.inf, []
    for g in groups:
        try:
            g[0].geometry.validate()
        except InputError as exc:
            reasons.append(str(exc))
            continue
        ok, why = planes_match(g[0].geometry, target)
        if not ok:
            reasons.append(why)
            continue
        d = plane_distance_mm(g[0].geometry, target)
        if d < best_d:
            best, best_d = g, d
    if best is None:
        return None, ("; ".join(sorted(set(reasons))) if reasons else "none in the exam")
    return best, f"{best_d:.1f} mm"


def _dedupe(images: list[MRImage], key) -> tuple[list[MRImage], int]:
    """Drop images whose ``key`` repeats (duplicates re-sent by a scanner); keep the first."""
    seen, out = set(), []
    for im in images:
        k = key(im)
        if k in seen:
            continue
        seen.add(k)
        out.append(im)
    return out, len(images) - len(out)


_UNSET = "unset"  # _ordered_series: a matched image lacks the attribute the series is ordered by


def _ordered_series(images: list[MRImage], target: Geometry, attr: str) -> tuple[list[MRImage] | None, str, int]:
    """The series of ``images`` in the plane nearest ``target``, images repeating an ``attr``
    value dropped (:func:`_dedupe`), sorted by ``attr`` (inversion or trigger time).

    Returns:
        (images, how far / why none, duplicates dropped); images is None when no series
        matches the plane (why: :func:`_nearest_matching`'s reason) or one of them lacks
        ``attr`` (why: :data:`_UNSET`).
    """
    group, why = _nearest_matching(group_by_plane(images), target)
    if group is None:
        return None, why, 0
    group, n_dup = _dedupe(group, lambda im: getattr(im, attr))
    if any(getattr(im, attr) is None for im in group):
        return None, _UNSET, n_dup
    group.sort(key=lambda im: getattr(im, attr))
    return group, why, n_dup


def assemble(t1_map: MRImage, images: list[MRImage], need_lge: bool = False) -> tuple[SliceSet | None, str]:
    """Collect the IR images, cine frames (and LGE) that belong to one T1 map.

    Returns:
        (slice_set, reason): ``slice_set`` is None when something needed is missing, and
        ``reason`` says what; otherwise ``reason`` summarises the match.
    """
    key = slice_key(t1_map.geometry)
    try:
        t1_map.geometry.validate()
    except InputError as exc:
        return None, f"{key}: T1 map geometry is unusable: {exc}"
    target = t1_map.geometry
    by_role = {r: [im for im in images if im.role == r] for r in (Role.IR_MAGNITUDE, Role.IR_PHASE, Role.CINE, Role.LGE)}

    ir_group, ir_why, n_dup = _ordered_series(by_role[Role.IR_MAGNITUDE], target, "inversion_time_ms")
    if ir_group is None:
        return None, (f"{key}: IR images without an inversion time" if ir_why == _UNSET
                      else f"{key}: no IR-weighted images match the T1 map plane ({ir_why})")
    phase_group, _ = _nearest_matching(group_by_plane(by_role[Role.IR_PHASE]), target)
    phases: list[MRImage] = []
    if phase_group:
        by_ti = {im.inversion_time_ms: im for im in phase_group}
        if all(im.inversion_time_ms in by_ti for im in ir_group):
            phases = [by_ti[im.inversion_time_ms] for im in ir_group]

    cine_group, cine_why, n_dup_c = _ordered_series(by_role[Role.CINE], target, "trigger_time_ms")
    if cine_group is None:
        return None, (f"{key}: cine frames without trigger times" if cine_why == _UNSET
                      else f"{key}: no cine slice matches the T1 map plane ({cine_why})")
    if len(cine_group) < MIN_CINE_FRAMES:
        return None, f"{key}: only {len(cine_group)} cine frames (need >= {MIN_CINE_FRAMES} for one cycle)"

    lge = None
    lge_group, lge_why = _nearest_matching(group_by_plane(by_role[Role.LGE]), target)
    if lge_group:
        lge = lge_group[0]
    elif need_lge:
        return None, f"{key}: no LGE slice matches the T1 map plane ({lge_why})"
    notes = f"{key}: {len(ir_group)} IR ({'with' if phases else 'without'} phase), {len(cine_group)} cine frames ({cine_why})"
    if n_dup or n_dup_c:
        notes += f", {n_dup + n_dup_c} duplicate images ignored"
    return SliceSet(t1_map=t1_map, ir_images=ir_group, ir_phase=phases, cine_frames=cine_group, lge=lge, key=key), notes


def build_slices(images: list[MRImage], need_lge: bool = False) -> tuple[list[SliceSet], list[str]]:
    """All complete slices of an exam, and a reason for each T1 map that could not be used."""
    t1_maps, n_dup = _dedupe([im for im in images if im.role == Role.T1_MAP],
                             lambda im: (im.series, tuple(np.round(im.geometry.position_mm, 2))))
    if not t1_maps:
        return [], ["no T1 map in the exam"]
    slices, reasons = [], []
    if n_dup:
        reasons.append(f"{n_dup} duplicate T1 map images ignored")
    for t1 in t1_maps:
        s, why = assemble(t1, images, need_lge=need_lge)
        (slices.append(s) if s else reasons.append(why))
        if s:
            log.debug(why)
    return slices, reasons


def stack_pixels(images: list[MRImage], what: str = "images") -> np.ndarray:
    """The pixels of one slice's images of one role, (n, h, w) float32, checked: each pixel
    array matches its geometry and all share one shape (``what`` names them in the message).

    Raises:
        InputError: a pixel array that does not match its geometry, or mixed shapes.
    """
    src = images[0].geometry
    for im in images:
        if np.shape(im.pixels) != im.geometry.shape:
            raise InputError(f"{im.source or im.series}: pixel array {np.shape(im.pixels)} does not match its "
                             f"geometry {im.geometry.shape}")
    if not all(im.geometry.shape == src.shape for im in images):
        raise InputError(f"{what} of one slice have mixed shapes: {sorted({im.geometry.shape for im in images})}")
    if not all(im.geometry == src for im in images):
        log.debug("%s of one slice differ slightly in geometry; the first one's is used", what)
    return np.stack([np.asarray(im.pixels, np.float32) for im in images])


def _onto(stack: np.ndarray, images: list[MRImage], target: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """``stack`` (:func:`stack_pixels` of ``images``, all on one source grid) resampled onto
    ``target``, and where the source covers it; identity when the grids agree."""
    src = images[0].geometry
    if all(im.geometry == src for im in images) and src == target:
        return stack, np.ones(target.shape, bool)
    return resample_to_grid(stack, src, target)


def _stack_on(images: list[MRImage], target: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Resample images (all on one source grid) onto ``target``; identity when the grids agree."""
    return _onto(stack_pixels(images), images, target)


def _phase_on(images: list[MRImage], target: Geometry) -> np.ndarray:
    """Phase images (rad) onto ``target``: cos and sin are resampled, so the +-pi wrap is safe."""
    cos = [MRImage(**{**im.__dict__, "pixels": np.cos(np.asarray(im.pixels, np.float32))}) for im in images]
    sin = [MRImage(**{**im.__dict__, "pixels": np.sin(np.asarray(im.pixels, np.float32))}) for im in images]
    return np.arctan2(_stack_on(sin, target)[0], _stack_on(cos, target)[0]).astype(np.float32)


def lge_on_t1_grid(s: SliceSet) -> np.ndarray | None:
    """The slice's LGE resampled onto its T1 grid, (H, W) float32, or None without an LGE: what
    the evaluation and the demo need of a slice beside the VNE that the gadget made."""
    if s.lge is None or s.t1_map is None:
        return None
    return _stack_on([s.lge], s.t1_map.geometry)[0][0]


def on_t1_grid(s: SliceSet) -> SliceOnGrid:
    """Resample one matched slice onto its T1 grid and restore the IR sign.

    Raises:
        InputError: non-finite data, mismatched shapes, or no usable overlap.
    """
    from ..t1 import restore_polarity  # the T1 module is heavier; import on use

    t1 = s.t1_map
    if t1 is None:
        raise InputError(f"{s.key}: no T1 map")
    target = t1.geometry
    t1_ms = np.asarray(t1.pixels, np.float32)
    if t1_ms.shape != target.shape:
        raise InputError(f"{s.key}: T1 map pixels {t1_ms.shape} do not match its geometry {target.shape}")
    if not np.all(np.isfinite(t1_ms)):
        raise InputError(f"{s.key}: T1 map contains NaN or inf")
    ir, _ = _stack_on(s.ir_images, target)
    ti = np.array([im.inversion_time_ms for im in s.ir_images], np.float32)
    phase = _phase_on(s.ir_phase, target) if s.ir_phase else None
    ir_signed = restore_polarity(ir, ti, ir_phase=phase, t1_map_ms=t1_ms)
    cine_raw = stack_pixels(s.cine_frames)
    cine, inside = _onto(cine_raw, s.cine_frames, target)
    coverage = float(inside.mean())
    if coverage < 0.05:
        raise InputError(f"{s.key}: the cine field of view does not overlap the T1 map")
    trig = np.array([im.trigger_time_ms for im in s.cine_frames], np.float32)
    rr = next((im.rr_interval_ms for im in s.cine_frames if im.rr_interval_ms), None)
    lge = lge_on_t1_grid(s)
    for name, arr in (("IR images", ir_signed), ("cine frames", cine)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{s.key}: {name} contain NaN or inf")
    motion = cine_motion_from_frames(cine_raw, s.cine_frames[0].geometry, target)
    return SliceOnGrid(key=s.key, t1=t1, t1_map_ms=t1_ms, ir_signed=ir_signed.astype(np.float32), ir_ti_ms=ti,
                       cine_frames=cine, cine_trigger_ms=trig, rr_interval_ms=rr, lge=lge, cine_coverage=coverage,
                       cine_motion=motion)
