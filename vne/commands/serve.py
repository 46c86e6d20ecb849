"""``vne serve``: the VNE gadget as a long-running external process (Gadgetron connect mode).

Gadgetron's ``<external><connect port="18000" address="127.0.0.1"/>`` (``pipelines_xml/vne-connect.xml``)
connects here for every stream. Each connection is read by :class:`vne.runtime.gadgetron_link.GadgetronLink`
(CONFIG and HEADER, then every data message framed by :mod:`vne.io.framing` and passed on by its
exact bytes before anything is decoded) and handed to :func:`gadgets.vne_gadget.gadget`, the
same function Gadgetron runs in execute mode; this server keeps accepting (one thread per
connection) and keeps the model loaded and warm between them (one ONNX Runtime session per
process, :func:`vne.runtime.model.load_model`).

With ``--protocol mrd`` the same process serves the MRD streaming protocol instead
(python-ismrmrd-server, Siemens FIRE / OpenRecon clients; :mod:`vne.runtime.mrd_server`,
``docs/mrd-server.md``), default port 9002; the Gadgetron path is unchanged.

The server binds to loopback (127.0.0.1) by default: the stream carries patient data and the
protocol has no authentication. A client's stream configuration cannot name files: its
``model``, ``model_sha256`` and ``cache_dir`` properties are ignored with one logged warning
(``PipelineConfig.from_properties(trusted=False)``); they come from this command line only. A
model that cannot be loaded or is refused (sha256, :mod:`vne.runtime.model`) is reported at start and
in every stream's log; the server still serves (pass-through only) so the scanner's images are
never held up.

Bounds (both protocols): ``--read-timeout`` (no data for that long ends a connection),
``--max-active`` connections at once (gadgetron: further connections wait in the listen backlog,
none is refused; mrd: a TEXT "busy" and CLOSE). A failed ``accept()`` (e.g. out of file
descriptors) is logged and retried with a back-off: the server never stops listening on its own.
Both protocols share that accept loop (:func:`vne.runtime.listener.accept_connections`).

VNE work (both protocols) runs in one bounded pool for all connections (:mod:`vne.runtime.workers`):
``--vne-workers`` threads share the one model session, at most ``--vne-queue`` slices wait, and a
slice that finds the queue full or waits longer than ``--vne-max-wait`` seconds gets no VNE, with
the reason in its stream's log; every image still passes through at once. Memory stays flat:
at most two malloc arenas, and free memory goes back to the system when a stream ends
(:mod:`vne.runtime.memory`).

Declared message lengths are checked against ``--max-message-mb`` (data) and 16 MiB (texts,
image attributes) before anything is allocated.

SIGTERM or Ctrl-C (:mod:`vne.runtime.shutdown`; a second Ctrl-C stops waiting, exit code 130): the
listener closes, open connections get ``--shutdown-grace`` seconds (default 5) to finish; then a
connection waiting between messages is closed like a stream that ended (VNE for its complete
slices, CLOSE) and one inside a message or still working is cut. One log line gives the counts;
the exit code is 0, or 3 if a stream was cut.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from ..runtime import memory, mrd_server, workers as vne_workers
from ..errors import InputError
from ..runtime.listener import accept_connections
from ..runtime.shutdown import DEFAULT_GRACE_S, EXIT_CUT, ConnectionTracker
from .args import port_number

NAME = "serve"
HELP = ("serve the VNE gadget for Gadgetron <external><connect port=.../>, or for MRD clients with --protocol mrd "
        "(loopback by default)")
DEFAULT_PORT = 18000
MRD_DEFAULT_PORT = 9002
DEFAULT_READ_TIMEOUT_S = 600.0      # gadgetron: generous, a scanner may pause between series
MRD_DEFAULT_READ_TIMEOUT_S = 300.0
DEFAULT_MAX_ACTIVE = 16

log = logging.getLogger("vne.serve")


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--protocol", choices=("gadgetron", "mrd"), default="gadgetron",
                   help="gadgetron: Gadgetron external-gadget connections (default); mrd: MRD streaming clients "
                        "(python-ismrmrd-server client.py, FIRE/OpenRecon), config name 'vne'")
    p.add_argument("--port", type=port_number, default=None,
                   help=f"port (default {DEFAULT_PORT} for gadgetron, {MRD_DEFAULT_PORT} for mrd; 0 picks a free one)")
    p.add_argument("--model", default=None, help="ONNX model (default: newest models/vne-sim-*.onnx, checked against "
                                                 "models/manifest.json)")
    p.add_argument("--model-sha256", default=None, metavar="HEX",
                   help="sha256 the model file must have (a model outside models/manifest.json; else "
                        "$VNE_MODEL_SHA256_ALLOW). A mismatch: pass-through only, with the reason in every stream's log")
    p.add_argument("--cache-dir", default=None, help="study cache folder, private to this user (default $VNE_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/vne-study-cache, else <tmp>/vne-study-cache-<uid>)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-connections", type=int, default=0, help="exit after this many connections (0: run until stopped)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up inference at start")
    p.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="a default gadget property (connections' own properties override it); repeatable")
    p.add_argument("--max-active", type=int, default=DEFAULT_MAX_ACTIVE,
                   help="connections served at once (default 16); gadgetron: more wait in the listen backlog; "
                        "mrd: one more gets a TEXT 'busy' and CLOSE")
    p.add_argument("--read-timeout", type=float, default=None,
                   help=f"seconds without data before a connection is ended (default {DEFAULT_READ_TIMEOUT_S:g} for "
                        f"gadgetron, {MRD_DEFAULT_READ_TIMEOUT_S:g} for mrd, which ends it with TEXT + CLOSE)")
    p.add_argument("--vne-workers", type=int, default=None,
                   help=f"threads computing VNE, shared by all connections (default {vne_workers.default_workers()}: "
                        f"one per two cores)")
    p.add_argument("--vne-queue", type=int, default=vne_workers.DEFAULT_MAX_QUEUED,
                   help=f"slices that may wait for a VNE worker (default {vne_workers.DEFAULT_MAX_QUEUED}); "
                        f"one more gets no VNE (logged), its images pass through")
    p.add_argument("--vne-max-wait", type=float, default=vne_workers.DEFAULT_MAX_WAIT_S,
                   help=f"seconds a slice may wait for a worker before its VNE is skipped (default "
                        f"{vne_workers.DEFAULT_MAX_WAIT_S:g})")
    p.add_argument("--max-message-mb", type=float, default=1024.0,
                   help="largest declared data of one image/acquisition/waveform in MiB (default 1024); "
                        "text and image attributes are limited to 16 MiB; a message declaring more is not read "
                        "(the input ends there, with the reason logged)")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_GRACE_S, metavar="S",
                   help=f"on SIGTERM, seconds open connections get to finish (default {DEFAULT_GRACE_S:g}); then idle "
                        f"ones are closed (VNE for their complete slices, CLOSE) and busy ones cut (exit code "
                        f"{EXIT_CUT})")


def _handle(conn: socket.socket, peer, defaults, model, read_timeout_s: float | None = None,
            limits=None, reader=None) -> None:
    """Serve one accepted Gadgetron external connection to its end; never raises."""
    from ..io import framing as F
    from ..runtime.gadgetron_link import GadgetronLink

    try:
        from gadgets.vne_gadget import gadget
    except ImportError:  # the library alone is installed
        from ..runtime.gadgetron_link import run_connection as gadget
    peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
    t0 = time.perf_counter()
    link = None
    try:
        limits = limits or F.DEFAULT_LIMITS
        # a client: its configuration may not name files (trusted=False)
        link = GadgetronLink.open(conn, limits=limits, read_timeout_s=read_timeout_s, peer=peer_s,
                                  reader=reader or F.FrameReader(conn, limits), trusted=False)
        if not link.started:
            return
        gadget(link, defaults, model=model)
        log.info("connection from %s done in %.1f s", peer_s, time.perf_counter() - t0)
    except Exception as exc:  # a bug here must cost this connection only, never the server
        log.exception("connection from %s: internal error (%s: %s)", peer_s, exc.__class__.__name__, exc)
    finally:
        if link is not None:
            link.close()
        try:
            conn.close()
        except OSError:
            pass


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); InputError with one line when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve --host {host}: {exc}") from None
    family, stype, proto, _, addr = infos[0]
    srv = socket.socket(family, stype, proto)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(addr)
    except OSError as exc:
        srv.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    srv.listen(socket.SOMAXCONN)  # many scanners may connect at once; a short backlog resets some
    return srv


def serve(srv: socket.socket, defaults, model, *, max_connections: int = 0, stop: threading.Event | None = None,
          read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S, max_active: int = DEFAULT_MAX_ACTIVE,
          limits=None, grace_s: float = DEFAULT_GRACE_S, tracker: ConnectionTracker | None = None) -> int:
    """Accept connections on ``srv`` until ``stop`` is set or ``max_connections`` were served.

    At most ``max_active`` connections are served at once; while all are busy no new one is
    accepted (they wait in the listen backlog). A failed ``accept()`` is logged and retried.
    When ``stop`` is set, open connections get ``grace_s`` seconds (:mod:`vne.runtime.shutdown`;
    ``tracker.result`` says what happened to them). Returns the number of connections accepted.
    """
    from ..io import framing as F

    limits = limits or F.DEFAULT_LIMITS

    def serve_one(conn, peer, reader):
        _handle(conn, peer, defaults, model, read_timeout_s, limits, reader)

    return accept_connections(srv, serve_one, limits=limits, max_active=max_active, grace_s=grace_s,
                              max_connections=max_connections, stop=stop, tracker=tracker, logger=log)


def _limits(args):
    from ..io.framing import FrameLimits

    max_mb = getattr(args, "max_message_mb", 1024.0)
    if not max_mb > 0:
        raise InputError("--max-message-mb must be positive")
    return FrameLimits(max_data=int(max_mb * (1 << 20)))


def _mrd_options(args) -> "mrd_server.ServerOptions":
    max_active = getattr(args, "max_active", DEFAULT_MAX_ACTIVE)
    read_timeout = getattr(args, "read_timeout", None)
    read_timeout = MRD_DEFAULT_READ_TIMEOUT_S if read_timeout is None else read_timeout
    if max_active < 1 or not read_timeout > 0:
        raise InputError("--max-active, --read-timeout and --max-message-mb must be positive")
    return mrd_server.ServerOptions(limits=_limits(args), read_timeout_s=float(read_timeout), max_active=int(max_active))


def run(args) -> int:
    from ..runtime.model import load_model
    from ..runtime.config import PipelineConfig
    from .infer import parse_properties

    if args.model and not Path(args.model).is_file():  # a named model must exist; a refused one serves pass-through
        raise InputError(f"--model {args.model} does not exist")
    protocol = getattr(args, "protocol", "gadgetron") or "gadgetron"
    mrd_options = _mrd_options(args) if protocol == "mrd" else None
    read_timeout = getattr(args, "read_timeout", None)
    read_timeout = DEFAULT_READ_TIMEOUT_S if read_timeout is None else float(read_timeout)
    max_active = int(getattr(args, "max_active", DEFAULT_MAX_ACTIVE))
    if not read_timeout > 0 or max_active < 1:
        raise InputError("--read-timeout and --max-active must be positive")
    base = PipelineConfig(model=args.model, model_sha256=getattr(args, "model_sha256", None) or None,
                          cache_dir=args.cache_dir, intra_op_threads=args.threads)
    # the server's own command line: trusted (it may name the model and the cache folder)
    defaults = PipelineConfig.from_properties(parse_properties(args.property), base=base, trusted=True)
    n_workers = getattr(args, "vne_workers", None)
    queue_len = getattr(args, "vne_queue", vne_workers.DEFAULT_MAX_QUEUED)
    max_wait = getattr(args, "vne_max_wait", vne_workers.DEFAULT_MAX_WAIT_S)
    if (n_workers is not None and n_workers < 1) or queue_len < 1 or not max_wait > 0:
        raise InputError("--vne-workers, --vne-queue and --vne-max-wait must be positive")
    pool = vne_workers.configure(n_workers, queue_len, max_wait)
    memory.limit_arenas()
    from ..runtime.inference import preload

    preload()  # the first slice's imports, now rather than in the first stream
    model = None
    try:
        model = load_model(defaults.model or None, intra_op_threads=defaults.intra_op_threads,
                           prefer_gpu=defaults.prefer_gpu, batch_size=defaults.batch_size, sha256=defaults.model_sha256,
                           warm_up=not args.no_warmup)
    except InputError as exc:
        log.error("VNE model unusable: %s; serving pass-through only", exc)
        print(f"vne serve: error: {exc} (serving pass-through only)", file=sys.stderr, flush=True)
    port = args.port if args.port is not None else (MRD_DEFAULT_PORT if protocol == "mrd" else DEFAULT_PORT)
    srv = bind(args.host, port)
    host, port = srv.getsockname()[:2]
    stop = threading.Event()
    signals: list[str] = []
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):  # only flags: the accept loop logs and drains
            if signum == signal.SIGINT and stop.is_set():
                raise KeyboardInterrupt  # a second Ctrl-C: stop waiting
            signals.append(signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    grace = float(getattr(args, "shutdown_grace", DEFAULT_GRACE_S))
    if grace < 0:
        raise InputError("--shutdown-grace must not be negative")
    what = f"{model.name} {model.version} on {', '.join(model.providers)}" if model else "no model: pass-through"
    what += f"; {pool.n_workers} VNE worker(s), queue {pool.max_queued}"
    if protocol == "mrd":
        what = f"MRD protocol, config '{mrd_server.VNE_CONFIG}'; {what}"
    print(f"vne serve: listening on {host}:{port} ({what})", flush=True)
    tracker = ConnectionTracker()
    try:
        if protocol == "mrd":
            n = mrd_server.serve(srv, defaults, model, replace(mrd_options, grace_s=grace),
                                 max_connections=args.max_connections, stop=stop, tracker=tracker)
        else:
            n = serve(srv, defaults, model, max_connections=args.max_connections, stop=stop,
                      read_timeout_s=read_timeout, max_active=max_active, limits=_limits(args), grace_s=grace,
                      tracker=tracker)
    except KeyboardInterrupt:
        stop.set()
        print("vne serve: interrupted", flush=True)
        return 130
    res = tracker.result
    if signals:
        code = res.exit_code if res else 0
        msg = f"vne serve: stopped by {signals[0]} after {n} connection(s); {res.describe() if res else 'none open'}" \
              f"; exit code {code}"
        (log.warning if code else log.info)("%s", msg[len("vne serve: "):])
        print(msg, flush=True)
        if res is not None and res.abandoned:  # threads still in native code: do not wait for them at exit
            logging.shutdown()
            sys.stdout.flush()
            os._exit(code)
        return code
    print(f"vne serve: stopped after {n} connection(s)", flush=True)
    return 0
