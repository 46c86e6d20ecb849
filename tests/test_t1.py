"""T1 fitting: reference pixel vectors, synthetic vectorised correctness, and the real phantom."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import least_squares

from vne.errors import InputError
from vne.t1 import detect_scheme, fit_t1, phase_signs, restore_polarity


SHMOLLI_TI = np.array([100.0, 1100.0, 2100.0, 3100.0, 4100.0, 180.0, 260.0])  # acquisition order


def _load_vector(path: Path) -> dict[str, np.ndarray]:
    """The flow-style lists of a pixel-vector yaml file (no yaml dependency)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(\w+):\s*\[(.*)\]", line)
        if m:
            out[m.group(1)] = np.array([float(v) for v in m.group(2).split(",")])
    return out


def _phase_rad(raw_pha: np.ndarray) -> np.ndarray:
    # the vectors hold rescaled Siemens phase (-4096..4096 = -pi..pi)
    return raw_pha / 4096.0 * np.pi


def _fit_vector(d, scheme, with_phase):
    mag = d["signalMag"][:, None, None]
    pha = _phase_rad(d["signalPha"])[:, None, None] if with_phase and "signalPha" in d else None
    return fit_t1(mag, d["invTimes"], ir_phase=pha, scheme=scheme, min_mean_signal=0.0)


# ----------------------------------------------------------------------------- pixel vectors
# resultsShmolli / resultsMolli are [A, B, T1*] of the reference (tomato) implementation: its
# tests compare the third value with T1star (the phantom README calls it T1).


@pytest.mark.parametrize("name", ["T1_blood", "T1_myocardium"])
@pytest.mark.parametrize("with_phase", [True, False])
def test_shmolli_pixel_vectors(name, with_phase, phantom_dir):
    d = _load_vector(phantom_dir / "pixel-vectors" / f"{name}.yaml")
    r = _fit_vector(d, "shmolli", with_phase)
    a, b, t1s = d["resultsShmolli"]
    assert r.a[0, 0] == pytest.approx(a, rel=0.01)
    assert r.b[0, 0] == pytest.approx(b, rel=0.01)
    assert r.t1_star_ms[0, 0] == pytest.approx(t1s, rel=0.01)
    assert r.t1_ms[0, 0] == pytest.approx(t1s * (b / a - 1), rel=0.01)
    assert r.n_samples_used[0, 0] in (5, 6)  # T1 < RR: the second inversion's sample is added
    assert r.signs[:, 0, 0].tolist() == d["signs"].astype(int).tolist()


@pytest.mark.parametrize("name,with_phase", [("T1_blood", True), ("T1_myocardium", True), ("T1_blood", False), ("T1_long", False)])
def test_molli_pixel_vectors(name, with_phase, phantom_dir):
    d = _load_vector(phantom_dir / "pixel-vectors" / f"{name}.yaml")
    r = _fit_vector(d, "molli", with_phase)
    a, b, t1s = d["resultsMolli"]
    assert r.a[0, 0] == pytest.approx(a, rel=0.01)
    assert r.b[0, 0] == pytest.approx(b, rel=0.01)
    assert r.t1_star_ms[0, 0] == pytest.approx(t1s, rel=0.01)
    assert r.n_samples_used[0, 0] == d["invTimes"].size


