"""ISMRMRD images, headers and HDF5 files <-> :class:`vne.exam.data.MRImage`.

ISMRMRD conventions used here (``../shared/docs/scanner-streams.md``):
- image data ``[cha, z, y, x]``; we read channel 0, z 0, as ``(ny, nx)``;
- ``position`` is the image centre (mm), ``read_dir`` along x, ``phase_dir`` along y;
- ``field_of_view`` is (fov_x, fov_y, slice thickness) in mm, ``matrix_size`` (nx, ny, 1);
- ``physiology_time_stamp[0]`` is the trigger time in 2.5 ms ticks (Siemens);
- meta values are strings or lists of strings;
- we only ever emit uint16, int16, float32 or complex64 data.

Files written by other tools are read as they are (docs/roles.md, "Who writes what"): any
top-level group (``dataset``, the only one, or one named with ``group``), every image group
whatever its name, and python-ismrmrd-server's dicom2mrd.py conventions (``position`` = DICOM
ImagePositionPatient with the full DICOM header in a base64 ``DicomJson`` meta).
"""
from __future__ import annotations

import ast
import base64
import binascii
import html
import json
import logging
import re
from pathlib import Path

import ismrmrd
import numpy as np

from ..errors import InputError
from .atomic import atomic_path
from ..exam.data import Geometry, MRImage, Role

log = logging.getLogger(__name__)

PHYSIO_TICK_MS = 2.5
EMITTABLE_DTYPES = (np.uint16, np.int16, np.float32, np.complex64)


def header_xml(
    *,
    study_uid: str,
    patient_id: str,
    frame_of_reference_uid: str,
    field_strength_t: float,
    protocol_name: str = "VNE",
    series_description: str = "",
    measurement_id: str = "",
    matrix: tuple[int, int] = (256, 256),
    fov_mm: tuple[float, float, float] = (300.0, 300.0, 8.0),
    vendor: str = "SIEMENS",
) -> str:
    """A minimal valid ISMRMRD XML header for an image-domain stream.

    Args:
        matrix: (nx, ny) of the reconstructed images.
        fov_mm: (fov_x, fov_y, thickness).
    """
    e = html.escape
    nx, ny = matrix
    fx, fy, fz = fov_mm
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://www.ismrm.org/ISMRMRD ismrmrd.xsd">
  <subjectInformation><patientID>{e(patient_id)}</patientID></subjectInformation>
  <studyInformation><studyInstanceUID>{e(study_uid)}</studyInstanceUID></studyInformation>
  <measurementInformation>
    <measurementID>{e(measurement_id or study_uid)}</measurementID>
    <patientPosition>HFS</patientPosition>
    <protocolName>{e(protocol_name)}</protocolName>
    <seriesDescription>{e(series_description or protocol_name)}</seriesDescription>
    <frameOfReferenceUID>{e(frame_of_reference_uid)}</frameOfReferenceUID>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>{e(vendor)}</systemVendor>
    <systemFieldStrength_T>{field_strength_t:g}</systemFieldStrength_T>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>{int(round(42577478 * field_strength_t))}</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize><fieldOfView_mm><x>{fx:g}</x><y>{fy:g}</y><z>{fz:g}</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize><fieldOfView_mm><x>{fx:g}</x><y>{fy:g}</y><z>{fz:g}</z></fieldOfView_mm></reconSpace>
    <encodingLimits></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
