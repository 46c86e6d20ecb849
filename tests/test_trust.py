"""Trust (issue 11): a checked model, clients that cannot name files, a private study cache, a
server that keeps listening.

Real files, real ONNX models (the shipped one and tiny random ones), real sockets on 127.0.0.1
speaking the Gadgetron external protocol through ``vne serve``'s own accept loop. The one
stand-in is a listening socket whose first ``accept()`` calls fail (file descriptors cannot be
exhausted safely inside the test process).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

import vne_helpers as H
from vne.errors import InputError
from vne.exam.data import Role
from vne.io.mrd.header import parse_header, study_key
from vne.io.mrd.image import from_mrd
from vne.runtime import model as M
from vne.runtime.config import PipelineConfig
from vne.runtime.pipeline import VNEPipeline, process_stream
from vne.runtime.study_store import StudyCache, default_cache_dir, study_hash

SHIPPED = __import__("vne.runtime.model", fromlist=["find_default_model"]).find_default_model()  # the newest shipped model
STUDY, FOR = "1.2.3.4", "1.2.3.5"


@pytest.fixture(autouse=True)
def _fresh_trust_state(monkeypatch):
    """No pins, hashes or sessions from other tests; none left behind for them."""
    monkeypatch.delenv(M.ENV_MODEL_ALLOW, raising=False)
    M.clear_cache()
    yield
    M.clear_cache()


@pytest.fixture(scope="module")
def one_slice():
    header, images = H.sim_stream()
    return header, [im for im in images if im.slice == 0]


@pytest.fixture(scope="module")
def cache_images():
    header, mrd = H.sim_stream()
    study = study_key(parse_header(header))
    return [from_mrd(m, study=study) for m in mrd if m.image_series_index in (1, 2, 3) and m.slice == 0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tampered_copy(dst_dir: Path) -> Path:
    """The shipped model with one weight sign-flipped, same file name and metadata."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(SHIPPED))
    meta = {p.key: p.value for p in m.metadata_props}
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size > 16 and a.flat[0] != 0:
            a = a.copy()
            a.flat[0] = -a.flat[0]
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            break
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = dst_dir / SHIPPED.name
    onnx.save(m, str(out))
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props} == meta
    return out


# ---------------------------------------------------------------------------- the model
def test_shipped_model_matches_its_manifest_entry():
    manifest = json.loads((H.REPO / "models" / "manifest.json").read_text())["models"]
    assert set(manifest) >= {p.name for p in (H.REPO / "models").glob("vne-sim-*.onnx")}
    digest, why = M.verify_model(SHIPPED)
    assert why == "manifest" and digest == manifest[SHIPPED.name] == sha256(SHIPPED)


def test_tampered_model_is_refused_and_every_stream_passes_through_with_the_reason(tmp_path, one_slice, monkeypatch,
                                                                                      caplog):
    header, images = one_slice
    bad = tampered_copy(tmp_path / "models")
    with pytest.raises(InputError, match="does not match .*manifest.json.*tampered"):
        M.load_model(bad)  # by path: the name claims to be the shipped model
    monkeypatch.delenv(M.ENV_MODEL, raising=False)
    monkeypatch.setenv(M.ENV_MODEL_DIR, str(bad.parent))
    with pytest.raises(InputError, match="does not match"):
        M.load_model()  # found by the default search
    with caplog.at_level(logging.ERROR):
        for _ in range(2):  # every stream says why
            out, p = process_stream(images, PipelineConfig(model=str(bad), cache_dir="none"), header=header)
            assert out == images and all(a is b for a, b in zip(out, images)) and p.results == []
            assert "does not match" in p.disabled_reason
    disabled = [r.getMessage() for r in caplog.records if "VNE disabled for this stream" in r.getMessage()]
    assert len(disabled) == 2 and all("tampered" in m for m in disabled)
    assert sum("REFUSED" in r.getMessage() for r in caplog.records) == 1  # the loud line, once per file state


