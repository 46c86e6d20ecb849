"""DICOM in and out: folders of MR instances -> :class:`vne.exam.data.Exam`, and derived series -> files.

Reading (:func:`read_dicom_folder`) walks a folder at any depth, skips what is not a usable 2D
MR image (with a logged reason naming the file), classifies every instance with
:func:`vne.exam.roles.classify`, and converts pixels to physical units:

- RescaleSlope / RescaleIntercept are applied;
- phase images (Role.IR_PHASE) become radians: Siemens stores 0..4095 with slope 2 and
  intercept -4096, so the rescaled value ``v`` in [-4096, 4096) is ``v / 4096 * pi``; without a
  rescale intercept the raw 12-bit value ``r`` becomes ``(r - 2048) / 2048 * pi``;
- T1 maps are multiplied by :func:`vne.exam.roles.t1_scale_from_meta` (Gadgetron ``x10`` maps -> ms).

Geometry: DICOM ImagePositionPatient is the centre of the first pixel; :class:`Geometry` holds
the image centre (:func:`vne.exam.geometry.centre_from_first_pixel`).

Writing (:func:`write_series`) makes Siemens-like MR Image Storage files, one per image, written
into a temporary folder and then renamed into place, so a failure never leaves half a series.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ..errors import InputError
from ..exam.data import Exam, Geometry, MRImage, Role
from ..exam.geometry import centre_from_first_pixel, first_pixel_from_centre
from .atomic import move_into
from ..exam.roles import DEFAULT_RULES, RoleRules, classify, inversion_time_from_meta, rendering_reason, t1_scale_from_meta

log = logging.getLogger(__name__)

# Header fields copied into MRImage.meta (as text, or a list of text for multi-valued ones).
META_KEYWORDS = (
    "ImageType", "ImageComments", "SequenceName", "SeriesNumber", "InstanceNumber", "SeriesDescription",
    "ProtocolName", "SeriesInstanceUID", "SOPInstanceUID", "InversionTime", "TriggerTime", "NominalInterval",
    "SliceLocation", "AcquisitionNumber", "AcquisitionTime", "SeriesTime", "StudyDescription", "StudyDate",
    "StudyTime", "PatientName", "EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength",
    "Manufacturer", "ManufacturerModelName", "CardiacNumberOfImages", "HeartRate", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "MRAcquisitionType", "SliceThickness",
)
SIEMENS_PHASE_SLOPE = 2.0
SIEMENS_PHASE_INTERCEPT = -4096.0
SIEMENS_PHASE_SCALE = 4096.0  # rescaled phase value per pi
UINT16_MAX = 65535


# ----------------------------------------------------------------------------- reading


def _text(v: Any) -> Any:
    """A pydicom value as text, or a list of text for multi-valued elements."""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [str(x) for x in v]
    return str(v)


def _float(ds: Dataset | Mapping[str, Any], keyword: str) -> float | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        f = float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
    except (TypeError, ValueError, IndexError):
        return None
    return f if math.isfinite(f) else None


def _meta(ds: Dataset) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for kw in META_KEYWORDS:
        if kw in ds and ds.get(kw) not in (None, ""):
            meta[kw] = _text(ds.get(kw))
    if "ImageType" in meta and isinstance(meta["ImageType"], str):
        meta["ImageType"] = [t for t in meta["ImageType"].split("\\")]
    return meta


def _geometry(ds: Dataset) -> Geometry:
    try:
        ipp = [float(x) for x in ds.ImagePositionPatient]
        iop = [float(x) for x in ds.ImageOrientationPatient]
        dy, dx = (float(x) for x in ds.PixelSpacing)
        shape = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"no usable geometry ({exc.__class__.__name__}: {exc})") from None
    if len(ipp) != 3 or len(iop) != 6:
        raise InputError("ImagePositionPatient / ImageOrientationPatient have the wrong length")
    read_dir, phase_dir = iop[:3], iop[3:]
    centre = centre_from_first_pixel(ipp, read_dir, phase_dir, (dy, dx), shape)
    thickness = _float(ds, "SliceThickness")
    geom = Geometry(
        position_mm=tuple(float(c) for c in centre),
        read_dir=tuple(read_dir),
        phase_dir=tuple(phase_dir),
        pixel_spacing_mm=(dy, dx),
        shape=shape,
        slice_thickness_mm=thickness if thickness and thickness > 0 else 8.0,
    )
    geom.validate()
    return geom.normalised()


def _phase_radians(raw: np.ndarray, ds: Dataset | Mapping[str, Any]) -> np.ndarray:
    """A phase image's stored values -> radians, from a dataset or its two rescale fields (a dict)."""
    slope = _float(ds, "RescaleSlope")
    intercept = _float(ds, "RescaleIntercept")
    if intercept is not None and intercept < 0:
        v = raw * (slope if slope else 1.0) + intercept
        return (v / SIEMENS_PHASE_SCALE * np.pi).astype(np.float32)
    if raw.min() >= 0 and raw.max() <= 4095:
        return ((raw - 2048.0) / 2048.0 * np.pi).astype(np.float32)
    return (raw * (slope if slope else 1.0) + (intercept or 0.0)).astype(np.float32)  # assume radians