"""


def study_key(header) -> tuple[str, str, str]:
    """(study UID, frame of reference UID, patient ID) from a parsed ISMRMRD header (or None)."""
    def get(path):
        obj = header
        for p in path:
            obj = getattr(obj, p, None) if obj is not None else None
        return str(obj) if obj is not None else ""

    return (
        get(("studyInformation", "studyInstanceUID")),
        get(("measurementInformation", "frameOfReferenceUID")),
        get(("subjectInformation", "patientID")),
    )


def parse_header(xml: str | bytes):
    """Parse ISMRMRD XML; raises :class:`InputError` on malformed text."""
    try:
        return ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as exc:  # the xsd layer raises a zoo of parser errors
        raise InputError(f"ISMRMRD header is not valid XML: {str(exc).splitlines()[0][:200]}") from None


def to_mrd(
    image: MRImage,
    *,
    series_index: int,
    image_index: int,
    slice_index: int = 0,
    phase: int = 0,
    contrast: int = 0,
    dtype=np.float32,
    image_type: int | None = None,
    meta: dict | None = None,
) -> ismrmrd.Image:
    """Build an ``ismrmrd.Image`` from an :class:`MRImage` (pixels cast to ``dtype``).

    ``meta`` defaults to ``image.meta``; every value is written as text.
    """
    if np.dtype(dtype).type not in EMITTABLE_DTYPES:
        raise InputError(f"refusing to emit ISMRMRD data type {np.dtype(dtype)}")
    g = image.geometry
    px = np.asarray(image.pixels)
    if np.dtype(dtype) == np.uint16:
        px = np.clip(np.rint(px), 0, 65535)
    data = px.astype(dtype)[None, None]
    mrd = ismrmrd.Image.from_array(data, transpose=False)
    ny, nx = g.shape
    # matrix_size follows the data; the other header arrays are set whole
    mrd.field_of_view = (nx * g.pixel_spacing_mm[1], ny * g.pixel_spacing_mm[0], g.slice_thickness_mm)
    mrd.position = tuple(float(v) for v in g.position_mm)
    mrd.read_dir = tuple(float(v) for v in g.read_dir)
    mrd.phase_dir = tuple(float(v) for v in g.phase_dir)
    mrd.slice_dir = tuple(float(v) for v in g.slice_dir)
    mrd.image_series_index = int(series_index)
    mrd.image_index = int(image_index)
    mrd.slice = int(slice_index)
    mrd.phase = int(phase)
    mrd.contrast = int(contrast)
    if image_type is None:
        image_type = ismrmrd.IMTYPE_PHASE if image.role == Role.IR_PHASE else ismrmrd.IMTYPE_MAGNITUDE
    mrd.image_type = int(image_type)
    if image.trigger_time_ms is not None:
        mrd.physiology_time_stamp = (int(round(image.trigger_time_ms / PHYSIO_TICK_MS)), 0, 0)
    m = ismrmrd.Meta()
    for k, v in (image.meta if meta is None else meta).items():
        m[k] = [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
    mrd.attribute_string = m.serialize()
    return mrd


def geometry_of(mrd: ismrmrd.Image, slice_thickness_mm: float | None = None) -> Geometry:
    """The :class:`Geometry` of an ISMRMRD image (data shape wins over a wrong matrix_size)."""
    data = np.asarray(mrd.data)
    ny, nx = int(data.shape[-2]), int(data.shape[-1])
    fov = [float(v) for v in mrd.field_of_view]
    dx = fov[0] / nx if nx else float("nan")
    dy = fov[1] / ny if ny else float("nan")
    return Geometry(
        position_mm=tuple(float(v) for v in mrd.position),
        read_dir=tuple(float(v) for v in mrd.read_dir),
        phase_dir=tuple(float(v) for v in mrd.phase_dir),
        pixel_spacing_mm=(dy, dx),
        shape=(ny, nx),
        slice_thickness_mm=float(slice_thickness_mm if slice_thickness_mm else (fov[2] or 8.0)),
    )


def write_mrd_file(path: Path, header: str, images: list[ismrmrd.Image], group: str = "dataset") -> Path:
    """Write an ISMRMRD HDF5 file atomically: header, then images grouped per series.

    Images go to ``/<group>/image_<series_index>`` in the order given (the scanner's order).
    """
    path = Path(path)
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        ds = ismrmrd.Dataset(str(tmp), group, create_if_needed=True)
        ds.write_xml_header(header)
        for im in images:
            ds.append_image(f"image_{im.image_series_index}", im)
        ds.close()
    return path


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def _ordered_keys(group) -> list[str]:
    """Member names in file order: creation order where the file tracks it, else by name with
    numbers compared as numbers (``image_2`` before ``image_10``)."""
    keys = list(group.keys())
    try:
        tracked = bool(group.id.get_create_plist().get_link_creation_order())
    except Exception:
        tracked = False
    return keys if tracked else sorted(keys, key=_natural_key)


def _resolve_group(f, path: Path, group: str | None) -> str:
    """The top-level group that holds the data: ``group`` if given, else ``dataset``, else the
    only top-level group (an MRD client output file names it after a timestamp)."""
    import h5py

    names = [k for k in _ordered_keys(f) if isinstance(f.get(k), h5py.Group)]
    if group:
        if isinstance(f.get(group), h5py.Group):
            return group
        raise InputError(f"{path}: no group '{group}' (groups: {', '.join(names) or 'none'})")
    if "dataset" in names:
        return "dataset"
    if len(names) == 1:
        return names[0]
    if not names:
        raise InputError(f"{path}: not an ISMRMRD file (no HDF5 groups)")
    raise InputError(f"{path}: {len(names)} top-level groups and none is 'dataset' "
                     f"({', '.join(repr(n) for n in names)}); choose one with --group NAME")


def _is_image_group(obj) -> bool:
    """An ISMRMRD image group: ``header`` (image headers) and ``data`` datasets, whatever its name."""
    import h5py

    if not isinstance(obj, h5py.Group):
        return False
    head, data = obj.get("header"), obj.get("data")
    if not (isinstance(head, h5py.Dataset) and isinstance(data, h5py.Dataset)):
        return False
    names = head.dtype.names or ()
    return "image_series_index" in names and "matrix_size" in names and data.ndim == 5


def read_mrd_file(path: Path, group: str | None = None) -> tuple[str, list[ismrmrd.Image]]:
    """Read the header and every image of an ISMRMRD HDF5 file, in stream order.

    The file is opened read-only (several readers can share it). The data group is ``group`` if
    given, else ``/dataset``, else the only top-level group (python-ismrmrd-server's client names
    it after a timestamp); several top-level groups without a ``dataset`` need ``group``.
    Every image group in it is read, whatever its name (``image_3``, ``images_3``,
    ``cine_SAX_1``): any subgroup with image ``header`` and ``data`` datasets.

    Stream order: the image groups in file order (creation order where the file tracks it, else
    by name with numbers compared as numbers), images in each in stored order, then sorted
    stably by the images' ``acquisition_time_stamp`` when those are set (the scanner's order).

    Raises:
        InputError: no such file, not HDF5, a missing or ambiguous group, no XML header.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ISMRMRD file")
    try:
        f = h5py.File(str(path), "r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable ISMRMRD HDF5 file ({exc})") from None
    images: list[ismrmrd.Image] = []
    labels: list[str] = []
    try:
        name = _resolve_group(f, path, group)
        g = f[name]
        xml = g.get("xml")
        if not isinstance(xml, h5py.Dataset) or xml.shape in ((), (0,)):
            raise InputError(f"{path}: has no ISMRMRD XML header in group '{name}'")
        header = xml[0]
        header = header.decode("utf-8", "replace") if isinstance(header, bytes) else str(header)
        if name != "dataset":
            log.info("%s: reading group '%s'", path, name)
        for sub in _ordered_keys(g):
            obj = g.get(sub)
            if not _is_image_group(obj):
                continue
            try:
                heads = obj["header"][()]
                attrs = obj["attributes"][()] if "attributes" in obj else [b""] * len(heads)
                n = min(len(heads), len(attrs), obj["data"].shape[0])
                if n < len(heads):
                    log.warning("%s: image group '%s' has %d headers but %d data / attribute entries; "
                                "reading %d", path, sub, len(heads), obj["data"].shape[0], n)
                cfg = h5py.get_config()
                saved = cfg.complex_names
                cfg.complex_names = ("real", "imag")  # how ISMRMRD stores complex pixels
                try:
                    data = obj["data"][:n]
                finally:
                    cfg.complex_names = saved
                for k in range(n):
                    im = ismrmrd.Image(heads[k], attrs[k])
                    im.data[:] = data[k]
                    images.append(im)
                    labels.append(f"{sub}")
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"{path}: image group '{name}/{sub}' is unreadable ({exc})") from None
    finally:
        f.close()
    stamps = [int(im.acquisition_time_stamp) for im in images]
    if any(stamps):
        order = sorted(range(len(images)), key=lambda k: stamps[k])
        images = [images[k] for k in order]
        labels = [labels[k] for k in order]
    check_position_convention(images, labels, where=str(path))
    return header, images


