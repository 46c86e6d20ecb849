"""One stream's slices in the shared VNE worker pool, and its finished VNE images on their way out.

With a worker pool (:mod:`vne.runtime.workers`: ``vne serve``, the gadget) each complete slice
becomes a job there and the stream goes on at once; a job's VNE image goes to the stream's
``emit`` (the connection's locked ``send``) as soon as it is made, or, without ``emit``, waits
in the outbox until the pipeline hands it out (:meth:`SliceJobs.drain`). At the end of the
stream :meth:`SliceJobs.wait` waits for the jobs still open, at most the pool's queue wait +
:data:`JOB_RUN_LIMIT_S`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

# How long finish() waits for a slice that a worker has started, beyond the pool's queue wait.
JOB_RUN_LIMIT_S = 120.0


class SliceJobs:
    """The open jobs and the outbox of one stream.

    Args:
        workers: the :class:`vne.runtime.workers.SliceWorkers` pool, or None (slices run inline;
            only the outbox is used).
        emit: where a finished VNE image (``ismrmrd.Image``) is sent; None: the outbox.
        lock: the stream's lock (it also guards the pipeline's results and series numbering).
        problem: reports a reason, logged and listed (``problem(message)``).
        internal_error: lists an internal error's text (already logged).
    """

    def __init__(self, workers, emit, lock: threading.RLock, problem: Callable[[str], None],
                 internal_error: Callable[[str], None]) -> None:
        self.workers = workers
        self._emit = emit
        self._lock = lock
        self._problem = problem
        self._internal_error = internal_error
        self._done = threading.Condition(lock)
        self._open = 0
        self._outbox: list = []     # finished VNE images not yet handed out

    def submit(self, key: str, make: Callable[[], object]) -> None:
        """Run ``make`` (the VNE image of slice ``key``, or None) in the pool and deliver its image."""
        with self._lock:
            self._open += 1

        def run() -> None:
            try:
                image = make()
                if image is not None:
                    self.deliver(image)
            except Exception as exc:  # the slice reports its own; this is encoding or delivery
                log.exception("VNE: internal error finishing %s", key)
                self._internal_error(f"internal error: {exc.__class__.__name__}: {exc}")
            finally:
                self._closed()

        def skip(reason: str) -> None:
            try:
                self._problem(f"no VNE for {key}: {reason}; every image passed through")
            finally:
                self._closed()

        self.workers.submit(run, skip)

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1
            self._done.notify_all()

    def deliver(self, image) -> None:
        """A finished VNE image: to ``emit`` (a failure is logged), else to the outbox."""
        if self._emit is None:
            with self._lock:
                self._outbox.append(image)
            return
        try:
            self._emit(image)
        except Exception as exc:  # the connection is gone: the stream's own thread reports it
            log.error("VNE: could not send VNE image %d of series %d (%s: %s)", image.image_index,
                      image.image_series_index, exc.__class__.__name__, exc)

    def drain(self) -> list:
        """The VNE images in the outbox, now out of it."""
        if not self._outbox:
            return []
        with self._lock:
            out, self._outbox = self._outbox, []
        return out

    def wait(self) -> None:
        """Until this stream's slices in the worker pool are done (or skipped)."""
        if self.workers is None:
            return
        limit = self.workers.max_wait_s + JOB_RUN_LIMIT_S
        deadline = time.monotonic() + limit
        with self._lock:
            while self._open > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._problem(f"{self._open} slice(s) still computing {limit:.0f} s after the stream ended; "
                                  f"their VNE will not be sent")
                    return
                self._done.wait(left)
