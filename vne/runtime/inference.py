"""One slice from matched images to VNE, computing only what the model looks at.

:func:`prepare` takes a matched :class:`~vne.exam.SliceSet` to the model's inputs:

1. the cine's motion map: each pixel's temporal SD and mean over the frames on the cine's own
   grid, and only these two images resampled onto the cine's footprint on the T1 grid (the
   bounding box of the cine field of view; zero outside), with the resampling operator cached
   per geometry pair (:mod:`vne.exam.resampling`; :func:`vne.prepare.roi.cine_motion_from_frames`,
   which the training caches use too);
2. the LV and heart region from the T1 map and the cine's motion (:func:`vne.runtime.qc.find_lv`, the
   quality guard's own finder), joined with where the cine moves (:func:`vne.prepare.roi.moving_region`);
3. the model's window around both (:func:`vne.prepare.roi.model_window`);
4. the IR images onto the window only, and their signs restored there only
   (:func:`vne.t1.restore_polarity`, with the background threshold of the whole images, so each
   pixel gets the sign it would get on the full grid);
5. the cine frames onto the window only, then to the model's cycle
   (:func:`vne.prepare.contract.cine_cycle`; bilinear in space and linear in time, pixel by
   pixel, so the model's cine input is exactly the window of the full-grid path's).

The quality guard then reads the window (:func:`vne.runtime.qc.check_inputs` with ``window=``: the same
verdict as on the full grid), :func:`predict` runs the model on the window and pastes the VNE
into a full T1-grid image (:func:`vne.prepare.roi.paste`). Each step's time is kept in
:attr:`Prepared.timings` (ms), which the pipeline logs and ``benchmarks/profile_slice.py`` prints.
:func:`guarded_vne` is the whole chain as the pipeline runs it: prepare, the guard on the inputs,
the model, the guard on the output, and the ``qc`` action (withhold or mark) on its verdict.

:func:`vne.prepare.slices.on_t1_grid` remains the full-grid path for the training caches (evaluation
resamples only the LGE beside the gadget's VNE: :func:`vne.prepare.slices.lge_on_t1_grid`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..prepare import roi
from ..prepare.contract import ModelContract, cine_cycle, inputs_from_cycle
from ..prepare.slices import stack_pixels
from ..errors import InputError
from ..exam.data import MRImage, SliceSet
from ..exam.resampling import Window, grid_map
from .qc import LVRegions, QCResult, check_inputs, check_output

log = logging.getLogger(__name__)

MIN_CINE_COVERAGE = 0.05   # of the T1 grid: below this the cine does not overlap the T1 map


@dataclass
class Prepared:
    """One slice ready for the model.

    Attributes:
        x: the model's inputs on ``window`` (batch of 1).
        window: (rows, cols) of the T1 grid the model runs on.
        shape: the T1 grid (H, W).
        lv: the LV regions found (:class:`vne.runtime.qc.LVRegions`), or None.
        lv_error: why the LV finder failed (an exception), else "".
        cine_coverage: fraction of the T1 grid inside the cine's field of view.
        timings: ms per step.
    """

    key: str
    t1: MRImage
    t1_map_ms: np.ndarray
    x: dict
    window: Window
    shape: tuple[int, int]
    lv: LVRegions | None
    lv_error: str
    pixel_mm: float
    cine_coverage: float
    timings: dict = field(default_factory=dict)

    @property
    def full_grid(self) -> bool:
        return (self.window[0].stop - self.window[0].start, self.window[1].stop - self.window[1].start) == self.shape


def prepare(contract: ModelContract, s: SliceSet, *, limits=None, pad_multiple: int | None = None) -> Prepared:
    """The model's inputs for one matched slice, on the heart window (module docstring).

    Raises:
        InputError: non-finite data, mismatched shapes, or no usable overlap.
    """
    from .qc import DEFAULT_LIMITS, find_lv
    from ..t1 import background_threshold, pixel_means, restore_polarity, threshold_of_means

    limits = limits or DEFAULT_LIMITS
    tm: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        t = time.perf_counter()
        tm[name] = 1000.0 * (t - t0)
        t0 = t

    t1 = s.t1_map
    if t1 is None:
        raise InputError(f"{s.key}: no T1 map")
    target = t1.geometry
    shape = (int(target.shape[0]), int(target.shape[1]))
    t1_ms = np.asarray(t1.pixels, np.float32)
    if t1_ms.shape != shape:
        raise InputError(f"{s.key}: T1 map pixels {t1_ms.shape} do not match its geometry {shape}")
    if not np.all(np.isfinite(t1_ms)):
        raise InputError(f"{s.key}: T1 map contains NaN or inf")
    pixel_mm = float(np.mean(target.pixel_spacing_mm))

    # 1. the cine and its footprint on the T1 grid
    cmap = grid_map(s.cine_frames[0].geometry, target)
    coverage = float(cmap.inside.mean())
    if cmap.bbox is None or coverage < MIN_CINE_COVERAGE:
        raise InputError(f"{s.key}: the cine field of view does not overlap the T1 map")
    cine_raw = stack_pixels(s.cine_frames, "cine frames")
    if not np.all(np.isfinite(cine_raw)):
        raise InputError(f"{s.key}: cine frames contain NaN or inf")
    trig = np.array([im.trigger_time_ms for im in s.cine_frames], np.float32)
    rr = next((im.rr_interval_ms for im in s.cine_frames if im.rr_interval_ms), None)
    lap("cine")

    # 2. the LV (the guard's finder), 3. the window around its heart region
    lv, lv_error, heart = None, "", None
    try:
        motion = roi.cine_motion_from_frames(cine_raw, s.cine_frames[0].geometry, target)
        lv = find_lv(t1_ms, pixel_mm, limits, motion=motion)
        if lv is not None and lv.score >= limits.min_lv_score:
            moving = roi.moving_region(motion)
            heart = lv.heart if moving is None else lv.heart | moving
    except Exception as exc:  # the guard reports it; the model then runs on the whole grid
        log.exception("VNE: LV finder failed on %s", s.key)
        lv_error = f"{exc.__class__.__name__}: {exc}"
    window = roi.model_window(heart, shape, pad_multiple or contract.pad_multiple)
    lap("heart")

    # 4. IR images on the window, signs restored there
    imap = grid_map(s.ir_images[0].geometry, target)
    ir_raw = stack_pixels(s.ir_images, "IR images")
    ir_w = imap.apply(ir_raw, window)
    ti = np.array([im.inversion_time_ms for im in s.ir_images], np.float32)
    phase_w, threshold = None, None
    if s.ir_phase:
        pmap = grid_map(s.ir_phase[0].geometry, target)
        ph = stack_pixels(s.ir_phase, "IR phase images")
        # phase is resampled as its sine and cosine (no wrap-around blending); on the same grid it is cut
        phase_w = pmap.apply(ph, window) if pmap.identity else \
            np.arctan2(pmap.apply(np.sin(ph), window), pmap.apply(np.cos(ph), window)).astype(np.float32)
        # the threshold of the whole resampled images; resampling is linear and the IR images are
        # magnitudes, so it is the threshold of the resampled pixel-mean image: one image, not n
        threshold = background_threshold(ir_raw) if imap.identity else \
            threshold_of_means(imap.apply(pixel_means(ir_raw)[None])[0])
    ir_signed = restore_polarity(ir_w, ti, ir_phase=phase_w, t1_map_ms=t1_ms[window], min_mean_signal=threshold)
    if not np.all(np.isfinite(ir_signed)):
        raise InputError(f"{s.key}: IR images contain NaN or inf")
    lap("ir_signs")

    # 5. the cine on the window only (zero outside its footprint), on the model's cycle
    cine_w = cine_cycle(contract, cmap.apply(cine_raw, window), trig, rr)
    lap("cine_window")
    x = inputs_from_cycle(contract, t1_ms[window], ir_signed, ti, cine_w)
    lap("inputs")
    return Prepared(key=s.key, t1=t1, t1_map_ms=t1_ms, x=x, window=window, shape=shape, lv=lv, lv_error=lv_error,
                    pixel_mm=pixel_mm, cine_coverage=coverage, timings=tm)


def preload() -> None:
    """Import what the first slice needs and the gadget's start does not (scipy.ndimage for the
    LV finder, scipy.sparse for the resampling operators, the T1 fitting): ~0.25 s that a cold
    process spends while its first images arrive rather than on its first slice."""
    import scipy.ndimage  # noqa: F401
    import scipy.sparse  # noqa: F401

    from . import qc  # noqa: F401
    from .. import t1  # noqa: F401


def predict(model, p: Prepared) -> np.ndarray:
    """The VNE of a prepared slice on the full T1 grid: the model on the window, pasted
    (:func:`vne.prepare.roi.paste`). Adds ``model`` to :attr:`Prepared.timings`."""
    t0 = time.perf_counter()
    y = model.predict_many([p.x])[0]
    vne = y if p.full_grid else roi.paste(y, p.window, p.shape)
    p.timings["model"] = 1000.0 * (time.perf_counter() - t0)
    return vne


def guarded_vne(model, s: SliceSet, *, qc_action: str, field_t: Callable[[], float | None],
                problem: Callable[[str], None], match_ms: float = 0.0) -> tuple[np.ndarray, QCResult | None, Prepared] | None:
    """VNE of one complete slice (:func:`prepare`, :func:`predict`), guarded
    (:mod:`vne.runtime.qc`); thread-safe (a worker runs it with a pool).

    Args:
        qc_action: the ``qc`` property: ``withhold`` (a failed verdict: no VNE), ``mark`` (sent,
            marked) or ``off`` (no guard).
        field_t: the stream's field strength in T (or None), asked only when the guard runs.
        problem: reports a reason, one line (the pipeline logs and lists it).
        match_ms: time spent assembling the slice, first in the timings.

    Returns:
        (VNE (H, W) float32 in normalised PSIR units on the T1 grid, the guard's verdict or None
        with qc off, the prepared slice), or None when no VNE is made or it is withheld (the
        reason reported).
    """
    try:
        prep = prepare(model.contract, s)
    except InputError as exc:
        msg = str(exc)
        problem(f"no VNE for {msg if msg.startswith(s.key) else s.key + ': ' + msg}")
        return None
    except Exception as exc:  # a bug below must cost this slice only
        log.exception("VNE: internal error preparing %s", s.key)
        problem(f"no VNE for {s.key}: internal error ({exc.__class__.__name__}: {exc})")
        return None
    prep.timings = {"match": match_ms, **prep.timings}
    t0 = time.perf_counter()
    verdict = _check_inputs(model, prep, qc_action, field_t, problem)
    prep.timings["guard"] = 1000.0 * (time.perf_counter() - t0)
    if verdict is False:
        return None
    try:
        vne = predict(model, prep)
    except InputError as exc:
        problem(f"no VNE for {s.key}: model run failed: {exc}")
        return None
    except Exception as exc:
        problem(f"no VNE for {s.key}: model run failed ({exc.__class__.__name__}: {exc})")
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
        if not qc.passed and qc_action == "withhold":
            problem(f"no VNE for {s.key}: quality guard: {qc.reason} (qc=withhold)")
            return None
        if not qc.passed:
            problem(f"{s.key}: quality guard failed: {qc.reason}; VNE sent marked VNE_QC=FAIL (qc=mark)")
    return vne, qc, prep


def _check_inputs(model, prep: Prepared, qc_action: str, field_t: Callable[[], float | None],
                  problem: Callable[[str], None]):
    """The guard before the model. Returns None (qc off), False (withheld: reported), or
    (input verdict, LV regions) to pass on to the output check."""
    if qc_action == "off":
        return None
    c = model.contract
    x = prep.x
    try:
        if prep.lv_error:
            raise RuntimeError(prep.lv_error)
        verdict, lv = check_inputs(
            prep.t1_map_ms, x["cine"][0], x["ir"][0], x["ir_ti_ms"][0],
            pixel_mm=prep.pixel_mm, field_t=field_t(),
            trained_fields_t=c.trained_field_strengths_t, ti_range_ms=c.trained_ti_range_ms,
            lv=prep.lv, window=prep.window)
    except Exception as exc:  # the guard must not be the thing that breaks the chain
        log.exception("VNE: quality guard failed on %s", prep.key)
        verdict, lv = QCResult(False, f"quality guard error ({exc.__class__.__name__}: {exc})", 0.0), None
    if not verdict.passed and qc_action == "withhold":
        problem(f"no VNE for {prep.key}: quality guard: {verdict.reason} (qc=withhold)")
        return False
    return verdict, lv
