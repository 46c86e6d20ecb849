"""Look-Locker T1 fitting (MOLLI, ShMOLLI), vectorised over pixels. Pure functions.

Model (three parameters, signed signal, samples sorted by inversion time)::

    S(TI) = A - B * exp(-TI / T1*)          T1 = T1* * (B / A - 1)

Every step works on all pixels at once (blocks of :data:`CHUNK_PIXELS`; no per-pixel loop):

1. **Grid over T1*** (:data:`T1STAR_GRID_MS`, 48 log-spaced values, 5..12000 ms). For a fixed
   T1* the model is linear in (A, B); with the constant projected out the best residual is
   ``SSR_g = |y|^2 - n mean(y)^2 - (w_g . y)^2``, ``w_g`` the centred unit-norm
   ``exp(-TI/g)``. One product ``W y`` gives every grid value for every pixel; only
   ``w_g . y < 0`` (B > 0: a recovery, not a decay) is admissible.
2. **Polarity.** Magnitude images lose the sign of Mz. Sorted by TI, a Look-Locker recovery is
   negative for the first ``k`` samples and positive after, so the candidates are "the first
   ``k`` samples negative", ``k = 0 ..`` the number of samples with TI below
   :data:`MAX_TI_FOR_SIGN_FLIP_MS`. Flipping a sample is a rank-1 update of ``W y`` and of the
   mean, so each candidate costs one pass over the grid.
   With phase images (:func:`phase_signs`): the phase relative to the longest-TI image gives a
   confident -1 beyond ``pi/2 (1 + 0.3)``, a confident +1 within ``pi/2 (1 - 0.3)``, and leaves
   the grey zone in between to the fit; when no sample of a pixel is confidently negative, the
   undecided ones are positive (as the ShMOLLI sign logic). Only the candidates with the fewest
   conflicts with the confident signs are allowed (normally: the consistent ones).
3. **Refinement.** For the best candidate, and for the runner-up where the samples it flips are
   small (below :data:`AMBIGUOUS_FRACTION` of the pixel's largest magnitude: a sample near the
   null, which the coarse grid cannot rank): parabolic interpolation of the grid optimum in
   log T1*, closed-form (A, B), then :data:`LM_ITERATIONS` vectorised Levenberg-Marquardt steps
   on (A, B, log T1*). The lower refined residual wins.
4. **Validity.** Finite, A > 0, B > 0, T1* > 0, and identifiable: ``exp(-TI_2 / T1*) >= 1e-3``
   with TI_2 the second-shortest TI of the fit (otherwise only one sample sees the recovery and
   A, B, T1* are not determined).

ShMOLLI 5(1)1(1)1 conditional rule (Piechnik et al., JCMR 2010;12:69), as implemented here,
after reading the public ``tomato`` re-implementation by Werys et al. (no code copied). Samples
sorted by TI are ``[TI1, TI2, TI3, TI1+RR, TI1+2RR, TI1+3RR, TI1+4RR]``:

- fit 5 = inversion 1 only (sorted indices 0, 3, 4, 5, 6) with the shortest-TI sample forced
  negative (``k >= 1``); fit 6 = fit 5 + the second inversion's sample (index 1); fit 7 = all.
- ``T_RR`` is ``rr_interval_ms`` if given, else the mean of the four gaps
  ``TI[3]-TI[0], TI[4]-TI[3], TI[5]-TI[4], TI[6]-TI[5]``.
- ``chi_n = sqrt(SSR_n / (n - 1))``.
- start: ``n = 5``, ``T1tmp = T1_5``, ``chi_tmp = chi_5`` if fit 5 is valid; else ``n = 0``,
  ``T1tmp = 0`` and ``chi_tmp = inf`` (tomato keeps the failed fit's cost there; with infinity
  any valid fit 6 is taken instead).
- only if ``T1tmp <= T_RR`` or fit 6 is invalid or ``T1_6 <= 0.4 T_RR``:
  - use 6 if fit 6 is valid and ``chi_6 T1_6 < chi_tmp T_RR``; then ``T1tmp = T1_6``;
  - use 7 if fits 6 and 7 are valid, ``chi_7 T1_7 < 0.4 chi_6 T_RR`` and ``T1tmp < T_RR``
    (all three inversions only when the error is small enough to make up for the incomplete
    recovery between inversions, which limits it to short T1). Fit 7 is computed only for the
    pixels where it can be chosen.
- a pixel with ``n = 0`` gets T1 = 0.

Background pixels (mean magnitude below :data:`BACKGROUND_FRACTION` of the 99th percentile, or
an absolute ``min_mean_signal``, or outside ``mask``) get T1 = 0, R^2 = 0, n = 0.
R^2 is the coefficient of determination ``1 - SSR/SST`` of the signed samples of the chosen fit.
T1 is clipped to ``[0, max_t1_ms]`` (default 4000 ms; the scanner map saturates there too).
See docs/t1-mapping.md for the validation on the real phantom.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

# Samples with TI above this are never sign-flipped (tomato: 0.67 * 4000 ms).
MAX_TI_FOR_SIGN_FLIP_MS = 2680.0
# Phase grey zone, as a fraction of pi/2 around pi/2, where the sign is left to the fit.
PHASE_GREY_ZONE = 0.3
# T1* grid (ms), log-spaced.
T1STAR_GRID_MS = np.geomspace(5.0, 12000.0, 48)
# Background: pixel-mean magnitude below this fraction of the image's 99th percentile.
BACKGROUND_FRACTION = 0.015
MAX_T1_MS = 4000.0
# A fit is identifiable only if exp(-TI_2 / T1*) is at least this (TI_2: second-shortest TI).
MIN_EXP_AT_SECOND_TI = 1e-3
LM_ITERATIONS = 3
# The runner-up sign candidate is refined too where the samples it flips are below this
# fraction of the pixel's largest magnitude.
AMBIGUOUS_FRACTION = 0.3
SHMOLLI_SUBSETS = {5: (0, 3, 4, 5, 6), 6: (0, 1, 3, 4, 5, 6), 7: (0, 1, 2, 3, 4, 5, 6)}
SCHEMES = ("auto", "shmolli", "molli")
CHUNK_PIXELS = 8192


@dataclass
class T1Fit:
    """Per-pixel result of :func:`fit_t1` (all maps ``(ny, nx)`` float32 unless stated).

    Attributes:
        t1_ms: T1 in ms (0 in background / failed fits), clipped to ``max_t1_ms``.
        a, b: the fitted A and B (signal units).
        t1_star_ms: the apparent T1* in ms.
        r2: coefficient of determination of the chosen fit (0 in background).
        n_samples_used: ``(ny, nx)`` uint8: samples in the chosen fit (ShMOLLI 5, 6 or 7; 0 = none).
        signs: ``(n, ny, nx)`` int8, +1 / -1 per input image, in the input order.
        fitted: ``(ny, nx)`` bool, pixels that were above the background threshold.
        scheme: "shmolli" or "molli", the scheme actually used.
        rr_interval_ms: the T_RR used by the ShMOLLI rule (None for MOLLI).
    """

    t1_ms: np.ndarray
    a: np.ndarray
    b: np.ndarray
    t1_star_ms: np.ndarray
    r2: np.ndarray
    n_samples_used: np.ndarray
    signs: np.ndarray
    fitted: np.ndarray
    scheme: str
    rr_interval_ms: float | None = None


def detect_scheme(ti_ms) -> str:
    """"shmolli" when 7 TIs look like ShMOLLI 5(1)1(1)1, else "molli".

    ShMOLLI, sorted: three short TIs then four more spaced by one RR after the first
    (``TI[3]-TI[0] ~ TI[4]-TI[3] ~ ...``, within 25 %).
    """
    t = np.sort(np.asarray(ti_ms, float))
    if t.size != 7:
        return "molli"
    gaps = np.array([t[3] - t[0], t[4] - t[3], t[5] - t[4], t[6] - t[5]])
    if gaps.min() <= 0:
        return "molli"
    regular = (gaps.max() - gaps.min()) <= 0.25 * gaps.mean()
    short = t[2] < t[3] and t[2] - t[0] < 0.5 * gaps.mean()
    return "shmolli" if regular and short else "molli"


def shmolli_rr_ms(ti_sorted_ms) -> float:
    """T_RR for the ShMOLLI rule: mean of the four inversion-1 gaps of the sorted TIs (ms)."""
    t = np.asarray(ti_sorted_ms, float)
    return float(np.mean([t[3] - t[0], t[4] - t[3], t[5] - t[4], t[6] - t[5]]))


def phase_signs(ir_phase: np.ndarray, ti_ms, grey_zone: float = PHASE_GREY_ZONE) -> np.ndarray:
    """Confident signs from phase images.

    Args:
        ir_phase: ``(n, ...)`` phase in radians, same order as ``ti_ms``.
        ti_ms: ``(n,)`` inversion times; the longest-TI image is the positive reference.
        grey_zone: half-width of the undecided zone around pi/2, as a fraction of pi/2.

    Returns:
        ``(n, ...)`` int8: -1 where ``|dphi| > pi/2 (1 + grey_zone)``, +1 where
        ``|dphi| < pi/2 (1 - grey_zone)``, 0 in between (left to the fit).
    """
    ph = np.asarray(ir_phase, np.float32)
    ref = int(np.argmax(np.asarray(ti_ms, float)))
    # |dphi| against the zone's edges through cos(dphi): even and 2 pi-periodic, so no wrapping
    # (4-10x faster than wrapping the difference; the same signs)
    c = np.cos(ph - ph[ref])
    out = np.zeros(ph.shape, np.int8)
    out[c < np.cos(0.5 * np.pi * (1 + grey_zone))] = -1
    out[c > np.cos(0.5 * np.pi * (1 - grey_zone))] = 1
    return out


def _basis(ti: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W (G, m): centred unit-norm exp(-TI/g) per grid value; norms (G,) before normalising."""
    e = np.exp(-ti[None, :] / grid[:, None])
    ec = e - e.mean(axis=1, keepdims=True)
    nrm = np.linalg.norm(ec, axis=1)
    ok = nrm > 1e-9
    w = np.zeros_like(ec)
    w[ok] = ec[ok] / nrm[ok, None]
    return w, nrm