def meta_dict(mrd: ismrmrd.Image) -> dict:
    """The image's XML meta as a dict of strings / lists of strings (empty if absent or bad)."""
    text = mrd.attribute_string
    if not text:
        return {}
    try:
        m = ismrmrd.Meta.deserialize(text)
    except Exception:
        log.warning("image %d of series %d: unreadable meta attributes ignored", mrd.image_index, mrd.image_series_index)
        return {}
    return {k: m[k] for k in m.keys()}


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


def _normalise_meta(meta: dict) -> dict:
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
    when they are incomplete or do not describe the pixels (Rows / Columns differ)."""
    from ..exam.geometry import centre_from_first_pixel

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


def _complete_meta(meta: dict, dj: dict) -> dict:
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


def _rescaled(pixels: np.ndarray, role: Role, dj: dict, stored_integer: bool) -> np.ndarray:
    """DICOM stored values (as dicom2mrd copies them) -> physical units, as the DICOM reader does:
    RescaleSlope / Intercept, and phase images to radians. Float data are taken as converted."""
    if not stored_integer:
        return pixels
    slope = _dj_floats(dj, "RescaleSlope", 1)
    intercept = _dj_floats(dj, "RescaleIntercept", 1)
    slope_v = slope[0] if slope else None
    inter_v = intercept[0] if intercept else None
    raw = pixels.astype(np.float64)
    if role == Role.IR_PHASE:
        from .dicom import _phase_radians

        return _phase_radians(raw, {"RescaleSlope": slope_v, "RescaleIntercept": inter_v})
    if slope_v is None and inter_v is None:
        return pixels
    return (raw * (slope_v if slope_v is not None else 1.0) + (inter_v or 0.0)).astype(np.float32)


def from_mrd(mrd: ismrmrd.Image, study: tuple[str, str, str] = ("", "", ""), rules=None, source: str = "") -> MRImage:
    """An :class:`MRImage` from an ISMRMRD image: pixels, geometry, role and acquisition facts.

    Writers' conventions (docs/roles.md, "Who writes what"):
    - meta values stored as a Python list's text become lists (dicom2mrd's ImageType);
    - with a ``DicomJson`` meta (python-ismrmrd-server's dicom2mrd.py), the geometry comes from
      its DICOM fields (ImagePositionPatient = first pixel -> image centre; PixelSpacing, not
      dicom2mrd's field_of_view, whose x and y use the wrong matrix sides), missing meta
      (TriggerTime, InversionTime, SeriesDescription, ImageType, ImageComments, ...) is filled
      from it, and integer stored values are rescaled as the DICOM reader does (phase -> radians);
    - trigger time: meta ``TriggerTime``, else ``physiology_time_stamp[0]`` x 2.5 ms (a zero
      stamp counts for the first phase of a cine image, ``phase`` 0, and is unset otherwise).

    Args:
        study: (study UID, frame of reference UID, patient ID) from the stream header.
        rules: :class:`vne.exam.roles.RoleRules` (defaults if None).

    Raises:
        InputError: complex or multi-channel / 3D data, which VNE cannot use.
    """
    from ..exam import roles

    rules = rules or roles.DEFAULT_RULES
    tag = source or f"series {mrd.image_series_index} image {mrd.image_index}"
    meta = _normalise_meta(meta_dict(mrd))
    dj = dicom_json(meta, tag)
    data = np.asarray(mrd.data)
    if np.iscomplexobj(data):
        raise InputError(f"{tag}: complex image data (VNE needs magnitude, phase or map images)")
    if data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 1:
        raise InputError(f"{tag}: data shape {data.shape} is not one 2D image [1, 1, y, x]")
    geom = None
    if dj:
        meta = _complete_meta(meta, dj)
        meta.pop(DICOM_JSON_KEY, None)  # tens of kB per image; the fields VNE uses are in meta now
        geom = geometry_from_dicom_json(dj, data.shape[-2:], tag, default_thickness=float(mrd.field_of_view[2]) or None)
        meta["VNE_GeometryFrom"] = "DicomJson" if geom is not None else "header"
        study = tuple(s or (str(dj[k][0]) if k in dj else "")
                      for s, k in zip(study, ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID")))
    role, why = roles.classify(meta, image_type_code=int(mrd.image_type), rules=rules)
    pixels = data[0, 0].astype(np.float32)
    if dj:
        pixels = _rescaled(pixels, role, dj, np.issubdtype(data.dtype, np.integer))
    if role == Role.T1_MAP:
        pixels = pixels * np.float32(roles.t1_scale_from_meta(meta))
    trig = roles.trigger_time_from_meta(meta)
    if trig is None:
        ticks = int(mrd.physiology_time_stamp[0])
        if ticks > 0:
            trig = ticks * PHYSIO_TICK_MS
        elif role == Role.CINE and int(mrd.phase) == 0:
            trig = 0.0  # the first cine phase: at the R wave
    rr = _first_number(meta, ("NominalInterval", "RRInterval", "GADGETRON_RRInterval"))
    return MRImage(
        pixels=pixels,
        geometry=geom if geom is not None else geometry_of(mrd),
        role=role,
        series=str(mrd.image_series_index),
        series_description=next(iter(roles.descriptions(meta)), ""),
        inversion_time_ms=roles.inversion_time_from_meta(meta),
        trigger_time_ms=trig,
        rr_interval_ms=rr,
        study_uid=study[0],
        frame_of_reference_uid=study[1],
        patient_id=study[2],
        meta={**meta, "role_reason": why},
        source=tag,
    )


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
    from ..exam.geometry import MATCH_MAX_DISTANCE_MM, centre_from_first_pixel

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


def _first_number(meta: dict, keys: tuple[str, ...]) -> float | None:
    """The first finite number among ``meta[key]`` for ``keys`` (case-insensitive keys)."""
    lower = {str(k).lower(): v for k, v in meta.items()}
    for key in keys:
        v = lower.get(key.lower())
        if v is None:
            continue
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(f):
            return f
    return None
