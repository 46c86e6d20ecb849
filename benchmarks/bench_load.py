"""Many scanners on one ``vne serve``: pass-through and VNE latency, VNE skipped, memory.

One ``vne serve`` (Gadgetron protocol, loopback) and, for each level of ``--streams``, that many
concurrent clients, each streaming its own copy of one exam (the same images, re-sent), for
``--rounds`` rounds. Clients send pre-serialized messages, paced ``--pace-ms`` apart (a scanner
hands images over as it reconstructs them; 0: as fast as the socket takes them), and frame the
replies without decoding pixels, so the client costs little next to the server.

Printed per level (one table, all levels measured in this run):

* wall time of a round (median over rounds);
* pass-through latency: an input image written -> the same image read back (median, 95th
  percentile, over every image of every stream), and the same for a second ``vne serve`` with VNE
  off (``enabled=false``), its rounds interleaved with the first's: the ratio is what VNE costs
  the pass-through at that load (``--no-baseline`` skips it);
* VNE latency: the last input a slice needs written -> its VNE image read back (median, max);
* VNE made / expected, VNE skipped (slices with no VNE; the server logs why, e.g. "server
  overloaded"), images lost (inputs not read back byte for byte: must be 0);
* the server's RSS before the level, its peak during it (sampled every 20 ms) and after it
  (1 s after the last stream ended).

Loops are bounded (levels x rounds x streams), every socket has a timeout, and the server is
stopped at the end (SIGTERM, then kill).

    python benchmarks/bench_load.py --model models/vne-sim-0.6.0.onnx --streams 1 5 10 20 50 --rounds 3
"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
from ismrmrd.serialization import ConfigText, ProtocolSerializer

from vne.exam.data import Role
from vne.runtime.memory import rss_mb
from vne.io.mrd.hdf5 import read_mrd_file
from vne.io.mrd.header import parse_header
from vne.io.mrd.image import from_mrd


NEEDED = (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE, Role.T1_MAP)
CLOSE, IMAGE = 4, 1022
HEAD_SIZE = ctypes.sizeof(ismrmrd.ImageHeader)
BYTES_PER = {1: 2, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16}   # ISMRMRD data types (INT: 4 bytes on the wire)


def serialize(obj) -> bytes:
    buf = io.BytesIO()
    ProtocolSerializer(buf).serialize(obj)
    return buf.getvalue()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("server closed the connection")
        out += chunk
    return bytes(out)


def read_reply(sock: socket.socket):
    """(message id, raw bytes after the id, image header or None); CLOSE gives (4, b'', None)."""
    mid = struct.unpack("<H", _read_exact(sock, 2))[0]
    if mid == CLOSE:
        return mid, b"", None
    if mid != IMAGE:
        raise ValueError(f"unexpected message id {mid}")
    hb = _read_exact(sock, HEAD_SIZE)
    head = ismrmrd.ImageHeader.from_buffer_copy(hb)
    lb = _read_exact(sock, 8)
    attr = _read_exact(sock, struct.unpack("<Q", lb)[0])
    n = int(head.channels) * int(head.matrix_size[0]) * int(head.matrix_size[1]) * int(head.matrix_size[2])
    data = _read_exact(sock, n * BYTES_PER[int(head.data_type)])
    return mid, hb + lb + attr + data, head


@dataclass
class Exam:
    config: bytes
    header: bytes
    images: list[bytes]            # serialized IMAGE messages (with the id)
    slice_of: list[int]
    needed: list[bool]
    input_series: set[int]

    @property
    def n_slices(self) -> int:
        return len({s for s, r in zip(self.slice_of, self.needed) if r})


def load_exam(path: Path) -> Exam:
    header_xml, images = read_mrd_file(path)
    roles = [from_mrd(im).role for im in images]
    return Exam(config=serialize(ConfigText("<configuration/>")), header=serialize(parse_header(header_xml)),
                images=[serialize(im) for im in images], slice_of=[int(im.slice) for im in images],
                needed=[r in NEEDED for r in roles], input_series={int(im.image_series_index) for im in images})


@dataclass
class StreamResult:
    passthrough_ms: list[float] = field(default_factory=list)
    vne_ms: list[float] = field(default_factory=list)
    n_vne: int = 0
    lost: int = 0
    error: str = ""


def run_stream(port: int, exam: Exam, pace_s: float, timeout_s: float) -> StreamResult:
    res = StreamResult()
    sent_at: list[float] = [0.0] * len(exam.images)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    except OSError as exc:
        res.error = f"connect: {exc}"
        res.lost = len(exam.images)
        return res
    sock.settimeout(timeout_s)
    send_error: list[str] = []

    def sender():
        try:
            sock.sendall(exam.config + exam.header)
            for k, msg in enumerate(exam.images):
                sent_at[k] = time.perf_counter()  # before: the echo can come back before sendall returns
                sock.sendall(msg)
                if pace_s:
                    time.sleep(pace_s)
            sock.sendall(struct.pack("<H", CLOSE))
        except OSError as exc:
            send_error.append(str(exc))

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    k = 0
    try:
        while True:
            mid, raw, head = read_reply(sock)
            now = time.perf_counter()
            if mid == CLOSE:
                break
            if int(head.image_series_index) in exam.input_series and k < len(exam.images):
                if raw == exam.images[k][2:]:
                    res.passthrough_ms.append(1000.0 * (now - sent_at[k]))
                else:
                    res.lost += 1
                k += 1
            else:
                s = int(head.slice)
                last = max(sent_at[j] for j in range(len(exam.images)) if exam.needed[j] and exam.slice_of[j] == s)
                res.vne_ms.append(1000.0 * (now - last))
                res.n_vne += 1
    except (OSError, EOFError, ValueError) as exc:
        res.error = f"{exc.__class__.__name__}: {exc}"
    finally:
        t.join(timeout=5)
        sock.close()
    res.lost += len(exam.images) - k
    if send_error and not res.error:
        res.error = f"send: {send_error[0]}"
    return res


class Server:
    """``vne serve`` in a subprocess, its output drained (a full pipe would block its logging)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vne.cli", "serve", "--port", "0"] + args,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port = None
        deadline = time.time() + 120
        while time.time() < deadline and self.port is None:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            m = re.search(r"listening on [\d.]+:(\d+) \((.*)\)", line)
            if m:
                self.port = int(m.group(1))
                self.banner = m.group(2)
        if self.port is None:
            raise RuntimeError("vne serve did not start:\n" + "".join(self.lines[-20:]))
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def count(self, pattern: str) -> int:
        return sum(bool(re.search(pattern, line)) for line in list(self.lines))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._drain.join(5)
        self.proc.stdout.close()


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            v = rss_mb(self.pid)
            if v == v:
                self.peak = max(self.peak, v)
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak


