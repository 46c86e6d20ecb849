"""``vne stream``: an ISMRMRD stream simulator for integration tests (plays Gadgetron / the scanner).

Sends an ISMRMRD HDF5 file over the Gadgetron / ISMRMRD wire protocol with
``ismrmrd.serialization.ProtocolSerializer``: CONFIG, HEADER, every image in stream order,
CLOSE; meanwhile reads every reply with ``ProtocolDeserializer`` until the peer's CLOSE (both
directions run at once, as in Gadgetron, so neither side can block on a full socket buffer),
and writes what came back to ``--out``.

CONFIG: ``--config`` naming an existing file sends its text (CONFIG_TEXT); text starting with
``<`` is sent as it is (CONFIG_TEXT); any other name is sent as CONFIG_FILE for a Gadgetron
server to resolve (e.g. ``--config vne-execute.xml`` against ``gadgetron`` on port 9002).
Without ``--config``, an empty ``<configuration/>`` is sent as text, which is what
``vne serve`` (a Gadgetron external process) expects.

Timeouts are bounded (``--connect-timeout``, and ``--timeout`` without any traffic); an
unreachable server is one line: ``vne stream: error: cannot connect to HOST:PORT: ...``.

``--protocol mrd`` plays an MRD streaming client instead (python-ismrmrd-server's ``client.py``,
a FIRE / OpenRecon host) against an MRD server such as ``vne serve --protocol mrd``
(``docs/mrd-server.md``): CONFIG_FILE with the config name (``--config``, default ``vne``; JSON
text or a JSON file goes as CONFIG_TEXT), HEADER, an optional TEXT with JSON parameters
(``--param NAME=VALUE``: python-ismrmrd-server's "configAdditional", ``parameters.config`` set to
the config name), every image, CLOSE. Replies are framed with :mod:`vne.io.framing` (the same
framing the server uses, every declared length checked before it is read) until the server's
CLOSE: the images go to ``--out``, the TEXT (logging) messages are printed, one per line.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import InputError
from .args import port_number

NAME = "stream"
HELP = "send an ISMRMRD file to a Gadgetron / vne serve endpoint and save what comes back (integration testing)"
DEFAULT_CONFIG = "<configuration/>"


def add_arguments(p) -> None:
    p.add_argument("file", type=Path, help="ISMRMRD HDF5 file to send")
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--protocol", choices=("gadgetron", "mrd"), default="gadgetron",
                   help="gadgetron: the Gadgetron / ISMRMRD protocol (default); mrd: an MRD streaming client "
                        "(python-ismrmrd-server, OpenRecon) for `vne serve --protocol mrd`")
    p.add_argument("--port", type=port_number, required=True,
                   help="server port (vne serve: 18000; gadgetron and vne serve --protocol mrd: 9002)")
    p.add_argument("--config", default=None,
                   help="gadgetron: config file to send as text, XML text, or a config name; mrd: the config name "
                        "(default 'vne'), or JSON text / a JSON file sent as CONFIG_TEXT")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="mrd: a parameter sent in the JSON TEXT after HEADER ({\"parameters\": {...}}), e.g. "
                        "--param pixel_type=uint16; repeatable")
    p.add_argument("--out", type=Path, required=True, help="output ISMRMRD .h5 file for everything received")
    p.add_argument("--group", default=None, metavar="NAME",
                   help="HDF5 group of the file to send (default: /dataset, else the only top-level group; "
                        "an MRD client output file names it after a timestamp)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to wait for the connection (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds without any traffic before giving up (default 120)")


def config_message(config: str | None):
    """The CONFIG message for ``--config`` (see the module docstring)."""
    from ismrmrd.serialization import ConfigFile, ConfigText

    if config is None:
        return ConfigText(DEFAULT_CONFIG)
    if config.lstrip().startswith("<"):
        return ConfigText(config)
    path = Path(config)
    if path.is_file():
        return ConfigText(path.read_text())
    if len(config.encode()) >= 1024:
        raise InputError("--config name is too long for a CONFIG_FILE message")
    return ConfigFile(config)


class _SocketWriter:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, b) -> None:
        self.sock.sendall(bytes(b))

    def flush(self) -> None:
        pass


def exchange(host: str, port: int, header_xml: str, images: list, *, config=None, connect_timeout: float = 5.0,
             timeout: float = 120.0, on_sent=None, on_received=None) -> list:
    """Send a stream and return every message received until the peer's CLOSE.

    Args:
        config: a ``ConfigText`` / ``ConfigFile`` (default: :func:`config_message` of None).
        on_sent: called as ``on_sent(k, image, t)`` after image ``k`` is written (benchmarks).
        on_received: called as ``on_received(item, t)`` for every message received.

    Raises:
        InputError: unreachable server, no traffic for ``timeout`` seconds, or a lost connection.
    """
    sock = _connect(host, port, connect_timeout, "`vne serve` or gadgetron")
    return exchange_on(sock, header_xml, images, config=config, timeout=timeout, on_sent=on_sent,
                       on_received=on_received, where=f"{host}:{port}")


def exchange_on(sock: socket.socket, header_xml: str, images: list, *, config=None, timeout: float = 120.0,
                on_sent=None, on_received=None, where: str = "peer") -> list:
    """:func:`exchange` on an already connected socket (closed at the end), e.g. one accepted
    from a gadget that Gadgetron-style execute mode started."""
    from ismrmrd.serialization import ProtocolDeserializer, ProtocolSerializer

    from ..io.mrd.header import parse_header

    sock.settimeout(timeout)
    hdr = parse_header(header_xml)

    def send() -> None:
        ser = ProtocolSerializer(_SocketWriter(sock))
        ser.serialize(config if config is not None else config_message(None))
        ser.serialize(hdr)
        for k, im in enumerate(images):
            ser.serialize(im)
            if on_sent:
                on_sent(k, im, time.perf_counter())
        ser.close()

    received: list = []
    reader = sock.makefile("rb")

    def receive() -> None:
        for item in ProtocolDeserializer(reader).deserialize():
            received.append(item)
            if on_received:
                on_received(item, time.perf_counter())

    _converse(sock, send, receive, lambda: len(received), timeout=timeout, where=where, thread_name="vne-stream-send",
              also_close=reader)
    return received


def _converse(sock: socket.socket, send, receive, n_received, *, timeout: float, where: str, thread_name: str,
              also_close=None) -> None:
    """Both directions of a client session at once: ``send()`` in a second thread (the server
    answers each message as it arrives, so the client must read while it sends), ``receive()``
    here until the peer's CLOSE; then ``also_close`` and the socket are closed.

    ``receive`` raises EOFError when the peer closes without CLOSE; ``n_received()`` counts the
    messages received so far, for the errors.

    Raises:
        InputError: no traffic for ``timeout`` s, a reply that cannot be framed, a connection
            that ends without CLOSE or is lost, or a failed send (other than the peer having
            closed: its replies say why).
    """
    from ..io.framing import FramingError

    send_error: list[BaseException] = []

    def sender() -> None:
        try:
            send()
        except BaseException as exc:
            send_error.append(exc)

    t = threading.Thread(target=sender, name=thread_name, daemon=True)
    t.start()
    try:
        receive()
    except FramingError as exc:
        raise InputError(f"reply from {where} cannot be read after {n_received()} messages: {exc}") from None
    except socket.timeout:
        raise InputError(f"no reply from {where} for {timeout:g} s (received {n_received()} messages)") from None
    except EOFError:
        raise InputError(f"connection to {where} closed without CLOSE after {n_received()} messages") from None
    except OSError as exc:
        raise InputError(f"connection to {where} lost after {n_received()} messages: {exc.strerror or exc}") from None
    finally:
        t.join(timeout=5)
        try:
            if also_close is not None:
                also_close.close()
            sock.close()
        except OSError:
            pass
    if send_error and not isinstance(send_error[0], (BrokenPipeError, ConnectionResetError)):
        raise InputError(f"sending to {where} failed: {send_error[0]}")


def run(args) -> int:
    import ismrmrd

    from ..io.mrd.hdf5 import read_mrd_file, write_mrd_file

    if getattr(args, "protocol", "gadgetron") == "mrd":
        return run_mrd(args)
    if getattr(args, "param", None):
        raise InputError("--param is for --protocol mrd (Gadgetron reads properties from its --config XML)")
    t0 = time.perf_counter()
    header, images = read_mrd_file(args.file, group=getattr(args, "group", None))
    received = exchange(args.host, args.port, header, images, config=config_message(args.config),
                        connect_timeout=args.connect_timeout, timeout=args.timeout)
    out_images = [r for r in received if isinstance(r, ismrmrd.Image)]
    texts = [r for r in received if isinstance(r, str)]
    write_mrd_file(args.out, header, out_images)
    sent_series = {im.image_series_index for im in images}
    new = sorted({im.image_series_index for im in out_images} - sent_series)
    extra = f", {len(texts)} text message(s)" if texts else ""
    print(f"vne stream: sent {len(images)} images to {args.host}:{args.port}, received {len(out_images)} "
          f"({len(out_images) - sum(im.image_series_index in sent_series for im in out_images)} in new series "
          f"{', '.join(map(str, new)) or '-'}{extra}) -> {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- --protocol mrd
MRD_DEFAULT_CONFIG = "vne"


class MRDReply:
    """Everything an MRD server sent back, in order, up to its CLOSE.

    Attributes:
        frames: every message received except CLOSE (:class:`vne.io.framing.Frame`: exact bytes in
            ``raw``).
        got_close: the server ended with CLOSE.
    """

    def __init__(self) -> None:
        self.frames: list = []
        self.got_close = False

    def of(self, msg_id: int) -> list:
        return [f for f in self.frames if f.msg_id == msg_id]

    @property
    def texts(self) -> list[str]:
        """The TEXT (logging) messages, NUL stripped."""
        from ..io import framing as F

        return [f.text or "" for f in self.of(F.TEXT)]


def parse_params(items: list[str]) -> dict[str, str]:
    """``--param NAME=VALUE`` items as a dict (values stay text, as OpenRecon sends them)."""
    params: dict[str, str] = {}
    for it in items or []:
        if "=" not in it:
            raise InputError(f"--param '{it}' is not NAME=VALUE")
        k, v = it.split("=", 1)
        if not k.strip():
            raise InputError(f"--param '{it}' has no name")
        params[k.strip()] = v.strip()
    return params


def mrd_config_message(config: str | None) -> bytes:
    """The first message of an MRD session for ``--config``: CONFIG_FILE with a config name
    (default ``vne``), or CONFIG_TEXT for JSON text or a file holding it."""
    from ..io import framing as F

    text = MRD_DEFAULT_CONFIG if config is None else config
    if text.lstrip().startswith(("{", "<")):
        return F.pack_text(F.CONFIG_TEXT, text)
    path = Path(text)
    if path.suffix.lower() in (".json", ".xml") and path.is_file():
        return F.pack_text(F.CONFIG_TEXT, path.read_text())
    if not text.strip():
        raise InputError("--config is empty: give a config name (e.g. vne)")
    if len(text.encode()) > 1024:
        raise InputError("--config name is too long for a CONFIG_FILE message (1024 bytes)")
    return F.pack_config_file(text.strip())


def mrd_messages(header_xml: str, images: list, *, config: str | None = None, params: dict | None = None) -> list[bytes]:
    """The whole MRD session a client sends: CONFIG, HEADER, [TEXT parameters], IMAGEs, CLOSE."""
    import json

    from ..io import framing as F

    out = [mrd_config_message(config), F.pack_text(F.HEADER, header_xml)]
    if params:
        name = MRD_DEFAULT_CONFIG if config is None else (None if config.lstrip().startswith(("{", "<")) else config.strip())
        body = dict(params)
        if name and "config" not in body:
            body["config"] = name  # python-ismrmrd-server: parameters.config overrides the CONFIG_FILE name
        out.append(F.pack_text(F.TEXT, json.dumps({"version": "1.1.0", "parameters": body})))
    out += [F.pack_image(im) for im in images]
    out.append(F.pack_close())
    return out


def _connect(host: str, port: int, connect_timeout: float, what: str) -> socket.socket:
    where = f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=connect_timeout)
    except socket.timeout:
        raise InputError(f"cannot connect to {where}: timed out after {connect_timeout:g} s") from None
    except OSError as exc:
        raise InputError(f"cannot connect to {where}: {exc.strerror or exc} (is {what} running?)") from None


def exchange_mrd(host: str, port: int, header_xml: str, images: list, *, config: str | None = None,
                 params: dict | None = None, connect_timeout: float = 5.0, timeout: float = 120.0,
                 limits=None) -> MRDReply:
    """Play an MRD client: send the session from a second thread (the server answers each
    message as it arrives, so the client must read while it sends) and frame every reply with
    :func:`vne.io.framing.read_frame` until the server's CLOSE.

    Raises:
        InputError: unreachable server, no traffic for ``timeout`` s, a reply that cannot be
            framed, or a connection that ends without CLOSE.
    """
    from ..io import framing as F

    messages = mrd_messages(header_xml, images, config=config, params=params)
    where = f"{host}:{port}"
    sock = _connect(host, port, connect_timeout, "`vne serve --protocol mrd` or another MRD server")
    return exchange_mrd_on(sock, messages, timeout=timeout, limits=limits or F.DEFAULT_LIMITS, where=where)


def exchange_mrd_on(sock: socket.socket, messages: list[bytes], *, timeout: float = 120.0, limits=None,
                    where: str = "peer") -> MRDReply:
    """:func:`exchange_mrd` on a connected socket (closed at the end) with prepared messages."""
    from ..io import framing as F

    sock.settimeout(timeout)

    def send() -> None:
        for m in messages:
            sock.sendall(m)

    reply = MRDReply()

    def receive() -> None:
        while True:
            frame = F.read_frame(sock, limits or F.DEFAULT_LIMITS)
            if frame is None:
                raise EOFError  # closed without CLOSE
            if frame.msg_id == F.CLOSE:
                reply.got_close = True
                return
            reply.frames.append(frame)

    _converse(sock, send, receive, lambda: len(reply.frames), timeout=timeout, where=where,
              thread_name="vne-stream-mrd-send")
    return reply


def run_mrd(args) -> int:
    """``vne stream --protocol mrd``: send the file, print the server's TEXT messages, write the images."""
    import ismrmrd

    from ..io import framing as F
    from ..io.mrd.hdf5 import read_mrd_file, write_mrd_file

    t0 = time.perf_counter()
    params = parse_params(getattr(args, "param", []))
    header, images = read_mrd_file(args.file, group=getattr(args, "group", None))
    reply = exchange_mrd(args.host, args.port, header, images, config=args.config, params=params,
                         connect_timeout=args.connect_timeout, timeout=args.timeout)
    out_images, not_written = [], []
    for frame in reply.of(F.IMAGE):
        try:
            im = F.decode_image(frame)
        except ValueError as exc:
            not_written.append(f"{frame.describe()} ({exc})")
            continue
        if isinstance(im, ismrmrd.Image):
            out_images.append(im)
        else:  # 4-byte DATATYPE_INT: ismrmrd for Python cannot store it
            not_written.append(f"{frame.describe()} (int32 data, which ismrmrd for Python cannot write)")
    for text in reply.texts:
        print(f"vne stream: server: {text}")
    write_mrd_file(args.out, header, out_images)
    sent_series = {im.image_series_index for im in images}
    n_back = sum(im.image_series_index in sent_series for im in out_images)
    new = sorted({im.image_series_index for im in out_images} - sent_series)
    others = len(reply.of(F.ACQUISITION)) + len(reply.of(F.WAVEFORM))
    extra = f", {len(reply.texts)} text message(s)"
    if others:
        extra += f", {others} acquisition/waveform message(s) not written"
    for what in not_written:
        print(f"vne stream: warning: {what} not written to {args.out}", file=sys.stderr)
    print(f"vne stream: sent {len(images)} images to {args.host}:{args.port} (MRD), received {len(out_images)} "
          f"({len(out_images) - n_back} in new series {', '.join(map(str, new)) or '-'}{extra}) -> {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
