"""Does the VNE of the heart depend on the field of view the model is run on?

The gadget runs the generator on a heart window (:mod:`vne.prepare.roi`: the quality guard's heart
region with a margin, at least the 160-pixel window the generator was trained on) and pastes the
result into the T1 grid. For every slice of a simulated set this runs the model both ways on the
gadget's own inputs (ISMRMRD file -> matching -> :func:`vne.runtime.inference.prepare` for the window;
:func:`vne.prepare.slices.on_t1_grid` for the whole, padded T1 grid) and prints

* inside the true myocardium: the max and mean |VNE window - VNE full grid| per slice, in
  normalised PSIR (remote 0, blood 1), the worst slice and the spread;
* per-patient lesion burden agreement (FWHM, adjusted 35 % VNE threshold) against the
  artefact-free LGE, and false positives (burden > 2 %) among lesion-free patients, both ways;
* the window's share of the grid and the network time on the window over that on the full grid,
  timed alternately in this run (so the ratio holds under the machine's load of the moment).

The generator scales its cine and IR inputs by one intensity statistic per image (inside the
ONNX graph), which the window changes, so the two are close rather than equal.

    python benchmarks/fov_sensitivity.py --exams /work/data/test-A23-s2000 --model models/vne-sim-0.6.0.onnx
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vne.runtime import inference
from vne.io.mrd.hdf5 import read_mrd_file
from vne.io.mrd.header import parse_header, study_key
from vne.io.mrd.image import from_mrd
from vne.evaluation.collect_simulated import slice_index_by_position
from vne.prepare.contract import model_inputs, normalise_psir
from vne.runtime.model import VNEModel
from vne.evaluation.quantify import LGE_LEVELS, VNE_ADJUSTED_LEVELS, patient_burden, quantify_slice
from vne.prepare.slices import build_slices, on_t1_grid
from vne.evaluation.stats import FALSE_POSITIVE_BURDEN, icc_a1, pearson_regression


def _timed(fn):
    t = time.perf_counter()
    y = fn()
    return y, 1000.0 * (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=Path, required=True, help="a `vne simulate` output with mrd/ and truth/")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    args = ap.parse_args()

    model = VNEModel(args.model, intra_op_threads=args.threads)
    model.warm_up((160, 160))
    doc = json.loads((args.exams / "cases.json").read_text())
    burden = defaultdict(lambda: defaultdict(list))
    lesion_free: dict[str, bool] = {}
    max_gap, mean_gap, share, t_win, t_full, worst = [], [], [], [], [], ("", 0.0)
    for case in doc["cases"][: args.max_cases or None]:
        header, raw = read_mrd_file(args.exams / "mrd" / f"{case['case_id']}.h5")
        key = study_key(parse_header(header))
        slices, _ = build_slices([from_mrd(m, key) for m in raw], need_lge=True)
        index_of = slice_index_by_position(raw)
        truth = np.load(args.exams / "truth" / f"{case['case_id']}.npz")
        lesion_free[case["patient_id"]] = bool(case["lesion_free"])
        for s in slices:
            grid = on_t1_grid(s)
            x = model_inputs(model.contract, grid.t1_map_ms, grid.ir_signed, grid.ir_ti_ms, grid.cine_frames,
                             grid.cine_trigger_ms, grid.rr_interval_ms)
            prep = inference.prepare(model.contract, s)
            k = index_of[tuple(np.round(s.t1_map.geometry.position_mm, 2))]
            myo, remote, blood = (truth[f"s{k}_{n}"].astype(bool) for n in ("myocardium", "remote", "blood_pool"))
            full, tf = _timed(lambda: model.predict(x)[0])
            window, tw = _timed(lambda: inference.predict(model, prep))
            t_full.append(tf)
            t_win.append(tw)
            share.append(prep.x["t1_map_ms"][0, 0].size / full.size)
            d = np.abs(normalise_psir(full, remote, blood) - normalise_psir(window, remote, blood))[myo]
            max_gap.append(float(d.max()))
            mean_gap.append(float(d.mean()))
            if max_gap[-1] > worst[1]:
                worst = (f"{case['case_id']} slice {k} (p99 {np.percentile(d, 99):.3f})", max_gap[-1])
            b = burden[case["patient_id"]]
            b["lge"].append(quantify_slice(normalise_psir(truth[f"s{k}_lge_clean"], remote, blood), myo, remote, blood, LGE_LEVELS))
            b["full"].append(quantify_slice(full, myo, remote, blood, VNE_ADJUSTED_LEVELS))
            b["window"].append(quantify_slice(window, myo, remote, blood, VNE_ADJUSTED_LEVELS))

    patients = sorted(burden)
    ref = np.array([patient_burden(burden[p]["lge"])["FWHM"] for p in patients])
    free = [p for p in patients if lesion_free[p]]
    print(f"{args.model.name} on {args.exams} ({len(patients)} patients, {len(max_gap)} slices)")
    print(f"heart window: {100 * np.mean(share):.0f} % of the T1 grid on average; network on the window / on the "
          f"full grid: {statistics.median(t_win):.0f} / {statistics.median(t_full):.0f} ms median "
          f"(ratio {statistics.median(np.divide(t_win, t_full)):.2f}, timed alternately in this run)")
    print("|VNE heart window - VNE full grid| inside the myocardium (normalised PSIR, blood = 1):")
    print(f"  max over all slices {max(max_gap):.3f} ({worst[0]}); per-slice max: median {np.median(max_gap):.3f}, "
          f"90th percentile {np.percentile(max_gap, 90):.3f}")
    print(f"  mean over all slices {np.mean(mean_gap):.4f}; per-slice mean: max {max(mean_gap):.4f}")
    print("| inference | FWHM r | ICC(A,1) | false positives |")
    print("| --- | --- | --- | --- |")
    for name, label in (("full", "full T1 grid"), ("window", "heart window (gadget)")):
        test = np.array([patient_burden(burden[p][name])["FWHM"] for p in patients])
        fp = sum(patient_burden(burden[p][name])["FWHM"] > FALSE_POSITIVE_BURDEN for p in free)
        print(f"| {label} | {pearson_regression(ref, test).r:.3f} | {icc_a1(np.c_[ref, test]).icc:.3f} | {fp}/{len(free)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