def test_five_sample_vector_equals_the_shmolli_five_sample_fit(phantom_dir):
    d5 = _load_vector(phantom_dir / "pixel-vectors" / "T1_blood_5samples.yaml")
    r5 = _fit_vector(d5, "molli", True)
    d7 = _load_vector(phantom_dir / "pixel-vectors" / "T1_blood.yaml")
    r7 = _fit_vector(d7, "shmolli", True)
    # the 5-sample fit of inversion 1 and ShMOLLI's 6-sample choice agree within 0.1 %
    assert r5.t1_ms[0, 0] == pytest.approx(r7.t1_ms[0, 0], rel=1e-3)
    assert r5.signs[:, 0, 0].tolist() == [-1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------- synthetic


def _molli_533_ti(rr=1000.0):
    return np.array([100 + k * rr for k in range(5)] + [180 + k * rr for k in range(3)])


def _ll_signal(ti, a, b, t1):
    t1s = t1 / (b / a - 1)
    return a - b * np.exp(-ti[:, None, None] / t1s)


def test_vectorised_fit_matches_per_pixel_least_squares_and_truth():
    rng = np.random.default_rng(1)
    ti = _molli_533_ti()
    t1 = np.geomspace(150, 3000, 40).reshape(4, 10)
    a = rng.uniform(200, 600, t1.shape)
    b = a * rng.uniform(1.8, 2.0, t1.shape)
    signed = _ll_signal(ti, a, b, t1)
    noisy = signed + rng.normal(0, 1.0, signed.shape)
    r = fit_t1(np.abs(noisy), ti, scheme="molli")
    # noise-free data come back exactly
    r0 = fit_t1(np.abs(signed), ti, scheme="molli")
    np.testing.assert_allclose(r0.t1_ms, t1, rtol=1e-3)
    # the noisy fit is the global least-squares optimum (compared with scipy, per pixel)
    order = np.argsort(ti)
    for i, j in [(0, 0), (1, 3), (2, 6), (3, 9), (0, 5)]:
        y = noisy[:, i, j]
        s = y[order]
        best = None
        for k in range(5):  # brute force: every "first k negative" pattern, from the true start
            ys = np.abs(s) * np.where(np.arange(s.size) < k, -1, 1)
            ls = least_squares(lambda p, ys=ys: p[0] - p[1] * np.exp(-ti[order] / p[2]) - ys,
                               [a[i, j], b[i, j], t1[i, j] / (b[i, j] / a[i, j] - 1)], method="lm")
            if best is None or ls.cost < best.cost:
                best = ls
        A, B, T = best.x
        assert r.t1_ms[i, j] == pytest.approx(T * (B / A - 1), rel=2e-3)
        assert np.all(np.isfinite(r.r2)) and 0.99 < r.r2[i, j] <= 1.0


def test_polarity_search_without_phase_recovers_the_signs():
    rng = np.random.default_rng(2)
    ti = SHMOLLI_TI
    t1 = np.linspace(200, 2500, 60).reshape(6, 10)
    a = np.full(t1.shape, 400.0)
    b = 1.9 * a
    signed = _ll_signal(ti, a, b, t1) + rng.normal(0, 0.5, (7,) + t1.shape)
    r = fit_t1(np.abs(signed), ti, scheme="molli")
    true_sign = np.sign(signed)
    clear = np.abs(signed) > 10  # samples near the null may go either way
    assert np.all((r.signs == true_sign)[clear])
    np.testing.assert_allclose(r.t1_ms, t1, rtol=0.02)
    signed_back = restore_polarity(np.abs(signed), ti)
    assert np.all((np.sign(signed_back) == true_sign)[clear])


def test_phase_gives_the_sign_and_grey_zone_is_searched():
    ti = np.array([100.0, 180.0, 260.0, 1100.0, 2100.0])
    ph = np.array([np.pi, 0.6 * np.pi, 0.5 * np.pi, 0.1, 0.0])[:, None]
    s = phase_signs(ph, ti)
    assert s[:, 0].tolist() == [-1, 0, 0, 1, 1]
    # phase relative to the longest TI: a global phase offset changes nothing
    assert phase_signs(ph + 2.0, ti)[:, 0].tolist() == [-1, 0, 0, 1, 1]
    # phases stored in [0, 2 pi) and differences across +-pi are wrapped: 3.0 and -3.0 rad are 0.28 apart
    assert phase_signs(np.mod(ph + 2.0, 2 * np.pi), ti)[:, 0].tolist() == [-1, 0, 0, 1, 1]
    assert phase_signs(np.array([[0.0], [-3.0], [3.0]]), [100.0, 200.0, 900.0])[:, 0].tolist() == [-1, 1, 1]


def test_phase_beats_an_ambiguous_magnitude_fit():
    """With phase, a confidently negative sample stays negative even if flipping it fits better."""
    rng = np.random.default_rng(3)
    ti = _molli_533_ti()
    t1 = np.full((3, 4), 900.0)
    a, b = np.full(t1.shape, 300.0), np.full(t1.shape, 570.0)
    signed = _ll_signal(ti, a, b, t1) + rng.normal(0, 1.0, (8,) + t1.shape)
    phase = np.where(signed < 0, np.pi, 0.0) + rng.normal(0, 0.05, signed.shape) + 1.0
    r = fit_t1(np.abs(signed), ti, ir_phase=phase, scheme="molli")
    assert np.all(r.signs == np.sign(signed))
    np.testing.assert_allclose(r.t1_ms, 900, rtol=0.02)


def test_shmolli_rule_uses_5_for_long_and_7_for_short_t1():
    rng = np.random.default_rng(4)
    ti = SHMOLLI_TI
    shape = (20, 20)

    def fit(t1_value):
        t1 = np.full(shape, t1_value)
        a = np.full(shape, 400.0)
        sig = np.abs(_ll_signal(ti, a, 1.9 * a, t1) + rng.normal(0, 2.0, (7,) + shape))
        return fit_t1(sig, ti, scheme="shmolli")

    long_, mid, short = fit(1500.0), fit(700.0), fit(250.0)
    assert long_.scheme == "shmolli" and long_.rr_interval_ms == pytest.approx(1000.0)
    assert np.mean(long_.n_samples_used == 5) > 0.95  # T1 > RR: inversion 1 only
    # 0.4 RR < T1 < RR: the second inversion's sample is added when chi6 T1_6 < chi5 RR, which
    # noise decides for some pixels; the third inversion's never (chi7 T1_7 < 0.4 chi6 RR fails)
    assert np.mean(mid.n_samples_used == 6) > 0.6
    assert np.mean(mid.n_samples_used == 7) < 0.05
    assert np.mean(short.n_samples_used == 7) > 0.8  # T1 < 0.4 RR: all samples, unless chi7 > 1.6 chi6
    assert np.mean(short.n_samples_used == 5) < 0.05
    for r, t in ((long_, 1500), (mid, 700), (short, 250)):
        assert np.median(r.t1_ms) == pytest.approx(t, rel=0.02)


def test_background_and_mask_give_zero():
    ti = SHMOLLI_TI
    t1 = np.full((8, 8), 1000.0)
    sig = np.abs(_ll_signal(ti, np.full(t1.shape, 300.0), np.full(t1.shape, 570.0), t1))
    sig[:, :2, :] = 0.3  # background: tiny, flat
    mask = np.ones((8, 8), bool)
    mask[-1, -1] = False
    r = fit_t1(sig, ti, mask=mask)
    assert np.all(r.t1_ms[:2] == 0) and np.all(r.r2[:2] == 0) and np.all(r.n_samples_used[:2] == 0)
    assert r.t1_ms[-1, -1] == 0 and not r.fitted[-1, -1]
    assert np.all(r.t1_ms[2:, :-1] > 0) and np.all(r.r2[2:, :-1] > 0.99)
    assert r.t1_ms.shape == (8, 8) and r.t1_ms.dtype == np.float32
    assert r.signs.shape == (7, 8, 8)


def test_detect_scheme_and_input_errors():
    assert detect_scheme(SHMOLLI_TI) == "shmolli"
    assert detect_scheme(_molli_533_ti()) == "molli"
    assert detect_scheme([100, 200, 300, 400, 500, 600, 700]) == "molli"
    z = np.ones((7, 4, 4))
    with pytest.raises(InputError, match="inversion times"):
        fit_t1(z, SHMOLLI_TI[:6])
    with pytest.raises(InputError, match="ShMOLLI needs 7"):
        fit_t1(np.ones((8, 4, 4)), _molli_533_ti(), scheme="shmolli")
    with pytest.raises(InputError, match="at least 4"):
        fit_t1(np.ones((3, 4, 4)), [100, 200, 300])
    with pytest.raises(InputError, match="phase"):
        fit_t1(z, SHMOLLI_TI, ir_phase=np.ones((7, 3, 3)))
    with pytest.raises(InputError, match="scheme"):
        fit_t1(z, SHMOLLI_TI, scheme="sasha")


# ----------------------------------------------------------------------------- real phantom


def _read_phantom(phantom: Path):
    import pydicom

    def read(f):
        ds = pydicom.dcmread(f)
        return ds, ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))

    mags, tis, phas = [], [], []
    for f in sorted((phantom / "ShMOLLI_192i_e11_12").glob("*.dcm")):
        ds, a = read(f)
        mags.append(a)
        tis.append(float(ds.InversionTime))
    for f in sorted((phantom / "ShMOLLI_192i_e11_13").glob("*.dcm")):
        phas.append(read(f)[1] / 4096.0 * np.pi)
    ref = read(phantom / "ShMOLLI_192i_e11_T1MAP_14" / "IM-0003-0002.dcm")[1]
    n_used = read(phantom / "ShMOLLI_192i_e11_FITPARAMS_15" / "IM-0004-0005.dcm")[1]  # (n - 4) * 1000
    return np.stack(mags), np.array(tis), np.stack(phas), ref, n_used


