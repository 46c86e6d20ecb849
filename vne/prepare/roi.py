"""Where the model looks: the heart window of a slice, and the VNE pasted back onto the T1 grid.

The network's cost is proportional to the pixels it is run on, and the heart fills about a
tenth of a T1 grid. The gadget therefore runs it on a window around the heart only
(:func:`model_window`) and pastes the result into a full T1-grid image whose other pixels hold
:data:`BACKGROUND_VNE` (:func:`paste`); the output keeps the T1 map's grid and geometry.

The window rule (one definition, used by the gadget, ``benchmarks/fov_sensitivity.py`` and the
golden tests):

* the heart region is the quality guard's: the LV blood pool found in the T1 map (with the
  cine's motion), dilated by 20 mm (:func:`vne.runtime.qc.find_lv`, ``LVRegions.heart``), joined with
  where the cine moves (:func:`moving_region`). The LV finder alone is not enough: on 1 of 91
  held-out simulator slices it settled on another blood pool ringed by myocardium-like T1
  (the guard still passed it), and a window around that left part of the myocardium out. The
  beating heart is what moves in a breath-held cine, so the window follows the motion too, and
  grows to the whole grid when the motion is everywhere;
* the window holds that region with :data:`CONTEXT_MARGIN_PX` pixels to spare on every side and
  is at least :data:`MIN_WINDOW_PX` square: the size of the heart-centred windows the generator
  was trained on (the training cache writes 160-pixel windows, ``vne.simulate.writers``);
* its sides are multiples of the model's ``pad_multiple``, grown with real image content
  (centred on the heart, shifted to stay inside the grid), so no zero padding is needed unless
  the grid itself is smaller; it starts on a row and column that are multiples of
  :data:`ALIGN` (16, the generator's total stride), so every downsampled feature map of the window
  samples the same pixels as on the full grid (an 8-pixel shift alone moves the VNE by up to
  ~0.05 inside the myocardium: the network is shift-invariant only approximately);
* no heart region (the guard found no LV): the whole grid, as before.

Everything the guard reads lies inside the heart region, so the guard's verdict is the same as
on the full grid. The VNE inside the window is close to, not identical with, full-grid
inference: the generator scales its cine and IR inputs by one intensity statistic per image
(``robust_scale``), which the window changes; ``benchmarks/fov_sensitivity.py`` measures the
difference inside the myocardium and the burden agreement both ways.
"""
from __future__ import annotations

import numpy as np

from ..exam.data import Geometry
from ..exam.resampling import Window, full_window, grid_map, mask_window

ALIGN = 16             # window starts: multiples of the generator's total stride
MIN_WINDOW_PX = 160
CONTEXT_MARGIN_PX = 16
# moving: temporal SD > 3x the median SD of the cine's body pixels (cine_motion_from_frames), after a
# 2-pixel opening (lone noisy or flowing pixels do not count)
MOTION_THRESHOLD = 3.0
MOTION_OPENING_PX = 2
# The model's output where there is no tissue: measured median of 0.3.0's full-grid VNE over the
# pixels without T1 (air) on held-out simulator exams, 0.0004-0.0011 (5-95 %: -0.005..0.010),
# i.e. the remote-myocardium level of normalised PSIR.
BACKGROUND_VNE = 0.0


def _span(lo: int, hi: int, size: int, n: int, multiple: int) -> slice:
    """A run of at least ``size`` pixels (a multiple of ``multiple``, else all ``n``) that holds
    [lo, hi) (clipped to the grid), about centred on it, starting on a multiple of :data:`ALIGN`."""
    lo, hi = max(lo, 0), min(hi, n)
    step = int(np.lcm(multiple, ALIGN))
    size = int(np.ceil(size / multiple) * multiple)
    while size < n:
        start = min(max(int(round((lo + hi - size) / 2)), 0), n - size)
        start -= start % ALIGN
        if start <= lo and hi <= start + size:
            return slice(start, start + size)
        size += step  # the aligned start cut the run short of hi: one step larger
    return slice(0, n)


def cine_motion(cine: np.ndarray, shape: tuple[int, int] | None = None,
                window: tuple[slice, slice] | None = None) -> np.ndarray | None:
    """The motion map of cine frames already on the T1 grid, for :func:`vne.runtime.qc.find_lv`:
    the temporal SD of each pixel over the median temporal SD of the cine's body pixels (mean
    above 10 % of the 99th percentile). The gadget and the training caches use
    :func:`cine_motion_from_frames` (from the cine's own grid), which reads lower.

    Args:
        cine: (n, h, w) frames, on the whole grid, or on ``window`` of a grid of ``shape``
            when the cine is zero outside that window (its footprint on the T1 grid): the map
            is then the same as from the zero-filled full grid, computed on the window only.

    Returns:
        (H, W) float64, or None for fewer than 4 frames.
    """
    c = np.asarray(cine)
    if c.ndim != 3 or c.shape[0] < 4:
        return None
    c = c.astype(np.float64)
    return motion_from_stats(c.std(axis=0), c.mean(axis=0), shape, window)


