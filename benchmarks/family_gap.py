#!/usr/bin/env python3
"""The generalisation figure: agreement on our own family's test split vs the held-out family.

Runs ``vne evaluate`` (the real CLI, quality guard on) on two simulated test sets, one from the
training family A and one from family B, which training never saw (``vne simulate --family B``;
``vne.simulate.case.FAMILIES`` lists what differs), and prints FWHM/FWQM/FWEM r and ICC(A,1)
against the artefact-free LGE, false positives, the guard's refusal rate, and the gap
r(A) − r(B) at FWHM (issue 14's target: < 0.05).

``--contour-margin-px 0`` scores the way the external judge does (no contour margin), which
counts partial-volume border pixels: a model that blurs the blood/myocardium border reads
lesion-free patients as positive there and not with the default 1-pixel margin.

  python benchmarks/family_gap.py --model models/vne-sim-0.6.0.onnx \\
      --a /work/data/test-A23-s2000 --b /work/data/test-B23-s3000 --out runs/family-gap
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
    ap.add_argument("--contour-margin-px", type=int, default=None, metavar="PX",
                    help="contour margin of the quantification (default: vne evaluate's, 1 px; 0 = the judge's)")
    ap.add_argument("--scorer", type=Path, default=Path(__file__).resolve().parents[2] / "shared/tools/score_exams.py",
                    help="the external judge's score_exams.py (default ../shared/tools/); when present, each set is "
                         "also scored by it exactly as the external exams are")
    a = ap.parse_args()
    margin_args = [] if a.contour_margin_px is None else ["--contour-margin-px", str(a.contour_margin_px)]
    vne = str(Path(sys.executable).with_name("vne"))
    rows, judged = {}, {}
    for name, exams in (("A (training family, test split)", a.a), ("B (held-out family)", a.b)):
        out = a.out / (exams.name + ("" if a.contour_margin_px is None else f"-margin{a.contour_margin_px}"))
        scorer_dir = out / "scorer"
        if not (out / "metrics.json").is_file() or (a.scorer.is_file() and not (scorer_dir / "pred").is_dir()):
            extra = ["--export-scorer", str(scorer_dir)] if a.scorer.is_file() else []
            subprocess.run([vne, "evaluate", "--exams", str(exams), "--model", str(a.model), "--out", str(out), *margin_args,
                            *extra], check=True)
        rows[name] = json.loads((out / "metrics.json").read_text())
        if a.scorer.is_file():
            subprocess.run([sys.executable, str(a.scorer), str(scorer_dir / "cases"), "--pred-npy", str(scorer_dir / "pred"),
                            "--json", str(scorer_dir / "score.json")], check=True, stdout=subprocess.DEVNULL)
            judged[name] = json.loads((scorer_dir / "score.json").read_text())
    margin = rows[next(iter(rows))].get("contour_margin_px")
    print(f"model {a.model.name}; VNE (same thresholds) vs the artefact-free LGE, per patient, {margin}-pixel contour margin")
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
    summary = {"r_fwhm": r_fwhm, "gap": ra - rb}
    if judged:
        print(f"\nthe same sets scored by {a.scorer.name} (the external judge: exam-level burden, no contour margin, "
              "FP = lesion-free exam > 2 % at FWHM)")
        print(f"{'set':34s} {'cases':>5s} {'VNE@FWHM r/ICC':>15s} {'VNE FP':>7s} {'LGE-clean FP':>13s}")
        summary["judge"] = {}
        for name, res in judged.items():
            c = {(x["method"], x["ref"]): x for x in res["compare"]}
            v = c[("VNE@FWHM", "lge_clean@FWHM")]
            clean_fp = c[("lge_clean@FWHM", "burden_true")]["fp"] if ("lge_clean@FWHM", "burden_true") in c else None
            print(f"{name:34s} {res['n_cases']:5d} {v['r']:7.3f}/{v['icc']:.3f} {v['fp']:3d}/{res['n_lesion_free']:<3d} "
                  f"{clean_fp if clean_fp is not None else '-':>9}/{res['n_lesion_free']}")
            summary["judge"][name] = {"r": v["r"], "icc": v["icc"], "fp": v["fp"], "n_lesion_free": res["n_lesion_free"],
                                      "lge_clean_fp": clean_fp}
        jr = [summary["judge"][n]["r"] for n in judged]
        if len(jr) == 2:
            print(f"judge-scored gap r(A) - r(B) at FWHM: {jr[0] - jr[1]:+.3f}")
    (a.out / "family_gap.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
