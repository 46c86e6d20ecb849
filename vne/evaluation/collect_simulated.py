"""VNE vs LGE on simulated exams (``vne simulate`` output): :class:`SliceResult` per slice.

The simulated-exam counterpart of :mod:`vne.evaluation.collect_dicom`: every exam's ISMRMRD file
runs through the same pipeline as ``vne infer`` (:class:`vne.runtime.pipeline.VNEPipeline` fed
the images in stream order), the LGE is brought onto each T1 grid by the shared matching code,
and the simulator's ground truth (``truth/<case>.npz``) gives the masks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import InputError
from ..exam.data import Role
from ..io.mrd.hdf5 import read_mrd_file
from ..io.mrd.header import parse_header, study_key
from ..io.mrd.image import from_mrd
from ..prepare.slices import build_slices, lge_on_t1_grid
from .analysis import SliceResult


def slice_index_by_position(raw_images) -> dict[tuple, int]:
    """T1-map image position -> ISMRMRD slice index, to find each result's ground truth."""
    out = {}
    for m in raw_images:
        try:
            im = from_mrd(m)
        except InputError:
            continue
        if im.role == Role.T1_MAP:
            out[tuple(np.round(im.geometry.position_mm, 2))] = int(m.slice)
    return out


def run_model_on_file(path: Path, model: Path | None, group: str | None = None,
                      refused: list[str] | None = None) -> tuple[list, list, str]:
    """(VNE results, raw ISMRMRD images, header XML) of one exam file, through the gadget's pipeline.

    ``group``: the file's HDF5 group (:func:`vne.io.mrd.hdf5.read_mrd_file`; default /dataset or the only one).
    ``refused``: when given, the quality guard's refusals are appended to it (one reason per
    slice) and an exam the guard refused entirely returns no results instead of raising: a
    refused slice counts as missing, not as correct.
    """
    from ..runtime.config import PipelineConfig
    from ..runtime.pipeline import VNEPipeline

    header, raw = read_mrd_file(path, group=group)
    pipe = VNEPipeline(PipelineConfig(model=str(model) if model else None, cache_dir="none"), header=parse_header(header))
    for item in raw:
        pipe.feed(item)
    pipe.finish()
    guard = [m for m in pipe.problems if "quality guard" in m]
    if refused is not None:
        refused.extend(f"{path.stem}: {m}" for m in guard)
    if not pipe.results and not (guard and refused is not None):
        raise InputError(f"{path.name}: no VNE produced: {'; '.join(pipe.problems) or 'no reason given'}")
    return pipe.results, raw, header


def collect(exams: Path, model: Path | None, max_cases: int | None = None, desc: str = "evaluate",
            group: str | None = None):
    """SliceResults for every case of a simulated set."""
    doc = json.loads((exams / "cases.json").read_text())
    cases = doc["cases"][: max_cases or None]
    results, refused = [], []
    for c in tqdm(cases, desc=desc, unit="exam"):
        path = exams / "mrd" / f"{c['case_id']}.h5"
        vne_results, raw, header = run_model_on_file(path, model, group=group, refused=refused)
        key = study_key(parse_header(header))
        images = [from_mrd(m, key) for m in raw]
        slices, _ = build_slices(images, need_lge=True)
        lge_by_pos = {tuple(np.round(s.t1_map.geometry.position_mm, 2)): lge_on_t1_grid(s) for s in slices}
        index_of = slice_index_by_position(raw)
        truth = np.load(exams / "truth" / f"{c['case_id']}.npz")
        for r in vne_results:
            pos = tuple(np.round(r.t1.geometry.position_mm, 2))
            s = index_of[pos]
            t = {k: truth[f"s{s}_{k}"] for k in ("myocardium", "blood_pool", "remote", "lesion", "lge_myocardium", "lge_blood_pool", "lge_remote")}
            results.append(SliceResult(
                case_id=c["case_id"], patient_id=c["patient_id"], slice_key=f"s{s}", t1_map_ms=np.asarray(r.t1.pixels, np.float32),
                vne=r.vne, lge=lge_by_pos[pos], lge_clean=truth[f"s{s}_lge_clean"],
                myocardium=t["myocardium"].astype(bool), blood_pool=t["blood_pool"].astype(bool), remote=t["remote"].astype(bool),
                lesion=t["lesion"].astype(bool), lesion_free=bool(c["lesion_free"]), artefacts=c["slices"][s]["lge_artefacts"],
                lge_myocardium=t["lge_myocardium"].astype(bool), lge_blood_pool=t["lge_blood_pool"].astype(bool),
                lge_remote=t["lge_remote"].astype(bool)))
    n_slices = sum(len(c["slices"]) for c in cases)
    doc = {**doc, "qc": {"slices": n_slices, "refused": len(refused), "refusal_rate": len(refused) / max(n_slices, 1),
                         "reasons": refused}}
    return results, doc
