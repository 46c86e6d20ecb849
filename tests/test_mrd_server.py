"""``vne serve --protocol mrd`` (vne/runtime/mrd_server.py, vne/io/framing.py) over real TCP sockets on 127.0.0.1.

The server is the real one (:func:`vne.runtime.mrd_server.serve` on an ephemeral port, in a thread, or
``vne serve --protocol mrd`` as a subprocess). The client in these tests is our own code
speaking the documented MRD wire format (python-ismrmrd-server's ``connection.py`` /
``constants.py``): uint16 message ids, CONFIG_FILE as 1024 NUL-padded bytes, length-prefixed
texts, images as ImageHeader + uint64 attribute length + attributes + data. No real MRD client
(python-ismrmrd-server's ``client.py``, ``gadgetron_ismrmrd_client``) runs in the default suite;
:func:`test_real_python_ismrmrd_server_client` runs ``client.py`` when ``VNE_MRD_CLIENT_DIR``
names a python-ismrmrd-server checkout. The reply parser below is written independently of
:mod:`vne.io.framing` so that byte-identity is not checked by the code under test.

The exam is one simulated case from ``vne simulate`` (tests/vne_helpers.py) and the model a tiny
random one: the data path is checked, not the image content.
"""
from __future__ import annotations

import io
import os
import re
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

T1_SERIES = 4
VNE_SERIES = 1000 + T1_SERIES
IMAGE, ACQ, WAVE, TEXT, CLOSE = 1022, 1008, 1026, 5, 4
TRAJ_DIM_OFFSET = 176  # AcquisitionHeader.trajectory_dimensions


# ---------------------------------------------------------------------------- our MRD client
def config_file(name: str) -> bytes:
    return struct.pack("<H", 1) + name.encode().ljust(1024, b"\0")


def text_msg(msg_id: int, text: str) -> bytes:
    body = text.encode() + b"\0"
    return struct.pack("<HI", msg_id, len(body)) + body


def image_msg(im) -> bytes:
    return struct.pack("<H", IMAGE) + im.to_bytes()


def acquisition_msg() -> bytes:
    acq = ismrmrd.Acquisition.from_array(np.arange(32, dtype=np.float32).view(np.complex64).reshape(2, 8))
    acq.scan_counter = 7
    return struct.pack("<H", ACQ) + acq.to_bytes()


def waveform_msg() -> bytes:
    w = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(2, 6))
    return struct.pack("<H", WAVE) + w.to_bytes()


_SIZES = {1: 2, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16}


