"""VNE vs LGE on real DICOM exams: :class:`vne.evaluation.analysis.SliceResult` from DICOM folders and mask files.

:func:`collect_dicom` is the real-data counterpart of ``vne evaluate``'s simulated-exam
collector (:func:`vne.evaluation.collect_simulated.collect`):

1. every study under the exams folder is read with :func:`vne.io.dicom.read_dicom_folder`;
2. the model runs through the same pipeline as ``vne infer`` on DICOM
   (:meth:`vne.runtime.pipeline.VNEPipeline.add_images`, study cache off);
3. the LGE is matched and brought onto each T1 map's grid by the shared matching code
   (:func:`vne.prepare.slices.build_slices` with ``need_lge=True``, :func:`vne.prepare.slices.lge_on_t1_grid`);
4. the masks of each T1 map come from the masks folder (:class:`vne.io.masks.MaskStore`; layout
   and formats in :mod:`vne.io.masks` and ``docs/masks.md``), looked up by the T1 map's
   SOPInstanceUID or slice index ``s<k>`` under the exam's folder name, PatientID or
   StudyInstanceUID.

Real data have no artefact-free LGE, so ``lge_clean`` is the LGE itself (the "agreement with
the artefact-free LGE" numbers of the report then compare against the acquired LGE), and the
artefact list is empty. Without a lesion mask a slice's ``lesion`` is empty, so the report's
"truth" burden means something only when lesion masks are given.

Whether a patient is lesion-free (for the false-positive rate), in this order:

1. the per-patient CSV (``lesion_free_csv``, default ``<masks>/lesion_free.csv`` when it
   exists; columns ``patient_id,lesion_free``), for the patients it lists;
2. else, when every evaluated slice of the patient has a lesion mask: lesion-free when all of
   them are empty;
3. else not lesion-free (unknown is never counted as lesion-free).

Slices without masks (:class:`vne.io.masks.MasksNotFound`), without a matching LGE or without a
VNE image are skipped with a logged reason; masks that are found but unusable raise
:class:`vne.errors.InputError` (or are skipped with a warning, with ``skip_bad_masks``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..exam.data import Exam

log = logging.getLogger(__name__)

LESION_FREE_CSV = "lesion_free.csv"


def exam_folder_name(exam: Exam, exams_dir: Path) -> str:
    """The first folder under ``exams_dir`` that holds all of the exam's images ('' if none)."""
    root = Path(exams_dir).resolve()
    tops = set()
    for im in exam.images:
        try:
            rel = Path(im.source).resolve().relative_to(root)
        except ValueError:
            return ""
        if len(rel.parts) < 2:
            return ""
        tops.add(rel.parts[0])
    return tops.pop() if len(tops) == 1 else ""


