"""Does the VNE of the heart depend on the field of view the model is run on?

The generator is trained on heart-centred crops and the gadget runs it on the whole T1 grid.
For every slice of a simulated set this runs the model twice on the gadget's own inputs
(ISMRMRD file -> matching -> resampling -> model inputs, as ``vne infer``): once on the full
T1 grid and once on a ``--window``-pixel square around the heart (located with the simulator's
myocardium mask), and prints

* the mean |full - window| VNE inside the myocardium (normalised PSIR: remote 0, blood 1);
* per-patient lesion burden agreement (FWHM, adjusted 35% VNE threshold, contour margin as in
  ``vne evaluate``) against the artefact-free LGE, for both ways of running the model;
* false positives (burden > 2%) among lesion-free patients.

A model that is a local, fully convolutional function of its input reads the same both ways.

    python benchmarks/fov_sensitivity.py --exams /work/data/test-s2000 --model models/vne-sim-0.2.0.onnx
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from vne.io import mrd as mrd_io
from vne.evaluation.collect_simulated import slice_index_by_position
from vne.prepare.contract import model_inputs, normalise_psir
from vne.runtime.model import VNEModel
from vne.evaluation.quantify import LGE_LEVELS, VNE_ADJUSTED_LEVELS, patient_burden, quantify_slice
from vne.prepare.slices import build_slices, on_t1_grid
from vne.evaluation.stats import FALSE_POSITIVE_BURDEN, icc_a1, pearson_regression
from vne.io.training_data import heart_crop_window


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=Path, required=True, help="a `vne simulate` output with mrd/ and truth/")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--window", type=int, default=160, help="heart window in T1-grid pixels (the training cache's)")
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    model = VNEModel(args.model, intra_op_threads=args.threads)
    doc = json.loads((args.exams / "cases.json").read_text())
    burden = defaultdict(lambda: defaultdict(list))
    lesion_free: dict[str, bool] = {}
    gaps = []
    for case in doc["cases"][: args.max_cases or None]:
        header, raw = mrd_io.read_mrd_file(args.exams / "mrd" / f"{case['case_id']}.h5")
        key = mrd_io.study_key(mrd_io.parse_header(header))
        slices, _ = build_slices([mrd_io.from_mrd(m, key) for m in raw], need_lge=True)
        index_of = slice_index_by_position(raw)
        truth = np.load(args.exams / "truth" / f"{case['case_id']}.npz")
        lesion_free[case["patient_id"]] = bool(case["lesion_free"])
        for s in slices:
            grid = on_t1_grid(s)
            x = model_inputs(model.contract, grid.t1_map_ms, grid.ir_signed, grid.ir_ti_ms, grid.cine_frames,
                             grid.cine_trigger_ms, grid.rr_interval_ms)
            k = index_of[tuple(np.round(s.t1_map.geometry.position_mm, 2))]
            myo, remote, blood = (truth[f"s{k}_{n}"].astype(bool) for n in ("myocardium", "remote", "blood_pool"))
            ii, jj = np.nonzero(myo)
            rows, cols = heart_crop_window((ii.mean(), jj.mean()), myo.shape, args.window)
            x_win = {n: v if n == "ir_ti_ms" else np.ascontiguousarray(v[..., rows, cols]) for n, v in x.items()}
            full = model.predict(x)[0]
            window = np.zeros_like(full)
            window[rows, cols] = model.predict(x_win)[0]
            gaps.append(float(np.abs(normalise_psir(full, remote, blood) - normalise_psir(window, remote, blood))[myo].mean()))
            b = burden[case["patient_id"]]
            b["lge"].append(quantify_slice(normalise_psir(truth[f"s{k}_lge_clean"], remote, blood), myo, remote, blood, LGE_LEVELS))
            b["full"].append(quantify_slice(full, myo, remote, blood, VNE_ADJUSTED_LEVELS))
            b["window"].append(quantify_slice(window, myo, remote, blood, VNE_ADJUSTED_LEVELS))

    patients = sorted(burden)
    ref = np.array([patient_burden(burden[p]["lge"])["FWHM"] for p in patients])
    free = [p for p in patients if lesion_free[p]]
    print(f"{args.model.name} on {args.exams} ({len(patients)} patients, {len(gaps)} slices, window {args.window} px)")
    print(f"mean |VNE full field - VNE heart window| in the myocardium: {np.mean(gaps):.3f} (normalised PSIR)")
    print("| inference | FWHM r | ICC(A,1) | false positives |")
    print("| --- | --- | --- | --- |")
    for name in ("full", "window"):
        test = np.array([patient_burden(burden[p][name])["FWHM"] for p in patients])
        fp = sum(patient_burden(burden[p][name])["FWHM"] > FALSE_POSITIVE_BURDEN for p in free)
        print(f"| {name} | {pearson_regression(ref, test).r:.3f} | {icc_a1(np.c_[ref, test]).icc:.3f} | {fp}/{len(free)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
