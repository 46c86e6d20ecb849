"""Fault injection (issue 11): ``vne serve`` on both protocols never loses or alters a framable input.

Real TCP sockets on 127.0.0.1. The servers are the accept loops ``vne serve`` runs
(:func:`vne.commands.serve.serve` for the Gadgetron external protocol,
:func:`vne.runtime.mrd_server.serve` for MRD) in a thread of this process, so their log records can be
read; the SIGTERM and kill-after-CLOSE tests run ``vne serve`` itself as a subprocess. The
clients here are our own byte-level code, written independently of :mod:`vne.io.framing`: the
expected output of every stream is computed by :func:`reference_frames`, a second framer of the
documented wire format (uint16 id; texts with a uint32 length; IMAGE = 198-byte header + uint64
attribute length + attributes + channels x matrix x type size; ACQUISITION, WAVEFORM by their
headers; CLOSE), with the same length limits as the server.

The assertion for every stream, fault case or fuzz case alike: the server's replies are exactly
the input's data messages (IMAGE, ACQUISITION, WAVEFORM) that can be framed, byte-identical and
in order, then CLOSE (MRD: with TEXT messages among them); if the input could not be framed to
its CLOSE, the server logged one line naming the specific reason; and the server then serves a
clean stream. VNE is off in the threaded servers (``enabled=false``: images are still decoded,
on a copy, for the pipeline), so the suite needs no model and runs in seconds;
:func:`test_pugixml_meta_with_vne_on` runs one exam with a tiny model.

The fuzzer mutates valid streams (seeded; ``VNE_FUZZ_CASES`` cases per protocol, default 300):
unknown ids, damaged meta XML, invalid UTF-8, data short or long, truncation, absurd lengths,
byte flips, deleted spans, duplicated messages.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

import vne_helpers as H

PY = sys.executable
IMAGE, ACQ, WAVE, TEXT, CLOSE = 1022, 1008, 1026, 5, 4
DATA_IDS = (IMAGE, ACQ, WAVE)
COMPOUND_IDS = (1023, 1024, 1050)  # Gadgetron's image array etc.: framed by gadgetron's readers
KNOWN_IDS = (1, 2, 3, 4, 5, ACQ, IMAGE, WAVE) + COMPOUND_IDS
SIZES = {1: 2, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16}
MiB = 1 << 20
# the threaded servers' limits (small, so that absurd declared lengths are cheap to refuse)
MAX_TEXT, MAX_ATTR, MAX_DATA = 1 * MiB, 1 * MiB, 8 * MiB
FUZZ_CASES = int(os.environ.get("VNE_FUZZ_CASES", "300"))
PROTOCOLS = ("gadgetron", "mrd")


# ---------------------------------------------------------------------------- wire format (ours)
def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def text_msg(msg_id: int, text: str | bytes, nul: bool = True) -> bytes:
    body = (text.encode() if isinstance(text, str) else text) + (b"\0" if nul else b"")
    return struct.pack("<HI", msg_id, len(body)) + body


def config_file(name: str) -> bytes:
    return u16(1) + name.encode().ljust(1024, b"\0")


def image_msg(head: bytes, attr: bytes, data: bytes) -> bytes:
    return u16(IMAGE) + head + struct.pack("<Q", len(attr)) + attr + data


def split_image(msg: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, attributes, data) of an IMAGE message."""
    (n,) = struct.unpack_from("<Q", msg, 2 + 198)
    return msg[2:200], msg[208:208 + n], msg[208 + n:]


def pugixml_meta(pairs: list[tuple[str, str]], *, nul: bool = True) -> bytes:
    """Meta XML as ISMRMRD's C++ writer (pugixml) lays it out: declaration, tab-indented
    elements, newline at the end, NUL-terminated. Values are written as given (may hold
    character references such as ``&#65;``, or be empty)."""
    body = "".join(f"\t<meta>\n\t\t<name>{k}</name>\n\t\t<value>{v}</value>\n\t</meta>\n" for k, v in pairs)
    return f'<?xml version="1.0"?>\n<ismrmrdMeta>\n{body}</ismrmrdMeta>\n'.encode() + (b"\0" if nul else b"")