def test_operator_model_needs_an_explicit_sha256_or_the_allow_list(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv(M.ENV_MODEL_DIR, str(folder))  # a model folder: shipped-looking files must be listed
    op = H.copy_model(folder / "vne-sim-9.9.9.onnx")
    digest = sha256(op)
    with pytest.raises(InputError, match="not listed in the model manifest"):
        M.load_model(op)
    m = M.load_model(op, sha256=digest.upper())
    assert m.sha256 == m.info.sha256 == digest
    # the pin stays: a later load without the sha256 (a pipeline's own) is still checked
    assert M.load_model(op) is m
    wrong = H.copy_model(folder / "vne-sim-9.9.8.onnx")
    with pytest.raises(InputError, match="not the expected"):
        M.load_model(wrong, sha256="0" * 64)
    with pytest.raises(InputError, match="not the expected"):
        M.load_model(wrong)
    # the server-side property pins it for the pipeline's own load
    cfg = PipelineConfig(model=str(wrong), model_sha256="1" * 64, cache_dir="none")
    assert "not the expected" in VNEPipeline(cfg).disabled_reason
    with pytest.raises(InputError, match="not a sha256"):
        PipelineConfig(model=str(op), model_sha256="abc")
    # the allow-list
    listed = H.copy_model(folder / "vne-sim-9.9.7.onnx")
    monkeypatch.setenv(M.ENV_MODEL_ALLOW, f"junk, {digest}")
    assert M.load_model(listed).sha256 == digest
    # elsewhere and unpinned: loads, with a warning naming its sha256 (once)
    monkeypatch.delenv(M.ENV_MODEL_ALLOW)
    free = H.copy_model(tmp_path / "mine" / "my-model.onnx")
    with caplog.at_level(logging.WARNING, logger="vne.runtime.model"):
        M.load_model(free)
        M.load_model(free)
    assert sum("not pinned" in r.getMessage() and digest in r.getMessage() for r in caplog.records) == 1


def test_vne_infer_model_sha256_mismatch_is_an_error(tmp_path, capsys):
    from vne.cli import main

    src = tmp_path / "in.h5"
    src.write_bytes(b"")
    model = H.copy_model(tmp_path / "m.onnx")
    assert main(["infer", str(src), "--out", str(tmp_path / "o.h5"), "--model", str(model),
                 "--model-sha256", "0" * 64]) == 2
    assert "not the expected" in capsys.readouterr().err


# ---------------------------------------------------------------------------- clients cannot name files
def test_properties_naming_files_are_trusted_only_from_the_server(tmp_path, caplog):
    props = {"model": "/etc/hostname", "cache_dir": str(tmp_path / "x"), "model_sha256": "", "pixel_type": "uint16"}
    with caplog.at_level(logging.WARNING):
        cfg = PipelineConfig.from_properties(props, base=PipelineConfig(model="/srv/m.onnx"), trusted=False)
    assert (cfg.model, cfg.cache_dir, cfg.pixel_type) == ("/srv/m.onnx", None, "uint16")
    msgs = [r.getMessage() for r in caplog.records if "client properties" in r.getMessage()]
    assert len(msgs) == 1 and "model='/etc/hostname'" in msgs[0] and "cache_dir=" in msgs[0]
    trusted = PipelineConfig.from_properties(props)  # execute mode: the pipeline XML is the server's
    assert (trusted.model, trusted.cache_dir) == ("/etc/hostname", str(tmp_path / "x"))


def _start_server(defaults, model, **kw):
    from vne.commands.serve import bind, serve

    srv = bind("127.0.0.1", 0)
    port = srv.getsockname()[1]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("n", serve(srv, defaults, model, **kw)), daemon=True)
    t.start()
    return port, t, box


def test_vne_serve_ignores_a_clients_model_and_cache_dir_and_bounds_idle_connections(tmp_path, one_slice, caplog):
    """Over the real Gadgetron external protocol: an idle connection is ended by the read
    timeout; then a client naming /etc/hostname and its own cache folder gets the server's
    model, VNE, and every input back byte-identical; nothing is created where it pointed."""
    header, images = one_slice
    model_path = H.copy_model(tmp_path / "served.onnx")
    model = M.load_model(model_path)
    defaults = PipelineConfig(model=str(model_path), cache_dir=str(tmp_path / "cache"))
    evil = tmp_path / "client-cache"
    caplog.set_level(logging.INFO)
    port, t, box = _start_server(defaults, model, max_connections=2, read_timeout_s=2.0)
    idle = socket.create_connection(("127.0.0.1", port), 10)
    idle.settimeout(30)
    assert idle.recv(1) == b""  # closed by the server after 2 s without data
    idle.close()
    sock = socket.create_connection(("127.0.0.1", port), 10)
    try:
        got = H.play_gadgetron(sock, header, images, H.config_xml(model="/etc/hostname", cache_dir=evil,
                                                                  model_sha256="0" * 64))
    finally:
        sock.close()
    t.join(60)
    assert not t.is_alive() and box["n"] == 2
    passed, vne = H.split_outputs(got, {im.image_series_index for im in images})
    assert H.serialized(passed) == H.serialized(images)
    assert len(vne) == 1 and vne[0].meta["ImageComments"].startswith("VNE vne-sim-test")
    assert not evil.exists()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no data from the peer for 2 s (--read-timeout)" in text
    assert text.count("client properties") == 1 and "model='/etc/hostname'" in text
    assert "/etc/hostname is not" not in text and "model file /etc/hostname" not in text


