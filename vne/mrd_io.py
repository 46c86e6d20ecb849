"""ISMRMRD images, headers and HDF5 files <-> :class:`vne.exam.MRImage`.

ISMRMRD conventions used here (``../shared/docs/scanner-streams.md``):
- image data ``[cha, z, y, x]``; we read channel 0, z 0, as ``(ny, nx)``;
- ``position`` is the image centre (mm), ``read_dir`` along x, ``phase_dir`` along y;
- ``field_of_view`` is (fov_x, fov_y, slice thickness) in mm, ``matrix_size`` (nx, ny, 1);
- ``physiology_time_stamp[0]`` is the trigger time in 2.5 ms ticks (Siemens);
- meta values are strings or lists of strings;
- we only ever emit uint16, int16, float32 or complex64 data.
"""
from __future__ import annotations

import html
import logging
import os
import tempfile
from pathlib import Path

import ismrmrd
import numpy as np

from .exam import Geometry, InputError, MRImage, Role

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


def meta_text(meta, key: str, default: str = "") -> str:
    """A meta value as one string (lists are joined with backslashes, as DICOM multi-values)."""
    if key not in meta:
        return default
    v = meta[key]
    if isinstance(v, (list, tuple)):
        return "\\".join(str(x) for x in v)
    return str(v)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".h5.tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        ds = ismrmrd.Dataset(tmp, group, create_if_needed=True)
        ds.write_xml_header(header)
        for im in images:
            ds.append_image(f"image_{im.image_series_index}", im)
        ds.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_mrd_file(path: Path, group: str = "dataset") -> tuple[str, list[ismrmrd.Image]]:
    """Read the header and every image of an ISMRMRD HDF5 file, in stream order.

    Stream order: the series groups in file order, images in each in stored order, then sorted
    stably by the images' ``acquisition_time_stamp`` when those are set.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ISMRMRD file")
    try:
        ds = ismrmrd.Dataset(str(path), group, create_if_needed=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable ISMRMRD HDF5 file ({exc})") from None
    try:
        try:
            header = ds.read_xml_header()
        except Exception:
            raise InputError(f"{path}: has no ISMRMRD XML header in group '{group}'") from None
        header = header.decode() if isinstance(header, bytes) else header
        images = []
        for name in ds.list():
            if not str(name).startswith("image"):
                continue
            for k in range(ds.number_of_images(name)):
                images.append(ds.read_image(name, k))
    finally:
        ds.close()
    stamps = [int(im.acquisition_time_stamp) for im in images]
    if any(stamps):
        order = sorted(range(len(images)), key=lambda k: stamps[k])
        images = [images[k] for k in order]
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


def from_mrd(mrd: ismrmrd.Image, study: tuple[str, str, str] = ("", "", ""), rules=None, source: str = "") -> MRImage:
    """An :class:`MRImage` from an ISMRMRD image: pixels, geometry, role and acquisition facts.

    Args:
        study: (study UID, frame of reference UID, patient ID) from the stream header.
        rules: :class:`vne.roles.RoleRules` (defaults if None).

    Raises:
        InputError: complex or multi-channel / 3D data, which VNE cannot use.
    """
    from . import roles

    rules = rules or roles.DEFAULT_RULES
    meta = meta_dict(mrd)
    data = np.asarray(mrd.data)
    tag = source or f"series {mrd.image_series_index} image {mrd.image_index}"
    if np.iscomplexobj(data):
        raise InputError(f"{tag}: complex image data (VNE needs magnitude, phase or map images)")
    if data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 1:
        raise InputError(f"{tag}: data shape {data.shape} is not one 2D image [1, 1, y, x]")
    role, why = roles.classify(meta, image_type_code=int(mrd.image_type), rules=rules)
    pixels = data[0, 0].astype(np.float32)
    if role == Role.T1_MAP:
        pixels = pixels * np.float32(roles.t1_scale_from_meta(meta))
    trig = _first_number(meta, ("TriggerTime", "GADGETRON_TriggerTime"))
    if trig is None and int(mrd.physiology_time_stamp[0]):
        trig = int(mrd.physiology_time_stamp[0]) * PHYSIO_TICK_MS
    rr = _first_number(meta, ("NominalInterval", "RRInterval", "GADGETRON_RRInterval"))
    return MRImage(
        pixels=pixels,
        geometry=geometry_of(mrd),
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