def reference_frames(buf: bytes, start: int = 0) -> tuple[list[tuple[int, bytes]], str]:
    """Frame ``buf`` from ``start`` as the protocol defines it, up to CLOSE or the first place it
    cannot be framed. Returns ([(id, exact bytes)] without CLOSE, how it ended: ``close``,
    ``eof``, ``truncated``, ``unknown <id>``, ``limit``, ``datatype``)."""
    out: list[tuple[int, bytes]] = []
    p = start
    n = len(buf)

    def need(k: int) -> bool:
        return p + k <= n

    while True:
        if p == n:
            return out, "eof"
        if not need(2):
            return out, "truncated"
        (mid,) = struct.unpack_from("<H", buf, p)
        q = p + 2
        if mid == CLOSE:
            return out, "close"
        if mid == 1:
            size = 1024
        elif mid in (2, 3, TEXT):
            if q + 4 > n:
                return out, "truncated"
            (k,) = struct.unpack_from("<I", buf, q)
            if k > MAX_TEXT:
                return out, "limit"
            size = 4 + k
        elif mid == IMAGE:
            if q + 206 > n:
                return out, "truncated"
            dtype, = struct.unpack_from("<H", buf, q + 2)
            nx, ny, nz = struct.unpack_from("<3H", buf, q + 16)
            ch, = struct.unpack_from("<H", buf, q + 34)
            (alen,) = struct.unpack_from("<Q", buf, q + 198)
            if alen > MAX_ATTR:
                return out, "limit"
            if dtype not in SIZES:
                return out, "datatype"
            dlen = nx * ny * nz * ch * SIZES[dtype]
            if dlen > MAX_DATA:
                return out, "limit"
            size = 206 + alen + dlen
        elif mid == ACQ:
            if q + 340 > n:
                return out, "truncated"
            ns, = struct.unpack_from("<H", buf, q + 34)
            nc, = struct.unpack_from("<H", buf, q + 38)
            nt, = struct.unpack_from("<H", buf, q + 176)
            dlen = ns * nt * 4 + ns * nc * 8
            if dlen > MAX_DATA:
                return out, "limit"
            size = 340 + dlen
        elif mid == WAVE:
            if q + 40 > n:
                return out, "truncated"
            ns, ch = struct.unpack_from("<2H", buf, q + 28)
            dlen = ns * ch * 4
            if dlen > MAX_DATA:
                return out, "limit"
            size = 40 + dlen
        else:
            return out, f"unknown {mid}"
        if q + size > n:
            return out, "truncated"
        out.append((mid, buf[p:q + size]))
        p = q + size


