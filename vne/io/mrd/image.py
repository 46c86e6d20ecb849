"""One ISMRMRD image <-> one :class:`vne.exam.data.MRImage`: pixels, geometry, role, times, meta.

ISMRMRD conventions used here (``../shared/docs/scanner-streams.md``):
- image data ``[cha, z, y, x]``; we read channel 0, z 0, as ``(ny, nx)``;
- ``position`` is the image centre (mm), ``read_dir`` along x, ``phase_dir`` along y;
- ``field_of_view`` is (fov_x, fov_y, slice thickness) in mm, ``matrix_size`` (nx, ny, 1);
- ``physiology_time_stamp[0]`` is the trigger time in 2.5 ms ticks (Siemens);
- meta values are strings or lists of strings;
- we only ever emit uint16, int16, float32 or complex64 data.

Images written by python-ismrmrd-server's dicom2mrd.py (a ``DicomJson`` meta) are read through
:mod:`vne.io.mrd.dicom2mrd`.
"""
from __future__ import annotations

from typing import cast

import ismrmrd
import numpy as np

from ...errors import InputError
from ...exam.data import Geometry, MRImage, Role
from .dicom2mrd import DICOM_JSON_KEY, complete_meta, dicom_json, geometry_from_dicom_json, normalise_meta, rescaled_pixels

PHYSIO_TICK_MS = 2.5  # one ``physiology_time_stamp`` tick, ms
EMITTABLE_DTYPES = (np.uint16, np.int16, np.float32, np.complex64)


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

    The ``(ny, nx)`` pixels become data ``[1, 1, ny, nx]`` (uint16 rounded and clipped to
    0-65535); ``field_of_view`` is (nx * dx, ny * dy, thickness) in mm, ``position`` the image
    centre (mm); the trigger time (ms) goes to ``physiology_time_stamp[0]`` in 2.5 ms ticks.
    ``meta`` defaults to ``image.meta``; every value is written as text.

    Raises:
        InputError: a ``dtype`` outside :data:`EMITTABLE_DTYPES`.
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
    """The :class:`Geometry` of an ISMRMRD image (data shape wins over a wrong matrix_size).

    ``shape`` is the data's last two sides ``(ny, nx)``, ``pixel_spacing_mm`` (dy, dx) =
    ``field_of_view`` (mm) / those sides, ``position_mm`` the stored ``position`` taken as the
    image centre; the slice thickness is ``slice_thickness_mm``, else ``field_of_view[2]``, else 8 mm.
    """
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


def _as_on_the_wire(value):
    """A meta value as ``ismrmrd.Meta`` reads it back from its XML: a string (None for an
    empty one), or a list of those for other than one value."""
    def text(v):
        return None if v is None else (str(v) or None)

    if type(value) is list:
        items = [text(v) for v in value]
        return items[0] if len(items) == 1 else items
    return text(value)


def meta_dict(mrd: ismrmrd.Image) -> dict:
    """The image's meta as a dict of strings / lists of strings (empty if it has none).

    ``ismrmrd.Image`` parses its meta XML when it is built (from bytes, a file or a string;
    unreadable XML fails there), and ``attribute_string`` only writes that ``ismrmrd.Meta`` out
    again. So the values are taken from the ``ismrmrd.Meta``, as its XML would read back
    (:func:`_as_on_the_wire`), without writing and parsing the XML (~0.2 ms an image)."""
    return {str(k): _as_on_the_wire(v) for k, v in mrd.meta.items()}


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

    The pixels are the data's ``[0, 0]`` plane, ``(ny, nx)`` float32 (T1 maps in ms); times in ms.

    Args:
        study: (study UID, frame of reference UID, patient ID) from the stream header.
        rules: :class:`vne.exam.roles.RoleRules` (defaults if None).

    Raises:
        InputError: complex or multi-channel / 3D data, which VNE cannot use.
    """
    from ...exam import roles

    rules = rules or roles.DEFAULT_RULES
    tag = source or f"series {mrd.image_series_index} image {mrd.image_index}"
    meta = normalise_meta(meta_dict(mrd))
    dj = dicom_json(meta, tag)
    data = np.asarray(mrd.data)
    if np.iscomplexobj(data):
        raise InputError(f"{tag}: complex image data (VNE needs magnitude, phase or map images)")
    if data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 1:
        raise InputError(f"{tag}: data shape {data.shape} is not one 2D image [1, 1, y, x]")
    geom = None
    if dj:
        meta = complete_meta(meta, dj)
        meta.pop(DICOM_JSON_KEY, None)  # tens of kB per image; the fields VNE uses are in meta now
        geom = geometry_from_dicom_json(dj, data.shape[-2:], tag, default_thickness=float(mrd.field_of_view[2]) or None)
        meta["VNE_GeometryFrom"] = "DicomJson" if geom is not None else "header"
        ids = ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID")
        study = cast("tuple[str, str, str]", tuple(s or (str(dj[k][0]) if k in dj else "") for s, k in zip(study, ids)))
    role, why = roles.classify(meta, image_type_code=int(mrd.image_type), rules=rules)
    pixels = data[0, 0].astype(np.float32)
    if dj:
        pixels = rescaled_pixels(pixels, role, dj, np.issubdtype(data.dtype, np.integer))
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