def _exact(f, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise EOFError(f"reply ended: wanted {n} bytes, got {len(b)}")
    return b


def read_replies(f) -> list[tuple[int, bytes]]:
    """Every reply message as (id, exact bytes), up to and including CLOSE."""
    out = []
    while True:
        idb = _exact(f, 2)
        (mid,) = struct.unpack("<H", idb)
        if mid == CLOSE:
            out.append((mid, idb))
            return out
        if mid in (2, 3, TEXT):
            lb = _exact(f, 4)
            body = _exact(f, struct.unpack("<I", lb)[0])
            out.append((mid, idb + lb + body))
        elif mid == IMAGE:
            hb = _exact(f, 198)
            dtype, = struct.unpack_from("<H", hb, 2)
            nx, ny, nz = struct.unpack_from("<3H", hb, 16)
            ch, = struct.unpack_from("<H", hb, 34)
            lb = _exact(f, 8)
            attr = _exact(f, struct.unpack("<Q", lb)[0])
            data = _exact(f, nx * ny * nz * ch * _SIZES[dtype])
            out.append((mid, idb + hb + lb + attr + data))
        elif mid == ACQ:
            hb = _exact(f, 340)
            ns, = struct.unpack_from("<H", hb, 34)   # number_of_samples
            nc, = struct.unpack_from("<H", hb, 38)   # active_channels
            nt, = struct.unpack_from("<H", hb, TRAJ_DIM_OFFSET)
            out.append((mid, idb + hb + _exact(f, ns * nt * 4 + ns * nc * 8)))
        elif mid == WAVE:
            hb = _exact(f, 40)
            ns, ch = struct.unpack_from("<2H", hb, 28)  # number_of_samples, channels
            out.append((mid, idb + hb + _exact(f, ns * ch * 4)))
        else:
            raise AssertionError(f"unexpected reply message id {mid}")


def talk(port: int, messages: list[bytes], timeout: float = 180.0, tolerate_send_errors: bool = False):
    """Connect, send ``messages`` from a second thread (as client.py sends while it reads),
    read every reply until CLOSE. Returns [(id, bytes)]."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    errors: list[BaseException] = []

    def send():
        try:
            for m in messages:
                sock.sendall(m)
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        replies = read_replies(sock.makefile("rb"))
    finally:
        t.join(timeout)
        sock.close()
    if errors and not tolerate_send_errors:
        raise errors[0]
    return replies


def texts(replies) -> list[str]:
    return [raw[6:].split(b"\0", 1)[0].decode() for mid, raw in replies if mid == TEXT]


def decoded(raw: bytes):
    return ismrmrd.Image.from_bytes(raw[2:])


def split_back(replies, inputs: list[bytes]):
    """(inputs came back in order, byte-identical; the extra IMAGE replies) — fails otherwise."""
    i = 0
    extra = []
    for mid, raw in replies:
        if mid in (TEXT, CLOSE):
            continue
        if i < len(inputs) and raw == inputs[i]:
            i += 1
            continue
        assert mid == IMAGE, f"reply {mid} is neither the next input nor an image"
        extra.append(raw)
    assert i == len(inputs), f"only {i} of {len(inputs)} inputs came back byte-identical and in order"
    return extra


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stream():
    return H.sim_stream()


@pytest.fixture(scope="module")
def server():
    """The MRD server in a thread on 127.0.0.1:<ephemeral>, tiny model, no study cache, small limits."""
    from vne.runtime import mrd_server
    from vne.io.framing import FrameLimits
    from vne.runtime.model import load_model
    from vne.runtime.config import PipelineConfig

    model_path = H.tiny_model()
    # qc off: the model is random, its output would not pass the quality guard (vne.runtime.qc); the data path is tested
    defaults = PipelineConfig(model=str(model_path), cache_dir="none", qc="off")
    model = load_model(str(model_path))
    opts = mrd_server.ServerOptions(limits=FrameLimits(max_text=1 << 20, max_attributes=1 << 20, max_data=64 << 20),
                                    read_timeout_s=60.0, max_active=4, linger_s=1.0)
    with H.mrd_server_thread(defaults, model, opts) as port:
        yield port


def _slice0(images):
    return [im for im in images if im.slice == 0]


# ---------------------------------------------------------------------------- tests
def test_vne_exam_over_mrd(server, stream):
    """Whole exam, config ``vne``. The client is our own code speaking the documented MRD wire
    format (no real MRD client can run here): CONFIG_FILE vne, HEADER, every image of the exam with
    an ACQUISITION and a WAVEFORM among them, CLOSE. Every input comes back byte-identical and
    in order, the VNE series (1004) is added, CLOSE is last."""
    from test_gadget_protocol import check_vne_images

    header, images = stream
    data = [image_msg(im) for im in images]
    data.insert(1, acquisition_msg())
    data.insert(10, waveform_msg())
    replies = talk(server, [config_file("vne"), text_msg(3, header)] + data + [struct.pack("<H", CLOSE)])
    assert replies[-1] == (CLOSE, b"\x04\x00")
    assert [m for m, _ in replies].count(CLOSE) == 1
    extra = split_back(replies, data)
    vne = [decoded(raw) for raw in extra]
    check_vne_images(vne, images, 3)
    # each VNE image follows its own T1 map
    order = [(im.image_series_index, im.slice) for im in (decoded(raw) for mid, raw in replies if mid == IMAGE)]
    for v in vne:
        assert order.index((VNE_SERIES, v.slice)) > order.index((T1_SERIES, v.slice))
    assert any("3 VNE image(s) in series 1004" in t for t in texts(replies)), texts(replies)
    assert all(t[:8].strip() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for t in texts(replies))


@pytest.mark.parametrize("how", ["config_text_json", "text_after_header"])
def test_json_config_selects_vne(server, stream, how):
    """``parameters.config`` = ``vne`` in JSON: as CONFIG_TEXT, or (python-ismrmrd-server's
    configAdditional) as a TEXT right after HEADER overriding a CONFIG_FILE name; a VNE parameter
    (pixel_type) in the same JSON is applied. Our own client speaking the documented wire format
    (no real MRD client can run here)."""
    header, images = stream
    one = _slice0(images)
    data = [image_msg(im) for im in one]
    js = '{"parameters": {"config": "vne", "pixel_type": "uint16", "sendoriginal": true}}'
    if how == "config_text_json":
        start = [text_msg(2, js), text_msg(3, header)]
    else:
        start = [config_file("invertcontrast"), text_msg(3, header), text_msg(TEXT, js)]
    replies = talk(server, start + data + [struct.pack("<H", CLOSE)])
    assert replies[-1][0] == CLOSE
    vne = [decoded(raw) for raw in split_back(replies, data)]
    assert len(vne) == 1 and vne[0].image_series_index == VNE_SERIES and vne[0].data.dtype == np.uint16


def test_other_config_passes_everything_back(server, stream):
    """Config ``invertcontrast``: no VNE, a TEXT saying VNE was not requested, every input
    (images, acquisition, waveform) back byte-identical and in order, CLOSE last. Our own client
    speaking the documented wire format (no real MRD client can run here)."""
    header, images = stream
    data = [image_msg(im) for im in images[:6]] + [acquisition_msg(), waveform_msg()]
    replies = talk(server, [config_file("invertcontrast"), text_msg(3, header)] + data + [struct.pack("<H", CLOSE)])
    assert replies[-1][0] == CLOSE
    assert split_back(replies, data) == []
    assert [raw for mid, raw in replies if mid not in (TEXT, CLOSE)] == data
    assert any("VNE was not requested" in t and "invertcontrast" in t for t in texts(replies)), texts(replies)


def test_corrupt_image_meta_costs_vne_only(server, stream):
    """An image whose attribute XML is broken: it still comes back byte-identical (as do all
    others, in order), and a TEXT names it as not decodable. Our own client speaking the
    documented wire format (no real MRD client can run here)."""
    header, images = stream
    one = _slice0(images)[:8]
    good = images[0].to_bytes()
    head = good[:198]
    attr = b"<ismrmrdMeta><meta><name>broken</name><value>"  # never closed
    bad = struct.pack("<H", IMAGE) + head + struct.pack("<Q", len(attr)) + attr + images[0].data.tobytes()
    data = [bad] + [image_msg(im) for im in one]
    replies = talk(server, [config_file("vne"), text_msg(3, header)] + data + [struct.pack("<H", CLOSE)])
    assert replies[-1][0] == CLOSE
    assert split_back(replies, data) == []
    s = images[0]
    want = f"IMAGE series {s.image_series_index} index {s.image_index} (message 3) cannot be decoded"
    assert any(want in t and "passed back unchanged" in t for t in texts(replies)), texts(replies)


def test_unknown_message_id_mid_stream(server, stream):
    """Message id 999 after three images: those three come back byte-identical, then a TEXT
    naming the unknown id, then CLOSE; nothing after it can be framed. Our own client speaking
    the documented wire format (no real MRD client can run here)."""
    header, images = stream
    before = [image_msg(im) for im in images[:3]]
    after = [image_msg(im) for im in images[3:6]]
    msgs = [config_file("vne"), text_msg(3, header)] + before + [struct.pack("<H", 999) + b"\x01" * 64] + after \
        + [struct.pack("<H", CLOSE)]
    replies = talk(server, msgs, tolerate_send_errors=True)
    assert replies[-1][0] == CLOSE
    assert [raw for mid, raw in replies if mid == IMAGE] == before
    err = [t for t in texts(replies) if "unknown message id 999" in t]
    assert err and err[0].startswith("ERROR") and "message 6" in err[0] and "passed back" in err[0], texts(replies)


def test_declared_length_over_limit_then_next_connection(server, stream):
    """An image declaring 2**40 attribute bytes (over the server's 1 MiB limit) is not read or
    allocated: the images before it come back, a TEXT names the limit, CLOSE; the same server
    then serves the next connection. Our own client speaking the documented wire format (no real
    MRD client can run here)."""
    header, images = stream
    before = [image_msg(im) for im in images[:2]]
    huge = struct.pack("<H", IMAGE) + images[2].to_bytes()[:198] + struct.pack("<Q", 1 << 40)
    replies = talk(server, [config_file("vne"), text_msg(3, header)] + before + [huge], tolerate_send_errors=True)
    assert replies[-1][0] == CLOSE
    assert [raw for mid, raw in replies if mid == IMAGE] == before
    assert any("declares 1099511627776 bytes, over the limit of 1048576 bytes" in t for t in texts(replies)), texts(replies)
    # a text over the limit, then the server still works
    replies = talk(server, [config_file("vne"), struct.pack("<HI", 3, 1 << 30)], tolerate_send_errors=True)
    assert replies[-1][0] == CLOSE and any("HEADER declares 1073741824 bytes" in t for t in texts(replies))
    data = [image_msg(images[0])]
    replies = talk(server, [config_file("other"), text_msg(3, header)] + data + [struct.pack("<H", CLOSE)])
    assert [raw for mid, raw in replies if mid == IMAGE] == data and replies[-1][0] == CLOSE


def test_busy_cap_and_read_timeout(stream):
    """A server with one slot and a 1.5 s read timeout: a second connection gets a TEXT "busy"
    and CLOSE; the idle first one gets a TEXT read timeout and CLOSE (never a dropped connection).
    Our own client speaking the documented wire format (no real MRD client can run here)."""
    from vne.runtime import mrd_server
    from vne.commands.serve import bind

    header, _ = stream
    srv = bind("127.0.0.1", 0)
    port = srv.getsockname()[1]
    opts = mrd_server.ServerOptions(read_timeout_s=1.5, max_active=1, linger_s=0.5)
    stop = threading.Event()
    t = threading.Thread(target=mrd_server.serve, args=(srv, None, None, opts), kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        first = socket.create_connection(("127.0.0.1", port), timeout=30)
        first.sendall(config_file("other") + text_msg(3, header))
        time.sleep(0.3)  # accepted and holding the only slot
        busy = talk(port, [config_file("vne"), text_msg(3, header)], tolerate_send_errors=True)
        assert busy[-1][0] == CLOSE and any("server busy" in t for t in texts(busy)), texts(busy)
        idle = read_replies(first.makefile("rb"))
        first.close()
        assert idle[-1][0] == CLOSE and any("read timeout" in t for t in texts(idle)), texts(idle)
    finally:
        stop.set()
        t.join(30)


def test_framing_returns_exact_bytes_and_names_unknown_ids():
    """vne.io.framing on a file-like object: each frame's raw bytes are the input bytes exactly."""
    from vne.io import framing as F

    im = ismrmrd.Image.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), transpose=False)
    im.meta = {"a": "1"}
    msgs = [config_file("vne"), text_msg(3, "<x/>"), image_msg(im), acquisition_msg(), waveform_msg(),
            struct.pack("<H", CLOSE)]
    f = io.BytesIO(b"".join(msgs) + struct.pack("<H", 4242))
    got = [F.read_frame(f) for _ in msgs]
    assert [g.raw for g in got] == msgs and got[0].text == "vne" and got[1].text == "<x/>"
    assert F.decode_image(got[2]).meta["a"] == "1"
    with pytest.raises(F.UnknownMessageError, match="unknown message id 4242"):
        F.read_frame(f)
    assert F.read_frame(io.BytesIO(b"")) is None
    with pytest.raises(F.TruncatedError):
        F.read_frame(io.BytesIO(image_msg(im)[:-3]))
    # a C++ peer's 4-byte DATATYPE_INT image: framed by the C size, kept raw for decoding
    head = ismrmrd.ImageHeader.from_buffer_copy(im.to_bytes()[:198])
    head.data_type = ismrmrd.DATATYPE_INT
    int32 = struct.pack("<H", IMAGE) + bytes(head) + struct.pack("<Q", 0) + np.arange(12, dtype=np.int32).tobytes()
    fr = F.read_frame(io.BytesIO(int32 + struct.pack("<H", CLOSE)))
    assert fr.raw == int32 and fr.data_len == 48
    from vne.io.framing import RawImage

    assert isinstance(F.decode_image(fr), RawImage)


