"""Framing of MRD / ISMRMRD streaming-protocol messages: exact wire bytes, parsed lengths.

One message on the wire is a little-endian ``uint16`` message id followed by a body whose
length follows from the id (documented by python-ismrmrd-server and ``ismrmrd.serialization``;
see ``docs/mrd-server.md``):

====  ===========  =========================================================================
id    name         body
====  ===========  =========================================================================
1     CONFIG_FILE  1024 bytes: a config name, NUL-padded
2     CONFIG_TEXT  uint32 length + text (NUL-terminated by most senders)
3     HEADER       uint32 length + ISMRMRD XML header
4     CLOSE        nothing
5     TEXT         uint32 length + text (logging messages, JSON parameters)
1008  ACQUISITION  340-byte AcquisitionHeader, trajectory (samples x trajectory_dimensions
                   float32), data (active_channels x samples complex64)
1022  IMAGE        198-byte ImageHeader, uint64 attribute length + attribute XML, data
                   (channels x matrix_size[0..2] x size of data_type)
1026  WAVEFORM     40-byte WaveformHeader, data (channels x samples uint32)
====  ===========  =========================================================================

:func:`read_frame` reads exactly one message and returns a :class:`Frame`: the message's exact
bytes (``raw``, id included: forward those for a byte-identical pass-through) and the pieces
parsed from it. Every declared length (text lengths, the attribute length, the data size implied
by a header) is checked against :class:`FrameLimits` *before* anything of that size is
allocated or read. Nothing is decoded into ``ismrmrd`` objects here; :func:`decode_image`
does that on a copy, and its failure never affects the frame.

Sizes of image ``data_type`` values follow the ISMRMRD C/C++ definition (``DATATYPE_INT`` is a
4-byte int32), which is what the bytes on the wire are, whatever ``ismrmrd`` for Python makes of
them (it decodes ``DATATYPE_INT`` as int64: see :class:`RawImage`).
"""
from __future__ import annotations

import ctypes
import logging
import math
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ismrmrd

from ..errors import reason

log = logging.getLogger(__name__)

CONFIG_FILE = 1
CONFIG_TEXT = 2
HEADER = 3
CLOSE = 4
TEXT = 5
ACQUISITION = 1008
IMAGE = 1022
WAVEFORM = 1026

MESSAGE_NAMES = {
    CONFIG_FILE: "CONFIG_FILE", CONFIG_TEXT: "CONFIG_TEXT", HEADER: "HEADER", CLOSE: "CLOSE", TEXT: "TEXT",
    ACQUISITION: "ACQUISITION", IMAGE: "IMAGE", WAVEFORM: "WAVEFORM",
}
TEXT_MESSAGES = (CONFIG_TEXT, HEADER, TEXT)

CONFIG_FILE_BYTES = 1024
IMAGE_HEADER_BYTES = ctypes.sizeof(ismrmrd.ImageHeader)              # 198
ACQUISITION_HEADER_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)  # 340
WAVEFORM_HEADER_BYTES = ctypes.sizeof(ismrmrd.WaveformHeader)        # 40

_ID = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# bytes per value of ImageHeader.data_type (ISMRMRD C definition)
DATA_TYPE_BYTES = {1: 2, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16}
DATA_TYPE_NAMES = {1: "uint16", 2: "int16", 3: "uint32", 4: "int32", 5: "float32", 6: "float64",
                   7: "complex64", 8: "complex128"}

MiB = 1 << 20


class RawImage:
    """An ISMRMRD image message kept as its wire bytes, passed on byte for byte.

    ``ismrmrd`` (Python) decodes ``DATATYPE_INT`` as 8-byte int64, while C++ writers send
    4-byte int32 (``../shared/docs/scanner-streams.md``): decoding such an image would read
    the wrong number of bytes and wreck the rest of the stream. :func:`read_image_safely` keeps
    those images raw instead; the pipeline passes them on and does not use them.
    """

    def __init__(self, header, payload: bytes) -> None:
        self.header = header
        self.payload = payload  # everything after the message id

    @property
    def image_series_index(self) -> int:
        return int(self.header.image_series_index)

    @property
    def image_index(self) -> int:
        return int(self.header.image_index)


