"""Agreement statistics for VNE vs LGE, each with its exact definition. Pure functions.

- **Pearson r** with its two-sided p value (``scipy.stats.pearsonr``) and the least-squares
  regression ``vne = slope * lge + intercept`` (``scipy.stats.linregress``).
- **ICC(A,1)**: two-way model, absolute agreement, single measure (McGraw & Wong 1996, case
  2A; Shrout & Fleiss ICC(2,1)). With ``n`` subjects, ``k`` methods and the two-way ANOVA mean
  squares MSR (rows), MSC (columns), MSE (residual)::

      ICC = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)

  95% CI from McGraw & Wong's F-based approximation with Satterthwaite degrees of freedom.
- **Bland–Altman**: ``d = vne - lge``; bias = mean(d); limits of agreement = bias ± 1.96·SD(d)
  (SD with ``ddof=1``).
- **Wilcoxon signed-rank** of paired scores (``scipy.stats.wilcoxon``, two-sided, zero
  differences dropped: the ``wilcox`` zero method).
- **SSIM** inside a mask: the SSIM map of Wang et al. 2004 (Gaussian window sigma 1.5 px,
  K1 0.01, K2 0.03, data range of the reference inside the mask) averaged over the mask.
  :func:`ssim_map` and :func:`ssim_constants` are the one SSIM formula; the training loss
  (``training.losses.ssim``, torch, differentiable) uses them too, with its own documented
  convention: a fixed data range of 2 normalised PSIR units and an 11-pixel window over the
  valid region (a loss sees whole crops and needs one scale for every batch; the report compares
  one heart with its own reference range).
- **PSNR** inside a mask: ``10 log10(range^2 / MSE)`` over mask pixels, range of the reference.
- **False-positive rate**: among patients whose reference (LGE) is lesion-free, the fraction
  with VNE burden above 2% at FWHM.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from ..errors import InputError

FALSE_POSITIVE_BURDEN = 0.02


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"paired samples must be two equal 1D arrays, got {x.shape} and {y.shape}")
    if x.size < 3:
        raise InputError(f"need at least 3 pairs, got {x.size}")
    return x, y


@dataclass
class Regression:
    r: float
    p: float
    slope: float
    intercept: float
    n: int


def pearson_regression(reference, test) -> Regression:
    """Pearson r of ``test`` vs ``reference`` and the regression ``test = slope*reference + intercept``."""
    x, y = _paired(reference, test)
    if np.std(x) == 0 or np.std(y) == 0:
        return Regression(float("nan"), float("nan"), float("nan"), float("nan"), int(x.size))
    r, p = stats.pearsonr(x, y)
    lr = stats.linregress(x, y)
    return Regression(float(r), float(p), float(lr.slope), float(lr.intercept), int(x.size))


@dataclass
class ICC:
    icc: float
    ci_low: float
    ci_high: float
    n: int
    k: int


def icc_a1(ratings: np.ndarray, alpha: float = 0.05) -> ICC:
    """ICC(A,1) of an ``(n_subjects, k_methods)`` table, with its (1 - alpha) CI."""
    x = np.asarray(ratings, float)
    if x.ndim != 2 or x.shape[1] < 2 or x.shape[0] < 3:
        raise InputError(f"ICC needs an (n >= 3, k >= 2) table, got {x.shape}")
    n, k = x.shape
    grand = x.mean()
    row = x.mean(1)
    col = x.mean(0)
    msr = k * np.sum((row - grand) ** 2) / (n - 1)
    msc = n * np.sum((col - grand) ** 2) / (k - 1)
    sse = np.sum((x - row[:, None] - col[None, :] + grand) ** 2)
    mse = sse / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    icc = (msr - mse) / denom if denom > 0 else float("nan")
    if not np.isfinite(icc) or icc >= 1:
        return ICC(float(icc), float("nan"), float("nan"), n, k)
    a = k * icc / (n * (1 - icc))
    b = 1 + k * icc * (n - 1) / (n * (1 - icc))
    v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1)))
    f_lo = stats.f.ppf(1 - alpha / 2, n - 1, v)
    f_hi = stats.f.ppf(1 - alpha / 2, v, n - 1)
    lo = n * (msr - f_lo * mse) / (f_lo * (k * msc + (k * n - k - n) * mse) + n * msr)
    hi = n * (f_hi * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_hi * msr)
    return ICC(float(icc), float(lo), float(hi), n, k)


@dataclass
class BlandAltman:
    bias: float
    sd: float
    loa_low: float
    loa_high: float
    n: int


def bland_altman(reference, test) -> BlandAltman:
    """Bias and 95% limits of agreement of ``test - reference``."""
    x, y = _paired(reference, test)
    d = y - x
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return BlandAltman(bias, sd, bias - 1.96 * sd, bias + 1.96 * sd, int(d.size))


def wilcoxon_signed_rank(a, b) -> tuple[float, float]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test of paired scores."""
    x, y = _paired(a, b)
    if np.all(x == y):
        return 0.0, 1.0
    res = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_SIGMA_PX = 1.5


def ssim_constants(data_range: float) -> tuple[float, float]:
    """Wang et al.'s ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` for the dynamic range ``L``."""
    return (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2


def ssim_map(mu_x, mu_y, sxx, syy, sxy, c1: float, c2: float):
    """The SSIM of local means, variances and covariance (NumPy arrays or torch tensors alike)."""
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def ssim_in_mask(reference, test, mask, sigma: float = SSIM_SIGMA_PX) -> float:
    """Mean SSIM over ``mask`` (see module docstring)."""
    ref = np.asarray(reference, float)
    img = np.asarray(test, float)
    m = np.asarray(mask, bool)
    if ref.shape != img.shape or m.shape != ref.shape or not m.any():
        raise InputError("SSIM needs equal shapes and a non-empty mask")
    c1, c2 = ssim_constants(float(ref[m].max() - ref[m].min()) or 1.0)

    def f(a):
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=3.5)

    mu_x, mu_y = f(ref), f(img)
    sxx = f(ref * ref) - mu_x ** 2
    syy = f(img * img) - mu_y ** 2
    sxy = f(ref * img) - mu_x * mu_y
    return float(ssim_map(mu_x, mu_y, sxx, syy, sxy, c1, c2)[m].mean())


def psnr_in_mask(reference, test, mask) -> float:
    """PSNR (dB) over ``mask`` with the reference's range inside the mask."""
    ref = np.asarray(reference, float)
    img = np.asarray(test, float)
    m = np.asarray(mask, bool)
    if ref.shape != img.shape or m.shape != ref.shape or not m.any():
        raise InputError("PSNR needs equal shapes and a non-empty mask")
    mse = float(np.mean((ref[m] - img[m]) ** 2))
    rng = float(ref[m].max() - ref[m].min()) or 1.0
    return float("inf") if mse == 0 else float(10 * np.log10(rng * rng / mse))


def false_positive_rate(reference_lesion_free, test_burden_fwhm, threshold: float = FALSE_POSITIVE_BURDEN) -> tuple[float, int, int]:
    """(rate, false positives, lesion-free patients): VNE burden > ``threshold`` where LGE is lesion-free."""
    free = np.asarray(reference_lesion_free, bool)
    burden = np.asarray(test_burden_fwhm, float)
    n = int(free.sum())
    fp = int(np.count_nonzero(free & (burden > threshold)))
    return (fp / n if n else float("nan")), fp, n
