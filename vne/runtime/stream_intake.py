"""What of a stream VNE can use: each incoming image checked, decoded and sorted by role.

An image is refused for VNE (never for pass-through: the pipeline has already passed it on)
with one specific reason, logged once per (series, reason) and counted after that:

- 4-byte ``DATATYPE_INT`` (kept raw, :class:`vne.io.framing.RawImage`) or other int32/int64 data;
- a duplicate (same series, index, slice/contrast/phase/repetition/set/average and position);
- an image :func:`vne.io.mrd.image.from_mrd` cannot read, or whose geometry is invalid;
- a T1 map whose values do not look like native T1 in ms (:func:`t1_units_problem`), or a second
  T1 map of the same slice;
- cine or IR images with NaN or inf pixels.

Our own VNE outputs (:func:`vne.runtime.output_series.is_vne_output`) and images of other roles
are ignored. Cine and IR (magnitude, phase) images go to :attr:`StreamIntake.pool` for matching;
a T1 map is handed back to the pipeline, which waits for its slice to be complete.
"""
from __future__ import annotations

import logging
from typing import Callable

import ismrmrd
import numpy as np

from ..errors import InputError
from ..exam.data import MRImage, Role
from ..exam.roles import RoleRules
from ..io.mrd.image import from_mrd
from ..io.framing import RawImage
from ..prepare.slices import slice_key
from .output_series import is_vne_output

log = logging.getLogger(__name__)

REJECTED_DTYPES = (np.int32, np.int64)
# Plausible median of a native cardiac T1 map's tissue pixels (ms): myocardium ~950-1300,
# blood 1500-2000, fat/liver lower. Combined with the contract's t1_valid_range_ms.
T1_MEDIAN_PLAUSIBLE_MS = (400.0, 2500.0)


def t1_units_problem(t1_ms: np.ndarray, valid_range_ms: tuple[float, float]) -> str | None:
    """Why a T1 map does not look like native T1 in ms, or None.

    Uses the median of the tissue pixels (finite, > 0): it must lie within the contract's
    ``t1_valid_range_ms`` and :data:`T1_MEDIAN_PLAUSIBLE_MS` (myocardium ~1000 ms, blood
    ~1600 ms dominate a cardiac map). Seconds (median ~1) and undeclared x10 maps (median
    ~10000) are named as such.
    """
    a = np.asarray(t1_ms, np.float64)
    if not np.all(np.isfinite(a)):
        return f"T1 map contains {int(np.size(a) - np.isfinite(a).sum())} NaN or inf pixels"
    tissue = a[a > 0]
    if tissue.size < max(16, 0.01 * a.size):
        return "T1 map is empty (almost no positive pixels)"
    med = float(np.median(tissue))
    lo = max(valid_range_ms[0], T1_MEDIAN_PLAUSIBLE_MS[0])
    hi = min(valid_range_ms[1], T1_MEDIAN_PLAUSIBLE_MS[1])
    if lo <= med <= hi:
        return None
    if med < 10:
        return f"T1 map values look like seconds (tissue median {med:.3g}); VNE needs ms"
    if 10 * lo <= med <= 10 * hi:
        return (f"T1 map values look like ms x10 without an 'x10' declaration (tissue median {med:.0f}); "
                f"declare it in ImageComments or GADGETRON_ScaleRatio")
    return f"T1 map tissue median {med:.0f} ms is outside the plausible range {lo:.0f}-{hi:.0f} ms (wrong units?)"


