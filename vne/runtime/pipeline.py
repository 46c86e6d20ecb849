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
   (:func:`vne.exam.roles.classify` with the configured ``role_*`` overrides;
   :mod:`vne.runtime.stream_intake`); problems are logged with a specific reason and the image is
   not used for VNE;
2. cine, IR magnitude / phase images are kept for matching (and written to the study cache,
   :mod:`vne.runtime.study_store`, when the stream ends, for a later T1-mapping connection);
3. a T1 map is checked for units (contract ``t1_valid_range_ms``); if its slice is complete
   (:func:`vne.prepare.slices.assemble` finds IR images and a cine slice in this stream or the study
   cache, and the model's contract is met) VNE runs at once, otherwise at the end of the stream
   (:func:`vne.runtime.inference.guarded_vne`: the model between the quality guard's two checks);
4. the VNE image is a new derived series on the T1 map's grid (:mod:`vne.runtime.output_series`:
   numbering, pixels, meta).

Settings: :class:`vne.runtime.config.PipelineConfig` (the gadget's properties).

Nothing raises out of :meth:`feed_iter` / :meth:`finish`: an unusable model, bad images or an
internal error are logged (and listed in :attr:`VNEPipeline.problems`), and pass-through
continues.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import ismrmrd
import numpy as np

from ..io.mrd.header import parse_header, study_key
from . import inference
from ..io.framing import RawImage
from ..errors import InputError
from ..exam.data import MRImage, Role
from ..exam.geometry import MATCH_MAX_DISTANCE_MM
from ..exam.roles import DEFAULT_RULES
from ..prepare.slices import assemble, group_by_plane, slice_key
from .config import PipelineConfig
from .output_series import SeriesNumbering, VNEResult, meta_first, series_description, stored_pixels, to_dicom_image, \
    to_mrd_image, vne_meta
from .qc import QCResult
from .stream_intake import StreamIntake
from .stream_jobs import JOB_RUN_LIMIT_S, SliceJobs
from .study_store import StudyCache, default_cache_dir

log = logging.getLogger(__name__)

# Images of one stream that may wait for its VNE reader (with a worker pool) before VNE is
# abandoned for the rest of the stream (server overloaded). An exam is ~40-50 images per slice.
INBOX_MAX_ITEMS = 256
_END = object()
# The T1 range units are checked against while the model (its contract) is not there.
T1_VALID_RANGE_WITHOUT_MODEL_MS = (100.0, 4000.0)


@dataclass
class _Pending:
    t1: MRImage
    mrd: Any
    arrived: float


def _report_problem(problems: list[str], msg: str, level: int = logging.WARNING) -> None:
    """List one reason for the stream's summary and log it."""
    problems.append(msg)
    log.log(level, "VNE: %s", msg)


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
        self._pending: list[_Pending] = []       # T1 maps whose slice has not run yet
        self._series = SeriesNumbering(self.config)
        self._cache_images: list[MRImage] | None = None
        self.cache_thread = None  # the background study-cache write started by finish()
        self._finished = False
        self.workers = workers
        self._lock = threading.RLock()              # results, series numbering, jobs (workers)
        # the parts get callbacks bound to the problem list, not to the pipeline: no reference cycle, so a
        # finished stream's images are freed when the stream lets go of the pipeline, not at the next
        # cyclic garbage collection (vne serve held ~90 MB per recent stream that way)
        report = functools.partial(_report_problem, self.problems)
        self.jobs = SliceJobs(workers, emit, self._lock, report, self.problems.append)
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
        self.intake = StreamIntake(self.rules, self.study, report)
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
                header = parse_header(header)
            self.header = header
            self.study = study_key(header)
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
            for im in self.intake.pool + [p.t1 for p in self._pending]:
                s = s or im.study_uid or meta_first(im.meta, "StudyInstanceUID")
                f = f or im.frame_of_reference_uid or meta_first(im.meta, "FrameOfReferenceUID")
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
            yield from self.jobs.drain()
            return
        yield from self._work_on(item)
        yield from self.jobs.drain()

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
                self.jobs.deliver(out)

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
            outs = [to_mrd_image(r, self.config) for r in results]
            self.jobs.wait()
            outs += self.jobs.drain()
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
        _report_problem(self.problems, msg, level)

    @property
    def _pool(self) -> list[MRImage]:
        """The stream's usable cine and IR images (:attr:`StreamIntake.pool`)."""
        return self.intake.pool

    def _process_item(self, item) -> list:
        if isinstance(item, RawImage):
            self.n_images += 1
            self.intake.reject_raw(item)
            return []
        if not isinstance(item, ismrmrd.Image):
            return []
        self.n_images += 1
        self._series.note_input(item.image_series_index)
        im = self.intake.decode(item)
        if im is None:
            return []
        self._ingest(im, item, tag=im.source)
        if im.role != Role.T1_MAP or self.disabled_reason:
            return []
        return [to_mrd_image(r, self.config) for r in self._run_pending(final=False)]

    def _ingest(self, im: MRImage, mrd, tag: str) -> None:
        """Keep an image for VNE if it is usable (:meth:`StreamIntake.take`); a T1 map waits for its slice."""
        if self.intake.take(im, tag, self._t1_valid_range_ms):
            self._pending.append(_Pending(t1=im, mrd=mrd, arrived=time.perf_counter()))

    def _t1_valid_range_ms(self) -> tuple[float, float]:
        model = self._ready_model()
        return model.contract.t1_valid_range_ms if model else T1_VALID_RANGE_WITHOUT_MODEL_MS

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
            phases = [im for im in self.intake.pool if im.role == Role.IR_PHASE]
            if any(abs(float((np.asarray(g[0].geometry.position_mm) - np.asarray(t1.geometry.position_mm)) @ t1.geometry.slice_dir)) < MATCH_MAX_DISTANCE_MM
                   for g in group_by_plane(phases)):
                return False, f"{s.key}: waiting for the rest of the IR phase images"
        return True, ""

    def _run_pending(self, final: bool) -> list[VNEResult]:
        """Start VNE for every pending T1 map whose slice is complete, each on its own: inline
        (returned) without a worker pool, else as a job of :attr:`workers` (delivered by
        :meth:`SliceJobs.deliver`). ``final``: the stream has ended, report what stays incomplete."""
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
            s, why = assemble(p.t1, self.intake.pool)
            cine_source = "stream"
            if s is None:
                cached = self._cached()
                if cached:
                    s, why2 = assemble(p.t1, self.intake.pool + cached)
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

    def _submit(self, model, p: _Pending, s, cine_source: str, match_ms: float) -> None:
        """One complete slice as a job of :attr:`workers` (:class:`vne.runtime.stream_jobs.SliceJobs`)."""
        def make():
            r = self._slice_vne(model, p, s, cine_source, match_ms)
            return None if r is None else to_mrd_image(r, self.config)

        self.jobs.submit(s.key, make)

    # ------------------------------------------------------------------ one slice
    def _slice_vne(self, model, p: _Pending, s, cine_source: str, match_ms: float = 0.0) -> VNEResult | None:
        """VNE of one complete slice (:func:`vne.runtime.inference.guarded_vne`), guarded; None with a
        logged reason when it is not made or withheld. Thread-safe: runs in a worker with a pool."""
        made = inference.guarded_vne(model, s, qc_action=self.config.qc, field_t=lambda: self.field_strength_t,
                                     problem=self._problem, match_ms=match_ms)
        if made is None:
            return None
        vne, qc, prep = made
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
        for t1 in self.intake.t1_maps:
            try:
                f = float(meta_first(t1.meta, "MagneticFieldStrength"))
                if f > 0:
                    return f
            except ValueError:
                continue
        return None

    def _result(self, model, p: _Pending, s, vne: np.ndarray, cine_source: str, qc: QCResult | None = None,
                prep=None) -> VNEResult:
        t1 = p.t1
        window = prep.window if prep is not None else None
        timings = prep.timings if prep is not None else {}
        with self._lock:  # series numbering: slices may finish in any order, in any worker
            series_index, series_uid, image_index = self._series.next_image(t1)
            desc = series_description(t1, self.config, qc)
            meta = vne_meta(self.config, model, t1, desc, series_uid, s, cine_source, qc, prep=prep)
            r = VNEResult(key=s.key, t1=t1, t1_mrd=p.mrd, vne=np.asarray(vne, np.float32), series_index=series_index,
                          image_index=image_index, series_uid=series_uid, description=desc, meta=meta,
                          cine_source=cine_source, seconds=time.perf_counter() - p.arrived, qc=qc, window=window,
                          timings=timings)
            self.results.append(r)
        log.info("VNE: %s -> series %d image %d (%s, cine from %s, %.0f ms after its T1 map; %s)", s.key, r.series_index,
                 r.image_index, f"{model.name} {model.version}", cine_source, 1000 * r.seconds,
                 ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + " ms" if timings else "")
        return r

    # ------------------------------------------------------------------ output (vne.runtime.output_series)
    def stored_pixels(self, vne: np.ndarray) -> np.ndarray:
        """VNE values -> stored pixels of the configured type (:attr:`PipelineConfig.pixel_type`)."""
        return stored_pixels(vne, self.config)

    def to_dicom_image(self, r: VNEResult) -> MRImage:
        """The VNE as an :class:`MRImage` in VNE units for :func:`vne.io.dicom.write_series`."""
        return to_dicom_image(r)

    # ------------------------------------------------------------------ end of stream
    def _report_end(self) -> None:
        self.intake.report_repeats()
        n_t1 = len(self.intake.t1_maps)
        n_cine = sum(im.role == Role.CINE for im in self.intake.pool)
        n_ir = sum(im.role == Role.IR_MAGNITUDE for im in self.intake.pool)
        if n_t1 == 0 and self.intake.t1_unusable and not self.disabled_reason:
            self._problem(f"no usable T1 map in this stream: {len(self.intake.t1_unusable)} refused "
                          f"({self.intake.t1_unusable[0]}): no VNE", logging.INFO)
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
        mine = [im for im in self.intake.pool if im.role in (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE)]
        if not mine:
            return
        s, f = self.study_uids
        try:
            self.cache_thread = self.cache.put_async(mine, study_uid=s, frame_of_reference_uid=f, origin=self.origin)
        except Exception as exc:
            log.warning("VNE: study cache write failed (%s); continuing", exc)


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
