"""Short-axis chest anatomy as soft tissue-fraction maps in heart-local coordinates (mm).

The heart-local frame lies in the slice plane with the LV centre at the origin; angle ``theta``
is measured from +u, the interventricular septum points to ``theta = pi`` (towards the RV),
anterior is ``+pi/2`` and inferior ``-pi/2``. Shapes are smooth random perturbations of
circles and ellipses; partial volume comes from soft edges one pixel wide.

:func:`sample_heart` draws the anatomy of one slice; :func:`tissue_fractions` evaluates it at
any set of points for any cardiac phase, so that every scan (cine, T1 mapping, LGE) samples the
same object on its own grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Tissue classes, painted from the outside in (later ones cover earlier ones).
TISSUES = (
    "air", "fat", "muscle", "soft", "lung", "liver", "aorta", "pericardial_fat",
    "rv_wall", "rv_blood", "lv_myocardium", "lv_blood", "papillary",
)
T = {name: k for k, name in enumerate(TISSUES)}
PHENOTYPES = ("normal", "septal", "concentric", "apical")
# the epicardial fat layer is at most this many times its mean thickness (patches); the static
# background starts beyond the thickest patch (heart_radius_mm)
PERICARDIAL_FAT_MAX_REL = 2.0


@dataclass
class LesionBlob:
    """A region of fibrosis in myocardial coordinates (theta, transmural depth rho in [0, 1])."""

    theta: float
    rho: float
    sigma_theta: float
    sigma_rho: float
    amplitude: float
    kind: str  # "patchy", "insertion", "diffuse"


@dataclass
class HeartSlice:
    """Anatomy of one short-axis slice (diastolic dimensions in mm)."""

    phenotype: str
    r_endo_mm: float
    wall_base_mm: float
    wall_max_mm: float
    hypertrophy_theta: float
    hypertrophy_width: float
    shape_coeffs: np.ndarray  # (K, 2) Fourier cos/sin coefficients of the endocardial radius
    ejection: float  # fractional endocardial radius shortening at end systole
    end_systole: float  # fraction of the RR interval
    rv_half_angle: float  # half the angular extent of the RV attachment (rad)
    rv_depth_mm: float
    rv_wall_mm: float
    papillary: list[tuple[float, float]]  # (theta, radius_mm)
    body_axes_mm: tuple[float, float]
    body_offset_mm: tuple[float, float]
    fat_mm: float
    muscle_mm: float
    liver_centre_mm: tuple[float, float]
    liver_axes_mm: tuple[float, float]
    lung_centres_mm: list[tuple[float, float]]
    lung_axes_mm: list[tuple[float, float]]
    aorta_centre_mm: tuple[float, float]
    aorta_radius_mm: float
    pericardial_fat_mm: float  # the epicardial fat layer's mean thickness
    lesions: list[LesionBlob] = field(default_factory=list)
    texture_seed: int = 0
    # (3, 2) cos/sin coefficients of the fat layer's relative thickness around the heart: real
    # epicardial fat is patchy (thick in the grooves, absent over much of the lateral wall).
    pericardial_fat_shape: np.ndarray = field(default_factory=lambda: np.zeros((3, 2)))

    def pericardial_fat_thickness_mm(self, theta: np.ndarray) -> np.ndarray:
        """Epicardial fat thickness (mm, >= 0) at angle ``theta``."""
        k = np.arange(1, self.pericardial_fat_shape.shape[0] + 1)
        ang = np.asarray(theta)[..., None] * k
        rel = 1.0 + (np.cos(ang) * self.pericardial_fat_shape[:, 0] + np.sin(ang) * self.pericardial_fat_shape[:, 1]).sum(-1)
        return self.pericardial_fat_mm * np.clip(rel, 0.0, PERICARDIAL_FAT_MAX_REL)

    @property
    def insertion_thetas(self) -> tuple[float, float]:
        """(anterior, inferior) RV insertion point angles."""
        return (np.pi - self.rv_half_angle, -np.pi + self.rv_half_angle)


def wall_thickness_mm(h: HeartSlice, theta: np.ndarray) -> np.ndarray:
    """Diastolic LV wall thickness (mm) at angle ``theta``."""
    d = np.angle(np.exp(1j * (theta - h.hypertrophy_theta)))
    bump = np.exp(-0.5 * (d / h.hypertrophy_width) ** 2)
    return h.wall_base_mm + (h.wall_max_mm - h.wall_base_mm) * bump


def contraction(h: HeartSlice, phase: float) -> float:
    """Contraction state in [0, 1] at a fraction ``phase`` of the RR interval (1 = end systole)."""
    t = phase % 1.0
    es = h.end_systole
    if t <= es:
        return float(np.sin(0.5 * np.pi * t / es) ** 2)
    relax = 0.35
    if t <= es + relax:
        return float(np.cos(0.5 * np.pi * (t - es) / relax) ** 2)
    return 0.0


def sample_heart(rng: np.random.Generator, phenotype: str, slice_level: str, lesion_free: bool) -> HeartSlice:
    """Draw the anatomy of one slice.

    Args:
        phenotype: one of :data:`PHENOTYPES`.
        slice_level: "basal", "mid" or "apical".
        lesion_free: draw no lesions.
    """
    level_scale = {"basal": 1.0, "mid": 0.9, "apical": 0.65}[slice_level]
    normal = phenotype == "normal"
    r_endo = rng.uniform(22, 28) if normal else rng.uniform(17, 25)
    r_endo *= level_scale
    wall_base = rng.uniform(7.5, 10.0)
    if phenotype == "normal":
        wall_max, width = wall_base + rng.uniform(0, 1.5), rng.uniform(0.6, 1.2)
        hyp_theta = np.pi + rng.normal(0, 0.4)
    elif phenotype == "septal":
        wall_max = rng.uniform(15, 25)
        hyp_theta, width = np.pi + rng.normal(0, 0.35), rng.uniform(0.5, 0.9)
        wall_base = rng.uniform(8, 11)
    elif phenotype == "concentric":
        wall_base = rng.uniform(13, 17)
        wall_max = wall_base + rng.uniform(1, 6)
        hyp_theta, width = np.pi + rng.normal(0, 0.6), rng.uniform(0.8, 1.6)
    else:  # apical-like: thick at the apex, near-normal at the base
        grow = {"basal": 0.1, "mid": 0.5, "apical": 1.0}[slice_level]
        wall_base = rng.uniform(8, 10) + grow * rng.uniform(4, 8)
        wall_max = wall_base + grow * rng.uniform(3, 10)
        hyp_theta, width = rng.uniform(-np.pi, np.pi), rng.uniform(1.0, 2.0)
    if slice_level == "apical" and phenotype != "apical":
        wall_max = wall_base + (wall_max - wall_base) * 0.6
    k = 4
    coeffs = rng.normal(0, 1, (k, 2)) * (0.05 / (1 + np.arange(k)))[:, None]
    coeffs[0] = 0.0  # no shift of the centre
    n_pap = 0 if slice_level == "apical" and rng.random() < 0.5 else 2
    papillary = [(rng.uniform(0.3, 1.0), rng.uniform(2.5, 5.0)), (rng.uniform(-1.9, -1.1), rng.uniform(2.5, 5.0))][:n_pap]
    body_a = rng.uniform(140, 185)
    body_b = body_a * rng.uniform(0.6, 0.8)
    h = HeartSlice(
        phenotype=phenotype,
        r_endo_mm=r_endo,
        wall_base_mm=wall_base,
        wall_max_mm=wall_max,
        hypertrophy_theta=hyp_theta,
        hypertrophy_width=width,
        shape_coeffs=coeffs,
        ejection=rng.uniform(0.25, 0.35) if normal else rng.uniform(0.3, 0.45),
        end_systole=rng.uniform(0.3, 0.4),
        rv_half_angle=rng.uniform(0.75, 1.15),
        rv_depth_mm=rng.uniform(12, 24) * (0.7 if slice_level == "apical" else 1.0),
        rv_wall_mm=rng.uniform(2.5, 4.5),
        papillary=papillary,
        body_axes_mm=(body_a, body_b),
        body_offset_mm=(rng.uniform(-60, -20), rng.uniform(-30, 20)),
        fat_mm=rng.uniform(6, 28),
        muscle_mm=rng.uniform(6, 14),
        liver_centre_mm=(rng.uniform(-80, 0), rng.uniform(-130, -90)),
        liver_axes_mm=(rng.uniform(70, 110), rng.uniform(40, 70)),
        lung_centres_mm=[(rng.uniform(40, 80), rng.uniform(0, 40)), (rng.uniform(-140, -100), rng.uniform(0, 40))],
        lung_axes_mm=[(rng.uniform(35, 55), rng.uniform(50, 80)), (rng.uniform(35, 55), rng.uniform(50, 80))],
        aorta_centre_mm=(rng.uniform(-70, -40), rng.uniform(-75, -55)),
        aorta_radius_mm=rng.uniform(9, 13),
        pericardial_fat_mm=rng.uniform(0.5, 5.0),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        pericardial_fat_shape=rng.normal(0, 1, (3, 2)) * (0.7 / np.arange(1, 4))[:, None],
    )
    if not lesion_free and phenotype != "normal":
        h.lesions = _sample_lesions(rng, h)
    return h


def _sample_lesions(rng: np.random.Generator, h: HeartSlice) -> list[LesionBlob]:
    """Patchy mid-wall lesions in hypertrophied segments, RV insertion points, diffuse regions."""
    blobs: list[LesionBlob] = []
    for _ in range(rng.integers(0, 4)):
        blobs.append(LesionBlob(
            theta=h.hypertrophy_theta + rng.normal(0, 0.6 * h.hypertrophy_width),
            rho=rng.uniform(0.3, 0.7), sigma_theta=rng.uniform(0.1, 0.4), sigma_rho=rng.uniform(0.12, 0.3),
            amplitude=rng.uniform(0.6, 1.2), kind="patchy"))
    for theta in h.insertion_thetas:
        if rng.random() < 0.45:
            blobs.append(LesionBlob(
                theta=theta + rng.normal(0, 0.08), rho=rng.uniform(0.4, 0.85),
                sigma_theta=rng.uniform(0.08, 0.2), sigma_rho=rng.uniform(0.15, 0.35),
                amplitude=rng.uniform(0.5, 1.1), kind="insertion"))
    if rng.random() < 0.4:
        blobs.append(LesionBlob(
            theta=h.hypertrophy_theta + rng.normal(0, 0.5), rho=rng.uniform(0.3, 0.7),
            sigma_theta=rng.uniform(0.4, 0.9), sigma_rho=rng.uniform(0.3, 0.5),
            amplitude=rng.uniform(0.15, 0.4), kind="diffuse"))
    return blobs


def _soft(d_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Fraction inside for signed distance ``d_mm`` (positive inside), edge one pixel wide."""
    return np.clip(0.5 + d_mm / pixel_mm, 0.0, 1.0)


