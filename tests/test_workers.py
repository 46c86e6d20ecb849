"""The VNE worker pool (vne.runtime.workers) and the pipeline's scheduling: a slice runs as soon as its
inputs are complete, the stream never waits for VNE, and an overloaded pool skips VNE with a
logged reason while every image still passes through unchanged. No timing assertions: the
blocked-worker cases use events, not clocks.
"""
from __future__ import annotations

import threading

import ismrmrd
import pytest

import vne_helpers as H
from vne.runtime.model import load_model
from vne.runtime.config import PipelineConfig
from vne.runtime.pipeline import VNEPipeline
from vne.runtime.workers import LockedSender, SliceWorkers


@pytest.fixture(scope="module")
def stream():
    return H.sim_stream()


@pytest.fixture(scope="module")
def model():
    return load_model(H.tiny_model())


def _feed_all(p: VNEPipeline, images):
    out = []
    for im in images:
        out.extend(p.feed_iter(im))
    out.extend(p.finish())
    return out


def _split(out, images):
    vne = [o for o in out if isinstance(o, ismrmrd.Image) and o.image_series_index >= 1000]
    passed = [o for o in out if not any(o is v for v in vne)]
    assert len(passed) == len(images) and all(a is b for a, b in zip(passed, images)), "an original was lost or changed"
    return vne


def test_pool_runs_jobs_and_skips_when_full_or_late():
    pool = SliceWorkers(workers=1, max_queued=1, max_wait_s=60.0)
    gate, started = threading.Event(), threading.Event()
    ran, skipped = [], []

    def blocker():
        started.set()
        gate.wait(30)
        ran.append("blocker")

    assert pool.submit(blocker, skipped.append)
    assert started.wait(30)
    pool.max_wait_s = 0.0                                                  # anything that waits is late
    assert pool.submit(lambda: ran.append("late"), skipped.append)          # queued behind the blocker
    assert not pool.submit(lambda: ran.append("full"), skipped.append)     # queue full: skipped at once
    assert "overloaded" in skipped[0] and "--vne-queue" in skipped[0]
    gate.set()
    pool._q.join()
    assert ran == ["blocker"]                                               # the queued one came up too late
    assert len(skipped) == 2 and "waited" in skipped[1]
    assert (pool.stats.skipped_full, pool.stats.skipped_late, pool.stats.done) == (1, 1, 1)


def test_a_stream_with_workers_gives_the_same_vne_as_inline(stream, model):
    header, images = stream
    cfg = PipelineConfig(model=str(model.path), cache_dir="none")
    inline = _split(_feed_all(VNEPipeline(cfg, header=header, model=model), images), images)
    sent = []
    p = VNEPipeline(cfg, header=header, model=model, workers=SliceWorkers(workers=2), emit=LockedSender(sent.append))
    pooled = _split(_feed_all(p, images), images)
    assert pooled == []                      # with emit, VNE goes out through it, from the workers
    assert len(sent) == len(inline) == len(p.results) > 0
    by_slice = {im.slice: im for im in sent}
    for a in inline:
        b = by_slice[a.slice]
        assert (b.data == a.data).all() and b.image_series_index == a.image_series_index
    assert sorted(im.image_index for im in sent) == list(range(1, len(sent) + 1))


def test_without_emit_finished_vne_follows_a_later_item(stream, model):
    header, images = stream
    p = VNEPipeline(PipelineConfig(model=str(model.path), cache_dir="none"), header=header, model=model,
                    workers=SliceWorkers(workers=1))
    vne = _split(_feed_all(p, images), images)
    assert len(vne) == len(p.results) > 0


def test_overload_skips_vne_with_a_reason_and_passes_everything(stream, model, caplog):
    header, images = stream
    pool = SliceWorkers(workers=1, max_queued=1)
    gate, started = threading.Event(), threading.Event()
    pool.submit(lambda: (started.set(), gate.wait(60)), lambda reason: None)   # another stream's slice, stuck
    assert started.wait(30)
    sent = []
    p = VNEPipeline(PipelineConfig(model=str(model.path), cache_dir="none"), header=header, model=model,
                    workers=pool, emit=sent.append)
    out = []
    for im in images:
        out.extend(p.feed_iter(im))          # never blocks on VNE: the worker is stuck
    gate.set()
    out.extend(p.finish())
    _split(out, images)
    n_slices = len({im.slice for im in images})
    skipped = [m for m in p.problems if "server overloaded" in m]
    assert len(skipped) + len(sent) == n_slices and skipped, p.problems
    assert any("every image passed through" in m for m in skipped)


