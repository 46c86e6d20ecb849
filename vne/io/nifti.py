"""NIfTI masks, read and written with nibabel, and placed on a T1 map's grid.

- :func:`read_nifti`: a single-file NIfTI-1 / NIfTI-2 image (``.nii``, ``.nii.gz``), either byte
  order, integer or float voxels (scaled by ``scl_slope`` / ``scl_inter``). The voxel grid is
  placed in patient coordinates by the sform (when ``sform_code > 0``), else the qform
  (``qform_code > 0``), as nibabel does; files with neither are refused. Spatial units other
  than mm (``xyzt_units``) are converted.
- :func:`nifti_on_grid`: NIfTI world coordinates are RAS+, DICOM's are LPS+ (x and y change
  sign). The mask may be 2D or a 3D stack: the voxel axis closest to the T1 map's normal is the
  slice axis, the slice nearest to the T1 plane that passes :func:`vne.exam.geometry.planes_match`
  is taken and resampled onto the T1 grid nearest-neighbour
  (:func:`vne.exam.geometry.resample_to_grid`, identity when the grids agree).
- :func:`write_nifti`, :func:`write_nifti_mask`, :func:`nifti_affine`: the writer side (sform
  and qform set, unit mm), so a mask on a T1 grid round-trips exactly.

Which file holds which mask is :mod:`vne.io.masks`' business; see ``docs/masks.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, reason
from ..exam.data import Geometry
from ..exam.geometry import first_pixel_from_centre, plane_distance_mm, planes_match, resample_to_grid, same_grid

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class NiftiImage:
    """A NIfTI volume: ``data[i, j, k]`` and the 4x4 affine from voxel index to RAS+ mm."""

    data: np.ndarray
    affine: np.ndarray
    path: str = ""


_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def _nibabel():
    try:
        import nibabel
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise InputError("reading or writing NIfTI masks needs nibabel (pip install nibabel)") from None
    return nibabel


def read_nifti(path) -> NiftiImage:
    """Read a single-file NIfTI-1 or NIfTI-2 image (``.nii`` or ``.nii.gz``) with nibabel.

    Returns:
        data as ``(ni, nj, nk)`` (trailing singleton dimensions dropped, at least 3), scaled by
        ``scl_slope`` / ``scl_inter``; the affine from the sform, else the qform (nibabel's
        choice), in mm whatever the file's spatial unit.

    Raises:
        InputError: not NIfTI, a header/image pair, unreadable, more than one volume, a
            non-numeric data type, or no qform / sform orientation (it cannot be placed).
    """
    nib = _nibabel()
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for what is not NIfTI
        raise InputError(f"{path}: not a NIfTI file ({reason(exc)})") from None
    hdr = img.header
    magic = bytes(np.asarray(hdr["magic"]).tobytes()).rstrip(b"\x00") if "magic" in hdr else b""
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or magic not in (b"n+1", b"n+2"):
        raise InputError(f"{path}: not a single-file NIfTI image (a .hdr/.img pair or ANALYZE 7.5 has no place here; "
                         "save it as one .nii file)")
    shape = tuple(int(n) for n in img.shape)
    if any(n != 1 for n in shape[3:]):
        raise InputError(f"{path}: has {int(np.prod(shape[3:]))} volumes (dimensions {list(shape)}); one mask per file")
    if int(hdr["sform_code"]) <= 0 and int(hdr["qform_code"]) <= 0:
        raise InputError(f"{path}: NIfTI file has no orientation (qform_code and sform_code are 0); "
                         "it cannot be placed on the T1 map")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"{path}: unreadable NIfTI data ({reason(exc)})") from None
    if data.dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported NIfTI data type {data.dtype} (need integer or float voxels)")
    data = data.reshape(shape[:3] + (1,) * (3 - len(shape[:3])))
    affine = np.array(img.affine, float)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: NIfTI orientation is not finite")
    affine[:3] *= _UNIT_TO_MM.get(hdr.get_xyzt_units()[0], 1.0)
    return NiftiImage(data=data, affine=affine, path=str(path))


def write_nifti(path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI-1 single file with nibabel (``.nii``, or gzip-compressed for ``.nii.gz``).

    Args:
        data: 2D or 3D array indexed ``[i, j(, k)]``; bool is written as uint8.
        affine: 4x4 voxel index -> RAS+ mm; written as sform and qform (code 1, scanner), unit mm.
    """
    nib = _nibabel()
    path = Path(path)
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(f"write_nifti: need a 2D or 3D array, got {arr.shape}")
    affine = np.asarray(affine, float)
    if np.any(np.linalg.norm(affine[:3, :3], axis=0) <= 0):
        raise InputError("write_nifti: the affine has a zero-length axis")
    try:
        img = nib.Nifti1Image(arr, affine)
    except Exception as exc:  # e.g. a data type NIfTI-1 has no code for
        raise InputError(f"write_nifti: {reason(exc)}") from None
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def nifti_affine(geom: Geometry) -> np.ndarray:
    """The RAS+ affine of a 2D image on ``geom`` stored as ``pixels.T[:, :, None]``.

    NIfTI index ``i`` runs along DICOM columns (``read_dir``), ``j`` along rows (``phase_dir``),
    ``k`` along the plane normal (one slice thick).
    """
    g = geom.normalised()
    dy, dx = g.pixel_spacing_mm
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(g.read_dir) * dx
    lps[:3, 1] = np.asarray(g.phase_dir) * dy
    lps[:3, 2] = g.slice_dir * g.slice_thickness_mm
    lps[:3, 3] = first_pixel_from_centre(g)
    out = lps.copy()
    out[:3] = LPS_FROM_RAS @ lps[:3]
    return out


