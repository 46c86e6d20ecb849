"""The VNE gadget over the real Gadgetron external protocol, on real TCP sockets (127.0.0.1).

No peer is mocked: the test plays Gadgetron's side with ``ismrmrd.serialization`` (CONFIG as
text, HEADER, images, CLOSE, and reading the replies until the gadget's CLOSE), exactly as
Gadgetron's ``ExternalChannel`` does; the gadget side is the real ``gadgetron.external``
package, started as Gadgetron starts it (``python -m gadgetron PORT gadgets.vne_gadget
gadget``), in a thread around ``gadgetron.external.Connection``, or as ``vne serve``.
The exam is one simulated case from ``vne simulate``, streamed in scanner order; the model is a
tiny randomly initialised generator (the image content is not checked, the data path is).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

import vne_helpers as H

PY = sys.executable
T1_SERIES = 4
VNE_SERIES = 1000 + T1_SERIES


@pytest.fixture(scope="module")
def stream():
    return H.sim_stream()


@pytest.fixture(scope="module")
def model() -> Path:
    return H.tiny_model()


def check_vne_images(vne: list, inputs: list, n_expected: int, dtype=np.float32) -> None:
    t1 = {im.slice: im for im in inputs if im.image_series_index == T1_SERIES}
    assert len(vne) == n_expected
    assert sorted(v.image_index for v in vne) == list(range(1, n_expected + 1))
    assert {v.image_series_index for v in vne} == {VNE_SERIES}
    uids = {v.meta["SeriesInstanceUID"] for v in vne}
    assert len(uids) == 1 and {v.meta["SeriesNumberRangeNameUID"] for v in vne} == uids
    for v in vne:
        assert v.data.dtype == dtype
        assert H.geometry_fields(v) == H.geometry_fields(t1[v.slice])
        assert v.data.shape == t1[v.slice].data.shape
        m = v.meta
        assert m["DataRole"] == m["GADGETRON_DataRole"] == "Quantitative"
        assert m["SeriesDescription"].endswith("_VNE") and m["GADGETRON_SeqDescription"] == m["SeriesDescription"]
        assert "VNE" in m["ImageProcessingHistory"] and "VNE" in m["GADGETRON_ImageProcessingHistory"]
        assert m["ImageComments"] == m["GADGETRON_ImageComment"] == "VNE vne-sim-test 0.0.1"
        for k in ("WindowCenter", "WindowWidth", "GADGETRON_WindowCenter", "GADGETRON_WindowWidth"):
            assert re.fullmatch(r"-?\d+", m[k]), (k, m[k])
        assert m["StudyInstanceUID"] == t1[v.slice].meta["StudyInstanceUID"]
        assert np.all(np.isfinite(v.data))


def test_execute_mode_one_stream_as_gadgetron_starts_it(stream, model, tmp_path):
    """Execute mode: Gadgetron listens, starts ``python -m gadgetron PORT gadgets.vne_gadget gadget``
    and streams the whole exam (every series in one stream); the subprocess is the real thing."""
    header, images = stream
    srv = H.listen_local()
    port = srv.getsockname()[1]
    env = {**os.environ, "GADGETRON_EXTERNAL_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen([PY, "-m", "gadgetron", str(port), "gadgets.vne_gadget", "gadget"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sock, _ = srv.accept()
        received = H.play_gadgetron(sock, header, images, H.config_xml(model=model, cache_dir=tmp_path / "cache"))
        sock.close()
        log_text = proc.communicate(timeout=60)[0]
    finally:
        srv.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log_text[-2000:]
    passed, vne = H.split_outputs(received, {im.image_series_index for im in images})
    # every input back, byte-identical and in order
    assert H.serialized(passed) == H.serialized(images)
    check_vne_images(vne, images, 3)
    assert "loaded from" in log_text and "CPUExecutionProvider" in log_text
    # each VNE image follows its own T1 map (sent as soon as the slice was complete)
    order = [(r.image_series_index, r.slice) for r in received if isinstance(r, ismrmrd.Image)]
    for v in vne:
        assert order.index((VNE_SERIES, v.slice)) > order.index((T1_SERIES, v.slice))


def test_two_connections_cine_first_then_t1_mapping_finds_cine_in_the_study_cache(stream, model, tmp_path):
    """Two scans of one study in two connections (real sockets, gadget in a thread): the cine
    connection yields no VNE but fills the cache; the T1-mapping connection finds the cine."""
    header, images = stream
    cache = tmp_path / "cache"
    cfg = H.config_xml(model=model, cache_dir=cache)
    cine = [im for im in images if im.image_series_index == 1]
    rest = [im for im in images if im.image_series_index != 1]
    header2 = re.sub(r"<measurementID>[^<]*</measurementID>", "<measurementID>t1-scan</measurementID>", header)

    got1, p1 = H.run_in_thread(header, cine, cfg)
    passed1, vne1 = H.split_outputs(got1, {1})
    assert H.serialized(passed1) == H.serialized(cine) and vne1 == []
    assert any("no T1 map in this stream" in m for m in p1.problems)
    assert list(cache.glob("*/*.json")), "cine not stored in the study cache"

    got2, p2 = H.run_in_thread(header2, rest, cfg)
    passed2, vne2 = H.split_outputs(got2, {im.image_series_index for im in rest})
    assert H.serialized(passed2) == H.serialized(rest)
    check_vne_images(vne2, rest, 3)
    assert {v.meta["VNE_CineSource"] for v in vne2} == {"study cache"}


def test_uint16_output_and_series_index_property(stream, model, tmp_path):
    """Properties reach the gadget through Gadgetron's CONFIG message (real socket, thread)."""
    header, images = stream
    one = [im for im in images if im.slice == 0]
    got, p = H.run_in_thread(header, one, H.config_xml(model=model, cache_dir="none", pixel_type="uint16", series_index=99))
    vne = [r for r in got if isinstance(r, ismrmrd.Image) and r.image_series_index == 99]
    assert len(vne) == 1 and vne[0].data.dtype == np.uint16 and vne[0].image_index == 1
    m = vne[0].meta
    slope, intercept = float(m["RescaleSlope"]), float(m["RescaleIntercept"])
    assert (slope, intercept) == (0.001, -1.0)
    assert np.allclose(vne[0].data[0, 0] * slope + intercept, p.results[0].vne, atol=0.0011)


