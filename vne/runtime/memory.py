"""Keeping a long-running server's memory flat (glibc malloc; elsewhere these do nothing).

A stream's images are freed when it ends, but glibc keeps freed memory in per-thread arenas
(up to 8 per core) and returns little of it to the system: ``vne serve`` idled at ~1 GB after
three rounds of 10 concurrent streams, against 140 MB fresh (issue 12). Two remedies:

* :func:`limit_arenas` (at server start): at most ``n`` malloc arenas (default 4), so one
  connection thread's freed blocks are reused by the next instead of parked in an arena of their
  own. Measured with ``benchmarks/bench_load.py`` (3 rounds of 1, 20, 50 streams, 2 cores): 2
  arenas kept the RSS after each level within 25 MB of fresh but made VNE ~1.5x slower (threads
  wait for the arena locks); glibc's default (16 here) let it grow 60 MB after 20 streams;
  4 kept it within 20 MB at about the default's speed;
* :func:`trim` (when a stream ends): give free heap memory back to the system.

:func:`rss_mb` and :func:`peak_rss_mb` read ``/proc/self/status`` (benchmarks, logs).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

M_ARENA_MAX = -8          # mallopt parameter (glibc malloc.h)
DEFAULT_ARENAS = 4

_libc = None
_libc_lock = threading.Lock()


def _glibc():
    global _libc
    with _libc_lock:
        if _libc is None:
            try:
                name = ctypes.util.find_library("c")
                lib = ctypes.CDLL(name) if name else None
                _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
            except OSError:
                _libc = False
        return _libc or None


def limit_arenas(n: int = DEFAULT_ARENAS) -> bool:
    """At most ``n`` malloc arenas in this process (glibc ``mallopt(M_ARENA_MAX, n)``; an
    operator's ``MALLOC_ARENA_MAX`` takes precedence). Returns whether it was applied."""
    lib = _glibc()
    if lib is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(lib.mallopt(M_ARENA_MAX, int(n)))


def trim() -> bool:
    """Return free heap memory to the system (glibc ``malloc_trim(0)``)."""
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.malloc_trim(0))


def _status_kb(field: str, pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size (MB)."""
    return _status_kb("VmRSS", pid) / 1024.0


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (MB)."""
    return _status_kb("VmHWM", pid) / 1024.0
