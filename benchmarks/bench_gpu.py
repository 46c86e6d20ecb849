"""The VNE network on a GPU: ONNX Runtime's CUDA provider with IO binding, and TensorRT if it loads.

Ready for whenever a GPU is available; without one it says why and exits 0 (nothing to measure).
Needs the GPU build of ONNX Runtime (``VNE_ORT=gpu pip install -e .``, i.e. ``onnxruntime-gpu``)
and a CUDA device; TensorRT rows need the TensorRT libraries as well (skipped otherwise).

Per provider, one slice (batch 1) at the heart window's size (160x160) and at the full T1 grid
(288x384), warm (``--warmup`` runs first), median and 90th percentile of ``--runs``:

* ``CUDA, run()``: numpy in, numpy out (host-device copies inside every call);
* ``CUDA, IO binding``: inputs copied to the device once, output bound on the device, so the
  time is the network's alone (``session.run_with_iobinding``), as a server that keeps the
  window's inputs on the GPU would see it;
* ``TensorRT``: the TensorRT provider (fp32, and fp16 with ``--trt-fp16``), engine cached under
  ``--trt-cache``; its first run builds the engine (minutes), reported separately;
* ``CPU`` for reference, in the same run.

The target of issue 12 is under 5 ms per slice on the GPU; record the figure in models/README.md.

    python benchmarks/bench_gpu.py [--model models/vne-sim-0.6.0.onnx] [--runs 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np



def feed(contract, h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"cine": (rng.random((1, contract.n_cine_frames, h, w)) * 300).astype(np.float32),
            "ir": (rng.random((1, contract.n_ir_images, h, w)) * 100).astype(np.float32),
            "ir_ti_ms": np.asarray([contract.nominal_ti_ms[: contract.n_ir_images]], np.float32),
            "t1_map_ms": np.full((1, 1, h, w), 1000.0, np.float32)}


def timed(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(1000.0 * (time.perf_counter() - t))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--trt-fp16", action="store_true", help="also TensorRT with fp16 kernels")
    ap.add_argument("--trt-cache", type=Path, default=Path("/tmp/vne-trt-cache"))
    args = ap.parse_args(argv)
    if args.model is None:
        from vne.runtime.model import find_default_model

        args.model = find_default_model()

    import onnxruntime as ort

    from vne.runtime.model import VNEModel, session_options

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        print(f"bench_gpu: skipped: this ONNX Runtime ({ort.__version__}) has no CUDA provider (providers: "
              f"{', '.join(available)}); install onnxruntime-gpu (VNE_ORT=gpu pip install -e .) on a CUDA host")
        return 0
    contract = VNEModel(args.model, prefer_gpu=False).contract
    cuda = ("CUDAExecutionProvider", {"device_id": args.device, "cudnn_conv_algo_search": "EXHAUSTIVE"})
    try:
        probe = ort.InferenceSession(str(args.model), session_options(), providers=[cuda, "CPUExecutionProvider"])
    except Exception as exc:
        print(f"bench_gpu: skipped: the CUDA provider could not start ({exc.__class__.__name__}: {str(exc)[:200]})")
        return 0
    if "CUDAExecutionProvider" not in probe.get_providers():
        print("bench_gpu: skipped: no usable CUDA device (ONNX Runtime fell back to the CPU)")
        return 0
    del probe

    rows: list[tuple[str, str, list[float]]] = []
    sessions = {"CUDA": [cuda, "CPUExecutionProvider"], "CPU": ["CPUExecutionProvider"]}
    if "TensorrtExecutionProvider" in available:
        args.trt_cache.mkdir(parents=True, exist_ok=True)
        for fp16 in ([False, True] if args.trt_fp16 else [False]):
            trt = ("TensorrtExecutionProvider", {"device_id": args.device, "trt_fp16_enable": fp16,
                                                 "trt_engine_cache_enable": True,
                                                 "trt_engine_cache_path": str(args.trt_cache)})
            sessions["TensorRT fp16" if fp16 else "TensorRT fp32"] = [trt, cuda, "CPUExecutionProvider"]
    else:
        print("TensorRT: skipped (no TensorrtExecutionProvider in this ONNX Runtime build)")

    for name, providers in sessions.items():
        try:
            t0 = time.perf_counter()
            sess = ort.InferenceSession(str(args.model), session_options(), providers=providers)
            made = time.perf_counter() - t0
        except Exception as exc:
            print(f"{name}: skipped ({exc.__class__.__name__}: {str(exc)[:200]})")
            continue
        if name.startswith("TensorRT") and "TensorrtExecutionProvider" not in sess.get_providers():
            print(f"{name}: skipped (the provider did not load; TensorRT libraries missing?)")
            continue
        for h, w in ((160, 160), (288, 384)):
            x = feed(contract, h, w)
            t0 = time.perf_counter()
            sess.run(None, x)
            first = 1000.0 * (time.perf_counter() - t0)
            rows.append((name + ", run()", f"{h}x{w}", timed(lambda: sess.run(None, x), args.warmup, args.runs)))
            if name != "CPU":
                io = sess.io_binding()
                for k, v in x.items():
                    io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", args.device))
                io.bind_output("vne", "cuda", args.device)
                rows.append((name + ", IO binding", f"{h}x{w}", timed(lambda: sess.run_with_iobinding(io),
                                                                      args.warmup, args.runs)))
            print(f"{name} {h}x{w}: session {made:.1f} s, first run {first:.0f} ms", flush=True)

    print(f"\nmodel {args.model.name}; ONNX Runtime {ort.__version__}; device {args.device}; {args.runs} runs after "
          f"{args.warmup} warm-up runs")
    print("| provider | slice | median ms | p90 ms |")
    print("| --- | --- | --- | --- |")
    for name, shape, ms in rows:
        print(f"| {name} | {shape} | {statistics.median(ms):.2f} | {np.percentile(ms, 90):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
