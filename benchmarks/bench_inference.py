"""Per-slice inference latency of the VNE generator: ONNX Runtime vs torch eager.

    python benchmarks/bench_inference.py                      # default architecture, random weights
    python benchmarks/bench_inference.py --checkpoint runs/x/best.pt --threads 2 --runs 30
    python benchmarks/bench_inference.py --config smoke --height 160 --width 160

One slice (batch 1) at 288×384 (the HCMR T1 grid) by default, warm (``--warmup`` runs first),
median of ``--runs``; CPU with ``--threads`` threads for both runtimes (ORT intra-op threads,
torch.set_num_threads). The two CPU runtimes are timed one after the other, never together,
so their thread pools do not compete. With CUDA present, GPU columns are added (torch eager
float32 and autocast float16, ORT CUDA provider when installed). Also prints parameters and
multiply-accumulates (FLOPs ≈ 2 × MACs) of the generator at that size.

With ``--onnx MODEL`` (no torch needed) it times a shipped model instead, with the session
options the runtime uses (:func:`vne.runtime.model.session_options`) and the alternatives they were chosen
over, at the heart window's size (160x160) and at the padded full T1 grid (256x304 by default),
the variants timed alternately so that each sees the same machine load:

    python benchmarks/bench_inference.py --onnx models/vne-sim-0.6.0.onnx --runs 15

Latency on a shared machine is noisy: compare rows of one run, and repeat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vne.prepare.contract import INPUT_NAMES


def onnx_options(path: Path, runs: int, warmup: int, full_hw: tuple[int, int]) -> int:
    """Session-option variants of a shipped model, timed alternately (module docstring)."""
    import onnxruntime as ort

    from vne.runtime.model import VNEModel, session_options

    contract = VNEModel(path, prefer_gpu=False).contract

    def variant(**kw):
        so = session_options(kw.get("intra"))
        if "opt" in kw:
            so.graph_optimization_level = kw["opt"]
        if kw.get("no_arena"):
            so.enable_cpu_mem_arena = False
        if kw.get("spin"):
            so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    variants = {
        "runtime (vne.runtime.model.session_options)": variant(),
        "1 intra-op thread": variant(intra=1),
        "spinning idle threads": variant(spin=True),
        "basic graph optimisation": variant(opt=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "no memory arena": variant(no_arena=True),
    }
    rng = np.random.default_rng(0)
    print(f"{path.name}: ONNX Runtime {ort.__version__}, CPU; {runs} runs after {warmup} warm-up runs, variants alternated")
    print("| variant | 160x160 (heart window), median ms | vs runtime | " + f"{full_hw[0]}x{full_hw[1]}, median ms | vs runtime |")
    print("| --- | --- | --- | --- | --- |")
    res = {}
    for h, w in ((160, 160), full_hw):
        feed = {"cine": (rng.random((1, contract.n_cine_frames, h, w)) * 300).astype(np.float32),
                "ir": (rng.random((1, contract.n_ir_images, h, w)) * 100).astype(np.float32),
                "ir_ti_ms": np.asarray([contract.nominal_ti_ms[: contract.n_ir_images]], np.float32),
                "t1_map_ms": np.full((1, 1, h, w), 1000.0, np.float32)}
        times = {k: [] for k in variants}
        for sess in variants.values():
            for _ in range(warmup):
                sess.run(None, feed)
        for _ in range(runs):
            for k, sess in variants.items():
                t = time.perf_counter()
                sess.run(None, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        res[(h, w)] = {k: statistics.median(v) for k, v in times.items()}
    base = "runtime (vne.runtime.model.session_options)"
    (a, b) = list(res)
    for k in variants:
        print(f"| {k} | {res[a][k]:.1f} | {res[a][k] / res[a][base]:.2f}x | {res[b][k]:.1f} | {res[b][k] / res[b][base]:.2f}x |")
    return 0


def _time(fn, warmup: int, runs: int, sync=lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _row(name: str, ms: list[float]) -> dict:
    q = np.percentile(ms, [10, 90])
    return {"backend": name, "median_ms": statistics.median(ms), "p10_ms": float(q[0]), "p90_ms": float(q[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="training checkpoint (default: random weights)")
    p.add_argument("--config", default="default", help="config whose 'model' section is used without --checkpoint")
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--onnx", type=Path, help="time this ONNX model's session options instead (no torch)")
    args = p.parse_args(argv)
    if args.onnx:
        return onnx_options(args.onnx, args.runs, args.warmup, (args.height if args.height % 16 == 0 else 256,
                                                                args.width if args.width % 16 == 0 else 304))

    import torch

    from training.checkpoint import load_checkpoint
    from training.config import load_config
    from training.export import example_inputs, write_onnx
    from training.networks import VNEGenerator, count_macs, count_params, generator_from_checkpoint

    import onnxruntime as ort

    torch.manual_seed(0)
    if args.checkpoint:
        g = generator_from_checkpoint(load_checkpoint(args.checkpoint))
    else:
        g = VNEGenerator(load_config(args.config).model).eval()
    feed = example_inputs(1, args.height, args.width, seed=0, n_cine=g.config.n_cine_frames)
    x = tuple(torch.from_numpy(feed[k]) for k in INPUT_NAMES)
    params, macs = count_params(g), count_macs(g, *x)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vne.onnx"
        t0 = time.time()
        write_onnx(g, path, args.exporter)
        export_s = time.time() - t0

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        rows.append(_row(f"onnxruntime CPU ({args.threads} threads)", _time(lambda: sess.run(None, feed), args.warmup, args.runs)))
        del sess

        torch.set_num_threads(args.threads)
        with torch.inference_mode():
            rows.append(_row(f"torch eager CPU ({args.threads} threads)", _time(lambda: g(*x), args.warmup, args.runs)))

        if torch.cuda.is_available():
            gc = g.cuda()
            xc = tuple(t.cuda() for t in x)
            sync = torch.cuda.synchronize
            with torch.inference_mode():
                rows.append(_row("torch eager CUDA fp32", _time(lambda: gc(*xc), args.warmup, args.runs, sync)))
                with torch.autocast("cuda", dtype=torch.float16):
                    rows.append(_row("torch eager CUDA autocast fp16", _time(lambda: gc(*xc), args.warmup, args.runs, sync)))
            if "CUDAExecutionProvider" in ort.get_available_providers():
                sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
                rows.append(_row("onnxruntime CUDA fp32", _time(lambda: sess.run(None, feed), args.warmup, args.runs)))
                del sess

    ref = rows[0]["median_ms"]
    print(f"VNE generator: {params / 1e6:.2f} M parameters, {macs / 1e9:.2f} GMAC = {2 * macs / 1e9:.2f} GFLOP "
          f"per {args.height}x{args.width} slice; {args.exporter} export {export_s:.1f} s")
    print(f"{'backend':40s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'vs ORT CPU':>11s}")
    for r in rows:
        print(f"{r['backend']:40s} {r['median_ms']:10.1f} {r['p10_ms']:8.1f} {r['p90_ms']:8.1f} {r['median_ms'] / ref:10.2f}x")
    torch_cpu = rows[1]["median_ms"]
    print(f"ONNX Runtime is {torch_cpu / ref:.2f}x faster than torch eager on CPU")
    if args.json:
        args.json.write_text(json.dumps({"params": params, "macs": macs, "height": args.height, "width": args.width,
                                         "threads": args.threads, "exporter": args.exporter, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