def message_name(msg_id: int) -> str:
    return MESSAGE_NAMES.get(int(msg_id), f"unknown message id {int(msg_id)}")


@dataclass(frozen=True)
class FrameLimits:
    """Largest declared lengths accepted (bytes); a message over a limit is not read.

    Attributes:
        max_text: CONFIG_TEXT, HEADER and TEXT bodies.
        max_attributes: an image's attribute (meta XML) length.
        max_data: the data of one image, acquisition (trajectory + samples) or waveform.
    """

    max_text: int = 16 * MiB
    max_attributes: int = 16 * MiB
    max_data: int = 1024 * MiB


DEFAULT_LIMITS = FrameLimits()


class FramingError(Exception):
    """The stream cannot be framed past this point (what was framed before it stands)."""


class UnknownMessageError(FramingError):
    def __init__(self, msg_id: int, offset: int | None = None) -> None:
        self.msg_id = int(msg_id)
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"unknown message id {self.msg_id} (0x{self.msg_id:04x}){where}: its length cannot be known, "
                         f"so nothing after it can be framed (known ids: "
                         f"{', '.join(f'{k} {v}' for k, v in MESSAGE_NAMES.items())})")


class LimitError(FramingError):
    def __init__(self, what: str, declared: int, limit: int) -> None:
        self.what, self.declared, self.limit = what, int(declared), int(limit)
        super().__init__(f"{what} declares {self.declared} bytes, over the limit of {self.limit} bytes; not read")


class TruncatedError(FramingError, EOFError):
    """The stream ended inside a message."""


@dataclass
class Frame:
    """One framed message.

    Attributes:
        msg_id: the message id.
        raw: the exact bytes of the message on the wire, id included.
        text: CONFIG_FILE / CONFIG_TEXT / HEADER / TEXT: the text (UTF-8, up to the first NUL).
        head: IMAGE / ACQUISITION / WAVEFORM: a copy of the fixed header (ctypes struct).
        attr_len, data_len: IMAGE: declared attribute length, data size in bytes.
    """

    msg_id: int
    raw: bytes
    text: str | None = None
    head: Any = None
    attr_len: int = 0
    data_len: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return message_name(self.msg_id)

    @property
    def payload(self) -> bytes:
        """Everything after the message id."""
        return self.raw[_ID.size:]

    @property
    def attributes(self) -> bytes:
        """IMAGE: the attribute (meta XML) bytes as sent."""
        start = _ID.size + IMAGE_HEADER_BYTES + _U64.size
        return self.raw[start:start + self.attr_len]

    def describe(self) -> str:
        """A short human name: ``IMAGE series 4 index 2``."""
        if self.msg_id == IMAGE and self.head is not None:
            return f"IMAGE series {self.head.image_series_index} index {self.head.image_index}"
        if self.msg_id == ACQUISITION and self.head is not None:
            return f"ACQUISITION scan {self.head.scan_counter}"
        if self.msg_id == WAVEFORM and self.head is not None:
            return f"WAVEFORM id {self.head.waveform_id} scan {self.head.scan_counter}"
        return self.name


def _read_exactly(src, n: int, what: str, started: bool = True) -> bytes:
    """``n`` bytes from a socket (``recv_into``) or a file-like object (``read``).

    Raises:
        TruncatedError: the stream ended first (EOFError when ``started`` is False and no byte came).
    """
    if n == 0:
        return b""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    recv_into = getattr(src, "recv_into", None)
    while got < n:
        if recv_into is not None:
            k = recv_into(view[got:], n - got)
        else:
            chunk = src.read(n - got)
            k = len(chunk) if chunk else 0
            view[got:got + k] = chunk or b""
        if not k:
            if got == 0 and not started:
                raise EOFError("end of stream")
            raise TruncatedError(f"stream ended inside {what}: {got} of {n} bytes")
        got += k
    return bytes(buf)