def _image_from_dataset(ds: Dataset, path: Path, rules: RoleRules) -> MRImage:
    """One MRImage from a dataset; InputError with the reason when it is not usable."""
    if "PixelData" not in ds:
        raise InputError("no pixel data")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        raise InputError(f"colour image ({photometric}, {spp} samples per pixel)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InputError(f"not a 2D image ({frames} frames)")
    meta = _meta(ds)
    why = rendering_reason(meta, rules)
    if why:
        raise InputError(why)
    geom = _geometry(ds)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken / unsupported pixel data
        raise InputError(f"unreadable pixel data ({exc.__class__.__name__}: {exc})") from None
    if raw.ndim != 2:
        raise InputError(f"not a 2D image (pixel array shape {raw.shape})")
    if raw.shape != geom.shape:
        raise InputError(f"pixel array {raw.shape} does not match Rows/Columns {geom.shape}")
    if photometric == "MONOCHROME1":
        raw = raw.max() - raw  # rare for MR; keep "bright = high"
    role, reason = classify(meta, rules=rules)
    meta["RoleReason"] = reason
    raw = raw.astype(np.float64)
    if role == Role.IR_PHASE:
        pixels = _phase_radians(raw, ds)
    else:
        slope = _float(ds, "RescaleSlope")
        intercept = _float(ds, "RescaleIntercept")
        pixels = raw * (slope if slope is not None else 1.0) + (intercept or 0.0)
        if role == Role.T1_MAP:
            pixels = pixels * t1_scale_from_meta(meta)
        pixels = pixels.astype(np.float32)
    nominal = _float(ds, "NominalInterval")
    heart_rate = _float(ds, "HeartRate")
    rr = nominal if nominal and nominal > 0 else (60000.0 / heart_rate if heart_rate and heart_rate > 0 else None)
    return MRImage(
        pixels=pixels,
        geometry=geom,
        role=role,
        series=str(ds.get("SeriesInstanceUID", "")),
        series_description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or ""),
        inversion_time_ms=inversion_time_from_meta(meta),
        trigger_time_ms=_float(ds, "TriggerTime"),
        rr_interval_ms=rr,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        meta=meta,
        source=str(path),
    )


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError)


def _dcmread(f: Path) -> Dataset | None:
    """The dataset, or None when ``f`` is not DICOM. Files without the 128-byte preamble are
    accepted when a forced read finds an image (SOPClassUID, Rows and PixelData)."""
    try:
        return pydicom.dcmread(f)
    except InvalidDicomError:
        pass
    except _READ_ERRORS:
        return None
    pd_log = logging.getLogger("pydicom")
    level = pd_log.level
    try:
        pd_log.setLevel(logging.ERROR)  # a forced read of a text file warns about "VR"s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, force=True)
        if all(k in ds for k in ("SOPClassUID", "Rows", "PixelData")):
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                implicit, little = getattr(ds, "original_encoding", (True, True))
                ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian if implicit
                    else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
            return ds
    except _READ_ERRORS:
        pass
    except Exception:  # a forced read of arbitrary bytes can fail in many ways
        pass
    finally:
        pd_log.setLevel(level)
    return None


