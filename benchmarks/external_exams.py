#!/usr/bin/env python3
"""Run a VNE model on exams written by a simulator we did not write, score it, and draw it.

For checking only: these exams are never used to train or tune (``../shared/data/external-exams/
README.md``). For each exam folder ``CASES/NAME/`` (``dicom/`` + ``truth.npz``) this script

1. runs ``vne infer CASES/NAME/dicom --out OUT/NAME --model MODEL`` (the real CLI, as a user would),
2. scores all exams with the judge's own ``score_exams.py`` (``--pred-dicom OUT``),
3. prints, per exam and slice, the VNE's LV blood and remote means (blood = 1 expected), the
   VNE's QC verdict, and the Nyquist (2-pixel) texture energy inside the heart,
4. writes ``OUT/NAME.png``: T1 map | VNE | artefact-free LGE, with the true lesions outlined.

  python benchmarks/external_exams.py --model models/vne-sim-0.6.0.onnx --out runs/external
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = HERE.parent.parent / "shared" / "data" / "external-exams"
DEFAULT_SCORER = HERE.parent.parent / "shared" / "tools" / "score_exams.py"


def nyquist_ratio(img: np.ndarray, mask: np.ndarray) -> float:
    """Energy of the 2-pixel checkerboard relative to all the detail energy inside ``mask``.

    The checkerboard component at pixel (i, j) is ``x * (-1)^(i+j)`` averaged over a 2×2
    neighbourhood; for a smooth image it is ~0, for a transposed-convolution texture it is large.
    See :func:`vne.runtime.qc.checkerboard_index` for the definition used by the runtime guard.
    """
    from vne.runtime.qc import checkerboard_index

    return checkerboard_index(img, mask)


def load_vne(folder: Path, truth: dict) -> np.ndarray:
    """The VNE images of an output folder on the truth's T1 grid (the scorer's own reader)."""
    sys.path.insert(0, str(DEFAULT_SCORER.parent))
    import score_exams  # noqa: E402  (the judge's reader, so figures show what is scored)

    cands = score_exams.load_dicom(str(folder))
    return score_exams.to_t1_grid(cands, truth)


def qc_verdicts(folder: Path) -> list[str]:
    import pydicom

    out = []
    for f in sorted(folder.rglob("*.dcm")) + sorted(p for p in folder.rglob("*") if p.is_file() and not p.suffix):
        try:
            d = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        out.append(str(d.get("ImageComments", "")))
    return out


def figure(name: str, truth: dict, vne: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    n = truth["myo"].shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for s in range(n):
        myo, blood, remote = truth["myo"][s], truth["blood"][s], truth["remote"][s]
        heart = ndimage.binary_dilation(myo | blood, iterations=14)
        ii, jj = np.nonzero(heart)
        win = (slice(ii.min(), ii.max() + 1), slice(jj.min(), jj.max() + 1))
        clean = truth["lge_clean"][s]
        lo, hi = clean[remote].mean(), clean[blood].mean()
        cn = (clean - lo) / (hi - lo)
        v = vne[s]
        vlo, vhi = v[remote].mean(), v[blood].mean()
        vn = (v - vlo) / (vhi - vlo) if vhi != vlo else v
        t1 = truth["t1_scanner"][s].astype(float)
        axes[s, 0].imshow(t1[win], cmap="viridis", vmin=600, vmax=2000)
        axes[s, 1].imshow(vn[win], cmap="gray", vmin=-0.4, vmax=1.6)
        axes[s, 2].imshow(cn[win], cmap="gray", vmin=-0.4, vmax=1.6)
        for c in (1, 2):
            axes[s, c].contour(truth["lesion"][s][win], levels=[0.5], colors="r", linewidths=0.8)
        for c, title in enumerate(("scanner T1 map", "VNE", "artefact-free LGE + true lesions")):
            axes[s, c].set_xticks([])
            axes[s, c].set_yticks([])
            if s == 0:
                axes[s, c].set_title(title)
        axes[s, 0].set_ylabel(f"{name} slice {s}\nVNE blood {vhi:.2f}, remote {vlo:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    ap.add_argument("--scorer", type=Path, default=DEFAULT_SCORER)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not a.cases.is_dir():
        print(f"external_exams: error: {a.cases} does not exist", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in a.cases.iterdir() if (p / "truth.npz").is_file())
    vne_exe = Path(sys.executable).with_name("vne")
    for name in names:
        out = a.out / name
        r = subprocess.run([str(vne_exe), "infer", str(a.cases / name / "dicom"), "--out", str(out), "--model", str(a.model)],
                           capture_output=True, text=True)
        print(f"{name}: vne infer exit {r.returncode}; {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    score_json = a.out / "score.json"
    r = subprocess.run([sys.executable, str(a.scorer), str(a.cases), "--pred-dicom", str(a.out), "--json", str(score_json)],
                       capture_output=True, text=True)
    print(r.stdout)
    if r.returncode:
        print(r.stderr)
    rows = []
    for name in names:
        truth = dict(np.load(a.cases / name / "truth.npz"))
        try:
            vne = load_vne(a.out / name, truth)
        except Exception as exc:  # a refused exam has no VNE: report it, draw nothing
            print(f"{name}: no VNE to draw ({exc})")
            continue
        for s in range(vne.shape[0]):
            v = vne[s]
            rows.append(dict(case=name, slice=s, blood=float(v[truth["blood"][s]].mean()),
                             remote=float(v[truth["remote"][s]].mean()),
                             texture=nyquist_ratio(v, np.asarray(truth["myo"][s] | truth["blood"][s]))))
        figure(name, truth, vne, a.out / f"{name}.png")
    print(f"{'case':8s} {'slice':>5s} {'VNE blood':>10s} {'remote':>8s} {'texture':>8s}")
    for r_ in rows:
        print(f"{r_['case']:8s} {r_['slice']:5d} {r_['blood']:10.3f} {r_['remote']:8.3f} {r_['texture']:8.4f}")
    (a.out / "per_slice.json").write_text(json.dumps(rows, indent=1))
    print("figures:", ", ".join(str(a.out / f"{n}.png") for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