def motion_from_stats(sd: np.ndarray, mean: np.ndarray, shape: tuple[int, int] | None = None,
                      window: tuple[slice, slice] | None = None) -> np.ndarray:
    """:func:`cine_motion` from the cine's temporal SD and mean images, (h, w) each, on the
    whole grid or on ``window`` of a grid of ``shape`` (zero elsewhere)."""
    sd, mean = np.asarray(sd, np.float64), np.asarray(mean, np.float64)
    if window is not None:
        if shape is None:
            raise ValueError("motion_from_stats on a window needs the grid's shape")
        sd_w, mean_w = sd, mean
        sd, mean = np.zeros(shape), np.zeros(shape)
        sd[window], mean[window] = sd_w, mean_w
    body = mean > 0.1 * np.percentile(mean, 99)
    return sd / max(float(np.median(sd[body])) if body.any() else 0.0, 1e-9)


def cine_motion_from_frames(frames: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray | None:
    """The motion map the gadget and the training caches use: each pixel's temporal SD and mean
    over the cine frames on the cine's own grid, and only those two images resampled (bilinear)
    onto the cine's footprint on the T1 grid, then :func:`motion_from_stats` (one definition
    for serving and training; the map of frames already on the T1 grid, :func:`cine_motion`,
    reads higher, because resampling and the cycle's interpolation average the noise).

    Args:
        frames: (n, h, w) cine frames on ``source`` (any order).
        source: the cine's geometry; target: the T1 map's.

    Returns:
        (H, W) float64 on ``target``, or None for fewer than 4 frames or no overlap.
    """
    f = np.asarray(frames, np.float32)
    if f.ndim != 3 or f.shape[0] < 4:
        return None
    cmap = grid_map(source, target)
    if cmap.bbox is None:
        return None
    stats = cmap.apply(np.stack([f.std(axis=0), f.mean(axis=0)]), cmap.bbox)
    return motion_from_stats(stats[0], stats[1], (cmap.target_shape[0], cmap.target_shape[1]), cmap.bbox)


def moving_region(motion: np.ndarray | None) -> np.ndarray | None:
    """(H, W) bool: where the cine moves (:data:`MOTION_THRESHOLD`), from its motion map
    (:func:`cine_motion_from_frames`); None without one."""
    if motion is None:
        return None
    from scipy import ndimage

    moving = motion > MOTION_THRESHOLD
    out = np.zeros(moving.shape, bool)
    box = mask_window(moving, MOTION_OPENING_PX + 1)  # the opening reaches no further out
    if box is not None:
        out[box] = ndimage.binary_opening(moving[box], iterations=MOTION_OPENING_PX)
    return out


def model_window(heart: np.ndarray | None, shape: tuple[int, int], multiple: int,
                 min_size: int = MIN_WINDOW_PX, margin: int = CONTEXT_MARGIN_PX) -> Window:
    """The window the model runs on (module docstring).

    Args:
        heart: (H, W) bool heart region on the T1 grid, or None.
        shape: the T1 grid (H, W).
        multiple: the model's ``pad_multiple``.

    Returns:
        (rows, cols) slices of the T1 grid.
    """
    if heart is None or not np.any(heart):
        return full_window(shape)
    rows = np.flatnonzero(np.any(heart, axis=1))
    cols = np.flatnonzero(np.any(heart, axis=0))
    r0, r1 = int(rows[0]) - margin, int(rows[-1]) + 1 + margin
    c0, c1 = int(cols[0]) - margin, int(cols[-1]) + 1 + margin
    return (_span(r0, r1, max(r1 - r0, min_size), int(shape[0]), multiple),
            _span(c0, c1, max(c1 - c0, min_size), int(shape[1]), multiple))


def contains(window: Window, mask: np.ndarray, margin: int = 0) -> bool:
    """Whether every pixel of ``mask`` lies inside ``window``, ``margin`` pixels from its edges
    (edges that are the grid's own count as far away)."""
    box = mask_window(mask)
    if box is None:
        return True
    ny, nx = mask.shape
    r, c = window
    lo_r = r.start + (margin if r.start > 0 else 0)
    hi_r = r.stop - (margin if r.stop < ny else 0)
    lo_c = c.start + (margin if c.start > 0 else 0)
    hi_c = c.stop - (margin if c.stop < nx else 0)
    return lo_r <= box[0].start and box[0].stop <= hi_r and lo_c <= box[1].start and box[1].stop <= hi_c


def paste(values: np.ndarray, window: Window, shape: tuple[int, int],
          background: float = BACKGROUND_VNE) -> np.ndarray:
    """(H, W) float32: ``values`` inside ``window``, ``background`` elsewhere."""
    out = np.full(shape, background, np.float32)
    out[window] = values
    return out


def describe(window: Window, shape: tuple[int, int]) -> str:
    """``rows 64-223, cols 80-239 of 246x302`` (for the image meta and logs)."""
    r, c = window
    return f"rows {r.start}-{r.stop - 1}, cols {c.start}-{c.stop - 1} of {shape[0]}x{shape[1]}"