class Replies:
    """Reads a server's replies from a socket, framing them incrementally with
    :func:`reference_frames`; :attr:`frames` so far, :attr:`closed` once CLOSE came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.frames: list[tuple[int, bytes]] = []
        self.closed = False

    def until(self, n_frames: int | None = None) -> list[tuple[int, bytes]]:
        """Read until CLOSE, the end of the connection, or ``n_frames`` frames in all."""
        while not self.closed and (n_frames is None or len(self.frames) < n_frames):
            frames, end = reference_frames(self.buf)
            if frames:
                self.frames += frames
                self.buf = self.buf[sum(len(r) for _, r in frames):]
            if end == "close":
                self.closed = True
                self.buf = self.buf[2:]
                break
            if n_frames is not None and len(self.frames) >= n_frames:
                break
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        return self.frames


# ---------------------------------------------------------------------------- streams
def _acquisition() -> bytes:
    acq = ismrmrd.Acquisition.from_array(np.arange(32, dtype=np.float32).view(np.complex64).reshape(2, 8))
    acq.scan_counter = 7
    return u16(ACQ) + acq.to_bytes()


def _waveform() -> bytes:
    w = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(2, 6))
    return u16(WAVE) + w.to_bytes()


def small_stream(n_images: int = 12, seed: int = 0) -> list[bytes]:
    """Data messages of a small synthetic stream: 16 x 16 images of four data types with meta in
    the C++ (pugixml) layout (empty values, ``&#65;``, trailing NUL or not), an acquisition and
    a waveform among them."""
    rng = np.random.default_rng(seed)
    msgs = []
    for k in range(n_images):
        kind = k % 4
        if kind == 0:
            a = rng.random((16, 16), dtype=np.float32) * 1000
        elif kind == 1:
            a = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
        elif kind == 2:
            a = rng.integers(-2048, 2048, (16, 16)).astype(np.int16)
        else:
            a = (rng.random((16, 16)) + 1j * rng.random((16, 16))).astype(np.complex64)
        im = ismrmrd.Image.from_array(a, transpose=False)
        im.image_series_index = 1 + k % 3
        im.image_index = k + 1
        full = im.to_bytes()
        (alen,) = struct.unpack_from("<Q", full, 198)
        attr = pugixml_meta([("DataRole", "Image"), ("Empty", ""), ("Ref", "&#65;"), ("Index", str(k))], nul=k % 2 == 0)
        msgs.append(image_msg(full[:198], attr, full[206 + alen:]))
    msgs.insert(3, _acquisition())
    msgs.insert(8, _waveform())
    return msgs


def header_xml() -> str:
    header, _ = H.sim_stream()
    return header


def preamble(protocol: str, header: str) -> bytes:
    if protocol == "gadgetron":  # as ismrmrd.serialization sends them: no NUL (gadgetron.external parses them)
        return text_msg(2, "<configuration/>", nul=False) + text_msg(3, header, nul=False)
    return config_file("vne") + text_msg(3, header)


# ---------------------------------------------------------------------------- servers
class Server:
    """One of ``vne serve``'s accept loops in a thread, on 127.0.0.1:<ephemeral>, VNE off."""

    def __init__(self, protocol: str, defaults=None, model=None) -> None:
        from vne.runtime import mrd_server
        from vne.commands.serve import bind, serve
        from vne.io.framing import FrameLimits
        from vne.runtime.config import PipelineConfig

        self.protocol = protocol
        defaults = defaults or PipelineConfig(enabled=False, cache_dir="none")
        limits = FrameLimits(max_text=MAX_TEXT, max_attributes=MAX_ATTR, max_data=MAX_DATA)
        srv = bind("127.0.0.1", 0)
        self.port = srv.getsockname()[1]
        self.stop = threading.Event()
        if protocol == "gadgetron":
            target = lambda: serve(srv, defaults, model, stop=self.stop, read_timeout_s=20.0, limits=limits)  # noqa: E731
        else:
            opts = mrd_server.ServerOptions(limits=limits, read_timeout_s=20.0, linger_s=1.0)
            target = lambda: mrd_server.serve(srv, defaults, model, opts, stop=self.stop)  # noqa: E731
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def talk(self, payload: bytes, timeout: float = 30.0) -> tuple[list[tuple[int, bytes]], bool, str]:
        """Send ``payload`` (then shut the write side), read replies to CLOSE.
        Returns (replies, CLOSE seen, our address as the server names it)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        me = "%s:%d" % sock.getsockname()[:2]

        def send():
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server stopped reading (framing lost): it drains, then closes

        t = threading.Thread(target=send, daemon=True)
        t.start()
        r = Replies(sock)
        try:
            r.until()
        finally:
            t.join(timeout)
            sock.close()
        return r.frames, r.closed, me

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture(scope="module")
def servers():
    s = {p: Server(p) for p in PROTOCOLS}
    yield s
    for v in s.values():
        v.close()


@pytest.fixture(scope="module")
def header():
    return header_xml()


def reasons_for(caplog, me: str) -> list[str]:
    """The server's log lines that say why the input of connection ``me`` was not read further."""
    out = []
    for r in caplog.records:
        m = r.getMessage()
        if me not in m or "-> TEXT" in m:  # (MRD: the copy sent to the client as a TEXT message)
            continue
        if "input not read further" in m or (r.name == "vne.mrd" and r.levelno >= logging.WARNING):
            out.append(m)
    return out


EXPECTED_REASON = {
    "eof": "without CLOSE", "truncated": "stream ended inside", "limit": "over the limit of",
    "datatype": "not an ISMRMRD data type",
}


def check_stream(server: Server, header: str, data: bytes, caplog, *, label: str = "") -> tuple[int, int]:
    """Send CONFIG, HEADER and ``data``; assert the replies are exactly the framable data
    messages of ``data`` (byte-identical, in order) then CLOSE, and one specific logged reason
    when ``data`` cannot be framed to its CLOSE. Returns (data messages framed, data messages in
    the input as sent)."""
    pre = preamble(server.protocol, header)
    frames, end = reference_frames(pre + data, len(pre))
    expected = [raw for mid, raw in frames if mid in DATA_IDS]
    replies, closed, me = server.talk(pre + data)
    got = [raw for mid, raw in replies if mid != TEXT]
    assert closed, f"{label}: no CLOSE from the server ({end})"
    assert len(got) == len(expected) and all(a == b for a, b in zip(got, expected)), \
        f"{label}: {len(got)} data messages back, expected {len(expected)} framable ones byte-identical ({end})"
    lines = reasons_for(caplog, me)
    if end == "close":
        assert lines == [], (label, lines)
    else:
        want = f"unknown message id {end.split()[1]}" if end.startswith("unknown") else EXPECTED_REASON[end]
        hits = [m for m in lines if want in m]
        assert len(hits) == 1, f"{label}: expected one log line with {want!r} for {me} ({end}), got {lines}"
    return len(expected), end


def clean_stream_works(server: Server, header: str) -> None:
    msgs = small_stream(4, seed=99)
    replies, closed, _ = server.talk(preamble(server.protocol, header) + b"".join(msgs) + u16(CLOSE))
    assert closed and [raw for mid, raw in replies if mid != TEXT] == msgs


# ---------------------------------------------------------------------------- one test per fault
def _with_bad_image(msgs: list[bytes], k: int, *, attr=None, data_delta: int = 0) -> list[bytes]:
    out = list(msgs)
    idx = [i for i, m in enumerate(out) if struct.unpack_from("<H", m)[0] == IMAGE][k]
    head, a, d = split_image(out[idx])
    if attr is not None:
        a = attr
    if data_delta < 0:
        d = d[:data_delta]
    elif data_delta > 0:
        d = d + bytes(range(256)) * (data_delta // 256) + bytes(data_delta % 256)
    out[idx] = image_msg(head, a, d)
    return out


FAULTS = {
    # name: (data bytes maker, expected data messages back out of those sent, specific reason or None)
    "clean": lambda m: b"".join(m) + u16(CLOSE),
    "unknown id mid-stream": lambda m: b"".join(m[:10]) + u16(999) + b"\x01" * 64 + b"".join(m[10:]) + u16(CLOSE),
    "malformed meta XML": lambda m: b"".join(_with_bad_image(m, 4, attr=b"<ismrmrdMeta><meta><name>x</name><value>"))
    + u16(CLOSE),
    "invalid UTF-8 in meta": lambda m: b"".join(_with_bad_image(m, 5, attr=pugixml_meta([("Name", "caf\xe9")])[:-1]
                                                               .replace(b"caf\xc3\xa9", b"caf\xe9\xff"))) + u16(CLOSE),
    "image data 1000 bytes short": lambda m: b"".join(_with_bad_image(m, 6, data_delta=-1000)) + u16(CLOSE),
    "image data 1000 bytes long": lambda m: b"".join(_with_bad_image(m, 6, data_delta=1000)) + u16(CLOSE),
    "truncated stream": lambda m: (b"".join(m) + u16(CLOSE))[:len(b"".join(m[:7])) + 300],
    "no CLOSE": lambda m: b"".join(m),
    "HEADER-sized text of 2^31 bytes": lambda m: b"".join(m[:5]) + struct.pack("<HI", TEXT, 1 << 31) + b"x" * 100,
    "attribute length 2^40": lambda m: b"".join(m[:6]) + u16(IMAGE) + split_image(m[0])[0] + struct.pack("<Q", 1 << 40),
    "image matrix of 16 GiB": lambda m: b"".join(m[:6]) + u16(IMAGE) + _huge_matrix(split_image(m[0])[0])
    + struct.pack("<Q", 0),
    "undefined data type": lambda m: b"".join(m[:2]) + u16(IMAGE) + _data_type(split_image(m[0])[0], 77)
    + struct.pack("<Q", 0) + b"".join(m[2:]) + u16(CLOSE),
    "TEXT and HEADER mid-stream": lambda m: b"".join(m[:4]) + text_msg(TEXT, "hello") + text_msg(3, "<x/>")
    + b"".join(m[4:]) + u16(CLOSE),
}


def _huge_matrix(head: bytes) -> bytes:
    h = bytearray(head)
    struct.pack_into("<3H", h, 16, 65535, 65535, 1)
    struct.pack_into("<H", h, 34, 1)
    struct.pack_into("<H", h, 2, 5)  # float32: 16 GiB declared
    return bytes(h)


def _data_type(head: bytes, dt: int) -> bytes:
    h = bytearray(head)
    struct.pack_into("<H", h, 2, dt)
    return bytes(h)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(servers, header, caplog, protocol, fault):
    """Each fault: every framable input message back byte-identical and in order, CLOSE, one
    specific reason logged, and the same server serves a clean stream next."""
    caplog.set_level(logging.INFO)
    server = servers[protocol]
    msgs = small_stream()
    data = FAULTS[fault](msgs)
    n_back, end = check_stream(server, header, data, caplog, label=f"{protocol}/{fault}")
    print(f"{protocol} / {fault}: {n_back} of {len(msgs)} data messages back byte-identical ({end})")
    if fault in ("clean", "malformed meta XML", "invalid UTF-8 in meta", "TEXT and HEADER mid-stream"):
        assert n_back == len(msgs) and end == "close"
    if fault in ("malformed meta XML", "invalid UTF-8 in meta"):
        assert any("cannot be decoded" in r.getMessage() for r in caplog.records)
    if fault == "unknown id mid-stream":
        assert n_back == 10
    clean_stream_works(server, header)


# ---------------------------------------------------------------------------- fuzzer
def mutate(msgs: list[bytes], rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded mutation of a valid stream (data messages + CLOSE)."""
    msgs = list(msgs)
    img_idx = [i for i, m in enumerate(msgs) if struct.unpack_from("<H", m)[0] == IMAGE]
    kind = rng.choice(["unknown_id", "meta", "utf8", "data_len", "truncate", "absurd", "flip", "delete", "duplicate",
                       "text_mid"])
    if kind == "unknown_id":
        while True:
            mid = int(rng.integers(0, 65536))
            if mid not in KNOWN_IDS:
                break
        at = int(rng.integers(0, len(msgs) + 1))
        msgs.insert(at, u16(mid) + rng.bytes(int(rng.integers(0, 80))))
    elif kind in ("meta", "utf8"):
        i = int(rng.choice(img_idx))
        head, attr, data = split_image(msgs[i])
        attr = bytearray(attr)
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(0, len(attr)))
            attr[pos] = int(rng.integers(128, 256)) if kind == "utf8" else int(rng.choice(list(b"<>&/\"'\0x")))
        msgs[i] = image_msg(head, bytes(attr), data)
    elif kind == "data_len":
        i = int(rng.choice(img_idx))
        head, attr, data = split_image(msgs[i])
        k = int(rng.integers(1, 2000))
        data = data[:-k] if rng.random() < 0.5 else data + rng.bytes(k)
        msgs[i] = image_msg(head, attr, data)
    elif kind == "absurd":
        i = int(rng.choice(img_idx))
        m = bytearray(msgs[i])
        which = rng.integers(0, 3)
        if which == 0:
            struct.pack_into("<Q", m, 200, int(rng.integers(MAX_ATTR + 1, 1 << 62)))
        elif which == 1:
            struct.pack_into("<3H", m, 18, *[int(v) for v in rng.integers(1024, 65536, 3)])
        else:
            m = bytearray(struct.pack("<HI", int(rng.choice([2, 3, 5])), int(rng.integers(MAX_TEXT + 1, 1 << 32))))
        msgs[i] = bytes(m)
    elif kind == "duplicate":
        i = int(rng.integers(0, len(msgs)))
        msgs.insert(int(rng.integers(0, len(msgs) + 1)), msgs[i])
    elif kind == "text_mid":
        msgs.insert(int(rng.integers(0, len(msgs) + 1)), text_msg(int(rng.choice([2, 3, 5])), rng.bytes(20), nul=False))
    data = bytearray(b"".join(msgs) + u16(CLOSE))
    if kind == "truncate":
        data = data[:int(rng.integers(0, len(data)))]
    elif kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
    elif kind == "delete":
        a = int(rng.integers(0, len(data)))
        data = data[:a] + data[a + int(rng.integers(1, 3000)):]
    return str(kind), bytes(data)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fuzz(servers, header, caplog, protocol):
    """Seeded mutations of valid streams: every framable data message back byte-identical,
    CLOSE, one specific reason when framing was lost; the server serves a clean stream after."""
    caplog.set_level(logging.INFO)
    server = servers[protocol]
    rng = np.random.default_rng(20240611 + PROTOCOLS.index(protocol))
    base = small_stream(8, seed=1)
    pre_len = len(preamble(protocol, header))
    kinds: dict[str, int] = {}
    ends: dict[str, int] = {}
    n_in = n_back = 0
    done = 0
    while done < FUZZ_CASES:
        kind, data = mutate(base, rng)
        _, end = reference_frames(preamble(protocol, header) + data, pre_len)
        if end.startswith("unknown") and int(end.split()[1]) in COMPOUND_IDS:
            continue  # a flip made a Gadgetron compound id: its framing is gadgetron's reader, not ours
        got, end = check_stream(server, header, data, caplog, label=f"{protocol} fuzz case {done} ({kind})")
        kinds[kind] = kinds.get(kind, 0) + 1
        ends[end.split()[0]] = ends.get(end.split()[0], 0) + 1
        n_in += len(base)
        n_back += got
        done += 1
        if done % 50 == 0:
            caplog.clear()
    clean_stream_works(server, header)
    print(f"{protocol}: {done} fuzz cases, {n_back} framable data messages all back byte-identical "
          f"({n_in} valid ones sent before mutation); mutations {kinds}; endings {ends}")


# ---------------------------------------------------------------------------- meta with VNE on
def test_pugixml_meta_with_vne_on(header, tmp_path, caplog):
    """One slice of the simulated exam with every image's meta rewritten in the C++ (pugixml)
    layout (plus an empty value, ``&#65;`` and a trailing NUL), VNE on with a tiny model, both
    protocols: every input back byte-identical (the meta too), and the VNE image made from
    the decoded copies."""
    from vne.runtime.model import load_model
    from vne.runtime.config import PipelineConfig

    _, images = H.sim_stream()
    one = [im for im in images if im.slice == 0]
    msgs = []
    for im in one:
        full = im.to_bytes()
        (alen,) = struct.unpack_from("<Q", full, 198)
        pairs = [(k, "\\".join(str(x) for x in v) if isinstance(v, list) else str(v)) for k, v in im.meta.items()]
        attr = pugixml_meta(pairs + [("VNE_TestEmpty", ""), ("VNE_TestRef", "&#65;")])
        msgs.append(image_msg(full[:198], attr, full[206 + alen:]))
    model_path = H.tiny_model()
    defaults = PipelineConfig(model=str(model_path), cache_dir="none", qc="off")
    model = load_model(str(model_path))
    caplog.set_level(logging.INFO)
    for protocol in PROTOCOLS:
        server = Server(protocol, defaults, model)
        try:
            replies, closed, _ = server.talk(preamble(protocol, header) + b"".join(msgs) + u16(CLOSE), timeout=120)
        finally:
            server.close()
        data = [raw for mid, raw in replies if mid != TEXT]
        back = [raw for raw in data if raw in msgs]
        assert closed and back == msgs, f"{protocol}: {len(back)} of {len(msgs)} back byte-identical"
        vne = [ismrmrd.Image.from_bytes(raw[2:]) for raw in data if raw not in msgs]
        assert len(vne) == 1 and vne[0].image_series_index == 1004, protocol
        assert not any("cannot be decoded" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- vne serve subprocess
def start_serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, Path]:
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    f = open(log_path, "w")
    proc = subprocess.Popen([PY, "-m", "vne.cli", "serve", "--port", "0", "--no-warmup", *args],
                            stdout=f, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if m:
            return proc, int(m.group(1)), log_path
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"vne serve did not start: {log_path.read_text()[-2000:]}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sigterm_with_an_idle_client_stops_within_the_grace(tmp_path, header, protocol):
    """``vne serve`` with one client connected and idle (its first images sent, no CLOSE):
    SIGTERM closes the listener; after the 1 s grace the idle stream is ended like a stream
    without CLOSE (its images already back, then CLOSE); exit code 0 and one log line with
    the counts, well within the bound (grace + finish window)."""
    proc, port, log_path = start_serve(tmp_path, "--protocol", protocol, "--shutdown-grace", "1", "-p", "enabled=false",
                                       "--cache-dir", "none")
    msgs = small_stream(4, seed=3)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(preamble(protocol, header) + b"".join(msgs))
        r = Replies(sock)
        while len([1 for mid, _ in r.frames if mid != TEXT]) < len(msgs) and not r.closed:
            r.until(len(r.frames) + 1)
        assert [raw for mid, raw in r.frames if mid != TEXT] == msgs
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        r.until()
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    print(f"{protocol}: SIGTERM with an idle client: exit {rc} after {took:.2f} s")
    assert rc == 0, text[-3000:]
    assert took < 1 + 10 + 5, f"stopped after {took:.1f} s"  # grace + finish window + slack
    assert "stopped by SIGTERM after 1 connection(s); 1 connection(s) open at the stop request: 0 finished, " \
           "1 idle closed, 0 cut" in text, text[-3000:]
    assert "server stopping: idle after the 1 s grace" in text
    assert r.closed, "the idle stream was not ended with CLOSE"
    assert [raw for mid, raw in r.frames if mid != TEXT] == msgs  # nothing else (VNE is off)


def test_sigterm_cuts_a_stream_inside_a_message_and_exits_non_zero(tmp_path, header):
    """One client idle, one stopped in the middle of an image: after the grace the idle one is
    closed, the other cut; exit code 3 (streams were cut), the log says which."""
    proc, port, log_path = start_serve(tmp_path, "--shutdown-grace", "1", "-p", "enabled=false", "--cache-dir", "none")
    msgs = small_stream(4, seed=4)
    socks = []
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(idle)
        idle.sendall(preamble("gadgetron", header) + b"".join(msgs))
        assert len(Replies(idle).until(len(msgs))) == len(msgs)
        busy = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(busy)
        busy.sendall(preamble("gadgetron", header) + msgs[0] + msgs[1][:100])
        assert len(Replies(busy).until(1)) == 1
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert rc == 3, text[-3000:]
    assert "2 connection(s) open at the stop request: 0 finished, 1 idle closed, 1 cut" in text, text[-3000:]
    assert "cut by the stop (it was inside a message)" in text


def test_kill_right_after_close_keeps_the_acknowledged_cache_write(tmp_path, header):
    """The cine connection's study-cache write is on disk before its CLOSE: SIGKILL the server
    the moment CLOSE arrives, and every cine image is in the cache (read by a new process's
    StudyCache)."""
    from vne.io.mrd.header import parse_header, study_key
    from vne.runtime.study_store import StudyCache

    _, images = H.sim_stream()
    cine = [im for im in images if im.image_series_index == 1]
    cache = tmp_path / "cache"
    proc, port, log_path = start_serve(tmp_path, "-p", "enabled=false", "--cache-dir", str(cache))
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        payload = preamble("gadgetron", header) + b"".join(u16(IMAGE) + im.to_bytes() for im in cine) + u16(CLOSE)
        threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
        r = Replies(sock)
        got = r.until()
        proc.kill()  # the moment CLOSE is read
        proc.wait(30)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert r.closed and len(got) == len(cine)
    s = study_key(parse_header(header))
    back = StudyCache(cache).get(study_uid=s[0], frame_of_reference_uid=s[1])
    assert len(back) == len(cine), f"{len(back)} of {len(cine)} cine images in the cache after a kill at CLOSE"


# ---------------------------------------------------------------------------- more cases
def image_array_msg() -> bytes:
    """A Gadgetron IMAGE_ARRAY (id 1024) as gadgetron.types writes it."""
    import io

    from gadgetron.types.image_array import ImageArray, write_image_array

    class W:
        def __init__(self):
            self.b = io.BytesIO()

        def write(self, data):
            self.b.write(bytes(data))

    heads = np.empty((2, 1, 1), dtype=object)
    for i in range(2):
        h = ismrmrd.ImageHeader()
        h.image_index = i + 1
        heads[i, 0, 0] = h
    data = (np.arange(2 * 4 * 4, dtype=np.float32) + 1j).astype(np.complex64).reshape(4, 4, 1, 1, 2, 1, 1)
    arr = ImageArray(data=data, headers=heads, meta=['<?xml version="1.0"?>\n<ismrmrdMeta/>\n'] * 2)
    w = W()
    write_image_array(w, arr)
    return w.b.getvalue()


def test_gadgetron_image_array_passes_by_bytes(servers, header, caplog):
    """A Gadgetron compound message (IMAGE_ARRAY, id 1024) among images: framed by gadgetron's
    own reader, passed on byte-identical, the stream goes on."""
    pytest.importorskip("gadgetron.types.image_array")
    caplog.set_level(logging.INFO)
    msgs = small_stream(4, seed=5)
    arr = image_array_msg()
    sent = msgs[:2] + [arr] + msgs[2:]
    sock = socket.create_connection(("127.0.0.1", servers["gadgetron"].port), timeout=30)
    me = "%s:%d" % sock.getsockname()[:2]
    sock.sendall(preamble("gadgetron", header) + b"".join(sent) + u16(CLOSE))
    back = b""
    while chunk := sock.recv(1 << 16):  # the server closes after its CLOSE
        back += chunk
    sock.close()
    assert back == b"".join(sent) + u16(CLOSE), "the image array and every image come back byte-identical, in order"
    assert reasons_for(caplog, me) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_absurd_header_length_is_refused_then_the_next_connection_is_served(servers, caplog, protocol):
    """A HEADER declaring 2^31 bytes is refused before anything is read or allocated: one log
    line names the length and the limit, the client gets CLOSE, the next connection is served."""
    caplog.set_level(logging.INFO)
    server = servers[protocol]
    first = text_msg(2, "<configuration/>") if protocol == "gadgetron" else config_file("vne")
    replies, closed, me = server.talk(first + struct.pack("<HI", 3, 1 << 31) + b"<ismrmrdHeader>" * 100)
    assert closed and [mid for mid, _ in replies if mid != TEXT] == []
    lines = reasons_for(caplog, me)
    assert len([m for m in lines if "HEADER declares 2147483648 bytes, over the limit of 1048576 bytes" in m]) == 1, lines
    clean_stream_works(server, header_xml())


@pytest.mark.parametrize("fault", ["clean", "unknown id mid-stream"])
def test_gadget_on_a_gadgetron_external_connection(header, caplog, fault):
    """Execute mode's path: the gadget function on a real ``gadgetron.external.Connection``
    (which reads CONFIG and HEADER itself) takes the socket over and passes every message by
    bytes, pugixml meta included; exactly one CLOSE comes back (ours; the connection's own
    close at the end of ``with`` sends none)."""
    pytest.importorskip("gadgetron.external")
    from gadgetron.external import Connection

    from gadgets.vne_gadget import gadget
    from vne.runtime.config import PipelineConfig

    caplog.set_level(logging.INFO)
    msgs = small_stream()
    data = FAULTS[fault](msgs)
    frames, end = reference_frames(data)
    expected = b"".join(raw for mid, raw in frames if mid in DATA_IDS) + u16(CLOSE)
    srv = H.listen_local()
    port = srv.getsockname()[1]
    errors = []
    sock = None

    def gadget_side():
        try:
            with Connection(socket.create_connection(("127.0.0.1", port), 30)) as conn:
                gadget(conn, PipelineConfig(enabled=False, cache_dir="none"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            if sock is not None:
                sock.close()

    t = threading.Thread(target=gadget_side, daemon=True)
    t.start()
    sock, _ = srv.accept()
    srv.close()
    sock.settimeout(30)
    threading.Thread(target=sock.sendall, args=(preamble("gadgetron", header) + data,), daemon=True).start()
    back = b""
    while chunk := sock.recv(1 << 16):
        back += chunk
    sock.close()
    t.join(30)
    assert not t.is_alive() and not errors, errors
    assert back == expected, f"{fault}: {len(back)} bytes back, expected {len(expected)} ({end})"
    lines = [r.getMessage() for r in caplog.records if "input not read further" in r.getMessage()]
    assert len(lines) == (0 if end == "close" else 1) and (end == "close" or "unknown message id 999" in lines[0])
