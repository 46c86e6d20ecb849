"""``vne serve --protocol mrd``: VNE behind the MRD streaming protocol (python-ismrmrd-server,
Siemens FIRE / OpenRecon), so that MRD clients (python-ismrmrd-server's ``client.py``,
``gadgetron_ismrmrd_client``) reach VNE. Documented in ``docs/mrd-server.md``.

A connection, as python-ismrmrd-server's server handles it:

    CONFIG_FILE name | CONFIG_TEXT text      which program: ``vne`` runs VNE
    HEADER xml                               the ISMRMRD header (``metadata``)
    [TEXT json]                              optional JSON parameters right after HEADER
    IMAGE / ACQUISITION / WAVEFORM ...       the data
    CLOSE

and the server answers with every input message byte-identical (the exact bytes framed by
:mod:`vne.io.framing`), the VNE images as their own series, TEXT logging messages
(``"WARNING  text\\0"``, python-ismrmrd-server's ``send_logging`` format) for every problem,
and CLOSE last. Nothing here raises out of a connection: an error is a TEXT message followed by
CLOSE, never a dropped connection.

Entry points: :func:`process` (the VNE program for one connection, python-ismrmrd-server's
``process(connection, config, metadata)``), :func:`passthrough` (any other config name),
:func:`handle` (one accepted socket) and :func:`serve` (the accept loop,
:func:`vne.runtime.listener.accept_connections`: a thread per connection, at most ``max_active`` at once).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from ..io import framing as F
from ..errors import InputError

log = logging.getLogger("vne.mrd")

DEFAULT_PORT = 9002  # python-ismrmrd-server's and OpenRecon's port
VNE_CONFIG = "vne"

# python-ismrmrd-server's logging severities: the TEXT body is "<level padded to 8> <text>"
DEBUG, INFO, WARNING, ERROR, CRITICAL = "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"

# JSON parameters a client may not set: server-side paths stay the server's (--model, --cache-dir)
from .config import SERVER_ONLY_PROPERTIES  # noqa: E402  (one definition: model, model_sha256, cache_dir)


@dataclass(frozen=True)
class ServerOptions:
    """Settings of the MRD server (``vne serve --protocol mrd`` options).

    Attributes:
        limits: largest declared message lengths (:class:`vne.io.framing.FrameLimits`).
        read_timeout_s: a connection that sends nothing for this long is ended (TEXT + CLOSE).
        max_active: connections served at once; one more gets a TEXT "busy" message and CLOSE.
        linger_s: after our CLOSE, how long unread input is drained before the socket is closed
            (so the client reads our last messages instead of a reset).
        grace_s: on a stop request (SIGTERM), how long open connections get to finish
            (:mod:`vne.runtime.shutdown`).
    """

    limits: F.FrameLimits = F.DEFAULT_LIMITS
    read_timeout_s: float = 300.0
    max_active: int = 16
    linger_s: float = 2.0
    grace_s: float = 5.0


class MRDConnection:
    """One MRD connection: frames in (:meth:`next_frame`, iteration), messages out (``send_*``).

    Iterating yields the data frames (IMAGE, ACQUISITION, WAVEFORM) and TEXT frames until CLOSE;
    it stops at the end of the stream or at a framing error, which it records in :attr:`error`
    (everything framed before stays framed and was yielded). Stray CONFIG/HEADER messages in
    the data are reported (:attr:`notes`) and skipped.
    """

    def __init__(self, sock, limits: F.FrameLimits = F.DEFAULT_LIMITS, *, read_timeout_s: float | None = None,
                 peer: str = "", reader: F.FrameReader | None = None) -> None:
        self.socket = sock
        self.limits = limits
        self.reader = reader or F.FrameReader(sock, limits)
        self.read_timeout_s = read_timeout_s
        self.peer = peer
        self.lock = threading.Lock()
        self.got_close = False
        self.ended = False
        self.error: str | None = None
        self.notes: list[str] = []
        self.n_frames = 0
        self.received = {"IMAGE": 0, "ACQUISITION": 0, "WAVEFORM": 0, "TEXT": 0}
        self.sent = {"IMAGE": 0, "passed": 0, "TEXT": 0}
        self._pending: deque = deque()

    # ------------------------------------------------------------------ reading
    def next_frame(self) -> F.Frame | None:
        """The next frame, or None when the stream is over (CLOSE, end, or an error: :attr:`error`)."""
        if self._pending:
            return self._pending.popleft()
        if self.ended:
            return None
        stopping = self.reader.stop_reason
        try:
            frame = self.reader.read()
        except F.UnknownMessageError as exc:
            return self._end(f"message {self.n_frames + 1} at byte {self.reader.frame_start}: {exc}")
        except F.LimitError as exc:
            return self._end(f"message {self.n_frames + 1} at byte {self.reader.frame_start}: {exc}")
        except F.TruncatedError as exc:
            if self.reader.stop_reason:
                return self._end(f"{self.reader.stop_reason}, inside message {self.n_frames + 1} ({exc})")
            return self._end(f"message {self.n_frames + 1} at byte {self.reader.frame_start}: {exc} (no CLOSE)")
        except F.FramingError as exc:
            return self._end(f"message {self.n_frames + 1} at byte {self.reader.frame_start}: {exc}")
        except MemoryError:  # a length within the limits that this machine cannot hold
            return self._end(f"message {self.n_frames + 1} at byte {self.reader.frame_start}: not enough memory for "
                             f"its declared length (lower --max-message-mb)")
        except (socket.timeout, TimeoutError):
            return self._end(f"no data for {self.read_timeout_s:g} s after message {self.n_frames} (read timeout)")
        except OSError as exc:
            if self.reader.stop_reason:
                return self._end(f"{self.reader.stop_reason} after message {self.n_frames}")
            return self._end(f"connection lost after message {self.n_frames} ({exc.__class__.__name__}: {exc})")
        if frame is None:
            if self.reader.stop_reason or stopping:
                return self._end(f"{self.reader.stop_reason or stopping} after message {self.n_frames}")
            return self._end(f"stream ended after message {self.n_frames} without CLOSE")
        self.n_frames += 1
        if frame.msg_id == F.CLOSE:
            self.got_close = True
            self.ended = True
            return None
        return frame

    def _end(self, why: str) -> None:
        self.ended = True
        self.error = why
        log.warning("MRD %s: %s", self.peer, why)
        return None

    def push_back(self, frame: F.Frame) -> None:
        self._pending.appendleft(frame)

    def __iter__(self):
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            if frame.msg_id in (F.CONFIG_FILE, F.CONFIG_TEXT, F.HEADER):
                self.notes.append(f"{frame.name} in the middle of the data (message {self.n_frames}) ignored")
                continue
            key = "TEXT" if frame.msg_id == F.TEXT else frame.name
            self.received[key] = self.received.get(key, 0) + 1
            yield frame

    # ------------------------------------------------------------------ writing
    def send_raw(self, data: bytes) -> None:
        with self.lock:
            self.socket.sendall(data)

    def pass_back(self, frame: F.Frame) -> None:
        """Send a frame back exactly as it came (byte-identical)."""
        self.send_raw(frame.raw)
        self.sent["passed"] += 1

    def send_image(self, images) -> None:
        for im in images if isinstance(images, (list, tuple)) else [images]:
            if im is None:
                continue
            self.send_raw(F.pack_image(im))
            self.sent["IMAGE"] += 1

    def send_logging(self, level: str, text: str) -> None:
        """A TEXT logging message as python-ismrmrd-server sends it (``"WARNING  text"``)."""
        log.log(getattr(logging, level, logging.INFO), "MRD %s -> TEXT: %s", self.peer, text)
        self.send_raw(F.pack_text(F.TEXT, f"{level:<8} {text}"))
        self.sent["TEXT"] += 1

    def send_close(self) -> None:
        self.send_raw(F.pack_close())


# ---------------------------------------------------------------------------- config
def parse_config_json(text: str) -> dict | None:
    """A JSON object of parameters (python-ismrmrd-server / OpenRecon ``configAdditional``), or None."""
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None


def config_name(config) -> str | None:
    """The program a connection asks for: a CONFIG_FILE name, or ``parameters.customconfig`` /
    ``parameters.config`` of a JSON config (python-ismrmrd-server's precedence)."""
    if isinstance(config, str):
        return config.strip() or None
    if isinstance(config, dict):
        params = config.get("parameters")
        if isinstance(params, dict):
            custom = params.get("customconfig")
            if isinstance(custom, str) and custom.strip():
                return custom.strip()
            name = params.get("config")
            if isinstance(name, str) and name.strip():
                return name.strip()
        name = config.get("config")
        if isinstance(name, str) and name.strip():
            return name.strip()
    return None


def is_vne(name: str | None) -> bool:
    return (name or "").strip().lower() == VNE_CONFIG


def vne_properties(config) -> tuple[dict[str, str], list[str]]:
    """(pipeline properties, notes) from a JSON config's ``parameters``: the names of
    :data:`vne.runtime.config.PROPERTY_DOCS` and ``role_*``, or their OpenRecon ids (the name without
    underscores, as OpenRecon allows ``[A-Za-z0-9]`` only: ``pixeltype``); others (scanner UI
    parameters) are ignored."""
    from .config import PROPERTY_DOCS

    aliases = {p.replace("_", "").lower(): p for p in PROPERTY_DOCS if "<" not in p}

    props: dict[str, str] = {}
    notes: list[str] = []
    params = config.get("parameters") if isinstance(config, dict) else None
    if not isinstance(params, dict):
        return props, notes
    for k, v in params.items():
        name = str(k).strip()
        if name in ("config", "customconfig"):
            continue
        if name not in PROPERTY_DOCS and not name.lower().startswith("role_"):
            name = aliases.get(name.lower(), name)
        if name in SERVER_ONLY_PROPERTIES:
            notes.append(f"parameter '{name}' is set by the server (vne serve --{name.replace('_', '-')}), not by "
                         f"the client; ignored")
            continue
        if name in PROPERTY_DOCS or name.lower().startswith("role_"):
            props[name] = ("true" if v else "false") if isinstance(v, bool) else ("" if v is None else str(v))
    return props, notes


# ---------------------------------------------------------------------------- programs
def _forward_problems(connection: MRDConnection, pipeline, start: int) -> int:
    for msg in pipeline.problems[start:]:
        connection.send_logging(WARNING, f"VNE: {msg}")
    return len(pipeline.problems)


def _report_stream_end(connection: MRDConnection) -> None:
    for note in connection.notes:
        connection.send_logging(WARNING, f"vne: {note}")
    connection.notes.clear()
    if connection.error:
        connection.send_logging(ERROR, f"vne: input not read further: {connection.error}; every message framed before "
                                       f"it was passed back")


def process(connection: MRDConnection, config, metadata, *, defaults=None, model=None):
    """The VNE program for one MRD connection (python-ismrmrd-server's ``process`` convention).

    Every data message goes back first, as its exact bytes; images are then decoded from a
    copy and fed to a :class:`vne.runtime.pipeline.VNEPipeline`, whose VNE images follow as a new
    series; problems go back as TEXT. The caller sends CLOSE.

    Args:
        connection: the :class:`MRDConnection` after CONFIG and HEADER.
        config: the JSON config (dict) or the config name (str).
        metadata: the ISMRMRD header (XML text, parsed, or None).
        defaults: server-side :class:`vne.runtime.config.PipelineConfig` the parameters go on top of.
        model: the server's loaded model.

    Returns:
        the pipeline (None if it could not be made).
    """
    from .config import PipelineConfig
    from .pipeline import VNEPipeline

    props, notes = vne_properties(config)
    for note in notes:
        connection.send_logging(WARNING, f"vne: {note}")
    config_error = None
    try:
        cfg = PipelineConfig.from_properties(props, base=defaults)
    except InputError as exc:
        config_error = str(exc)
        cfg = replace(defaults or PipelineConfig(), enabled=False)
    pipeline = None
    try:
        from .workers import shared_workers

        # slices run in the process's VNE worker pool; a worker sends its VNE image at once
        # (send_raw holds the connection's lock)
        pipeline = VNEPipeline(cfg, header=metadata, model=model, workers=shared_workers(), emit=connection.send_image,
                               load_async=model is None)
        if config_error:
            pipeline.problems = [m for m in pipeline.problems if "'enabled' property" not in m]
            pipeline._disable(f"bad parameters: {config_error}")
    except Exception as exc:  # the pipeline promises not to raise; pass-through must not depend on it
        log.exception("MRD: VNE pipeline could not be made")
        connection.send_logging(ERROR, f"vne: VNE unavailable ({exc.__class__.__name__}: {exc}); passing everything back")
    done = 0
    if pipeline is not None:
        done = _forward_problems(connection, pipeline, 0)
    n_undecodable = 0
    for frame in connection:
        if frame.msg_id == F.TEXT:
            log.info("MRD %s: client text: %s", connection.peer, (frame.text or "")[:200])
            continue
        connection.pass_back(frame)  # first, and whatever happens to VNE
        if frame.msg_id != F.IMAGE or pipeline is None:
            continue
        try:
            item = F.decode_image(frame)
        except ValueError as exc:
            n_undecodable += 1
            connection.send_logging(WARNING, f"vne: {frame.describe()} (message {connection.n_frames}) cannot be "
                                             f"decoded ({exc}); passed back unchanged, not used for VNE")
            continue
        for out in pipeline.feed_iter(item):
            if out is not item:
                connection.send_image(out)
        done = _forward_problems(connection, pipeline, done)
    _report_stream_end(connection)
    if pipeline is None:
        return None
    connection.send_image(pipeline.finish(dropped=not connection.got_close))
    _forward_problems(connection, pipeline, done)
    from .study_store import wait_for_write

    wait_for_write(pipeline.cache_thread)  # on disk before our CLOSE acknowledges the stream
    series = sorted({r.series_index for r in pipeline.results})
    connection.send_logging(INFO, f"vne: {connection.received['IMAGE']} image(s), {connection.received['ACQUISITION']} "
                                  f"acquisition(s), {connection.received['WAVEFORM']} waveform(s) passed back unchanged; "
                                  f"{len(pipeline.results)} VNE image(s)"
                                  + (f" in series {', '.join(map(str, series))}" if series else "")
                                  + (f"; {n_undecodable} image(s) not decodable" if n_undecodable else ""))
    return pipeline


def passthrough(connection: MRDConnection, name: str | None) -> None:
    """Any config other than ``vne``: every data message back unchanged, and a TEXT saying so."""
    asked = f"config '{name}'" if name else "no config name"
    connection.send_logging(WARNING, f"vne: {asked} is not '{VNE_CONFIG}': VNE was not requested; every image, "
                                     f"acquisition and waveform is passed back unchanged")
    for frame in connection:
        if frame.msg_id != F.TEXT:
            connection.pass_back(frame)
    _report_stream_end(connection)


# ---------------------------------------------------------------------------- one connection
def _read_config(connection: MRDConnection):
    """(config for :func:`process`, config name, ended) from the first message."""
    first = connection.next_frame()
    if first is None:
        return None, None, True
    if first.msg_id == F.CONFIG_FILE:
        return first.text, first.text.strip() or None, False
    if first.msg_id == F.CONFIG_TEXT:
        obj = parse_config_json(first.text or "")
        if obj is not None:
            return obj, config_name(obj), False
        text = (first.text or "").strip()
        if text and len(text) < 256 and not any(c.isspace() for c in text) and not text.startswith("<"):
            return text, text, False  # a bare name as text
        connection.notes.append("CONFIG_TEXT is neither JSON with parameters.config nor a config name")
        return text, None, False
    connection.notes.append(f"the stream starts with {first.name}, not CONFIG_FILE or CONFIG_TEXT")
    connection.push_back(first)
    return None, None, False


def handle(sock: socket.socket, peer, defaults=None, model=None, options: ServerOptions = ServerOptions(),
           reader: F.FrameReader | None = None) -> MRDConnection:
    """Serve one accepted MRD connection to the end; never raises. Returns the connection."""
    peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
    conn = MRDConnection(sock, options.limits, read_timeout_s=options.read_timeout_s, peer=peer_s, reader=reader)
    t0 = time.perf_counter()
    try:
        sock.settimeout(options.read_timeout_s)
        config, name, ended = _read_config(conn)
        if ended:
            if conn.got_close:
                conn.send_close()
            elif conn.error and not conn.error.startswith("stream ended after message 0"):
                _report_stream_end(conn)
                conn.send_close()
            log.info("MRD %s: connection closed before any data", peer_s)
            return conn
        metadata = None
        head = conn.next_frame()
        if head is None:
            _report_stream_end(conn)  # CLOSE right after the config: a dependency query
            conn.send_close()
            return conn
        if head.msg_id == F.HEADER:
            metadata = head.text
        else:
            conn.notes.append(f"no HEADER: {head.name} came where the ISMRMRD header was expected")
            conn.push_back(head)
        nxt = conn.next_frame() if metadata is not None else None
        if nxt is not None:
            if nxt.msg_id == F.TEXT:  # configAdditional: JSON parameters right after HEADER
                extra = parse_config_json(nxt.text or "")
                if extra is None:
                    conn.notes.append("the TEXT after HEADER is not JSON; ignored")
                else:  # python-ismrmrd-server: its parameters.config / customconfig override the name
                    config = extra
                    name = config_name(extra) or name
            else:
                conn.push_back(nxt)
        for note in conn.notes:
            conn.send_logging(WARNING, f"vne: {note}")
        conn.notes.clear()
        if is_vne(name):
            log.info("MRD %s: config '%s': VNE", peer_s, name)
            process(conn, config, metadata, defaults=defaults, model=model)
        else:
            log.info("MRD %s: config '%s': pass-through only", peer_s, name)
            passthrough(conn, name)
        conn.send_close()
        log.info("MRD %s: done in %.1f s: %d message(s) in, %d passed back, %d VNE image(s), %d TEXT", peer_s,
                 time.perf_counter() - t0, conn.n_frames, conn.sent["passed"], conn.sent["IMAGE"], conn.sent["TEXT"])
    except OSError as exc:  # the client went away while we were sending
        log.error("MRD %s: connection lost while sending (%s: %s)", peer_s, exc.__class__.__name__, exc)
    except Exception as exc:  # a bug here must cost a TEXT, not the connection
        log.exception("MRD %s: internal error", peer_s)
        try:
            conn.send_logging(ERROR, f"vne: internal error ({exc.__class__.__name__}: {exc}); stream ended")
            conn.send_close()
        except OSError:
            pass
    finally:
        _linger_close(sock, options.linger_s)
    return conn


def _linger_close(sock: socket.socket, seconds: float, max_bytes: int = 256 * F.MiB) -> None:
    F.linger_close(sock, seconds, max_bytes)


def _reject_busy(sock: socket.socket, peer, options: ServerOptions) -> None:
    try:
        sock.settimeout(5.0)
        sock.sendall(F.pack_text(F.TEXT, f"{ERROR:<8} vne: server busy ({options.max_active} connections being "
                                         f"served); nothing was processed, send again later") + F.pack_close())
    except OSError:
        pass
    _linger_close(sock, options.linger_s)


# ---------------------------------------------------------------------------- the server
def serve(srv: socket.socket, defaults=None, model=None, options: ServerOptions = ServerOptions(), *,
          max_connections: int = 0, stop: threading.Event | None = None, tracker=None) -> int:
    """Accept MRD connections on ``srv`` (a listening socket) until ``stop`` is set or
    ``max_connections`` were accepted; a thread per connection, at most ``options.max_active``
    at once (the next one gets a TEXT "busy" and CLOSE). On ``stop``, open connections get
    ``options.grace_s`` (:mod:`vne.runtime.shutdown`; ``tracker.result`` says what happened to them).
    Returns the number accepted."""
    from .listener import accept_connections

    def serve_one(conn, peer, reader):
        handle(conn, peer, defaults, model, options, reader)

    def busy(conn, peer):
        _reject_busy(conn, peer, options)

    return accept_connections(srv, serve_one, limits=options.limits, max_active=options.max_active,
                              grace_s=options.grace_s, busy=busy, max_connections=max_connections, stop=stop,
                              tracker=tracker, logger=log, label="MRD", thread_name="vne-mrd")
