"""Scan planes and acquisition effects: grids, resolution, noise, coil shading, ghosts.

A :class:`HeartFrame` ties the heart-local coordinates of :mod:`vne.simulate.anatomy` to patient
coordinates (mm). A scan is a :class:`vne.exam.data.Geometry` in that plane with its own FOV,
matrix, in-plane rotation and pixel spacing. Acquisition effects are applied in k-space:
truncation to the acquired resolution (the interpolation a scanner does by zero-filling),
complex Gaussian noise (so magnitude images get Rician statistics) and, for LGE, periodic
phase errors along the phase-encode direction that make breathing ghosts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft

from ..exam.data import Geometry
from ..exam.geometry import pixel_centres_mm


@dataclass(frozen=True)
class HeartFrame:
    """Heart-local frame of one slice: origin (LV centre) and in-plane axes, in patient mm."""

    origin_mm: np.ndarray  # (3,)
    e_u: np.ndarray  # (3,) unit
    e_v: np.ndarray  # (3,) unit

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.e_u, self.e_v)

    def local(self, points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heart-local (u, v) of (..., 3) patient points (through-plane offsets dropped)."""
        d = points_mm - self.origin_mm
        return d @ self.e_u, d @ self.e_v

    def moved(self, shift_uv_mm, rotation_rad: float) -> "HeartFrame":
        """The heart displaced in-plane (patient motion between scans)."""
        c, s = np.cos(rotation_rad), np.sin(rotation_rad)
        e_u = c * self.e_u + s * self.e_v
        e_v = -s * self.e_u + c * self.e_v
        origin = self.origin_mm + shift_uv_mm[0] * self.e_u + shift_uv_mm[1] * self.e_v
        return HeartFrame(origin, e_u, e_v)


def random_rotation(rng: np.random.Generator, axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis``."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


def sample_short_axis(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An oblique short-axis plane: (normal, e_u, e_v) in patient LPS coordinates.

    The LV long axis (base to apex) points left, anterior and inferior, with +-15 degrees of
    spread; the in-plane heart axes get a random rotation.
    """
    n0 = np.array([0.6, -0.5, -0.6])
    n0 /= np.linalg.norm(n0)
    tilt_axis = np.cross(n0, rng.normal(size=3))
    n = random_rotation(rng, tilt_axis, np.deg2rad(rng.uniform(0, 15))) @ n0
    n /= np.linalg.norm(n)
    ref = np.array([0.0, 0.0, 1.0])
    e_u = np.cross(ref, n)
    e_u /= np.linalg.norm(e_u)
    e_v = np.cross(n, e_u)
    rot = rng.uniform(-0.3, 0.3)
    c, s = np.cos(rot), np.sin(rot)
    return n, c * e_u + s * e_v, -s * e_u + c * e_v


def scan_geometry(
    frame: HeartFrame,
    rng: np.random.Generator,
    *,
    spacing_mm: float,
    fov_x_mm: float,
    aspect: float,
    centre_offset_mm: float = 15.0,
    rotation_rad: float | None = None,
    through_plane_mm: float = 0.0,
    thickness_mm: float = 8.0,
) -> Geometry:
    """A scan grid in the slice plane: square pixels, matrix rounded to even numbers.

    Args:
        spacing_mm: reconstructed pixel spacing.
        fov_x_mm: field of view along the read direction; ``aspect`` = fov_y / fov_x.
        centre_offset_mm: spread of the image centre around the LV centre.
        rotation_rad: in-plane rotation of the read axis from ``e_u`` (random if None).
        through_plane_mm: offset of the plane along its normal.
    """
    nx = int(round(fov_x_mm / spacing_mm / 2)) * 2
    ny = int(round(fov_x_mm * aspect / spacing_mm / 2)) * 2
    if rotation_rad is None:
        rotation_rad = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(rotation_rad), np.sin(rotation_rad)
    read = c * frame.e_u + s * frame.e_v
    phase = np.cross(frame.normal, read)  # read x phase = normal
    centre = frame.origin_mm + rng.normal(0, centre_offset_mm, 2) @ np.stack([frame.e_u, frame.e_v]) + through_plane_mm * frame.normal
    return Geometry(
        position_mm=tuple(float(v) for v in centre),
        read_dir=tuple(float(v) for v in read),
        phase_dir=tuple(float(v) for v in phase),
        pixel_spacing_mm=(float(spacing_mm), float(spacing_mm)),
        shape=(ny, nx),
        slice_thickness_mm=float(thickness_mm),
    )


def local_coordinates(geom: Geometry, frame: HeartFrame) -> tuple[np.ndarray, np.ndarray]:
    """Heart-local (u, v) of every pixel centre of ``geom``: two (ny, nx) arrays (mm)."""
    return frame.local(pixel_centres_mm(geom))


def coil_shading(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth receive-coil sensitivity (mean ~1) from anterior and posterior surface coils."""
    field = np.zeros_like(u)
    for cv in (rng.uniform(110, 170), -rng.uniform(110, 170)):
        for cu in rng.uniform(-120, 120, 2):
            s = rng.uniform(90, 160)
            field += np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * s * s))
    field /= max(float(field.mean()), 1e-6)
    return (1.0 - strength) + strength * field


def acquire(image: np.ndarray, rng: np.random.Generator, *, acquired_fraction: tuple[float, float],
            noise_sigma: float, ghost_amplitude: float = 0.0, ghost_period: int = 0) -> np.ndarray:
    """Apply the acquisition in k-space and return the complex reconstructed image.

    Args:
        image: (ny, nx) complex or real ideal image on the reconstruction grid.
        acquired_fraction: (fy, fx) central fraction of k-space actually acquired (1 = full).
        noise_sigma: std of complex Gaussian noise per pixel in the image domain (before
            truncation of k-space; truncation filters it as on a scanner).
        ghost_amplitude: phase-error amplitude (rad) of periodic breathing along phase encode
            (axis 0); 0 for none.
        ghost_period: period of that modulation in k-space lines.
    """
    ny, nx = image.shape
    k = fft.fftshift(fft.fft2(fft.ifftshift(np.asarray(image, np.complex64)), workers=1))
    noise = rng.standard_normal((2, ny, nx), dtype=np.float32) * np.float32(noise_sigma * np.sqrt(ny * nx))
    k += noise[0] + 1j * noise[1]
    fy, fx = acquired_fraction
    ky = np.abs(np.arange(ny) - ny // 2) <= fy * ny / 2
    kx = np.abs(np.arange(nx) - nx // 2) <= fx * nx / 2
    k *= ky[:, None] & kx[None, :]
    if ghost_amplitude > 0 and ghost_period > 1:
        lines = np.arange(ny)
        phase_err = ghost_amplitude * np.sin(2 * np.pi * lines / ghost_period + rng.uniform(0, 2 * np.pi))
        k *= np.exp(1j * phase_err).astype(np.complex64)[:, None]
    return fft.fftshift(fft.ifft2(fft.ifftshift(k), workers=1))


def smooth_phase(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth background phase (rad), as from B0 and coil phase."""
    a = rng.normal(0, 0.01, 2)
    return rng.uniform(-np.pi, np.pi) + a[0] * u + a[1] * v + 1e-5 * rng.normal() * (u * u + v * v)
