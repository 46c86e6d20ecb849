"""The accept loop of ``vne serve``, for both protocols: a thread per connection, a bound on how
many are served at once, and a stop that closes the listener and drains what is open.

:func:`accept_connections` runs it for the Gadgetron external protocol (``vne.commands.serve``:
connections beyond ``max_active`` wait in the listen backlog, none is refused) and for MRD
(:mod:`vne.runtime.mrd_server`: one more connection is accepted and answered "busy"). A failed
``accept()`` is logged and retried with a back-off (:func:`vne.io.framing.accept_once`); the
server never stops listening on its own. After each served connection the freed memory goes
back to the system (:func:`vne.runtime.memory.trim`).
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable

from ..io import framing as F
from . import memory
from .shutdown import ConnectionTracker

log = logging.getLogger(__name__)


def accept_connections(srv: socket.socket, serve_one: Callable[[socket.socket, Any, F.FrameReader], None], *,
                       limits: F.FrameLimits, max_active: int, grace_s: float,
                       busy: Callable[[socket.socket, Any], None] | None = None, max_connections: int = 0,
                       stop: threading.Event | None = None, tracker: ConnectionTracker | None = None,
                       logger: logging.Logger = log, label: str = "", thread_name: str = "vne-conn") -> int:
    """Accept connections on ``srv`` (a listening socket) until ``stop`` is set or
    ``max_connections`` were accepted (0: no limit). Returns the number accepted.

    Args:
        serve_one: serves one accepted connection to its end, in a thread of its own
            (``serve_one(conn, peer, reader)``, ``reader`` the connection's
            :class:`vne.io.framing.FrameReader`); it must not raise.
        limits: the declared message lengths each reader accepts.
        max_active: connections served at once (at least 1).
        grace_s: on ``stop``, seconds open connections get to finish (:mod:`vne.runtime.shutdown`;
            ``tracker.result`` says what happened to them).
        busy: None: while ``max_active`` connections are served no new one is accepted (they
            wait in the listen backlog). Else one more connection is accepted and handed to
            ``busy(conn, peer)`` in a thread of its own (it answers "busy" and closes); a stop
            never cuts it.
        logger, label, thread_name: where the loop's lines are logged, the protocol's name in
            them (``"MRD"``: "MRD connection 3 from ..."; "": "connection 3 from ..."), and the
            threads' names (``vne-conn-3``, ``vne-conn-busy-4``).
    """
    stop = stop or threading.Event()
    tracker = tracker or ConnectionTracker()
    what = f"{label} connection" if label else "connection"
    srv.settimeout(0.5)
    slots = threading.BoundedSemaphore(max(1, int(max_active)))
    n = failures = 0
    saturated = False

    def run_one(conn, peer, reader):
        try:
            serve_one(conn, peer, reader)
        finally:
            slots.release()
            memory.trim()  # the stream's images are free: give the memory back (vne.runtime.memory)

    try:
        while not stop.is_set():
            if busy is None:  # wait for a free slot before accepting
                if not slots.acquire(timeout=0.5):
                    if not saturated:
                        logger.warning("%d connections active (--max-active): new connections wait until one ends",
                                       max_active)
                        saturated = True
                    continue
                saturated = False
            try:
                conn, peer, failures = F.accept_once(srv, stop, failures)
            except F.ListenerClosed:
                if busy is None:
                    slots.release()
                break
            if conn is None:
                if busy is None:
                    slots.release()
                continue
            n += 1
            reader = F.FrameReader(conn, limits)
            served = busy is None or slots.acquire(blocking=False)
            if served:
                logger.info("%s %d from %s", what, n, peer)
                t = threading.Thread(target=run_one, args=(conn, peer, reader), name=f"{thread_name}-{n}", daemon=True)
            else:
                logger.warning("%s %d from %s refused: %d connections active", what, n, peer, max_active)
                reader.waiting = True  # nothing of it is served: a stop never cuts it
                t = threading.Thread(target=busy, args=(conn, peer), name=f"{thread_name}-busy-{n}", daemon=True)
            try:
                t.start()
            except RuntimeError as exc:  # no thread to be had: drop this one, keep listening
                if served:
                    slots.release()
                logger.error("%s %d from %s dropped: cannot start a thread (%s)", what, n, peer, exc)
                try:
                    conn.close()
                except OSError:
                    pass
                continue
            tracker.add(reader, t, peer)
            if max_connections and n >= max_connections:
                break
    finally:
        srv.close()
        if stop.is_set():
            logger.warning("%sstop requested: no longer accepting connections (listener closed)",
                           f"{label}: " if label else "")
        tracker.drain(stop.is_set(), grace_s)
    return n