def _closed_form_ab(y: np.ndarray, ti: np.ndarray, t1s: np.ndarray):
    """Least-squares (A, B) for fixed T1* per pixel. y (m, P), t1s (P,). Returns A, B, SSR."""
    e = np.exp(-ti[:, None] / t1s[None, :])
    ec = e - e.mean(axis=0)
    yc = y - y.mean(axis=0)
    den = np.maximum((ec * ec).sum(axis=0), 1e-30)
    b = -(ec * yc).sum(axis=0) / den
    a = y.mean(axis=0) + b * e.mean(axis=0)
    r = y - (a - b * e)
    return a, b, (r * r).sum(axis=0)


def _lm_refine(y, ti, a, b, t1s, n_iter):
    """Vectorised Levenberg-Marquardt on (A, B, log T1*). y (m, P). Returns A, B, T1*, SSR."""
    logt = np.log(np.maximum(t1s, 1e-3))
    tcol = ti[:, None]
    m = float(y.shape[0])
    e = np.exp(-tcol / np.exp(logt))
    r = y - (a - b * e)
    cur = (r * r).sum(axis=0)
    lam = np.full(a.shape, 1e-3)
    for _ in range(n_iter):
        jl = (b / np.exp(logt)) * e * tcol  # minus d model / d log T1*
        # normal equations (J^T J + lam diag) step = J^T r with J = [1, -e, -jl]; the 3x3
        # symmetric system is solved in closed form (Cramer) for every pixel at once
        h00 = m * (1.0 + lam)
        h01, h02 = -e.sum(0), -jl.sum(0)
        h11 = (e * e).sum(0) * (1.0 + lam)
        h12 = (e * jl).sum(0)
        h22 = (jl * jl).sum(0) * (1.0 + lam)
        g0, g1, g2 = r.sum(0), -(e * r).sum(0), -(jl * r).sum(0)
        c00 = h11 * h22 - h12 * h12
        c01 = h02 * h12 - h01 * h22
        c02 = h01 * h12 - h02 * h11
        c11 = h00 * h22 - h02 * h02
        c12 = h01 * h02 - h00 * h12
        c22 = h00 * h11 - h01 * h01
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = 1.0 / (h00 * c00 + h01 * c01 + h02 * c02)
            da = (c00 * g0 + c01 * g1 + c02 * g2) * inv
            db = (c01 * g0 + c11 * g1 + c12 * g2) * inv
            dl = np.clip((c02 * g0 + c12 * g1 + c22 * g2) * inv, -1.0, 1.0)
            ok = np.isfinite(da) & np.isfinite(db) & np.isfinite(dl)
            na = np.where(ok, a + da, a)
            nb = np.where(ok, b + db, b)
            nl = np.where(ok, logt + dl, logt)
            ne = np.exp(-tcol / np.exp(nl))
            nr = y - (na - nb * ne)
            new = (nr * nr).sum(axis=0)
        better = np.isfinite(new) & (new < cur)
        a = np.where(better, na, a)
        b = np.where(better, nb, b)
        logt = np.where(better, nl, logt)
        cur = np.where(better, new, cur)
        e = np.where(better, ne, e)
        r = np.where(better, nr, r)
        lam = np.where(better, lam * 0.1, lam * 10.0)
    return a, b, np.exp(logt), cur