def read_dicom_folder(path, *, rules: RoleRules = DEFAULT_RULES) -> list[Exam]:
    """Read every DICOM MR image under ``path`` (any nesting) into exams, one per study.

    Args:
        path: a folder (or a single DICOM file).
        rules: role rules for :func:`vne.exam.roles.classify`.

    Returns:
        Exams ordered by first appearance; images ordered by (SeriesNumber, InstanceNumber).

    Raises:
        InputError: the path does not exist, or holds no usable DICOM image (the reason names
            the skipped files).
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"DICOM folder {root} does not exist")
    files = _files(root)
    if not files:
        raise InputError(f"DICOM folder {root} is empty")
    exams: "OrderedDict[str, Exam]" = OrderedDict()
    skipped: list[str] = []
    for f in files:
        ds = _dcmread(f)
        if ds is None:
            log.warning("skipping %s: not a readable DICOM file", f)
            skipped.append(f"{f.name}: not DICOM")
            continue
        if f.name.upper() == "DICOMDIR" or "PixelData" not in ds:
            log.info("skipping %s: no pixel data", f)
            skipped.append(f"{f.name}: no pixel data")
            continue
        try:
            im = _image_from_dataset(ds, f, rules)
        except InputError as exc:
            log.warning("skipping %s: %s", f, exc)
            skipped.append(f"{f.name}: {exc}")
            continue
        exam = exams.get(im.study_uid)
        if exam is None:
            exam = exams[im.study_uid] = Exam(study_uid=im.study_uid, patient_id=im.patient_id, source=str(root))
        exam.images.append(im)
    if not exams:
        detail = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise InputError(f"no usable DICOM images in {root} ({detail})")

    def order(im: MRImage):
        def num(key):
            try:
                return int(float(im.meta.get(key, 0)))
            except (TypeError, ValueError):
                return 0
        return (num("SeriesNumber"), im.series, num("InstanceNumber"), im.source)

    for exam in exams.values():
        exam.images.sort(key=order)
    return list(exams.values())


# ----------------------------------------------------------------------------- writing


def _ds(x: float) -> str:
    """A float as a DICOM DS string (at most 16 characters)."""
    for digits in (10, 9, 8, 7, 6):
        s = f"{float(x):.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{float(x):.6e}"[:16]


def choose_rescale(data: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that ``stored = round((value - intercept) / slope)`` fits uint16.

    Non-negative data within [0, 65535] whose range is at least 4095 (or that are integers) are
    stored as they are (slope 1, intercept 0: T1 in whole ms, magnitudes); otherwise the range
    is spread over 0..65535 (error at most range / 131070).
    """
    finite = np.asarray(data, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 1.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    integers = bool(np.all(np.abs(finite - np.round(finite)) < 1e-6))
    if lo >= 0 and hi <= UINT16_MAX and (integers or hi - lo >= 4095):
        return 1.0, 0.0
    if hi == lo:
        return 1.0, float(_ds(math.floor(lo)))
    slope = float(_ds((hi - lo) / UINT16_MAX * (1 + 1e-6)))
    intercept = float(_ds(lo))
    if intercept > lo:  # DS rounding must not push values below 0
        intercept = float(_ds(lo - abs(slope)))
    return slope, intercept


def _encode(pixels: np.ndarray, role: Role, rescale: tuple[float, float] | None) -> tuple[np.ndarray, float, float]:
    px = np.nan_to_num(np.asarray(pixels, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if role == Role.IR_PHASE and rescale is None:
        v = np.angle(np.exp(1j * px)) / np.pi * SIEMENS_PHASE_SCALE  # [-4096, 4096]
        stored = np.round((v - SIEMENS_PHASE_INTERCEPT) / SIEMENS_PHASE_SLOPE)
        return np.clip(stored, 0, 4095).astype(np.uint16), SIEMENS_PHASE_SLOPE, SIEMENS_PHASE_INTERCEPT
    slope, intercept = rescale if rescale is not None else choose_rescale(px)
    stored = np.round((px - intercept) / slope)
    return np.clip(stored, 0, UINT16_MAX).astype(np.uint16), float(slope), float(intercept)


def _dataset(im: MRImage, *, instance: int, series_number: int, image_type: list[str], series_uid: str,
             series_description: str, frame_uid: str, study_uid: str, rescale) -> Dataset:
    now = datetime.datetime.now()
    sop_uid = generate_uid()
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = MRImageStorage
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    meta = im.meta or {}
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = [str(t).upper()[:16] for t in image_type]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = str(meta.get("StudyDate", now.strftime("%Y%m%d")))
    ds.StudyTime = str(meta.get("StudyTime", now.strftime("%H%M%S")))
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.Modality = "MR"
    ds.Manufacturer = str(meta.get("Manufacturer", "vne"))
    ds.SeriesDescription = series_description[:64]
    ds.PatientName = str(meta.get("PatientName", im.patient_id or "anonymous"))
    ds.PatientID = im.patient_id or ""
    ds.ScanningSequence = meta.get("ScanningSequence", "IR" if im.inversion_time_ms else "GR")
    ds.SequenceVariant = meta.get("SequenceVariant", "NONE")
    ds.ScanOptions = meta.get("ScanOptions", "")
    ds.MRAcquisitionType = str(meta.get("MRAcquisitionType", "2D"))
    if "SequenceName" in meta:
        ds.SequenceName = str(meta["SequenceName"])[:16]
    ds.SliceThickness = _ds(im.geometry.slice_thickness_mm)
    if im.inversion_time_ms is not None:
        ds.InversionTime = _ds(im.inversion_time_ms)
    if im.trigger_time_ms is not None:
        ds.TriggerTime = _ds(im.trigger_time_ms)
    if im.rr_interval_ms is not None and im.rr_interval_ms > 0:
        ds.NominalInterval = int(round(im.rr_interval_ms))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = int(instance)
    geom = im.geometry
    ds.ImagePositionPatient = [_ds(v) for v in first_pixel_from_centre(geom)]
    ds.ImageOrientationPatient = [_ds(v) for v in (*geom.read_dir, *geom.phase_dir)]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(np.asarray(geom.position_mm, float) @ geom.slice_dir))
    comments = meta.get("ImageComments")
    if comments:
        ds.ImageComments = " ".join(comments) if isinstance(comments, list) else str(comments)
    stored, slope, intercept = _encode(im.pixels, im.role, rescale)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [_ds(geom.pixel_spacing_mm[0]), _ds(geom.pixel_spacing_mm[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "US"
    values = stored.astype(np.float64) * slope + intercept
    lo, hi = float(np.percentile(values, 1)), float(np.percentile(values, 99))
    ds.WindowCenter = _ds((lo + hi) / 2)
    ds.WindowWidth = _ds(max(hi - lo, 1e-3))
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "series"


def write_series(
    images: list[MRImage],
    folder,
    *,
    series_number: int,
    image_type: list[str],
    series_uid: str | None = None,
    series_description: str | None = None,
    rescale: tuple[float, float] | None = None,
) -> list[Path]:
    """Write images as one Siemens-like MR Image Storage series, one file per image.

    Geometry (ImagePositionPatient from the centre, ImageOrientationPatient, PixelSpacing,
    SliceThickness, SliceLocation), StudyInstanceUID / FrameOfReferenceUID / PatientID, TIs,
    trigger times, NominalInterval and ``meta['ImageComments']`` come from each image. Pixels are
    uint16 with RescaleSlope / Intercept from :func:`choose_rescale` (or ``rescale``); IR phase
    images use the Siemens convention (slope 2, intercept -4096, radians -> +-4096).

    Files go to a temporary folder next to ``folder`` first and are renamed into ``folder``
    (created if needed) only when all are written.

    Args:
        images: the images, in instance order (1, 2, ...).
        folder: the output folder.
        series_number: DICOM SeriesNumber.
        image_type: DICOM ImageType values, e.g. ``["DERIVED", "PRIMARY", "T1 MAP"]``.
        series_uid: SeriesInstanceUID (default: a new one).
        series_description: SeriesDescription (default: the first image's).
        rescale: force (slope, intercept) for every image.

    Returns:
        The written file paths, in instance order.

    Raises:
        InputError: no images, or images from different studies.
    """
    if not images:
        raise InputError("write_series: no images to write")
    studies = {im.study_uid for im in images}
    if len(studies) > 1:
        raise InputError(f"write_series: images come from {len(studies)} different studies")
    folder = Path(folder)
    study_uid = images[0].study_uid or generate_uid()
    frame_uid = images[0].frame_of_reference_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    desc = series_description if series_description is not None else images[0].series_description
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    names = []
    try:
        for i, im in enumerate(images, start=1):
            ds = _dataset(
                im, instance=i, series_number=series_number, image_type=list(image_type), series_uid=series_uid,
                series_description=desc or "", frame_uid=im.frame_of_reference_uid or frame_uid,
                study_uid=study_uid, rescale=rescale,
            )
            name = f"IM-{int(series_number):04d}-{i:04d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            names.append(name)
        move_into(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / n for n in names]


def series_folder_name(series_number: int, description: str) -> str:
    """A file-system-safe folder name for a series, e.g. ``1012_ShMOLLI_T1MAP_VNE``."""
    return f"{int(series_number)}_{_safe_name(description)}"