def test_vne_serve_protocol_mrd_subprocess(stream, tmp_path):
    """``vne serve --protocol mrd --port 0`` as a real process: it prints where it listens and
    serves a pass-through connection (our own client speaking the documented wire format; no
    real MRD client can run here)."""
    header, images = stream
    proc = subprocess.Popen([sys.executable, "-m", "vne.cli", "serve", "--protocol", "mrd", "--port", "0", "--model",
                             str(H.tiny_model()), "--no-warmup", "--cache-dir", "none", "--max-connections", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 120
        while "listening on" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(MRD protocol", line)
        assert m, line
        data = [image_msg(images[0]), acquisition_msg()]
        replies = talk(int(m.group(1)), [config_file("null"), text_msg(3, header)] + data + [struct.pack("<H", CLOSE)])
        assert [raw for mid, raw in replies if mid not in (TEXT, CLOSE)] == data and replies[-1][0] == CLOSE
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_real_python_ismrmrd_server_client(server, stream, tmp_path):
    """python-ismrmrd-server's own ``client.py`` (a real MRD client) against the server, when
    ``VNE_MRD_CLIENT_DIR`` names a checkout of github.com/kspaceKelvin/python-ismrmrd-server:
    it sends the simulated exam's HDF5 file with config ``vne`` and stores what comes back."""
    d = os.environ.get("VNE_MRD_CLIENT_DIR")
    if not d or not (Path(d) / "client.py").is_file():
        pytest.skip("set VNE_MRD_CLIENT_DIR to a python-ismrmrd-server checkout to run its client.py")
    from vne.io.mrd.hdf5 import read_mrd_file

    out = tmp_path / "out.h5"
    r = subprocess.run([sys.executable, str(Path(d) / "client.py"), str(H.sim_h5()), "-a", "127.0.0.1", "-p",
                        str(server), "-c", "vne", "-o", str(out), "-G", "dataset"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    header, images = stream
    _, back = read_mrd_file(out)
    key = lambda ims: sorted(H.serialized([i for i in ims if i.image_series_index < 1000]))  # noqa: E731
    assert key(back) == key(images)
    assert len([i for i in back if i.image_series_index == VNE_SERIES]) == 3
