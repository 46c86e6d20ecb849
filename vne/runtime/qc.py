"""The quality guard: refuse rather than mislead. Pure functions on one slice on the T1 grid.

A VNE image is only as good as the model's familiarity with its inputs. Before the model runs,
:func:`check_inputs` asks whether the slice looks like what the model was trained on; after it
runs, :func:`check_output` asks whether the VNE looks like a normalised PSIR image. Each returns a
:class:`QCResult` with one specific reason when a check fails. The pipeline then withholds the VNE
(default) or emits it marked as failed (property ``qc``, see ``docs/gadget.md``).

Nothing here uses a segmentation. The LV is found from the T1 map alone (:func:`find_lv`): the
most compact "blood-like" T1 region that is ringed by "myocardium-like" T1 (split at 1250 or
1450 ms, whichever finds the better LV). Its blood pool and a 1-7 mm ring around it are the regions every check reads.

Checks and their one definition (:class:`QCLimits`; all thresholds live there):

inputs
    * ``lv``          an LV blood pool ringed by myocardium is found in the T1 map
    * ``t1_blood``    LV blood T1 within the range for the field strength (``blood_t1_ms``)
    * ``t1_myo``      myocardium T1 within the range for the field strength (``myo_t1_ms``)
    * ``t1_noise``    coefficient of variation of T1 in the LV blood below ``max_blood_t1_cv``
    * ``cine_fov``    the cine covers the heart (``min_cine_heart_coverage``)
    * ``cine_motion`` the cine moves around the LV found (``min_lv_motion``; the finder's motion
                      map, :func:`vne.prepare.roi.cine_motion_from_frames`): a single-phase or
                      static series sent as cine fails
    * ``cine_order``  consecutive cine frames are more alike than frames half a cycle apart
                      (``max_cine_order_ratio``): shuffled phases fail
    * ``cine_reg``    the cine's blood/myocardium pattern correlates with the T1 map's
                      (``min_cine_t1_correlation``): a misplaced cine fails
    * ``ir_match``    the IR images' edges fall where the T1 map's do
                      (``min_ir_t1_correlation``): an IR series from another slice fails
    * ``ir_timing``   inversion times inside the range the model was trained on
output
    * ``vne_contrast`` LV blood clearly brighter than the myocardial ring (``min_blood_contrast``)
    * ``vne_range``   few saturated pixels around the heart (``max_saturated_fraction``)
    * ``vne_texture`` little 2-pixel checkerboard energy (``max_checkerboard``)

The score is the smallest margin of any check, each scaled to [0, 1] (0: at or past its limit,
1: comfortably inside), so one number says how close a slice came to being refused.

Windows: the gadget computes the cine and IR images only on a window of the T1 grid (the cine's
footprint for the motion map, the model's window for the rest, :mod:`vne.prepare.roi`). Every
measure here reads only pixels inside the heart region and within a few pixels of it (filters
reach 4 pixels), so :func:`check_inputs` with ``window=`` gives the same numbers as on the full
grid as long as the window holds the heart region with that margin, which the model's window
does by construction (:func:`vne.prepare.roi.model_window`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..exam.resampling import mask_window

QC_ACTIONS = ("withhold", "mark", "off")
DEFAULT_QC_ACTION = "withhold"


@dataclass(frozen=True)
class QCLimits:
    """Every threshold of the guard (ms, mm, normalised PSIR units: remote ~0, blood ~1).

    T1 ranges are for ShMOLLI/MOLLI maps, which read blood 5-8 % and myocardium 2-4 % below the
    true T1 (``../shared/docs/physics.md``: native blood ~1550-1600 ms at 1.5 T and
    ~1900-2000 ms at 3 T; myocardium 962-996 ms at 1.5 T, 1166-1184 ms at 3 T), widened for
    HCM (remote myocardium up to ~+60 ms) and haematocrit.
    """

    # the blood/myocardium split of the LV finder, tried at each value (1.5 T-like and 3 T-like
    # maps; at 3 T, noisy myocardium at ~1180 ms crosses 1250 ms); the best-scoring LV wins
    blood_myo_split_ms: tuple[float, ...] = (1250.0, 1450.0)
    blood_like_max_ms: float = 2600.0
    myo_like_min_ms: float = 700.0
    blood_t1_ms: dict = field(default_factory=lambda: {1.5: (1250.0, 1780.0), 3.0: (1650.0, 2300.0)})
    myo_t1_ms: dict = field(default_factory=lambda: {1.5: (820.0, 1150.0), 3.0: (1020.0, 1400.0)})
    lv_area_mm2: tuple[float, float] = (120.0, 6000.0)
    ring_mm: tuple[float, float] = (1.0, 7.0)
    ring_t1_sd_ms: float = 120.0       # ring T1 spread at which the LV score halves
    # the LV finder's motion weight clip(motion / full, floor, 1): motion is the cine's temporal
    # SD around a candidate over the body's median (a static structure reads ~1, the LV 2.9-25,
    # median 6-9, on our own test sets with roi.cine_motion_from_frames); 2.0/0.25 let a static
    # aorta ringed by soft tissue outscore an apical LV
    lv_motion_full: float = 4.0
    lv_motion_floor: float = 0.1
    min_lv_score: float = 0.15
    max_blood_t1_cv: float = 0.15
    min_cine_heart_coverage: float = 0.95
    min_lv_motion: float = 2.0          # the LV finder's motion around the LV found; a still cine reads ~1
    max_cine_order_ratio: float = 0.5   # in order: 0.03-0.06 (54 own slices, sim 2.3); shuffled by trigger time 0.64-1.2
    min_cine_t1_correlation: float = 0.4
    min_ir_t1_correlation: float = 0.5
    min_blood_contrast: float = 0.5
    saturation_level: float = 4.0
    max_saturated_fraction: float = 0.02
    max_checkerboard: float = 0.08     # own test sets: true LGE reads 0.03, VNE 0.02-0.06 (edges)


DEFAULT_LIMITS = QCLimits()


@dataclass
class QCResult:
    """The verdict of one stage (inputs or output) or of both combined.

    Attributes:
        passed: every check passed.
        reason: the first failing check, in words ("" when passed).
        score: the smallest margin of any check, in [0, 1].
        measures: every measured value by check name (JSON-able floats).
    """

    passed: bool
    reason: str = ""
    score: float = 1.0
    measures: dict = field(default_factory=dict)

    def __add__(self, other: "QCResult") -> "QCResult":
        first = self if not self.passed else other
        return QCResult(self.passed and other.passed, first.reason, min(self.score, other.score),
                        {**self.measures, **other.measures})

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


class _Checks:
    """Collects (name, value, lo, hi) checks; the first failure becomes the reason."""

    def __init__(self) -> None:
        self.reason = ""
        self.score = 1.0
        self.measures: dict[str, float] = {}

    def fail(self, name: str, why: str) -> None:
        self.measures.setdefault(name, float("nan"))
        self.score = 0.0
        if not self.reason:
            self.reason = why

    def within(self, name: str, value: float, lo: float, hi: float, why: str) -> bool:
        """Check ``lo <= value <= hi`` (either bound may be ±inf for a one-sided check)."""
        value = float(value)
        self.measures[name] = round(value, 4)
        finite = [b for b in (lo, hi) if np.isfinite(b)]
        scale = 0.25 * (hi - lo) if len(finite) == 2 else 0.5 * max(abs(finite[0]), 0.1)
        margins = [(value - lo) / scale] if np.isfinite(lo) else []
        margins += [(hi - value) / scale] if np.isfinite(hi) else []
        margin = min(margins) if np.isfinite(value) else -1.0
        self.score = min(self.score, float(np.clip(margin, 0.0, 1.0)))
        if not (np.isfinite(value) and lo <= value <= hi):
            if not self.reason:
                self.reason = why.format(value=value, lo=lo, hi=hi)
            return False
        return True

    def result(self) -> QCResult:
        return QCResult(not self.reason, self.reason, round(self.score, 3), self.measures)


# --------------------------------------------------------------------------------------------
# Regions from the T1 map
# --------------------------------------------------------------------------------------------
@dataclass
class LVRegions:
    """The LV found in a T1 map: (H, W) bool masks and how sure the finder is."""

    blood: np.ndarray        # the blood pool, eroded by one pixel (away from partial volume)
    ring: np.ndarray         # myocardium-like pixels 1-7 mm outside the blood pool
    heart: np.ndarray        # blood pool dilated by 20 mm: where the cine must be present
    score: float             # compactness x myocardium-like fraction of the ring x its T1 homogeneity
    motion: float | None = None  # the cine's motion map averaged over the LV and its ring (None: no cine)


def find_lv(t1_map_ms: np.ndarray, pixel_mm: float, limits: QCLimits = DEFAULT_LIMITS,
            cine: np.ndarray | None = None, motion: np.ndarray | None = None) -> LVRegions | None:
    """The LV blood pool and its myocardial ring, from a native T1 map alone.

    For each blood/myocardium split in :attr:`QCLimits.blood_myo_split_ms`, every connected
    "blood-like" region of LV size is scored by its compactness (area / area of the circle
    through its farthest pixel) times the fraction of a 1-7 mm shell around it that is
    "myocardium-like" times the homogeneity of that ring's T1 (``1 / (1 + (SD / 120 ms)²)``,
    which tells myocardium from lung around the aorta) times how close the ring/blood T1 ratio
    is to myocardium's ~0.63 (``exp(-((ratio - 0.63) / 0.12)²)``, which tells it from liver);
    the best-scoring region over all splits wins. With a ``cine``, the score is also weighted
    by how much the cine moves around the candidate (the LV contracts; the aorta, a vessel or
    a fluid pocket do not): ``clip(motion / 4, 0.1, 1)`` (:class:`QCLimits`), where motion is the mean temporal SD
    of the cine around the candidate over the median temporal SD of the cine's body pixels.

    Args:
        t1_map_ms: (H, W) T1 in ms.
        pixel_mm: pixel spacing (mm).
        cine: optional (n, H, W) cine frames on the same grid.
        motion: or the cine's :func:`vne.prepare.roi.cine_motion` map, already computed.

    Returns:
        the best-scoring candidate, or None when no blood-like region of LV size exists.
    """
    if motion is None and cine is not None:
        from ..prepare.roi import cine_motion

        motion = cine_motion(cine)
    best: LVRegions | None = None
    t1 = np.nan_to_num(np.asarray(t1_map_ms, np.float64))
    for split in limits.blood_myo_split_ms:
        cand = _find_lv_at(t1, pixel_mm, split, limits, motion)
        if cand is not None and (best is None or cand.score > best.score):
            best = cand
    return best


def _find_lv_at(t1: np.ndarray, pixel_mm: float, split_ms: float, limits: QCLimits,
                motion: np.ndarray | None = None) -> LVRegions | None:
    """:func:`find_lv` at one blood/myocardium split; ``t1`` (H, W) float64 without NaN.

    The morphology runs on bounding boxes (of the blood-like pixels, of each candidate, of the
    winner's reach): the same masks as on the whole grid, since everything outside is False."""
    from scipy import ndimage  # on use: the import costs ~0.2 s of a cold start

    blood_like_all = (t1 >= split_ms) & (t1 <= limits.blood_like_max_ms)
    box = mask_window(blood_like_all, 2)  # an opening by one pixel reaches at most one pixel out
    if box is None:
        return None
    blood_like = np.zeros(t1.shape, bool)
    blood_like[box] = ndimage.binary_opening(blood_like_all[box], iterations=1)
    labels = np.zeros(t1.shape, np.int32)
    labels[box], n = ndimage.label(blood_like[box])
    if n == 0:
        return None
    area_px = np.bincount(labels[box].ravel())
    px2 = pixel_mm * pixel_mm
    r_in = max(1, int(round(limits.ring_mm[0] / pixel_mm)))
    r_out = max(r_in + 1, int(round(limits.ring_mm[1] / pixel_mm)))
    objects = ndimage.find_objects(labels[box])
    r_box, c_box = box[0].start, box[1].start
    best = None  # (score, rows, cols, comp, ring) of the best candidate so far
    for lab in range(1, n + 1):
        a = area_px[lab] * px2
        if not (limits.lv_area_mm2[0] <= a <= limits.lv_area_mm2[1]):
            continue
        sl = objects[lab - 1]
        pad = r_out + 2
        rows = slice(max(r_box + sl[0].start - pad, 0), min(r_box + sl[0].stop + pad, t1.shape[0]))
        cols = slice(max(c_box + sl[1].start - pad, 0), min(c_box + sl[1].stop + pad, t1.shape[1]))
        comp = fill_holes(labels[rows, cols] == lab)
        ii, jj = np.nonzero(comp)
        r_max = np.hypot(ii - ii.mean(), jj - jj.mean()).max() + 0.5
        compact = float(comp.sum() / (np.pi * r_max * r_max))
        # the shell r_in..r_out pixels out (city-block distance: what r iterations of a binary
        # dilation with the 4-neighbour cross give, in one pass)
        dist = ndimage.distance_transform_cdt(~comp, metric="taxicab")
        outer, inner = dist <= r_out, dist <= r_in
        shell = outer & ~inner
        t1_crop = t1[rows, cols]
        ring = shell & (t1_crop >= limits.myo_like_min_ms) & (t1_crop < split_ms)
        ring_frac = float(ring.sum() / max(shell.sum(), 1))
        # myocardium is homogeneous (pixel SD ~40-65 ms); lung and partial-volume rims are not
        ring_t1 = t1_crop[ring]
        spread = float(np.subtract(*np.percentile(ring_t1, (75, 25)))) / 1.35 if ring_t1.size >= 8 else np.inf
        homogeneous = 1.0 / (1.0 + (spread / limits.ring_t1_sd_ms) ** 2)
        # and about 0.6-0.7 of the blood T1 (liver around the aorta is ~0.45, lung scatters)
        ratio = float(np.median(ring_t1) / max(np.median(t1_crop[comp]), 1.0)) if ring_t1.size else 0.0
        plausible = float(np.exp(-(((ratio - 0.63) / 0.12) ** 2)))
        score = compact * ring_frac * homogeneous * plausible
        if motion is not None:
            moving = float(motion[rows, cols][outer].mean())
            score *= float(np.clip(moving / limits.lv_motion_full, limits.lv_motion_floor, 1.0))
        else:
            moving = None
        if best is None or score > best[0]:
            best = (score, rows, cols, comp, ring, moving)
    if best is None:
        return None
    # the winner's masks on the whole grid
    score, rows, cols, comp, ring, moving = best
    blood = np.zeros(t1.shape, bool)
    blood[rows, cols] = ndimage.binary_erosion(comp, iterations=1) & blood_like[rows, cols]
    if blood.sum() < 4:
        blood[rows, cols] = comp
    ring_full = np.zeros(t1.shape, bool)
    ring_full[rows, cols] = ring
    # the blood pool dilated by 20 mm (city-block, as 20 mm of 4-neighbour dilation steps),
    # on the blood's box widened by that reach
    reach = max(1, int(round(20.0 / pixel_mm)))
    heart = np.zeros(t1.shape, bool)
    hbox = mask_window(blood, reach + 1)
    if hbox is not None:
        heart[hbox] = ndimage.distance_transform_cdt(~blood[hbox], metric="taxicab") <= reach
    return LVRegions(blood=blood, ring=ring_full, heart=heart, score=score, motion=moving)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of a 2-D mask (4-connected background), by one
    labelling instead of a dilation to convergence: background components that do not touch
    the edge are holes."""
    from scipy import ndimage

    bg, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    return mask | ~np.isin(bg, edge)


# --------------------------------------------------------------------------------------------
# Measures (pure, reused by benchmarks and tests)
# --------------------------------------------------------------------------------------------
def checkerboard_amplitude(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMS, inside ``mask``, of the response to ``[1 -2 1]ᵀ[1 -2 1] / 16``: the amplitude of the
    2-pixel (Nyquist) checkerboard in the image's own units (1 for a ±1 checkerboard, 0 for
    anything linear along rows or columns)."""
    from scipy import ndimage  # on use: the import costs ~0.2 s of a cold start

    x = np.asarray(image, np.float64)
    k = np.array([1.0, -2.0, 1.0]) / 4.0
    r = ndimage.correlate1d(ndimage.correlate1d(x, k, axis=0, mode="nearest"), k, axis=1, mode="nearest")
    m = np.ones(x.shape, bool) if mask is None else np.asarray(mask, bool)
    return float(np.sqrt(np.mean(r[m] ** 2))) if m.any() else float("nan")


def checkerboard_index(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMS of the 2-pixel checkerboard component inside ``mask``, relative to the image's
    5-95 % range there.

    The checkerboard component is the response to the separable kernel
    ``[1 -2 1]ᵀ[1 -2 1] / 16``: 1 for a ±1 checkerboard, 0 for any image that is linear along
    rows or columns, small for smooth anatomy. A network with sub-pixel upsampling prints a
    2-pixel pattern that this picks up (issue 14); a blurred or interpolated image gives ~0.01.
    """
    x = np.asarray(image, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.sum() < 16:
        return float("nan")
    lo, hi = np.percentile(x[m], (5, 95))
    return checkerboard_amplitude(x, m) / max(hi - lo, 1e-9)


def cine_order_ratio(cine: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference of consecutive frames / that of frames half a cycle apart,
    inside ``mask``. ~0.03-0.06 for a beating heart in order (around the LV), 0.6-1.8 for shuffled frames.

    Args:
        cine: (n, H, W) frames, one cycle, in trigger-time order.
    """
    f = np.asarray(cine, np.float64)[:, np.asarray(mask, bool)]
    n = f.shape[0]
    if n < 4:
        return float("nan")
    d1 = float(np.mean((f - np.roll(f, 1, axis=0)) ** 2))
    dh = float(np.mean((f - np.roll(f, n // 2, axis=0)) ** 2))
    return d1 / max(dh, 1e-12)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def ir_t1_correlation(ir: np.ndarray, t1_map_ms: np.ndarray, mask: np.ndarray) -> float:
    """Do the IR images show the same anatomy as the T1 map? The correlation, inside ``mask``,
    between the edge strength (gradient magnitude after a 1-pixel Gaussian) of the T1 map and
    that of the IR images (the mean over TIs of each image's normalised edge strength).

    Edges are where blood meets myocardium whatever the contrast at each TI, so this does not
    depend on the Look-Locker details (readout saturation, inflow, sign restoration) that make a
    T1 refit unreliable; an IR series from another slice puts its edges elsewhere. ~0.6-0.9 for
    a slice's own images.

    Args:
        ir: (n, H, W) IR images (any sign).
    """
    from scipy import ndimage  # on use: the import costs ~0.2 s of a cold start

    m = np.asarray(mask, bool)
    if m.sum() < 16:
        return float("nan")
    # only the mask's bounding box and the filter's reach around it (4 sigma + 1): the same
    # values inside the mask as on the whole image, at a fraction of the cost
    box = mask_window(m, 5)
    if box is None:
        return float("nan")
    m = m[box]
    t1 = np.asarray(t1_map_ms, np.float64)[box]
    e_t1 = ndimage.gaussian_gradient_magnitude(t1, 1.0)[m]
    e_ir = np.zeros(int(m.sum()))
    for img in np.abs(np.asarray(ir, np.float64)[:, box[0], box[1]]):
        e = ndimage.gaussian_gradient_magnitude(img, 1.0)[m]
        scale = float(np.percentile(e, 95))
        if scale > 0:
            e_ir += e / scale
    return _corr(e_t1, e_ir)


# --------------------------------------------------------------------------------------------
# The two stages
# --------------------------------------------------------------------------------------------
def _range_for(table: dict, field_t: float | None) -> tuple[float, float]:
    if field_t is None or not np.isfinite(field_t) or field_t <= 0:
        return min(v[0] for v in table.values()), max(v[1] for v in table.values())
    nearest = min(table, key=lambda f: abs(f - field_t))
    return table[nearest]


def check_inputs(
    t1_map_ms: np.ndarray,
    cine: np.ndarray,
    ir: np.ndarray,
    ir_ti_ms,
    pixel_mm: float,
    field_t: float | None = None,
    trained_fields_t: tuple[float, ...] = (),
    ti_range_ms: tuple[float, float] | None = None,
    limits: QCLimits = DEFAULT_LIMITS,
    *,
    lv: LVRegions | None | bool = False,
    window: tuple[slice, slice] | None = None,
    motion: np.ndarray | None = None,
) -> tuple[QCResult, LVRegions | None]:
    """Is this slice familiar? The model's inputs on the T1 grid, before it runs.

    Args:
        t1_map_ms: (H, W) ms. cine: (n, H, W), one cycle in order. ir: (m, H, W) signed or
            magnitude; ir_ti_ms: (m,).
        lv: the LV regions already found for this slice (:func:`find_lv` with the same T1 map
            and cine; None: none was found); default: found here.
        motion: the cine's motion map on the T1 grid (:func:`vne.prepare.roi.cine_motion_from_frames`,
            as the gadget and the training caches compute it) for finding the LV here; default:
            from ``cine`` (:func:`vne.prepare.roi.cine_motion`).
        window: ``cine`` and ``ir`` cover only this window of the T1 grid (rows, cols), which
            holds the LV's heart region with a margin of at least 4 pixels (module docstring).
        pixel_mm: T1-grid pixel spacing (mm).
        field_t: the stream's field strength (T), or None when the header does not say (then
            a model trained at one field strength has its T1 judged by that field's ranges).
        trained_fields_t: field strengths in the model's training data (empty: not recorded).
        ti_range_ms: the TI range of the training data (None: not recorded).

    Returns:
        (verdict, the LV regions found, or None).
    """
    c = _Checks()
    if trained_fields_t and field_t and not any(abs(field_t - f) < 0.2 for f in trained_fields_t):
        c.fail("field", f"field strength {field_t:g} T is not one the model was trained on "
                        f"({', '.join(f'{f:g} T' for f in trained_fields_t)})")
    if field_t is None and len(trained_fields_t) == 1:
        field_t = float(trained_fields_t[0])  # undeclared: judge the T1 by the model's one field
    if isinstance(lv, bool):  # not given: found here
        if window is not None:
            raise ValueError("check_inputs on a window needs the LV found on the whole T1 map (lv=...)")
        lv = find_lv(t1_map_ms, pixel_mm, limits, cine=cine if motion is None else None, motion=motion)
    # before the LV's own verdict: the finder weighs candidates by motion, so a still cine sinks
    # the LV's score too, and the reason must name the cine
    if lv is not None and lv.motion is not None:
        c.within("cine_motion", lv.motion, limits.min_lv_motion, np.inf, "the cine hardly moves around the LV "
                 "(motion {value:.1f}, limit {lo:.1f}): a single-phase or static series sent as cine?")
    if lv is None or lv.score < limits.min_lv_score:
        c.measures["lv"] = round(lv.score, 3) if lv else 0.0
        c.fail("lv", "no LV blood pool ringed by myocardium found in the T1 map "
                     f"(best score {lv.score if lv else 0:.2f} < {limits.min_lv_score}): not a short-axis native T1 map?")
        return c.result(), lv
    c.measures["lv"] = round(lv.score, 3)
    t1 = np.asarray(t1_map_ms, np.float64)
    fs = "" if not field_t else f" at {field_t:g} T"
    blood_t1 = float(np.median(t1[lv.blood]))
    lo, hi = _range_for(limits.blood_t1_ms, field_t)
    c.within("t1_blood", blood_t1, lo, hi, "LV blood T1 {value:.0f} ms is outside {lo:.0f}-{hi:.0f} ms" + fs
             + " (wrong field strength, units, or a post-contrast map?)")
    myo_t1 = float(np.median(t1[lv.ring])) if lv.ring.any() else float("nan")
    lo, hi = _range_for(limits.myo_t1_ms, field_t)
    c.within("t1_myo", myo_t1, lo, hi, "myocardial T1 {value:.0f} ms is outside {lo:.0f}-{hi:.0f} ms" + fs)
    cv = float(np.std(t1[lv.blood]) / max(blood_t1, 1.0))
    c.within("t1_noise", cv, -np.inf, limits.max_blood_t1_cv, "T1 in the LV blood varies by {value:.0%} (noise or motion; limit {hi:.0%})")
    cine = np.asarray(cine, np.float64)
    heart, blood, ring, t1w = lv.heart, lv.blood, lv.ring, t1
    if window is not None:
        heart, blood, ring, t1w = heart[window], blood[window], ring[window], t1[window]
        if heart.sum() != lv.heart.sum():
            raise ValueError("the window does not hold the heart region")
    present = np.all(cine != 0, axis=0)
    coverage = float(present[heart].mean())
    c.within("cine_fov", coverage, limits.min_cine_heart_coverage, np.inf,
             "the cine covers only {value:.0%} of the heart on the T1 grid")
    around = blood | ring
    c.within("cine_order", cine_order_ratio(cine, heart & present), -np.inf, limits.max_cine_order_ratio,
             "cine frames are not in cardiac order (consecutive-frame difference {value:.2f} of the half-cycle one)")
    c.within("cine_reg", _corr(cine.mean(axis=0)[around], t1w[around]), limits.min_cine_t1_correlation, np.inf,
             "the cine does not line up with the T1 map (blood/myocardium correlation {value:.2f}): misregistered cine?")
    ti = np.asarray(ir_ti_ms, float)
    c.within("ir_match", ir_t1_correlation(np.asarray(ir), t1w, around), limits.min_ir_t1_correlation, np.inf,
             "the IR images do not follow the T1 map (correlation {value:.2f}): IR from another slice or time?")
    if ti_range_ms is not None and ti.size:
        c.measures["ir_ti_max_ms"] = float(ti.max())
        if ti.min() < ti_range_ms[0] - 1 or ti.max() > ti_range_ms[1] + 1:
            c.fail("ir_timing", f"inversion times {ti.min():.0f}-{ti.max():.0f} ms are outside the trained "
                                f"{ti_range_ms[0]:.0f}-{ti_range_ms[1]:.0f} ms")
    return c.result(), lv


def check_output(vne: np.ndarray, lv: LVRegions | None, limits: QCLimits = DEFAULT_LIMITS) -> QCResult:
    """Is this VNE plausible? (H, W) normalised PSIR on the T1 grid, with the regions of
    :func:`check_inputs`."""
    c = _Checks()
    v = np.asarray(vne, np.float64)
    if not np.all(np.isfinite(v)):
        c.fail("vne_range", f"VNE has {int(np.size(v) - np.isfinite(v).sum())} NaN or inf pixels")
        return c.result()
    if lv is None:
        c.fail("vne_contrast", "no LV found to check the VNE against")
        return c.result()
    blood = float(np.median(v[lv.blood]))
    ring = float(np.median(v[lv.ring])) if lv.ring.any() else float("nan")
    c.measures["vne_blood"] = round(blood, 3)
    c.measures["vne_ring"] = round(ring, 3)
    c.within("vne_contrast", blood - ring, limits.min_blood_contrast, np.inf,
             "VNE blood pool is not bright (blood − myocardium {value:.2f} < {lo:.2f}): blood-pool collapse")
    sat = float(np.mean(np.abs(v[lv.heart]) > limits.saturation_level))
    c.within("vne_range", sat, -np.inf, limits.max_saturated_fraction,
             "{value:.1%} of the heart region is saturated (|VNE| > " + f"{limits.saturation_level:g})")
    c.within("vne_texture", checkerboard_index(v, lv.heart), -np.inf, limits.max_checkerboard,
             "VNE shows a 2-pixel checkerboard texture (index {value:.3f} > {hi:.3f})")
    return c.result()
