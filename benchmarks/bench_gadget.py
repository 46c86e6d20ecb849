"""End-to-end latency and memory of the VNE gadget over the real Gadgetron external protocol.

Latency is measured on the Gadgetron side (this script plays it, over TCP on 127.0.0.1): from
the moment the **last input image a slice needs** (cine, IR magnitude / phase, T1 map) has been
written to the socket to the moment that slice's **VNE image has been read back**; per exam,
from the last needed input of the exam to the last VNE image.

Modes:
- **execute (cold)**: like Gadgetron's ``<execute>``, a fresh ``python -m gadgetron PORT
  gadgets.vne_gadget gadget`` process per stream (process start, imports and model load are
  inside the measurement; the stream is sent as soon as the gadget connects);
- **connect (warm)**: one ``vne serve`` process, model loaded and warmed up once, several
  streams in a row (Gadgetron's ``<connect>``); each stream is sent twice: as a burst (as fast as
  the socket takes it, so all slices complete within milliseconds and queue behind each other:
  a replay, the worst case) and paced (``--slice-gap-ms``: each slice completes one gap after the
  previous one, as on a scanner where each ShMOLLI slice is its own breath-hold, seconds apart);
- **in-process**: :func:`vne.runtime.pipeline.process_stream` with ``tracemalloc``, for the Python heap
  peak and the per-slice compute time without any transport.

Peak memory: the gadget process's peak RSS (``resource.getrusage(RUSAGE_CHILDREN)`` for the
execute processes, ``/proc/<pid>/status`` VmHWM for ``vne serve``), and the ``tracemalloc`` peak
of the in-process run.

Usage::

    python benchmarks/bench_gadget.py [--exam exam.h5] [--model M.onnx | --make-model tiny|default]
                                      [--cold 2] [--warm 3] [--threads N] [--slice-gap-ms 1000]

``--make-model`` exports a randomly initialised generator (``training.networks``, tiny widths or
the default configuration) for timing only; it needs torch, the gadget itself never does.
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from html import escape
from pathlib import Path

import ismrmrd

from vne.commands.stream import exchange, exchange_on
from vne.exam.data import Role
from vne.io.mrd.hdf5 import read_mrd_file
from vne.io.mrd.image import from_mrd

NEEDED = (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE, Role.T1_MAP)


def make_exam(tmp: Path) -> Path:
    from vne.cli import main

    out = tmp / "sim"
    assert main(["simulate", "--cases", "1", "--seed", "1", "--out", str(out), "--no-cache"]) == 0
    return next((out / "mrd").glob("*.h5"))


def make_model(kind: str, tmp: Path) -> Path:
    import torch

    from training.export import write_onnx
    from training.networks import GeneratorConfig, VNEGenerator
    from vne.prepare.contract import CONTRACT_KEY, ModelContract

    import onnx

    torch.manual_seed(0)
    cfg = GeneratorConfig(base_channels=4, depth=2, fusion_channels=8, head_channels=4, film_hidden=8) \
        if kind == "tiny" else GeneratorConfig()
    g = VNEGenerator(cfg).eval()
    path = tmp / f"vne-sim-bench-{kind}.onnx"
    write_onnx(g, path, exporter="torchscript")
    m = onnx.load(str(path))
    m.metadata_props.add(key=CONTRACT_KEY, value=ModelContract(pad_multiple=g.pad_multiple, model_name=f"bench-{kind}",
                                                                model_version="0").to_json())
    onnx.save(m, str(path))
    n = sum(p.numel() for p in g.parameters())
    print(f"model: random {kind} generator, {n / 1e6:.2f} M parameters -> {path}")
    return path


def config_xml(**props) -> str:
    return "<configuration>" + "".join(f'<property name="{escape(k)}" value="{escape(str(v))}"/>'
                                       for k, v in props.items()) + "</configuration>"


class Clock:
    """Send / receive timestamps of one stream and the latencies they give."""

    def __init__(self, images: list, slice_gap_s: float = 0.0) -> None:
        self.images = images
        roles = [from_mrd(im).role for im in images]
        self.needed = {k for k, r in enumerate(roles) if r in NEEDED}
        self.sent: dict[int, float] = {}
        self.vne: dict[int, float] = {}
        self.input_series = {im.image_series_index for im in images}
        # the image that completes each slice (its last needed input), but the last slice's
        last_of: dict[int, int] = {}
        for k in sorted(self.needed):
            last_of[int(images[k].slice)] = k
        self.pause_after = set(sorted(last_of.values())[:-1]) if slice_gap_s > 0 else set()
        self.slice_gap_s = slice_gap_s

    def on_sent(self, k, im, t):
        self.sent[k] = t
        if k in self.pause_after:  # paced: the next slice completes one breath-hold later
            time.sleep(self.slice_gap_s)

    def on_received(self, item, t):
        if isinstance(item, ismrmrd.Image) and item.image_series_index not in self.input_series:
            self.vne[int(item.slice)] = t

    def latencies(self) -> tuple[list[float], float]:
        last = {}
        for k in self.needed:
            s = int(self.images[k].slice)
            last[s] = max(last.get(s, 0.0), self.sent[k])
        per_slice = [self.vne[s] - last[s] for s in sorted(self.vne)]
        exam = max(self.vne.values()) - max(self.sent[k] for k in self.needed) if self.vne else float("nan")
        return per_slice, exam


def run_execute(header, images, model, threads, cache_dir) -> dict:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(120)
    port = srv.getsockname()[1]
    env = {**os.environ, "GADGETRON_EXTERNAL_LOG_LEVEL": "INFO"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "gadgets.vne_gadget", "gadget"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sock, _ = srv.accept()
    t_conn = time.perf_counter() - t0
    srv.close()
    clock = Clock(images)
    from ismrmrd.serialization import ConfigText

    cfg = ConfigText(config_xml(model=model, cache_dir=cache_dir, intra_op_threads=threads if threads else ""))
    exchange_on(sock, header, images, config=cfg, on_sent=clock.on_sent, on_received=clock.on_received)
    total = time.perf_counter() - t0
    log = proc.communicate(timeout=120)[0]
    m = re.search(r"loaded from .* in ([0-9.]+) s on ([\w, ]+)", log)
    per_slice, exam = clock.latencies()
    return {"per_slice": per_slice, "exam": exam, "connect": t_conn, "total": total,
            "load": float(m.group(1)) if m else float("nan"), "providers": m.group(2).strip() if m else "?"}


def start_serve(model, threads, cache_dir):
    cmd = [sys.executable, "-m", "vne.cli", "serve", "--port", "0", "--model", str(model), "--cache-dir", cache_dir]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on [\d.]+:(\d+)", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    raise RuntimeError("vne serve did not start")


def run_connect(port, header, images, slice_gap_s: float = 0.0) -> dict:
    clock = Clock(images, slice_gap_s)
    t0 = time.perf_counter()
    exchange("127.0.0.1", port, header, images, on_sent=clock.on_sent, on_received=clock.on_received)
    per_slice, exam = clock.latencies()
    return {"per_slice": per_slice, "exam": exam, "total": time.perf_counter() - t0}


def vm_hwm_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def in_process(header, images, model, threads) -> dict:
    from vne.runtime.model import load_model
    from vne.runtime.config import PipelineConfig
    from vne.runtime.pipeline import process_stream

    m = load_model(model, intra_op_threads=threads)
    m.warm_up((256, 256))
    tracemalloc.start()
    t0 = time.perf_counter()
    _, p = process_stream(images, PipelineConfig(model=str(model), cache_dir="none", intra_op_threads=threads),
                          header=header, model=m)
    total = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"per_slice": [r.seconds for r in p.results], "total": total, "peak_mb": peak / 2**20}


def fmt(xs) -> str:
    xs = [1000 * x for x in xs]
    if not xs:
        return "-"
    return f"{statistics.median(xs):7.0f} ({min(xs):.0f}-{max(xs):.0f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exam", type=Path, default=None, help="ISMRMRD exam (default: one simulated case, seed 1)")
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: --make-model tiny)")
    ap.add_argument("--make-model", choices=("tiny", "default"), default="tiny")
    ap.add_argument("--cold", type=int, default=2, help="execute-mode runs (fresh process each)")
    ap.add_argument("--warm", type=int, default=3, help="connect-mode streams against one vne serve")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--slice-gap-ms", type=float, default=1000.0,
                    help="connect mode is also run paced: each slice's last needed input this long after the "
                         "previous slice's, as slices acquired in separate breath-holds arrive (0: burst only)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="vne-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    exam = args.exam or make_exam(tmp)
    model = args.model or make_model(args.make_model, tmp)
    header, images = read_mrd_file(exam)
    n_slices = len({im.slice for im in images if from_mrd(im).role == Role.T1_MAP})
    print(f"exam: {exam.name}: {len(images)} images, {n_slices} slices; {os.cpu_count()} CPUs; "
          f"threads {args.threads or 'ORT default'}")

    rows = []
    cold = [run_execute(header, images, str(model), args.threads, str(tmp / "cache-exec")) for _ in range(args.cold)]
    rss_exec = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows.append(("execute (cold)", [x for r in cold for x in r["per_slice"]], [r["exam"] for r in cold],
                 [r["total"] for r in cold], rss_exec))
    print(f"execute mode: gadget connected {fmt([r['connect'] for r in cold])} ms after spawn; model load "
          f"{fmt([r['load'] for r in cold])} ms; providers {cold[0]['providers']}")

    proc, port = start_serve(model, args.threads, str(tmp / "cache-serve"))
    try:
        warm = [run_connect(port, header, images) for _ in range(args.warm)]
        paced = [run_connect(port, header, images, args.slice_gap_ms / 1000) for _ in range(args.warm)] \
            if args.slice_gap_ms > 0 else []
        rss_serve = vm_hwm_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    rows.append(("connect (warm)", [x for r in warm for x in r["per_slice"]], [r["exam"] for r in warm],
                 [r["total"] for r in warm], rss_serve))
    if paced:
        rows.append((f"connect (warm), slices {args.slice_gap_ms:.0f} ms apart", [x for r in paced for x in r["per_slice"]],
                     [r["exam"] for r in paced], [r["total"] for r in paced], rss_serve))

    ip = in_process(header, images, model, args.threads)
    rows.append(("in-process", ip["per_slice"], [], [ip["total"]], float("nan")))

    print()
    print("| mode | per-slice latency, ms: median (min-max) | per-exam latency, ms | stream wall time, ms | peak RSS, MB |")
    print("|---|---|---|---|---|")
    for name, ps, ex, tot, rss in rows:
        print(f"| {name} | {fmt(ps)} | {fmt(ex)} | {fmt(tot)} | {rss:.0f} |")
    print(f"\nin-process tracemalloc peak (Python heap, whole exam): {ip['peak_mb']:.0f} MB")
    print("per-slice: last needed input of a slice written -> its VNE image read back; per-exam: last needed input -> "
          "last VNE image; execute includes process start + imports + model load (spawned at stream start); "
          "the burst rows send the exam as fast as the socket takes it, so its slices complete together and "
          "queue behind each other; the paced row sends each slice one gap after the previous one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
