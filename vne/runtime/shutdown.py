"""Bounded shutdown of ``vne serve`` (both protocols): what SIGTERM does to open connections.

The accept loops register every connection (its :class:`vne.io.framing.FrameReader` and its
thread) with a :class:`ConnectionTracker`. When the server stops on request (SIGTERM), the
listener is closed and :meth:`ConnectionTracker.drain`:

1. gives the open connections ``grace_s`` seconds to end on their own (CLOSE from the peer);
2. then stops reading each one still open (:meth:`vne.io.framing.FrameReader.stop`). A connection
   that was waiting between two messages is **idle**: it ends like a stream without CLOSE (VNE
   for its complete slices, its study-cache write, our CLOSE), nothing of it is lost. One that
   was inside a message or still working is **cut**;
3. waits up to ``finish_s`` more for those threads to finish; a thread still running then is
   abandoned (counted as cut; its socket is shut down).

The server then exits with code 0 if nothing was cut, :data:`EXIT_CUT` otherwise, after one log
line with the counts. Without a stop request (``--max-connections`` reached) every connection
is waited for, unbounded, as before.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("vne.serve")

DEFAULT_GRACE_S = 5.0
FINISH_S = 10.0
EXIT_CUT = 3


@dataclass
class DrainResult:
    """What stopping did to the connections open at the stop request."""

    open_at_stop: int = 0
    finished: int = 0       # ended on their own within the grace
    idle_closed: int = 0    # waiting between messages at the end of the grace: ended, nothing lost
    cut: int = 0            # inside a message or still working at the end of the grace
    abandoned: int = 0      # of the cut: threads still running after the finish window
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_CUT if self.cut else 0

    def describe(self) -> str:
        return (f"{self.open_at_stop} connection(s) open at the stop request: {self.finished} finished, "
                f"{self.idle_closed} idle closed, {self.cut} cut" + (f" ({self.abandoned} still running, abandoned)"
                                                                     if self.abandoned else "")
                + f"; {self.seconds:.1f} s")


class ConnectionTracker:
    """The connections a server is serving (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple] = []
        self.result: DrainResult | None = None

    def add(self, reader, thread: threading.Thread, peer) -> None:
        with self._lock:
            self._items = [it for it in self._items if it[1].is_alive() or not it[1].ident] + [(reader, thread, peer)]

    def live(self) -> list[tuple]:
        with self._lock:
            return [it for it in self._items if it[1].is_alive()]

    def drain(self, stop_requested: bool, grace_s: float = DEFAULT_GRACE_S, finish_s: float = FINISH_S) -> DrainResult:
        """End the tracked connections (see the module doc); returns and keeps :attr:`result`."""
        t0 = time.monotonic()
        res = DrainResult()
        items = self.live()
        if not stop_requested:
            for _, t, _ in items:
                t.join()
            res.finished = len(items)
            res.seconds = time.monotonic() - t0
            self.result = res
            return res
        res.open_at_stop = len(items)
        if items:
            log.warning("stopping: %d connection(s) open; up to %.1f s for them to finish", len(items), grace_s)
        deadline = t0 + max(0.0, grace_s)
        for _, t, _ in items:
            t.join(max(0.0, deadline - time.monotonic()))
        stopped = []
        for reader, t, peer in items:
            if not t.is_alive():
                res.finished += 1
                continue
            idle = bool(getattr(reader, "waiting", False))
            reader.stop(f"server stopping: {'idle' if idle else 'still streaming'} after the {grace_s:g} s grace")
            stopped.append((reader, t, peer, idle))
        end = time.monotonic() + max(0.0, finish_s)
        for _, t, _, _ in stopped:
            t.join(max(0.0, end - time.monotonic()))
        for reader, t, peer, idle in stopped:
            if t.is_alive():
                res.cut += 1
                res.abandoned += 1
                log.error("connection from %s still running %.0f s after it was stopped; abandoned", peer, finish_s)
                try:
                    reader.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            elif idle and not getattr(reader, "cut_mid_message", False):
                res.idle_closed += 1
            else:
                res.cut += 1
                log.warning("connection from %s cut by the stop (it was %s)", peer,
                            "inside a message" if getattr(reader, "cut_mid_message", False) else "still working")
        res.seconds = time.monotonic() - t0
        self.result = res
        return res