def _ellipse_distance(u, v, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to an axis-aligned ellipse."""
    x = (u - centre[0]) / axes[0]
    y = (v - centre[1]) / axes[1]
    rho = np.sqrt(x * x + y * y)
    return (1.0 - rho) * min(axes)


def _smooth_texture(u, v, seed: int, scale_mm: float) -> np.ndarray:
    """A smooth random field in [-1, 1] (a few random plane waves), deterministic per seed."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(u)
    for _ in range(6):
        k = rng.normal(0, 1, 2)
        k = k / np.linalg.norm(k) * (2 * np.pi / (scale_mm * rng.uniform(0.7, 1.5)))
        out += np.cos(k[0] * u + k[1] * v + rng.uniform(0, 2 * np.pi))
    return out / 6 ** 0.5 / 1.5


def heart_radius_mm(h: HeartSlice) -> float:
    """A radius around the LV centre outside which nothing moves with the heart beat."""
    return float(h.r_endo_mm * 1.25 + h.wall_max_mm + h.rv_depth_mm + h.rv_wall_mm + PERICARDIAL_FAT_MAX_REL * h.pericardial_fat_mm + 4.0)


def background_fractions(h: HeartSlice, u: np.ndarray, v: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Static tissues (body wall, lungs, liver, aorta): ``(len(TISSUES),) + u.shape`` fractions."""
    fr = np.zeros((len(TISSUES),) + u.shape, np.float32)
    fr[T["air"]] = 1.0
    bu, bv = h.body_offset_mm
    a, b = h.body_axes_mm
    _paint(fr, "fat", _soft(_ellipse_distance(u, v, (bu, bv), (a, b)), pixel_mm))
    _paint(fr, "muscle", _soft(_ellipse_distance(u, v, (bu, bv), (a - h.fat_mm, b - h.fat_mm)), pixel_mm))
    inner = (a - h.fat_mm - h.muscle_mm, b - h.fat_mm - h.muscle_mm)
    _paint(fr, "soft", _soft(_ellipse_distance(u, v, (bu, bv), inner), pixel_mm))
    for centre, axes in zip(h.lung_centres_mm, h.lung_axes_mm):
        _paint(fr, "lung", _soft(_ellipse_distance(u, v, centre, axes), pixel_mm))
    _paint(fr, "liver", _soft(_ellipse_distance(u, v, h.liver_centre_mm, h.liver_axes_mm), pixel_mm))
    d_aorta = h.aorta_radius_mm - np.hypot(u - h.aorta_centre_mm[0], v - h.aorta_centre_mm[1])
    _paint(fr, "aorta", _soft(d_aorta, pixel_mm))
    return fr


def _paint(fr: np.ndarray, name: str, m: np.ndarray) -> None:
    """Cover what is there with tissue ``name`` at fraction ``m`` (in place)."""
    fr *= 1.0 - m
    fr[T[name]] += m


def tissue_fractions(h: HeartSlice, u: np.ndarray, v: np.ndarray, phase: float, pixel_mm: float, background: np.ndarray | None = None):
    """Evaluate the anatomy at heart-local points for one cardiac phase.

    Args:
        u, v: heart-local coordinates (mm), any equal shapes.
        phase: fraction of the RR interval (0 = R wave).
        pixel_mm: edge width for partial volume.
        background: :func:`background_fractions` for the same points, to reuse across phases.

    Returns:
        (fractions, fibrosis, rho): ``fractions`` is ``(len(TISSUES),) + u.shape``, summing
        to 1; ``fibrosis`` in [0, 1] is the fibrosis fraction of the LV myocardium; ``rho``
        the transmural depth (0 endocardium, 1 epicardium).
    """
    fr = (background_fractions(h, u, v, pixel_mm) if background is None else background).copy()
    fib_out = np.zeros(u.shape, np.float32)
    rho_out = np.zeros(u.shape, np.float32)
    near = np.hypot(u, v) < heart_radius_mm(h)
    if not near.any():
        return fr, fib_out, rho_out
    sub = fr[:, near]
    fib, rho = _paint_heart(h, u[near], v[near], phase, pixel_mm, sub)
    fr[:, near] = sub
    fib_out[near] = fib
    rho_out[near] = rho
    return fr, fib_out, rho_out


def _paint_heart(h: HeartSlice, u: np.ndarray, v: np.ndarray, phase: float, pixel_mm: float, fr: np.ndarray):
    """Paint pericardial fat, RV, LV and papillary muscles onto ``fr`` (in place) at 1D points."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    c = contraction(h, phase)
    k = np.arange(1, h.shape_coeffs.shape[0] + 1)
    ang = theta[..., None] * k
    shape = 1.0 + (np.cos(ang) * h.shape_coeffs[:, 0] + np.sin(ang) * h.shape_coeffs[:, 1]).sum(-1)
    r_endo_d = h.r_endo_mm * shape
    r_epi_d = r_endo_d + wall_thickness_mm(h, theta)
    r_endo = r_endo_d * (1.0 - h.ejection * c)
    r_epi = np.sqrt(r_endo ** 2 + r_epi_d ** 2 - r_endo_d ** 2)  # myocardial area is conserved
    rho = np.clip((r - r_endo) / np.maximum(r_epi - r_endo, 1e-3), 0.0, 1.0)

    # RV: a crescent on the septal side, attached between the two insertion points.
    dth = np.angle(np.exp(1j * (theta - np.pi)))
    attach = np.clip(1.0 - (dth / h.rv_half_angle) ** 2, 0.0, 1.0)
    rv_depth = h.rv_depth_mm * np.sqrt(attach) * (1.0 - 0.5 * h.ejection * c)
    rv_outer = r_epi + rv_depth
    heart_outer = np.where(attach > 0, rv_outer + h.rv_wall_mm, r_epi)
    _paint(fr, "pericardial_fat", _soft(heart_outer + h.pericardial_fat_thickness_mm(theta) - r, pixel_mm))
    _paint(fr, "rv_wall", _soft(heart_outer - r, pixel_mm) * (attach > 0))
    _paint(fr, "rv_blood", _soft(np.minimum(rv_outer - r, r - r_epi), pixel_mm) * (rv_depth > 1.0))
    _paint(fr, "lv_myocardium", _soft(r_epi - r, pixel_mm))
    _paint(fr, "lv_blood", _soft(r_endo - r, pixel_mm))
    for pth, prad in h.papillary:
        pr = h.r_endo_mm * (1.0 - h.ejection * c) - prad * 1.1
        cu, cv = pr * np.cos(pth), pr * np.sin(pth)
        _paint(fr, "papillary", _soft(prad * (1 + 0.3 * c) - np.hypot(u - cu, v - cv), pixel_mm))

    fib = np.zeros(u.shape, np.float32)
    for blob in h.lesions:
        d = np.angle(np.exp(1j * (theta - blob.theta)))
        fib += blob.amplitude * np.exp(-0.5 * ((d / blob.sigma_theta) ** 2 + ((rho - blob.rho) / blob.sigma_rho) ** 2))
    if h.lesions:
        # patchiness: a smooth random modulation that moves with the myocardium
        tex = _smooth_texture(np.cos(theta) * 30.0, rho * 12.0 + np.sin(theta) * 30.0, h.texture_seed, 9.0)
        fib *= np.clip(1.0 + 0.6 * tex, 0.2, 1.6)
    return np.clip(fib, 0.0, 1.0).astype(np.float32), rho.astype(np.float32)