class StreamIntake:
    """The usable images of one stream (module docstring).

    Args:
        rules: the role rules (:mod:`vne.exam.roles`, with the stream's ``role_*`` overrides).
        study: the header's (StudyInstanceUID, FrameOfReferenceUID, ...) (:func:`vne.io.mrd.header.study_key`).
        problem: reports a reason (``problem(message, level)``; the pipeline logs and lists it).

    Attributes:
        pool: usable cine, IR magnitude and IR phase images, in arrival order.
        t1_maps: every accepted T1 map (pixels in ms), in arrival order.
        t1_unusable: why T1 maps were refused (for the end-of-stream summary).
    """

    def __init__(self, rules: RoleRules, study: tuple, problem: Callable[..., None]) -> None:
        self.rules = rules
        self.study = study
        self._problem = problem
        self.pool: list[MRImage] = []
        self.t1_maps: list[MRImage] = []
        self.t1_unusable: list[str] = []
        self._t1_keys: set[tuple] = set()
        self._seen: set[tuple] = set()
        self._rejected: dict[tuple[str, str], int] = {}

    def reject(self, series: str, reason: str, tag: str) -> None:
        """One image unusable for VNE: logged once per (series, reason), counted after that."""
        k = (series, reason)
        self._rejected[k] = self._rejected.get(k, 0) + 1
        if self._rejected[k] == 1:
            self._problem(f"{tag}: {reason}: not used for VNE (passed on unchanged)")

    def reject_raw(self, item: RawImage) -> None:
        """A 4-byte ``DATATYPE_INT`` image, kept as its wire bytes: never used for VNE."""
        self.reject(str(item.image_series_index), "int32 (ISMRMRD DATATYPE_INT) pixel data, passed on byte for byte",
                    f"series {item.image_series_index} image {item.image_index}")

    def decode(self, mrd: ismrmrd.Image) -> MRImage | None:
        """The image as an :class:`MRImage` with its role, or None (refused, with the reason)."""
        series = str(mrd.image_series_index)
        tag = f"series {mrd.image_series_index} image {mrd.image_index}"
        key = (int(mrd.image_series_index), int(mrd.image_index), int(mrd.slice), int(mrd.contrast), int(mrd.phase),
               int(mrd.repetition), int(mrd.set), int(mrd.average), tuple(np.round(np.asarray(mrd.position, float), 2)))
        if key in self._seen:
            self.reject(series, "duplicate of an earlier image (same series, index and position)", tag)
            return None
        self._seen.add(key)
        dtype = np.asarray(mrd.data).dtype
        if dtype.type in REJECTED_DTYPES:
            self.reject(series, f"{dtype} pixel data (not a scanner image type; VNE needs uint16, int16 or float)", tag)
            return None
        try:
            im = from_mrd(mrd, study=self.study, rules=self.rules, source=tag)
        except InputError as exc:
            self.reject(series, str(exc).replace(f"{tag}: ", ""), tag)
            return None
        return im

    def take(self, im: MRImage, tag: str, t1_valid_range_ms: Callable[[], tuple[float, float]]) -> bool:
        """Keep a decoded image if VNE can use it. True for an accepted T1 map (its slice is then
        the pipeline's to run); cine and IR images go to :attr:`pool`.

        Args:
            t1_valid_range_ms: the model contract's range of T1 values (ms), asked for T1 maps only.
        """
        if is_vne_output(im.meta):
            log.debug("VNE: %s is a VNE output; ignored", tag)
            return False
        if im.role not in (Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE, Role.T1_MAP):
            log.debug("VNE: %s not used (%s: %s)", tag, im.role.value, im.meta.get("role_reason", im.meta.get("RoleReason", "")))
            return False
        try:
            im.geometry.validate()
        except InputError as exc:
            self.reject(im.series, f"{im.role.value} image: {exc}", tag)
            return False
        if im.role == Role.T1_MAP:
            why = t1_units_problem(im.pixels, t1_valid_range_ms())
            if why:
                self.t1_unusable.append(why)
                self._problem(f"{tag}: {why}: no VNE for {slice_key(im.geometry)}")
                return False
            k = (im.series, tuple(np.round(im.geometry.position_mm, 1)))
            if k in self._t1_keys:
                self.reject(im.series, "duplicate T1 map of a slice already seen", tag)
                return False
            self._t1_keys.add(k)
            self.t1_maps.append(im)
            return True
        if not np.all(np.isfinite(im.pixels)):
            self.reject(im.series, f"{im.role.value} image contains NaN or inf", tag)
            return False
        self.pool.append(im)
        return False

    def report_repeats(self) -> None:
        """At the end of the stream: how many images each reason refused, where more than one."""
        for (series, reason), n in self._rejected.items():
            if n > 1:
                self._problem(f"series {series}: {n} images not used for VNE ({reason})", logging.INFO)
