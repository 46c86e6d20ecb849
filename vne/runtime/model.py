"""The ONNX Runtime session that runs the VNE generator, and the contract read from its metadata.

One session per model file per process: :func:`load_model` keeps a module-level cache keyed by
the resolved path (and the thread setting), so ``vne serve`` loads the model once and every
connection reuses the warm session. A file that changed on disk (size or mtime) is reloaded.

Execution providers are chosen by availability: ``CUDAExecutionProvider`` when the installed
ONNX Runtime offers it (the ``onnxruntime-gpu`` build, ``VNE_ORT=gpu``), then
``CPUExecutionProvider``. The choice is logged once per load.

Everything the runtime needs to know about the model comes from the ``vne_contract`` metadata
property (:class:`vne.prepare.contract.ModelContract`); the graph's inputs are checked against it at
load time, so a model that does not fit the data path fails with one clear
:class:`~vne.exam.InputError` instead of a shape error in the middle of a stream.

Shapes (float32):
    predict() inputs:  cine (B, n_cine, H, W), ir (B, n_ir, H, W), ir_ti_ms (B, n_ir),
                       t1_map_ms (B, 1, H, W), on the T1 grid, unpadded
    predict() output:  vne (B, H, W), normalised PSIR (remote myocardium ~0, LV blood ~1)

Trust (:func:`verify_model`, called by :func:`load_model` before ONNX Runtime sees the file):
the file's sha256 is computed (cached by path, size, mtime, ctime and inode, so a warm server
does not rehash per stream) and

- an expected sha256 given by the operator (``--model-sha256``, the server-side ``model_sha256``
  property; :func:`pin_sha256`) must match, whatever the file;
- else a sha256 listed in ``$VNE_MODEL_SHA256_ALLOW`` (comma or space separated) is accepted;
- else a file whose name is listed in ``models/manifest.json`` (the shipped models) must have
  the listed sha256, and a file found by the default search or lying in a model folder
  (:func:`model_search_dirs`) must be listed;
- else (an operator's model by path elsewhere) it is loaded with a warning naming its sha256.

A refusal is an :class:`~vne.exam.InputError`: the pipeline then passes everything through
with the reason in every stream's log.

This module never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..prepare.contract import CONTRACT_KEY, INPUT_NAMES, OUTPUT_NAME, ModelContract, crop_output, pad_to_multiple
from ..errors import InputError

log = logging.getLogger(__name__)

MODEL_GLOB = "vne-sim-*.onnx"
# Environment: an explicit model file, a folder to search, and the intra-op thread count.
ENV_MODEL = "VNE_MODEL"
ENV_MODEL_DIR = "VNE_MODEL_DIR"
ENV_THREADS = "VNE_ORT_THREADS"
# sha256 digests of operator models accepted without a manifest entry (comma / space separated)
ENV_MODEL_ALLOW = "VNE_MODEL_SHA256_ALLOW"
MANIFEST_NAME = "manifest.json"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
DEFAULT_BATCH_SIZE = 8
WARM_UP_SHAPE = (160, 160)   # the heart window's usual size (vne.prepare.roi.MIN_WINDOW_PX)
# Expected rank and channel dimension (from the contract) of each graph input.
_RANKS = {"cine": 4, "ir": 4, "ir_ti_ms": 2, "t1_map_ms": 4}

_cache: dict[tuple, "VNEModel"] = {}
_cache_lock = threading.Lock()
_hashes: dict[tuple, str] = {}     # (resolved path, size, mtime_ns, ctime_ns, inode) -> sha256
_pins: dict[str, str] = {}         # resolved path -> the sha256 an operator expects
_reported: set[tuple] = set()      # refusals / warnings already logged (once per file state)
_trust_lock = threading.Lock()


def choose_providers(prefer_gpu: bool = True) -> list[str]:
    """The execution providers to use, best first: CUDA when available, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    if prefer_gpu and "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def model_search_dirs() -> list[Path]:
    """Folders searched for ``vne-sim-*.onnx``: $VNE_MODEL_DIR, the repository's models/,
    ``<prefix>/share/vne/models``."""
    import sys

    dirs = []
    if os.environ.get(ENV_MODEL_DIR):
        dirs.append(Path(os.environ[ENV_MODEL_DIR]))
    dirs.append(Path(__file__).resolve().parents[2] / "models")
    dirs.append(Path(sys.prefix) / "share" / "vne" / "models")
    return dirs


