"""On-disk study cache: images seen in one connection, found again by a later one of the same study.

A Gadgetron connection carries one scan (``../shared/docs/scanner-streams.md``): the cine scan
and the T1-mapping scan of a study arrive in different connections, often minutes apart and
possibly in different processes. The gadget therefore stores the images VNE needs (cine, IR
magnitude and IR phase; not LGE) here when a connection ends, and the T1-mapping connection
looks them up by (StudyInstanceUID, FrameOfReferenceUID) from its ISMRMRD header.

Layout (``root`` is created with mode 0700: the entries hold patient images)::

    root/<study hash>/<entry id>.npz    pixels of one (role, series, plane) group, compressed;
                                        ``p0000``, ``p0001``, ... (uint16 when lossless, else float32)
    root/<study hash>/<entry id>.json   what the images are: role, geometry, TI / trigger time,
                                        meta, the study identifiers, the source connection

``<study hash>`` is a SHA-256 of the two UIDs (no identifiers in file names). Both files are
written to a temporary name (``.<name>.<pid>.<random>.tmp``), fsync'ed and renamed into place,
then the folder is fsync'ed (the JSON last: it marks the entry complete), so a reader never sees
half an entry, a crash leaves no corrupt one, and an entry that :meth:`StudyCache.put` wrote is on
disk. The servers wait for a stream's background write (:func:`wait_for_write`, up to
:data:`WRITE_WAIT_S`) before sending that stream's CLOSE: an acknowledged stream's entries
survive a kill of the server. Leftover temporary files of processes that are gone are deleted at
a process's first use of the folder (:func:`sweep_stale`).

Trust: the folder must be private (:func:`folder_problem`: a real directory, not a symlink,
owned by this user, not writable by group or others; a missing one is created 0700), else the
cache is refused with a logged reason and the pipeline runs without it. Each record stores
the sha256 of its npz; on read the npz must be the record's own file inside the cache root and
match that hash, and any failure (mismatch, damaged zip, bad record) drops the entry with a
logged reason instead of raising.

Limits: entries older than ``max_age_hours`` are ignored and deleted; when the whole cache is
larger than ``max_mb`` the oldest entries are deleted first. Both are enforced on every write;
a ``max_mb`` smaller than one entry is logged as a WARNING, once per process (the cache then
keeps nothing).
An unwritable or unreadable folder is logged once and the cache behaves as empty: the
pipeline carries on without it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from ..exam.data import Geometry, MRImage, Role

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: records carry npz_sha256
CACHED_ROLES = (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE)
DEFAULT_MAX_MB = 2048.0
DEFAULT_MAX_AGE_HOURS = 48.0
ENV_CACHE_DIR = "VNE_CACHE_DIR"
ENV_XDG_CACHE = "XDG_CACHE_HOME"
_STALE_TMP_S = 3600.0
_WAIT_S = 60.0
WRITE_WAIT_S = 30.0  # how long a stream's CLOSE waits for its study-cache write
# roots swept for leftovers by this process (once each, before its first write there)
_swept: set[str] = set()
# (root, max_bytes) already warned about: cache_max_mb smaller than one entry, once per process
_size_warned: set[tuple[str, int]] = set()
_state_lock = threading.Lock()
# study hash -> Event set when this process's background write of that study is done
_inflight: dict[str, threading.Event] = {}
_inflight_lock = threading.Lock()


def default_cache_dir() -> Path:
    """$VNE_CACHE_DIR, else ``$XDG_CACHE_HOME/vne-study-cache`` (when set to an absolute path),
    else ``<tmp>/vne-study-cache-<uid>``. Whichever it is must pass :func:`folder_problem`."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    xdg = os.environ.get(ENV_XDG_CACHE, "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "vne-study-cache"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"vne-study-cache-{uid}"


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold patient images, or None when it is private to this user.

    Refused: a symlink (even to a good folder: point the setting at the real one), not a
    directory, owned by another user, or writable by group or others.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        return f"is a symlink (to {os.path.realpath(path)}); use a real folder private to this user"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        who = "others" if st.st_mode & 0o002 else "its group"
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); it must be private to this user (0700)"
    return None


