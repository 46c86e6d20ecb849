"""benchmarks/native_visibility.py: the native contrast of an LGE lesion, on a synthetic exam whose
lesion's T1 rise is known (pure numpy; the benchmark's figures rest on this measure)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import native_visibility as nv  # noqa: E402


def _exam(t1_rise_sd: float, seed: int = 0) -> dict:
    """One 64x64 slice: blood disc, myocardial ring, a lesion in one quadrant of the ring that
    reads 0.8 of blood in the LGE and ``t1_rise_sd`` remote SDs above remote in the T1 map."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :64]
    r = np.hypot(y - 32, x - 32)
    blood, myo = r < 10, (r >= 10) & (r < 16)
    lesion = myo & (x > 32) & (y > 32)
    remote = myo & (x < 32)
    lge = np.where(blood, 1.0, 0.0) + np.where(lesion, 0.8, 0.0)
    sd = 50.0
    t1 = np.where(blood, 1600.0, 1000.0) + rng.normal(0, sd, r.shape) + np.where(lesion, t1_rise_sd * sd, 0.0)
    return dict(lge_clean=lge[None], t1_scanner=t1[None].astype(np.float32), myo=myo[None], blood=blood[None],
                remote=remote[None], burden_true=np.float64(lesion.sum() / myo.sum()))


@pytest.mark.parametrize("rise", [0.0, 1.0, 3.0])
def test_lesion_z_reads_the_planted_t1_rise(rise):
    z = nv.lesion_z(_exam(rise))
    assert z.size > 50
    assert np.median(z) == pytest.approx(rise, abs=0.3)


def test_fwhm_burden_is_the_lesion_share_of_the_myocardium():
    ex = _exam(2.0)
    assert nv.fwhm_burden(ex["lge_clean"], ex) == pytest.approx(100 * float(ex["burden_true"]))


def test_summary_splits_visible_from_faint():
    rows = [dict(true=0.0, lge=0.5, vne=0.4, z=float("nan")), dict(true=0.0, lge=1.0, vne=1.2, z=-9.0),
            dict(true=10.0, lge=9.0, vne=8.0, z=2.0), dict(true=12.0, lge=12.0, vne=12.5, z=1.5),
            dict(true=8.0, lge=8.0, vne=1.0, z=0.3)]
    s = nv.summarise(rows, z_visible=1.0)
    assert (s["visible"]["n"], s["faint"]["n"], s["n_free"]) == (2, 1, 2)
    assert s["faint"]["ratio"] == pytest.approx(1.0 / 8.0)
    assert s["visible"]["mae"] == pytest.approx(0.75)
    assert s["r_free_visible"] > s["r_all"]