def _check(what: str, n: int, limit: int) -> None:
    if n > limit:
        raise LimitError(what, n, limit)


def _text(body: bytes) -> str:
    return body.split(b"\x00", 1)[0].decode("utf-8", "replace")


def image_data_bytes(head) -> int:
    """Data size of an image from its header (channels x matrix x data type size).

    Raises:
        FramingError: a data_type whose size is not defined.
    """
    size = DATA_TYPE_BYTES.get(int(head.data_type))
    if size is None:
        raise FramingError(f"IMAGE series {head.image_series_index} index {head.image_index} has data_type "
                           f"{int(head.data_type)}, not an ISMRMRD data type: its data size cannot be known")
    n = int(head.channels)
    for m in head.matrix_size:
        n *= int(m)
    return n * size


def read_frame(src, limits: FrameLimits = DEFAULT_LIMITS) -> Frame | None:
    """Read one message from ``src`` (a socket or a binary file-like object).

    Returns:
        the :class:`Frame`, or None at a clean end of stream (no byte of a new message).

    Raises:
        UnknownMessageError: an id this module cannot frame (the 2 id bytes were consumed).
        LimitError: a declared length over ``limits`` (only the id and fixed header were read).
        TruncatedError: the stream ended inside the message.
        FramingError: an image header with an undefined data type.
        OSError: socket errors, including a read timeout.
    """
    try:
        id_bytes = _read_exactly(src, _ID.size, "a message id", started=False)
    except TruncatedError:
        raise
    except EOFError:
        return None
    (msg_id,) = _ID.unpack(id_bytes)
    name = message_name(msg_id)
    if msg_id == CLOSE:
        return Frame(msg_id, id_bytes)
    if msg_id == CONFIG_FILE:
        body = _read_exactly(src, CONFIG_FILE_BYTES, name)
        return Frame(msg_id, id_bytes + body, text=_text(body))
    if msg_id in TEXT_MESSAGES:
        len_bytes = _read_exactly(src, _U32.size, f"the length of {name}")
        (n,) = _U32.unpack(len_bytes)
        _check(name, n, limits.max_text)
        body = _read_exactly(src, n, name)
        return Frame(msg_id, id_bytes + len_bytes + body, text=_text(body))
    if msg_id == IMAGE:
        hb = _read_exactly(src, IMAGE_HEADER_BYTES, "an IMAGE header")
        head = ismrmrd.ImageHeader.from_buffer_copy(hb)
        what = f"IMAGE series {head.image_series_index} index {head.image_index}"
        lb = _read_exactly(src, _U64.size, f"the attribute length of {what}")
        (attr_len,) = _U64.unpack(lb)
        _check(f"{what} attributes", attr_len, limits.max_attributes)
        data_len = image_data_bytes(head)
        _check(f"{what} data ({DATA_TYPE_NAMES[int(head.data_type)]}, {int(head.channels)} channel(s), matrix "
               f"{tuple(int(m) for m in head.matrix_size)})", data_len, limits.max_data)
        attr = _read_exactly(src, attr_len, f"the attributes of {what}")
        data = _read_exactly(src, data_len, f"the data of {what}")
        return Frame(msg_id, b"".join((id_bytes, hb, lb, attr, data)), head=head, attr_len=attr_len, data_len=data_len)
    if msg_id == ACQUISITION:
        hb = _read_exactly(src, ACQUISITION_HEADER_BYTES, "an ACQUISITION header")
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(hb)
        ns, nt, nc = int(head.number_of_samples), int(head.trajectory_dimensions), int(head.active_channels)
        data_len = ns * nt * 4 + ns * nc * 8
        _check(f"ACQUISITION scan {head.scan_counter} ({nc} channel(s) x {ns} samples, {nt} trajectory dimension(s))",
               data_len, limits.max_data)
        data = _read_exactly(src, data_len, f"the data of ACQUISITION scan {head.scan_counter}")
        return Frame(msg_id, id_bytes + hb + data, head=head, data_len=data_len)
    if msg_id == WAVEFORM:
        hb = _read_exactly(src, WAVEFORM_HEADER_BYTES, "a WAVEFORM header")
        head = ismrmrd.WaveformHeader.from_buffer_copy(hb)
        data_len = int(head.channels) * int(head.number_of_samples) * 4
        _check(f"WAVEFORM id {head.waveform_id} ({int(head.channels)} channel(s) x {int(head.number_of_samples)} samples)",
               data_len, limits.max_data)
        data = _read_exactly(src, data_len, f"the data of WAVEFORM id {head.waveform_id}")
        return Frame(msg_id, id_bytes + hb + data, head=head, data_len=data_len)
    raise UnknownMessageError(msg_id)