def write_nifti_mask(path, mask: np.ndarray, geom: Geometry) -> Path:
    """Write an (H, W) mask on ``geom`` as NIfTI (uint8 for bool, else the array's type)."""
    mask = np.asarray(mask)
    if mask.shape != tuple(geom.shape):
        raise InputError(f"write_nifti_mask: mask {mask.shape} does not match the grid {geom.shape}")
    return write_nifti(path, mask.T[:, :, None], nifti_affine(geom))


def nifti_on_grid(img: NiftiImage, target: Geometry) -> np.ndarray:
    """The NIfTI volume's slice in the target plane, nearest-neighbour on the target grid.

    Returns:
        (H, W) float32 on ``target``, zero outside the volume's field of view.

    Raises:
        InputError: the volume is oblique to the target plane, sheared, or no slice of it lies
            in the target plane (:func:`vne.exam.geometry.planes_match`).
    """
    m = LPS_FROM_RAS @ img.affine[:3, :3]
    t = LPS_FROM_RAS @ img.affine[:3, 3]
    data = img.data
    axes = [m[:, a] for a in range(3)]
    norms = [float(np.linalg.norm(v)) for v in axes]
    if norms[0] < 1e-9 or norms[1] < 1e-9:
        raise InputError(f"{img.path}: degenerate NIfTI orientation")
    normal = np.asarray(target.slice_dir, float)
    cos = [abs(float(axes[a] @ normal)) / norms[a] if norms[a] > 1e-9 else 0.0 for a in range(3)]
    if norms[2] < 1e-9:  # a 2D file with a zero third column
        if data.shape[2] != 1:
            raise InputError(f"{img.path}: degenerate NIfTI orientation")
        cos[2] = 1.0
    # one slice: i and j are in plane; a stack: the axis closest to the T1 normal is the slice axis
    k_axis = 2 if data.shape[2] == 1 else int(np.argmax(cos))
    a_axis, b_axis = [a for a in range(3) if a != k_axis]
    read = axes[a_axis] / norms[a_axis]
    phase = axes[b_axis] / norms[b_axis]
    na, nb = data.shape[a_axis], data.shape[b_axis]
    best, best_d, why = None, np.inf, "no slice"
    for k in range(data.shape[k_axis]):
        idx = np.zeros(3)
        idx[k_axis] = k
        idx[a_axis] = (na - 1) / 2.0
        idx[b_axis] = (nb - 1) / 2.0
        centre = t + m @ idx
        g = Geometry(position_mm=tuple(float(v) for v in centre), read_dir=tuple(float(v) for v in read),
                     phase_dir=tuple(float(v) for v in phase), pixel_spacing_mm=(norms[b_axis], norms[a_axis]),
                     shape=(nb, na), slice_thickness_mm=norms[k_axis] if norms[k_axis] > 1e-9 else 1.0)
        try:
            g.validate()
        except InputError as exc:
            raise InputError(f"{img.path}: {exc} (a sheared NIfTI grid)") from None
        ok, why_k = planes_match(g, target)
        if not ok:
            why = why_k
            continue
        d = plane_distance_mm(g, target)
        if d < best_d:
            best, best_d = (k, g), d
    if best is None:
        raise InputError(f"{img.path}: no slice of the mask volume lies in the T1 map plane ({why})")
    k, g = best
    pixels = np.asarray(np.take(data, k, axis=k_axis).T, np.float32)  # (a, b) -> (nb, na): rows along b
    if same_grid(g, target):
        return pixels
    out, inside = resample_to_grid(pixels, g, target, order=0)
    if not inside.any():
        raise InputError(f"{img.path}: the mask does not overlap the T1 map's field of view")
    return out