def collect_dicom(exams_dir, masks_dir, model=None, *, lesion_free_csv=None,
                  names: Mapping[str, Sequence[str]] | None = None, threshold: float = 0.5,
                  skip_bad_masks: bool = False) -> list:
    """SliceResults for every T1 map with a VNE image, a matching LGE and masks.

    Args:
        exams_dir: a folder of DICOM exams (any nesting; one exam per StudyInstanceUID).
        masks_dir: the masks folder or file (:mod:`vne.io.masks`).
        model: ONNX model path (None: the default model, :func:`vne.runtime.model.find_default_model`).
        lesion_free_csv: per-patient lesion-free CSV (default ``<masks_dir>/lesion_free.csv`` if present).
        names: mask name overrides (:data:`vne.io.masks.DEFAULT_NAMES`), e.g. DICOM-SEG labels.
        threshold: mask threshold for fractional masks.
        skip_bad_masks: skip (with a warning) slices whose masks are unusable instead of raising.

    Returns:
        list of :class:`vne.evaluation.analysis.SliceResult`, exam by exam, in slice order.

    Raises:
        InputError: no exams, the model cannot be loaded, unusable masks, or nothing to evaluate.
    """
    from ..io.dicom import read_dicom_folder
    from .analysis import SliceResult
    from ..io.masks import MaskStore, MasksNotFound, read_lesion_free_csv, t1_slice_order
    from ..runtime.config import PipelineConfig
    from ..runtime.pipeline import VNEPipeline
    from ..prepare.slices import build_slices, lge_on_t1_grid

    exams_dir, masks_dir = Path(exams_dir), Path(masks_dir)
    store = MaskStore(masks_dir, names, threshold)
    csv_path = Path(lesion_free_csv) if lesion_free_csv else (masks_dir / LESION_FREE_CSV if masks_dir.is_dir() else None)
    if lesion_free_csv and not csv_path.is_file():
        raise InputError(f"lesion-free CSV {csv_path} does not exist")
    free_csv = read_lesion_free_csv(csv_path) if csv_path and csv_path.is_file() else {}
    exams = read_dicom_folder(exams_dir)
    results: list = []
    has_lesion_mask: dict[str, list[bool]] = {}
    n_skipped = 0
    for exam in exams:
        folder = exam_folder_name(exam, exams_dir)
        patient = exam.patient_id or exam.study_uid
        case_id = folder or exam.study_uid
        pipe = VNEPipeline(PipelineConfig(model=str(model) if model else None, cache_dir="none"))
        if pipe.disabled_reason:
            raise InputError(f"model: {pipe.disabled_reason}")
        vne_results = pipe.add_images(exam.images)
        if not vne_results:
            log.warning("%s: no VNE image (%s); exam skipped", case_id, "; ".join(pipe.problems) or "no reason given")
            continue
        slices, reasons = build_slices(exam.images, need_lge=True)
        by_t1 = {id(s.t1_map): s for s in slices}
        order = {id(im): k for k, im in enumerate(t1_slice_order(exam.images))}
        study_keys = [k for k in (folder, exam.patient_id, exam.study_uid) if k]
        for r in vne_results:
            k = order.get(id(r.t1))
            label = f"{case_id} s{k}" if k is not None else f"{case_id} {r.key}"
            s = by_t1.get(id(r.t1))
            if s is None:
                why = next((x for x in reasons if x.startswith(r.key)), "no LGE slice matches the T1 map")
                log.warning("%s: skipped: %s", label, why)
                n_skipped += 1
                continue
            try:
                masks = store.load(r.t1, slice_index=k, study_keys=study_keys)
            except MasksNotFound as exc:
                log.warning("%s: skipped: %s", label, exc)
                n_skipped += 1
                continue
            except InputError as exc:
                if not skip_bad_masks:
                    raise InputError(f"{label}: {exc}") from None
                log.warning("%s: skipped: %s", label, exc)
                n_skipped += 1
                continue
            try:
                lge = lge_on_t1_grid(s)
            except InputError as exc:
                log.warning("%s: skipped: %s", label, exc)
                n_skipped += 1
                continue
            t1_ms = np.asarray(r.t1.pixels, np.float32)
            lesion = masks.lesion if masks.lesion is not None else np.zeros(t1_ms.shape, bool)
            has_lesion_mask.setdefault(patient, []).append(masks.lesion is not None)
            results.append(SliceResult(
                case_id=case_id, patient_id=patient, slice_key=f"s{k}" if k is not None else r.key, t1_map_ms=t1_ms,
                vne=np.asarray(r.vne, np.float32), lge=lge, lge_clean=lge,
                myocardium=masks.myocardium, blood_pool=masks.blood_pool, remote=masks.remote, lesion=lesion,
                lesion_free=False, artefacts=[], lge_myocardium=masks.lge_myocardium,
                lge_blood_pool=masks.lge_blood_pool, lge_remote=masks.lge_remote))
    if not results:
        raise InputError(f"nothing to evaluate: no slice of {exams_dir} has a VNE image, a matching LGE and masks "
                         f"({n_skipped} slices skipped; see the log)")
    for patient, flags in has_lesion_mask.items():
        rs = [r for r in results if r.patient_id == patient]
        if patient in free_csv:
            free, why = free_csv[patient], f"from {csv_path.name}"
        elif all(flags):
            free, why = not any(r.lesion.any() for r in rs), "from the lesion masks"
        else:
            free, why = False, "unknown (no lesion CSV entry, not every slice has a lesion mask)"
        for r in rs:
            r.lesion_free = free
        log.info("%s: %d slices, lesion-free %s (%s)", patient, len(rs), free, why)
    unused = sorted(set(free_csv) - set(has_lesion_mask))
    if unused:
        log.info("%s lists %d patients without evaluated slices: %s", csv_path, len(unused), ", ".join(unused[:5]))
    log.info("collected %d slices of %d patients (%d slices skipped)", len(results), len(has_lesion_mask), n_skipped)
    return results
