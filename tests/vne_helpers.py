"""Shared helpers for the gadget / pipeline / infer tests (imported by the test modules).

Everything expensive is made once per test process (``functools.lru_cache``), whichever test
module asks first:

- :func:`sim_dir`: ``vne simulate --cases 1 --seed 1 --dicom --no-cache`` through the real CLI
  (one small case: 3 slices, 129 ISMRMRD images, DICOM folders);
- :func:`tiny_model`: a small randomly initialised ``training.networks.VNEGenerator`` (tiny
  widths) exported with ``training.export.write_onnx`` (the project's exporter, torchscript
  tracer) and the ``vne_contract`` metadata; variants the project exporter cannot trace (8 IR
  images) go through ``torch.onnx.export`` here, and if ``training`` cannot be imported a tiny
  torch module with the same four named inputs and the ``vne`` output is used. The weights
  are random: these tests check the data path, not the image quality.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
from html import escape
import importlib
import io
import shutil
import socket
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="vne-test-"))
# the shared simulated exam and models live for the test process only (about 40 MB)
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def sim_dir() -> Path:
    from vne.cli import main

    out = _TMP / "sim"
    assert main(["simulate", "--cases", "1", "--seed", "1", "--out", str(out), "--dicom", "--no-cache"]) == 0
    return out


def sim_h5() -> Path:
    return next((sim_dir() / "mrd").glob("*.h5"))


def sim_dicom() -> Path:
    return next((sim_dir() / "dicom").iterdir())


@functools.lru_cache(maxsize=None)
def sim_stream() -> tuple[str, list]:
    """(header XML, images in scanner order) of the simulated case."""
    from vne.io.mrd.hdf5 import read_mrd_file

    return read_mrd_file(sim_h5())


def _export_torch(module, path: Path, n_cine: int, n_ir: int) -> None:
    import torch

    h = w = 32
    x = (torch.rand(1, n_cine, h, w), torch.rand(1, n_ir, h, w), torch.rand(1, n_ir) * 1000,
         torch.rand(1, 1, h, w) * 1000)
    spatial = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _onnx_export(torch, module, x, path, spatial)


def _onnx_export(torch, module, x, path, spatial) -> None:
    torch.onnx.export(module.eval(), x, str(path), input_names=["cine", "ir", "ir_ti_ms", "t1_map_ms"],
                      output_names=["vne"], opset_version=17, dynamo=False,
                      dynamic_axes={"cine": spatial, "ir": spatial, "ir_ti_ms": {0: "batch"}, "t1_map_ms": spatial,
                                    "vne": spatial})


def _fallback_module(n_cine: int, n_ir: int):
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(n_cine + n_ir + 1, 1, 3, padding=1)

        def forward(self, cine, ir, ir_ti_ms, t1_map_ms):
            t1 = (t1_map_ms - 1000.0) / 500.0
            z = torch.cat([cine / (cine.abs().mean() + 1e-6), ir / (ir.abs().mean() + 1e-6), t1], dim=1)
            return self.conv(z) + 0.0 * ir_ti_ms.mean()

    return Tiny(), 1


def set_contract(path: Path, contract_json: str | None) -> None:
    """Write (or remove, with None) the ``vne_contract`` metadata of an ONNX file."""
    import onnx

    m = onnx.load(str(path))
    keep = [p for p in m.metadata_props if p.key != "vne_contract"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    if contract_json is not None:
        m.metadata_props.add(key="vne_contract", value=contract_json)
    onnx.save(m, str(path))


@functools.lru_cache(maxsize=None)
def tiny_model(n_ir_images: int = 7, name: str = "vne-sim-test", version: str = "0.0.1") -> Path:
    """A tiny random VNE model (ONNX) with its contract; cached per (n_ir_images, name, version)."""
    from vne.prepare.contract import ModelContract

    torch_seed = 0
    import torch

    torch.manual_seed(torch_seed)
    out = _TMP / f"{name}-{version}-ir{n_ir_images}.onnx"
    pad = 8
    try:
        export = importlib.import_module("training.export")
    except ImportError:
        export = None
    try:
        from training.networks import GeneratorConfig, VNEGenerator

        g = VNEGenerator(GeneratorConfig(n_ir_images=n_ir_images, base_channels=4, depth=2, fusion_channels=8,
                                         head_channels=4, film_hidden=8)).eval()
        pad = g.pad_multiple
    except ImportError:
        VNEGenerator = None
        g, pad = _fallback_module(25, n_ir_images)
    if export is not None and hasattr(export, "write_onnx") and n_ir_images == 7 and VNEGenerator is not None:
        export.write_onnx(g, out, exporter="torchscript")  # the project's exporter (fast tracer)
    else:
        _export_torch(g, out, 25, n_ir_images)
    set_contract(out, ModelContract(n_ir_images=n_ir_images, pad_multiple=pad, model_name=name,
                                    model_version=version).to_json())
    return out


def copy_model(dst: Path, **kw) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_model(**kw), dst)
    return dst


# ---------------------------------------------------------------------------- the Gadgetron side
def config_xml(**props) -> str:
    body = "".join(f'<property name="{escape(k)}" value="{escape(str(v))}"/>' for k, v in props.items())
    return f"<configuration>{body}</configuration>"


def listen_local() -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(60)
    return srv


def run_in_thread(header: str, images: list, config: str, **kw) -> tuple[list, object]:
    """Gadgetron's side on one end of a real TCP connection, the real gadget (``gadgetron.external.Connection``
    + ``gadgets.vne_gadget.gadget``) on the other, in a thread. Returns (received, pipeline)."""
    from gadgetron.external import Connection

    from gadgets.vne_gadget import gadget

    srv = listen_local()
    port = srv.getsockname()[1]
    box = {}

    def gadget_side():
        with Connection(socket.create_connection(("127.0.0.1", port), 30)) as conn:
            box["pipeline"] = gadget(conn)

    t = threading.Thread(target=gadget_side, daemon=True)
    t.start()
    sock, _ = srv.accept()
    srv.close()
    try:
        received = play_gadgetron(sock, header, images, config, **kw)
    finally:
        sock.close()
    t.join(60)
    assert not t.is_alive(), "gadget did not return"
    p = box["pipeline"]
    if p.cache_thread is not None:
        p.cache_thread.join()
    return received, p


def image_bytes(img) -> bytes:
    return img.to_bytes()


def play_gadgetron(sock: socket.socket, header_xml: str, images: list, config_xml: str = "<configuration/>",
                   *, close: bool = True, timeout: float = 120.0, int32_safe: bool = False) -> list:
    """Play Gadgetron's side of an external-gadget connection on a connected socket.

    Sends CONFIG (text), HEADER, every image and CLOSE with ``ismrmrd.serialization`` (from a
    second thread, as Gadgetron's input and output channels run concurrently), and reads every
    reply until the gadget's CLOSE. With ``close=False`` the write side is shut down after
    the images instead of sending CLOSE (a stream that drops mid-study). An item given as
    ``bytes`` is sent as a raw IMAGE message body (how a C++ peer sends a 4-byte int32
    image, which ``ismrmrd`` for Python cannot represent); ``int32_safe`` reads the replies
    with :func:`vne.io.framing.read_image_safely` (such images come back as ``RawImage``).

    Returns:
        every image received, in order.
    """
    from ismrmrd.serialization import ConfigText, ProtocolDeserializer, ProtocolSerializer

    from vne.io.mrd.header import parse_header

    sock.settimeout(timeout)
    errors: list[BaseException] = []

    class _W:
        def write(self, b):
            sock.sendall(bytes(b))

        def flush(self):
            pass

    def send():
        try:
            ser = ProtocolSerializer(_W())
            ser.serialize(ConfigText(config_xml))
            ser.serialize(parse_header(header_xml))
            for im in images:
                if isinstance(im, bytes):
                    sock.sendall(b"\xfe\x03" + im)  # message id 1022 (IMAGE), little endian
                else:
                    ser.serialize(im)
            if close:
                ser.close()
            else:
                sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # surfaced by the caller
            errors.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    received = []
    reader = sock.makefile("rb")
    try:
        for item in (_read_int32_safe(reader) if int32_safe else ProtocolDeserializer(reader).deserialize()):
            received.append(item)
    except EOFError:
        if close:
            raise
    t.join(timeout)
    if errors:
        raise errors[0]
    return received


def _read_int32_safe(reader):
    import struct

    from vne.io.framing import read_image_safely

    while True:
        mid = reader.read(2)
        if len(mid) < 2:
            raise EOFError("no CLOSE")
        (mid,) = struct.unpack("<H", mid)
        if mid == 4:
            return
        if mid != 1022:
            raise ValueError(f"unexpected message {mid}")
        yield read_image_safely(reader)


def split_outputs(received: list, input_series: set[int]) -> tuple[list, list]:
    """(pass-through images, VNE images) of a reply, by image_series_index."""
    import ismrmrd

    ims = [r for r in received if isinstance(r, ismrmrd.Image)]
    return [r for r in ims if r.image_series_index in input_series], [r for r in ims if r.image_series_index not in input_series]


def serialized(images) -> list[bytes]:
    buf = []
    for im in images:
        b = io.BytesIO()
        im.serialize_into(b.write)
        buf.append(b.getvalue())
    return buf


def geometry_fields(img) -> tuple:
    return (tuple(np.round(img.position, 4)), tuple(np.round(img.read_dir, 5)), tuple(np.round(img.phase_dir, 5)),
            tuple(np.round(img.slice_dir, 5)), tuple(np.round(img.field_of_view, 4)), tuple(img.matrix_size),
            int(img.slice))


@contextlib.contextmanager
def mrd_server_thread(defaults, model, options):
    """``vne.runtime.mrd_server.serve`` on 127.0.0.1 (ephemeral port) in a thread; yields the port and
    stops the server (waiting for its connections) on exit."""
    from vne.runtime import mrd_server
    from vne.commands.serve import bind

    srv = bind("127.0.0.1", 0)
    port = srv.getsockname()[1]
    stop = threading.Event()
    t = threading.Thread(target=mrd_server.serve, args=(srv, defaults, model, options), kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        t.join(30)
