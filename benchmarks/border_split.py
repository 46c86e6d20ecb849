#!/usr/bin/env python3
"""Where do a lesion-free exam's "lesion" pixels lie? The judge's FWHM burden split by position
in the myocardial mask.

For every lesion-free exam (``burden_true == 0``), the FWHM lesion pixels (the judge's
``score_exams.burden`` rule: myocardium > remote mean + 50 % of (central-blood mean − remote
mean)) are counted in three places, as % of the myocardium:

* **inner**: myocardium pixels touching the cavity (the blood-side border);
* **outer**: myocardium pixels touching the outside of the filled LV (the epicardial border);
* **interior**: the rest.

It also prints the mean of the one-pixel ring just outside the myocardium, blood = 1: how bright
the tissue next to the epicardium is in the image. A model that learned a bright epicardial rim
reads > 1 there, and its false positives sit in the outer ring (simulator 2.2, 0.4.0).

Two layouts, both the judge's:

  # external exams: VNE DICOM written by benchmarks/external_exams.py (one folder per exam)
  python benchmarks/border_split.py --cases ../shared/data/external-exams --pred-dicom runs/external
  # our own sets: the scorer layout written by vne evaluate --export-scorer (family_gap.py)
  python benchmarks/border_split.py --cases runs/family-gap/test-A23-s2000-margin0/scorer/cases \\
      --pred-npy runs/family-gap/test-A23-s2000-margin0/scorer/pred

The artefact-free LGE of the same exams is split too, for comparison.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

DEFAULT_SCORER_DIR = Path(__file__).resolve().parents[2] / "shared" / "tools"


def reference_levels(img: np.ndarray, blood: np.ndarray, remote: np.ndarray) -> tuple[float, float]:
    """(blood, remote) levels of the judge's rule: the mean of the central half of the blood
    pool (distance from its edge at or above the median) and the remote mean."""
    d = ndimage.distance_transform_edt(blood)
    return float(img[blood & (d >= np.median(d[blood]))].mean()), float(img[remote].mean())


def lesion_mask(img: np.ndarray, myo: np.ndarray, levels: tuple[float, float], fraction: float) -> np.ndarray:
    """(H, W) bool: the judge's lesion pixels of one slice, myocardium above remote + ``fraction``
    of the remote-to-blood range; ``levels`` = (blood, remote), :func:`reference_levels`."""
    hi, lo = levels
    return myo & (img > lo + fraction * (hi - lo))


def split_slice(img: np.ndarray, myo: np.ndarray, blood: np.ndarray, remote: np.ndarray,
                fraction: float) -> tuple[np.ndarray, float]:
    """(inner, outer, interior) lesion pixel counts of one slice at ``fraction`` of the
    remote-to-blood range (the judge's rule), and the ring outside the myocardium in blood
    units. All (H, W) on the T1 grid; masks boolean."""
    hi, lo = reference_levels(img, blood, remote)
    lesion = lesion_mask(img, myo, (hi, lo), fraction)
    filled = ndimage.binary_fill_holes(myo)
    inner = myo & ndimage.binary_dilation(filled & ~myo)
    outer = myo & ndimage.binary_dilation(~filled) & ~inner
    counts = np.array([(lesion & inner).sum(), (lesion & outer).sum(), (lesion & ~inner & ~outer).sum()], float)
    ring = ndimage.binary_dilation(filled) & ~filled
    return counts, float((img[ring].mean() - lo) / (hi - lo))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=Path, required=True, help="folder of exams, each NAME/truth.npz")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--pred-dicom", type=Path, help="VNE DICOM, one folder per exam NAME")
    g.add_argument("--pred-npy", type=Path, help="VNE stacks NAME.npy on the T1 grid")
    ap.add_argument("--scorer-dir", type=Path, default=DEFAULT_SCORER_DIR, help="folder of the judge's score_exams.py")
    a = ap.parse_args()
    if not a.cases.is_dir():
        ap.error(f"--cases {a.cases} does not exist")
    sys.path.insert(0, str(a.scorer_dir))
    import score_exams  # noqa: E402  (the judge's own reader and resampling)

    totals = {"VNE": np.zeros(3), "clean LGE": np.zeros(3)}
    rings: dict[str, list[float]] = {"VNE": [], "clean LGE": []}
    n_myo, names = 0, []
    for case in sorted(p for p in a.cases.iterdir() if (p / "truth.npz").is_file()):
        tr = dict(np.load(case / "truth.npz"))
        if float(tr["burden_true"]) > 0:
            continue
        if a.pred_dicom:
            pred = score_exams.to_t1_grid(score_exams.load_dicom(str(a.pred_dicom / case.name)), tr)
        else:
            pred = np.load(a.pred_npy / f"{case.name}.npy").astype(float)
        names.append(case.name)
        for key, imgs in (("VNE", pred), ("clean LGE", tr["lge_clean"].astype(float))):
            for s, img in enumerate(imgs):
                counts, ring = split_slice(img, tr["myo"][s], tr["blood"][s], tr["remote"][s], score_exams.FRACS["FWHM"])
                totals[key] += counts
                rings[key].append(ring)
        n_myo += int(tr["myo"].sum())
    if not names:
        print("no lesion-free exam in", a.cases)
        return 1
    print(f"{len(names)} lesion-free exams ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}); "
          "FWHM lesion pixels in % of the myocardium")
    print(f"{'images':<10} {'inner':>7} {'outer':>7} {'interior':>9}  ring outside the myocardium (blood = 1)")
    for key in ("clean LGE", "VNE"):
        inner, outer, interior = 100 * totals[key] / n_myo
        print(f"{key:<10} {inner:6.2f}% {outer:6.2f}% {interior:8.2f}%  {np.mean(rings[key]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
