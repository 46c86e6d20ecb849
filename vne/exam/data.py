"""The data model every entry point shares: images with geometry, grouped into slices and exams.

An :class:`MRImage` is one 2D image as a scanner delivers it (a DICOM instance or an ISMRMRD
image), with its pixels, its plane in patient coordinates and the few acquisition facts the
pipeline needs. A :class:`SliceSet` is everything VNE needs for one short-axis slice, and an
:class:`Exam` is one study of one patient.

Conventions (used everywhere in this package):
- pixels are ``(ny, nx)``: row index ``i`` runs along ``phase_dir``, column index ``j`` along
  ``read_dir`` (DICOM: ImageOrientationPatient[:3] is ``read_dir``, [3:] is ``phase_dir``);
- ``position_mm`` is the **centre of the image** in patient coordinates (ISMRMRD convention).
  The pixel (i, j) centre is
  ``position + (j - (nx-1)/2)*dx*read_dir + (i - (ny-1)/2)*dy*phase_dir``;
- ``pixel_spacing_mm`` is ``(dy, dx)`` as in DICOM PixelSpacing (row spacing, column spacing);
- times are in ms, lengths in mm.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import InputError


class Role(str, enum.Enum):
    """What an image is, for VNE."""

    CINE = "cine"
    IR_MAGNITUDE = "ir_magnitude"
    IR_PHASE = "ir_phase"
    T1_MAP = "t1_map"
    LGE = "lge"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Geometry:
    """The plane and grid of a 2D image in patient coordinates (mm).

    Attributes:
        position_mm: (3,) centre of the image.
        read_dir: (3,) unit vector along columns (increasing ``j``).
        phase_dir: (3,) unit vector along rows (increasing ``i``).
        pixel_spacing_mm: (dy, dx).
        shape: (ny, nx).
        slice_thickness_mm: nominal slice thickness.
    """

    position_mm: tuple[float, ...]      # 3 values
    read_dir: tuple[float, ...]         # 3 values
    phase_dir: tuple[float, ...]        # 3 values
    pixel_spacing_mm: tuple[float, ...]  # 2 values (dy, dx)
    shape: tuple[int, ...]              # 2 values (ny, nx)
    slice_thickness_mm: float = 8.0

    @cached_property
    def slice_dir(self) -> np.ndarray:
        """(3,) plane normal, read x phase (right-handed, as ISMRMRD ``slice_dir``).

        Computed once per geometry (matching compares every image's plane with every slice's)
        and read-only, since the cached array is shared."""
        r, p = self.read_dir, self.phase_dir
        n = np.array([r[1] * p[2] - r[2] * p[1], r[2] * p[0] - r[0] * p[2], r[0] * p[1] - r[1] * p[0]], float)
        n = n / max(float(np.sqrt(n @ n)), 1e-12)
        n.setflags(write=False)
        return n

    @property
    def fov_mm(self) -> tuple[float, float]:
        """(fov_y, fov_x) in mm: shape times spacing."""
        return (self.shape[0] * self.pixel_spacing_mm[0], self.shape[1] * self.pixel_spacing_mm[1])

    def validate(self) -> None:
        """Raise :class:`InputError` for degenerate direction vectors or spacing."""
        r = np.asarray(self.read_dir, float)
        p = np.asarray(self.phase_dir, float)
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(p)) and np.all(np.isfinite(self.position_mm))):
            raise InputError("geometry has non-finite position or direction")
        nr, np_ = np.linalg.norm(r), np.linalg.norm(p)
        if nr < 1e-3 or np_ < 1e-3:
            raise InputError("geometry has a zero-length read or phase direction")
        if abs(float(r @ p) / (nr * np_)) > 0.01:
            raise InputError("geometry read and phase directions are not orthogonal")
        if min(self.pixel_spacing_mm) <= 0 or not np.all(np.isfinite(self.pixel_spacing_mm)):
            raise InputError(f"geometry has invalid pixel spacing {self.pixel_spacing_mm}")
        if min(self.shape) < 1:
            raise InputError(f"geometry has empty shape {self.shape}")

    def normalised(self) -> "Geometry":
        """The same geometry with unit direction vectors."""
        r = np.asarray(self.read_dir, float)
        p = np.asarray(self.phase_dir, float)
        return replace(
            self,
            read_dir=tuple(float(v) for v in r / np.linalg.norm(r)),
            phase_dir=tuple(float(v) for v in p / np.linalg.norm(p)),
        )


@dataclass
class MRImage:
    """One 2D image with its geometry and acquisition facts.

    Attributes:
        pixels: (ny, nx) array; magnitude, phase (radians), T1 (ms) or signed PSIR, by role.
        geometry: the image plane.
        role: what the image is (see :mod:`vne.exam.roles`).
        series: a series key (SeriesInstanceUID, or ISMRMRD ``image_series_index`` as text).
        series_description: the scanner's series / sequence description.
        inversion_time_ms: TI of an IR-weighted image (or LGE), else None.
        trigger_time_ms: time after the R wave (cine phase), else None.
        rr_interval_ms: the RR interval, if known.
        study_uid: StudyInstanceUID or the ISMRMRD study key.
        frame_of_reference_uid: FrameOfReferenceUID, if known.
        patient_id: PatientID, if known.
        meta: all other header fields, as text.
        source: where the image came from (a file path, or ``stream#N``).
    """

    pixels: np.ndarray
    geometry: Geometry
    role: Role = Role.UNKNOWN
    series: str = ""
    series_description: str = ""
    inversion_time_ms: float | None = None
    trigger_time_ms: float | None = None
    rr_interval_ms: float | None = None
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    patient_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class SliceSet:
    """Everything VNE needs for one short-axis slice, each image on its own grid.

    Attributes:
        t1_map: the native T1 map (ms); its grid is the output grid.
        ir_images: IR-weighted magnitude images (any order; sorted by TI downstream).
        ir_phase: matching phase images, same order as ``ir_images`` (may be empty).
        cine_frames: one cardiac cycle of cine frames, ordered by trigger time.
        lge: the PSIR LGE reference, if any (training / evaluation only).
        key: a human-readable slice identifier for logs.
    """

    t1_map: MRImage | None = None
    ir_images: list[MRImage] = field(default_factory=list)
    ir_phase: list[MRImage] = field(default_factory=list)
    cine_frames: list[MRImage] = field(default_factory=list)
    lge: MRImage | None = None
    key: str = ""


@dataclass
class Exam:
    """One study of one patient: all its images, and the slices built from them."""

    study_uid: str
    patient_id: str = ""
    images: list[MRImage] = field(default_factory=list)
    source: str = ""

    def by_role(self, role: Role) -> list[MRImage]:
        return [im for im in self.images if im.role == role]