def find_default_model() -> Path | None:
    """The default model: $VNE_MODEL if set, else the newest ``vne-sim-*.onnx`` found.

    "Newest" is the highest file name in natural order (``vne-sim-1.10.onnx`` after
    ``vne-sim-1.9.onnx``) in the first folder of :func:`model_search_dirs` that has any.
    """
    if os.environ.get(ENV_MODEL):
        return Path(os.environ[ENV_MODEL])
    for d in model_search_dirs():
        if d.is_dir():
            found = sorted(d.glob(MODEL_GLOB), key=_natural_key)
            if found:
                return found[-1]
    return None


# ---------------------------------------------------------------------------- trust
def normalize_sha256(text) -> str:
    """A sha256 as 64 lower-case hex digits (an optional ``sha256:`` prefix is dropped).

    Raises:
        InputError: anything else.
    """
    t = str(text or "").strip().lower()
    if t.startswith("sha256:"):
        t = t[len("sha256:"):]
    if not _SHA256_RE.fullmatch(t):
        raise InputError(f"'{str(text)[:80]}' is not a sha256 (64 hex digits)")
    return t


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def file_sha256(path) -> str:
    """The sha256 of a file, cached by (resolved path, size, mtime, ctime, inode)."""
    p = Path(path).resolve()
    key = (str(p),) + _stamp(p)
    with _trust_lock:
        if key in _hashes:
            return _hashes[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if (str(p),) + _stamp(p) == key:  # not changed while reading
        with _trust_lock:
            _hashes[key] = digest
    return digest


def pin_sha256(path, sha256) -> None:
    """Record the sha256 an operator expects for a model file: every later load of that file
    in this process (also one without an explicit sha256) must match it."""
    digest = normalize_sha256(sha256)
    with _trust_lock:
        _pins[str(Path(path).expanduser().resolve())] = digest


def manifest_paths() -> list[Path]:
    """Manifests of shipped models, first wins: the repository's ``models/manifest.json``, then
    ``manifest.json`` in each folder of :func:`model_search_dirs` (the container copies
    ``models/`` into ``$VNE_MODEL_DIR``)."""
    out: list[Path] = []
    for d in [Path(__file__).resolve().parents[2] / "models"] + model_search_dirs():
        m = d / MANIFEST_NAME
        if m not in out:
            out.append(m)
    return out


def read_manifest(path) -> dict[str, str]:
    """{file name: sha256} of a manifest (``{"models": {name: sha256, ...}}``); {} when absent.

    Raises:
        InputError: a manifest that exists but is not valid.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InputError(f"model manifest {p} is unreadable ({exc})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise InputError(f"model manifest {p} has no 'models' object")
    try:
        return {str(k): normalize_sha256(v) for k, v in models.items()}
    except InputError as exc:
        raise InputError(f"model manifest {p}: {exc}") from None


def manifest_entry(name: str) -> tuple[str | None, Path | None]:
    """(listed sha256, manifest) of a model file name in the first manifest that lists it."""
    for m in manifest_paths():
        listed = read_manifest(m).get(name)
        if listed:
            return listed, m
    return None, None


def allowed_sha256s() -> set[str]:
    """The digests in ``$VNE_MODEL_SHA256_ALLOW`` (invalid entries are logged and ignored)."""
    out = set()
    for item in re.split(r"[,\s]+", os.environ.get(ENV_MODEL_ALLOW, "").strip()):
        if item:
            try:
                out.add(normalize_sha256(item))
            except InputError as exc:
                _report(("allow", item), logging.WARNING, f"${ENV_MODEL_ALLOW}: {exc}; ignored")
    return out


def _report(key: tuple, level: int, msg: str) -> None:
    with _trust_lock:
        if key in _reported:
            return
        _reported.add(key)
    log.log(level, msg)


def _in_model_dir(path: Path) -> bool:
    for d in model_search_dirs():
        try:
            if path.parent == d.resolve():
                return True
        except OSError:
            continue
    return False


def verify_model(path, sha256: str | None = None, *, searched: bool = False) -> tuple[str, str]:
    """Check a model file before it is loaded (rules in the module docstring).

    Args:
        sha256: the digest the operator expects (else a :func:`pin_sha256` of this file, if any).
        searched: the file came from the default search (:func:`find_default_model`).

    Returns:
        (sha256, why it is trusted: ``pinned``, ``allow-listed``, ``manifest`` or ``unpinned``).

    Raises:
        InputError: a mismatch, or a shipped-looking file the manifest does not list.
    """
    p = Path(path).expanduser().resolve()
    try:
        digest = file_sha256(p)
        state = (str(p),) + _stamp(p)
    except OSError as exc:
        raise InputError(f"model file {p} cannot be read ({exc.strerror or exc})") from None

    def refuse(reason: str):
        _report(state + (reason,), logging.ERROR, f"VNE model REFUSED: {reason}")
        raise InputError(reason)

    with _trust_lock:
        expected = _pins.get(str(p))
    if sha256:
        expected = normalize_sha256(sha256)
    if expected:
        if digest != expected:
            refuse(f"model {p} has sha256 {digest}, not the expected {expected} (--model-sha256 / model_sha256)")
        return digest, "pinned"
    if digest in allowed_sha256s():
        return digest, "allow-listed"
    listed, manifest = manifest_entry(p.name)
    if listed is not None:
        if digest != listed:
            refuse(f"model {p} does not match {manifest}: sha256 {digest}, the manifest says {listed} "
                   f"(tampered or damaged file); restore the shipped file, or pass another model with --model-sha256")
        return digest, "manifest"
    if searched or _in_model_dir(p):
        where = ", ".join(str(m) for m in manifest_paths() if m.is_file()) or "no manifest found"
        refuse(f"model {p} (sha256 {digest}) is not listed in the model manifest ({where}); add it to "
               f"models/{MANIFEST_NAME}, or pass it with --model-sha256 or ${ENV_MODEL_ALLOW}")
    _report(state + ("unpinned",), logging.WARNING,
            f"VNE model {p} is not pinned (sha256 {digest}): pass --model-sha256 {digest} or list it in "
            f"${ENV_MODEL_ALLOW} to have it checked at every load")
    return digest, "unpinned"


def session_options(intra_op_threads: int | None = None):
    """ONNX Runtime session options, chosen by measurement (``benchmarks/bench_inference.py
    --onnx``, docs/gadget.md "Runtime settings"):

    * intra-op threads: ``intra_op_threads``, else ``$VNE_ORT_THREADS``, else ORT's default (one
      per core); inter-op 1 and sequential execution (the graph is a chain);
    * no spinning of idle intra-op threads: on a 2-core host shared with the connection threads
      (and here a training job) spinning threads took cores the others needed: 0.75-0.78x the
      time per slice without it, at 160x160 and at 256x304;
    * full graph optimisation (``ORT_ENABLE_ALL``: constant folding, batch norm folded into the
      convolutions, NCHWc layouts): basic took 1.3-1.6x as long;
    * the CPU memory arena on: without it 1.25x as long.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = intra_op_threads if intra_op_threads is not None else int(os.environ.get(ENV_THREADS, "0") or 0)
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = True
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def limit_numpy_threads() -> None:
    """Run numpy's BLAS on one thread in this process (idempotent): the cores belong to ONNX
    Runtime and to the slices running beside each other.

    The slice path's only BLAS products are small (the cine's cycle interpolation, a 25x25 by
    25x25600 product); a multi-threaded OpenBLAS spins its threads against ORT's and the
    connection threads. Measured on the 2-core host beside a 2-thread job: 15.6 ms for that
    product with OpenBLAS's threads, 0.7 ms on one (``benchmarks/profile_slice.py`` shows the
    effect on the whole slice)."""
    global _numpy_threads_limited
    if _numpy_threads_limited:
        return
    _numpy_threads_limited = True
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except Exception:  # no threadpoolctl, or a BLAS it cannot drive: only slower
        log.warning("VNE: could not limit numpy's BLAS threads; small products may run slower", exc_info=True)