def _fit_signed(
    mag: np.ndarray,
    ti: np.ndarray,
    conf_signs: np.ndarray | None,
    *,
    min_negative: int = 0,
    max_ti_flip_ms: float = MAX_TI_FOR_SIGN_FLIP_MS,
    grid: np.ndarray = T1STAR_GRID_MS,
    n_iter: int = LM_ITERATIONS,
) -> dict:
    """Fit the 3-parameter model with polarity search, for every pixel (column) at once.

    Args:
        mag: (m, P) magnitudes, rows sorted by ascending TI.
        ti: (m,) sorted TIs (ms).
        conf_signs: (m, P) int8 confident signs (+1, -1, 0 = unknown) or None.
        min_negative: smallest allowed number of leading negative samples.

    Returns:
        dict of (P,) arrays a, b, t1_star, ssr, k (leading negatives), valid, and the signed
        samples ``signed`` (m, P).
    """
    m, p = mag.shape
    y = np.abs(mag).astype(np.float64)
    k_max = int(np.sum(ti < max_ti_flip_ms))
    k_max = max(min(k_max, m - 1), min_negative)
    ks = np.arange(min_negative, k_max + 1)
    w, _ = _basis(ti, grid)  # (G, m)

    # candidate consistency with confident phase signs
    allowed = np.ones((ks.size, p), bool)
    if conf_signs is not None:
        cs = np.asarray(conf_signs, np.int8)
        # no confidently negative sample at all: the undecided ones are positive too
        no_neg = ~(cs < 0).any(axis=0)
        cs = np.where(no_neg[None, :] & (cs == 0), np.int8(1), cs)
        pos = (cs > 0).astype(np.int32)
        neg = (cs < 0).astype(np.int32)
        zero = np.zeros((1, p), np.int32)
        pos_before = np.concatenate([zero, np.cumsum(pos, axis=0)])  # (m+1, P)
        neg_before = np.concatenate([zero, np.cumsum(neg, axis=0)])
        # conflicts of "first k negative" with the confident signs; keep the least conflicting
        conflicts = pos_before[ks] + (neg_before[-1][None, :] - neg_before[ks])
        allowed = conflicts == conflicts.min(axis=0, keepdims=True)

    y2 = (y * y).sum(axis=0)
    ysum = y.sum(axis=0)
    w32 = w.astype(np.float32)
    y32 = y.astype(np.float32)
    # (G, P): w_g . y for every grid value and pixel. einsum, not BLAS: the inner dimension is
    # the handful of samples, and threaded BLAS is many times slower for such products
    z = np.einsum("gm,mp->gp", w32, y32)
    ysum_k = ysum.copy()
    for i in range(min_negative):  # flip the first min_negative samples
        z -= 2.0 * w32[:, i : i + 1] * y32[i : i + 1]
        ysum_k -= 2.0 * y[i]
    # best and second-best sign candidate by grid residual: the grid is coarse, so the two are
    # both refined and the lower refined residual wins (near-null samples are ambiguous)
    best_ssr = np.full(p, np.inf)
    best_k = np.full(p, min_negative, np.int64)
    second_ssr = np.full(p, np.inf)
    second_k = np.full(p, min_negative, np.int64)
    for ci, k in enumerate(ks):
        if ci > 0:  # flipping sample k-1 is a rank-1 update of w . y
            i = k - 1
            z -= 2.0 * w32[:, i : i + 1] * y32[i : i + 1]
            ysum_k -= 2.0 * y[i]
        top = np.maximum(-z.min(axis=0).astype(np.float64), 0.0)  # B > 0 <=> w.y < 0
        ssr = y2 - ysum_k * ysum_k / m - top * top
        ssr = np.where(allowed[ci], ssr, np.inf)
        better = ssr < best_ssr
        runner = ~better & (ssr < second_ssr)
        second_ssr = np.where(better, best_ssr, np.where(runner, ssr, second_ssr))
        second_k = np.where(better, best_k, np.where(runner, k, second_k))
        best_ssr = np.where(better, ssr, best_ssr)
        best_k = np.where(better, k, best_k)

    fit = _refine(y, ti, w, grid, best_k, n_iter)
    # the runner-up can only win where the samples it flips are small (near the null)
    idx = np.arange(m)[:, None]
    lo, hi = np.minimum(best_k, second_k), np.maximum(best_k, second_k)
    flipped = np.where((idx >= lo) & (idx < hi), y, 0.0).max(axis=0)
    ambiguous = np.isfinite(second_ssr) & (flipped < AMBIGUOUS_FRACTION * y.max(axis=0))
    alt = np.flatnonzero(ambiguous)
    if alt.size:
        f2 = _refine(y[:, alt], ti, w, grid, second_k[alt], n_iter)
        win = f2["ssr"] < fit["ssr"][alt]
        dst = alt[win]
        for key in ("a", "b", "t1_star", "ssr", "k"):
            fit[key][dst] = f2[key][win]
        fit["signed"][:, dst] = f2["signed"][:, win]
    t1s = fit["t1_star"]
    valid = np.isfinite(fit["a"]) & np.isfinite(fit["b"]) & np.isfinite(t1s) & (fit["a"] > 0) & (fit["b"] > 0) & (t1s > 0)
    # identifiable: the recovery must still be visible at the second-shortest TI
    valid &= np.exp(-ti[1] / np.maximum(t1s, 1e-9)) >= MIN_EXP_AT_SECOND_TI
    fit["valid"] = valid
    return fit


