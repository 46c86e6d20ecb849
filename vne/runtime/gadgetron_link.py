"""The Gadgetron external protocol on the gadget's side, passed through by bytes.

Gadgetron's ``<external>`` node (execute mode: Gadgetron starts ``python -m gadgetron PORT
gadgets.vne_gadget gadget`` and ``gadgetron.external`` accepts its connection; connect mode:
Gadgetron connects to ``vne serve``) speaks the framing of :mod:`vne.io.framing`:

    Gadgetron -> gadget:  CONFIG (id 2: the node's <configuration> XML; id 1: a config name),
                          HEADER (id 3: ISMRMRD XML), data messages, CLOSE (id 4)
    gadget -> Gadgetron:  data messages, CLOSE

Gadgetron's ExternalChannel refuses FILENAME, CONFIG, HEADER, TEXT, QUERY and RESPONSE from the
external peer ("Received illegal message id from external peer") and takes ERROR as a failure of
the node, so only data messages and CLOSE ever go back.

Pass-through by bytes (:func:`run_link`): each data message is framed by
:class:`vne.io.framing.FrameReader` (id and declared lengths checked against
:class:`vne.io.framing.FrameLimits` before anything is allocated) and its exact bytes are sent on
before anything is decoded. Only then is an IMAGE decoded, from a copy
(:func:`vne.io.framing.decode_image`), for :class:`vne.runtime.pipeline.VNEPipeline`; a decoding failure
(malformed meta XML, invalid UTF-8, odd data) costs that image its use for VNE, nothing else.
Meta XML therefore comes back exactly as it was sent (pugixml layout, empty values, a trailing
NUL, character references). IMAGE, ACQUISITION and WAVEFORM are framed by their headers;
Gadgetron's compound messages (1023 recon data, 1024 image array, 1050 acquisition bucket) are
framed by replaying ``gadgetron.types``' own readers over the bytes, when that package is
installed. A CONFIG, HEADER or TEXT in the middle of the data is read and not passed back
(Gadgetron would refuse it), with a logged note.

When framing is lost (an unknown message id, whose length cannot be known; a declared length over
a limit; an undefined image data type; a stream that ends inside a message; a read timeout)
reading stops, one specific reason is logged (message number, byte offset, what was wrong), every
message framed before it has already been passed on, VNE runs for the slices complete so far, and
the gadget sends CLOSE (then drains unread input for a moment so the peer reads our last bytes).
"""
from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from dataclasses import replace

from ..io import framing as F
from ..errors import InputError

log = logging.getLogger("vne.gadgetron")

DATA_IDS = (F.ACQUISITION, F.IMAGE, F.WAVEFORM)
RECON_DATA, IMAGE_ARRAY, BUCKET = 1023, 1024, 1050
COMPOUND_NAMES = {RECON_DATA: "RECON_DATA", IMAGE_ARRAY: "IMAGE_ARRAY", BUCKET: "ACQUISITION_BUCKET"}
NOT_PASSED_BACK = (F.CONFIG_FILE, F.CONFIG_TEXT, F.HEADER, F.TEXT)
DEFAULT_LINGER_S = 2.0


def _compound_reader(msg_id: int):
    """``gadgetron.types``' reader of a compound message, or None (not installed / not compound)."""
    try:
        if msg_id == IMAGE_ARRAY:
            from gadgetron.types.image_array import read_image_array as reader
        elif msg_id == RECON_DATA:
            from gadgetron.types.recon_data import read_recon_data as reader
        elif msg_id == BUCKET:
            from gadgetron.types.acquisition_bucket import read_acquisition_bucket as reader
        else:
            return None
    except Exception:  # gadgetron not installed (vne serve needs only vne), or broken
        return None
    return reader


