"""One synthetic HCM exam: native cine, ShMOLLI/MOLLI IR images and T1 map, PSIR LGE, truth.

:func:`simulate_case` is deterministic per (seed, case index) and returns the images as a
scanner would deliver them (:class:`vne.exam.data.MRImage`, with roles, geometry and Siemens- or
Gadgetron-style meta in one of several spellings) and the ground truth per slice on the T1 grid.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..exam.data import MRImage, Role
from ..t1 import fit_t1
from . import anatomy, signals, tissue
from .anatomy import T
from .scanner import HeartFrame, acquire, coil_shading, local_coordinates, sample_short_axis, scan_geometry, smooth_phase

SIMULATOR_VERSION = "2.3"
SLICE_LEVELS = ("basal", "mid", "apical")
DIASTOLE_PHASE = 0.75  # T1 mapping and LGE are triggered in mid-diastole


@dataclass
class SliceTruth:
    """Ground truth of one slice on the T1 grid (masks (H, W) bool)."""

    slice_index: int
    level: str
    myocardium: np.ndarray
    blood_pool: np.ndarray
    remote: np.ndarray
    lesion: np.ndarray
    fibrosis: np.ndarray  # (H, W) float fibrosis fraction
    lesion_burden: float  # lesion area / myocardium area
    lge_clean: np.ndarray  # (H, W) artefact-free, registered PSIR on the T1 grid
    lge_artefacts: list[str] = field(default_factory=list)
    lge_myocardium: np.ndarray | None = None  # the LGE's own masks (it may be misregistered)
    lge_blood_pool: np.ndarray | None = None
    lge_remote: np.ndarray | None = None


@dataclass
class SimulatedCase:
    case_id: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    field_t: float
    scheme: str
    phenotype: str
    lesion_free: bool
    heart_rate_bpm: float
    images: list[MRImage]
    truth: list[SliceTruth]
    meta_style: str
    family: str = "A"

    @property
    def lesion_burden(self) -> float:
        """Patient burden: sum of lesion areas / sum of myocardium areas over all slices."""
        myo = sum(int(t.myocardium.sum()) for t in self.truth)
        return sum(int(t.lesion.sum()) for t in self.truth) / max(myo, 1)


@dataclass(frozen=True)
class SimFamily:
    """The ranges a simulated exam is drawn from. Two families exist (:data:`FAMILIES`):

    * ``"A"`` (training): wide on purpose, so that our simulator is one sample of many: heart
      rates 40-120 bpm, ShMOLLI and MOLLI, 1.5 T and 3 T, acquired resolution 1.3-2.6 mm, cine
      frame counts 16-40, noise over a wide range, cine-to-T1 misregistration up to 3 mm.
    * ``"B"`` (held out, never trained on): deliberately different settings, to measure how much
      of the model's skill is tied to family A: more MOLLI, more 3 T, finer T1 matrices, other
      noise, anatomy and timing ranges. The gap between A's test split and B is the
      generalisation figure in the model card (``benchmarks/family_gap.py``).
    """

    name: str
    heart_rate_bpm: tuple[float, float]
    p_shmolli: float
    p_1p5t: float
    ti_first_ms: tuple[float, float]
    t1_spacing_mm: tuple[float, float]     # the T1 grid: 0.9375 mm half the time, else drawn here
    t1_acquired_mm: tuple[float, float]    # acquired resolution of the T1 mapping images
    ir_snr: tuple[float, float]
    cine_spacing_mm: tuple[float, float]
    cine_phases: tuple[int, int]           # inclusive
    cine_cnr: tuple[float, float]
    cine_misregistration_mm: float         # in-plane shift of the cine, uniform in a disk
    ir_readout_weight: tuple[float, float]  # exponent κ of the bSSFP readout weighting of the IR images
    wall_scale: tuple[float, float]        # multiplies the drawn wall thicknesses
    rv_scale: tuple[float, float]          # multiplies the drawn RV depth
    meta_styles: tuple[str, ...]


FAMILIES = {
    "A": SimFamily("A", heart_rate_bpm=(40, 120), p_shmolli=0.7, p_1p5t=0.6, ti_first_ms=(90, 115),
                   t1_spacing_mm=(0.85, 1.45), t1_acquired_mm=(1.3, 2.6), ir_snr=(15, 80),
                   cine_spacing_mm=(1.3, 2.6), cine_phases=(16, 40), cine_cnr=(15, 80),
                   cine_misregistration_mm=3.0, ir_readout_weight=(0.0, 1.3), wall_scale=(0.8, 1.25), rv_scale=(0.8, 1.6),
                   meta_styles=("siemens", "siemens_lower", "gadgetron")),
    "B": SimFamily("B", heart_rate_bpm=(45, 110), p_shmolli=0.4, p_1p5t=0.4, ti_first_ms=(100, 130),
                   t1_spacing_mm=(1.0, 1.3), t1_acquired_mm=(1.6, 2.4), ir_snr=(20, 50),
                   cine_spacing_mm=(1.6, 2.2), cine_phases=(20, 30), cine_cnr=(20, 45),
                   cine_misregistration_mm=2.0, ir_readout_weight=(0.5, 1.1), wall_scale=(0.9, 1.15), rv_scale=(1.0, 1.4),
                   meta_styles=("siemens_lower", "gadgetron")),
}
DEFAULT_FAMILY = "A"


def _uid(*parts) -> str:
    """A deterministic DICOM-style UID from the given parts."""
    h = int(hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:24], 16)
    return f"1.2.826.0.1.3680043.10.1089.{h}"


# Series descriptions in the spellings seen on scanners; one set is drawn per case.
_NAMES = {
    "cine": ("cine_tf2d_SAX", "CINE_segmented_SAX", "SAX_cine_retro", "cine_bSSFP_sax", "tf2d15_retro_SAX"),
    "shmolli": ("ShMOLLI_192i_e11", "ShMOLLI_192i", "ShMOLLI_SAX_192i_e11"),
    "molli": ("MOLLI_5(3)3_192i", "T1_MOLLI_SAX", "MOLLI_SAX_5(3)3"),
    "lge": ("LGE_PSIR_SAX", "de_psir_tfl_SAX", "PSIR_SAX_10min", "LGE_SAX_PSIR"),
}


def simulate_case(seed: int, index: int, field_t: float | None = None, family: str = DEFAULT_FAMILY) -> SimulatedCase:
    """Simulate case ``index`` of the set drawn with ``seed`` from ``family`` (:data:`FAMILIES`).

    Args:
        field_t: 1.5 or 3; drawn at random (the family's share of 1.5 T) when None.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown simulator family {family!r} (known: {', '.join(FAMILIES)})")
    fam = FAMILIES[family]
    rng = np.random.default_rng([seed, index, 20210] + ([] if family == "A" else [ord(c) for c in family]))
    if field_t is None:
        field_t = 1.5 if rng.random() < fam.p_1p5t else 3.0
    phenotype = str(rng.choice(anatomy.PHENOTYPES, p=(0.15, 0.4, 0.25, 0.2)))
    hcm = phenotype != "normal"
    lesion_free = (not hcm) or rng.random() < 0.3
    tag = "" if family == "A" else family
    case_id = f"sim{tag}{seed:04d}-{index:05d}"
    patient_id = f"VNE-SIM{tag}-{seed:04d}-{index:05d}"
    study_uid = _uid("study", seed, index)
    for_uid = _uid("for", seed, index)
    tis = tissue.sample_tissue(rng, field_t, hcm)
    hr = float(rng.uniform(*fam.heart_rate_bpm))
    rr = 60000.0 / hr
    ti_first = rng.uniform(*fam.ti_first_ms)
    scheme = signals.shmolli_scheme(ti_first) if rng.random() < fam.p_shmolli else signals.molli_scheme(ti_first)
    meta_style = str(rng.choice(fam.meta_styles))
    names = {k: str(rng.choice(v)) for k, v in _NAMES.items()}
    t1_name = names["shmolli" if scheme.name == "ShMOLLI" else "molli"]

    n_slices = int(rng.choice((1, 2, 3), p=(0.2, 0.2, 0.6)))
    levels = [SLICE_LEVELS[k] for k in sorted(rng.choice(3, n_slices, replace=False))]
    normal, e_u, e_v = sample_short_axis(rng)
    heart_centre = rng.normal(0, 25, 3)
    gap = rng.uniform(10, 20)

    # One protocol per case: grids differ between scans, as on real scanners.
    t1_spacing = float(rng.choice((0.9375, rng.uniform(*fam.t1_spacing_mm))))
    t1_fov = rng.uniform(300, 380)
    t1_aspect = float(rng.choice((0.75, rng.uniform(0.7, 0.9))))
    cine_spacing = rng.uniform(*fam.cine_spacing_mm)
    cine_fov, cine_aspect = rng.uniform(300, 380), rng.uniform(0.7, 0.95)
    lge_spacing = float(rng.choice((rng.uniform(1.4, 1.5), rng.uniform(0.7, 0.8))))
    lge_fov, lge_aspect = rng.uniform(300, 380), rng.uniform(0.7, 0.95)
    n_phases = int(rng.integers(fam.cine_phases[0], fam.cine_phases[1] + 1))
    cine_flip = rng.uniform(45, 60)
    plane_rot = rng.uniform(-np.pi, np.pi)

    images: list[MRImage] = []
    truth: list[SliceTruth] = []
    shared = dict(study_uid=study_uid, frame_of_reference_uid=for_uid, patient_id=patient_id, rr_interval_ms=rr)
    for s, level in enumerate(levels):
        offset = (SLICE_LEVELS.index(level) - 1) * gap
        frame = HeartFrame(heart_centre + offset * normal + rng.normal(0, 2, 3) * 0.3, e_u, e_v)
        heart = anatomy.sample_heart(rng, phenotype, level, lesion_free)
        wall = rng.uniform(*fam.wall_scale)
        heart.wall_base_mm *= wall
        heart.wall_max_mm *= wall
        heart.rv_depth_mm *= rng.uniform(*fam.rv_scale)
        rot = plane_rot + (rng.normal(0, 0.05) if rng.random() < 0.7 else rng.uniform(-np.pi, np.pi))

        # --- T1 mapping: IR magnitude + phase, then the project's own fit -> T1 map
        g_t1 = scan_geometry(frame, rng, spacing_mm=t1_spacing, fov_x_mm=t1_fov, aspect=t1_aspect, rotation_rad=rot)
        u, v = local_coordinates(g_t1, frame)
        # the diastolic anatomy on the T1 grid, reused for the IR signals, the truth and the clean LGE
        t1_grid = anatomy.tissue_fractions(heart, u, v, DIASTOLE_PHASE, t1_spacing)
        fr, fib, _ = t1_grid
        texture = anatomy._smooth_texture(u, v, heart.texture_seed + 1, 12.0)
        shade = coil_shading(u, v, rng, rng.uniform(0.3, 0.8))
        acq_t1 = (min(1.0, t1_spacing / rng.uniform(*fam.t1_acquired_mm)),) * 2
        rr_beats = rr * (1 + rng.normal(0, 0.04, scheme.n_beats))
        ll_rate = 1.0 / rng.uniform(900, 1800)  # readout-driven Look-Locker rate
        inv_eff = rng.uniform(0.975, 0.995)
        t1_true, t2_map, pd_map, ecv_map = _property_maps(tis, fr, fib, texture)
        samples, ti_ms = signals.look_locker_samples(t1_true, pd_map, scheme, rr_beats, readout_rate_per_ms=ll_rate, inversion_efficiency=inv_eff)
        # The single-shot bSSFP readout weights each tissue by its T2/T1 (and inflowing blood is
        # not saturated by earlier readouts): on scanners the LV blood is 1.5-2.5x brighter than
        # myocardium in MOLLI/ShMOLLI images. A per-pixel gain leaves the fitted T1 unchanged.
        samples = samples * signals.readout_weight(t1_true, t2_map, rng.uniform(*fam.ir_readout_weight))
        snr = rng.uniform(*fam.ir_snr)
        sigma = 1.0 / snr
        bg_phase = smooth_phase(u, v, rng)
        gain_ir = rng.uniform(40, 200)
        mags, phs = [], []
        for k in range(samples.shape[0]):
            z = acquire(samples[k] * shade * np.exp(1j * bg_phase), rng, acquired_fraction=acq_t1, noise_sigma=sigma)
            mags.append(np.abs(z) * gain_ir)
            phs.append(np.angle(z))
        mags, phs = np.stack(mags), np.stack(phs)
        body = fr[T["air"]] < 0.5  # the scanner map is zero in air; fitting only the body halves the cost
        fit = fit_t1(mags, ti_ms, ir_phase=phs, scheme="shmolli" if scheme.name == "ShMOLLI" else "molli",
                     rr_interval_ms=rr, mask=body)
        t1_map = np.where(fit.t1_ms > 0, fit.t1_ms, 0.0).astype(np.float32)
        ir_order = np.argsort(ti_ms, kind="stable")
        for k in ir_order:
            for role, px in ((Role.IR_MAGNITUDE, mags[k]), (Role.IR_PHASE, phs[k])):
                images.append(MRImage(
                    pixels=px.astype(np.float32), geometry=g_t1, role=role, series_description=t1_name,
                    inversion_time_ms=float(round(ti_ms[k])), trigger_time_ms=400.0, source=case_id,
                    meta={"slice": s, "contrast": int(k), "scheme": scheme.name}, **shared))
        images.append(MRImage(pixels=t1_map, geometry=g_t1, role=Role.T1_MAP, series_description=f"{t1_name}_T1MAP",
                              trigger_time_ms=400.0, source=case_id, meta={"slice": s, "scheme": scheme.name}, **shared))

        # --- cine: bSSFP through the cycle, its own grid
        # the cine is a separate breath-hold: the heart may sit a few mm elsewhere
        shift = fam.cine_misregistration_mm * np.sqrt(rng.random()) * np.exp(2j * np.pi * rng.random())
        frame_cine = frame.moved((shift.real, shift.imag), 0.0)
        g_cine = scan_geometry(frame_cine, rng, spacing_mm=cine_spacing, fov_x_mm=cine_fov, aspect=cine_aspect,
                               rotation_rad=rot + (0 if rng.random() < 0.6 else rng.normal(0, 0.3)),
                               through_plane_mm=rng.uniform(-2.5, 2.5))
        uc, vc = local_coordinates(g_cine, frame_cine)
        bg = anatomy.background_fractions(heart, uc, vc, cine_spacing)
        tex_c = anatomy._smooth_texture(uc, vc, heart.texture_seed + 1, 12.0)
        shade_c = coil_shading(uc, vc, rng, rng.uniform(0.3, 0.8))
        cnr = rng.uniform(*fam.cine_cnr)
        gain_c = rng.uniform(200, 1500)
        k_b, k_m = T["lv_blood"], T["lv_myocardium"]
        sb = signals.bssfp_signal(tis.t1_ms[k_b], tis.t2_ms[k_b], tis.pd[k_b], cine_flip, 1.5)
        sm = signals.bssfp_signal(tis.t1_ms[k_m], tis.t2_ms[k_m], tis.pd[k_m], cine_flip, 1.5)
        cine_sigma = (sb - sm) / cnr
        # only the heart moves: the static background signal is computed once
        near = np.hypot(uc, vc) < anatomy.heart_radius_mm(heart)
        sig_static = signals.bssfp_signal(*_property_maps(tis, bg, np.zeros(uc.shape, np.float32), tex_c)[:3], cine_flip, 1.5)
        bg_near, u_near, v_near, tex_near = bg[:, near], uc[near], vc[near], tex_c[near]
        cine_acq = (rng.uniform(0.8, 1.0), 1.0)
        for p in range(n_phases):
            ph = p / n_phases
            fr_near = bg_near.copy()
            fib_near, _ = anatomy._paint_heart(heart, u_near, v_near, ph, cine_spacing, fr_near)
            t1c, t2c, pdc, _ = _property_maps(tis, fr_near, fib_near, tex_near)
            sig = sig_static.copy()
            sig[near] = signals.bssfp_signal(t1c, t2c, pdc, cine_flip, 1.5)
            z = acquire(sig * shade_c, rng, acquired_fraction=cine_acq, noise_sigma=cine_sigma)
            images.append(MRImage(
                pixels=(np.abs(z) * gain_c / max(sb, 1e-6)).astype(np.float32), geometry=g_cine, role=Role.CINE,
                series_description=names["cine"], trigger_time_ms=float(round(ph * rr, 1)), source=case_id,
                meta={"slice": s, "phase": p}, **shared))

        # --- LGE: PSIR ~10 min after gadolinium, with misregistration, TI errors, ghosts
        moved = frame.moved(rng.normal(0, 1.5, 2), rng.normal(0, np.deg2rad(2)))
        g_lge = scan_geometry(moved, rng, spacing_mm=lge_spacing, fov_x_mm=lge_fov, aspect=lge_aspect,
                              rotation_rad=rot + (0 if rng.random() < 0.7 else rng.normal(0, 0.3)),
                              through_plane_mm=rng.uniform(-2.0, 2.0))
        # the LGE grid is defined in the scanner frame, the heart moved: evaluate with `moved`
        artefacts: list[str] = []
        k_m = T["lv_myocardium"]
        myo_post = float(tissue.post_contrast_t1_ms(tis, tis.t1_ms[k_m], tis.ecv[k_m]))
        ti_null = signals.psir_null_ti_ms(myo_post, rr)
        ti_err = rng.normal(0, 10) if rng.random() < 0.75 else rng.choice((-1, 1)) * rng.uniform(30, 80)
        if abs(ti_err) >= 30:
            artefacts.append(f"TI mis-set by {ti_err:+.0f} ms")
        ghost = rng.random() < 0.25
        if ghost:
            artefacts.append("breathing ghosts")
        ul, vl = local_coordinates(g_lge, moved)
        lge_img = _psir_image(tis, heart, ul, vl, lge_spacing, ti_null + ti_err, rr)
        shade_l = coil_shading(ul, vl, rng, rng.uniform(0.2, 0.6))
        # noise from the blood-pool SNR of clinical PSIR (15-35)
        k_b = T["lv_blood"]
        blood_post = float(tissue.post_contrast_t1_ms(tis, tis.t1_ms[k_b], tis.ecv[k_b]))
        blood_signal = abs(float(signals.psir_mz(np.array([blood_post]), np.array([tis.pd[k_b]]), ti_null + ti_err, rr)[0]))
        psir_snr = rng.uniform(15, 35)
        z = acquire(lge_img * shade_l, rng, acquired_fraction=(min(1.0, lge_spacing / 1.45),) * 2,
                    noise_sigma=blood_signal / psir_snr,
                    ghost_amplitude=rng.uniform(0.3, 0.9) if ghost else 0.0, ghost_period=int(rng.integers(3, 9)))
        gain_l = rng.uniform(500, 2000)
        images.append(MRImage(
            pixels=(z.real * gain_l).astype(np.float32), geometry=g_lge, role=Role.LGE, series_description=names["lge"],
            inversion_time_ms=float(round(ti_null + ti_err)), trigger_time_ms=400.0, source=case_id,
            meta={"slice": s}, **shared))

        # --- truth on the T1 grid: native masks (registered to the T1 map) for T1 and VNE, and
        # the LGE's own masks (the heart where the LGE saw it) for quantifying the LGE
        myo, blood, remote, fib_t, _ = _truth_masks(heart, u, v, t1_spacing, anatomy_on_grid=t1_grid)
        lesion = myo & (fib_t >= 0.5)
        ul1, vl1 = local_coordinates(g_t1, moved)
        lmyo, lblood, lremote, _, _ = _truth_masks(heart, ul1, vl1, t1_spacing)
        clean = _psir_image(tis, heart, u, v, t1_spacing, ti_null, rr, anatomy_on_grid=t1_grid, texture=texture) * gain_l
        truth.append(SliceTruth(
            slice_index=s, level=level, myocardium=myo, blood_pool=blood, remote=remote, lesion=lesion,
            fibrosis=fib_t, lesion_burden=float(lesion.sum() / max(myo.sum(), 1)),
            lge_clean=clean.astype(np.float32), lge_artefacts=artefacts,
            lge_myocardium=lmyo, lge_blood_pool=lblood, lge_remote=lremote))
    return SimulatedCase(
        case_id=case_id, patient_id=patient_id, study_uid=study_uid, frame_of_reference_uid=for_uid,
        field_t=field_t, scheme=scheme.name, phenotype=phenotype, lesion_free=lesion_free,
        heart_rate_bpm=hr, images=images, truth=truth, meta_style=meta_style, family=family)


def _property_maps(tis: tissue.CaseTissue, fr: np.ndarray, fib: np.ndarray, texture: np.ndarray):
    """Partial-volume-weighted (t1_ms, t2_ms, pd, ecv) maps from tissue fractions.

    The LV myocardium uses its per-pixel fibrosis-dependent values; T1 and T2 are combined as
    rates (weighted by fraction), PD and ECV linearly.
    """
    myo_t1, myo_t2, myo_pd, myo_ecv = tissue.myocardium_maps(tis, fib, texture)
    k = T["lv_myocardium"]
    props = np.stack([1.0 / tis.t1_ms, 1.0 / tis.t2_ms, tis.pd, tis.ecv]).astype(np.float32)  # (4, n_tissues)
    r1, r2, pd, ecv = (props @ fr.reshape(fr.shape[0], -1)).reshape((4,) + fr.shape[1:])  # one GEMM
    w = fr[k]
    r1 = r1 + w * (1.0 / myo_t1 - props[0, k])
    r2 = r2 + w * (1.0 / myo_t2 - props[1, k])
    pd = pd + w * (myo_pd - props[2, k])
    ecv = ecv + w * (myo_ecv - props[3, k])
    return 1.0 / np.maximum(r1, 1e-6), 1.0 / np.maximum(r2, 1e-6), pd, ecv


def _psir_image(tis, heart, u, v, pixel_mm, ti_ms, rr, anatomy_on_grid=None, texture=None) -> np.ndarray:
    """Ideal signed PSIR image (no noise) on a grid given by heart-local (u, v), fat scaled by
    the case's ``lge_fat_scale`` (:func:`tissue.lge_proton_density`).

    ``anatomy_on_grid`` / ``texture``: the diastolic :func:`anatomy.tissue_fractions` and texture
    of these same points, when the caller has them already.
    """
    fr, fib, _ = anatomy_on_grid or anatomy.tissue_fractions(heart, u, v, DIASTOLE_PHASE, pixel_mm)
    if texture is None:
        texture = anatomy._smooth_texture(u, v, heart.texture_seed + 1, 12.0)
    t1n, t2, pd, ecv = _property_maps(dataclasses.replace(tis, pd=tissue.lge_proton_density(tis)), fr, fib, texture)
    t1p = tissue.post_contrast_t1_ms(tis, t1n, ecv)
    return signals.psir_mz(t1p, pd, ti_ms, rr) * np.exp(-3.0 / t2)


def _truth_masks(heart, u, v, pixel_mm, anatomy_on_grid=None):
    """(myocardium, blood-pool centre, remote ROI, fibrosis, rho) on a grid given by heart-local (u, v).

    Myocardium: LV myocardium fraction > 0.5. Blood-pool centre: pure blood within half the cavity
    radius (away from the papillary muscles). Remote: the mid-wall (transmural depth 0.25-0.75,
    away from partial volume) of the 60-degree sector with the least fibrosis, as an analyst
    would draw it. ``anatomy_on_grid``: the diastolic :func:`anatomy.tissue_fractions` of these
    points, when the caller has it already.
    """
    fr, fib, rho = anatomy_on_grid or anatomy.tissue_fractions(heart, u, v, DIASTOLE_PHASE, pixel_mm)
    myo = fr[T["lv_myocardium"]] > 0.5
    pure = fr[T["lv_myocardium"]] > 0.95
    blood = fr[T["lv_blood"]] > 0.95
    r = np.hypot(u, v)
    centre = blood & (r < 0.5 * heart.r_endo_mm * (1 - heart.ejection * anatomy.contraction(heart, DIASTOLE_PHASE)))
    blood = centre if centre.sum() >= 4 else blood
    theta = np.arctan2(v, u)
    mid = pure & (rho > 0.25) & (rho < 0.75)
    best, best_score = None, np.inf
    for c in np.linspace(-np.pi, np.pi, 24, endpoint=False):
        sector = mid & (np.abs(np.angle(np.exp(1j * (theta - c)))) < np.pi / 6)
        if sector.sum() < 5:
            continue
        score = float(fib[sector].max())
        if score < best_score:
            best, best_score = sector, score
    remote = best if best is not None else (mid if mid.sum() >= 5 else myo)
    clean = remote & (fib < 0.05)
    return myo, blood, (clean if clean.sum() >= 5 else remote), fib, rho