def _refine(y: np.ndarray, ti: np.ndarray, w: np.ndarray, grid: np.ndarray, k: np.ndarray, n_iter: int) -> dict:
    """Fit with the first ``k`` samples negative: grid optimum, parabolic step, closed-form A, B, LM.

    y (m, P) magnitudes sorted by TI, k (P,). Returns a, b, t1_star, ssr, k, signed (m, P).
    """
    m, p = y.shape
    ys = np.where(np.arange(m)[:, None] < k[None, :], -y, y)
    zz = -np.einsum("mp,gm->pg", ys, w)  # (P, G): pixel-major, for a fast argmax
    best_g = np.argmax(zz, axis=1)
    gi = np.clip(best_g, 1, grid.size - 2)
    cols = np.arange(p)
    f0, f1, f2 = zz[cols, gi - 1], zz[cols, gi], zz[cols, gi + 1]
    den = f0 - 2 * f1 + f2
    interior = (best_g > 0) & (best_g < grid.size - 1) & (den < 0)
    delta = np.where(interior, 0.5 * (f0 - f2) / np.where(den == 0, -1.0, den), 0.0)
    delta = np.clip(delta, -1.0, 1.0)
    lg = np.log(grid)
    log_t1s = np.where(interior, lg[gi] + delta * (lg[1] - lg[0]), lg[best_g])
    a, b, _ = _closed_form_ab(ys, ti, np.exp(log_t1s))
    a, b, t1s, ssr = _lm_refine(ys, ti, a, b, np.exp(log_t1s), n_iter)
    return {"a": a, "b": b, "t1_star": t1s, "ssr": ssr, "k": k.copy(), "signed": ys}