class _Recorder:
    """A ``read(n)`` source for ``gadgetron.types`` readers that keeps every byte they read and
    refuses, before reading, more than ``limit`` bytes in all."""

    def __init__(self, reader: F.FrameReader, limit: int, what: str) -> None:
        self.reader, self.limit, self.what = reader, int(limit), what
        self.parts: list[bytes] = []
        self.n = 0

    def read(self, n) -> bytes:
        n = int(n)
        if n < 0 or self.n + n > self.limit:
            raise F.LimitError(self.what, self.n + n, self.limit)
        b = self.reader.read_exactly(n, self.what)
        self.parts.append(b)
        self.n += n
        return b


class _ClosedByLink:
    """Stands in for ``gadgetron.external.Connection.socket`` once a :class:`GadgetronLink`
    owns the socket: ``Connection.__exit__`` calls ``close()``, which ends the link (one CLOSE)."""

    def __init__(self, link: "GadgetronLink", wrapper) -> None:
        self._link, self._wrapper = link, wrapper

    def read(self, n):
        return self._wrapper.read(n)

    def write(self, data) -> None:
        self._link.send_raw(bytes(data))

    def close(self) -> None:
        self._link.close()


class GadgetronLink:
    """One Gadgetron external connection, gadget side, framed by bytes.

    Made by :meth:`open` (``vne serve``: reads CONFIG and HEADER itself) or
    :meth:`from_connection` (a ``gadgetron.external.Connection`` that already read them:
    execute mode, the gadget function). Iterating yields the data frames until CLOSE, the end of
    the stream or a framing error (:attr:`error`, logged once).

    Attributes:
        config_text: the CONFIG text (the <configuration> XML), None if none came.
        header_text: the HEADER text (ISMRMRD XML), None if none came.
        trusted: whether the configuration may name files (False for ``vne serve`` clients).
        started: a message was read, so the stream gets our CLOSE at the end.
        got_close: the peer's CLOSE was read.
        error: why reading stopped early (None after CLOSE).
    """

    def __init__(self, reader: F.FrameReader, *, peer: str = "", trusted: bool = True,
                 read_timeout_s: float | None = None, linger_s: float = DEFAULT_LINGER_S) -> None:
        self.reader = reader
        self.sock = reader.sock
        self.peer = peer
        self.trusted = trusted
        self.read_timeout_s = read_timeout_s
        self.linger_s = linger_s
        self.config_text: str | None = None
        self.header_text: str | None = None
        self.started = False
        self.got_close = False
        self.ended = False
        self.error: str | None = None
        self.notes: list[str] = []
        self.received: Counter = Counter()
        self.sent = {"passed": 0, "IMAGE": 0}
        self.send_failed: str | None = None
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ making one
    @classmethod
    def open(cls, sock: socket.socket, *, limits: F.FrameLimits = F.DEFAULT_LIMITS, read_timeout_s: float | None = None,
             peer: str = "", reader: F.FrameReader | None = None, trusted: bool = False,
             linger_s: float = DEFAULT_LINGER_S) -> "GadgetronLink":
        """A link on an accepted socket; reads CONFIG and HEADER (never raises: a stream that
        ends or cannot be framed there has :attr:`ended` set and :attr:`error` logged)."""
        sock.settimeout(read_timeout_s)
        link = cls(reader or F.FrameReader(sock, limits), peer=peer, trusted=trusted, read_timeout_s=read_timeout_s,
                   linger_s=linger_s)
        first = link._next()
        if first is None:
            return link
        if first.msg_id == F.CONFIG_TEXT:
            link.config_text = first.text or ""
        elif first.msg_id == F.CONFIG_FILE:
            link._note(f"CONFIG is a config name ('{(first.text or '').strip()[:100]}'), not the <configuration> "
                       f"XML: no properties from it")
        else:
            link._note(f"the stream starts with {first.name}, not CONFIG")
            link.reader.push_back(first)
        head = link._next()
        if head is None:
            return link
        if head.msg_id == F.HEADER:
            link.header_text = head.text or ""
        else:
            link._note(f"no HEADER: {head.name} came where the ISMRMRD header was expected")
            link.reader.push_back(head)
        return link

    @classmethod
    def from_connection(cls, connection, *, limits: F.FrameLimits = F.DEFAULT_LIMITS) -> "GadgetronLink":
        """A link on a ``gadgetron.external.Connection`` (CONFIG and HEADER already read by it).

        The link takes over the socket: data is read and written by bytes, and the
        connection's own close (``with Connection(...)``, ``gadgetron.external.listen``)
        becomes :meth:`close` (our one CLOSE)."""
        wrapper = connection.socket
        sock = getattr(wrapper, "socket", wrapper)
        peer = ""
        try:
            peer = "%s:%s" % tuple(sock.getpeername()[:2])
        except (OSError, TypeError, AttributeError):
            pass
        link = cls(F.FrameReader(sock, limits), peer=peer, trusted=getattr(connection, "vne_trusted", True))
        link.started = True
        raw = getattr(connection, "raw_bytes", None)
        cfg, head = getattr(raw, "config", None), getattr(raw, "header", None)
        link.config_text = _text(cfg) if cfg is not None else None
        if link.config_text is None and getattr(connection, "config", None) is not None:
            import xml.etree.ElementTree as ET

            link.config_text = ET.tostring(connection.config, encoding="unicode")
        link.header_text = _text(head) if head is not None else None
        link._header_object = None if head is not None else getattr(connection, "header", None)
        connection.socket = _ClosedByLink(link, wrapper)
        return link

    @property
    def header(self):
        """What the pipeline gets as the ISMRMRD header (text, else a parsed object, else None)."""
        return self.header_text if self.header_text is not None else getattr(self, "_header_object", None)

    # ------------------------------------------------------------------ reading
    def _where(self) -> str:
        return f"message {self.reader.n_frames + 1} at byte {self.reader.frame_start}"

    def _end(self, why: str, level: int = logging.ERROR) -> None:
        self.ended = True
        self.error = why
        framed = self.received["IMAGE"] + self.received["ACQUISITION"] + self.received["WAVEFORM"] + sum(
            self.received[n] for n in COMPOUND_NAMES.values())
        tail = f"; the {framed} data message(s) framed before it were passed on unchanged" if framed else ""
        log.log(level, "Gadgetron stream %s: input not read further: %s%s", self.peer, why, tail)
        return None

    def _note(self, note: str) -> None:
        self.notes.append(note)
        log.warning("Gadgetron stream %s: %s", self.peer, note)

    def _next(self) -> F.Frame | None:
        """The next frame, or None when the input is over (CLOSE, end, or an error: :attr:`error`)."""
        if self.ended:
            return None
        r = self.reader
        try:
            frame = r.read()
        except F.UnknownMessageError as exc:
            frame = self._compound(exc)
            if frame is None:
                return None
        except F.TruncatedError as exc:
            if r.stop_reason is not None:
                return self._end(f"{r.stop_reason}, inside {self._where()} ({exc})")
            return self._end(f"{self._where()}: {exc} (no CLOSE)")
        except F.FramingError as exc:  # LimitError, undefined data type
            return self._end(f"{self._where()}: {exc}")
        except MemoryError:  # a length within the limits that this machine cannot hold
            return self._end(f"{self._where()}: not enough memory for its declared length (lower --max-message-mb)")
        except (socket.timeout, TimeoutError, BlockingIOError):
            t = f"{self.read_timeout_s:g} s" if self.read_timeout_s else "the socket timeout"
            return self._end(f"no data from the peer for {t} (--read-timeout) after message {r.n_frames}")
        except OSError as exc:
            if r.stop_reason is not None:
                return self._end(f"{r.stop_reason} after message {r.n_frames}", logging.WARNING)
            return self._end(f"connection lost after message {r.n_frames} ({exc.__class__.__name__}: {exc})")
        if frame is None:
            if r.stop_reason is not None:
                return self._end(f"{r.stop_reason} after message {r.n_frames}", logging.WARNING)
            if r.n_frames == 0:
                self.ended = True
                log.info("Gadgetron connection %s closed before any message", self.peer)
                return None
            return self._end(f"stream ended after message {r.n_frames} without CLOSE", logging.WARNING)
        self.started = True
        if frame.msg_id == F.CLOSE:
            self.got_close = True
            self.ended = True
            return None
        return frame

    def _compound(self, exc: F.UnknownMessageError) -> F.Frame | None:
        """Frame a Gadgetron compound message with gadgetron.types' reader, or end the input."""
        r = self.reader
        reader = _compound_reader(exc.msg_id)
        if reader is None:
            return self._end(f"message {r.n_frames + 1} at byte {r.frame_start}: {exc}")
        name = COMPOUND_NAMES[exc.msg_id]
        rec = _Recorder(r, r.limits.max_data, name)
        try:
            reader(rec)
        except F.FramingError as e:
            return self._end(f"message {r.n_frames + 1} at byte {r.frame_start}: {name}: {e}")
        except Exception as e:  # the reader could not make sense of the bytes: their length is unknown
            return self._end(f"message {r.n_frames + 1} at byte {r.frame_start}: {name} (id {exc.msg_id}) could not be "
                             f"framed by gadgetron's reader ({e.__class__.__name__}: {str(e)[:200]})")
        r.n_frames += 1
        self.started = True
        return F.Frame(exc.msg_id, F._ID.pack(exc.msg_id) + b"".join(rec.parts))

    def __iter__(self):
        while True:
            frame = self._next()
            if frame is None:
                return
            if frame.msg_id in NOT_PASSED_BACK:
                self._note(f"{frame.name} in the middle of the data (message {self.reader.n_frames}) read and not "
                           f"passed back: Gadgetron refuses it from an external peer")
                continue
            self.received[COMPOUND_NAMES.get(frame.msg_id, frame.name)] += 1
            yield frame

    # ------------------------------------------------------------------ writing
    # Thread-safe: the stream's thread passes messages on while the VNE workers send images;
    # one lock keeps each message whole on the socket and the counts exact.
    def send_raw(self, data: bytes, counter: str | None = None) -> None:
        with self._lock:
            self.sock.sendall(data)
            if counter:
                self.sent[counter] += 1

    def forward(self, frame: F.Frame) -> None:
        """Send a frame on exactly as it came."""
        self.send_raw(frame.raw, "passed")

    def send_image(self, image) -> None:
        self.send_raw(F.pack_image(image), "IMAGE")

    def close(self) -> None:
        """Our CLOSE (once, if the stream started), then close the socket; idempotent. Unread
        input (the stream was not read to its end) is drained for up to ``linger_s`` first, so
        that the peer reads our last messages instead of a reset."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.started and self.send_failed is None:
            try:
                with self._lock:
                    self.sock.sendall(F.pack_close())
            except OSError:
                pass
        if self.got_close or not self.started:
            try:
                self.sock.close()
            except OSError:
                pass
        else:
            F.linger_close(self.sock, self.linger_s)


def _text(b) -> str:
    if isinstance(b, str):
        return b
    return bytes(b).split(b"\x00", 1)[0].decode("utf-8", "replace")


def run_link(link: GadgetronLink, defaults=None, *, model=None, cache_wait_s: float | None = None):
    """Serve one Gadgetron external stream: every data message on by its bytes first, VNE added.

    Args:
        link: the stream (:meth:`GadgetronLink.open` or :meth:`GadgetronLink.from_connection`).
        defaults: :class:`vne.runtime.config.PipelineConfig` the stream's properties go on top of.
        model: a loaded :class:`vne.runtime.model.VNEModel` to reuse.
        cache_wait_s: how long the study-cache write may hold our CLOSE back
            (default :data:`vne.runtime.study_store.WRITE_WAIT_S`).

    Returns:
        the :class:`vne.runtime.pipeline.VNEPipeline` (never raises).
    """
    from .config import PipelineConfig, properties_from_config
    from .pipeline import VNEPipeline
    from .study_store import WRITE_WAIT_S, wait_for_write

    props = properties_from_config(link.config_text)
    config_error = None
    try:
        # a client of `vne serve` (an untrusted link) cannot name files
        config = PipelineConfig.from_properties(props, base=defaults, trusted=link.trusted)
    except InputError as exc:
        config_error = str(exc)
        config = replace(defaults or PipelineConfig(), enabled=False)
    if model is not None and config.model and config.model != (defaults.model if defaults else None):
        model = None  # the stream asks for another model file: load (or reuse) that one
    from .workers import shared_workers

    # this thread passes every message on; the process's VNE workers send each VNE image as soon
    # as it is made (vne.runtime.workers), through the link's own send lock
    pipeline = VNEPipeline(config, header=link.header, model=model, workers=shared_workers(), emit=link.send_image,
                           load_async=model is None)
    if config_error:
        pipeline.problems = [m for m in pipeline.problems if "'enabled' property" not in m]
        pipeline._disable(f"bad configuration: {config_error}")
    n_undecodable = 0
    try:
        for frame in link:
            link.forward(frame)  # first, whatever happens to VNE
            if frame.msg_id != F.IMAGE:
                continue
            try:
                item = F.decode_image(frame)
            except ValueError as exc:
                n_undecodable += 1
                if n_undecodable == 1:
                    log.warning("Gadgetron stream %s: %s (message %d) cannot be decoded (%s); passed on unchanged, not "
                                "used for VNE", link.peer, frame.describe(), link.reader.n_frames, exc)
                continue
            for out in pipeline.feed_iter(item):
                if out is not item:
                    link.send_image(out)
    except OSError as exc:  # sending failed: the peer has gone
        link.send_failed = f"{exc.__class__.__name__}: {exc}"
        log.error("Gadgetron stream %s: connection lost while sending (%s)", link.peer, link.send_failed)
    outs = pipeline.finish(dropped=not link.got_close)
    if link.send_failed is None:
        try:
            for out in outs:
                link.send_image(out)
        except OSError as exc:
            link.send_failed = f"{exc.__class__.__name__}: {exc}"
            log.error("Gadgetron stream %s: could not send the last VNE images (%s)", link.peer, link.send_failed)
    # the study-cache write is on disk before our CLOSE acknowledges the stream
    wait_for_write(pipeline.cache_thread, WRITE_WAIT_S if cache_wait_s is None else cache_wait_s)
    link.close()
    if link.started:
        log.info("Gadgetron stream %s: %d data message(s) in, %d passed on unchanged, %d VNE image(s)%s%s", link.peer,
                 sum(link.received.values()), link.sent["passed"], link.sent["IMAGE"],
                 f", {n_undecodable} image(s) not decodable" if n_undecodable else "",
                 "; input not read to its end (reason above)" if link.error else "")
    return pipeline


def run_connection(connection, defaults=None, *, model=None):
    """Serve one Gadgetron external connection: every data message passed on by its exact bytes
    first, VNE added as slices complete (:func:`run_link`).

    Args:
        connection: a ``gadgetron.external.Connection`` (CONFIG and HEADER read; execute mode)
            or a :class:`GadgetronLink` (``vne serve``).
        defaults: a :class:`vne.runtime.config.PipelineConfig` the connection's properties are applied
            on top of (``vne serve``), or None.

    Returns:
        the pipeline (for its :attr:`~vne.runtime.pipeline.VNEPipeline.results` and :attr:`~vne.runtime.pipeline.VNEPipeline.problems`).
    """
    link = connection if isinstance(connection, GadgetronLink) else GadgetronLink.from_connection(connection)
    return run_link(link, defaults, model=model)