def study_hash(study_uid: str, frame_of_reference_uid: str) -> str:
    return hashlib.sha256(f"{study_uid}\0{frame_of_reference_uid}".encode()).hexdigest()[:24]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(fileobj)`` into a temporary file next to ``path`` (named
    ``.<name>.<pid>.<random>.tmp``: :func:`sweep_stale` knows whose it is), fsync it, rename it
    into place and fsync the folder, so the entry survives a crash of the process or the machine
    once this returns."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def sweep_stale(root: Path, now: float | None = None, *, at_start: bool = False) -> int:
    """Delete leftovers of interrupted writes under ``root``; returns the number deleted.

    A temporary file is named after the process writing it (:func:`_atomic_write`). At start
    (``at_start``: before this process's first write to ``root``) the temporary files of
    processes that are gone, and of this process id (left by an earlier process that had it),
    are deleted whatever their age; later (every eviction) those of processes that are gone once
    a minute old. Any temporary file, and any npz whose record never landed, older than an hour
    goes too. (A process of another PID namespace sharing the folder looks gone: give each
    container its own cache folder.)"""
    now = time.time() if now is None else now
    me = os.getpid()
    n = 0
    try:
        candidates = list(root.glob("*/.*.tmp")) + list(root.glob("*/*.npz"))
    except OSError:
        return 0
    for p in candidates:
        try:
            age = now - p.stat().st_mtime
            if p.suffix == ".tmp":
                parts = p.name.split(".")  # '', entry, npz|json, pid, random, tmp
                pid = int(parts[3]) if len(parts) >= 6 and parts[3].isdigit() else None
                if pid is None:
                    dead = False
                elif at_start:
                    dead = pid == me or not _pid_alive(pid)
                else:
                    dead = pid != me and not _pid_alive(pid) and age > 60.0
                if dead or age > _STALE_TMP_S:
                    p.unlink()
                    n += 1
            elif age > _STALE_TMP_S and not p.with_suffix(".json").exists():
                p.unlink()
                n += 1
        except OSError:
            pass
    if n:
        log.info("study cache %s: %d leftover(s) of interrupted writes deleted", root, n)
    return n


def wait_for_write(thread, timeout_s: float = None) -> bool:
    """Wait for a background study-cache write (:meth:`StudyCache.put_async`) to be on disk;
    the servers call this before sending a stream's CLOSE. Returns False (logged) if it is still
    running after ``timeout_s`` (default :data:`WRITE_WAIT_S`)."""
    if thread is None:
        return True
    timeout_s = WRITE_WAIT_S if timeout_s is None else timeout_s
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("study cache: the write of this stream is still running after %.0f s; the stream is closed "
                    "anyway and the write goes on in the background (not yet durable)", timeout_s)
        return False
    return True


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with zlib level 1 (about twice as fast, nearly as small)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for k, v in arrays.items():
            with z.open(k + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(v), allow_pickle=False)


def _geometry_dict(g: Geometry) -> dict:
    return {"position_mm": list(g.position_mm), "read_dir": list(g.read_dir), "phase_dir": list(g.phase_dir),
            "pixel_spacing_mm": list(g.pixel_spacing_mm), "shape": list(g.shape),
            "slice_thickness_mm": g.slice_thickness_mm}


def _geometry_from(d: dict) -> Geometry:
    return Geometry(position_mm=tuple(float(v) for v in d["position_mm"]), read_dir=tuple(float(v) for v in d["read_dir"]),
                    phase_dir=tuple(float(v) for v in d["phase_dir"]),
                    pixel_spacing_mm=tuple(float(v) for v in d["pixel_spacing_mm"]),
                    shape=tuple(int(v) for v in d["shape"]), slice_thickness_mm=float(d["slice_thickness_mm"]))


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _compact(px: np.ndarray) -> np.ndarray:
    """uint16 when that is lossless (scanner magnitudes), else float32."""
    a = np.asarray(px, np.float32)
    if a.size and np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 65535 and np.all(a == np.round(a)):
        return a.astype(np.uint16)
    return a


