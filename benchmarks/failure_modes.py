#!/usr/bin/env python3
"""Measure the causes of the generalisation failures of issue 14 on OUR OWN simulated data.

Three measurements, each printed as a table:

1. **Blood pool vs heart rate, and which input moves it.** Family-A exams are simulated at
   heart rates 40-120 bpm (the 0.2.0 model saw 50-100). For each slice the VNE LV blood mean
   (truth blood mask, remote = 0 / blood = 1 units from the truth masks) is printed for

   * ``as is``: the slice's own inputs;
   * ``TI@75``: the same images, but the TIs handed to the model replaced by those a 75 bpm
     scheme would have (the TI conditioning alone moved into the trained range);
   * ``IR@75``: the IR images replaced by those of the same heart simulated at 75 bpm, with
     the slice's own TIs;
   so a collapse that ``TI@75`` repairs is caused by the TI conditioning, one that ``IR@75``
   repairs by the IR image content.

   Table 1b sweeps the one input difference found on the external exams: how much brighter
   the LV blood is than myocardium in the IR images (the bSSFP readout's T2/T1 weighting).

2. **Texture.** The 2-pixel checkerboard index (:func:`vne.runtime.qc.checkerboard_index`) of each
   model's output on a flat phantom (every input constant) and inside the heart of real slices,
   next to the index of the artefact-free LGE target.

3. **Training/serving skew.** For each slice, the IR images the cache used to be built from
   (simulator floats) against those the gadget decodes from the ISMRMRD stream (uint16
   magnitudes, ``vne.simulate.writers.as_delivered``): the largest relative IR difference inside
   the heart and the number of heart pixels whose restored sign differs.

  python benchmarks/failure_modes.py --model models/vne-sim-0.2.0.onnx [--model models/vne-sim-0.6.0.onnx]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from vne.prepare.contract import model_inputs
from vne.exam.data import Role
from vne.runtime.model import load_model
from vne.runtime.qc import checkerboard_index
from vne.simulate import case as sim_case
from vne.simulate.writers import as_delivered
from vne.prepare.slices import assemble, on_t1_grid

HEART_RATES = (40, 46, 60, 75, 90, 110, 120)


def _slices(images, truth):
    """(grid, truth) per slice, the gadget's own matching and resampling."""
    t1s = [im for im in images if im.role == Role.T1_MAP]
    out = []
    for t1, tr in zip(t1s, truth):
        s, why = assemble(t1, images)
        if s is None:
            raise RuntimeError(why)
        out.append((on_t1_grid(s), tr))
    return out


def _norm_blood(vne, tr) -> float:
    """Mean VNE in the true LV blood pool, in the model's own units (remote ~0, blood ~1)."""
    return float(vne[tr.blood_pool].mean())


def simulate_at(seed: int, index: int, hr: float | None = None, kappa: float | None = None):
    """The family-A case ``index`` with its heart rate forced to ``hr`` and/or the IR readout
    weighting exponent to ``kappa`` (everything else equal: the same random draws)."""
    fam = sim_case.FAMILIES["A"]
    forced = fam
    if hr is not None:
        forced = dataclasses.replace(forced, heart_rate_bpm=(hr, hr))
    if kappa is not None:
        forced = dataclasses.replace(forced, ir_readout_weight=(kappa, kappa))
    old = sim_case.FAMILIES["A"]
    sim_case.FAMILIES["A"] = forced
    try:
        return sim_case.simulate_case(seed, index)
    finally:
        sim_case.FAMILIES["A"] = old


def heart_rate_table(models, seed: int, cases: list[int]) -> None:
    print("\n1. VNE LV blood mean (remote ~0, blood ~1 expected) vs heart rate; same hearts, rate forced")
    print(f"{'model':18s} {'case':>4s} " + " ".join(f"{h:>5d}" for h in HEART_RATES) + "   | TI@75 at 40 | IR@75 at 40")
    for m in models:
        for c in cases:
            per_hr, keep = [], {}
            for hr in HEART_RATES:
                case = simulate_at(seed, c, hr)
                sl = _slices(as_delivered(case), case.truth)
                vals = []
                for k, (g, tr) in enumerate(sl):
                    x = model_inputs(m.contract, g.t1_map_ms, g.ir_signed, g.ir_ti_ms, g.cine_frames, g.cine_trigger_ms, g.rr_interval_ms)
                    vals.append(_norm_blood(m.predict_many([x])[0], tr))
                    keep[(hr, k)] = (x, tr)
                per_hr.append(np.mean(vals))
            # swaps at 40 bpm: TIs of 75 bpm with 40 bpm images, and 75 bpm IR images with 40 bpm TIs
            ti_swap, ir_swap = [], []
            for k in range(sum(1 for key in keep if key[0] == 40)):
                x40, tr = keep[(40, k)]
                x75, _ = keep[(75, k)]
                ti_swap.append(_norm_blood(m.predict_many([{**x40, "ir_ti_ms": x75["ir_ti_ms"]}])[0], tr))
                ir_swap.append(_norm_blood(m.predict_many([{**x40, "ir": x75["ir"]}])[0], tr))
            print(f"{m.name + ' ' + m.version:18s} {c:4d} " + " ".join(f"{v:5.2f}" for v in per_hr)
                  + f"   | {np.mean(ti_swap):11.2f} | {np.mean(ir_swap):11.2f}")


