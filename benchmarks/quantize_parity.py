"""Would an int8 or fp16 copy of the shipped model do? Speed against parity, measured here.

Builds, in a temporary folder (nothing is shipped):

* **int8**: ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations),
  calibrated on the gadget's own heart-window inputs of ``--calib`` simulated slices;
* **fp16**: all float tensors converted to float16 (inputs and output stay float32).

Then, on ``--test`` other slices of the held-out set (the gadget's inputs, :mod:`vne.runtime.inference`),
prints for each copy: the network time per slice relative to the fp32 model (timed alternately
in this run) and the max and mean |VNE copy - VNE fp32| inside the true myocardium (normalised
PSIR, blood = 1), with the per-patient FWHM burden agreement of each against the artefact-free
LGE. A copy is worth shipping only where parity holds: max |delta| in the myocardium well below
the contrast the burden threshold reads (0.5 of blood - remote) and the same burden agreement.

Needs the ``onnx`` package (``pip install -e .[train]``); the runtime never does.

    python benchmarks/quantize_parity.py --exams /work/data/test-A23-s2000 --calib 12 --test 30
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vne.runtime import inference
from vne.io.mrd.hdf5 import read_mrd_file
from vne.io.mrd.header import parse_header, study_key
from vne.io.mrd.image import from_mrd
from vne.evaluation.collect_simulated import slice_index_by_position
from vne.prepare.contract import INPUT_NAMES, crop_output, pad_to_multiple
from vne.prepare.contract import normalise_psir as normalise
from vne.runtime.model import VNEModel, session_options
from vne.evaluation.quantify import LGE_LEVELS, VNE_ADJUSTED_LEVELS, patient_burden, quantify_slice
from vne.prepare.slices import build_slices
from vne.evaluation.stats import icc_a1, pearson_regression



def slices_of(exams: Path, contract, skip: int, n: int):
    """(patient, prepared slice, truth masks) for slices skip .. skip + n of the set."""
    doc = json.loads((exams / "cases.json").read_text())
    k_all = 0
    for case in doc["cases"]:
        header, raw = read_mrd_file(exams / "mrd" / f"{case['case_id']}.h5")
        key = study_key(parse_header(header))
        sl, _ = build_slices([from_mrd(m, key) for m in raw], need_lge=True)
        index_of = slice_index_by_position(raw)
        truth = np.load(exams / "truth" / f"{case['case_id']}.npz")
        for s in sl:
            k_all += 1
            if k_all <= skip:
                continue
            if k_all > skip + n:
                return
            k = index_of[tuple(np.round(s.t1_map.geometry.position_mm, 2))]
            masks = {m: truth[f"s{k}_{m}"].astype(bool) for m in ("myocardium", "remote", "blood_pool")}
            masks["lge"] = truth[f"s{k}_lge_clean"]
            yield case["patient_id"], inference.prepare(contract, s), masks


class Calibration:
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--calib", type=int, default=12, help="slices for int8 calibration (the first of the set)")
    ap.add_argument("--test", type=int, default=30, help="slices compared (after the calibration slices)")
    args = ap.parse_args(argv)
    if args.model is None:
        from vne.runtime.model import find_default_model

        args.model = find_default_model()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.transformers.float16 import convert_float_to_float16

    ref = VNEModel(args.model, prefer_gpu=False)
    tmp = Path(tempfile.mkdtemp(prefix="vne-quant-"))
    calib = [pad_to_multiple({n: p.x[n] for n in INPUT_NAMES}, ref.contract.pad_multiple)[0]
             for _, p, _ in slices_of(args.exams, ref.contract, 0, args.calib)]
    pre = tmp / "pre.onnx"
    int8 = tmp / "int8.onnx"
    # ONNX Runtime's quantisation tools leave scratch files (sym_shape_infer_temp.onnx, <uuid>.data)
    # in the working directory: keep them in the temporary folder, out of the checkout.
    with contextlib.chdir(tmp):
        quant_pre_process(str(args.model.resolve()), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(int8), Calibration(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    fp16 = tmp / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(args.model)), keep_io_types=True), str(fp16))
    sessions = {"fp32": ref.session}
    for name, path in (("int8", int8), ("fp16", fp16)):
        try:
            sessions[name] = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        except Exception as exc:
            print(f"{name}: does not load ({exc.__class__.__name__}: {str(exc)[:200]})")

    times = defaultdict(list)
    gaps = defaultdict(list)
    burden = defaultdict(lambda: defaultdict(list))
    for patient, p, m in slices_of(args.exams, ref.contract, args.calib, args.test):
        feed, hw = pad_to_multiple({n: p.x[n] for n in INPUT_NAMES}, ref.contract.pad_multiple)
        ys = {}
        for name, sess in sessions.items():  # alternately: the same load for every copy
            t = time.perf_counter()
            ys[name] = crop_output(sess.run(["vne"], feed)[0], hw)[0, 0].astype(np.float32)
            times[name].append(1000.0 * (time.perf_counter() - t))
        myo, remote, blood = (m[k][p.window] for k in ("myocardium", "remote", "blood_pool"))
        b = burden[patient]
        b["lge"].append(quantify_slice(normalise(m["lge"][p.window], remote, blood), myo, remote, blood, LGE_LEVELS))
        for name, y in ys.items():
            b[name].append(quantify_slice(y, myo, remote, blood, VNE_ADJUSTED_LEVELS))
            if name != "fp32":
                d = np.abs(normalise(y, remote, blood) - normalise(ys["fp32"], remote, blood))[myo]
                gaps[name].append((float(d.max()), float(d.mean())))
    patients = sorted(burden)
    lge = np.array([patient_burden(burden[q]["lge"])["FWHM"] for q in patients])
    base = statistics.median(times["fp32"])
    print(f"{args.model.name}: {len(times['fp32'])} slices on their heart windows, {len(patients)} patients; "
          f"int8 calibrated on {len(calib)} other slices")
    print("| copy | network time vs fp32 | max / mean |delta| in the myocardium | FWHM burden r / ICC vs LGE |")
    print("| --- | --- | --- | --- |")
    for name in sessions:
        v = np.array([patient_burden(burden[q][name])["FWHM"] for q in patients])
        agree = f"{pearson_regression(lge, v).r:.3f} / {icc_a1(np.c_[lge, v]).icc:.3f}"
        g = gaps.get(name)
        gap = f"{max(x[0] for x in g):.3f} / {np.mean([x[1] for x in g]):.4f}" if g else "-"
        print(f"| {name} | {statistics.median(times[name]) / base:.2f}x ({statistics.median(times[name]):.0f} ms) "
              f"| {gap} | {agree} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