class StudyCache:
    """Images of a study kept on disk across connections and restarts.

    Args:
        root: the cache folder (created on first write).
        max_mb: size limit of the whole cache; oldest entries go first.
        max_age_hours: entries older than this are ignored and deleted.
    """

    def __init__(self, root, max_mb: float = DEFAULT_MAX_MB, max_age_hours: float = DEFAULT_MAX_AGE_HOURS) -> None:
        self.root = Path(root)
        self.max_bytes = int(float(max_mb) * 1024 * 1024)
        self.max_age_s = float(max_age_hours) * 3600.0
        self._warned = False
        self._refused: str | None = None
        self._trusted = False
        self._size_warned = False

    def _warn_once(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            log.warning("study cache %s: %s (%s); continuing without it", self.root, what, exc)
            self._warned = True

    def _usable(self, create: bool) -> bool:
        """Whether the root may be used (checked once per instance, created 0700 if asked);
        a refusal is logged once with its reason."""
        if self._trusted:
            return True
        if self._refused is not None:
            return False
        if not os.path.lexists(self.root):
            if not create:
                return False
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                self._warn_once("cannot create the folder", exc)
                return False
        problem = folder_problem(self.root)
        if problem:
            self._refused = problem
            log.error("study cache %s refused: it %s; running without the study cache", self.root, problem)
            return False
        with _state_lock:  # the first use of this folder in this process: sweep leftovers first
            key = os.path.realpath(self.root)
            if key not in _swept:
                _swept.add(key)
                sweep_stale(self.root, at_start=True)
        self._trusted = True
        return True

    def _drop(self, js: Path, why: str) -> None:
        """Delete a bad entry (its record and its own npz, both inside the folder) and log why."""
        log.warning("study cache: entry %s/%s %s; entry deleted", js.parent.name, js.stem, why)
        self._remove(js, js.with_suffix(".npz"))

    # ------------------------------------------------------------------ writing
    def put(self, images: list[MRImage], *, study_uid: str, frame_of_reference_uid: str, origin: str) -> int:
        """Store the cine / IR images of one study; returns the number of entries written.

        Images are grouped by (role, series, plane); an entry with the same origin (the
        connection's measurement ID), role, series and plane is replaced.
        """
        from ..prepare.slices import group_by_plane

        if not (study_uid or frame_of_reference_uid):
            log.info("study cache: no study or frame-of-reference UID; nothing cached")
            return 0
        images = [im for im in images if im.role in CACHED_ROLES]
        if not images:
            return 0
        folder = self.root / study_hash(study_uid, frame_of_reference_uid)
        if not self._usable(create=True):
            return 0
        try:
            folder.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            self._warn_once("cannot create the folder", exc)
            return 0
        written = largest = 0
        for role in CACHED_ROLES:
            for group in group_by_plane([im for im in images if im.role == role]):
                g0 = group[0].geometry
                ident = f"{origin}|{role.value}|{group[0].series}|{np.round(g0.position_mm, 1).tolist()}"
                entry = hashlib.sha256(ident.encode()).hexdigest()[:20]
                try:
                    largest = max(largest, self._write_entry(folder, entry, role, group, study_uid,
                                                             frame_of_reference_uid, origin))
                    written += 1
                except OSError as exc:
                    self._warn_once("cannot write an entry", exc)
                    return written
        if written:
            log.info("study cache: stored %d entr%s (%d images) for study ...%s in %s", written,
                     "y" if written == 1 else "ies", len(images), study_uid[-8:], folder)
        if largest > self.max_bytes and not self._size_warned:
            self._size_warned = True
            with _state_lock:
                key = (os.path.realpath(self.root), self.max_bytes)
                first = key not in _size_warned
                _size_warned.add(key)
            if first:
                log.warning("study cache: one entry is %.2f MB, more than cache_max_mb (%.2f MB): every entry is "
                            "evicted as soon as it is written, so later connections find nothing; raise cache_max_mb",
                            largest / 2**20, self.max_bytes / 2**20)
        self.evict()
        return written

    def _write_entry(self, folder: Path, entry: str, role: Role, group: list[MRImage], study_uid: str,
                     for_uid: str, origin: str) -> int:
        """Write one entry; returns its size in bytes (npz + record)."""
        arrays = {f"p{k:04d}": _compact(im.pixels) for k, im in enumerate(group)}
        npz = folder / f"{entry}.npz"
        buf = io.BytesIO()
        _write_npz(buf, arrays)
        data = buf.getvalue()
        _atomic_write(npz, lambda f: f.write(data))
        record = {
            "version": CACHE_VERSION, "study_uid": study_uid, "frame_of_reference_uid": for_uid,
            "patient_id": group[0].patient_id, "origin": origin, "created": time.time(), "role": role.value,
            "series": group[0].series, "npz": npz.name, "npz_bytes": len(data),
            "npz_sha256": hashlib.sha256(data).hexdigest(),
            "images": [{
                "key": f"p{k:04d}", "geometry": _geometry_dict(im.geometry),
                "inversion_time_ms": im.inversion_time_ms, "trigger_time_ms": im.trigger_time_ms,
                "rr_interval_ms": im.rr_interval_ms, "series_description": im.series_description,
                "meta": {str(mk): _jsonable(mv) for mk, mv in im.meta.items()}, "source": im.source,
            } for k, im in enumerate(group)],
        }
        text = json.dumps(record).encode()
        _atomic_write(folder / f"{entry}.json", lambda f: f.write(text))
        return len(data) + len(text)

    def put_async(self, images: list[MRImage], *, study_uid: str, frame_of_reference_uid: str, origin: str) -> threading.Thread:
        """:meth:`put` in a background (non-daemon) thread, so a connection can close at once.

        A :meth:`get` of the same study in this process waits for it to finish.
        """
        h = study_hash(study_uid, frame_of_reference_uid)
        done = threading.Event()
        with _inflight_lock:
            _inflight[h] = done

        def work():
            try:
                self.put(images, study_uid=study_uid, frame_of_reference_uid=frame_of_reference_uid, origin=origin)
            except Exception as exc:  # never surfaces: the cache is best effort
                log.warning("study cache: background write failed (%s)", exc)
            finally:
                done.set()
                with _inflight_lock:
                    if _inflight.get(h) is done:
                        del _inflight[h]

        t = threading.Thread(target=work, name="vne-study-cache-write", daemon=False)
        t.start()
        return t

    # ------------------------------------------------------------------ reading
    def get(self, *, study_uid: str, frame_of_reference_uid: str, exclude_origin: str | None = None) -> list[MRImage]:
        """Every cached image of a study (cine, IR magnitude, IR phase), oldest entry first.

        Args:
            exclude_origin: skip entries written by this connection (its own images).
        """
        if not (study_uid or frame_of_reference_uid):
            return []
        h = study_hash(study_uid, frame_of_reference_uid)
        with _inflight_lock:
            pending = _inflight.get(h)
        if pending is not None and not pending.wait(_WAIT_S):
            log.warning("study cache: a write of this study is still running after %.0f s; reading what is there", _WAIT_S)
        folder = self.root / h
        if not self._usable(create=False):
            return []
        try:
            entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError as exc:
            if folder.exists():
                self._warn_once("cannot list the study folder", exc)
            return []
        now = time.time()
        out: list[MRImage] = []
        root = self.root.resolve()
        for js in entries:
            stamp = None
            try:
                st = js.stat()
                stamp = st.st_mtime_ns
                if now - st.st_mtime > self.max_age_s:
                    continue
                rec = json.loads(js.read_text())
                if rec.get("version") != CACHE_VERSION or rec.get("study_uid") != study_uid \
                        or rec.get("frame_of_reference_uid") != frame_of_reference_uid:
                    continue
                if exclude_origin is not None and rec.get("origin") == exclude_origin:
                    continue
                npz = (folder / str(rec["npz"])).resolve()
                if npz.parent != folder.resolve() or root not in npz.parents:
                    self._drop(js, f"points outside the cache root ({str(rec['npz'])[:120]!r} -> {npz}); refused")
                    continue
                if npz.name != js.with_suffix(".npz").name:
                    self._drop(js, f"names another entry's pixels ({npz.name}); refused")
                    continue
                data = npz.read_bytes()
                if len(data) != rec["npz_bytes"] or hashlib.sha256(data).hexdigest() != rec["npz_sha256"]:
                    if js.stat().st_mtime_ns != stamp:
                        continue  # rewritten meanwhile (same connection): the next read sees the new one
                    self._drop(js, f"pixels do not match the stored sha256 ({len(data)} bytes, record "
                                   f"{rec['npz_bytes']}): damaged or altered")
                    continue
                role = Role(rec["role"])
                with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                    images = [MRImage(
                        pixels=np.asarray(arrays[item["key"]], np.float32),
                        geometry=_geometry_from(item["geometry"]), role=role,
                        series=f"cache:{rec['origin']}:{rec['series']}",
                        series_description=item.get("series_description", ""),
                        inversion_time_ms=item.get("inversion_time_ms"), trigger_time_ms=item.get("trigger_time_ms"),
                        rr_interval_ms=item.get("rr_interval_ms"), study_uid=study_uid,
                        frame_of_reference_uid=frame_of_reference_uid, patient_id=rec.get("patient_id", ""),
                        meta=item.get("meta", {}), source=f"study cache ({rec['origin']}: {item.get('source', '')})",
                    ) for item in rec["images"]]
                out.extend(images)  # all of an entry or none of it
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            except Exception as exc:  # BadZipFile, OSError, ValueError, KeyError, TypeError, ...: never raised
                try:
                    self._drop(js, f"is unreadable ({exc.__class__.__name__}: {str(exc)[:200]})")
                except OSError:
                    pass
        return out

    # ------------------------------------------------------------------ limits
    def _entries(self) -> list[tuple[float, int, Path, Path]]:
        """(mtime, bytes, json, npz) of every complete entry."""
        out = []
        if not self._usable(create=False):
            return out
        for js in self.root.glob("*/*.json"):
            npz = js.with_suffix(".npz")
            try:
                st = js.stat()
                size = st.st_size + (npz.stat().st_size if npz.exists() else 0)
                out.append((st.st_mtime, size, js, npz))
            except OSError:
                continue
        return out

    def total_bytes(self) -> int:
        return sum(e[1] for e in self._entries())

    def evict(self) -> tuple[int, int]:
        """Delete expired entries, then the oldest until the cache fits ``max_mb``.

        Returns:
            (entries removed, bytes freed).
        """
        removed = freed = 0
        if not self._usable(create=False):
            return removed, freed
        try:
            now = time.time()
            entries = sorted(self._entries())
            keep = []
            for mtime, size, js, npz in entries:
                if now - mtime > self.max_age_s:
                    self._remove(js, npz)
                    removed, freed = removed + 1, freed + size
                else:
                    keep.append((mtime, size, js, npz))
            total = sum(e[1] for e in keep)
            for mtime, size, js, npz in keep:
                if total <= self.max_bytes:
                    break
                self._remove(js, npz)
                total -= size
                removed, freed = removed + 1, freed + size
            # leftovers of interrupted writes, and npz files whose record never landed
            sweep_stale(self.root, now)
            for d in [d for d in self.root.iterdir() if d.is_dir()]:
                try:
                    d.rmdir()  # only succeeds when empty
                except OSError:
                    pass
        except OSError as exc:
            self._warn_once("eviction failed", exc)
        if removed:
            log.info("study cache: evicted %d entr%s (%.1f MB)", removed, "y" if removed == 1 else "ies", freed / 1e6)
        return removed, freed

    @staticmethod
    def _remove(js: Path, npz: Path) -> None:
        for p in (js, npz):  # the record first: a reader never finds a record without pixels
            try:
                p.unlink()
            except FileNotFoundError:
                pass