_numpy_threads_limited = False


def _dim_ok(dim, expected: int) -> bool:
    """A graph dimension matches when it is symbolic (str / None) or equal."""
    return not isinstance(dim, int) or dim <= 0 or dim == expected


@dataclass
class ModelInfo:
    path: str
    name: str
    version: str
    providers: list[str]
    intra_op_threads: int
    load_seconds: float
    sha256: str = ""


class VNEModel:
    """An ONNX Runtime session of the VNE generator plus its :class:`ModelContract`.

    Use :func:`load_model` (cached) rather than the constructor.

    Raises:
        InputError: the file is missing or not a loadable ONNX model, its ``vne_contract``
            metadata is missing or invalid, or its graph inputs / output do not match the
            contract.
    """

    def __init__(self, path, *, intra_op_threads: int | None = None, prefer_gpu: bool = True,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        t0 = time.perf_counter()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model file {self.path} does not exist")
        import onnxruntime as ort

        opts = session_options(intra_op_threads)
        limit_numpy_threads()
        providers = choose_providers(prefer_gpu)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises InvalidProtobuf, Fail, NoSuchFile, ...
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
            raise InputError(f"model file {self.path} is not a loadable ONNX model ({first})") from None
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        if CONTRACT_KEY not in meta:
            raise InputError(f"model {self.path.name} has no '{CONTRACT_KEY}' metadata (export it with training/export.py)")
        self.contract = ModelContract.from_json(meta[CONTRACT_KEY])
        self._check_graph()
        self.batch_size = max(1, int(batch_size))
        self.warmed = False
        self.providers = list(self.session.get_providers())
        self.info = ModelInfo(
            path=str(self.path), name=self.contract.model_name, version=self.contract.model_version,
            providers=self.providers, intra_op_threads=opts.intra_op_num_threads,
            load_seconds=time.perf_counter() - t0,
        )
        log.info("VNE model %s %s loaded from %s in %.2f s on %s (intra-op threads: %s)",
                 self.info.name, self.info.version, self.path, self.info.load_seconds,
                 ", ".join(self.providers), opts.intra_op_num_threads or "ORT default")

    # ------------------------------------------------------------------ validation
    def _check_graph(self) -> None:
        c = self.contract
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in INPUT_NAMES if n not in inputs]
        extra = [n for n in inputs if n not in INPUT_NAMES]
        if missing or extra:
            raise InputError(f"model {self.path.name} graph inputs {sorted(inputs)} do not match the contract "
                             f"{list(INPUT_NAMES)} (missing {missing}, unexpected {extra})")
        if OUTPUT_NAME not in outputs:
            raise InputError(f"model {self.path.name} has no output '{OUTPUT_NAME}' (outputs: {outputs})")
        channels = {"cine": c.n_cine_frames, "ir": c.n_ir_images, "ir_ti_ms": c.n_ir_images, "t1_map_ms": 1}
        for name, rank in _RANKS.items():
            shape = inputs[name].shape
            if len(shape) != rank:
                raise InputError(f"model {self.path.name} input '{name}' has rank {len(shape)}, the contract needs {rank}")
            if not _dim_ok(shape[1], channels[name]):
                raise InputError(f"model {self.path.name} input '{name}' has {shape[1]} channels, the contract says "
                                 f"{channels[name]}")
            if "float" not in str(inputs[name].type):
                raise InputError(f"model {self.path.name} input '{name}' is {inputs[name].type}, expected float32")

    # ------------------------------------------------------------------ inference
    @property
    def name(self) -> str:
        return self.contract.model_name

    @property
    def version(self) -> str:
        return self.contract.model_version

    def predict(self, batch_inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the generator on a batch of slices that share one grid (unpadded).

        Pads H, W to ``contract.pad_multiple`` (zeros, bottom/right), runs in chunks of
        ``batch_size``, and crops the padding off again.

        Returns:
            (B, H, W) float32 VNE.

        Raises:
            InputError: missing inputs, shapes that disagree with each other or the contract,
                or a non-finite output.
        """
        c = self.contract
        x = {}
        for n in INPUT_NAMES:
            if n not in batch_inputs:
                raise InputError(f"model input '{n}' missing")
            x[n] = np.ascontiguousarray(batch_inputs[n], dtype=np.float32)
        b, _, h, w = x["t1_map_ms"].shape
        expect = {"cine": (b, c.n_cine_frames, h, w), "ir": (b, c.n_ir_images, h, w),
                  "ir_ti_ms": (b, c.n_ir_images), "t1_map_ms": (b, 1, h, w)}
        for n, shape in expect.items():
            if x[n].shape != shape:
                raise InputError(f"model input '{n}' has shape {x[n].shape}, expected {shape}")
        padded, hw = pad_to_multiple(x, c.pad_multiple)
        outs = []
        for start in range(0, b, self.batch_size):
            chunk = {k: np.ascontiguousarray(v[start:start + self.batch_size]) for k, v in padded.items()}
            y = self.session.run([OUTPUT_NAME], chunk)[0]
            outs.append(np.asarray(y, np.float32))
        y = crop_output(np.concatenate(outs, axis=0), hw)
        if y.ndim == 4:
            y = y[:, 0]
        if y.shape != (b, h, w):
            raise InputError(f"model output has shape {y.shape}, expected {(b, h, w)}")
        if not np.all(np.isfinite(y)):
            raise InputError("model output contains NaN or inf")
        return np.ascontiguousarray(y, np.float32)

    def predict_many(self, slices: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Run many slices (each a batch of 1, as :func:`vne.prepare.contract.model_inputs` returns),
        batching those with equal grid shape.

        Returns:
            one (H, W) float32 VNE per slice, in input order.
        """
        out: list[np.ndarray | None] = [None] * len(slices)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, s in enumerate(slices):
            groups.setdefault(tuple(s["t1_map_ms"].shape[-2:]), []).append(k)
        for idx in groups.values():
            batch = {n: np.concatenate([slices[k][n] for k in idx], axis=0) for n in INPUT_NAMES}
            y = self.predict(batch)
            for j, k in enumerate(idx):
                out[k] = y[j]
        return out  # type: ignore[return-value]

    def warm_up(self, shape: tuple[int, int] = WARM_UP_SHAPE, runs: int = 2) -> float:
        """Inferences on a flat input of the heart window's usual size (allocations, kernel
        selection, the arena), so the first slice is not the slow one; returns seconds."""
        c = self.contract
        h, w = shape
        t0 = time.perf_counter()
        for _ in range(max(1, runs)):
            self._warm_run(c, h, w)
        self.warmed = True
        return time.perf_counter() - t0

    def _warm_run(self, c, h: int, w: int) -> None:
        self.predict({
            "cine": np.zeros((1, c.n_cine_frames, h, w), np.float32),
            "ir": np.zeros((1, c.n_ir_images, h, w), np.float32),
            "ir_ti_ms": np.asarray([c.nominal_ti_ms[: c.n_ir_images]], np.float32).reshape(1, -1)
            if len(c.nominal_ti_ms) >= c.n_ir_images else np.ones((1, c.n_ir_images), np.float32),
            "t1_map_ms": np.full((1, 1, h, w), 1000.0, np.float32),
        })


def load_model(path=None, *, intra_op_threads: int | None = None, prefer_gpu: bool = True,
               batch_size: int = DEFAULT_BATCH_SIZE, sha256: str | None = None, warm_up: bool = True) -> VNEModel:
    """The process-wide session for a model file (created on first use, then reused).

    The file is checked first (:func:`verify_model`; its hash is cached, so a reused session
    costs a few ``stat`` calls).

    Args:
        path: the ONNX file; None -> :func:`find_default_model`.
        sha256: the digest the operator expects (``--model-sha256``); it is also pinned for
            later loads of the same file (:func:`pin_sha256`).
        warm_up: run :meth:`VNEModel.warm_up` when the session is new.

    Raises:
        InputError: no model found, a refused file (sha256 mismatch, not in the manifest), or
            the model is unusable (see :class:`VNEModel`).
    """
    searched = False
    if path is None or str(path) == "":
        searched = not os.environ.get(ENV_MODEL)
        path = find_default_model()
        if path is None:
            dirs = ", ".join(str(d) for d in model_search_dirs())
            raise InputError(f"no VNE model configured and no {MODEL_GLOB} found (searched {dirs}; "
                             f"set the 'model' property, --model or ${ENV_MODEL})")
    p = Path(path).expanduser()
    try:
        rp = p.resolve()
        stamp = _stamp(rp)
    except OSError:
        raise InputError(f"model file {p} does not exist") from None
    if sha256:
        pin_sha256(rp, sha256)
    digest, why = verify_model(rp, sha256, searched=searched)
    key = (str(rp), intra_op_threads, prefer_gpu)
    with _cache_lock:
        m = _cache.get(key)
        if m is not None and getattr(m, "_stamp", None) == stamp:
            m.batch_size = max(1, int(batch_size))
            return m
        m = VNEModel(rp, intra_op_threads=intra_op_threads, prefer_gpu=prefer_gpu, batch_size=batch_size)
        try:
            changed = _stamp(rp) != stamp
        except OSError:
            changed = True
        if changed:
            raise InputError(f"model file {rp} changed while it was being loaded; refused")
        m._stamp = stamp
        m.sha256 = m.info.sha256 = digest
        if warm_up:
            try:
                log.info("VNE model %s warm-up: %.2f s", rp.name, m.warm_up())
            except InputError as exc:  # a model that cannot run a window fails on the first slice, with its reason
                log.warning("VNE model %s warm-up failed: %s", rp.name, exc)
        _cache[key] = m
        log.info("VNE model %s sha256 %s (%s)", rp.name, digest, why)
        return m


def clear_cache() -> None:
    """Forget every cached session, hash, pin and logged report (tests)."""
    with _cache_lock:
        _cache.clear()
    with _trust_lock:
        _hashes.clear()
        _pins.clear()
        _reported.clear()
