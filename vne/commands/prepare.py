"""``vne prepare DICOM_DIR --out CACHE_DIR``: real DICOM exams -> a training cache.

Pairs T1 maps, IR images, cine and LGE slices by the paper's rule, resamples onto the T1 grid,
excludes slices that fail quality checks and logs every decision to ``inclusion_log.csv``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

NAME = "prepare"
HELP = "build a training cache from real DICOM exams (paper's matching pipeline, with an inclusion log)"


def add_arguments(p) -> None:
    p.add_argument("dicom_dir", type=Path, help="folder of DICOM exams (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="cache folder to write")


def run(args) -> int:
    from ..prepare.training_from_dicom import build_cache_from_dicom

    entries, rows = build_cache_from_dicom(args.dicom_dir, args.out)
    n_ex = sum(r["decision"] == "excluded" for r in rows)
    if not entries:  # nothing usable in the input: a user error, as in `vne infer` and `vne t1map`
        reasons = sorted({r["reason"] for r in rows if r["decision"] == "excluded"})
        raise InputError(f"no slice included from {args.dicom_dir} ({n_ex} excluded"
                         + (f": {'; '.join(reasons[:3])}" if reasons else ": no T1 map found") + f"); log: {args.out / 'inclusion_log.csv'}")
    print(f"{len(entries)} slices included, {n_ex} excluded; log: {args.out / 'inclusion_log.csv'}")
    for r in rows:
        if r["decision"] == "excluded":
            print(f"  excluded {r['study_uid'][-12:]} {r['slice']}: {r['reason']}")
    return 0
