"""Lesion quantification after the VNE paper: FWHM-style thresholds and lesion burden. Pure functions.

For one slice, with a myocardium mask, a remote-myocardium ROI and an LV blood-pool-centre ROI:

- ``minimum`` = mean signal of the remote ROI; ``maximum`` = mean signal of the blood-pool ROI;
- a myocardium pixel is lesion at level ``f`` when ``signal > minimum + f * (maximum - minimum)``;
- LGE levels: FWHM 50%, FWQM 25%, FWEM 12.5%; the paper's adjusted VNE levels 35% / 20% / 10%;
- burden per patient = sum of lesion areas / sum of myocardium areas over all its slices.

The T1-map baseline marks a myocardium pixel lesion when ``T1 > mean_remote + 2 SD_remote``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exam import InputError

LGE_LEVELS = {"FWHM": 0.5, "FWQM": 0.25, "FWEM": 0.125}
VNE_ADJUSTED_LEVELS = {"FWHM": 0.35, "FWQM": 0.20, "FWEM": 0.10}
T1_BASELINE_SD = 2.0


@dataclass
class SliceQuant:
    """Lesion areas of one slice, in pixels, per threshold name."""

    myocardium_px: int
    lesion_px: dict[str, int]
    minimum: float
    maximum: float


def _check_masks(image, myocardium, remote, blood_pool=None):
    img = np.asarray(image, float)
    myo = np.asarray(myocardium, bool)
    rem = np.asarray(remote, bool)
    if img.shape != myo.shape or rem.shape != myo.shape or (blood_pool is not None and np.shape(blood_pool) != myo.shape):
        raise InputError(f"image {img.shape} and masks {myo.shape}/{rem.shape} differ in shape")
    if not myo.any():
        raise InputError("empty myocardium mask")
    if not rem.any():
        raise InputError("empty remote-myocardium ROI")
    if blood_pool is not None and not np.asarray(blood_pool, bool).any():
        raise InputError("empty blood-pool ROI")
    return img, myo, rem


def quantify_slice(image, myocardium, remote, blood_pool, levels: dict[str, float] = LGE_LEVELS) -> SliceQuant:
    """Lesion pixels at each level (see module docstring).

    Args:
        image: (H, W) LGE or VNE signal.
        myocardium, remote, blood_pool: (H, W) bool masks.
        levels: name -> fraction of the remote->blood range.
    """
    img, myo, rem = _check_masks(image, myocardium, remote, blood_pool)
    lo = float(img[rem].mean())
    hi = float(img[np.asarray(blood_pool, bool)].mean())
    lesion = {name: int(np.count_nonzero(myo & (img > lo + f * (hi - lo)))) for name, f in levels.items()}
    return SliceQuant(int(myo.sum()), lesion, lo, hi)


def lesion_masks(image, myocardium, remote, blood_pool, levels: dict[str, float] = LGE_LEVELS) -> dict[str, np.ndarray]:
    """(H, W) bool lesion masks per level, for figures."""
    img, myo, rem = _check_masks(image, myocardium, remote, blood_pool)
    lo = float(img[rem].mean())
    hi = float(img[np.asarray(blood_pool, bool)].mean())
    return {name: myo & (img > lo + f * (hi - lo)) for name, f in levels.items()}


def t1_baseline_slice(t1_map_ms, myocardium, remote, n_sd: float = T1_BASELINE_SD) -> SliceQuant:
    """T1-map thresholding baseline: lesion = myocardium with T1 > remote mean + n_sd * SD."""
    t1, myo, rem = _check_masks(t1_map_ms, myocardium, remote)
    mu, sd = float(t1[rem].mean()), float(t1[rem].std())
    return SliceQuant(int(myo.sum()), {"T1>2SD": int(np.count_nonzero(myo & (t1 > mu + n_sd * sd)))}, mu, mu + n_sd * sd)


def patient_burden(slices: list[SliceQuant]) -> dict[str, float]:
    """Burden per level: sum of lesion areas / sum of myocardium areas over all slices."""
    if not slices:
        raise InputError("no slices to quantify")
    myo = sum(s.myocardium_px for s in slices)
    return {name: sum(s.lesion_px[name] for s in slices) / myo for name in slices[0].lesion_px}
