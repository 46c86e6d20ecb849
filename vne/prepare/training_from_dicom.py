"""Real DICOM exams -> the training cache, through the paper's matching pipeline.

For every exam (StudyInstanceUID) under a folder:

1. read and classify every instance (:func:`vne.io.dicom.read_dicom_folder`);
2. pair each T1 map with IR images, a cine slice and an LGE slice by orientation
   (|cos| > 0.9) and position (< 4 mm) (:func:`vne.prepare.slices.build_slices`);
3. resample cine and LGE onto the T1 grid (:func:`vne.prepare.slices.on_t1_grid`) and shape the inputs
   exactly as the gadget does (:func:`vne.prepare.contract.model_inputs`);
4. apply quality checks and log every inclusion and exclusion with its reason to
   ``inclusion_log.csv``.

Real exams have no masks: entries carry ``has_masks = False`` and the dataset normalises the LGE
target by robust percentiles instead. Splits are made by patient in ``training/dataset.py``.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .contract import ModelContract, model_inputs
from ..io.dicom import read_dicom_folder
from ..errors import InputError
from .slices import build_slices, on_t1_grid
from ..io.training_data import write_index, write_slice

log = logging.getLogger(__name__)

MIN_CINE_COVERAGE = 0.5
T1_PLAUSIBLE_MEDIAN_MS = (300.0, 2500.0)


def quality_problem(grid, contract: ModelContract) -> str | None:
    """Why a matched slice must be excluded from training, or None."""
    if grid.lge is None:
        return "no matching LGE slice"
    if grid.cine_coverage < MIN_CINE_COVERAGE:
        return f"cine covers only {grid.cine_coverage:.0%} of the T1 grid"
    body = grid.t1_map_ms[grid.t1_map_ms > 0]
    if body.size < 100:
        return "T1 map is empty"
    med = float(np.median(body))
    if not T1_PLAUSIBLE_MEDIAN_MS[0] <= med <= T1_PLAUSIBLE_MEDIAN_MS[1]:
        return f"T1 map median {med:.0f} is implausible for ms (wrong units?)"
    if len(grid.ir_ti_ms) < contract.n_ir_images:
        return f"{len(grid.ir_ti_ms)} IR images, the model needs {contract.n_ir_images}"
    if not np.any(grid.lge):
        return "LGE is empty on the T1 grid (no overlap)"
    return None


def build_cache_from_dicom(dicom_root: Path, out_dir: Path, contract: ModelContract | None = None) -> tuple[list[dict], list[dict]]:
    """Match, resample, check and write every usable slice of every exam under ``dicom_root``.

    Returns:
        (cache entries, log rows). ``out_dir/inclusion_log.csv`` holds the rows:
        study_uid, patient_id, slice, decision (included / excluded), reason.
    """
    contract = contract or ModelContract()
    exams = read_dicom_folder(Path(dicom_root))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for exam in tqdm(exams, desc="exams", unit="exam"):
        patient = exam.patient_id or exam.study_uid
        slices, reasons = build_slices(exam.images, need_lge=True)
        for why in reasons:
            rows.append({"study_uid": exam.study_uid, "patient_id": patient, "slice": "", "decision": "excluded", "reason": why})
        for k, s in enumerate(slices):
            try:
                grid = on_t1_grid(s)
                problem = quality_problem(grid, contract)
                if problem:
                    raise InputError(problem)
                x = model_inputs(contract, grid.t1_map_ms, grid.ir_signed, grid.ir_ti_ms, grid.cine_frames,
                                 grid.cine_trigger_ms, grid.rr_interval_ms)
            except InputError as exc:
                rows.append({"study_uid": exam.study_uid, "patient_id": patient, "slice": s.key, "decision": "excluded", "reason": str(exc)})
                continue
            slice_id = "dcm-" + hashlib.sha1(f"{exam.study_uid}/{s.key}".encode()).hexdigest()[:16]
            empty = np.zeros(grid.t1_map_ms.shape, np.uint8)
            write_slice(out_dir, slice_id, {
                "cine": x["cine"][0], "ir": x["ir"][0], "ir_ti_ms": x["ir_ti_ms"][0], "t1_map_ms": x["t1_map_ms"][0, 0],
                "lge": grid.lge, "lge_clean": grid.lge, "myocardium": empty, "blood_pool": empty, "remote": empty,
                "lesion": empty, "pixel_spacing_mm": np.asarray(s.t1_map.geometry.pixel_spacing_mm),
            })
            entries.append({"slice_id": slice_id, "patient_id": patient, "case_id": exam.study_uid, "slice_index": k,
                            "lesion_burden": float("nan"), "lesion_free": False, "has_masks": False,
                            "source": f"dicom:{exam.source}"})
            rows.append({"study_uid": exam.study_uid, "patient_id": patient, "slice": s.key, "decision": "included",
                         "reason": "passed matching and quality checks"})
    with open(out_dir / "inclusion_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["study_uid", "patient_id", "slice", "decision", "reason"])
        w.writeheader()
        w.writerows(rows)
    write_index(out_dir, entries, extra={"source": "dicom", "dicom_root": str(dicom_root), "n_exams": len(exams)})
    return entries, rows