def _t1_of(fit: dict) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = fit["t1_star"] * (fit["b"] / fit["a"] - 1.0)
    return np.where(fit["valid"] & np.isfinite(t1), t1, 0.0)


def _r2_of(fit: dict) -> np.ndarray:
    ys = fit["signed"]
    sst = ((ys - ys.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - fit["ssr"] / sst
    return np.clip(np.where(np.isfinite(r2), r2, 0.0), 0.0, 1.0)


def background_mask(ir_magnitude: np.ndarray, fraction: float = BACKGROUND_FRACTION, min_mean_signal: float | None = None) -> np.ndarray:
    """``(ny, nx)`` bool: pixels worth fitting.

    A pixel is fitted when its mean magnitude over the images is at least ``min_mean_signal``
    (if given) or ``fraction`` times the 99th percentile of the pixel means.
    """
    mean = pixel_means(ir_magnitude)
    thr = min_mean_signal if min_mean_signal is not None else threshold_of_means(mean, fraction)
    return (mean >= thr) & (mean > 0)


def pixel_means(ir_magnitude: np.ndarray) -> np.ndarray:
    """``(ny, nx)`` float64 mean magnitude of each pixel over ``(n, ny, nx)`` images (NaN, inf: 0)."""
    # accumulated in float64 without a float64 copy of the stack: the same values, 1/4 the time
    return np.nan_to_num(np.abs(np.asarray(ir_magnitude)).mean(axis=0, dtype=np.float64), nan=0.0, posinf=0.0)


def background_threshold(ir_magnitude: np.ndarray, fraction: float = BACKGROUND_FRACTION) -> float:
    """The mean-magnitude threshold :func:`background_mask` applies to these images: pass it as
    ``min_mean_signal`` when fitting a window of them, so the window's pixels are chosen as they
    would be on the whole image."""
    return threshold_of_means(pixel_means(ir_magnitude), fraction)


def threshold_of_means(means: np.ndarray, fraction: float = BACKGROUND_FRACTION) -> float:
    """:func:`background_threshold` from the ``(ny, nx)`` :func:`pixel_means` image (which a
    linear resampling maps to the pixel means of the resampled images)."""
    return fraction * float(np.percentile(means, 99))


def fit_t1(
    ir_magnitude: np.ndarray,
    ti_ms,
    ir_phase: np.ndarray | None = None,
    scheme: str = "auto",
    rr_interval_ms: float | None = None,
    mask: np.ndarray | None = None,
    *,
    min_mean_signal: float | None = None,
    max_t1_ms: float = MAX_T1_MS,
    max_ti_flip_ms: float = MAX_TI_FOR_SIGN_FLIP_MS,
) -> T1Fit:
    """Fit a T1 map to Look-Locker inversion-recovery images.

    Args:
        ir_magnitude: ``(n, ny, nx)`` magnitude images (any order; any units).
        ti_ms: ``(n,)`` inversion time of each image (ms).
        ir_phase: optional ``(n, ny, nx)`` phase images (radians), same order.
        scheme: "shmolli" (needs 7 images), "molli" (all samples in one fit) or "auto"
            (:func:`detect_scheme`).
        rr_interval_ms: the RR interval for the ShMOLLI rule; None or <= 0: from the TIs.
        mask: optional ``(ny, nx)`` bool; pixels outside are not fitted.
        min_mean_signal: absolute background threshold on the pixel-mean magnitude
            (default: :data:`BACKGROUND_FRACTION` of the 99th percentile).
        max_t1_ms: T1 values are clipped to this.
        max_ti_flip_ms: samples with a longer TI are never sign-flipped.

    Returns:
        :class:`T1Fit` with ``(ny, nx)`` maps.

    Raises:
        InputError: inconsistent shapes, fewer than 4 images, or ShMOLLI without 7 images.
    """
    mag = np.asarray(ir_magnitude)
    ti = np.asarray(ti_ms, np.float64).ravel()
    if mag.ndim == 2:
        mag = mag[:, None, :]
    if mag.ndim != 3:
        raise InputError(f"IR magnitude must be (n, ny, nx), got shape {mag.shape}")
    n, ny, nx = mag.shape
    if ti.size != n:
        raise InputError(f"{n} IR images but {ti.size} inversion times")
    if n < 4:
        raise InputError(f"T1 fitting needs at least 4 IR images, got {n}")
    if not np.all(np.isfinite(ti)) or np.any(ti < 0):
        raise InputError(f"invalid inversion times {ti.tolist()}")
    if ir_phase is not None:
        ir_phase = np.asarray(ir_phase)
        if ir_phase.ndim == 2:
            ir_phase = ir_phase[:, None, :]
        if ir_phase.shape != mag.shape:
            raise InputError(f"phase images {ir_phase.shape} do not match magnitude images {mag.shape}")
    if scheme not in SCHEMES:
        raise InputError(f"unknown T1 scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    used_scheme = detect_scheme(ti) if scheme == "auto" else scheme
    if used_scheme == "shmolli" and n != 7:
        raise InputError(f"ShMOLLI needs 7 IR images, got {n}")

    order = np.argsort(ti, kind="stable")
    ts = ti[order]
    fg = background_mask(mag, min_mean_signal=min_mean_signal)
    if mask is not None:
        mk = np.asarray(mask, bool)
        if mk.shape != (ny, nx):
            raise InputError(f"mask shape {mk.shape} does not match images {(ny, nx)}")
        fg &= mk
    flat = np.abs(mag.reshape(n, -1)[:, fg.ravel()].astype(np.float64))[order]  # (n, P) sorted
    conf = None
    if ir_phase is not None:
        conf = phase_signs(ir_phase.reshape(n, -1)[:, fg.ravel()], ti)[order]
    p = flat.shape[1]

    rr_used = None
    if used_scheme == "shmolli":
        rr_used = float(rr_interval_ms) if rr_interval_ms and rr_interval_ms > 0 else shmolli_rr_ms(ts)
    parts = []
    for start in range(0, p, CHUNK_PIXELS):  # blocks of pixels keep the working set in cache
        sl = slice(start, start + CHUNK_PIXELS)
        c = None if conf is None else conf[:, sl]
        if used_scheme == "molli":
            parts.append(_molli(flat[:, sl], ts, c, max_ti_flip_ms))
        else:
            parts.append(_shmolli(flat[:, sl], ts, c, rr_used, max_ti_flip_ms))
    if parts:
        res = {k: np.concatenate([q[k] for q in parts], axis=-1) for k in parts[0]}
    else:
        res = {"a": np.zeros(0), "b": np.zeros(0), "t1_star": np.zeros(0), "t1": np.zeros(0),
               "r2": np.zeros(0), "n": np.zeros(0, np.uint8), "signs": np.ones((n, 0), np.int8)}

    def scatter(v, dtype=np.float32, fill=0):
        out = np.full(ny * nx, fill, dtype)
        out[fg.ravel()] = v
        return out.reshape(ny, nx)

    signs_sorted = np.ones((n, ny * nx), np.int8)
    signs_sorted[:, fg.ravel()] = res["signs"]
    signs = np.empty_like(signs_sorted)
    signs[order] = signs_sorted
    t1 = np.clip(res["t1"], 0.0, max_t1_ms)
    return T1Fit(
        t1_ms=scatter(t1),
        a=scatter(np.where(res["t1"] > 0, res["a"], 0.0)),
        b=scatter(np.where(res["t1"] > 0, res["b"], 0.0)),
        t1_star_ms=scatter(np.where(res["t1"] > 0, res["t1_star"], 0.0)),
        r2=scatter(res["r2"]),
        n_samples_used=scatter(res["n"], np.uint8),
        signs=signs.reshape(n, ny, nx),
        fitted=fg,
        scheme=used_scheme,
        rr_interval_ms=rr_used,
    )


def _leading_signs(k: np.ndarray, m: int) -> np.ndarray:
    """(m, P) int8: -1 for the first k[p] samples of pixel p, +1 after."""
    return np.where(np.arange(m)[:, None] < k[None, :], -1, 1).astype(np.int8)


def _molli(flat: np.ndarray, ts: np.ndarray, conf, max_ti_flip_ms: float) -> dict:
    """One fit of all samples. flat (n, P) sorted by TI."""
    f = _fit_signed(flat, ts, conf, max_ti_flip_ms=max_ti_flip_ms)
    t1 = _t1_of(f)
    ok = t1 > 0
    return {"a": f["a"], "b": f["b"], "t1_star": f["t1_star"], "t1": t1,
            "r2": np.where(ok, _r2_of(f), 0.0), "n": np.where(ok, flat.shape[0], 0).astype(np.uint8),
            "signs": _leading_signs(f["k"], flat.shape[0])}


def _shmolli(flat: np.ndarray, ts: np.ndarray, conf, t_rr: float, max_ti_flip_ms: float) -> dict:
    """The ShMOLLI conditional 5 / 6 / 7-sample fit (see the module docstring). flat (7, P) sorted."""
    p = flat.shape[1]

    def fit(nsub, cols):
        ix = list(SHMOLLI_SUBSETS[nsub])
        f = _fit_signed(flat[ix][:, cols], ts[ix], None if conf is None else conf[ix][:, cols],
                        min_negative=1 if nsub == 5 else 0, max_ti_flip_ms=max_ti_flip_ms)
        f["t1"] = _t1_of(f)
        f["chi"] = np.sqrt(np.maximum(f["ssr"], 0.0) / (nsub - 1))
        return f

    everything = np.arange(p)
    f5, f6 = fit(5, everything), fit(6, everything)
    v5, v6 = f5["valid"], f6["valid"]
    n_used = np.where(v5, 5, 0)
    t1_tmp = np.where(v5, f5["t1"], 0.0)
    chi_tmp = np.where(v5, f5["chi"], np.inf)  # no valid 5-sample fit: any valid 6 is better
    chi6 = np.where(v6, f6["chi"], 0.0)
    enter = (t1_tmp <= t_rr) | ~v6 | (f6["t1"] <= 0.4 * t_rr)
    use6 = enter & v6 & (f6["chi"] * f6["t1"] < chi_tmp * t_rr)
    n_used = np.where(use6, 6, n_used)
    t1_tmp = np.where(use6, f6["t1"], t1_tmp)
    # the 7-sample fit can only be chosen where the block was entered: fit those pixels only
    cand7 = np.flatnonzero(enter & v6 & (t1_tmp < t_rr))
    if cand7.size:
        f7 = fit(7, cand7)
        use7 = f7["valid"] & (f7["chi"] * f7["t1"] < chi6[cand7] * t_rr * 0.4)
        n_used[cand7[use7]] = 7
    else:
        f7, use7 = None, np.zeros(0, bool)

    out = {k: np.zeros(p) for k in ("a", "b", "t1_star", "t1", "r2")}
    signs = np.ones((7, p), np.int8)
    for nsub, f, cols in ((5, f5, everything), (6, f6, everything), (7, f7, cand7)):
        if f is None:
            continue
        sel = n_used[cols] == nsub  # positions within this fit
        if not sel.any():
            continue
        dst = cols[sel]
        for key in ("a", "b", "t1_star", "t1"):
            out[key][dst] = f[key][sel]
        out["r2"][dst] = _r2_of(f)[sel]
        # signs: the chosen pattern for the samples used, the fitted model's sign for the others
        a_, b_, t_ = f["a"][sel], f["b"][sel], f["t1_star"][sel]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            model = a_[None, :] - b_[None, :] * np.exp(-ts[:, None] / t_[None, :])
        s = np.where(model < 0, -1, 1).astype(np.int8)
        s[list(SHMOLLI_SUBSETS[nsub])] = _leading_signs(f["k"][sel], nsub)
        signs[:, dst] = s
    bad = out["t1"] <= 0
    n_used[bad] = 0
    out["r2"][bad] = 0.0
    out["n"] = n_used.astype(np.uint8)
    out["signs"] = signs
    return out


def restore_polarity(ir_magnitude: np.ndarray, ti_ms, ir_phase: np.ndarray | None = None, mask: np.ndarray | None = None,
                     t1_map_ms: np.ndarray | None = None, min_mean_signal: float | None = None) -> np.ndarray:
    """Signed IR images: negative before the null, positive after.

    The signs are those of an all-sample (MOLLI-style) fit of each pixel, from the phase where
    it is conclusive and by polarity search otherwise; background pixels keep their magnitude.
    Two shortcuts give the same signs without fitting every pixel:

    - with phase: a pixel whose confident phase signs (:func:`phase_signs`) are all decided and
      already of the Look-Locker form (negative for the first k TIs, positive after) takes
      them directly; only the other pixels are fitted;
    - with phase and the T1 map, pixels without a T1 (background) are not fitted;
    - without phase but with the T1 map: a sample is negative when its TI is before the
      nominal null ``TI_null = T1 * ln(B/A) / (B/A - 1)`` with ``B/A = 1.9`` (0.71 T1). Samples
      near the null are near zero, so a wrong sign there changes little.

    Args:
        ir_magnitude: ``(n, ny, nx)`` magnitudes, any order.
        ti_ms: ``(n,)`` inversion times (ms).
        ir_phase: optional ``(n, ny, nx)`` phase (radians), same order.
        mask: optional ``(ny, nx)`` bool of pixels to sign (default: above background).
        t1_map_ms: optional ``(ny, nx)`` native T1 map on the same grid (used without phase).
        min_mean_signal: the fit's background threshold (:func:`background_threshold` of the
            whole images when these are a window of them); default: from these images.

    Returns:
        ``(n, ny, nx)`` float32 signed images, in the input order.
    """
    mag = np.abs(np.asarray(ir_magnitude, np.float32))
    ti = np.asarray(ti_ms, float)
    if ir_phase is None and t1_map_ms is not None:
        t1 = np.asarray(t1_map_ms, np.float32)
        if t1.shape != mag.shape[1:]:
            raise InputError(f"T1 map {t1.shape} does not match the IR images {mag.shape[1:]}")
        ba = 1.9
        null = t1 * np.float32(np.log(ba) / (ba - 1.0))
        signs = np.where(ti[:, None, None] < null[None], -1.0, 1.0).astype(np.float32)
        return mag * signs
    if ir_phase is not None:
        conf = phase_signs(ir_phase, ti)
        order = np.argsort(ti, kind="stable")
        sorted_signs = conf[order]
        decided = np.all(sorted_signs != 0, axis=0)
        monotone = np.all(np.diff(sorted_signs.astype(np.int16), axis=0) >= 0, axis=0)
        direct = decided & monotone
        todo = ~direct if mask is None else (~direct & np.asarray(mask, bool))
        if t1_map_ms is not None:  # background (no T1) keeps its magnitude, as the fit would
            todo &= np.asarray(t1_map_ms) > 0
        signs = np.where(direct[None], conf, 1).astype(np.float32)
        if todo.any():
            fit = fit_t1(mag, ti_ms, ir_phase=ir_phase, scheme="molli", mask=todo, min_mean_signal=min_mean_signal)
            signs = np.where(todo[None], fit.signs, signs)
        if mask is not None:
            signs = np.where(np.asarray(mask, bool)[None], signs, 1)
        return (mag * signs).astype(np.float32)
    fit = fit_t1(mag, ti_ms, ir_phase=ir_phase, scheme="molli", mask=mask, min_mean_signal=min_mean_signal)
    return (mag * fit.signs).astype(np.float32)