def run_round(port: int, exam: Exam, n: int, pace_s: float, timeout_s: float) -> tuple[float, list[StreamResult]]:
    """``n`` concurrent streams of ``exam`` against one server: (wall time in s, each stream's result)."""
    out: list[StreamResult] = [StreamResult() for _ in range(n)]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, run_stream(port, exam, pace_s, timeout_s)),
                                daemon=True) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 60)
    return time.perf_counter() - t0, out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exam", type=Path, default=None, help="ISMRMRD exam (default: one simulated case, seed 1)")
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pace-ms", type=float, default=5.0, help="gap between a stream's images (default 5 ms)")
    ap.add_argument("--timeout", type=float, default=300.0, help="socket timeout per stream (s)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra `vne serve` argument, e.g. --serve-arg=--vne-workers=1 (repeatable)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the reference server with VNE off (its pass-through latency, rounds interleaved)")
    args = ap.parse_args(argv)
    if args.model is None:
        from vne.runtime.model import find_default_model

        args.model = find_default_model()

    tmp = Path(tempfile.mkdtemp(prefix="vne-load-"))
    if args.exam is None:
        from vne.cli import main as vne_main

        assert vne_main(["simulate", "--cases", "1", "--seed", "1", "--out", str(tmp / "sim"), "--no-cache"]) == 0
        args.exam = next((tmp / "sim" / "mrd").glob("*.h5"))
    exam = load_exam(args.exam)
    top = max(args.streams)
    common = ["--model", str(args.model), "--cache-dir", "none", "--max-active", str(top + 2),
              "--read-timeout", str(args.timeout)] + args.serve_arg
    server = Server(common)
    # the reference: the same server with VNE off, so the pass-through cost of VNE is a ratio of one run
    baseline = None if args.no_baseline else Server(common + ["--property", "enabled=false"])
    print(f"exam {args.exam.name}: {len(exam.images)} images, {exam.n_slices} slices; {os.cpu_count()} CPUs; "
          f"pace {args.pace_ms:g} ms; server: {server.banner}"
          + ("" if baseline is None else "; reference: a second server with VNE off, rounds interleaved"))
    for s in (server, baseline):  # one stream each first, unmeasured: both servers warm
        if s is not None:
            run_round(s.port, exam, 1, 0.0, args.timeout)
    time.sleep(1.0)
    rss_fresh = rss_mb(server.proc.pid)
    rows = []
    try:
        for n in args.streams:
            before = rss_mb(server.proc.pid)
            sampler = Sampler(server.proc.pid)
            walls, results, pt_off = [], [], []
            skipped_logged0 = server.count(r"server overloaded")
            for _ in range(args.rounds):
                wall, out = run_round(server.port, exam, n, args.pace_ms / 1000, args.timeout)
                walls.append(wall)
                results.extend(out)
                if baseline is not None:
                    pt_off.extend(x for r in run_round(baseline.port, exam, n, args.pace_ms / 1000, args.timeout)[1]
                                  for x in r.passthrough_ms)
            time.sleep(1.0)
            after = rss_mb(server.proc.pid)
            peak = sampler.stop()
            pt = [x for r in results for x in r.passthrough_ms]
            vl = [x for r in results for x in r.vne_ms]
            made = sum(r.n_vne for r in results)
            expected = exam.n_slices * len(results)
            errors = [r.error for r in results if r.error]
            rows.append({
                "streams": n, "rounds": args.rounds, "wall": statistics.median(walls),
                "pt_med": statistics.median(pt) if pt else float("nan"), "pt_p95": pct(pt, 95),
                "pt_off": statistics.median(pt_off) if pt_off else float("nan"),
                "vne_med": statistics.median(vl) if vl else float("nan"), "vne_max": max(vl) if vl else float("nan"),
                "made": made, "expected": expected, "skipped": expected - made,
                "skipped_logged": server.count(r"server overloaded") - skipped_logged0,
                "lost": sum(r.lost for r in results), "before": before, "peak": peak, "after": after,
                "errors": errors[:3],
            })
            r = rows[-1]
            print(f"  {n} streams x {args.rounds} rounds: wall {r['wall']:.1f} s, pass-through {r['pt_med']:.0f} ms "
                  f"(VNE off {r['pt_off']:.0f} ms), VNE {r['vne_med']:.0f} ms, {made}/{expected} VNE, lost {r['lost']}, "
                  f"RSS {before:.0f}/{peak:.0f}/{after:.0f} MB" + (f", errors: {errors[:2]}" if errors else ""), flush=True)
    finally:
        server.stop()
        if baseline is not None:
            baseline.stop()
        log_path = tmp / "serve.log"
        log_path.write_text("".join(server.lines))
    print()
    print(f"server log: {log_path} ({server.count(' ERROR ')} ERROR lines, {server.count('server overloaded')} "
          f"'server overloaded')")
    print(f"server RSS fresh (model loaded, one stream served): {rss_fresh:.0f} MB; server peak over the run (VmHWM) not sampled "
          f"after exit; {server.count('Traceback')} tracebacks in its log")
    print("| concurrent streams | rounds | wall time per round | pass-through latency, median (p95) "
          "| pass-through with VNE off, median (ratio) | VNE latency, median (max) "
          "| VNE made / expected | VNE skipped (logged) | images lost | server RSS before / peak / after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["pt_med"] / r["pt_off"] if r["pt_off"] > 0 else float("nan")
        print(f"| {r['streams']} | {r['rounds']} | {r['wall']:.1f} s | {r['pt_med']:.0f} ms ({r['pt_p95']:.0f}) "
              f"| {r['pt_off']:.0f} ms ({ratio:.2f}x) | {r['vne_med']:.0f} ms ({r['vne_max']:.0f}) "
              f"| {r['made']} / {r['expected']} | {r['skipped']} ({r['skipped_logged']}) "
              f"| {r['lost']} | {r['before']:.0f} / {r['peak']:.0f} / {r['after']:.0f} MB |")
    print("pass-through: input written -> the same bytes read back; VNE: last needed input of a slice written -> its "
          "VNE read back; RSS after: 1 s after the level's last stream")
    return 0 if all(r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