class FrameReader:
    """Frames from one connection's socket, with what a server needs around :func:`read_frame`.

    - :attr:`offset`: bytes read so far (error messages name the byte a bad message starts at);
    - :attr:`waiting`: True while blocked before the first byte of a message, i.e. the peer is
      idle between messages (a stopping server ends such a connection without cutting anything);
    - :meth:`stop`: ends the reading from another thread (shuts the socket's read side, so a
      blocked read returns at once); :attr:`stop_reason` says why. Reads after that see the
      end of the stream: at a message boundary :meth:`read` returns None, inside a message it
      raises :class:`TruncatedError`;
    - :meth:`push_back`: a frame to be read again (a reader that looked one message ahead).
    """

    def __init__(self, sock, limits: FrameLimits = DEFAULT_LIMITS) -> None:
        self.sock = sock
        self.limits = limits
        self.offset = 0
        self.frame_start = 0
        self.n_frames = 0
        self.waiting = False
        self.stop_reason: str | None = None
        self.cut_mid_message = False  # stop() ended the stream inside a message
        self._pending: list[Frame] = []

    def recv_into(self, view, n: int) -> int:
        if self.stop_reason is not None:
            return 0
        k = self.sock.recv_into(view, n)
        if k:
            self.waiting = False
            self.offset += k
        return k

    def read(self) -> Frame | None:
        """The next frame (:func:`read_frame` with this reader's limits), None at the end."""
        if self._pending:
            return self._pending.pop()
        self.frame_start = self.offset
        self.waiting = True
        try:
            frame = read_frame(self, self.limits)
        except TruncatedError:
            if self.stop_reason is not None:
                self.cut_mid_message = True
            raise
        finally:
            self.waiting = False
        if frame is not None:
            self.n_frames += 1
        return frame

    def read_exactly(self, n: int, what: str) -> bytes:
        """``n`` more bytes of the current message (for readers of compound messages)."""
        return _read_exactly(self, n, what)

    def push_back(self, frame: Frame) -> None:
        self._pending.append(frame)

    def stop(self, reason: str) -> None:
        """End reading (thread-safe): the next or current read sees the end of the stream."""
        self.stop_reason = reason
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def decode_image(frame: Frame):
    """The image of an IMAGE frame, decoded from a copy of its bytes.

    Returns:
        an ``ismrmrd.Image``, or a :class:`RawImage` for 4-byte ``DATATYPE_INT``
        data (which ``ismrmrd`` for Python would misread).

    Raises:
        ValueError: the image cannot be decoded (unreadable meta attributes, bad data); the
        frame itself is untouched and can still be forwarded.
    """
    if frame.msg_id != IMAGE:
        raise ValueError(f"{frame.name} is not an image")
    copy = bytes(bytearray(frame.payload))
    if int(frame.head.data_type) == ismrmrd.DATATYPE_INT:

        return RawImage(ismrmrd.ImageHeader.from_buffer_copy(copy[:IMAGE_HEADER_BYTES]), copy)
    try:
        return ismrmrd.Image.from_bytes(copy)
    except Exception as exc:
        raise ValueError(reason(exc)) from None


