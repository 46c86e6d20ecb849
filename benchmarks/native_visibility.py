#!/usr/bin/env python3
"""Which lesions can a native-only method see at all? VNE's burden error split by how far the
LGE lesion stands out in the native T1 map.

VNE can only show what the native images carry. Our simulator draws, on purpose, fibrosis whose
native T1 rise ranges from invisible to conspicuous (``vne.simulate.tissue``:
``fibrosis_t1_gain`` 0.15-1.0), so some LGE lesions have no native signature. This script
measures, per exam, the **native contrast** of its LGE lesion:

    z = median over the LGE lesion pixels of (T1 − remote mean T1) / remote T1 SD

per slice, with the LGE lesion = the artefact-free LGE's FWHM pixels (the judge's rule:
myocardium > remote mean + 50 % of (central-blood mean − remote mean)) and the scanner T1 map
and masks of the exam's ``truth.npz``. It then prints, per set:

* every exam's true burden, the LGE's and VNE's FWHM burden and z (``--per-exam``);
* r (VNE vs LGE, FWHM) over all exams, and over the lesion-free exams plus those whose lesion
  is **native-visible** (z ≥ ``--z-visible``, default 1: the median lesion pixel is at least one
  remote SD above remote);
* for the visible and the **faint** (z below that) lesion exams: the mean |VNE − LGE| and the
  burden ratio ΣVNE / ΣLGE (1 = the whole LGE burden found).

The split is a reading aid, not a tuned threshold: it asks whether VNE misses lesions that the
native data show (a model problem) or lesions they do not (an information limit).

  # our sets, in the scorer layout that family_gap.py writes (cases/NAME/truth.npz, pred/NAME.npy)
  python benchmarks/native_visibility.py runs/family-gap/test-A23-s2000-margin0/scorer \\
      runs/family-gap/test-B23-s3000-margin0/scorer
  # exams without predictions (truth only, e.g. the external exams): z per exam
  python benchmarks/native_visibility.py --truth-only ../shared/data/external-exams
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from border_split import lesion_mask, reference_levels  # noqa: E402  (the judge's lesion rule)

FWHM = 0.5


def lesion_z(truth: dict) -> np.ndarray:
    """Native T1 z-scores (vs the slice's remote myocardium) of every LGE-FWHM lesion pixel of
    an exam; ``truth`` holds (S, H, W) ``lge_clean``, ``t1_scanner`` and the boolean masks
    ``myo``, ``blood``, ``remote``."""
    out = []
    for lge, t1, myo, blood, remote in zip(truth["lge_clean"], truth["t1_scanner"].astype(float),
                                           truth["myo"], truth["blood"], truth["remote"]):
        lesion = lesion_mask(lge, myo, reference_levels(lge, blood, remote), FWHM)
        sd = t1[remote].std()
        if lesion.any() and sd > 0:
            out.append((t1[lesion] - t1[remote].mean()) / sd)
    return np.concatenate(out) if out else np.zeros(0)


def fwhm_burden(images: np.ndarray, truth: dict) -> float:
    """The judge's FWHM burden (% of the myocardium) of (S, H, W) images on the T1 grid."""
    n = 0
    for img, myo, blood, remote in zip(images, truth["myo"], truth["blood"], truth["remote"]):
        n += int(lesion_mask(img, myo, reference_levels(img, blood, remote), FWHM).sum())
    return 100.0 * n / max(int(truth["myo"].sum()), 1)


def exam_rows(scorer_dir: Path, truth_only: bool) -> list[dict]:
    cases = scorer_dir / "cases" if (scorer_dir / "cases").is_dir() else scorer_dir
    rows = []
    for case in sorted(p for p in cases.iterdir() if (p / "truth.npz").is_file()):
        tr = dict(np.load(case / "truth.npz"))
        z = lesion_z(tr)
        row = dict(case=case.name, true=100.0 * float(tr["burden_true"]), lge=fwhm_burden(tr["lge_clean"], tr),
                   z=float(np.median(z)) if z.size >= 5 else float("nan"), n_lesion_px=int(z.size))
        if not truth_only:
            pred = scorer_dir / "pred" / f"{case.name}.npy"
            if not pred.is_file():
                raise SystemExit(f"no prediction {pred} (use --truth-only for exams without VNE)")
            row["vne"] = fwhm_burden(np.load(pred).astype(float), tr)
        rows.append(row)
    return rows


def summarise(rows: list[dict], z_visible: float) -> dict:
    free = [r for r in rows if r["true"] == 0]
    lesion = [r for r in rows if r["true"] > 0]
    visible = [r for r in lesion if r["z"] >= z_visible]          # NaN (no LGE lesion pixels) is faint
    faint = [r for r in lesion if not r["z"] >= z_visible]

    def r_of(rs):
        return float(stats.pearsonr([x["vne"] for x in rs], [x["lge"] for x in rs])[0]) if len(rs) > 2 else float("nan")

    def group(rs):
        lge = sum(x["lge"] for x in rs)
        return dict(n=len(rs), mae=float(np.mean([abs(x["vne"] - x["lge"]) for x in rs])) if rs else float("nan"),
                    ratio=sum(x["vne"] for x in rs) / lge if lge > 0 else float("nan"))

    return dict(n=len(rows), n_free=len(free), r_all=r_of(rows), r_free_visible=r_of(free + visible),
                visible=group(visible), faint=group(faint))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path, help="scorer folders (cases/ + pred/), or exam folders with --truth-only")
    ap.add_argument("--truth-only", action="store_true", help="no predictions: print each exam's z only")
    ap.add_argument("--z-visible", type=float, default=1.0, help="native contrast (remote SDs) that counts as visible")
    ap.add_argument("--per-exam", action="store_true", help="also print every exam")
    a = ap.parse_args(argv)
    for d in a.sets:
        if not d.is_dir():
            ap.error(f"{d} is not a folder")
    print(f"native contrast z of the LGE lesion: median over its FWHM pixels of (T1 - remote) / remote SD; "
          f"visible: z >= {a.z_visible:g}")
    if not a.truth_only:
        print("| set | exams (lesion-free) | FWHM r, all | r, lesion-free + visible | visible: n, mean abs err, "
              "VNE/LGE | faint: n, mean abs err, VNE/LGE |")
        print("| --- | --- | --- | --- | --- | --- |")
    per_exam = []
    for d in a.sets:
        rows = exam_rows(d, a.truth_only)
        per_exam.append((d, rows))
        if a.truth_only:
            continue
        s = summarise(rows, a.z_visible)
        v, f = s["visible"], s["faint"]
        print(f"| {d} | {s['n']} ({s['n_free']}) | {s['r_all']:.3f} | {s['r_free_visible']:.3f} | "
              f"{v['n']}, {v['mae']:.1f} %, {v['ratio']:.2f} | {f['n']}, {f['mae']:.1f} %, {f['ratio']:.2f} |")
    if a.per_exam or a.truth_only:
        for d, rows in per_exam:
            print(f"\n{d}")
            for r in sorted(rows, key=lambda x: np.nan_to_num(x["z"], nan=-np.inf)):
                vne = f"  VNE {r['vne']:5.1f}" if "vne" in r else ""
                print(f"  {r['case']:<22} true {r['true']:5.1f}  LGE {r['lge']:5.1f}{vne}  z {r['z']:6.2f}  "
                      f"({r['n_lesion_px']} LGE lesion px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
