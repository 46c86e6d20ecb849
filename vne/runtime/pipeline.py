"""The VNE data path as one object over a stream of images, shared by every entry point.

The Gadgetron gadget (``gadgets/vne_gadget.py``), ``vne serve``, ``vne infer`` and the
benchmarks all drive a :class:`VNEPipeline`:

    pipeline = VNEPipeline(PipelineConfig.from_properties(props), header=connection.header)
    for item in connection:
        for out in pipeline.feed_iter(item):   # yields ``item`` itself first, then any VNE image
            connection.send(out)
    for out in pipeline.finish():              # VNE for slices completed only at the end
        connection.send(out)

Pass-through first: every incoming item is handed back, unchanged (the very same object),
before any VNE work is done for it; nothing is ever dropped or modified. Items that are not
``ismrmrd.Image`` (acquisitions, waveforms, image arrays) are only passed through.

What happens to an image (:meth:`VNEPipeline.feed_iter`):
1. it is checked (data type, geometry, finite pixels, duplicates) and classified
   (:func:`vne.exam.roles.classify` with the configured ``role_*`` overrides); problems are logged
   with a specific reason and the image is not used for VNE;
2. cine, IR magnitude / phase images are kept for matching (and written to the study cache,
   :mod:`vne.runtime.study_store`, when the stream ends, for a later T1-mapping connection);
3. a T1 map is checked for units (contract ``t1_valid_range_ms``); if its slice is complete
   (:func:`vne.prepare.slices.assemble` finds IR images and a cine slice in this stream or the study
   cache, and the model's contract is met) VNE runs at once, otherwise at the end of the stream;
4. the VNE image is a new derived series on the T1 map's grid (see :meth:`VNEPipeline._to_mrd`).

Nothing raises out of :meth:`feed_iter` / :meth:`finish`: an unusable model, bad images or an
internal error are logged (and listed in :attr:`VNEPipeline.problems`), and pass-through
continues.

Output series (documented in docs/gadget.md):
- ``image_series_index``: the ``series_index`` property if set, else the T1 map's series index
  + ``series_index_offset`` (1000), so T1 series 4 gives VNE series 1004 (DICOM SeriesNumber
  likewise); ``image_index`` counts 1, 2, ... within the VNE series;
- pixels: ``stored = vne * output_scale + output_offset`` as float32 (default; offset 0) or
  uint16 (offset 1000 by default, clipped to 0..65535); the meta ``RescaleSlope`` /
  ``RescaleIntercept`` give ``vne = stored * slope + intercept`` back;
- the header (position, directions, field of view, slice, ...) is the T1 map's.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Iterator

import ismrmrd
import numpy as np

from ..io import mrd as mrd_io
from ..prepare import roi
from . import inference
from ..io.framing import RawImage  # noqa: F401  (re-exported: the gadget and tests take it from here)
from ..errors import InputError
from ..exam.data import MRImage, Role
from ..exam.geometry import MATCH_MAX_DISTANCE_MM
from .qc import DEFAULT_QC_ACTION, QC_ACTIONS, QCResult, check_inputs, check_output
from ..exam.roles import DEFAULT_RULES, RoleRules, meta_values
from ..prepare.slices import assemble, group_by_plane, slice_key
from .study_store import DEFAULT_MAX_AGE_HOURS, DEFAULT_MAX_MB, StudyCache, default_cache_dir

log = logging.getLogger(__name__)

PIXEL_TYPES = {"float32": np.float32, "uint16": np.uint16}
DEFAULT_SERIES_OFFSET = 1000
DEFAULT_UINT16_OFFSET = 1000.0
REJECTED_DTYPES = (np.int32, np.int64)
# How long finish() waits for a slice that a worker has started, beyond the pool's queue wait.
JOB_RUN_LIMIT_S = 120.0
# Images of one stream that may wait for its VNE reader (with a worker pool) before VNE is
# abandoned for the rest of the stream (server overloaded). An exam is ~40-50 images per slice.
INBOX_MAX_ITEMS = 256
_END = object()
# Plausible median of a native cardiac T1 map's tissue pixels (ms): myocardium ~950-1300,
# blood 1500-2000, fat/liver lower. Combined with the contract's t1_valid_range_ms.
T1_MEDIAN_PLAUSIBLE_MS = (400.0, 2500.0)
VNE_TAG = "VNE"
# Properties that name files: taken from the server's own configuration (CLI, pipeline XML in
# execute mode), never from a client's stream configuration (``from_properties(trusted=False)``).
SERVER_ONLY_PROPERTIES = ("model", "model_sha256", "cache_dir")

# Every property the gadget reads (pipeline XML <property name=... value=...>), with its meaning.
PROPERTY_DOCS: dict[str, str] = {
    "model": "path of the ONNX model; empty: $VNE_MODEL, else the newest vne-sim-*.onnx in $VNE_MODEL_DIR or models/ "
             "(server-side only: ignored from a vne serve client's configuration)",
    "model_sha256": "sha256 the model file must have (server-side only, like model); without it a shipped model is "
                    "checked against models/manifest.json",
    "enabled": "true/false; false passes everything through and only fills the study cache",
    "cache_dir": "study cache folder ('none' disables it); default $VNE_CACHE_DIR, else $XDG_CACHE_HOME/vne-study-cache, "
                 "else <tmp>/vne-study-cache-<uid> (server-side only)",
    "cache_max_mb": f"size limit of the study cache in MB (default {DEFAULT_MAX_MB:g}; oldest entries evicted first)",
    "cache_max_age_hours": f"entries older than this are ignored and deleted (default {DEFAULT_MAX_AGE_HOURS:g})",
    "series_index": "image_series_index of the VNE series; empty: T1 map's series index + series_index_offset",
    "series_index_offset": f"added to the T1 map's series index when series_index is empty (default {DEFAULT_SERIES_OFFSET})",
    "pixel_type": "float32 (default) or uint16",
    "output_scale": "stored = vne * output_scale + output_offset (default 1000)",
    "output_offset": f"default 0 for float32, {DEFAULT_UINT16_OFFSET:g} for uint16 (so vne = -1 is stored as 0)",
    "window_low": "VNE value at the bottom of the display window (default -0.2)",
    "window_high": "VNE value at the top of the display window (default 1.6)",
    "data_role": "meta DataRole / GADGETRON_DataRole of the VNE series (default Quantitative: no renormalisation)",
    "description_suffix": "appended to the T1 map's series description (default _VNE)",
    "intra_op_threads": "ONNX Runtime intra-op threads (default: $VNE_ORT_THREADS, else ORT's default)",
    "batch_size": "largest batch per inference call (default 8; slices run one at a time, as they complete)",
    "prefer_gpu": "use CUDAExecutionProvider when available (default true)",
    "qc": "quality guard (vne.runtime.qc): withhold (default: a slice that fails gets no VNE and one logged reason), "
          "mark (the VNE is sent with VNE_QC=FAIL in its meta and description) or off",
    "role_<rule>": "override one role rule of vne.exam.roles.RoleRules (regular expression or true/false), see docs/roles.md",
}


def _bool(text: str, name: str) -> bool:
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise InputError(f"property '{name}' must be true or false, got '{text}'")


def default_qc_action() -> str:
    """The ``qc`` property's default: ``$VNE_QC`` if set (an operator's, or the test suite's
    random-weight models), else :data:`vne.runtime.qc.DEFAULT_QC_ACTION` (withhold)."""
    return os.environ.get("VNE_QC", "").strip().lower() or DEFAULT_QC_ACTION


@dataclass
class PipelineConfig:
    """Settings of one :class:`VNEPipeline` (pipeline XML properties, CLI options)."""

    model: str | None = None
    model_sha256: str | None = None     # pinned for ``model`` (vne.runtime.model.pin_sha256); server-side only
    enabled: bool = True
    role_overrides: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None        # None: default_cache_dir(); "" / "none": disabled
    cache_max_mb: float = DEFAULT_MAX_MB
    cache_max_age_hours: float = DEFAULT_MAX_AGE_HOURS
    series_index: int | None = None
    series_index_offset: int = DEFAULT_SERIES_OFFSET
    pixel_type: str = "float32"
    output_scale: float = 1000.0
    output_offset: float | None = None
    window_low: float = -0.2
    window_high: float = 1.6
    data_role: str = "Quantitative"
    description_suffix: str = "_VNE"
    intra_op_threads: int | None = None
    batch_size: int = 8
    prefer_gpu: bool = True
    qc: str = field(default_factory=default_qc_action)

    def __post_init__(self) -> None:
        if self.qc not in QC_ACTIONS:
            raise InputError(f"qc must be one of {', '.join(QC_ACTIONS)}, got '{self.qc}'")
        if self.pixel_type not in PIXEL_TYPES:
            raise InputError(f"pixel_type must be one of {sorted(PIXEL_TYPES)}, got '{self.pixel_type}'")
        if not (self.output_scale > 0 and np.isfinite(self.output_scale)):
            raise InputError(f"output_scale must be positive, got {self.output_scale}")
        if not self.window_high > self.window_low:
            raise InputError("window_high must be above window_low")
        if self.series_index is not None and not 0 <= int(self.series_index) <= 65535:
            raise InputError(f"series_index must be 0..65535, got {self.series_index}")
        if self.model_sha256:
            from .model import find_default_model, normalize_sha256, pin_sha256

            self.model_sha256 = normalize_sha256(self.model_sha256)
            target = self.model or find_default_model()
            if target:
                pin_sha256(target, self.model_sha256)  # every load of that file must match

    @property
    def offset(self) -> float:
        if self.output_offset is not None:
            return float(self.output_offset)
        return DEFAULT_UINT16_OFFSET if self.pixel_type == "uint16" else 0.0

    @classmethod
    def from_properties(cls, props: dict[str, Any], base: "PipelineConfig | None" = None, *,
                        trusted: bool = True) -> "PipelineConfig":
        """A config from text properties (pipeline XML), on top of ``base`` (CLI defaults).

        Unknown names are logged and ignored; ``role_*`` names are checked by
        :meth:`vne.exam.roles.RoleRules.with_overrides`.

        Args:
            trusted: the properties come from the server's own configuration (CLI, pipeline XML
                of a gadget Gadgetron started). False for a client's stream configuration
                (``vne serve``): :data:`SERVER_ONLY_PROPERTIES` are then ignored, with one
                logged warning.

        Raises:
            InputError: a value that cannot be parsed.
        """
        cfg = base or cls()
        kinds = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        roles = dict(cfg.role_overrides)
        refused: list[str] = []
        for raw_name, raw in (props or {}).items():
            name = str(raw_name).strip()
            value = raw[0] if isinstance(raw, (list, tuple)) and raw else raw
            value = "" if value is None else str(value).strip()
            if name.lower().startswith("role_"):
                roles[name] = value
                continue
            if name not in kinds or name == "role_overrides":
                log.warning("VNE gadget: unknown property '%s' ignored (known: %s)", name, ", ".join(PROPERTY_DOCS))
                continue
            if name in SERVER_ONLY_PROPERTIES and not trusted:
                refused.append(f"{name}={value[:80]!r}")
                continue
            kind = str(kinds[name])
            try:
                if name in ("model", "cache_dir"):
                    changes[name] = value
                elif name == "model_sha256":
                    changes[name] = value or None
                elif "bool" in kind:
                    changes[name] = _bool(value, name)
                elif "int" in kind:
                    changes[name] = None if value == "" and "None" in kind else int(float(value))
                elif "float" in kind:
                    changes[name] = None if value == "" and "None" in kind else float(value)
                else:
                    changes[name] = value
            except ValueError:
                raise InputError(f"property '{name}' has an invalid value '{value}'") from None
        if refused:
            log.warning("VNE gadget: client properties %s ignored: the model and the study cache folder are set by the "
                        "server (vne serve --model, --model-sha256, --cache-dir), not by a stream's configuration",
                        ", ".join(refused))
        RoleRules().with_overrides(roles)  # validate now, with a clear message
        return replace(cfg, role_overrides=roles, **changes)


@dataclass
class VNEResult:
    """One VNE image, before it is encoded for the stream or DICOM.

    Attributes:
        vne: (H, W) float32 in normalised PSIR units, on the T1 map's grid.
        t1: the T1 map it was made for; ``t1_mrd`` its ISMRMRD image when it came from a stream.
    """

    key: str
    t1: MRImage
    t1_mrd: Any
    vne: np.ndarray
    series_index: int
    image_index: int
    series_uid: str
    description: str
    meta: dict
    cine_source: str
    seconds: float
    qc: QCResult | None = None
    window: tuple | None = None     # (rows, cols) of the T1 grid the model ran on (vne.prepare.roi)
    timings: dict = field(default_factory=dict)   # ms per step (vne.runtime.inference), match .. output


@dataclass
class _Pending:
    t1: MRImage
    mrd: Any
    arrived: float


def t1_units_problem(t1_ms: np.ndarray, valid_range_ms: tuple[float, float]) -> str | None:
    """Why a T1 map does not look like native T1 in ms, or None.

    Uses the median of the tissue pixels (finite, > 0): it must lie within the contract's
    ``t1_valid_range_ms`` and :data:`T1_MEDIAN_PLAUSIBLE_MS` (myocardium ~1000 ms, blood
    ~1600 ms dominate a cardiac map). Seconds (median ~1) and undeclared x10 maps (median
    ~10000) are named as such.
    """
    a = np.asarray(t1_ms, np.float64)
    if not np.all(np.isfinite(a)):
        return f"T1 map contains {int(np.size(a) - np.isfinite(a).sum())} NaN or inf pixels"
    tissue = a[a > 0]
    if tissue.size < max(16, 0.01 * a.size):
        return "T1 map is empty (almost no positive pixels)"
    med = float(np.median(tissue))
    lo = max(valid_range_ms[0], T1_MEDIAN_PLAUSIBLE_MS[0])
    hi = min(valid_range_ms[1], T1_MEDIAN_PLAUSIBLE_MS[1])
    if lo <= med <= hi:
        return None
    if med < 10:
        return f"T1 map values look like seconds (tissue median {med:.3g}); VNE needs ms"
    if 10 * lo <= med <= 10 * hi:
        return (f"T1 map values look like ms x10 without an 'x10' declaration (tissue median {med:.0f}); "
                f"declare it in ImageComments or GADGETRON_ScaleRatio")
    return f"T1 map tissue median {med:.0f} ms is outside the plausible range {lo:.0f}-{hi:.0f} ms (wrong units?)"


def _history(meta: dict) -> list[str]:
    return meta_values(meta, "history")


def is_vne_output(meta: dict) -> bool:
    """Whether an image is a VNE output (ours), which is never an input."""
    if any(h.upper() == VNE_TAG for h in _history(meta)):
        return True
    if "VNE_ModelName" in meta:
        return True
    if any(t.upper() == VNE_TAG for t in meta_values(meta, "image_type")):
        return True
    return False


def _new_uid() -> str:
    return "2.25." + str(uuid.uuid4().int)


class VNEPipeline:
    """VNE over one stream of images (one connection, one file or one DICOM exam).

    Args:
        config: settings (default :class:`PipelineConfig`).
        header: the stream's ISMRMRD header (parsed, XML text, or None).
        model: an already loaded :class:`vne.runtime.model.VNEModel` (else loaded from ``config.model``,
            once per process).
        workers: a :class:`vne.runtime.workers.SliceWorkers` pool: each complete slice becomes a job
            there, and the stream goes on at once (``vne serve``, the gadget). None: each slice
            runs inline as soon as it is complete (``vne infer``, evaluation, tests).
        emit: with ``workers``, where a worker sends a finished VNE image (the connection's
            locked ``send``); without it, finished images follow the next item out of
            :meth:`feed_iter`, or :meth:`finish`.
        load_async: load the model in a background thread while the first images arrive
            (execute mode's cold start); the first slice that needs it waits for it.

    Never raises: a bad configuration or model is reported once (:attr:`disabled_reason`)
    and the pipeline passes everything through.
    """

    def __init__(self, config: PipelineConfig | None = None, header=None, *, model=None, workers=None,
                 emit=None, load_async: bool = False) -> None:
        self.config = config or PipelineConfig()
        self.problems: list[str] = []
        self.results: list[VNEResult] = []
        self.disabled_reason: str | None = None
        self.n_items = 0
        self.n_images = 0
        self._t_start = time.perf_counter()
        self._pool: list[MRImage] = []          # usable cine / IR images of this stream
        self._pending: list[_Pending] = []
        self._pending_seen: list[MRImage] = []   # every accepted T1 map (for DICOM facts such as the field)
        self._t1_unusable: list[str] = []        # why T1 maps were refused (for the end summary)
        self._t1_keys: set[tuple] = set()
        self._seen: set[tuple] = set()
        self._rejected: dict[tuple[str, str], int] = {}
        self._series_state: dict[int, dict] = {}
        self._max_series_seen = 0
        self._cache_images: list[MRImage] | None = None
        self.cache_thread = None  # the background study-cache write started by finish()
        self._finished = False
        self.workers = workers
        self._emit = emit
        self._lock = threading.RLock()              # results, series numbering, jobs (workers)
        self._jobs_done = threading.Condition(self._lock)
        self._jobs_open = 0
        self._outbox: list = []                     # finished VNE images not yet handed out
        self._loader: threading.Thread | None = None
        self._reader: threading.Thread | None = None  # with workers: decodes and matches (feed_iter)
        self._inbox: queue.Queue | None = None
        self._abandoned = False
        try:
            self.rules = DEFAULT_RULES.with_overrides(self.config.role_overrides) if self.config.role_overrides else DEFAULT_RULES
        except InputError as exc:
            self.rules = DEFAULT_RULES
            self._disable(f"invalid role rule: {exc}")
        self._set_header(header)
        self.cache = self._open_cache()
        self.model = model
        if self.model is None and self.config.enabled and self.disabled_reason is None:
            if load_async:
                self._loader = threading.Thread(target=self._load_model, args=(True,), name="vne-model-load",
                                                daemon=True)
                self._loader.start()
            else:
                self._load_model()
        if not self.config.enabled and self.disabled_reason is None:
            self.disabled_reason = "disabled by the 'enabled' property"
            log.info("VNE disabled by configuration: passing images through (study cache still filled)")

    # ------------------------------------------------------------------ setup
    def _load_model(self, preload: bool = False) -> None:
        from .model import load_model

        try:
            if preload:
                inference.preload()
            self.model = load_model(self.config.model or None, intra_op_threads=self.config.intra_op_threads,
                                    prefer_gpu=self.config.prefer_gpu, batch_size=self.config.batch_size)
        except InputError as exc:
            self._disable(str(exc))
        except Exception as exc:  # an ORT/driver failure must not stop pass-through
            self._disable(f"model could not be loaded ({exc.__class__.__name__}: {exc})")

    def _ready_model(self):
        """The model, once its background load (``load_async``) is done; None if unusable."""
        loader = self._loader
        if loader is not None:
            loader.join()
            self._loader = None
        return self.model

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self.problems.append(f"VNE disabled: {reason}")
        log.error("VNE disabled for this stream: %s; every image is passed through unchanged", reason)

    def _set_header(self, header) -> None:
        self.header = None
        self.study = ("", "", "")
        self.origin = f"stream-{uuid.uuid4().hex[:12]}"
        if header is None:
            return
        try:
            if isinstance(header, (str, bytes)):
                header = mrd_io.parse_header(header)
            self.header = header
            self.study = mrd_io.study_key(header)
            mid = getattr(getattr(header, "measurementInformation", None), "measurementID", None)
            if mid:
                self.origin = str(mid)
        except InputError as exc:
            self.problems.append(str(exc))
            log.warning("VNE: %s; study identifiers will come from image meta", exc)

    def _open_cache(self) -> StudyCache | None:
        d = self.config.cache_dir
        if d is not None and str(d).strip().lower() in ("", "none", "off", "false"):
            return None
        return StudyCache(d if d is not None else default_cache_dir(), self.config.cache_max_mb,
                          self.config.cache_max_age_hours)

    @property
    def study_uids(self) -> tuple[str, str]:
        """(StudyInstanceUID, FrameOfReferenceUID): the header's, else the first image's."""
        s, f = self.study[0], self.study[1]
        if not (s and f):
            for im in self._pool + [p.t1 for p in self._pending]:
                s = s or im.study_uid or _meta1(im.meta, "StudyInstanceUID")
                f = f or im.frame_of_reference_uid or _meta1(im.meta, "FrameOfReferenceUID")
                if s and f:
                    break
        return s, f

    # ------------------------------------------------------------------ the stream
    def feed(self, item) -> list:
        """Hand in one stream item; returns what to send: ``item`` itself first, then VNE images."""
        return list(self.feed_iter(item))

    def feed_iter(self, item) -> Iterator:
        """Yield ``item`` (unchanged, the same object) at once, then do the VNE work for it and
        yield any VNE images that became ready. Never raises.

        With a worker pool the VNE work (decoding, matching) is handed to this stream's reader
        thread (:meth:`_enqueue`), so the caller's thread only passes images through."""
        self.n_items += 1
        yield item
        if self.workers is not None:
            self._enqueue(item)
            yield from self._drain()
            return
        yield from self._work_on(item)
        yield from self._drain()

    def _work_on(self, item) -> list:
        try:
            return self._process_item(item)
        except Exception as exc:  # never let VNE stop the stream
            log.exception("VNE: internal error on item %d", self.n_items)
            self.problems.append(f"internal error: {exc.__class__.__name__}: {exc}")
            return []

    # ------------------------------------------------------------------ the stream's reader (worker pool)
    def _enqueue(self, item) -> None:
        """Hand an item to this stream's VNE reader thread (decode, match, start slices). Its
        queue is bounded (:data:`INBOX_MAX_ITEMS`): a reader that falls that far behind means
        the server is overloaded, and VNE is abandoned for the rest of the stream, with the
        reason logged, while every image still passes through."""
        if self._abandoned:
            return
        if self._reader is None:
            self._inbox = queue.Queue(maxsize=INBOX_MAX_ITEMS)
            self._reader = threading.Thread(target=self._read_loop, name="vne-stream-reader", daemon=True)
            self._reader.start()
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            self._abandoned = True
            self._problem(f"server overloaded: {INBOX_MAX_ITEMS} images of this stream wait to be read for VNE; "
                          f"VNE abandoned for the rest of the stream (slices already started continue); every "
                          f"image passed through")

    def _read_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _END:
                return
            for out in self._work_on(item):  # inline results (none with a pool); kept for safety
                self._deliver(out)

    def _stop_reader(self) -> None:
        if self._reader is None:
            return
        self._inbox.put(_END)
        self._reader.join(JOB_RUN_LIMIT_S)
        if self._reader.is_alive():
            self._problem(f"the stream's VNE reader did not finish within {JOB_RUN_LIMIT_S:.0f} s; no more VNE")
            self._abandoned = True

    def finish(self, *, dropped: bool = False) -> list:
        """End of stream: run VNE for slices still pending, fill the study cache, log a summary.

        Args:
            dropped: the stream ended without CLOSE (connection lost).

        Returns:
            the remaining VNE images (``ismrmrd.Image``) to send.
        """
        if self._finished:
            return []
        self._finished = True
        outs: list = []
        try:
            self._stop_reader()
            if self._reader is not None and self._reader.is_alive():
                return outs
            if dropped:
                self._problem(f"stream ended without CLOSE after {self.n_items} items; VNE for the slices "
                              f"complete so far only")
            results = self._run_pending(final=True)
            outs = [self._encode(r) for r in results]
            self._wait_for_jobs()
            outs += self._drain()
            self._report_end()
            self._store_cache()
        except Exception as exc:
            log.exception("VNE: internal error at end of stream")
            self.problems.append(f"internal error at end of stream: {exc.__class__.__name__}: {exc}")
        return outs

    def add_images(self, images: Iterable[MRImage]) -> list[VNEResult]:
        """Feed already-decoded images (DICOM: ``vne infer`` on a folder), then finish.

        Returns:
            every :class:`VNEResult` of the exam.
        """
        for im in images:
            self.n_items += 1
            try:
                self._ingest(im, None, tag=im.source or im.series)
                if im.role == Role.T1_MAP:
                    self._run_pending(final=False)
            except Exception as exc:
                log.exception("VNE: internal error")
                self.problems.append(f"internal error: {exc.__class__.__name__}: {exc}")
        self.finish()
        return self.results

    # ------------------------------------------------------------------ ingest
    def _problem(self, msg: str, level: int = logging.WARNING) -> None:
        self.problems.append(msg)
        log.log(level, "VNE: %s", msg)

    def _reject(self, series: str, reason: str, tag: str) -> None:
        """One image unusable for VNE: logged once per (series, reason), counted after that."""
        k = (series, reason)
        self._rejected[k] = self._rejected.get(k, 0) + 1
        if self._rejected[k] == 1:
            self._problem(f"{tag}: {reason}: not used for VNE (passed on unchanged)")

    def _process_item(self, item) -> list:
        if isinstance(item, RawImage):
            self.n_images += 1
            self._reject(str(item.image_series_index), "int32 (ISMRMRD DATATYPE_INT) pixel data, passed on byte for byte",
                         f"series {item.image_series_index} image {item.image_index}")
            return []
        if not isinstance(item, ismrmrd.Image):
            return []
        self.n_images += 1
        self._max_series_seen = max(self._max_series_seen, int(item.image_series_index))
        im = self._decode(item)
        if im is None:
            return []
        self._ingest(im, item, tag=im.source)
        if im.role != Role.T1_MAP or self.disabled_reason:
            return []
        return [self._encode(r) for r in self._run_pending(final=False)]

    def _decode(self, mrd: ismrmrd.Image) -> MRImage | None:
        series = str(mrd.image_series_index)
        tag = f"series {mrd.image_series_index} image {mrd.image_index}"
        key = (int(mrd.image_series_index), int(mrd.image_index), int(mrd.slice), int(mrd.contrast), int(mrd.phase),
               int(mrd.repetition), int(mrd.set), int(mrd.average), tuple(np.round(np.asarray(mrd.position, float), 2)))
        if key in self._seen:
            self._reject(series, "duplicate of an earlier image (same series, index and position)", tag)
            return None
        self._seen.add(key)
        dtype = np.asarray(mrd.data).dtype
        if dtype.type in REJECTED_DTYPES:
            self._reject(series, f"{dtype} pixel data (not a scanner image type; VNE needs uint16, int16 or float)", tag)
            return None
        try:
            im = mrd_io.from_mrd(mrd, study=self.study, rules=self.rules, source=tag)
        except InputError as exc:
            self._reject(series, str(exc).replace(f"{tag}: ", ""), tag)
            return None
        return im

    def _ingest(self, im: MRImage, mrd, tag: str) -> None:
        if is_vne_output(im.meta):
            log.debug("VNE: %s is a VNE output; ignored", tag)
            return
        if im.role not in (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE, Role.T1_MAP):
            log.debug("VNE: %s not used (%s: %s)", tag, im.role.value, im.meta.get("role_reason", im.meta.get("RoleReason", "")))
            return
        try:
            im.geometry.validate()
        except InputError as exc:
            self._reject(im.series, f"{im.role.value} image: {exc}", tag)
            return
        if im.role == Role.T1_MAP:
            model = self._ready_model()
            why = t1_units_problem(im.pixels, model.contract.t1_valid_range_ms if model else (100.0, 4000.0))
            if why:
                self._t1_unusable.append(why)
                self._problem(f"{tag}: {why}: no VNE for {slice_key(im.geometry)}")
                return
            k = (im.series, tuple(np.round(im.geometry.position_mm, 1)))
            if k in self._t1_keys:
                self._reject(im.series, "duplicate T1 map of a slice already seen", tag)
                return
            self._t1_keys.add(k)
            self._pending_seen.append(im)
            self._pending.append(_Pending(t1=im, mrd=mrd, arrived=time.perf_counter()))
            return
        if not np.all(np.isfinite(im.pixels)):
            self._reject(im.series, f"{im.role.value} image contains NaN or inf", tag)
            return
        self._pool.append(im)

    # ------------------------------------------------------------------ VNE
    def _cached(self) -> list[MRImage]:
        if self._cache_images is None:
            self._cache_images = []
            if self.cache is not None:
                s, f = self.study_uids
                self._cache_images = self.cache.get(study_uid=s, frame_of_reference_uid=f)
                if self._cache_images:
                    log.info("VNE: %d images of this study found in the study cache", len(self._cache_images))
        return self._cache_images

    def _complete(self, s, t1: MRImage, final: bool) -> tuple[bool, str]:
        """Whether an assembled slice can run now (not final: wait for late images)."""
        c = self.model.contract
        if len(s.ir_images) < c.n_ir_images:
            return False, f"{s.key}: {len(s.ir_images)} IR images, the model ({self.model.name}) needs {c.n_ir_images}"
        if not final and not s.ir_phase:
            phases = [im for im in self._pool if im.role == Role.IR_PHASE]
            if any(abs(float((np.asarray(g[0].geometry.position_mm) - np.asarray(t1.geometry.position_mm)) @ t1.geometry.slice_dir)) < MATCH_MAX_DISTANCE_MM
                   for g in group_by_plane(phases)):
                return False, f"{s.key}: waiting for the rest of the IR phase images"
        return True, ""

    def _run_pending(self, final: bool) -> list[VNEResult]:
        """Start VNE for every pending T1 map whose slice is complete, each on its own: inline
        (returned) without a worker pool, else as a job of :attr:`workers` (delivered by
        :meth:`_deliver`). ``final``: the stream has ended, report what stays incomplete."""
        model = self._ready_model()
        if self.disabled_reason or model is None:
            if final and self._pending:
                self._problem(f"{len(self._pending)} T1 map(s) without VNE: {self.disabled_reason or 'no model'}")
                self._pending = []
            return []
        ready = []
        still = []
        for p in self._pending:
            t0 = time.perf_counter()
            s, why = assemble(p.t1, self._pool)
            cine_source = "stream"
            if s is None:
                cached = self._cached()
                if cached:
                    s, why2 = assemble(p.t1, self._pool + cached)
                    if s is not None:
                        cine_source = "study cache" if any(im.source.startswith("study cache") for im in s.cine_frames) else "stream"
                    else:
                        why = why2
            if s is None:
                if final:
                    extra = "" if self.cache is None else " (nor in the study cache)"
                    self._problem(f"no VNE for {why}{extra if 'no cine' in why or 'no IR' in why else ''}")
                else:
                    log.debug("VNE: %s: waiting (%s)", slice_key(p.t1.geometry), why)
                    still.append(p)
                continue
            ok, why = self._complete(s, p.t1, final)
            if not ok:
                if final:
                    self._problem(f"no VNE for {why}")
                else:
                    log.debug("VNE: %s", why)
                    still.append(p)
                continue
            ready.append((p, s, cine_source, 1000.0 * (time.perf_counter() - t0)))
        self._pending = still
        out = []
        for p, s, cine_source, match_ms in ready:
            if self.workers is None:
                r = self._slice_vne(model, p, s, cine_source, match_ms)
                if r is not None:
                    out.append(r)
            else:
                self._submit(model, p, s, cine_source, match_ms)
        return out

    # ------------------------------------------------------------------ jobs (worker pool)
    def _submit(self, model, p: _Pending, s, cine_source: str, match_ms: float) -> None:
        with self._lock:
            self._jobs_open += 1

        def run() -> None:
            try:
                r = self._slice_vne(model, p, s, cine_source, match_ms)
                if r is not None:
                    self._deliver(self._encode(r))
            except Exception as exc:  # _slice_vne reports its own; this is encoding or delivery
                log.exception("VNE: internal error finishing %s", s.key)
                self.problems.append(f"internal error: {exc.__class__.__name__}: {exc}")
            finally:
                self._job_closed()

        def skip(reason: str) -> None:
            try:
                self._problem(f"no VNE for {s.key}: {reason}; every image passed through")
            finally:
                self._job_closed()

        self.workers.submit(run, skip)

    def _job_closed(self) -> None:
        with self._lock:
            self._jobs_open -= 1
            self._jobs_done.notify_all()

    def _deliver(self, image) -> None:
        if self._emit is None:
            with self._lock:
                self._outbox.append(image)
            return
        try:
            self._emit(image)
        except Exception as exc:  # the connection is gone: the stream's own thread reports it
            log.error("VNE: could not send VNE image %d of series %d (%s: %s)", image.image_index,
                      image.image_series_index, exc.__class__.__name__, exc)

    def _drain(self) -> list:
        if not self._outbox:
            return []
        with self._lock:
            out, self._outbox = self._outbox, []
        return out

    def _wait_for_jobs(self) -> None:
        """Until this stream's slices in the worker pool are done (or skipped)."""
        if self.workers is None:
            return
        limit = self.workers.max_wait_s + JOB_RUN_LIMIT_S
        deadline = time.monotonic() + limit
        with self._lock:
            while self._jobs_open > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._problem(f"{self._jobs_open} slice(s) still computing {limit:.0f} s after the stream ended; "
                                  f"their VNE will not be sent")
                    return
                self._jobs_done.wait(left)

    # ------------------------------------------------------------------ one slice
    def _slice_vne(self, model, p: _Pending, s, cine_source: str, match_ms: float = 0.0) -> VNEResult | None:
        """VNE of one complete slice (:mod:`vne.runtime.inference`), guarded; None with a logged reason
        when it is not made or withheld. Thread-safe: runs in a worker with a pool."""
        try:
            prep = inference.prepare(model.contract, s)
        except InputError as exc:
            msg = str(exc)
            self._problem(f"no VNE for {msg if msg.startswith(s.key) else s.key + ': ' + msg}")
            return None
        except Exception as exc:  # a bug below must cost this slice only
            log.exception("VNE: internal error preparing %s", s.key)
            self._problem(f"no VNE for {s.key}: internal error ({exc.__class__.__name__}: {exc})")
            return None
        prep.timings = {"match": match_ms, **prep.timings}
        t0 = time.perf_counter()
        verdict = self._check_inputs(model, prep)
        prep.timings["guard"] = 1000.0 * (time.perf_counter() - t0)
        if verdict is False:
            return None
        try:
            vne = inference.predict(model, prep)
        except InputError as exc:
            self._problem(f"no VNE for {s.key}: model run failed: {exc}")
            return None
        except Exception as exc:
            self._problem(f"no VNE for {s.key}: model run failed ({exc.__class__.__name__}: {exc})")
            return None
        qc = None
        t0 = time.perf_counter()
        if verdict is not None:
            try:
                qc = verdict[0] + check_output(vne, verdict[1])
            except Exception as exc:  # the guard must not be the thing that breaks the chain
                log.exception("VNE: quality guard failed on %s", s.key)
                qc = verdict[0] + QCResult(False, f"quality guard error ({exc.__class__.__name__}: {exc})", 0.0)
            prep.timings["guard_output"] = 1000.0 * (time.perf_counter() - t0)
            if not qc.passed and self.config.qc == "withhold":
                self._problem(f"no VNE for {s.key}: quality guard: {qc.reason} (qc=withhold)")
                return None
            if not qc.passed:
                self._problem(f"{s.key}: quality guard failed: {qc.reason}; VNE sent marked VNE_QC=FAIL (qc=mark)")
        return self._result(model, p, s, vne, cine_source, qc, prep)

    @property
    def field_strength_t(self) -> float | None:
        """The stream's field strength (T): the ISMRMRD header's, else DICOM MagneticFieldStrength."""
        try:
            f = float(self.header.acquisitionSystemInformation.systemFieldStrength_T)
            if f > 0:
                return f
        except (AttributeError, TypeError, ValueError):
            pass
        for p in self._pending_seen:
            try:
                f = float(_meta1(p.meta, "MagneticFieldStrength"))
                if f > 0:
                    return f
            except ValueError:
                continue
        return None

    def _check_inputs(self, model, prep):
        """The guard before the model. Returns None (qc off), False (withheld: logged), or
        (input verdict, LV regions) to pass on to the output check."""
        if self.config.qc == "off":
            return None
        c = model.contract
        x = prep.x
        try:
            if prep.lv_error:
                raise RuntimeError(prep.lv_error)
            verdict, lv = check_inputs(
                prep.t1_map_ms, x["cine"][0], x["ir"][0], x["ir_ti_ms"][0],
                pixel_mm=prep.pixel_mm, field_t=self.field_strength_t,
                trained_fields_t=c.trained_field_strengths_t, ti_range_ms=c.trained_ti_range_ms,
                lv=prep.lv, window=prep.window)
        except Exception as exc:  # the guard must not be the thing that breaks the chain
            log.exception("VNE: quality guard failed on %s", prep.key)
            verdict, lv = QCResult(False, f"quality guard error ({exc.__class__.__name__}: {exc})", 0.0), None
        if not verdict.passed and self.config.qc == "withhold":
            self._problem(f"no VNE for {prep.key}: quality guard: {verdict.reason} (qc=withhold)")
            return False
        return verdict, lv

    def _series_for(self, t1: MRImage) -> dict:
        if self.config.series_index is not None:
            index = int(self.config.series_index)
        else:
            base = self._max_series_seen
            for candidate in (t1.series, t1.meta.get("SeriesNumber")):  # ISMRMRD index, else DICOM number
                try:
                    base = int(str(candidate))
                    break
                except (TypeError, ValueError):
                    continue
            index = base + int(self.config.series_index_offset)
        index = min(max(index, 0), 65535)
        st = self._series_state.get(index)
        if st is None:
            st = self._series_state[index] = {"index": index, "uid": _new_uid(), "next": 1}
        return st

    def _result(self, model, p: _Pending, s, vne: np.ndarray, cine_source: str, qc: QCResult | None = None,
                prep=None) -> VNEResult:
        t1 = p.t1
        window = prep.window if prep is not None else None
        timings = prep.timings if prep is not None else {}
        with self._lock:  # series numbering: slices may finish in any order, in any worker
            st = self._series_for(t1)
            image_index = st["next"]
            st["next"] += 1
            base_desc = t1.series_description or "T1"
            desc = base_desc + self.config.description_suffix + ("" if qc is None or qc.passed else "_QCFAIL")
            meta = self._meta(t1, desc, st["uid"], s, cine_source, qc, model=model, prep=prep)
            r = VNEResult(key=s.key, t1=t1, t1_mrd=p.mrd, vne=np.asarray(vne, np.float32), series_index=st["index"],
                          image_index=image_index, series_uid=st["uid"], description=desc, meta=meta,
                          cine_source=cine_source, seconds=time.perf_counter() - p.arrived, qc=qc, window=window,
                          timings=timings)
            self.results.append(r)
        log.info("VNE: %s -> series %d image %d (%s, cine from %s, %.0f ms after its T1 map; %s)", s.key, r.series_index,
                 r.image_index, f"{model.name} {model.version}", cine_source, 1000 * r.seconds,
                 ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + " ms" if timings else "")
        return r

    # ------------------------------------------------------------------ output
    def _window(self) -> tuple[int, int]:
        c = self.config
        lo = c.window_low * c.output_scale + c.offset
        hi = c.window_high * c.output_scale + c.offset
        return int(round((lo + hi) / 2)), max(1, int(round(hi - lo)))

    def _meta(self, t1: MRImage, desc: str, uid: str, s, cine_source: str, qc: QCResult | None = None, *,
              model=None, prep=None) -> dict:
        c = self.config
        m = model or self.model
        center, width = self._window()
        history = [h for h in _history(t1.meta)] + ["AI", VNE_TAG]
        comment = f"VNE {m.name} {m.version}"
        if qc is not None:
            comment += f" QC {qc.verdict} {qc.score:.2f}" + ("" if qc.passed else f": {qc.reason}")
        slope = 1.0 / c.output_scale
        intercept = -c.offset / c.output_scale
        study_uid = t1.study_uid or _meta1(t1.meta, "StudyInstanceUID")
        for_uid = t1.frame_of_reference_uid or _meta1(t1.meta, "FrameOfReferenceUID")
        meta = {
            "DataRole": c.data_role, "GADGETRON_DataRole": c.data_role,
            "SeriesDescription": desc, "SequenceDescription": desc, "GADGETRON_SeqDescription": desc,
            "SequenceDescriptionAdditional": VNE_TAG,
            "ImageProcessingHistory": history, "GADGETRON_ImageProcessingHistory": history,
            "ImageComments": comment, "GADGETRON_ImageComment": comment,
            "ImageType": ["DERIVED", "PRIMARY", VNE_TAG, "AI"],
            "WindowCenter": str(center), "WindowWidth": str(width),
            "GADGETRON_WindowCenter": str(center), "GADGETRON_WindowWidth": str(width),
            "RescaleSlope": f"{slope:.10g}", "RescaleIntercept": f"{intercept:.10g}",
            "Keep_image_geometry": "1",
            "SeriesInstanceUID": uid, "SeriesNumberRangeNameUID": uid,
            "VNE_ModelName": m.name, "VNE_ModelVersion": m.version, "VNE_ModelFile": m.path.name,
            "VNE_Units": "normalised PSIR (remote myocardium ~0, LV blood ~1) = stored * RescaleSlope + RescaleIntercept",
            "VNE_SourceSeries": str(t1.series), "VNE_Slice": s.key, "VNE_CineSource": cine_source,
            "VNE_Inputs": f"{len(s.cine_frames)} cine, {len(s.ir_images)} IR ({'with' if s.ir_phase else 'without'} phase)",
            "VNE_QC": qc.verdict if qc is not None else "OFF",
        }
        if prep is not None:
            # where the model ran; the rest of the grid holds the background value (vne.prepare.roi)
            meta["VNE_Region"] = roi.describe(prep.window, prep.shape)
        if qc is not None:
            meta["VNE_QCScore"] = f"{qc.score:.3f}"
            if not qc.passed:
                meta["VNE_QCReason"] = qc.reason
        if study_uid:
            meta["StudyInstanceUID"] = study_uid
        if for_uid:
            meta["FrameOfReferenceUID"] = for_uid
        # no TriggerTime: an image with one and no other role reads as cine to some rules
        for k in ("PatientName", "StudyDate", "StudyTime", "StudyDescription"):
            if k in t1.meta:
                meta[k] = t1.meta[k]
        return meta

    def stored_pixels(self, vne: np.ndarray) -> np.ndarray:
        """VNE values -> stored pixels of the configured type (:attr:`PipelineConfig.pixel_type`)."""
        c = self.config
        v = np.asarray(vne, np.float64) * c.output_scale + c.offset
        if c.pixel_type == "uint16":
            return np.clip(np.rint(v), 0, 65535).astype(np.uint16)
        return v.astype(np.float32)

    def _encode(self, r: VNEResult) -> ismrmrd.Image:
        """The VNE image for the stream: the T1 map's header, a new series, new meta."""
        data = self.stored_pixels(r.vne)
        meta = ismrmrd.Meta()
        for k, v in r.meta.items():
            meta[k] = [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
        if r.t1_mrd is not None:
            head = r.t1_mrd.getHead()
            img = ismrmrd.Image(head, data=data[None, None])
        else:
            img = mrd_io.to_mrd(MRImage(pixels=data, geometry=r.t1.geometry, role=Role.UNKNOWN),
                                series_index=r.series_index, image_index=r.image_index,
                                dtype=PIXEL_TYPES[self.config.pixel_type], meta={})
        img.image_series_index = r.series_index
        img.image_index = r.image_index
        img.image_type = ismrmrd.IMTYPE_MAGNITUDE
        img.meta = meta
        return img

    def to_dicom_image(self, r: VNEResult) -> MRImage:
        """The VNE as an :class:`MRImage` in VNE units for :func:`vne.io.dicom.write_series`."""
        keep = {k: r.t1.meta[k] for k in ("PatientName", "StudyDate", "StudyTime", "StudyDescription", "Manufacturer")
                if k in r.t1.meta}
        keep["ImageComments"] = r.meta["ImageComments"]
        return MRImage(pixels=r.vne, geometry=r.t1.geometry, role=Role.UNKNOWN, series=r.series_uid,
                       series_description=r.description, study_uid=r.t1.study_uid,
                       frame_of_reference_uid=r.t1.frame_of_reference_uid, patient_id=r.t1.patient_id,
                       meta=keep, source=r.t1.source)

    # ------------------------------------------------------------------ end of stream
    def _report_end(self) -> None:
        for (series, reason), n in self._rejected.items():
            if n > 1:
                self._problem(f"series {series}: {n} images not used for VNE ({reason})", logging.INFO)
        n_t1 = len(self._t1_keys)
        n_cine = sum(im.role == Role.CINE for im in self._pool)
        n_ir = sum(im.role == Role.IR_MAGNITUDE for im in self._pool)
        if n_t1 == 0 and self._t1_unusable and not self.disabled_reason:
            self._problem(f"no usable T1 map in this stream: {len(self._t1_unusable)} refused "
                          f"({self._t1_unusable[0]}): no VNE", logging.INFO)
        elif n_t1 == 0 and not self.disabled_reason:
            where = "kept in the study cache for the T1-mapping connection" if self.cache is not None else "not kept (no study cache)"
            self._problem(f"no T1 map in this stream: no VNE ({n_cine} cine and {n_ir} IR images {where})", logging.INFO)
        if n_cine == 0 and n_t1 and not self.results and not self.disabled_reason:
            log.info("VNE: no cine in this stream%s", " or in the study cache" if self.cache is not None else "")
        log.info("VNE: stream done in %.1f s: %d items in (passed on unchanged), %d VNE image(s), %d problem(s)",
                 time.perf_counter() - self._t_start, self.n_items, len(self.results), len(self.problems))

    def _store_cache(self) -> None:
        if self.cache is None:
            return
        mine = [im for im in self._pool if im.role in (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE)]
        if not mine:
            return
        s, f = self.study_uids
        try:
            self.cache_thread = self.cache.put_async(mine, study_uid=s, frame_of_reference_uid=f, origin=self.origin)
        except Exception as exc:
            log.warning("VNE: study cache write failed (%s); continuing", exc)


def _meta1(meta: dict, key: str) -> str:
    v = meta.get(key)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else ""
    return str(v) if v else ""


def properties_from_config(config) -> dict[str, str]:
    """``<property name=.. value=..>`` (or ``<property><name/><value/></property>``) of a
    Gadgetron external configuration (an ElementTree element, XML text, or None)."""
    import xml.etree.ElementTree as ET

    if config is None:
        return {}
    if isinstance(config, (bytes, str)):
        text = config.decode("utf-8", "replace") if isinstance(config, bytes) else config
        if not text.strip():
            return {}
        try:
            config = ET.fromstring(text)
        except ET.ParseError as exc:
            log.warning("VNE: configuration is not valid XML (%s); using defaults", exc)
            return {}
    props: dict[str, str] = {}
    for p in config.iter():
        if not (isinstance(p.tag, str) and p.tag.split("}")[-1] == "property"):
            continue
        name = p.get("name")
        value = p.get("value")
        if name is None:
            name = p.findtext("name") or p.findtext("{*}name")
            value = p.findtext("value") or p.findtext("{*}value")
        if name:
            props[name.strip()] = (value or "").strip()
    return props


def read_image_safely(source):
    """Reader for IMAGE messages (``source.read(n)``): an ``ismrmrd.Image``, or a
    :class:`RawImage` for 4-byte ``DATATYPE_INT`` data."""
    import ctypes

    header_bytes = source.read(ctypes.sizeof(ismrmrd.ImageHeader))
    head = ismrmrd.ImageHeader.from_buffer_copy(header_bytes)
    if head.data_type != ismrmrd.DATATYPE_INT:
        return ismrmrd.Image.deserialize_from_with_header(header_bytes, source.read)
    len_bytes = source.read(8)
    attr = source.read(int(ctypes.c_uint64.from_buffer_copy(len_bytes).value))
    n = int(head.channels) * int(np.prod([int(v) for v in head.matrix_size]))
    data = source.read(4 * n)
    return RawImage(head, header_bytes + len_bytes + attr + data)


def write_raw_image(destination, raw: RawImage) -> None:
    import struct

    destination.write(struct.pack("<H", 1022))
    destination.write(raw.payload)


def process_stream(items: Iterable, config: PipelineConfig | None = None, header=None, *, model=None) -> tuple[list, VNEPipeline]:
    """Run a whole stream offline (``vne infer`` on ISMRMRD files, tests, benchmarks).

    Returns:
        (everything the gadget would send, in order; the pipeline).
    """
    p = VNEPipeline(config, header=header, model=model)
    out: list = []
    for item in items:
        out.extend(p.feed_iter(item))
    out.extend(p.finish())
    return out, p
