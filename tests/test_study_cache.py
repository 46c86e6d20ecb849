"""The on-disk study cache: round trip, restart, age and size limits, unwritable folders.

No mocks: real files in a temporary folder, the cine and IR images of the simulated exam
decoded by the real ISMRMRD reader. The cross-connection use over real sockets is in
test_gadget_protocol.py (cine connection first, then the T1-mapping connection).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

import vne_helpers as H
from vne.exam.data import Role
from vne.io.mrd.header import parse_header, study_key
from vne.io.mrd.image import from_mrd
from vne.runtime.study_store import StudyCache, study_hash

STUDY = "1.2.3.4"
FOR = "1.2.3.5"


@pytest.fixture(scope="module")
def images():
    header, mrd = H.sim_stream()
    study = study_key(parse_header(header))
    return [from_mrd(m, study=study) for m in mrd if m.image_series_index in (1, 2, 3) and m.slice == 0]


def test_round_trip_survives_a_restart(images, tmp_path):
    c = StudyCache(tmp_path)
    assert c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="cine-scan") == 3  # cine, IR, phase
    got = StudyCache(tmp_path).get(study_uid=STUDY, frame_of_reference_uid=FOR)  # a new process would do this
    assert len(got) == len(images)
    by_key = {(im.role, im.trigger_time_ms, im.inversion_time_ms): im for im in images}
    for g in got:
        ref = by_key[(g.role, g.trigger_time_ms, g.inversion_time_ms)]
        assert np.array_equal(g.pixels, ref.pixels) and g.pixels.dtype == np.float32
        assert g.geometry == ref.geometry and g.series_description == ref.series_description
        assert g.source.startswith("study cache")
    assert {g.role for g in got} == {Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE}
    # another study, or the same study UID with another frame of reference, sees nothing
    assert c.get(study_uid=STUDY, frame_of_reference_uid="other") == []
    assert not any(STUDY in p.name for p in tmp_path.rglob("*")), "no identifiers in file names"


def test_same_connection_rewrites_instead_of_duplicating(images, tmp_path):
    c = StudyCache(tmp_path)
    c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="scan-1")
    c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="scan-1")
    assert len(list(tmp_path.glob("*/*.json"))) == 3


def test_age_limit(images, tmp_path):
    c = StudyCache(tmp_path, max_age_hours=1)
    c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="old")
    old = time.time() - 2 * 3600
    for p in tmp_path.glob("*/*"):
        os.utime(p, (old, old))
    assert c.get(study_uid=STUDY, frame_of_reference_uid=FOR) == []
    removed, _ = c.evict()
    assert removed == 3 and not list(tmp_path.glob("*/*.json"))


def test_size_limit_evicts_oldest_first(images, tmp_path):
    cine = [im for im in images if im.role == Role.CINE]
    c = StudyCache(tmp_path, max_mb=1e6)
    c.put(cine, study_uid="A", frame_of_reference_uid=FOR, origin="a")
    one = c.total_bytes()
    old = time.time() - 600
    for p in (tmp_path / study_hash("A", FOR)).glob("*"):
        os.utime(p, (old, old))
    small = StudyCache(tmp_path, max_mb=1.5 * one / 2**20)
    small.put(cine, study_uid="B", frame_of_reference_uid=FOR, origin="b")
    assert small.get(study_uid="A", frame_of_reference_uid=FOR) == []
    assert len(small.get(study_uid="B", frame_of_reference_uid=FOR)) == len(cine)
    assert small.total_bytes() <= 1.5 * one


def test_unwritable_folder_is_logged_once_and_ignored(images, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    c = StudyCache(blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        assert c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x") == 0
        assert c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x") == 0
    assert sum("continuing without it" in r.getMessage() for r in caplog.records) == 1
    assert c.get(study_uid=STUDY, frame_of_reference_uid=FOR) == []


def test_damaged_entry_is_skipped(images, tmp_path):
    c = StudyCache(tmp_path)
    c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
    npz = sorted(tmp_path.glob("*/*.npz"))[0]
    npz.write_bytes(npz.read_bytes()[:100])
    got = c.get(study_uid=STUDY, frame_of_reference_uid=FOR)
    assert 0 < len(got) < len(images)


def test_background_write_is_waited_for_in_process(images, tmp_path):
    c = StudyCache(tmp_path)
    t = c.put_async(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
    assert len(StudyCache(tmp_path).get(study_uid=STUDY, frame_of_reference_uid=FOR)) == len(images)
    t.join()


def test_pipeline_with_cache_disabled_or_unwritable_still_works(tmp_path):
    """A single stream holding every series needs no cache; an unwritable one changes nothing."""
    from vne.runtime.config import PipelineConfig
    from vne.runtime.pipeline import process_stream

    header, images = H.sim_stream()
    one = [im for im in images if im.slice == 0]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cache_dir in ("none", str(blocker / "cache")):
        out, p = process_stream(one, PipelineConfig(model=str(H.tiny_model()), cache_dir=cache_dir), header=header)
        if p.cache_thread is not None:
            p.cache_thread.join()
        assert len(p.results) == 1 and len(out) == len(one) + 1


def test_leftovers_of_interrupted_writes_are_swept_at_start(images, tmp_path):
    """Temporary files name their writer's process id: at a process's first use of the folder,
    those of processes that are gone (and of its own id, left by an earlier process) are
    deleted at once; a live writer's are kept."""
    import subprocess
    import sys

    c = StudyCache(tmp_path / "cache")
    root = c.root
    root.mkdir(mode=0o700)
    folder = root / study_hash(STUDY, FOR)
    folder.mkdir(mode=0o700)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp = folder / f".abc.npz.{gone.pid}.x1.tmp"
        own_tmp = folder / f".abc.json.{os.getpid()}.x2.tmp"
        live_tmp = folder / f".def.npz.{live.pid}.x3.tmp"
        for p in (dead_tmp, own_tmp, live_tmp):
            p.write_bytes(b"partial")
        assert c.get(study_uid=STUDY, frame_of_reference_uid=FOR) == []  # the first use sweeps
        assert not dead_tmp.exists() and not own_tmp.exists() and live_tmp.exists()
        # later writes of this process leave no temporary files behind
        c.put(images, study_uid=STUDY, frame_of_reference_uid=FOR, origin="x")
        assert sorted(p.name for p in folder.glob(".*.tmp")) == [live_tmp.name]
    finally:
        live.kill()
        live.wait()


def test_cache_smaller_than_one_entry_warns_once_per_process(images, tmp_path, caplog):
    """Every connection opens its own StudyCache: the WARNING comes once, not per connection."""
    cine = [im for im in images if im.role == Role.CINE]
    with caplog.at_level(logging.WARNING, logger="vne.runtime.study_store"):
        for origin in ("a", "b", "c"):
            StudyCache(tmp_path, max_mb=0.001).put(cine, study_uid=STUDY, frame_of_reference_uid=FOR, origin=origin)
    assert sum("more than cache_max_mb" in r.getMessage() for r in caplog.records) == 1
