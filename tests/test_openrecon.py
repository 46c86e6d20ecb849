"""OpenRecon packaging (docker/openrecon/), the python-ismrmrd-server module (gadgets/vne_mrd.py) and
the MRD client ``vne stream --protocol mrd`` (vne/commands/stream.py) — issue 10, parts 2 to 4.

- The label (``docker/openrecon/label.json``) is checked against ``schema-1.1.0.json``, which is
  NOT Siemens' official file: it was written for VNE from public copies of
  ``OpenReconSchema_1.1.0.json`` and public OpenRecon labels (docker/README.md, "OpenRecon").
  ``jsonschema`` is not installed here, so the build script's built-in checker does the work.
- :class:`FakeConnection` is a stand-in for python-ismrmrd-server's ``Connection`` class
  (``connection.py``), because that server is not installed here. It mirrors the names the
  server's modules use, as read in github.com/kspaceKelvin/python-ismrmrd-server at commit
  df45f516ac5e: iteration yields ``ismrmrd.Acquisition`` / ``Image`` / ``Waveform`` items and
  ``str`` TEXT messages, then ``None`` when CLOSE is read (``__iter__``: ``while not
  self.is_exhausted: yield self.next()``); ``send_image(images)`` (one image or a list, ``None``
  skipped), ``send_acquisition``, ``send_waveform``, ``send_logging(level, contents)`` (sends
  ``"%s %s" % (level, contents)``), ``send_close()``. It records what each method was given.
- ``vne stream --protocol mrd`` runs against the real MRD server (:func:`vne.runtime.mrd_server.serve`
  on 127.0.0.1, an ephemeral port, in a thread), through the real CLI.

The exam is one simulated case (tests/vne_helpers.py) and the model a tiny random one: the data
path is checked, not the image content.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import socket
import struct
import sys
import zipfile
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

import vne_helpers as H
from vne.cli import main

REPO = Path(__file__).resolve().parents[1]
OPENRECON = REPO / "docker" / "openrecon"
T1_SERIES = 4
VNE_SERIES = 1000 + T1_SERIES


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_openrecon", OPENRECON / "build_openrecon.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_openrecon"] = mod
    spec.loader.exec_module(mod)
    return mod


B = _load_build_script()


@pytest.fixture
def label() -> dict:
    return B.load_json(OPENRECON / "label.json")


@pytest.fixture(scope="module")
def schema() -> dict:
    return B.load_json(OPENRECON / "schema-1.1.0.json")


@pytest.fixture(scope="module")
def stream():
    return H.sim_stream()


@pytest.fixture(scope="module")
def model():
    from vne.runtime.model import load_model

    return load_model(str(H.tiny_model()))


@pytest.fixture(scope="module")
def defaults():
    from vne.runtime.config import PipelineConfig

    return PipelineConfig(model=str(H.tiny_model()), cache_dir="none")


# ============================================================================ the label
def test_label_validates_against_the_schema_and_its_base64_round_trips(label, schema, capsys):
    assert B.check_schema(label, schema) == []
    errs, how = B.validate(label, schema)
    assert errs == [], (how, errs)
    assert B.check_vne(label) == []
    b64 = B.label_base64(label)
    assert re.fullmatch(r"[A-Za-z0-9+/]+=*", b64)
    assert B.label_from_base64(b64) == label
    assert B.dockerfile_label_line(label) == f'LABEL "{B.LABEL_KEY}"="{b64}"'
    assert B.LABEL_KEY == "com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0"
    # the command line prints exactly that value (for --build-arg OPENRECON_LABEL=...)
    assert B.main(["--print-label"]) == 0
    assert capsys.readouterr().out.strip() == b64
    r = label["reconstruction"]
    assert (r["emitter"], r["injector"], r["port"], r["min_count_required_gpus"]) == ("image", "image", 9002, 0)
    assert r["can_use_gpu"] is True and r["transfer_protocol"] == {"protocol": "ISMRMRD", "version": "1.4.1"}


def test_schema_check_rejects_a_label_without_reconstruction_emitter(label, schema, capsys, tmp_path):
    bad = copy.deepcopy(label)
    del bad["reconstruction"]["emitter"]
    errs = B.check_schema(bad, schema)
    assert any("'emitter' is a required property" in e for e in errs), errs
    assert B.validate(bad, schema)[0]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    assert B.main(["--label", str(f), "--validate-only"]) == 1
    assert "emitter" in capsys.readouterr().err


@pytest.mark.parametrize("mutate, expect", [
    (lambda lb: lb["reconstruction"].__setitem__("emitter", "kspace"), "is not one of"),
    (lambda lb: lb["parameters"][1].__setitem__("id", "pixel_type"), "oneOf"),  # ids: ^[A-Za-z0-9]+$
    (lambda lb: lb["parameters"].extend({"id": f"x{k}", "type": "string", "label": {"en": "x"}} for k in range(5)),
     "more than 14"),
    (lambda lb: lb["general"].__setitem__("version", "1.0"), "does not match"),
    (lambda lb: lb["general"].__setitem__("extra", 1), "additional property 'extra'"),
    (lambda lb: lb["reconstruction"].__setitem__("min_count_required_cpu_cores", 0), "less than the minimum"),
])
def test_schema_check_rejects_other_invalid_labels(label, schema, mutate, expect):
    bad = copy.deepcopy(label)
    mutate(bad)
    errs = B.check_schema(bad, schema)
    assert any(expect in e for e in errs), errs


def test_label_parameters_are_config_and_client_settable_vne_properties(label):
    from gadgets import vne_mrd
    from vne.runtime.config import PROPERTY_DOCS, SERVER_ONLY_PROPERTIES

    ids = [p["id"] for p in label["parameters"]]
    assert ids[0] == "config" and label["parameters"][0]["default"] == "vne"
    settable = {vne_mrd.openrecon_id(p): p for p in vne_mrd.client_settable_properties()}
    assert set(ids[1:]) <= set(settable)
    assert not {vne_mrd.openrecon_id(p) for p in SERVER_ONLY_PROPERTIES} & set(ids)
    assert {"qc", "pixeltype", "outputscale", "enabled"} <= set(ids)
    left_out = sorted(set(settable) - set(ids))
    print(f"client-settable properties not on the scanner card (14 parameters at most): {left_out}")
    assert set(settable.values()) | set(SERVER_ONLY_PROPERTIES) | {"role_<rule>"} == set(PROPERTY_DOCS)
    # VNE's own check refuses a server-only property and an unknown one
    for pid in ("model", "cachedir", "nosuchthing"):
        bad = copy.deepcopy(label)
        bad["parameters"].append({"id": pid, "type": "string", "label": {"en": pid}, "default": ""})
        assert any(f"'{pid}' is not a VNE property a client may set" in e for e in B.check_vne(bad))
    bad = copy.deepcopy(label)
    bad["general"]["version"] = "9.9.9"
    assert any("package version" in e for e in B.check_vne(bad))


def test_openrecon_dockerfile_serves_mrd_on_the_label_port_with_the_label(label):
    from vne.cli import build_parser

    text = (OPENRECON / "Dockerfile").read_text()
    assert f'LABEL "{B.LABEL_KEY}"="${{OPENRECON_LABEL}}"' in text
    assert re.search(r"^ARG OPENRECON_LABEL$", text, flags=re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.M).group(1))
    assert cmd == ["vne", "serve", "--protocol", "mrd", "--host", "0.0.0.0", "--port", "9002"]
    args = build_parser().parse_args(cmd[1:])
    assert (args.protocol, args.host, args.port) == ("mrd", "0.0.0.0", label["reconstruction"]["port"])
    assert B.dockerfile_port() == label["reconstruction"]["port"]
    for line in re.findall(r"^COPY (?!--)(.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
    build, save = B.docker_commands(label, Path("dist/openrecon"))
    assert build[:2] == ["docker", "build"] and f"OPENRECON_LABEL={B.label_base64(label)}" in build
    assert "docker/openrecon/Dockerfile" in build and B.image_name(label) in build
    assert save[-1] == B.image_name(label) and save[-2].endswith(f"{B.base_name(label)}.tar")


# ============================================================================ the zip
def _check_pdf(data: bytes) -> None:
    """Structure of a PDF: header, every xref offset at its object, trailer, %%EOF."""
    assert data.startswith(b"%PDF-1.") and data.rstrip().endswith(b"%%EOF")
    xref_at = int(re.search(rb"startxref\n(\d+)\n", data).group(1))
    assert data[xref_at:].startswith(b"xref\n")
    n = int(re.match(rb"xref\n0 (\d+)\n", data[xref_at:]).group(1))
    offsets = [int(m) for m in re.findall(rb"(\d{10}) 00000 n", data[xref_at:])]
    assert len(offsets) == n - 1
    for k, off in enumerate(offsets, start=1):
        assert data[off:].startswith(f"{k} 0 obj".encode()), k


def test_zip_has_the_documented_staging_layout(label, tmp_path):
    z = B.build_package(label, tmp_path / "out")
    base = "OpenRecon_VNEProject_VNE_V0.1.0"
    assert base == B.base_name(label) and z.name == f"{base}.zip"
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == sorted([f"{base}.pdf", f"{base}.json", "manifest.json"])
        assert json.loads(zf.read(f"{base}.json")) == label
        manifest = json.loads(zf.read("manifest.json"))
        pdf = zf.read(f"{base}.pdf")
    _check_pdf(pdf)
    assert b"VNE for OpenRecon" in pdf
    assert manifest["layout"] == "staging" and manifest["image"] == "openrecon_vneproject_vne:v0.1.0"
    assert manifest["image_tar"] == {"name": f"{base}.tar", "included": False, "how": manifest["image_tar"]["how"]}
    assert "--build-image" in manifest["image_tar"]["how"]
    assert B.label_from_base64(manifest["label_base64"]) == label
    assert {f["name"] for f in manifest["files"]} == {f"{base}.pdf", f"{base}.json"}


def test_zip_with_an_image_tar_has_the_scanner_layout(label, tmp_path):
    fake_tar = tmp_path / "saved.tar"
    fake_tar.write_bytes(b"not really a docker image")
    z = B.build_package(label, tmp_path / "out", image_tar=fake_tar)
    base = B.base_name(label)
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == [f"{base}.pdf", f"{base}.tar"]
        assert zf.read(f"{base}.tar") == b"not really a docker image"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["layout"] == "scanner" and manifest["image_tar"]["included"] is True
    assert (tmp_path / "out" / f"{base}.json").is_file()


def test_build_script_command_line_writes_the_zip(tmp_path, capsys):
    assert B.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "valid against schema-1.1.0.json" in out and B.LABEL_KEY in out
    assert (tmp_path / f"{B.base_name(B.load_json(OPENRECON / 'label.json'))}.zip").is_file()


# ============================================================================ the python-ismrmrd-server module
class FakeConnection:
    """Stand-in for python-ismrmrd-server's ``Connection`` (that server is not installed here);
    method names as in its ``connection.py`` (see the module docstring)."""

    def __init__(self, items, *, fail_after: int | None = None) -> None:
        self.items = list(items)
        self.fail_after = fail_after
        self.is_exhausted = False
        self.sent: list[tuple[str, object, bytes | str]] = []  # (method, object, bytes or text at send time)

    def __iter__(self):
        for k, item in enumerate(self.items):
            if self.fail_after is not None and k == self.fail_after:
                # connection.py raises StopIteration inside the generator on an unknown message id
                # (PEP 479 turns it into RuntimeError)
                raise RuntimeError("generator raised StopIteration")
            yield item
        self.is_exhausted = True
        yield None  # read_close() returns None

    def send_image(self, images):
        for im in images if isinstance(images, list) else [images]:
            if im is None:
                continue
            self.sent.append(("send_image", im, im.to_bytes()))

    def send_acquisition(self, acquisition):
        self.sent.append(("send_acquisition", acquisition, acquisition.to_bytes()))

    def send_waveform(self, waveform):
        self.sent.append(("send_waveform", waveform, waveform.to_bytes()))

    def send_logging(self, level, contents):
        self.sent.append(("send_logging", None, "%s %s" % (level, contents)))

    def send_close(self):
        self.sent.append(("send_close", None, b""))

    # what came back
    def texts(self) -> list[str]:
        return [t for m, _, t in self.sent if m == "send_logging"]

    def data(self) -> list[tuple[str, object, bytes]]:
        return [s for s in self.sent if s[0] not in ("send_logging", "send_close")]


def _acquisition():
    acq = ismrmrd.Acquisition.from_array(np.arange(32, dtype=np.float32).view(np.complex64).reshape(2, 8))
    acq.scan_counter = 7
    return acq


def _waveform():
    return ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(2, 6))


def _check_all_back_unchanged_plus_vne(conn: FakeConnection, items: list, before: list[bytes]) -> list:
    """Every input back, in order, the same object with the same bytes; returns the VNE images."""
    i, vne = 0, []
    for method, obj, raw in conn.data():
        if i < len(items) and obj is items[i]:
            assert raw == before[i], f"item {i} changed"
            want = {"Image": "send_image", "Acquisition": "send_acquisition", "Waveform": "send_waveform"}
            assert method == want[type(obj).__name__]
            i += 1
            continue
        assert method == "send_image", method
        vne.append(obj)
    assert i == len(items), f"only {i} of {len(items)} inputs came back in order"
    assert [m for m, _, _ in conn.sent].count("send_close") == 1 and conn.sent[-1][0] == "send_close"
    return vne


def test_process_returns_every_input_unchanged_plus_vne(stream, model, defaults):
    """The whole simulated exam with an acquisition and a waveform among the images, a TEXT
    message from the client, config as python-ismrmrd-server passes a JSON configAdditional."""
    from gadgets import vne_mrd
    from test_gadget_protocol import check_vne_images
    from vne.io.mrd import parse_header
    from vne.runtime.pipeline import VNEPipeline

    header, images = stream
    items = list(images)
    items.insert(1, _acquisition())
    items.insert(10, _waveform())
    before = [it.to_bytes() for it in items]
    conn = FakeConnection(items[:5] + ["{\"note\": \"client text\"}"] + items[5:])
    config = {"version": "1.1.0", "parameters": {"config": "vne_mrd", "customconfig": "", "sendOriginal": "True"}}
    p = vne_mrd.process(conn, config, parse_header(header), defaults=defaults, model=model)
    assert isinstance(p, VNEPipeline) and vne_mrd.VNEPipeline is VNEPipeline  # the pipeline itself, not a copy
    vne = _check_all_back_unchanged_plus_vne(conn, items, before)
    check_vne_images(vne, images, 3)
    assert all(v.image_series_index == VNE_SERIES for v in vne)
    texts = conn.texts()
    assert any(t.startswith(f"INFO     vne: {len(images)} image(s), 1 acquisition(s), 1 waveform(s) passed back unchanged; "
                            "3 VNE image(s) in series 1004") for t in texts), texts
    assert all(t[:8] in ("DEBUG   ", "INFO    ", "WARNING ", "ERROR   ", "CRITICAL") for t in texts)


def test_process_applies_parameters_by_openrecon_id_and_refuses_server_only_ones(stream, model, defaults):
    from gadgets import vne_mrd

    header, images = stream
    one = [im for im in images if im.slice == 0]
    before = [im.to_bytes() for im in one]
    conn = FakeConnection(one)
    config = {"parameters": {"config": "vne", "pixeltype": "uint16", "seriesindexoffset": 2000,
                             "model": "/etc/passwd", "enabled": True}}
    vne_mrd.process(conn, config, header, defaults=defaults, model=model)  # header as XML text
    vne = _check_all_back_unchanged_plus_vne(conn, one, before)
    assert len(vne) == 1 and vne[0].data.dtype == np.uint16 and vne[0].image_series_index == 2000 + T1_SERIES
    assert any(t.startswith("WARNING  vne: parameter 'model' is set by the server") for t in conn.texts()), conn.texts()


def test_process_with_bad_parameters_passes_everything_back(stream, model, defaults):
    from gadgets import vne_mrd

    header, images = stream
    one = [im for im in images if im.slice == 0]
    conn = FakeConnection(one)
    vne_mrd.process(conn, {"parameters": {"qc": "sometimes"}}, header, defaults=defaults, model=model)
    assert _check_all_back_unchanged_plus_vne(conn, one, [im.to_bytes() for im in one]) == []
    assert any("VNE disabled: bad parameters" in t and "qc" in t for t in conn.texts()), conn.texts()


def test_process_survives_a_connection_that_fails_mid_stream(stream, model, defaults):
    """python-ismrmrd-server's connection raises out of iteration on an unknown message id: what
    came before goes back, VNE for the complete slices, an ERROR text, then CLOSE."""
    from gadgets import vne_mrd

    header, images = stream
    first = [im for im in images if im.slice == 0]
    rest = [im for im in images if im.slice != 0]
    conn = FakeConnection(first + rest, fail_after=len(first))
    vne_mrd.process(conn, "vne_mrd", header, defaults=defaults, model=model)
    vne = _check_all_back_unchanged_plus_vne(conn, first, [im.to_bytes() for im in first])
    assert len(vne) == 1 and vne[0].slice == 0
    assert any(t.startswith("ERROR    vne: input not read further (RuntimeError") for t in conn.texts()), conn.texts()


# ============================================================================ vne stream --protocol mrd
@pytest.fixture(scope="module")
def mrd_port(model):
    """The real MRD server in a thread on 127.0.0.1:<ephemeral>, tiny model, no study cache."""
    from vne.runtime import mrd_server
    from vne.runtime.config import PipelineConfig

    defaults = PipelineConfig(model=str(H.tiny_model()), cache_dir="none")
    opts = mrd_server.ServerOptions(read_timeout_s=60.0, max_active=4, linger_s=1.0)
    with H.mrd_server_thread(defaults, model, opts) as port:
        yield port


def _read_back(path: Path) -> list:
    from vne.io.mrd import read_mrd_file

    return read_mrd_file(path)[1]


def test_stream_mrd_round_trips_an_exam_byte_identically(mrd_port, stream, tmp_path, capsys):
    header, images = stream
    out = tmp_path / "back.h5"
    assert main(["stream", str(H.sim_h5()), "--protocol", "mrd", "--port", str(mrd_port), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"vne stream: server: INFO     vne: {len(images)} image(s), 0 acquisition(s), 0 waveform(s) passed back unchanged; " \
           "3 VNE image(s) in series 1004" in printed, printed
    assert f"received {len(images) + 3} (3 in new series 1004, 1 text message(s))" in printed, printed
    back = _read_back(out)
    inputs = {im.image_series_index for im in images}
    passed = [b for b in back if b.image_series_index in inputs]
    vne = [b for b in back if b.image_series_index not in inputs]
    assert [b.to_bytes() for b in passed] == [im.to_bytes() for im in images]  # byte-identical, in order
    assert len(vne) == 3 and {v.image_series_index for v in vne} == {VNE_SERIES}


def test_exchange_mrd_replies_are_the_exact_input_messages(mrd_port, stream):
    """On the wire: every input IMAGE message comes back as the same bytes (packed here
    independently of vne.io.framing), in order, then the VNE images and the TEXT, CLOSE last."""
    from vne.commands.stream import exchange_mrd

    header, images = stream
    one = [im for im in images if im.slice == 1]
    reply = exchange_mrd("127.0.0.1", mrd_port, header, one, config="vne", params={"pixel_type": "uint16"})
    assert reply.got_close
    sent = [struct.pack("<H", 1022) + im.to_bytes() for im in one]
    imgs = [f.raw for f in reply.frames if f.msg_id == 1022]
    assert [raw for raw in imgs if raw in sent] == sent  # every input, byte-identical, in order
    extra = [ismrmrd.Image.from_bytes(raw[2:]) for raw in imgs if raw not in sent]
    assert len(extra) == 1 and extra[0].data.dtype == np.uint16 and extra[0].image_series_index == VNE_SERIES
    t1_at = max(k for k, raw in enumerate(imgs) if raw in sent and ismrmrd.Image.from_bytes(raw[2:]).image_series_index == T1_SERIES)
    assert imgs.index(struct.pack("<H", 1022) + extra[0].to_bytes()) > t1_at  # VNE follows its T1 map
    assert any("1 VNE image(s)" in t for t in reply.texts), reply.texts


def test_stream_mrd_other_config_prints_the_server_text(mrd_port, stream, tmp_path, capsys):
    out = tmp_path / "o.h5"
    assert main(["stream", str(H.sim_h5()), "--protocol", "mrd", "--port", str(mrd_port), "--out", str(out),
                 "--config", "invertcontrast"]) == 0
    printed = capsys.readouterr().out
    assert "vne stream: server: WARNING  vne: config 'invertcontrast' is not 'vne': VNE was not requested" in printed
    assert f"received {len(stream[1])} (0 in new series -" in printed


def test_stream_mrd_unreachable_server_is_one_line(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert main(["stream", str(H.sim_h5()), "--protocol", "mrd", "--port", str(port), "--out",
                 str(tmp_path / "x.h5"), "--connect-timeout", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"vne stream: error: cannot connect to 127.0.0.1:{port}: ")
    assert not (tmp_path / "x.h5").exists()


def test_stream_mrd_message_sequence():
    """What the client sends, as python-ismrmrd-server's client.py does: CONFIG_FILE (1024
    bytes, NUL-padded), HEADER (length + text + NUL), TEXT JSON parameters, images, CLOSE."""
    from vne.commands.stream import mrd_messages

    header, images = H.sim_stream()
    msgs = mrd_messages(header, images[:2], config="vne", params={"pixel_type": "uint16"})
    assert msgs[0] == struct.pack("<H", 1) + b"vne".ljust(1024, b"\0")
    body = header.encode() + b"\0"
    assert msgs[1] == struct.pack("<HI", 3, len(body)) + body
    mid, n = struct.unpack_from("<HI", msgs[2])
    assert mid == 5 and json.loads(msgs[2][6:6 + n].rstrip(b"\0")) == {
        "version": "1.1.0", "parameters": {"pixel_type": "uint16", "config": "vne"}}
    assert msgs[3:5] == [struct.pack("<H", 1022) + im.to_bytes() for im in images[:2]]
    assert msgs[-1] == struct.pack("<H", 4) and len(msgs) == 6
    assert mrd_messages(header, [], config='{"parameters": {"config": "vne"}}')[0][:2] == struct.pack("<H", 2)


def test_mrd_server_applies_openrecon_parameter_ids(mrd_port, stream):
    from vne.commands.stream import exchange_mrd

    header, images = stream
    one = [im for im in images if im.slice == 2]
    reply = exchange_mrd("127.0.0.1", mrd_port, header, one, config="vne", params={"pixeltype": "uint16"})
    sent = [struct.pack("<H", 1022) + im.to_bytes() for im in one]
    extra = [ismrmrd.Image.from_bytes(f.raw[2:]) for f in reply.frames if f.msg_id == 1022 and f.raw not in sent]
    assert len(extra) == 1 and extra[0].data.dtype == np.uint16
