"""Statistics against hand-computed values and a second implementation; lesion quantification."""
import numpy as np
import pytest

from vne.evaluation import quantify, stats
from vne.errors import InputError


def test_icc_hand_computed():
    # n=4 subjects, k=2 methods. Means: rows 1.5, 3.5, 5.5, 7.5; cols 4, 5; grand 4.5.
    x = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], float)
    # MSR = 2*sum((row-grand)^2)/3 = 2*(9+1+1+9)/3 = 40/3; MSC = 4*(0.25+0.25)/1 = 2; SSE = 0 -> MSE = 0
    # ICC(A,1) = (40/3) / (40/3 + 0 + 2*(2-0)/4) = (40/3)/(43/3) = 40/43
    r = stats.icc_a1(x)
    assert r.icc == pytest.approx(40 / 43, abs=1e-12)


def test_icc_matches_pingouin():
    pg = pytest.importorskip("pingouin")
    import pandas as pd

    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 0.4, 30)
    table = np.stack([truth + rng.normal(0, 0.03, 30), truth * 0.9 + rng.normal(0.01, 0.04, 30)], 1)
    df = pd.DataFrame({"subject": np.repeat(np.arange(30), 2), "method": np.tile([0, 1], 30), "value": table.ravel()})
    ref = pg.intraclass_corr(df, targets="subject", raters="method", ratings="value").set_index("Type")
    ref = ref.loc["ICC(A,1)"] if "ICC(A,1)" in ref.index else ref.loc["ICC2"]
    ours = stats.icc_a1(table)
    assert ours.icc == pytest.approx(ref["ICC"], abs=1e-9)
    lo, hi = ref["CI95"]
    assert ours.ci_low == pytest.approx(lo, abs=0.01) and ours.ci_high == pytest.approx(hi, abs=0.01)


def test_bland_altman_hand_computed():
    ba = stats.bland_altman([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 2.5, 5.0])
    d = np.array([0.5, 0.5, -0.5, 1.0])
    assert ba.bias == pytest.approx(0.375)
    assert ba.sd == pytest.approx(d.std(ddof=1))
    assert ba.loa_high == pytest.approx(0.375 + 1.96 * d.std(ddof=1))


def test_pearson_and_regression():
    x = np.array([0.0, 1, 2, 3, 4])
    reg = stats.pearson_regression(x, 2 * x + 1)
    assert reg.r == pytest.approx(1.0) and reg.slope == pytest.approx(2.0) and reg.intercept == pytest.approx(1.0)


def test_wilcoxon_hand_computed():
    # differences 1, 2, 3, 4, -5: ranks 1..5, W- = 5, W+ = 10 -> statistic min = 5
    w, p = stats.wilcoxon_signed_rank([0, 0, 0, 0, 5], [1, 2, 3, 4, 0])
    assert w == 5.0 and 0 < p < 1


def test_ssim_psnr():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 40))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    assert stats.ssim_in_mask(ref, ref, mask) == pytest.approx(1.0)
    noisy = ref + rng.normal(0, 0.5, ref.shape)
    assert stats.ssim_in_mask(ref, noisy, mask) < 0.9
    rngv = ref[mask].max() - ref[mask].min()
    mse = np.mean((ref[mask] - noisy[mask]) ** 2)
    assert stats.psnr_in_mask(ref, noisy, mask) == pytest.approx(10 * np.log10(rngv ** 2 / mse))


def test_false_positive_rate():
    rate, fp, n = stats.false_positive_rate([True, True, False, True], [0.01, 0.03, 0.5, 0.0])
    assert (rate, fp, n) == (pytest.approx(1 / 3), 1, 3)


def test_quantify_thresholds_and_burden():
    img = np.zeros((10, 10))
    myo = np.zeros((10, 10), bool)
    myo[2:8, 2:8] = True  # 36 px
    remote = np.zeros_like(myo)
    remote[2:4, 2:8] = True  # signal 0
    blood = np.zeros_like(myo)
    blood[0, :] = True
    img[0, :] = 100.0  # max = 100, min = 0
    img[5, 2:8] = 60.0  # 6 px > 50 (FWHM)
    img[6, 2:8] = 30.0  # 6 px > 25 (FWQM), > 12.5
    img[7, 2:5] = 13.0  # 3 px > 12.5 (FWEM only)
    q = quantify.quantify_slice(img, myo, remote, blood, margin_px=0)
    assert q.lesion_px == {"FWHM": 6, "FWQM": 12, "FWEM": 15}
    q2 = quantify.quantify_slice(img, myo, remote, blood, margin_px=0)
    assert quantify.patient_burden([q, q2]) == {"FWHM": 12 / 72, "FWQM": 24 / 72, "FWEM": 30 / 72}
    adj = quantify.quantify_slice(img, myo, remote, blood, quantify.VNE_ADJUSTED_LEVELS, margin_px=0)
    assert adj.lesion_px["FWHM"] == 6 and adj.lesion_px["FWEM"] == 15


def test_contour_margin_excludes_partial_volume_border():
    """A ring of myocardium whose inner border pixels are half blood: with the default 1-pixel
    margin they no longer count as lesion, a real lesion deeper in the wall still does."""
    yy, xx = np.mgrid[:40, :40]
    rr = np.hypot(yy - 20, xx - 20)
    myo = (rr >= 8) & (rr < 14)
    blood = rr < 5
    img = np.where(rr < 8, 1.0, 0.0)
    from scipy import ndimage

    partial = myo & ndimage.binary_dilation(rr < 8)  # touching the cavity: half blood
    img[partial] = 0.6
    lesion = myo & (rr >= 10) & (rr < 12) & (xx > 24)
    img[lesion] = 0.9
    remote = myo & (xx < 16) & (rr >= 10)
    plain = quantify.quantify_slice(img, myo, remote, blood, margin_px=0)
    inner = quantify.quantify_slice(img, myo, remote, blood)
    assert plain.lesion_px["FWHM"] == int(partial.sum() + lesion.sum())
    assert inner.lesion_px["FWHM"] == int(lesion.sum())
    assert inner.myocardium_px < plain.myocardium_px
    # too thin to erode: the mask is kept whole rather than the slice dropped
    thin = np.zeros((5, 5), bool)
    thin[2, :] = True
    assert quantify.quantified_myocardium(thin).sum() == 5
    masks = quantify.lesion_masks(img, myo, remote, blood)
    assert masks["FWHM"].sum() == inner.lesion_px["FWHM"]


def test_t1_baseline():
    t1 = np.full((10, 10), 1000.0)
    myo = np.ones((10, 10), bool)
    remote = np.zeros_like(myo)
    remote[:5] = True
    t1[:5] = 1000 + np.tile([-10.0, 10.0], 25).reshape(5, 10)  # mean 1000, sd 10
    t1[8, :4] = 1030.0
    q = quantify.t1_baseline_slice(t1, myo, remote, margin_px=0)
    assert q.lesion_px["T1>2SD"] == 4


def test_quantify_bad_masks():
    with pytest.raises(InputError, match="empty myocardium"):
        quantify.quantify_slice(np.zeros((4, 4)), np.zeros((4, 4), bool), np.ones((4, 4), bool), np.ones((4, 4), bool))