def test_the_model_loads_while_images_arrive(stream, model):
    header, images = stream
    p = VNEPipeline(PipelineConfig(model=str(model.path), cache_dir="none"), header=header, load_async=True)
    vne = _split(_feed_all(p, images), images)
    assert len(vne) == len(p.results) > 0 and p.disabled_reason is None


def test_a_model_that_fails_to_load_in_the_background_still_passes_everything(stream, tmp_path):
    header, images = stream
    p = VNEPipeline(PipelineConfig(model=str(tmp_path / "missing.onnx"), cache_dir="none"), header=header,
                    load_async=True)
    assert _split(_feed_all(p, images), images) == []
    assert p.disabled_reason and "does not exist" in p.disabled_reason


def test_a_reader_that_falls_behind_abandons_vne_and_passes_everything(stream, model, monkeypatch):
    import vne.runtime.pipeline as P

    header, images = stream
    monkeypatch.setattr(P, "INBOX_MAX_ITEMS", 3)
    gate = threading.Event()
    p = VNEPipeline(PipelineConfig(model=str(model.path), cache_dir="none"), header=header, model=model,
                    workers=SliceWorkers(workers=1), emit=lambda im: None)
    real = p._process_item
    monkeypatch.setattr(p, "_process_item", lambda item: (gate.wait(60), real(item))[1])
    out = []
    for im in images:
        out.extend(p.feed_iter(im))          # the reader is stuck on the first image: the stream goes on
    gate.set()
    out.extend(p.finish())
    _split(out, images)
    assert p._abandoned and any("VNE abandoned for the rest of the stream" in m for m in p.problems)


def test_the_gpu_benchmark_skips_cleanly_without_a_gpu():
    import subprocess
    import sys

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is installed: the benchmark would measure, not skip")
    r = subprocess.run([sys.executable, str(H.REPO / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "skipped" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="one core: BLAS runs on one thread anyway")
def test_a_loaded_model_leaves_numpy_blas_on_one_thread():
    """The slice path's small BLAS products spun OpenBLAS's threads against ONNX Runtime's (0.7 ->
    15.6 ms for the cine cycle under load): loading a model limits numpy's BLAS to one thread.
    Run in a fresh interpreter, since the limit is per process."""
    import json
    import subprocess
    import sys

    code = ("import numpy, sys; from threadpoolctl import threadpool_info; from vne.runtime.model import load_model\n"
            "before = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
            f"load_model({str(H.tiny_model())!r})\n"
            "after = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
            "print(before); print(after)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    before, after = (json.loads(x) for x in out.strip().splitlines()[-2:])
    if not before or max(before) == 1:
        pytest.skip(f"BLAS already runs on one thread here (OPENBLAS_NUM_THREADS?): the test cannot tell ({out})")
    assert after and all(n == 1 for n in after), out


@pytest.mark.parametrize("pooled", [False, True])
def test_a_finished_stream_is_freed_without_waiting_for_the_cyclic_gc(stream, model, pooled):
    """A stream's images must go when the stream lets go of its pipeline. A reference cycle
    (pipeline -> its parts -> a callback bound to the pipeline) kept them until the next cyclic
    collection: ``vne serve`` idled at ~670 MB after 3 rounds of 5 streams, against ~200 MB without
    the cycle (benchmarks/bench_load.py). With the collector off, dropping the pipeline frees it."""
    import gc
    import weakref

    header, images = stream
    cfg = PipelineConfig(model=str(model.path), cache_dir="none")
    sent = []
    pool = SliceWorkers(workers=1) if pooled else None
    gc.collect()
    gc.disable()
    try:
        p = VNEPipeline(cfg, header=header, model=model, workers=pool, emit=LockedSender(sent.append) if pooled else None)
        _feed_all(p, images)
        if pool is not None:
            pool._q.join()                                   # the workers are done with its jobs
        assert p.results, "the stream made no VNE: the test would prove nothing"
        ref = weakref.ref(p)
        inputs = weakref.ref(p.intake)
        del p
        assert ref() is None and inputs() is None, "the finished pipeline is only freed by the cyclic collector"
    finally:
        gc.enable()
