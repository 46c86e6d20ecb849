"""What python-ismrmrd-server's dicom2mrd.py writes into an ISMRMRD image, read back as DICOM.

dicom2mrd.py (docs/roles.md, "Who writes what") copies DICOM images into ISMRMRD as they are:
``position`` = ImagePositionPatient (the first pixel, not the centre), ``field_of_view`` with the
matrix sides swapped, integer stored values, meta values as a Python list's text, and the full
DICOM header (pixels removed) as base64 DICOM JSON in a ``DicomJson`` meta. This module reads
that header: geometry (mm, image centre), missing meta and rescaled pixels (physical units, phase
in radians), as the DICOM reader (:mod:`vne.io.dicom`) would.
"""
from __future__ import annotations

import ast
import base64
import binascii
import json
import logging
import re

import numpy as np

from ...errors import InputError
from ...exam.data import Geometry, Role

# One logger for the whole of vne.io.mrd: log lines read as they did before it was split.
log = logging.getLogger("vne.io.mrd")


# DICOM JSON (PS3.18 F.2, pydicom ``Dataset.to_json``) tags read from a ``DicomJson`` meta.
DICOM_JSON_KEY = "DicomJson"
DICOM_TAGS = {
    "ImagePositionPatient": "00200032", "ImageOrientationPatient": "00200037", "PixelSpacing": "00280030",
    "SliceThickness": "00180050", "Rows": "00280010", "Columns": "00280011",
    "TriggerTime": "00181060", "InversionTime": "00180082", "NominalInterval": "00181062",
    "SeriesDescription": "0008103E", "ImageType": "00080008", "ImageComments": "00204000",
    "RescaleSlope": "00281053", "RescaleIntercept": "00281052", "SeriesNumber": "00200011",
    "SeriesInstanceUID": "0020000E", "InstanceNumber": "00200013", "SliceLocation": "00201041",
    "StudyInstanceUID": "0020000D", "FrameOfReferenceUID": "00200052", "PatientID": "00100020",
}
# Filled into the image meta from DicomJson when the meta lacks them (dicom2mrd writes only
# ImageType, ImageComments and SequenceDescription as meta).
DICOM_JSON_META = ("TriggerTime", "InversionTime", "NominalInterval", "SeriesDescription", "ImageType",
                   "ImageComments", "SeriesNumber", "SeriesInstanceUID", "SliceLocation", "RescaleSlope",
                   "RescaleIntercept")
_LIST_REPR = re.compile(r"^\[\s*'.*'\s*\]$", re.DOTALL)


