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
import torch


from training.checkpoint import load_checkpoint
from training.export import write_onnx, example_inputs
from training.networks import GeneratorConfig, VNEGenerator, count_macs, count_params, generator_from_checkpoint
from training.train import load_config
from vne.prepare.contract import INPUT_NAMES


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
    args = p.parse_args(argv)

    import onnxruntime as ort

    torch.manual_seed(0)
    if args.checkpoint:
        g = generator_from_checkpoint(load_checkpoint(args.checkpoint))
    else:
        g = VNEGenerator(GeneratorConfig.from_dict(load_config(args.config)["model"])).eval()
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
