"""Resampling onto the T1 grid with one operator per geometry pair, built once and reused.

Where a target pixel falls on a source image depends only on the two geometries, so the
bilinear operator of :func:`vne.exam.geometry.resample_to_grid` is built once per (source, target)
pair (:func:`grid_map`) and applied to every frame of a stack at once: the 25-30 cine frames of
a slice, the IR magnitude images, the cosine and sine of the IR phase images. The cache is
process-wide (``vne serve`` shares it between connections: the same scanner geometry recurs),
thread-safe, and bounded (:data:`MAX_CACHED` pairs, least recently used evicted first), so it
costs a bounded amount of memory however many streams pass.

An operator can be restricted to a window of the target grid (``rows, cols`` slices): only the
pixels the model looks at are computed, and they are the same numbers the full-grid operator
gives there (the same weights, row by row). :attr:`GridMap.bbox` is the smallest window that
holds every target pixel the source covers; outside it a resampled image is zero.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ..errors import InputError
from .data import Geometry

def pixel_centres_mm(geom: Geometry) -> np.ndarray:
    """Patient coordinates of every pixel centre.

    Returns:
        (ny, nx, 3) array in mm.
    """
    ny, nx = geom.shape
    dy, dx = geom.pixel_spacing_mm
    jj = (np.arange(nx) - (nx - 1) / 2.0) * dx
    ii = (np.arange(ny) - (ny - 1) / 2.0) * dy
    r = np.asarray(geom.read_dir, float)
    p = np.asarray(geom.phase_dir, float)
    c = np.asarray(geom.position_mm, float)
    return c + ii[:, None, None] * p + jj[None, :, None] * r


def _bilinear_operator(i: np.ndarray, j: np.ndarray, shape: tuple[int, int]):
    """Sparse (n_target, ny*nx) bilinear interpolation at fractional indices (edge-clamped,
    as ``map_coordinates(order=1, mode="nearest")``)."""
    from scipy import sparse

    ny, nx = shape
    fi, fj = np.floor(i), np.floor(j)
    wi, wj = (i - fi).ravel(), (j - fj).ravel()
    i0 = np.clip(fi, 0, ny - 1).astype(np.int64).ravel()
    i1 = np.clip(fi + 1, 0, ny - 1).astype(np.int64).ravel()
    j0 = np.clip(fj, 0, nx - 1).astype(np.int64).ravel()
    j1 = np.clip(fj + 1, 0, nx - 1).astype(np.int64).ravel()
    rows = np.repeat(np.arange(i0.size), 4)
    cols = np.stack([i0 * nx + j0, i0 * nx + j1, i1 * nx + j0, i1 * nx + j1], 1).ravel()
    w = np.stack([(1 - wi) * (1 - wj), (1 - wi) * wj, wi * (1 - wj), wi * wj], 1).ravel().astype(np.float32)
    return sparse.csr_matrix((w, (rows, cols)), shape=(i0.size, ny * nx))


MAX_CACHED = 16          # geometry pairs kept (each: two float64 maps of the target grid + operators)
MAX_WINDOWS = 4          # operators per pair (full grid, cine bounding box, model window, ...)

Window = tuple[slice, slice]


def geometry_key(g: Geometry) -> tuple:
    """A hashable key of a geometry (positions and directions rounded far below a pixel)."""
    return (tuple(round(float(v), 5) for v in g.position_mm), tuple(round(float(v), 7) for v in g.read_dir),
            tuple(round(float(v), 7) for v in g.phase_dir), tuple(round(float(v), 7) for v in g.pixel_spacing_mm),
            tuple(int(v) for v in g.shape))


def full_window(shape: tuple[int, int]) -> Window:
    return slice(0, int(shape[0])), slice(0, int(shape[1]))


def mask_window(mask: np.ndarray, pad: int = 0) -> Window | None:
    """The bounding box of a (H, W) mask widened by ``pad`` pixels (clipped to the grid), or
    None when the mask is empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    return (slice(max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, mask.shape[0])),
            slice(max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, mask.shape[1])))


def window_key(window: Window) -> tuple[int, int, int, int]:
    return (window[0].start, window[0].stop, window[1].start, window[1].stop)


class GridMap:
    """Where each pixel of ``target`` falls on ``source`` (fractional row / column indices), which
    target pixels lie inside the source image, and the bilinear operators built from them.

    Raises:
        InputError: a degenerate geometry.
    """

    def __init__(self, source: Geometry, target: Geometry) -> None:
        source.validate()
        target.validate()
        self.source_shape = tuple(int(v) for v in source.shape)
        self.target_shape = tuple(int(v) for v in target.shape)
        self.identity = source == target
        self._ops: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        if self.identity:
            self.i = self.j = None
            self.inside = np.ones(self.target_shape, bool)
        else:
            src = source.normalised()
            pts = pixel_centres_mm(target) - np.asarray(src.position_mm, float)
            ny, nx = src.shape
            dy, dx = src.pixel_spacing_mm
            self.j = pts @ np.asarray(src.read_dir, float) / dx + (nx - 1) / 2.0
            self.i = pts @ np.asarray(src.phase_dir, float) / dy + (ny - 1) / 2.0
            self.inside = (self.i >= -0.5) & (self.i <= ny - 0.5) & (self.j >= -0.5) & (self.j <= nx - 0.5)
        self.inside.setflags(write=False)
        self.bbox: Window | None = mask_window(self.inside)

    def _operator(self, window: Window):
        k = window_key(window)
        with self._lock:
            op = self._ops.get(k)
            if op is not None:
                self._ops.move_to_end(k)
                return op
        op = _bilinear_operator(self.i[window], self.j[window], self.source_shape)
        with self._lock:
            self._ops[k] = op
            while len(self._ops) > MAX_WINDOWS:
                self._ops.popitem(last=False)
        return op

    def apply(self, stack: np.ndarray, window: Window | None = None) -> np.ndarray:
        """Resample ``(n, ny_s, nx_s)`` images onto ``window`` of the target grid (default: all of
        it): ``(n, h, w)`` float32, zero where the target pixel is outside the source image."""
        arr = np.asarray(stack)
        if arr.ndim != 3 or arr.shape[1:] != self.source_shape:
            raise InputError(f"image shape {arr.shape} does not match its geometry {self.source_shape}")
        window = window or full_window(self.target_shape)
        if self.identity:
            return np.ascontiguousarray(arr[:, window[0], window[1]], dtype=np.float32)
        op = self._operator(window)
        h, w = self.inside[window].shape
        out = (op @ arr.reshape(arr.shape[0], -1).astype(np.float32).T).T.reshape((arr.shape[0], h, w))
        out[:, ~self.inside[window]] = 0.0
        return out.astype(np.float32, copy=False)


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def grid_map(source: Geometry, target: Geometry) -> GridMap:
    """The (cached) :class:`GridMap` of a geometry pair."""
    key = (geometry_key(source), geometry_key(target))
    with _cache_lock:
        m = _cache.get(key)
        if m is not None:
            _cache.move_to_end(key)
            return m
    m = GridMap(source, target)
    with _cache_lock:
        _cache[key] = m
        while len(_cache) > MAX_CACHED:
            _cache.popitem(last=False)
    return m


def cache_info() -> dict:
    """How many geometry pairs and operators the cache holds (benchmarks, tests)."""
    with _cache_lock:
        maps = list(_cache.values())
    return {"pairs": len(maps), "operators": sum(len(m._ops) for m in maps)}


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
