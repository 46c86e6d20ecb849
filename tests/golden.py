"""Golden measurements of the SHIPPED model on a fixed simulated exam, through the real pipeline.

:func:`measure` streams the exam (simulator seed :data:`SEED`, case :data:`CASE`, never used in
training) through :class:`vne.runtime.pipeline.VNEPipeline` exactly as the gadget does, records what the
pipeline hands the model (a spy around ``predict_many`` that calls the real session), and returns
per slice:

* ``cine_blood_over_myo``: mean cine (over the cycle) in the true LV blood pool / in the true
  myocardium, on the T1 grid. bSSFP blood is bright: > 1.3. A flipped or misplaced cine reads ~1.
* ``systole_at``: where in the cycle the LV cavity is smallest (fraction of the cycle, from the
  cine on the T1 grid). The simulator contracts at 0.3-0.4; reversed phases read 0.6-0.7.
* ``vne_blood``, ``vne_remote``: mean VNE in the true blood pool and remote myocardium.
* ``lesion_centroid``: (row, col) of the VNE's FWHM lesion pixels inside the true myocardium,
  and ``lesion_dice`` against the true lesions.
* ``window``: (row, col, height, width) of the T1 grid the model ran on (:mod:`vne.prepare.roi`); the
  cine figures above read the truth masks cropped to it;
* ``full_grid_gap``: mean |VNE on the window - VNE of the model run on the whole, padded T1 grid|
  inside the true myocardium (:func:`vne.prepare.slices.on_t1_grid`, ``model.predict``), and
  ``full_grid_pad``: how many rows/columns that run's padding added (the crop-corner check needs
  > 0: a wrong crop of the padded output shifts the full-grid VNE against the window's).

and the exam's FWHM ``burden`` (lesion pixels / myocardium pixels, VNE vs the truth masks).

The expectations for the shipped model live in ``tests/golden_expected.json`` with the model's
sha256. After shipping a new model, regenerate them (and look at the numbers before committing):

    python tests/golden.py --write
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

def _demo_exam() -> tuple[int, int]:
    from vne.commands.demo import DEMO_CASE, DEMO_SEED

    return DEMO_SEED, DEMO_CASE


SEED, CASE = _demo_exam()     # the demo exam (vne demo), one definition
EXPECTED = Path(__file__).with_name("golden_expected.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cavity_curve(cine: np.ndarray, blood: np.ndarray, myo: np.ndarray) -> np.ndarray:
    """(n,) LV cavity size per frame: pixels of the filled LV region brighter than the midpoint
    between the mean blood and myocardium signal of the cycle."""
    from scipy import ndimage

    region = ndimage.binary_fill_holes(myo) | blood
    mean = cine.mean(axis=0)
    thr = 0.5 * (mean[blood].mean() + mean[myo].mean())
    return np.array([(f[region] > thr).sum() for f in cine], float)


def _full_grid_inputs(model, r, pipe) -> dict:
    """The model's inputs of a result's slice on the whole T1 grid (the full-grid path)."""
    from vne.prepare.contract import model_inputs
    from vne.prepare.slices import assemble, on_t1_grid

    s, why = assemble(r.t1, pipe._pool)
    assert s is not None, why
    g = on_t1_grid(s)
    return model_inputs(model.contract, g.t1_map_ms, g.ir_signed, g.ir_ti_ms, g.cine_frames, g.cine_trigger_ms,
                        g.rr_interval_ms)


def measure(model_path: Path, qc: str = "mark") -> dict:
    """The golden measurements (module docstring). ``qc="mark"``: every slice gets a VNE, with
    the guard's verdict recorded (``qc`` per slice), so the spatial checks do not depend on it."""
    from vne.prepare.contract import pad_to_multiple
    from vne.runtime.model import load_model
    from vne.runtime.config import PipelineConfig
    from vne.runtime.pipeline import process_stream
    from vne.simulate.case import simulate_case
    from vne.simulate.writers import case_to_mrd

    case = simulate_case(SEED, CASE)
    header, images = case_to_mrd(case)
    model = load_model(model_path)
    seen: list[dict] = []
    real = model.predict_many

    def spy(slices):  # records the inputs, then runs the real session
        seen.extend(slices)
        return real(slices)

    model.predict_many = spy
    try:
        out, pipe = process_stream(images, PipelineConfig(model=str(model_path), cache_dir="none", qc=qc),
                                   header=header, model=model)
    finally:
        model.predict_many = real
    if len(pipe.results) != len(case.truth):
        raise AssertionError(f"{len(pipe.results)} VNE images for {len(case.truth)} slices: {pipe.problems}")
    t1_positions = [tuple(np.round(im.geometry.position_mm, 2)) for im in case.images if im.role.value == "t1_map"]
    slices, les_total, myo_total = [], 0, 0
    for r, x in zip(pipe.results, seen):
        truth = case.truth[t1_positions.index(tuple(np.round(r.t1.geometry.position_mm, 2)))]
        blood, myo, remote, lesion = truth.blood_pool, truth.myocardium, truth.remote, truth.lesion
        cine = x["cine"][0]
        cav = _cavity_curve(cine, blood[r.window], myo[r.window])
        v = r.vne
        lo, hi = float(v[remote].mean()), float(v[blood].mean())
        les = myo & (v > lo + 0.5 * (hi - lo))
        les_total += int(les.sum())
        myo_total += int(myo.sum())
        ii, jj = np.nonzero(les)
        full = _full_grid_inputs(model, r, pipe)
        _, shape = pad_to_multiple(full, model.contract.pad_multiple)
        padded = [(-n) % model.contract.pad_multiple for n in shape]
        gap = float(np.abs(model.predict(full)[0] - v)[myo].mean())
        rows, cols = r.window
        mean_cine = cine.mean(axis=0)
        slices.append({
            "cine_blood_over_myo": float(mean_cine[blood[r.window]].mean() / mean_cine[myo[r.window]].mean()),
            "systole_at": float(np.argmin(cav) / len(cav)),
            "vne_blood": hi, "vne_remote": lo,
            "lesion_centroid": [float(ii.mean()), float(jj.mean())] if ii.size else None,
            "lesion_dice": float(2 * (les & lesion).sum() / max(les.sum() + lesion.sum(), 1)),
            "true_lesion_px": int(lesion.sum()),
            "window": [rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start],
            "full_grid_gap": gap,
            "full_grid_pad": padded,
            "qc": r.qc.verdict if r.qc is not None else "OFF",
            "qc_reason": r.qc.reason if r.qc is not None else "",
        })
    return {"model": Path(model_path).name, "sha256": sha256(model_path), "seed": SEED, "case": CASE,
            "burden": 100.0 * les_total / max(myo_total, 1),
            "true_burden": 100.0 * case.lesion_burden, "slices": slices}


def main() -> int:
    from vne.runtime.model import find_default_model

    model = find_default_model()
    m = measure(model)
    print(json.dumps(m, indent=1))
    if "--write" in sys.argv:
        EXPECTED.write_text(json.dumps(m, indent=1) + "\n")
        print(f"wrote {EXPECTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