def read_image_safely(source):
    """Reader for IMAGE messages (``source.read(n)``, after the message id): an ``ismrmrd.Image``,
    or a :class:`RawImage` for 4-byte ``DATATYPE_INT`` data."""
    header_bytes = source.read(ctypes.sizeof(ismrmrd.ImageHeader))
    head = ismrmrd.ImageHeader.from_buffer_copy(header_bytes)
    if head.data_type != ismrmrd.DATATYPE_INT:
        return ismrmrd.Image.deserialize_from_with_header(header_bytes, source.read)
    len_bytes = source.read(8)
    attr = source.read(int(ctypes.c_uint64.from_buffer_copy(len_bytes).value))
    n = int(head.channels) * math.prod(int(v) for v in head.matrix_size)
    data = source.read(4 * n)
    return RawImage(head, header_bytes + len_bytes + attr + data)


# ---------------------------------------------------------------------------- writing
def pack_text(msg_id: int, text: str) -> bytes:
    """A CONFIG_TEXT / HEADER / TEXT message (NUL-terminated, as python-ismrmrd-server sends)."""
    body = text.encode("utf-8") + b"\x00"
    return _ID.pack(msg_id) + _U32.pack(len(body)) + body


def pack_config_file(name: str) -> bytes:
    b = name.encode("utf-8")
    if len(b) > CONFIG_FILE_BYTES:
        raise ValueError(f"config name longer than {CONFIG_FILE_BYTES} bytes")
    return _ID.pack(CONFIG_FILE) + b.ljust(CONFIG_FILE_BYTES, b"\x00")


def pack_close() -> bytes:
    return _ID.pack(CLOSE)


def pack_image(image) -> bytes:
    """An ``ismrmrd.Image`` (or a :class:`RawImage`) as an IMAGE message."""
    payload = getattr(image, "payload", None)
    if isinstance(payload, (bytes, bytearray)):
        return _ID.pack(IMAGE) + bytes(payload)
    return _ID.pack(IMAGE) + image.to_bytes()


def pack_item(msg_id: int, item) -> bytes:
    """An ``ismrmrd`` Acquisition / Waveform / Image as a message."""
    return _ID.pack(msg_id) + item.to_bytes()


def write_raw_image(destination, raw: RawImage) -> None:
    """A :class:`RawImage` as an IMAGE message, byte for byte (``destination.write(bytes)``)."""
    destination.write(struct.pack("<H", IMAGE))
    destination.write(raw.payload)


def linger_close(sock, seconds: float, max_bytes: int = 256 * MiB) -> None:
    """Close after our last message: stop writing, drain what the peer still sends (bounded by
    ``seconds`` and ``max_bytes``), then close, so that closing with unread input does not reset
    the connection before the peer has read our last messages."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        n = 0
        buf = bytearray(1 << 16)
        while n < max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            k = sock.recv_into(buf)
            if not k:
                break
            n += k
    except OSError:
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------- listening
ACCEPT_RETRY_MAX_S = 5.0


class ListenerClosed(Exception):
    """The listening socket was closed: the server is shutting down."""


def accept_once(srv: socket.socket, stop: threading.Event, failures: int) -> tuple[socket.socket | None, Any, int]:
    """One ``accept()`` on a listening socket that has a timeout, for both servers
    (``vne serve`` on the Gadgetron protocol and on MRD).

    Returns:
        (connection, peer, consecutive failures): connection None after a timeout or a failed
        accept. A failure is logged and waited out with exponential back-off (0.1 s doubling to
        :data:`ACCEPT_RETRY_MAX_S`, interrupted by ``stop``); the server keeps listening.

    Raises:
        ListenerClosed: the listening socket was closed (logged).
    """
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        return None, None, failures
    except OSError as exc:
        if srv.fileno() < 0:
            log.error("the listening socket was closed (%s); no longer serving", exc)
            raise ListenerClosed(str(exc)) from None
        failures += 1
        delay = min(ACCEPT_RETRY_MAX_S, 0.05 * 2 ** min(failures, 7))
        log.error("accept() failed (%s); still listening, retrying in %.1f s (failure %d in a row)",
                  exc, delay, failures)
        stop.wait(delay)
        return None, None, failures
    return conn, peer, 0
