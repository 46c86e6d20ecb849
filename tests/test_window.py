"""The heart window (vne.prepare.roi), the cached resampling operators (vne.exam.resampling) and the windowed
per-slice path (vne.runtime.inference): the model looks at a window, everything else stays as on the
full T1 grid.

The windowed path computes the cine, the IR signs and the guard's measures on a window only; on
simulated slices (with and without IR phase) they must equal the full-grid path's numbers there.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest

from vne.runtime import inference
from vne.prepare import roi
from vne.prepare.contract import ModelContract, model_inputs
from vne.exam.data import Geometry, Role
from vne.exam.geometry import resample_to_grid
from vne.runtime.qc import check_inputs
from vne.exam.resampling import cache_info, grid_map
from vne.simulate.case import simulate_case
from vne.simulate.writers import as_delivered
from vne.prepare.slices import assemble, on_t1_grid

CONTRACT = ModelContract()


def _geom(shape=(96, 120), spacing=(1.3, 1.3), pos=(0.0, 0.0, 0.0), angle=0.0) -> Geometry:
    c, s = np.cos(angle), np.sin(angle)
    return Geometry(position_mm=pos, read_dir=(c, s, 0.0), phase_dir=(-s, c, 0.0), pixel_spacing_mm=spacing, shape=shape)


# ------------------------------------------------------------------ the window rule
def test_the_window_holds_the_heart_is_aligned_and_at_least_the_training_size():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = (int(rng.integers(170, 420)), int(rng.integers(170, 420)))
        heart = np.zeros(shape, bool)
        h, w = int(rng.integers(20, 140)), int(rng.integers(20, 140))
        r, c = int(rng.integers(0, shape[0] - h)), int(rng.integers(0, shape[1] - w))
        heart[r:r + h, c:c + w] = True
        rows, cols = roi.model_window(heart, shape, 16)
        assert roi.contains((rows, cols), heart, margin=4)
        for sl, n in ((rows, shape[0]), (cols, shape[1])):
            size = sl.stop - sl.start
            assert (size % 16 == 0 and sl.start % roi.ALIGN == 0 and size >= roi.MIN_WINDOW_PX) or (sl.start, sl.stop) == (0, n)


def test_no_heart_or_a_small_grid_gives_the_whole_grid():
    assert roi.model_window(None, (200, 240), 16) == (slice(0, 200), slice(0, 240))
    assert roi.model_window(np.zeros((200, 240), bool), (200, 240), 16) == (slice(0, 200), slice(0, 240))
    heart = np.zeros((150, 300), bool)
    heart[60:90, 100:140] = True
    rows, cols = roi.model_window(heart, (150, 300), 16)
    assert rows == slice(0, 150) and cols.stop - cols.start == roi.MIN_WINDOW_PX


def test_paste_keeps_the_grid_and_fills_the_background():
    out = roi.paste(np.ones((32, 48), np.float32), (slice(16, 48), slice(32, 80)), (100, 120))
    assert out.shape == (100, 120) and out.dtype == np.float32
    assert out[16:48, 32:80].min() == 1 and out.sum() == 32 * 48
    assert np.all(out[:16] == roi.BACKGROUND_VNE)


# ------------------------------------------------------------------ resampling operators
def test_operator_on_a_window_equals_the_full_grid_there_and_is_reused():
    src, dst = _geom((80, 100), (1.6, 1.6), angle=0.3), _geom((96, 120), (1.25, 1.25), pos=(3.0, -2.0, 0.5))
    stack = np.random.default_rng(1).random((5, 80, 100)).astype(np.float32)
    m = grid_map(src, dst)
    assert grid_map(src, dst) is m and cache_info()["pairs"] >= 1
    full = m.apply(stack)
    old, inside = resample_to_grid(stack, src, dst)
    np.testing.assert_array_equal(full, old)
    np.testing.assert_array_equal(inside, m.inside)
    win = (slice(16, 64), slice(32, 96))
    np.testing.assert_array_equal(m.apply(stack, win), full[:, win[0], win[1]])
    assert not np.any(full[:, ~m.inside]) and m.bbox is not None
    rows, cols = m.bbox
    assert m.inside[rows, cols].any() and not m.inside.sum() - m.inside[rows, cols].sum()
    ident = grid_map(dst, dst)
    assert ident.identity and ident.bbox == (slice(0, 96), slice(0, 120))


# ------------------------------------------------------------------ the windowed slice
@functools.lru_cache(maxsize=None)
def _slices(seed: int, index: int, drop_phase: bool = False):
    case = simulate_case(seed, index)
    images = as_delivered(case)
    if drop_phase:
        images = [im for im in images if im.role != Role.IR_PHASE]
    out = []
    for t1 in [im for im in images if im.role == Role.T1_MAP]:
        s, why = assemble(t1, images)
        assert s is not None, why
        out.append(s)
    return out


@pytest.mark.parametrize("drop_phase", [False, True])
def test_the_windowed_path_gives_the_full_grid_inputs_and_guard_measures(drop_phase):
    for s in _slices(4, 0, drop_phase):
        assert bool(s.ir_phase) != drop_phase
        g = on_t1_grid(s)
        x = model_inputs(CONTRACT, g.t1_map_ms, g.ir_signed, g.ir_ti_ms, g.cine_frames, g.cine_trigger_ms, g.rr_interval_ms)
        p = inference.prepare(CONTRACT, s)
        w = p.window
        assert not p.full_grid and p.lv is not None
        assert roi.contains(w, p.lv.heart, margin=4)
        np.testing.assert_array_equal(p.x["t1_map_ms"], x["t1_map_ms"][..., w[0], w[1]])
        np.testing.assert_array_equal(p.x["ir"], x["ir"][..., w[0], w[1]])   # signs restored on the window only
        np.testing.assert_array_equal(p.x["cine"], x["cine"][..., w[0], w[1]])
        np.testing.assert_array_equal(p.x["ir_ti_ms"], x["ir_ti_ms"])
        full, lv_full = check_inputs(x["t1_map_ms"][0, 0], x["cine"][0], x["ir"][0], x["ir_ti_ms"][0], p.pixel_mm,
                                     motion=g.cine_motion)
        windowed, lv = check_inputs(p.t1_map_ms, p.x["cine"][0], p.x["ir"][0], p.x["ir_ti_ms"][0], p.pixel_mm,
                                    lv=p.lv, window=w)
        assert windowed.measures == full.measures and windowed.passed == full.passed
        np.testing.assert_array_equal(lv.heart, lv_full.heart)


def test_the_window_must_hold_the_heart():
    s = _slices(4, 0)[0]
    p = inference.prepare(CONTRACT, s)
    small = (slice(p.window[0].start, p.window[0].start + 16), p.window[1])
    with pytest.raises(ValueError):
        check_inputs(p.t1_map_ms, p.x["cine"][0][:, :16], p.x["ir"][0][:, :16], p.x["ir_ti_ms"][0], p.pixel_mm,
                     lv=p.lv, window=small)


def test_no_lv_runs_the_model_on_the_whole_grid():
    s = _slices(4, 0)[0]
    flat = replace(s, t1_map=replace(s.t1_map, pixels=np.full(s.t1_map.geometry.shape, 900.0, np.float32)))
    p = inference.prepare(CONTRACT, flat)
    assert p.lv is None and p.full_grid


def test_the_window_follows_the_moving_heart_when_the_lv_finder_is_wrong(monkeypatch):
    """On 1 of 91 held-out simulator slices the LV finder settled on another blood pool ringed by
    myocardium-like T1; the window must still hold the myocardium, because the heart moves."""
    import vne.runtime.qc as qc

    case = simulate_case(4, 0)
    s = _slices(4, 0)[0]
    t1_positions = [tuple(np.round(im.geometry.position_mm, 2)) for im in as_delivered(case) if im.role == Role.T1_MAP]
    myo = case.truth[t1_positions.index(tuple(np.round(s.t1_map.geometry.position_mm, 2)))].myocardium
    real = qc.find_lv

    def elsewhere(*a, **k):  # the true LV's regions moved to a far corner of the grid
        lv = real(*a, **k)
        shift = (-int(np.nonzero(lv.heart)[0].min()), -int(np.nonzero(lv.heart)[1].min()))
        return replace(lv, blood=np.roll(lv.blood, shift, (0, 1)), ring=np.roll(lv.ring, shift, (0, 1)),
                       heart=np.roll(lv.heart, shift, (0, 1)))

    monkeypatch.setattr(qc, "find_lv", elsewhere)
    p = inference.prepare(CONTRACT, s)
    assert not roi.contains(roi.model_window(p.lv.heart, p.shape, 16), myo)   # the LV alone would miss it
    assert roi.contains(p.window, myo)