def normalise_meta(meta: dict) -> dict:
    """Meta values that a writer stored as a Python list's text (dicom2mrd's ``str(MultiValue)``:
    ``"['ORIGINAL', 'PRIMARY', 'M']"``) become lists again; everything else is kept."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, str) and _LIST_REPR.match(v.strip()):
            try:
                parsed = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError):
                parsed = None
            if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
                v = parsed
        out[k] = v
    return out


def dicom_json(meta: dict, tag: str = "") -> dict[str, list]:
    """The fields of :data:`DICOM_TAGS` from a ``DicomJson`` meta (base64 of a DICOM JSON header,
    as python-ismrmrd-server's dicom2mrd.py writes it), keyword -> list of values; {} without one.

    Plain (not base64) JSON is accepted too. An unreadable header is logged and ignored.
    """
    raw = meta.get(DICOM_JSON_KEY)
    if isinstance(raw, (list, tuple)):
        raw = "".join(str(x) for x in raw if x is not None)
    if not raw:
        return {}
    raw = str(raw).strip()
    try:
        text = raw if raw.startswith("{") else base64.b64decode(raw, validate=False).decode("utf-8")
        doc = json.loads(text)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable DicomJson meta ignored (%s)", tag or "image", str(exc)[:100])
        return {}
    if not isinstance(doc, dict):
        return {}
    upper = {str(k).upper(): v for k, v in doc.items()}
    out: dict[str, list] = {}
    for keyword, t in DICOM_TAGS.items():
        el = upper.get(t)
        if not isinstance(el, dict) or not isinstance(el.get("Value"), list) or not el["Value"]:
            continue
        vals = []
        for v in el["Value"]:
            if isinstance(v, dict):  # PN: {"Alphabetic": ...}
                v = v.get("Alphabetic", "")
            vals.append(v)
        out[keyword] = vals
    return out


def _dj_floats(dj: dict, keyword: str, n: int) -> list[float] | None:
    try:
        vals = [float(v) for v in dj.get(keyword, [])]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def geometry_from_dicom_json(dj: dict, data_shape: tuple[int, int], tag: str = "",
                             default_thickness: float | None = None) -> Geometry | None:
    """The image geometry from DICOM fields (ImagePositionPatient is the first pixel's centre,
    converted to the image centre with :func:`vne.exam.geometry.centre_from_first_pixel`), or None
    when they are incomplete or do not describe the pixels (Rows / Columns differ).

    ``data_shape`` is the pixels' ``(ny, nx)`` = (Rows, Columns); positions and spacings in mm.
    """
    from ...exam.geometry import centre_from_first_pixel

    ipp = _dj_floats(dj, "ImagePositionPatient", 3)
    iop = _dj_floats(dj, "ImageOrientationPatient", 6)
    spacing = _dj_floats(dj, "PixelSpacing", 2)
    if ipp is None or iop is None or spacing is None:
        log.warning("%s: DicomJson without ImagePositionPatient / ImageOrientationPatient / PixelSpacing; "
                    "the ISMRMRD header geometry is used (its position may be the first pixel)", tag or "image")
        return None
    rows = _dj_floats(dj, "Rows", 1)
    cols = _dj_floats(dj, "Columns", 1)
    if rows is not None and cols is not None and (int(rows[0]), int(cols[0])) != tuple(data_shape):
        log.warning("%s: DicomJson describes a %dx%d image but the data are %dx%d; the ISMRMRD header "
                    "geometry is used", tag or "image", int(rows[0]), int(cols[0]), *data_shape)
        return None
    thick = _dj_floats(dj, "SliceThickness", 1)
    thickness = thick[0] if thick and thick[0] > 0 else (default_thickness or 8.0)
    centre = centre_from_first_pixel(ipp, iop[:3], iop[3:], (spacing[0], spacing[1]), data_shape)
    geom = Geometry(position_mm=tuple(float(c) for c in centre), read_dir=tuple(iop[:3]), phase_dir=tuple(iop[3:]),
                    pixel_spacing_mm=(spacing[0], spacing[1]), shape=tuple(int(v) for v in data_shape),
                    slice_thickness_mm=float(thickness))
    try:
        geom.validate()
    except InputError as exc:
        log.warning("%s: DicomJson geometry unusable (%s); the ISMRMRD header geometry is used", tag or "image", exc)
        return None
    return geom.normalised()


def complete_meta(meta: dict, dj: dict) -> dict:
    """``meta`` with :data:`DICOM_JSON_META` fields added from DicomJson where absent or empty."""
    out = dict(meta)
    present = {str(k).lower(): v for k, v in meta.items()}
    for keyword in DICOM_JSON_META:
        if keyword not in dj:
            continue
        have = present.get(keyword.lower())
        if have not in (None, "", []) and not (isinstance(have, (list, tuple)) and all(x in (None, "") for x in have)):
            continue
        vals = [str(v) for v in dj[keyword]]
        out[keyword] = vals if len(vals) > 1 else vals[0]
    return out


def rescaled_pixels(pixels: np.ndarray, role: Role, dj: dict, stored_integer: bool) -> np.ndarray:
    """DICOM stored values (as dicom2mrd copies them) -> physical units, as the DICOM reader does:
    RescaleSlope / Intercept, and phase images to radians. Float data are taken as converted.

    ``pixels`` is one ``(ny, nx)`` image; the result has its shape (float32 when rescaled).
    """
    if not stored_integer:
        return pixels
    slope = _dj_floats(dj, "RescaleSlope", 1)
    intercept = _dj_floats(dj, "RescaleIntercept", 1)
    slope_v = slope[0] if slope else None
    inter_v = intercept[0] if intercept else None
    raw = pixels.astype(np.float64)
    if role == Role.IR_PHASE:
        from ..dicom import _phase_radians

        return _phase_radians(raw, {"RescaleSlope": slope_v, "RescaleIntercept": inter_v})
    if slope_v is None and inter_v is None:
        return pixels
    return (raw * (slope_v if slope_v is not None else 1.0) + (inter_v or 0.0)).astype(np.float32)