KAPPAS = (0.0, 0.5, 1.0, 1.3)


def readout_table(models, seed: int, cases: list[int]) -> None:
    print("\n1b. VNE LV blood mean vs the blood/myocardium brightness of the IR images (bSSFP readout")
    print("    weighting exponent κ; κ = 0: blood ~ myocardium as in simulator <= 2.1, κ = 1: blood ~1.9x)")
    print(f"{'model':18s} {'case':>4s} " + " ".join(f"κ={k:<4g}" for k in KAPPAS))
    for m in models:
        for c in cases:
            vals = []
            for kappa in KAPPAS:
                case = simulate_at(seed, c, kappa=kappa)
                per = []
                for g, tr in _slices(as_delivered(case), case.truth):
                    x = model_inputs(m.contract, g.t1_map_ms, g.ir_signed, g.ir_ti_ms, g.cine_frames, g.cine_trigger_ms, g.rr_interval_ms)
                    per.append(_norm_blood(m.predict_many([x])[0], tr))
                vals.append(np.mean(per))
            print(f"{m.name + ' ' + m.version:18s} {c:4d} " + " ".join(f"{v:6.2f}" for v in vals))


def texture_table(models, seed: int, cases: list[int]) -> None:
    print("\n2. 2-pixel checkerboard index (vne.runtime.qc.checkerboard_index; smooth ~0.01)")
    h, w = 128, 160
    flat = {"cine": np.full((1, 25, h, w), 300.0, np.float32), "ir": np.full((1, 7, h, w), 100.0, np.float32),
            "ir_ti_ms": np.array([[100, 180, 260, 1100, 2100, 3100, 4100]], np.float32),
            "t1_map_ms": np.full((1, 1, h, w), 1000.0, np.float32)}
    flat["ir"][0, :3] *= -1
    inner = np.zeros((h, w), bool)
    inner[16:-16, 16:-16] = True
    rows = []
    for m in models:
        y = m.predict_many([flat])[0]
        heart, target = [], []
        for c in cases:
            case = sim_case.simulate_case(seed, c)
            for g, tr in _slices(as_delivered(case), case.truth):
                x = model_inputs(m.contract, g.t1_map_ms, g.ir_signed, g.ir_ti_ms, g.cine_frames, g.cine_trigger_ms, g.rr_interval_ms)
                mask = tr.myocardium | tr.blood_pool
                heart.append(checkerboard_index(m.predict_many([x])[0], mask))
                target.append(checkerboard_index(tr.lge_clean, mask))
        rows.append((f"{m.name} {m.version}", checkerboard_index(y, inner), float(np.std(y[inner])), np.median(heart), np.median(target)))
    print(f"{'model':18s} {'flat: index':>12s} {'flat: SD':>9s} {'heart: median':>14s} {'target LGE':>11s}")
    for r in rows:
        print(f"{r[0]:18s} {r[1]:12.4f} {r[2]:9.4f} {r[3]:14.4f} {r[4]:11.4f}")


def skew_table(seed: int, cases: list[int]) -> None:
    print("\n3. Training/serving skew: simulator floats vs the decoded ISMRMRD stream, inside the heart")
    print(f"{'case':>5s} {'slice':>5s} {'max |ΔIR|/|IR| (%)':>20s} {'p99 (%)':>8s} {'sign flips (px)':>16s}")
    for c in cases:
        case = sim_case.simulate_case(seed, c)
        a = _slices(case.images, case.truth)
        b = _slices(as_delivered(case), case.truth)
        for k, ((ga, tr), (gb, _)) in enumerate(zip(a, b)):
            heart = tr.myocardium | tr.blood_pool
            ia, ib = ga.ir_signed[:, heart], gb.ir_signed[:, heart]
            scale = np.abs(ia).max(axis=1, keepdims=True)
            rel = np.abs(np.abs(ia) - np.abs(ib)) / np.maximum(np.abs(ia), 0.05 * scale)
            flips = int((np.sign(ia) != np.sign(ib)).sum())
            print(f"{c:5d} {k:5d} {100 * rel.max():20.1f} {100 * np.percentile(rel, 99):8.2f} {flips:16d}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--seed", type=int, default=4000, help="simulator seed (not a training seed)")
    ap.add_argument("--cases", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip", nargs="*", default=[], choices=("hr", "readout", "texture", "skew"))
    a = ap.parse_args()
    models = [load_model(p) for p in a.model]
    if "hr" not in a.skip:
        heart_rate_table(models, a.seed, a.cases)
    if "readout" not in a.skip:
        readout_table(models, a.seed, a.cases)
    if "texture" not in a.skip:
        texture_table(models, a.seed, a.cases)
    if "skew" not in a.skip:
        skew_table(a.seed, a.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
