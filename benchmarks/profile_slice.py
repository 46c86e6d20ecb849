"""Where a slice's time goes: the per-slice path, step by step, and the old full-grid path beside it.

One exam is fed to :class:`vne.runtime.pipeline.VNEPipeline` in scanner order, as the gadget gets it (all
images at once, so its slices complete together), ``--repeats`` times per arm, the arms
interleaved so that both see the same machine load. Printed:

* per step, the median ms per slice of the gadget's path (:mod:`vne.runtime.inference`; the step names of
  ``VNEResult.timings``): ``match`` (assemble the slice's images), ``cine`` (cine frames onto
  their footprint on the T1 grid and onto the model's cycle), ``heart`` (the LV finder and the
  moving region: the model's window), ``ir_signs`` (IR images onto the window, signs restored),
  ``inputs``, ``guard`` (input checks), ``model`` (ONNX Runtime on the window, pasted),
  ``guard_output``;
* the same slices through the full-grid path of before (``vne.prepare.slices.on_t1_grid`` +
  ``model_inputs`` + the guard + the model on the whole, padded T1 grid + the output check):
  ``full: grid`` (resampling + sign restoration on the whole grid), ``full: inputs``, ``full:
  guard``, ``full: model``, ``full: guard_output``;
* per arm, the latency of each slice: its T1 map handed in -> its VNE ready (the T1 maps arrive
  together, so later slices include waiting), inline and with worker pools of 1 and 2 threads;
* the ratios of one run: end-to-end per slice / network alone, window / full grid.

    python benchmarks/profile_slice.py [--exam exam.h5] [--model M.onnx] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vne.prepare.contract import model_inputs
from vne.exam.data import Role
from vne.runtime.model import load_model
from vne.io.mrd.hdf5 import read_mrd_file
from vne.io.mrd.header import parse_header, study_key
from vne.io.mrd.image import from_mrd
from vne.runtime.config import PipelineConfig
from vne.runtime.pipeline import VNEPipeline
from vne.runtime.qc import check_inputs, check_output
from vne.prepare.slices import assemble, on_t1_grid
from vne.runtime.workers import SliceWorkers



def _ms(t0: float) -> float:
    return 1000.0 * (time.perf_counter() - t0)


def full_grid_arm(model, header, raw, field_t) -> tuple[dict, list[float]]:
    """The path before the heart window, step by step, on the same slices (all on one thread)."""
    steps: dict[str, list[float]] = defaultdict(list)
    ims = [from_mrd(x, study_key(parse_header(header))) for x in raw]
    t_arrive = time.perf_counter()
    latency = []
    for t1 in [im for im in ims if im.role == Role.T1_MAP]:
        t0 = time.perf_counter()
        s, _ = assemble(t1, ims)
        steps["full: match"].append(_ms(t0))
        t0 = time.perf_counter()
        g = on_t1_grid(s)
        steps["full: grid"].append(_ms(t0))
        t0 = time.perf_counter()
        x = model_inputs(model.contract, g.t1_map_ms, g.ir_signed, g.ir_ti_ms, g.cine_frames, g.cine_trigger_ms,
                         g.rr_interval_ms)
        steps["full: inputs"].append(_ms(t0))
        t0 = time.perf_counter()
        verdict, lv = check_inputs(x["t1_map_ms"][0, 0], x["cine"][0], x["ir"][0], x["ir_ti_ms"][0],
                                   float(np.mean(t1.geometry.pixel_spacing_mm)), field_t=field_t)
        steps["full: guard"].append(_ms(t0))
        t0 = time.perf_counter()
        y = model.predict(x)[0]
        steps["full: model"].append(_ms(t0))
        t0 = time.perf_counter()
        check_output(y, lv)
        steps["full: guard_output"].append(_ms(t0))
        latency.append(_ms(t_arrive))
    return steps, latency


def gadget_arm(model, header, raw, workers) -> tuple[dict, list[float]]:
    sent = []
    p = VNEPipeline(PipelineConfig(model=str(model.path), cache_dir="none", qc="mark"), header=header, model=model,
                    workers=workers, emit=sent.append if workers else None)
    for item in raw:
        for _ in p.feed_iter(item):
            pass
    p.finish()
    steps: dict[str, list[float]] = defaultdict(list)
    for r in p.results:
        for k, v in r.timings.items():
            steps[k].append(v)
    return steps, [1000.0 * r.seconds for r in p.results]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exam", type=Path, default=None, help="ISMRMRD exam (default: one simulated case, seed 1)")
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    args = ap.parse_args(argv)
    if args.model is None:
        from vne.runtime.model import find_default_model

        args.model = find_default_model()
    if args.exam is None:
        from vne.cli import main as vne_main

        out = Path(tempfile.mkdtemp(prefix="vne-prof-")) / "sim"
        assert vne_main(["simulate", "--cases", "1", "--seed", "1", "--out", str(out), "--no-cache"]) == 0
        args.exam = next((out / "mrd").glob("*.h5"))
    header, raw = read_mrd_file(args.exam)
    model = load_model(args.model, intra_op_threads=args.threads)
    field_t = None
    arms = {"inline": None, "pool of 1": SliceWorkers(workers=1), "pool of 2": SliceWorkers(workers=2)}
    steps: dict[str, list[float]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    gadget_arm(model, header, raw, None)    # resampling operators cached, as in a warm server
    for _ in range(args.repeats):
        s, l = full_grid_arm(model, header, raw, field_t)
        lat["full grid, inline"].extend(l)
        for k, v in s.items():
            steps[k].extend(v)
        for name, pool in arms.items():
            s, l = gadget_arm(model, header, raw, pool)
            lat[f"window, {name}"].extend(l)
            if name == "inline":
                for k, v in s.items():
                    steps[k].extend(v)
    n_slices = len(lat["window, inline"]) // args.repeats
    print(f"exam {args.exam.name}: {len(raw)} images, {n_slices} slices; model {model.name} {model.version}; "
          f"intra-op threads {args.threads or 'ORT default'}; {args.repeats} repeats, arms interleaved")
    print("| step | median ms per slice |")
    print("| --- | --- |")
    med = {k: statistics.median(v) for k, v in steps.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    win_total = sum(v for k, v in med.items() if not k.startswith("full"))
    full_total = sum(v for k, v in med.items() if k.startswith("full"))
    print(f"| **window path, sum of steps** | **{win_total:.1f}** |")
    print(f"| **full-grid path, sum of steps** | **{full_total:.1f}** |")
    print()
    print("| arm | slice latency, ms: median (min-max), T1 map in -> VNE ready |")
    print("| --- | --- |")
    for k, v in lat.items():
        print(f"| {k} | {statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f}) |")
    print()
    print(f"ratios (this run): window path / full-grid path per slice {win_total / full_total:.2f}; network on the window "
          f"/ on the full grid {med['model'] / med['full: model']:.2f}; window path / its network alone "
          f"{win_total / med['model']:.2f}; full-grid path / its network alone {full_total / med['full: model']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
