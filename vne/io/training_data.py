"""The compact training cache: one compressed ``.npz`` per slice, already on the T1 grid.

Written by the simulator (``vne simulate``) and by the real-DICOM matching pipeline; read by
``training/dataset.py``. Both sources fill it through :func:`write_slice`, after the same
matching and resampling code the gadget uses (:mod:`vne.prepare.slices`, :mod:`vne.exam.geometry`) and the
same input shaping (:func:`vne.prepare.contract.model_inputs`), so training sees exactly what the
gadget will feed the model.

Layout of ``DIR``:
    index.json            {"version": 1, "entries": [entry, ...]} (see :func:`write_index`)
    <slice_id>.npz        arrays below, cropped to a square window around the heart

Arrays in each ``.npz`` (H = W = the crop size, T1-grid pixels):
    cine        (n_cine, H, W) float32   cine frames, resampled to the contract's phases
    ir          (n_ir, H, W)   float32   signed IR images, sorted by TI
    ir_ti_ms    (n_ir,)        float32
    t1_map_ms   (H, W)         float32
    lge         (H, W)         float32   PSIR LGE reference as acquired (artefacts included)
    lge_clean   (H, W)         float32   artefact-free LGE (simulator only; else == lge)
    myocardium, blood_pool, remote, lesion   (H, W) uint8 masks (all zero when unknown)
    lge_myocardium, lge_blood_pool, lge_remote  optional (H, W) uint8: the LGE's own masks
                                         (simulator: where the misregistered LGE saw the heart)
    pixel_spacing_mm (2,)      float32
Entry fields: slice_id, patient_id, case_id, slice_index, lesion_burden (slice, lesion/myo
area), lesion_free (bool), has_masks (bool), field_strength_t, source.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import atomic_write, atomic_write_text

CACHE_VERSION = 1
ARRAY_KEYS = ("cine", "ir", "ir_ti_ms", "t1_map_ms", "lge", "lge_clean", "myocardium", "blood_pool", "remote", "lesion", "pixel_spacing_mm")
MASK_KEYS = ("myocardium", "blood_pool", "remote", "lesion")
OPTIONAL_MASK_KEYS = ("lge_myocardium", "lge_blood_pool", "lge_remote")


def heart_crop_window(centre_ij, shape, size: int) -> tuple[slice, slice]:
    """A ``size`` x ``size`` window centred on ``centre_ij`` and kept inside ``shape``.

    Raises:
        InputError: the image is smaller than the window.
    """
    ny, nx = shape
    if ny < size or nx < size:
        raise InputError(f"image {shape} is smaller than the training crop {size}")
    i0 = int(np.clip(round(centre_ij[0] - size / 2), 0, ny - size))
    j0 = int(np.clip(round(centre_ij[1] - size / 2), 0, nx - size))
    return slice(i0, i0 + size), slice(j0, j0 + size)


def write_slice(directory: Path, slice_id: str, arrays: dict[str, np.ndarray]) -> Path:
    """Write one slice atomically (a temp file renamed into place, so nothing half-written)."""
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise InputError(f"cache slice {slice_id} lacks {missing}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for k in ARRAY_KEYS + tuple(k for k in OPTIONAL_MASK_KEYS if arrays.get(k) is not None):
        v = np.asarray(arrays[k])
        out[k] = v.astype(np.uint8) if k in MASK_KEYS + OPTIONAL_MASK_KEYS else v.astype(np.float32)
    return atomic_write(directory / f"{slice_id}.npz", lambda f: np.savez_compressed(f, **out))


def read_slice(directory: Path, slice_id: str) -> dict[str, np.ndarray]:
    with np.load(Path(directory) / f"{slice_id}.npz") as z:
        return {k: z[k] for k in z.files}


def write_index(directory: Path, entries: list[dict], extra: dict | None = None) -> Path:
    """Write ``index.json`` atomically. ``extra`` holds provenance (simulator version, seed...)."""
    directory = Path(directory)
    doc = {"version": CACHE_VERSION, "entries": entries, **(extra or {})}
    return atomic_write_text(directory / "index.json", json.dumps(doc, indent=1))


def read_index(directory: Path) -> dict:
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise InputError(f"{directory} is not a VNE training cache (no index.json)")
    doc = json.loads(path.read_text())
    if doc.get("version") != CACHE_VERSION:
        raise InputError(f"{path}: cache version {doc.get('version')} is not {CACHE_VERSION}")
    return doc
