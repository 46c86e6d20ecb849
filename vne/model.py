"""The ONNX Runtime session that runs the VNE generator, and the contract read from its metadata.

One session per model file per process: :func:`load_model` keeps a module-level cache keyed by
the resolved path (and the thread setting), so ``vne serve`` loads the model once and every
connection reuses the warm session. A file that changed on disk (size or mtime) is reloaded.

Execution providers are chosen by availability: ``CUDAExecutionProvider`` when the installed
ONNX Runtime offers it (the ``onnxruntime-gpu`` build, ``VNE_ORT=gpu``), then
``CPUExecutionProvider``. The choice is logged once per load.

Everything the runtime needs to know about the model comes from the ``vne_contract`` metadata
property (:class:`vne.contract.ModelContract`); the graph's inputs are checked against it at
load time, so a model that does not fit the data path fails with one clear
:class:`~vne.exam.InputError` instead of a shape error in the middle of a stream.

Shapes (float32):
    predict() inputs:  cine (B, n_cine, H, W), ir (B, n_ir, H, W), ir_ti_ms (B, n_ir),
                       t1_map_ms (B, 1, H, W), on the T1 grid, unpadded
    predict() output:  vne (B, H, W), normalised PSIR (remote myocardium ~0, LV blood ~1)

This module never imports torch.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import CONTRACT_KEY, INPUT_NAMES, OUTPUT_NAME, ModelContract, crop_output, pad_to_multiple
from .exam import InputError

log = logging.getLogger(__name__)

MODEL_GLOB = "vne-sim-*.onnx"
# Environment: an explicit model file, a folder to search, and the intra-op thread count.
ENV_MODEL = "VNE_MODEL"
ENV_MODEL_DIR = "VNE_MODEL_DIR"
ENV_THREADS = "VNE_ORT_THREADS"
DEFAULT_BATCH_SIZE = 8
# Expected rank and channel dimension (from the contract) of each graph input.
_RANKS = {"cine": 4, "ir": 4, "ir_ti_ms": 2, "t1_map_ms": 4}

_cache: dict[tuple, "VNEModel"] = {}
_cache_lock = threading.Lock()


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
    dirs.append(Path(__file__).resolve().parents[1] / "models")
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

        opts = ort.SessionOptions()
        threads = intra_op_threads if intra_op_threads is not None else int(os.environ.get(ENV_THREADS, "0") or 0)
        opts.intra_op_num_threads = max(0, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
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
        """Run many slices (each a batch of 1, as :func:`vne.contract.model_inputs` returns),
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

    def warm_up(self, shape: tuple[int, int] = (160, 160)) -> float:
        """One inference on zeros (allocations, kernel selection); returns seconds."""
        c = self.contract
        h, w = shape
        t0 = time.perf_counter()
        self.predict({
            "cine": np.zeros((1, c.n_cine_frames, h, w), np.float32),
            "ir": np.zeros((1, c.n_ir_images, h, w), np.float32),
            "ir_ti_ms": np.asarray([c.nominal_ti_ms[: c.n_ir_images]], np.float32).reshape(1, -1)
            if len(c.nominal_ti_ms) >= c.n_ir_images else np.ones((1, c.n_ir_images), np.float32),
            "t1_map_ms": np.full((1, 1, h, w), 1000.0, np.float32),
        })
        return time.perf_counter() - t0


def load_model(path=None, *, intra_op_threads: int | None = None, prefer_gpu: bool = True,
               batch_size: int = DEFAULT_BATCH_SIZE) -> VNEModel:
    """The process-wide session for a model file (created on first use, then reused).

    Args:
        path: the ONNX file; None -> :func:`find_default_model`.

    Raises:
        InputError: no model found, or the model is unusable (see :class:`VNEModel`).
    """
    if path is None or str(path) == "":
        path = find_default_model()
        if path is None:
            dirs = ", ".join(str(d) for d in model_search_dirs())
            raise InputError(f"no VNE model configured and no {MODEL_GLOB} found (searched {dirs}; "
                             f"set the 'model' property, --model or ${ENV_MODEL})")
    p = Path(path).expanduser()
    try:
        rp = p.resolve()
        st = rp.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        raise InputError(f"model file {p} does not exist") from None
    key = (str(rp), intra_op_threads, prefer_gpu)
    with _cache_lock:
        m = _cache.get(key)
        if m is not None and getattr(m, "_stamp", None) == stamp:
            m.batch_size = max(1, int(batch_size))
            return m
        m = VNEModel(rp, intra_op_threads=intra_op_threads, prefer_gpu=prefer_gpu, batch_size=batch_size)
        m._stamp = stamp
        _cache[key] = m
        return m


def clear_cache() -> None:
    """Forget every cached session (tests)."""
    with _cache_lock:
        _cache.clear()