class _FailingAccept:
    """A listening socket whose first ``n`` accept() calls fail with EMFILE."""

    def __init__(self, sock, n):
        self._sock, self.left = sock, n

    def accept(self):
        if self.left:
            self.left -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self._sock.accept()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_failed_accept_is_logged_and_retried(caplog):
    from vne.commands.serve import bind, serve

    srv = bind("127.0.0.1", 0)
    port = srv.getsockname()[1]
    caplog.set_level(logging.INFO, logger="vne.serve")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("n", serve(_FailingAccept(srv, 2), PipelineConfig(enabled=False),
                                                                  None, max_connections=1, read_timeout_s=1.0)),
                         daemon=True)
    t.start()
    c = socket.create_connection(("127.0.0.1", port), 10)  # waits in the backlog meanwhile
    c.settimeout(30)
    assert c.recv(1) == b""
    c.close()
    t.join(30)
    assert box.get("n") == 1
    fails = [r for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(fails) == 2 and all(r.levelno == logging.ERROR and "still listening" in r.getMessage() for r in fails)


# ---------------------------------------------------------------------------- the study cache
def test_symlinked_default_cache_folder_is_refused(tmp_path, monkeypatch, cache_images, caplog):
    monkeypatch.delenv("VNE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    root = default_cache_dir()
    assert root.parent == tmp_path
    root.symlink_to(shared)
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        c = StudyCache(default_cache_dir())
        assert c.put(cache_images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x") == 0
        assert c.get(study_uid=STUDY, frame_of_reference_uid=FOR) == []
    assert list(shared.iterdir()) == []
    msgs = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(msgs) == 1 and "symlink" in msgs[0]


def test_world_writable_cache_folder_is_refused_and_a_new_one_is_private(tmp_path, monkeypatch, cache_images, caplog):
    monkeypatch.delenv("VNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = default_cache_dir()
    assert root == tmp_path / "xdg" / "vne-study-cache"
    c = StudyCache(root)
    assert c.put(cache_images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x") == 3
    assert (root.stat().st_mode & 0o777) == 0o700
    root.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        assert StudyCache(root).get(study_uid=STUDY, frame_of_reference_uid=FOR) == []
    assert any("refused" in r.getMessage() and "writable by others" in r.getMessage() for r in caplog.records)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root can hand the folder to someone else
        root.chmod(0o700)
        os.chown(root, 4321, 4321)
        assert StudyCache(root).get(study_uid=STUDY, frame_of_reference_uid=FOR) == []
        assert any("owned by uid 4321" in r.getMessage() for r in caplog.records)


def test_corrupted_same_size_entry_is_detected_deleted_and_logged(tmp_path, cache_images, caplog):
    c = StudyCache(tmp_path)
    c.put(cache_images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
    npz = sorted(tmp_path.glob("*/*.npz"))[0]
    data = bytearray(npz.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0x5A for b in data[mid:mid + 8])
    npz.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        got = c.get(study_uid=STUDY, frame_of_reference_uid=FOR)
    assert 0 < len(got) < len(cache_images)
    assert not npz.exists() and not npz.with_suffix(".json").exists()
    assert any("do not match the stored sha256" in r.getMessage() and "deleted" in r.getMessage() for r in caplog.records)
    assert len(c.get(study_uid=STUDY, frame_of_reference_uid=FOR)) == len(got)  # the rest stays usable


def test_record_pointing_outside_the_root_is_refused(tmp_path, cache_images, caplog):
    root = tmp_path / "cache"
    c = StudyCache(root)
    c.put(cache_images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
    outside = tmp_path / "secret.npz"
    shutil.copy(sorted(root.glob("*/*.npz"))[0], outside)
    js = sorted(root.glob("*/*.json"))[0]
    rec = json.loads(js.read_text())
    rec.update(npz="../../secret.npz", npz_bytes=outside.stat().st_size, npz_sha256=sha256(outside))
    js.write_text(json.dumps(rec))
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        got = c.get(study_uid=STUDY, frame_of_reference_uid=FOR)
    assert len(got) < len(cache_images) and outside.exists() and not js.exists()
    assert any("outside the cache root" in r.getMessage() for r in caplog.records)


def test_unreadable_entry_with_a_matching_hash_is_caught(tmp_path, cache_images, caplog):
    c = StudyCache(tmp_path)
    c.put(cache_images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
    js = sorted(tmp_path.glob("*/*.json"))[0]
    npz = js.with_suffix(".npz")
    npz.write_bytes(b"PK\x03\x04 not a zip at all")
    rec = json.loads(js.read_text())
    rec.update(npz_bytes=npz.stat().st_size, npz_sha256=sha256(npz))
    js.write_text(json.dumps(rec))
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        got = c.get(study_uid=STUDY, frame_of_reference_uid=FOR)
    assert 0 < len(got) < len(cache_images) and not js.exists()
    assert any("is unreadable" in r.getMessage() for r in caplog.records)


def test_cache_smaller_than_one_entry_logs_a_warning(tmp_path, cache_images, caplog):
    cine = [im for im in cache_images if im.role == Role.CINE]
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        StudyCache(tmp_path, max_mb=0.001).put(cine, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
    warn = [r for r in caplog.records if "more than cache_max_mb" in r.getMessage()]
    assert len(warn) == 1 and warn[0].levelno == logging.WARNING
    assert not list((tmp_path / study_hash(STUDY, FOR)).glob("*.json"))
