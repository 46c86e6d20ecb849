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
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from ..exam import InputError

NAME = "stream"
HELP = "send an ISMRMRD file to a Gadgetron / vne serve endpoint and save what comes back (integration testing)"
DEFAULT_CONFIG = "<configuration/>"


def add_arguments(p) -> None:
    p.add_argument("file", type=Path, help="ISMRMRD HDF5 file to send")
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="server port (vne serve: 18000; gadgetron: 9002)")
    p.add_argument("--config", default=None, help="config file to send as text, XML text, or a config name for Gadgetron")
    p.add_argument("--out", type=Path, required=True, help="output ISMRMRD .h5 file for everything received")
    p.add_argument("--group", default=None, metavar="NAME", help="HDF5 group of the file to send (default: /dataset, else the only top-level group; an MRD client output file names it after a timestamp)")
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
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except socket.timeout:
        raise InputError(f"cannot connect to {where}: timed out after {connect_timeout:g} s") from None
    except OSError as exc:
        raise InputError(f"cannot connect to {where}: {exc.strerror or exc} (is `vne serve` or gadgetron running?)") from None
    return exchange_on(sock, header_xml, images, config=config, timeout=timeout, on_sent=on_sent,
                       on_received=on_received, where=where)


def exchange_on(sock: socket.socket, header_xml: str, images: list, *, config=None, timeout: float = 120.0,
                on_sent=None, on_received=None, where: str = "peer") -> list:
    """:func:`exchange` on an already connected socket (closed at the end), e.g. one accepted
    from a gadget that Gadgetron-style execute mode started."""
    from ismrmrd.serialization import ProtocolDeserializer, ProtocolSerializer

    from ..mrd_io import parse_header

    sock.settimeout(timeout)
    hdr = parse_header(header_xml)
    send_error: list[BaseException] = []

    def sender() -> None:
        try:
            ser = ProtocolSerializer(_SocketWriter(sock))
            ser.serialize(config if config is not None else config_message(None))
            ser.serialize(hdr)
            for k, im in enumerate(images):
                ser.serialize(im)
                if on_sent:
                    on_sent(k, im, time.perf_counter())
            ser.close()
        except BaseException as exc:
            send_error.append(exc)

    t = threading.Thread(target=sender, name="vne-stream-send", daemon=True)
    t.start()
    received: list = []
    reader = sock.makefile("rb")
    try:
        for item in ProtocolDeserializer(reader).deserialize():
            received.append(item)
            if on_received:
                on_received(item, time.perf_counter())
    except socket.timeout:
        raise InputError(f"no reply from {where} for {timeout:g} s (received {len(received)} messages)") from None
    except EOFError:
        raise InputError(f"connection to {where} closed without CLOSE after {len(received)} messages") from None
    except OSError as exc:
        raise InputError(f"connection to {where} lost after {len(received)} messages: {exc.strerror or exc}") from None
    finally:
        t.join(timeout=5)
        try:
            reader.close()
            sock.close()
        except OSError:
            pass
    if send_error and not isinstance(send_error[0], (BrokenPipeError, ConnectionResetError)):
        raise InputError(f"sending to {where} failed: {send_error[0]}")
    return received


def run(args) -> int:
    import ismrmrd

    from ..mrd_io import read_mrd_file, write_mrd_file

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
