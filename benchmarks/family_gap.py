#!/usr/bin/env python3
"""The generalisation figure: agreement on our own family's test split vs the held-out family.

Runs ``vne evaluate`` (the real CLI, quality guard on) on two simulated test sets, one from the
training family A and one from family B, which training never saw (``vne simulate --family B``;
``vne.simulate.case.FAMILIES`` lists what differs), and prints FWHM/FWQM/FWEM r and ICC(A,1)
against the artefact-free LGE, false positives, the guard's refusal rate, and the gap
r(A) − r(B) at FWHM (issue 14's target: < 0.05).

  python benchmarks/family_gap.py --model models/vne-sim-0.3.0.onnx \\
      --a /work/data/test-A-s2000 --b /work/data/test-B-s3000 --out runs/family-gap
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--a", type=Path, required=True, help="family-A test set (vne simulate output)")
    ap.add_argument("--b", type=Path, required=True, help="family-B test set (vne simulate --family B output)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    vne = str(Path(sys.executable).with_name("vne"))
    rows = {}
    for name, exams in (("A (training family, test split)", a.a), ("B (held-out family)", a.b)):
        out = a.out / exams.name
        if not (out / "metrics.json").is_file():
            subprocess.run([vne, "evaluate", "--exams", str(exams), "--model", str(a.model), "--out", str(out)], check=True)
        rows[name] = json.loads((out / "metrics.json").read_text())
    print(f"model {a.model.name}; VNE (same thresholds) vs the artefact-free LGE, per patient, 1-pixel contour margin")
    print(f"{'set':34s} {'pts':>4s} {'FWHM r/ICC':>12s} {'FWQM r/ICC':>12s} {'FWEM r/ICC':>12s} {'FP':>6s} {'refused':>8s}")
    r_fwhm = {}
    for name, m in rows.items():
        ag = m["agreement"]
        cells = []
        for lvl in ("FWHM", "FWQM", "FWEM"):
            x = ag[f"VNE vs artefact-free LGE {lvl}"]
            cells.append(f"{x['r']:.3f}/{x['icc']:.3f}")
        r_fwhm[name] = ag["VNE vs artefact-free LGE FWHM"]["r"]
        fp = m["false_positive"]
        fp_txt = f"{fp['truth_lesion_free']['fp']}/{fp['truth_lesion_free']['n']}"
        q = m.get("qc", {"refused": 0, "slices": m["n_slices"], "refusal_rate": 0.0})
        print(f"{name:34s} {m['n_patients']:4d} {cells[0]:>12s} {cells[1]:>12s} {cells[2]:>12s} {fp_txt:>6s} "
              f"{q['refused']:3d}/{q['slices']:<3d}")
    ra, rb = list(r_fwhm.values())
    print(f"gap r(A) - r(B) at FWHM: {ra - rb:+.3f}  (target < 0.05)")
    (a.out / "family_gap.json").write_text(json.dumps({"r_fwhm": r_fwhm, "gap": ra - rb}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
