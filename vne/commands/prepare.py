"""``vne prepare DICOM_DIR --out CACHE_DIR``: real DICOM exams -> a training cache.

Pairs T1 maps, IR images, cine and LGE slices by the paper's rule, resamples onto the T1 grid,
excludes slices that fail quality checks and logs every decision to ``inclusion_log.csv``.
"""
from __future__ import annotations

from pathlib import Path

NAME = "prepare"
HELP = "build a training cache from real DICOM exams (paper's matching pipeline, with an inclusion log)"


def add_arguments(p) -> None:
    p.add_argument("dicom_dir", type=Path, help="folder of DICOM exams (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="cache folder to write")


def run(args) -> int:
    from ..prepare.training_from_dicom import build_cache_from_dicom

    entries, rows = build_cache_from_dicom(args.dicom_dir, args.out)
    n_ex = sum(r["decision"] == "excluded" for r in rows)
    print(f"{len(entries)} slices included, {n_ex} excluded; log: {args.out / 'inclusion_log.csv'}")
    for r in rows:
        if r["decision"] == "excluded":
            print(f"  excluded {r['study_uid'][-12:]} {r['slice']}: {r['reason']}")
    return 0
