"""Is a stored ISMRMRD ``position`` the image centre, as the standard says, or the first pixel?

Some writers store DICOM's ImagePositionPatient (the first pixel's centre) as ``position``. One
image cannot tell; series of one plane with different fields of view can. The geometry is never
changed here: a file that looks wrong is reported (one warning), since which reading is right
cannot be proven from positions alone.
"""
from __future__ import annotations

import logging

import ismrmrd
import numpy as np

from ...exam.data import Geometry
from .dicom2mrd import DICOM_JSON_KEY
from .image import geometry_of

# One logger for the whole of vne.io.mrd: log lines read as they did before it was split.
log = logging.getLogger("vne.io.mrd")

# A stored ``position`` that is really the first pixel shows as series of the same plane whose
# centres disagree by about half the difference of their FOVs but agree once ``position`` is
# read as the first pixel. Thresholds of :func:`check_position_convention`:
FIRST_PIXEL_MIN_GAIN_MM = 10.0  # read as first pixels, the centres are this much closer in-plane
FIRST_PIXEL_AGREEMENT_RATIO = 0.5  # and at most this fraction as far apart as when read as centres
FIRST_PIXEL_MIN_SHARE = 0.6  # of all the pairs that can tell: scanners (and our simulator) centre
#                              each series' FOV on its own, so one pair can agree by chance
FIRST_PIXEL_WARNING = "ISMRMRD position looks like the first pixel (DICOM ImagePositionPatient), not the image centre"


def position_convention_findings(images: list[ismrmrd.Image], labels: list[str] | None = None) -> list[str]:
    """Pairs of series in one plane whose ``position`` only makes sense as the first pixel.

    Images with a ``DicomJson`` meta are skipped (their geometry comes from it). For every two
    series (by group label and ``image_series_index``) with parallel planes (|cos| > 0.99) less
    than :data:`vne.exam.geometry.MATCH_MAX_DISTANCE_MM` apart and different in-plane extents: the
    in-plane distance of their positions read as centres, ``d_c``, and read as first pixels
    (converted to centres), ``d_f``. A pair is reported when ``d_c - d_f`` >= 10 mm and
    ``d_f`` <= 0.5 ``d_c`` (series may have their own FOV centres, so ``d_f`` need not be 0),
    and only when at least 60 % of the pairs that can tell agree (one pair of independently
    centred series can match by chance: 3 of 7 pairs in our own simulator's files did). Series
    that each have their own FOV centre therefore cannot be judged: a known limit.

    Returns:
        one text per suspicious pair, e.g. ``"series 1 / series 4: 23.1 mm apart as stored, 0.2 mm as first pixels"``.
    """
    from ...exam.geometry import MATCH_MAX_DISTANCE_MM, centre_from_first_pixel

    labels = labels or [""] * len(images)
    uniq: dict[tuple, tuple[str, Geometry]] = {}
    for im, lab in zip(images, labels):
        if DICOM_JSON_KEY.encode() in _attr_bytes(im):
            continue
        try:
            g = geometry_of(im)
        except Exception:
            continue
        if not (np.all(np.isfinite(g.position_mm)) and min(g.pixel_spacing_mm) > 0):
            continue
        name = f"{lab + ' ' if lab else ''}series {int(im.image_series_index)}".strip()
        key = (name, tuple(np.round(g.position_mm, 1)), tuple(np.round(g.read_dir, 3)),
               tuple(np.round(g.phase_dir, 3)), g.shape, tuple(np.round(g.pixel_spacing_mm, 4)))
        uniq.setdefault(key, (name, g))
    items = list(uniq.values())
    out = []
    eligible = 0
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            (na, ga), (nb, gb) = items[a], items[b]
            if na == nb:
                continue
            n = gb.slice_dir
            if not np.isfinite(n).all() or abs(float(ga.slice_dir @ n)) < 0.99:
                continue
            pa, pb = np.asarray(ga.position_mm, float), np.asarray(gb.position_mm, float)
            if abs(float((pa - pb) @ n)) >= MATCH_MAX_DISTANCE_MM:
                continue
            fa = np.asarray(ga.fov_mm)
            fb = np.asarray(gb.fov_mm)
            if np.allclose(fa, fb, atol=1.0) and np.allclose(ga.read_dir, gb.read_dir, atol=1e-3):
                continue  # same extent and axes: the two readings cannot be told apart

            def inplane(v, n=n):
                return v - float(v @ n) * n

            eligible += 1
            d_c = float(np.linalg.norm(inplane(pa - pb)))
            ca = centre_from_first_pixel(pa, ga.read_dir, ga.phase_dir, ga.pixel_spacing_mm, ga.shape)
            cb = centre_from_first_pixel(pb, gb.read_dir, gb.phase_dir, gb.pixel_spacing_mm, gb.shape)
            d_f = float(np.linalg.norm(inplane(ca - cb)))
            if d_c - d_f >= FIRST_PIXEL_MIN_GAIN_MM and d_f <= FIRST_PIXEL_AGREEMENT_RATIO * d_c:
                out.append(f"{na} / {nb}: {d_c:.1f} mm apart as stored, {d_f:.1f} mm as first pixels")
    if len(out) < max(1, FIRST_PIXEL_MIN_SHARE * eligible):
        return []  # a chance agreement of independently centred series, not a convention
    return out


def check_position_convention(images: list[ismrmrd.Image], labels: list[str] | None = None, where: str = "") -> list[str]:
    """Log one warning when :func:`position_convention_findings` finds anything; the geometry is
    left as stored (which reading is right cannot be proven from positions alone)."""
    found = position_convention_findings(images, labels)
    if found:
        log.warning("%s: %s: %s%s. Geometry is left as stored, so these series may be mis-aligned; write "
                    "image centres or keep the DICOM header in a DicomJson meta (docs/roles.md)",
                    where or "stream", FIRST_PIXEL_WARNING, "; ".join(found[:3]),
                    f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return found


def _attr_bytes(im: ismrmrd.Image) -> bytes:
    s = im.attribute_string
    return s if isinstance(s, bytes) else str(s or "").encode("utf-8", "replace")