def test_connect_mode_vne_stream_against_vne_serve(stream, model, tmp_path):
    """Connect mode end to end, both real processes: ``vne serve`` listening on loopback and
    ``vne stream`` playing Gadgetron over the wire protocol; the output file holds every input
    byte-identical plus the VNE series."""
    header, images = stream
    serve = subprocess.Popen([PY, "-m", "vne.cli", "serve", "--port", "0", "--model", str(model), "--cache-dir",
                              str(tmp_path / "cache"), "--max-connections", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while "listening on" not in line and time.time() < deadline:
            line = serve.stdout.readline()
            if not line and serve.poll() is not None:
                break
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, f"vne serve did not start: {line!r}"
        out = tmp_path / "out.h5"
        r = subprocess.run([PY, "-m", "vne.cli", "stream", str(H.sim_h5()), "--port", m.group(1), "--out", str(out),
                            "--timeout", "60"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "in new series 1004" in r.stdout
        rest = serve.communicate(timeout=60)[0]
        assert serve.returncode == 0, rest[-2000:]
    finally:
        if serve.poll() is None:
            serve.kill()
    from vne.io.mrd.hdf5 import read_mrd_file

    _, back = read_mrd_file(out)
    by_series = lambda ims: sorted(H.serialized([i for i in ims if i.image_series_index < 1000]))  # noqa: E731
    assert by_series(back) == by_series(images)
    check_vne_images([i for i in back if i.image_series_index == VNE_SERIES], images, 3)


def test_vne_stream_unreachable_server_is_one_line(tmp_path):
    """No server at all: a refused connection is reported in one line, exit code 2."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = subprocess.run([PY, "-m", "vne.cli", "stream", str(H.sim_h5()), "--port", str(port), "--out",
                        str(tmp_path / "x.h5"), "--connect-timeout", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "cannot connect to 127.0.0.1" in r.stderr


def test_properties_from_config_both_spellings():
    """Gadgetron sends ``<property name= value=/>``; legacy configs use name/value children."""
    from vne.runtime.config import properties_from_config

    xml = ('<configuration><property name="model" value="/m.onnx"/>'
           '<property><name>pixel_type</name><value>uint16</value></property></configuration>')
    assert properties_from_config(xml) == {"model": "/m.onnx", "pixel_type": "uint16"}
    assert properties_from_config(None) == {} and properties_from_config(b"") == {}
