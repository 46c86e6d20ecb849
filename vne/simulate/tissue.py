"""Tissue relaxation properties per case, from literature values with spread.

Values are the *true* T1 (ms): the ShMOLLI fitter then reads about 4% low, as on scanners, by
the Look-Locker physics in :mod:`vne.simulate.signals`, not by a fudge factor. Sources:
``../shared/docs/physics.md``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import TISSUES

# (T1 at 1.5 T, T1 at 3 T, T2 ms, proton density, ECV) of each tissue; myocardium is per pixel.
_NOMINAL = {
    "air": (1000.0, 1000.0, 1.0, 0.0, 0.0),
    "fat": (260.0, 380.0, 80.0, 0.9, 0.1),
    "muscle": (1000.0, 1420.0, 35.0, 0.75, 0.15),
    "soft": (1100.0, 1400.0, 60.0, 0.8, 0.2),
    "lung": (1200.0, 1300.0, 30.0, 0.12, 0.3),
    "liver": (580.0, 810.0, 45.0, 0.75, 0.28),
    "aorta": (1580.0, 1950.0, 250.0, 0.95, 0.58),
    "pericardial_fat": (260.0, 380.0, 80.0, 0.9, 0.1),
    "rv_wall": (1000.0, 1210.0, 52.0, 0.8, 0.25),
    "rv_blood": (1580.0, 1950.0, 250.0, 0.95, 0.58),
    "lv_myocardium": (1000.0, 1210.0, 52.0, 0.8, 0.25),
    "lv_blood": (1580.0, 1950.0, 250.0, 0.95, 0.58),
    "papillary": (1000.0, 1210.0, 52.0, 0.8, 0.25),
}
HAEMATOCRIT = 0.42
LGE_FAT_SCALE = (0.1, 1.0)  # range of CaseTissue.lge_fat_scale (log-uniform)
FAT_TISSUES = ("fat", "pericardial_fat")
GD_RELAXIVITY = {  # r1 at 37 C, L/(mmol s): (1.5 T, 3 T)
    "gadobutrol": (4.78, 4.97),
    "gadoterate": (3.32, 3.00),
}


@dataclass
class CaseTissue:
    """Relaxation properties of one case.

    Attributes:
        t1_ms, t2_ms, pd, ecv: (len(TISSUES),) per-tissue values; the LV myocardium entry is the
            remote (non-fibrotic) myocardium.
        fibrosis_ecv: ECV of fully fibrotic myocardium.
        fibrosis_t1_gain: native T1 rises by ``t1 * gain * (ECV - ECV_remote)``.
        fibrosis_t2_ms: T2 rise of fully fibrotic myocardium.
        gd_plasma_mm: plasma gadolinium concentration at the LGE time (mmol/L).
        r1: relaxivity (L/(mmol s)).
        haematocrit: blood haematocrit.
        lge_fat_scale: multiplies the signal of fat (body wall and epicardial) in the LGE only.
            How bright fat is in PSIR LGE depends on the protocol, not on the native images:
            partial fat saturation, the echo time's fat-water phase and the readout move it
            from darker than blood to brighter. Unscaled, the PSIR physics here makes pure fat
            1.7-3.5x the blood pool; drawn log-uniform over 0.1-1.0, fat reads about 0.2-3.5x
            blood (median about 0.8x), so that no fat brightness, and so no bright epicardial
            rim, is something a model can learn from the native inputs.
    """

    field_t: float
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    pd: np.ndarray
    ecv: np.ndarray
    fibrosis_ecv: float
    fibrosis_t1_gain: float
    fibrosis_t2_ms: float
    gd_plasma_mm: float
    r1: float
    haematocrit: float
    agent: str
    lge_fat_scale: float = 1.0


def sample_tissue(rng: np.random.Generator, field_t: float, hcm: bool) -> CaseTissue:
    """Draw the tissue properties of one case at ``field_t`` (1.5 or 3)."""
    col = 0 if field_t < 2 else 1
    n = len(TISSUES)
    t1 = np.array([_NOMINAL[t][col] for t in TISSUES])
    t2 = np.array([_NOMINAL[t][2] for t in TISSUES])
    pd = np.array([_NOMINAL[t][3] for t in TISSUES])
    ecv = np.array([_NOMINAL[t][4] for t in TISSUES])
    t1 = t1 * rng.normal(1.0, 0.04, n)
    t2 = t2 * rng.normal(1.0, 0.05, n)
    pd = pd * rng.normal(1.0, 0.04, n)
    hct = float(np.clip(rng.normal(HAEMATOCRIT, 0.03), 0.32, 0.52))
    # Blood T1 falls with haematocrit; all blood compartments share it.
    blood_t1 = (1650.0 if col == 0 else 2000.0) * (1.0 - 0.8 * (hct - HAEMATOCRIT)) * rng.normal(1.0, 0.02)
    myo_t1 = rng.normal(1000.0, 25.0) if col == 0 else rng.normal(1210.0, 45.0)
    if hcm:
        myo_t1 += rng.normal(50.0, 20.0) if col == 0 else rng.normal(60.0, 25.0)
    myo_t2 = rng.normal(55.0, 3.0) if col == 0 else rng.normal(51.0, 3.0)
    myo_ecv = float(np.clip(rng.normal(0.25 if not hcm else 0.27, 0.03), 0.18, 0.34))
    for name in ("lv_blood", "rv_blood", "aorta"):
        k = TISSUES.index(name)
        t1[k], ecv[k] = blood_t1, 1.0 - hct
    for name in ("lv_myocardium", "papillary", "rv_wall"):
        k = TISSUES.index(name)
        t1[k], t2[k], ecv[k] = myo_t1, myo_t2, myo_ecv
    agent = "gadobutrol" if rng.random() < 0.6 else "gadoterate"
    r1 = GD_RELAXIVITY[agent][col]
    # Plasma concentration so that post-contrast blood T1 lands in ~300-450 ms.
    blood_t1_post = rng.uniform(300.0, 450.0) * (1.0 if col == 0 else 1.15)
    gd = (1000.0 / blood_t1_post - 1000.0 / blood_t1) / (r1 * (1.0 - hct))
    return CaseTissue(
        field_t=field_t, t1_ms=t1, t2_ms=t2, pd=pd, ecv=ecv,
        # Focal fibrosis ECV 35-60 % (physics.md). The native T1 rise of fibrosis is drawn over a
        # wide range on purpose: from barely visible (gain 0.15: +1.5 % at ΔECV 0.1, within the
        # T1 map's pixel noise) to conspicuous (gain 1.0: +40 % at ΔECV 0.4). Simulator 1.0 drew
        # only 0.5-1.0 with ECV 45-65 %, i.e. always +10-40 %, so its model learned "T1 high ->
        # bright" and missed lesions whose native T1 rises by a few % while they enhance strongly
        # (HCM LGE-positive segments read ~5-10 % above remote in the literature).
        fibrosis_ecv=float(rng.uniform(0.35, 0.65)),
        fibrosis_t1_gain=float(rng.uniform(0.15, 1.0)),
        fibrosis_t2_ms=float(rng.uniform(3.0, 12.0)),
        gd_plasma_mm=float(gd), r1=float(r1), haematocrit=hct, agent=agent,
        lge_fat_scale=float(np.exp(rng.uniform(np.log(LGE_FAT_SCALE[0]), np.log(LGE_FAT_SCALE[1])))),
    )


def myocardium_maps(tissue: CaseTissue, fibrosis: np.ndarray, texture: np.ndarray):
    """Per-pixel LV myocardium properties for a fibrosis fraction map.

    Args:
        fibrosis: (...) fibrosis fraction in [0, 1].
        texture: (...) smooth field in about [-1, 1] for natural T1 variation (~1.5%).

    Returns:
        (t1_ms, t2_ms, pd, ecv) arrays shaped like ``fibrosis``.
    """
    k = TISSUES.index("lv_myocardium")
    ecv0 = tissue.ecv[k]
    ecv = ecv0 + fibrosis * (tissue.fibrosis_ecv - ecv0)
    t1 = tissue.t1_ms[k] * (1.0 + tissue.fibrosis_t1_gain * (ecv - ecv0)) * (1.0 + 0.015 * texture)
    t2 = tissue.t2_ms[k] + fibrosis * tissue.fibrosis_t2_ms
    pd = tissue.pd[k] * (1.0 + 0.06 * fibrosis)
    return t1, t2, pd, ecv


def lge_proton_density(tissue: CaseTissue) -> np.ndarray:
    """(len(TISSUES),) proton density as the LGE sees it: fat scaled by ``lge_fat_scale``."""
    pd = tissue.pd.copy()
    for name in FAT_TISSUES:
        pd[TISSUES.index(name)] *= tissue.lge_fat_scale
    return pd


def post_contrast_t1_ms(tissue: CaseTissue, t1_native_ms, ecv):
    """``1/T1_post = 1/T1_native + r1 * ECV * [Gd]_plasma`` (ECV already holds the plasma share)."""
    r1_per_ms = tissue.r1 * tissue.gd_plasma_mm / 1000.0
    return 1.0 / (1.0 / np.asarray(t1_native_ms) + r1_per_ms * np.asarray(ecv))