def detect_vials(ref_t1: np.ndarray, fitted: np.ndarray, min_pixels: int = 100):
    """Homogeneous compartments of the scanner map (vials, bottles, gel), eroded from their edges.

    Pixels where the scanner fitted (``fitted``), the map is > 0 and locally homogeneous (5x5
    coefficient of variation < 5 %); opened, eroded by 2 pixels, labelled; components with at
    least ``min_pixels`` pixels.
    """
    mu = ndimage.uniform_filter(ref_t1, 5)
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(ref_t1**2, 5) - mu**2, 0))
    ok = fitted & (ref_t1 > 0) & (sd < 0.05 * np.maximum(mu, 1e-6))
    ok = ndimage.binary_erosion(ndimage.binary_opening(ok), iterations=2)
    lab, n = ndimage.label(ok)
    sizes = ndimage.sum(ok, lab, range(1, n + 1))
    keep = [i + 1 for i in np.argsort(-sizes) if sizes[i] >= min_pixels]
    return lab, keep


@pytest.fixture(scope="module")
def phantom(phantom_dir):
    return _read_phantom(phantom_dir)


@pytest.mark.parametrize("with_phase", [True, False])
def test_real_phantom_matches_scanner_t1_map_per_vial(phantom, with_phase):
    mags, tis, phas, ref, n_used = phantom
    t0 = time.perf_counter()
    r = fit_t1(mags, tis, ir_phase=phas if with_phase else None, scheme="auto")
    dt = time.perf_counter() - t0
    assert r.scheme == "shmolli" and r.rr_interval_ms == pytest.approx(1000.0)
    lab, vials = detect_vials(ref, n_used > 0)
    assert len(vials) >= 10  # 2 bottles, the gel and most of the 9 vials
    rows = []
    for v in vials:
        sel = lab == v
        rel = np.median((r.t1_ms[sel] - ref[sel]) / ref[sel])
        rows.append((v, int(sel.sum()), float(np.median(ref[sel])), float(np.median(r.t1_ms[sel])), float(rel)))
    print(f"\nphantom fit ({'phase' if with_phase else 'no phase'}): {dt:.3f} s, {int(r.fitted.sum())} pixels fitted")
    print("| vial | pixels | scanner median T1 (ms) | vne median T1 (ms) | median relative difference |")
    for v, n, a, b, rel in sorted(rows, key=lambda x: x[2]):
        print(f"| {v} | {n} | {a:.0f} | {b:.1f} | {100 * rel:+.2f} % |")
    worst = max(abs(x[4]) for x in rows)
    assert worst < 0.02, rows
    # the conditional rule picks the same number of samples as the scanner almost everywhere
    both = (n_used > 0) & (r.n_samples_used > 0)
    agree = np.mean((r.n_samples_used[both].astype(int) - 4) * 1000 == n_used[both])
    assert agree > 0.97
    # dt is printed above, not asserted: speed is for benchmarks (a loaded 2-core CI machine
    # read 3.2-3.5 s here, against 0.2-0.4 s idle)


def test_real_phantom_whole_map_agreement(phantom):
    mags, tis, phas, ref, n_used = phantom
    r = fit_t1(mags, tis, ir_phase=phas)
    both = (ref > 0) & (n_used > 0) & (r.t1_ms > 0)
    rel = np.abs(r.t1_ms[both] - ref[both]) / ref[both]
    assert np.median(rel) < 0.01
    assert np.mean(rel < 0.05) > 0.97
    # scanner-fitted pixels we left as background, and the reverse, are few
    assert np.sum((n_used > 0) & ~r.fitted) < 0.02 * np.sum(n_used > 0)
