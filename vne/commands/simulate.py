"""``vne simulate``: synthetic HCM exams as ISMRMRD files, DICOM folders and a training cache.

Output layout of ``--out DIR``::

    DIR/mrd/<case>.h5          one ISMRMRD file per case, as a scanner delivers it
    DIR/dicom/<case>/NN_<series>/   with --dicom: one Siemens-like DICOM folder per series
    DIR/cache/                 the training cache (vne.io.training_data), unless --no-cache
    DIR/truth/<case>.npz       masks (myocardium, blood_pool, remote, lesion), fibrosis and
                               artefact-free LGE per slice, on the T1 grid
    DIR/cases.json             per-case parameters and the true lesion burden

Everything is written into ``DIR.partial`` and renamed to ``DIR`` at the end, so an
interrupted run leaves no half-written output under ``DIR``.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..prepare.contract import ModelContract
from ..errors import InputError

NAME = "simulate"
HELP = "simulate synthetic HCM exams (cine, ShMOLLI IR + T1 map, PSIR LGE, ground truth)"


def add_arguments(p) -> None:
    p.add_argument("--cases", type=int, required=True, help="number of cases (patients)")
    p.add_argument("--seed", type=int, default=0, help="seed; the output is deterministic per seed")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dicom", action="store_true", help="also write a Siemens-like DICOM folder per series")
    p.add_argument("--field", type=float, choices=(1.5, 3.0), default=None, help="field strength (T); random mix if omitted")
    p.add_argument("--family", choices=("A", "B"), default="A",
                   help="simulator family: A (training ranges, default) or B (held out from training, for the "
                        "generalisation gap; see vne.simulate.case.FAMILIES)")
    p.add_argument("--no-cache", action="store_true", help="skip the training cache")
    p.add_argument("--no-mrd", action="store_true", help="skip the ISMRMRD files")
    p.add_argument("--crop", type=int, default=160, help="training-cache crop around the heart (T1-grid pixels)")
    p.add_argument("--first-case", type=int, default=0, help="index of the first case (to extend a set)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")


def _one(job):
    from ..simulate.case import simulate_case
    from ..simulate.writers import write_case_cache, write_case_dicom, write_case_mrd

    seed, index, field, out, opts = job
    case = simulate_case(seed, index, field, family=opts["family"])
    if not opts["no_mrd"]:
        write_case_mrd(case, out / "mrd" / f"{case.case_id}.h5")
    if opts["dicom"]:
        write_case_dicom(case, out / "dicom" / case.case_id)
    entries = [] if opts["no_cache"] else write_case_cache(case, out / "cache", ModelContract(), crop=opts["crop"])
    truth = {}
    for t in case.truth:
        for k in ("myocardium", "blood_pool", "remote", "lesion", "lge_myocardium", "lge_blood_pool", "lge_remote"):
            truth[f"s{t.slice_index}_{k}"] = getattr(t, k).astype(np.uint8)
        truth[f"s{t.slice_index}_fibrosis"] = t.fibrosis.astype(np.float16)
        truth[f"s{t.slice_index}_lge_clean"] = t.lge_clean.astype(np.float32)
    (out / "truth").mkdir(exist_ok=True)
    np.savez_compressed(out / "truth" / f"{case.case_id}.npz", **truth)
    summary = {
        "case_id": case.case_id, "patient_id": case.patient_id, "study_uid": case.study_uid,
        "field_t": case.field_t, "scheme": case.scheme, "phenotype": case.phenotype,
        "lesion_free": case.lesion_free, "heart_rate_bpm": round(case.heart_rate_bpm, 1),
        "meta_style": case.meta_style, "lesion_burden": case.lesion_burden,
        "slices": [{"slice_index": t.slice_index, "level": t.level, "lesion_burden": t.lesion_burden,
                    "lge_artefacts": t.lge_artefacts} for t in case.truth],
    }
    return summary, entries


def run(args) -> int:
    from ..simulate.case import SIMULATOR_VERSION
    from ..io.training_data import write_index

    if args.cases < 1:
        raise InputError("--cases must be at least 1")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty; choose a new --out")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    opts = {"no_mrd": args.no_mrd, "dicom": args.dicom, "no_cache": args.no_cache, "crop": args.crop, "family": args.family}
    jobs = [(args.seed, args.first_case + k, args.field, partial, opts) for k in range(args.cases)]
    results = []
    try:
        if args.workers > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                for r in tqdm(pool.imap(_one, jobs), total=len(jobs), desc="simulate", unit="case"):
                    results.append(r)
        else:
            for job in tqdm(jobs, desc="simulate", unit="case"):
                results.append(_one(job))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    cases = [r[0] for r in results]
    entries = [e for r in results for e in r[1]]
    provenance = {"simulator_version": SIMULATOR_VERSION, "seed": args.seed, "first_case": args.first_case,
                  "n_cases": args.cases, "field_t": args.field, "family": args.family}
    (partial / "cases.json").write_text(json.dumps({**provenance, "cases": cases}, indent=1))
    if not args.no_cache:
        write_index(partial / "cache", entries, extra=provenance)
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    n_slices = sum(len(c["slices"]) for c in cases)
    n_free = sum(c["lesion_free"] for c in cases)
    print(f"simulated {len(cases)} cases ({n_slices} slices, {n_free} lesion-free) with seed {args.seed} into {out}")
    return 0
