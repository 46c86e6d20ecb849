"""The bounded pool of threads that computes VNE, shared by every stream of a process.

A stream's own thread only passes images through, decodes and matches them; each slice whose
inputs are complete becomes one job here (:meth:`SliceWorkers.submit`), so no slice waits for
another slice of its stream to finish and no stream's pass-through waits for VNE.

Bounds (back-pressure), each with a logged reason when it costs a slice its VNE (the images
themselves always pass through):

* at most ``max_queued`` slices wait; a slice that finds the queue full is skipped at once
  ("server overloaded");
* a slice that waited longer than ``max_wait_s`` before a worker was free is skipped (its VNE
  would come too late to help planning);
* ``workers`` threads run at a time, sharing the process's one model session
  (:func:`vne.runtime.model.load_model`).

:func:`shared_workers` is the process-wide pool (``vne serve`` sizes it with ``--vne-workers``,
``--vne-queue``, ``--vne-max-wait``; execute mode gets the defaults). Without a pool
(:class:`vne.runtime.pipeline.VNEPipeline` with ``workers=None``: ``vne infer``, ``vne evaluate``, tests)
each slice runs inline, as soon as it is complete.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 48
DEFAULT_MAX_WAIT_S = 20.0


def default_workers() -> int:
    """One worker per two cores (each model run uses the cores ONNX Runtime is given), at least
    one, at most four."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class PoolStats:
    submitted: int = 0
    done: int = 0
    skipped_full: int = 0
    skipped_late: int = 0
    failed: int = 0
    peak_queued: int = 0


class SliceWorkers:
    """A fixed set of worker threads over a bounded queue of slice jobs (module docstring)."""

    def __init__(self, workers: int | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, name: str = "vne-worker") -> None:
        self.n_workers = max(1, int(workers or default_workers()))
        self.max_queued = max(1, int(max_queued))
        self.max_wait_s = float(max_wait_s)
        self.stats = PoolStats()
        self._q: queue.Queue = queue.Queue(maxsize=self.max_queued)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._name = name

    def _start(self) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.n_workers:
                t = threading.Thread(target=self._loop, name=f"{self._name}-{len(self._threads) + 1}", daemon=True)
                t.start()
                self._threads.append(t)

    def submit(self, run: Callable[[], None], skip: Callable[[str], None]) -> bool:
        """Queue one job. ``run()`` does the work; ``skip(reason)`` is called instead (now, or
        when the job comes up too late). Never blocks. Returns False when skipped at once."""
        self._start()
        try:
            self._q.put_nowait((run, skip, time.monotonic()))
        except queue.Full:
            with self._lock:
                self.stats.skipped_full += 1
            skip(f"server overloaded: {self.max_queued} slices already wait for a VNE worker "
                 f"({self.n_workers} worker(s); vne serve --vne-queue / --vne-workers)")
            return False
        with self._lock:
            self.stats.submitted += 1
            self.stats.peak_queued = max(self.stats.peak_queued, self._q.qsize())
        return True

    def _loop(self) -> None:
        while True:
            run, skip, t_in = self._q.get()
            try:
                waited = time.monotonic() - t_in
                if waited > self.max_wait_s:
                    with self._lock:
                        self.stats.skipped_late += 1
                    skip(f"server overloaded: the slice waited {waited:.1f} s for a VNE worker "
                         f"(limit {self.max_wait_s:g} s, vne serve --vne-max-wait)")
                    continue
                run()
                with self._lock:
                    self.stats.done += 1
            except Exception:  # a job reports its own errors; this keeps the worker alive
                log.exception("VNE worker: job failed")
                with self._lock:
                    self.stats.failed += 1
            finally:
                run = skip = None  # the job's closure holds its stream's pipeline: let it go now
                self._q.task_done()

    def queued(self) -> int:
        return self._q.qsize()


_shared: SliceWorkers | None = None
_shared_lock = threading.Lock()


def shared_workers() -> SliceWorkers:
    """The process-wide pool (created with the defaults on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SliceWorkers()
        return _shared


def configure(workers: int | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
              max_wait_s: float = DEFAULT_MAX_WAIT_S) -> SliceWorkers:
    """Set up the process-wide pool (``vne serve`` at start, before any connection)."""
    global _shared
    with _shared_lock:
        _shared = SliceWorkers(workers, max_queued, max_wait_s)
        return _shared


class LockedSender:
    """``send(item)`` under one lock: a stream's thread (pass-through) and the VNE workers
    (results) write to one connection."""

    def __init__(self, send: Callable) -> None:
        self._send = send
        self._lock = threading.Lock()

    def __call__(self, item) -> None:
        with self._lock:
            self._send(item)
