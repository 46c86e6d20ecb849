"""Signal models: bSSFP cine, MOLLI/ShMOLLI Look-Locker sampling, PSIR LGE. Pure functions.

All functions are vectorised over tissue arrays (any shape); times in ms, angles in degrees.
The inversion-recovery schemes are simulated event by event (inversions, free recovery with T1,
readout trains that drive Mz towards a steady state with the apparent T1*), so the familiar
behaviours of real sequences come out of the physics: the Look-Locker bias, the heart-rate
dependence, ShMOLLI's incomplete recovery before its 2nd and 3rd inversions, and PSIR's
robustness to a mis-set TI.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def bssfp_signal(t1_ms, t2_ms, pd, flip_deg: float, te_ms: float):
    """Balanced SSFP steady state, TR << T1, T2:
    ``S = PD sin(a) / ((T1/T2 + 1) - cos(a) (T1/T2 - 1)) * exp(-TE/T2)``."""
    a = np.deg2rad(flip_deg)
    ratio = np.asarray(t1_ms) / np.asarray(t2_ms)
    return pd * np.sin(a) / ((ratio + 1.0) - np.cos(a) * (ratio - 1.0)) * np.exp(-te_ms / np.asarray(t2_ms))


def readout_weight(t1_ms, t2_ms, kappa: float, flip_deg: float = 35.0) -> np.ndarray:
    """Relative image intensity a single-shot bSSFP readout gives each tissue, to the power
    ``kappa``: ``(S_bSSFP(T1, T2) / S_bSSFP(1000 ms, 50 ms)) ** kappa`` (myocardium ~1, LV blood
    ~1.9 at κ = 1). κ = 0 is a readout that sees Mz alone; κ is drawn per exam, since inflow,
    flip angle and readout order move the real ratio."""
    ref = bssfp_signal(1000.0, 50.0, 1.0, flip_deg, 0.0)
    return (bssfp_signal(t1_ms, t2_ms, 1.0, flip_deg, 0.0) / ref) ** float(kappa)


@dataclass(frozen=True)
class LookLockerScheme:
    """An inversion-recovery sampling scheme, beat by beat.

    Attributes:
        name: "ShMOLLI" or "MOLLI".
        inversions: for each inversion, (first readout beat, TI of that readout in ms, number
            of readouts on consecutive beats).
    """

    name: str
    inversions: tuple[tuple[int, float, int], ...]

    @property
    def n_beats(self) -> int:
        return max(b + n for b, _, n in self.inversions)

    @property
    def n_images(self) -> int:
        return sum(n for _, _, n in self.inversions)


def shmolli_scheme(ti_first_ms: float = 100.0, ti_step_ms: float = 80.0) -> LookLockerScheme:
    """ShMOLLI 5(1)1(1)1: 7 images in 9 heartbeats (TIs ~100, 180, 260 + RR multiples)."""
    return LookLockerScheme("ShMOLLI", ((0, ti_first_ms, 5), (6, ti_first_ms + ti_step_ms, 1), (8, ti_first_ms + 2 * ti_step_ms, 1)))


def molli_scheme(ti_first_ms: float = 100.0, ti_step_ms: float = 80.0) -> LookLockerScheme:
    """MOLLI 5(3)3: 5 images, 3 recovery beats, 3 images (8 images in 11 heartbeats)."""
    return LookLockerScheme("MOLLI", ((0, ti_first_ms, 5), (8, ti_first_ms + ti_step_ms, 3)))


def look_locker_samples(
    t1_ms,
    pd,
    scheme: LookLockerScheme,
    rr_ms: np.ndarray,
    readout_ms: float = 170.0,
    readout_rate_per_ms: float = 1.0 / 300.0,
    inversion_efficiency: float = 0.96,
):
    """Longitudinal magnetisation at the centre of each readout of an IR scheme.

    Args:
        t1_ms, pd: tissue arrays (same shape S).
        scheme: the sampling scheme.
        rr_ms: (scheme.n_beats,) RR interval of each beat (heart-rate jitter lives here).
        readout_ms: duration of each single-shot readout, centred on the sample.
        readout_rate_per_ms: extra relaxation rate during readout (1/T1* = 1/T1 + rate).
        inversion_efficiency: fraction of Mz inverted by each inversion pulse.

    Returns:
        (samples, ti_ms): ``samples`` is (n_images,) + S, signed Mz * PD, in acquisition order;
        ``ti_ms`` (n_images,) is each image's time since its own inversion (TIeff).
    """
    t1 = np.asarray(t1_ms, float)
    m0 = np.asarray(pd, float) * np.ones_like(t1)
    r_wave = np.concatenate([[0.0], np.cumsum(rr_ms)])
    events: list[tuple[float, str, float]] = []
    for first_beat, ti, n in scheme.inversions:
        t_inv = r_wave[first_beat] + 400.0 - ti  # readouts at a fixed trigger delay (400 ms)
        events.append((t_inv, "inv", 0.0))
        for b in range(first_beat, first_beat + n):
            t_s = r_wave[b] + 400.0
            events.append((t_s - readout_ms / 2, "ro_start", 0.0))
            events.append((t_s, "sample", t_s - t_inv))
            events.append((t_s + readout_ms / 2, "ro_end", 0.0))
    events.sort(key=lambda e: (e[0], e[1] != "ro_end"))
    rate_star = 1.0 / t1 + readout_rate_per_ms
    m_ss = m0 * (1.0 / t1) / rate_star  # steady state during readout
    mz = m0.copy()
    t_now = events[0][0]
    reading = False
    samples, tis = [], []
    for t, kind, ti in events:
        dt = t - t_now
        if dt > 0:
            if reading:
                mz = m_ss + (mz - m_ss) * np.exp(-dt * rate_star)
            else:
                mz = m0 + (mz - m0) * np.exp(-dt / t1)
        t_now = t
        if kind == "inv":
            mz = -inversion_efficiency * mz
        elif kind == "ro_start":
            reading = True
        elif kind == "ro_end":
            reading = False
        else:
            samples.append(mz.copy())
            tis.append(ti)
    return np.stack(samples), np.asarray(tis)


def psir_mz(t1_post_ms, pd, ti_ms: float, rr_ms: float, readout_ms: float = 160.0,
            readout_rate_per_ms: float = 1.0 / 900.0, inversion_efficiency: float = 0.96, n_cycles: int = 6):
    """Signed Mz * PD at the k-space centre of a segmented PSIR acquisition (inversion every 2 RR).

    The phase-sensitive reconstruction keeps the sign, so tissues with Mz < 0 at the readout
    are dark rather than bright.
    """
    t1 = np.asarray(t1_post_ms, float)
    m0 = np.asarray(pd, float) * np.ones_like(t1)
    rate_star = 1.0 / t1 + readout_rate_per_ms
    m_ss = m0 * (1.0 / t1) / rate_star
    period = 2.0 * rr_ms
    mz = m0.copy()
    sample = mz
    for _ in range(n_cycles):
        mz = -inversion_efficiency * mz
        pre = max(ti_ms - readout_ms / 2, 0.0)
        mz = m0 + (mz - m0) * np.exp(-pre / t1)
        mz = m_ss + (mz - m_ss) * np.exp(-(ti_ms - pre) * rate_star)
        sample = mz.copy()
        mz = m_ss + (mz - m_ss) * np.exp(-(readout_ms / 2) * rate_star)
        rest = max(period - ti_ms - readout_ms / 2, 0.0)
        mz = m0 + (mz - m0) * np.exp(-rest / t1)
    return sample


def psir_null_ti_ms(t1_post_ms: float, rr_ms: float) -> float:
    """The TI (ms) that nulls a tissue of post-contrast T1 ``t1_post_ms`` in :func:`psir_mz` (bisection)."""
    one = np.array([1.0])

    def mz(ti):
        return float(psir_mz(np.array([t1_post_ms]), one, ti, rr_ms)[0])

    lo, hi = 50.0, min(1500.0, 2.0 * rr_ms - 200.0)
    if mz(lo) >= 0 or mz(hi) <= 0:
        return float(t1_post_ms * np.log(2))
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mz(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)
