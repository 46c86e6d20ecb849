#!/usr/bin/env python3
"""Which input moves VNE's endocardial border? The model on each lesion-free slice's own inputs and
on perturbed copies of them, scored at the border the way the judge scores burden.

``benchmarks/border_split.py`` found that on the external exams VNE's remaining false-positive
pixels lie in the myocardial ring touching the cavity. This script asks which input puts them
there. Each lesion-free slice goes through the gadget's own preparation
(:func:`vne.runtime.inference.prepare`: matching, resampling, sign restoration, the heart
window), then the model runs on

* ``as is``: the slice's inputs;
* ``cine static``: every cine phase replaced by the mean frame (no motion);
* ``cine frame 0``: every phase replaced by the first (end-diastole, as triggered);
* ``cine 1 px``: the cine shifted by one pixel (rows);
* ``cine blur`` / ``IR blur`` / ``T1 blur``: a 1-pixel Gaussian on that input;
* ``T1 sharpen``: the T1 map plus (T1 map - its 1-pixel Gaussian);
* ``rotation average x2`` / ``x4``: the model on the inputs rotated by 0 and 180 degrees (or 0,
  90, 180, 270), each output rotated back, averaged (test-time augmentation: it removes the part
  of the border's wander that is the model's variance, not its bias).

Printed per perturbation, with the judge's masks and FWHM rule (``score_exams.FRACS``), in
blood = 1, remote = 0 units: the FWHM pixels in the inner (cavity-side) and outer rings (% of the
myocardium, :func:`border_split.split_slice`), and the inner ring's mean and 90th percentile and
the last cavity pixels' mean. The T1 map and the artefact-free LGE are read the same way for
comparison: a VNE border as sharp as the LGE's reads like the LGE row.

Two layouts:

  # the external exams (failure analysis only: never to train or tune)
  python benchmarks/border_sensitivity.py --external ../shared/data/external-exams
  # our own simulated sets (vne simulate: mrd/ + truth/ + cases.json)
  python benchmarks/border_sensitivity.py --own /work/data/test-A23-s2000
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from border_split import DEFAULT_SCORER_DIR, reference_levels, split_slice  # noqa: E402

Masks = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # myocardium, blood, remote, clean LGE


def _same(x: dict) -> dict:
    return x


PERTURBATIONS = {
    "as is": _same,
    "cine static": lambda x: {**x, "cine": np.repeat(x["cine"].mean(1, keepdims=True), x["cine"].shape[1], 1)},
    "cine frame 0": lambda x: {**x, "cine": np.repeat(x["cine"][:, :1], x["cine"].shape[1], 1)},
    "cine 1 px": lambda x: {**x, "cine": np.roll(x["cine"], 1, axis=-2)},
    "cine blur": lambda x: {**x, "cine": ndimage.gaussian_filter(x["cine"], (0, 0, 1, 1))},
    "IR blur": lambda x: {**x, "ir": ndimage.gaussian_filter(x["ir"], (0, 0, 1, 1))},
    "T1 blur": lambda x: {**x, "t1_map_ms": ndimage.gaussian_filter(x["t1_map_ms"], (0, 0, 1, 1))},
    "T1 sharpen": lambda x: {**x, "t1_map_ms": 2 * x["t1_map_ms"] - ndimage.gaussian_filter(x["t1_map_ms"], (0, 0, 1, 1))},
}


SPATIAL_INPUTS = ("t1_map_ms", "ir", "cine")  # (B, C, H, W) model inputs; the TIs are not images
ROTATION_AVERAGES = {"rotation average x2": (0, 2), "rotation average x4": (0, 1, 2, 3)}


def rotation_average(model, x: dict, quarter_turns) -> np.ndarray:
    """The model's output averaged over inputs rotated by ``quarter_turns`` x 90 degrees (each
    output rotated back); (H, W) on the inputs' window."""
    outs = []
    for k in quarter_turns:
        xr = {key: np.ascontiguousarray(np.rot90(v, k, axes=(-2, -1))) if key in SPATIAL_INPUTS else v
              for key, v in x.items()}
        outs.append(np.rot90(model.predict_many([xr])[0], -k, axes=(-2, -1)))
    return np.mean(outs, axis=0)


def border_profile(img: np.ndarray, myo: np.ndarray, blood: np.ndarray, remote: np.ndarray) -> tuple[float, float, float]:
    """(mean, 90th percentile) of the myocardial ring touching the cavity and the mean of the
    cavity pixels touching the myocardium, in remote = 0 / central blood = 1 units (the judge's
    reference levels). All (H, W) on the T1 grid."""
    hi, lo = reference_levels(img, blood, remote)
    n = (img - lo) / (hi - lo)
    filled = ndimage.binary_fill_holes(myo)
    cavity = filled & ~myo
    inner = myo & ndimage.binary_dilation(cavity)
    last_cavity = cavity & ndimage.binary_dilation(myo)
    return float(n[inner].mean()), float(np.percentile(n[inner], 90)), float(n[last_cavity].mean())


def external_slices(root: Path, model) -> Iterator[tuple[object, Masks]]:
    """Lesion-free slices of exams ``root/NAME/{dicom/, truth.npz}``, read as ``vne infer`` reads them."""
    from vne.io.dicom import read_dicom_folder
    from vne.prepare.slices import build_slices
    from vne.runtime import inference

    for case in sorted(p for p in root.iterdir() if (p / "truth.npz").is_file()):
        tr = dict(np.load(case / "truth.npz"))
        if float(tr["burden_true"]) > 0:
            continue
        images = [im for exam in read_dicom_folder(case / "dicom") for im in exam.images]
        for s in build_slices(images)[0]:
            k = int(np.argmin(np.linalg.norm(tr["t1_ipp"] - np.asarray(s.t1_map.geometry.position_mm), axis=1)))
            yield inference.prepare(model.contract, s), (tr["myo"][k], tr["blood"][k], tr["remote"][k],
                                                         tr["lge_clean"][k].astype(float))


def own_slices(exams: Path, model) -> Iterator[tuple[object, Masks]]:
    """Lesion-free slices of a ``vne simulate`` set, read from its ISMRMRD files as the gadget
    gets them (``quantize_parity.slices_of``)."""
    from quantize_parity import slices_of

    doc = json.loads((exams / "cases.json").read_text())
    lesion_free = {c["patient_id"] for c in doc["cases"] if c.get("lesion_free")}
    for patient, p, m in slices_of(exams, model.contract, 0, sys.maxsize):
        if patient in lesion_free:
            yield p, (m["myocardium"], m["blood_pool"], m["remote"], m["lge"].astype(float))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--external", type=Path, help="exams NAME/{dicom/, truth.npz} (analysis only)")
    g.add_argument("--own", type=Path, help="a vne simulate set (mrd/, truth/, cases.json)")
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--scorer-dir", type=Path, default=DEFAULT_SCORER_DIR, help="folder of the judge's score_exams.py")
    a = ap.parse_args()
    root = a.external or a.own
    if not root.is_dir():
        ap.error(f"{root} does not exist")
    sys.path.insert(0, str(a.scorer_dir))
    import score_exams  # noqa: E402  (the judge's FWHM fraction)

    from vne.prepare import roi
    from vne.runtime.model import load_model

    model = load_model(a.model, prefer_gpu=False)
    fraction = score_exams.FRACS["FWHM"]
    rows: dict[str, list] = {k: [] for k in ("T1 map", "clean LGE", *PERTURBATIONS, *ROTATION_AVERAGES)}
    n_myo, n_slices = 0, 0
    for p, (myo, blood, remote, lge) in (external_slices if a.external else own_slices)(root, model):
        n_slices += 1
        n_myo += int(myo.sum())
        for name, img in (("T1 map", p.t1_map_ms), ("clean LGE", lge)):
            rows[name].append((np.zeros(3), border_profile(img, myo, blood, remote)))
        outputs = {name: model.predict_many([perturb(p.x)])[0] for name, perturb in PERTURBATIONS.items()}
        outputs.update({name: rotation_average(model, p.x, turns) for name, turns in ROTATION_AVERAGES.items()})
        for name, y in outputs.items():
            vne = y if p.full_grid else roi.paste(y, p.window, p.shape)
            counts, _ = split_slice(vne, myo, blood, remote, fraction)
            rows[name].append((counts, border_profile(vne, myo, blood, remote)))
    if not n_slices:
        print("no lesion-free slice in", root)
        return 1
    print(f"{n_slices} lesion-free slices of {root}; model {model.name} {model.version}; "
          "FWHM pixels in % of the myocardium, profiles in blood = 1 units")
    print("| input | inner FWHM px | outer FWHM px | inner ring mean | inner ring p90 | last cavity pixel |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, got in rows.items():
        counts = 100 * np.sum([c for c, _ in got], axis=0) / n_myo
        prof = np.mean([q for _, q in got], axis=0)
        px = ("–", "–") if name in ("T1 map", "clean LGE") else (f"{counts[0]:.2f} %", f"{counts[1]:.2f} %")
        print(f"| {name} | {px[0]} | {px[1]} | {prof[0]:.3f} | {prof[1]:.3f} | {prof[2]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
