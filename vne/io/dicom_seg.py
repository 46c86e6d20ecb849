"""DICOM Segmentation objects (DICOM-SEG), read with highdicom, and their frames on a T1 map's grid.

- :func:`read_dicom_seg`: a Segmentation Storage object, BINARY or FRACTIONAL, parsed and checked
  by highdicom (``highdicom.seg.segread``; frames are decoded only when asked for).
  From it: the segments (number, SegmentLabel, SegmentDescription, the segmented property type's
  CodeMeaning), the referenced source instances, and per frame its segment, its plane (the
  Plane Position / Plane Orientation / Pixel Measures functional groups, per frame or shared)
  and the ReferencedSOPInstanceUIDs of its DerivationImageSequence / SourceImageSequence.
- :func:`seg_frames_for`: the frames on a T1 map: those that reference its SOPInstanceUID; when
  none does, those in its plane (same FrameOfReferenceUID, or the same study when either has
  none; the :func:`vne.exam.geometry.planes_match` rule, the nearest plane wins).
- :func:`segment_on_grid`: one segment's frames on a T1 map, united, nearest-neighbour on its
  grid (identity when the grids agree); a segment without a frame there is empty (writers omit
  empty frames). BINARY frames are 0/1, FRACTIONAL ones are scaled by MaximumFractionalValue.

Which segment is which mask is :mod:`vne.io.masks`' business; see ``docs/masks.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag

from ..errors import InputError, reason
from ..exam.data import Geometry, MRImage
from ..exam.geometry import centre_from_first_pixel, plane_distance_mm, planes_match, resample_to_grid, same_grid, same_plane

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


@dataclass
class SegFrame:
    """One frame of a segmentation: its segment, plane (None if not given) and referenced images."""

    index: int
    segment: int
    geometry: Geometry | None
    refs: frozenset[str]


@dataclass
class SegSegment:
    number: int
    label: str
    description: str = ""
    property_type: str = ""


@dataclass
class DicomSeg:
    """A DICOM Segmentation object: its segments and frames (pixels are read on demand, :meth:`frame`)."""

    path: Path
    segments: dict[int, SegSegment]
    frames: list[SegFrame]
    rows: int
    columns: int
    fractional: bool
    max_fractional: float
    frame_of_reference_uid: str
    study_uid: str
    referenced: frozenset[str]
    source: Any = field(default=None, repr=False, compare=False)  # the highdicom Segmentation (frames decoded on demand)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (from 0) as (rows, columns) float32: 0/1 for BINARY, the fraction 0..1 for FRACTIONAL."""
        try:
            px = np.asarray(self.source.get_stored_frame(index, as_index=True), np.float32)
        except Exception as exc:  # highdicom / pydicom raise many types for broken pixel data
            raise InputError(f"{self.path}: unreadable segmentation pixel data ({_why(exc)})") from None
        if px.shape != (self.rows, self.columns):
            raise InputError(f"{self.path}: frame {index + 1} is {px.shape}, not {self.rows}x{self.columns}")
        return px / self.max_fractional if self.fractional else px


def _highdicom():
    try:
        import highdicom
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise InputError("reading DICOM-SEG masks needs highdicom (pip install highdicom)") from None
    return highdicom


def _why(exc: Exception) -> str:
    """:func:`vne.errors.reason`, naming the element for a KeyError on a DICOM tag (a missing sequence)."""
    tag = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if isinstance(tag, int):
        return f"no {keyword_for_tag(tag) or 'element'} {Tag(tag)}"
    return reason(exc)


def _item(fg, shared, seq: str):
    """The first item of functional group ``seq``: the frame's own, else the shared one."""
    for group in (fg, shared):
        if group is not None and seq in group and len(group[seq].value):
            return group[seq].value[0]
    return None


def _frame_geometry(fg, shared, rows: int, cols: int) -> Geometry | None:
    """The frame's plane from its functional groups, or None when they do not give a valid one."""
    pos, ori, meas = (_item(fg, shared, s) for s in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
    try:
        ipp = [float(v) for v in pos.ImagePositionPatient]
        iop = [float(v) for v in ori.ImageOrientationPatient]
        dy, dx = (float(v) for v in meas.PixelSpacing)
        thick = float(meas.get("SliceThickness", 0) or 0)
        centre = centre_from_first_pixel(ipp, iop[:3], iop[3:], (dy, dx), (rows, cols))
        geom = Geometry(position_mm=tuple(float(c) for c in centre), read_dir=tuple(iop[:3]), phase_dir=tuple(iop[3:]),
                        pixel_spacing_mm=(dy, dx), shape=(rows, cols), slice_thickness_mm=thick if thick > 0 else 8.0)
        geom.validate()
        return geom.normalised()
    except (AttributeError, TypeError, ValueError, InputError):
        return None


def _frame_refs(fg, shared) -> set[str]:
    refs = set()
    for group in (fg, shared):
        for der in (group.get("DerivationImageSequence", []) if group is not None else []):
            for src in der.get("SourceImageSequence", []):
                if "ReferencedSOPInstanceUID" in src:
                    refs.add(str(src.ReferencedSOPInstanceUID))
    return refs


def read_dicom_seg(path, ds=None) -> DicomSeg:
    """The segments and frames of a DICOM-SEG file, read with highdicom (``ds``: its header, if already read).

    Raises:
        InputError: not a Segmentation Storage object, a LABELMAP segmentation, a file that
            highdicom refuses (the reason given), or frames without a segment number.
    """
    path = Path(path)
    if ds is None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})") from None
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise InputError(f"{path}: not a DICOM Segmentation (SOPClassUID {ds.get('SOPClassUID', 'missing')})")
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if seg_type not in ("BINARY", "FRACTIONAL"):
        raise InputError(f"{path}: {seg_type} segmentations are not supported (need BINARY or FRACTIONAL: the masks overlap)")
    if not ds.get("SegmentSequence"):
        raise InputError(f"{path}: segmentation has no SegmentSequence")
    hd = _highdicom()
    try:
        # the whole object: highdicom's lazy frame retrieval misreads BINARY frames whose pixel count is not a multiple of 8
        seg = hd.seg.segread(path)
        segments = {int(s.segment_number): SegSegment(int(s.segment_number), str(s.segment_label),
                                                      str(s.get("SegmentDescription", "") or ""), str(s.segmented_property_type.meaning))
                    for s in seg.SegmentSequence}
        sources = seg.get_source_image_uids()
    except Exception as exc:  # highdicom raises many types for what the standard does not allow
        raise InputError(f"{path}: not a valid DICOM Segmentation ({_why(exc)})") from None
    shared = seg.SharedFunctionalGroupsSequence[0]
    per_frame = list(seg.get("PerFrameFunctionalGroupsSequence", []))
    n_frames = int(seg.number_of_frames)
    if per_frame and len(per_frame) != n_frames:
        raise InputError(f"{path}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
    rows, cols = int(seg.Rows), int(seg.Columns)
    if not seg.file_meta.TransferSyntaxUID.is_compressed and len(seg.PixelData) < get_expected_length(seg):
        raise InputError(f"{path}: unreadable segmentation pixel data ({len(seg.PixelData)} bytes for {n_frames} frames "
                         f"of {rows}x{cols}, need {get_expected_length(seg)})")
    frames = []
    referenced = {str(sop) for _, _, sop in sources}
    for f in range(n_frames):
        fg = per_frame[f] if per_frame else None
        ident = _item(fg, shared, "SegmentIdentificationSequence")
        if ident is None or "ReferencedSegmentNumber" not in ident:
            if len(segments) != 1:
                raise InputError(f"{path}: frame {f + 1} has no ReferencedSegmentNumber")
            number = next(iter(segments))
        else:
            number = int(ident.ReferencedSegmentNumber)
        refs = _frame_refs(fg, shared)
        referenced |= refs
        frames.append(SegFrame(f, number, _frame_geometry(fg, shared, rows, cols), frozenset(refs)))
    max_frac = float(seg.get("MaximumFractionalValue", 255) or 255) if seg_type == "FRACTIONAL" else 1.0
    return DicomSeg(path=path, segments=segments, frames=frames, rows=rows, columns=cols, fractional=seg_type == "FRACTIONAL",
                    max_fractional=max_frac, frame_of_reference_uid=str(seg.get("FrameOfReferenceUID", "")),
                    study_uid=str(seg.get("StudyInstanceUID", "")), referenced=frozenset(referenced), source=seg)


def seg_covers(seg: DicomSeg, t1: MRImage) -> bool:
    """Whether ``seg`` segments this T1 map: it references the instance, or a frame lies on it."""
    sop = str(t1.meta.get("SOPInstanceUID", ""))
    return bool(sop and sop in seg.referenced) or bool(seg_frames_for(seg, t1))


def seg_frames_for(seg: DicomSeg, t1: MRImage) -> list[SegFrame]:
    """The frames of ``seg`` on the T1 map: those referencing it, else those in its plane."""
    sop = str(t1.meta.get("SOPInstanceUID", ""))
    by_ref = [f for f in seg.frames if sop and sop in f.refs]
    if by_ref:
        return by_ref
    same_space = ((seg.frame_of_reference_uid and seg.frame_of_reference_uid == t1.frame_of_reference_uid)
                  or (not (seg.frame_of_reference_uid and t1.frame_of_reference_uid) and seg.study_uid and seg.study_uid == t1.study_uid))
    if not same_space:
        return []
    target = t1.geometry
    matching = [(plane_distance_mm(f.geometry, target), f) for f in seg.frames
                if f.geometry is not None and planes_match(f.geometry, target)[0]]
    if not matching:
        return []
    best = min(matching, key=lambda x: x[0])[1]
    return [f for _, f in matching if f.geometry is not None and best.geometry is not None and same_plane(f.geometry, best.geometry)]


def segment_on_grid(seg: DicomSeg, frames: Sequence[SegFrame], number: int, target: Geometry) -> np.ndarray:
    """Segment ``number`` of ``seg`` on the target grid: its frames among ``frames`` (those on one
    T1 map, :func:`seg_frames_for`), nearest-neighbour, united (the pixel-wise maximum).

    Returns:
        (H, W) float32 on ``target``, zero where the segment has no frame.

    Raises:
        InputError: a frame that references the T1 map lies off its plane, or a frame without a
            plane position is not the T1 map's shape.
    """
    acc = np.zeros(target.shape, np.float32)
    for f in frames:
        if f.segment != number:
            continue
        px = seg.frame(f.index)
        if f.geometry is not None:
            ok, why = planes_match(f.geometry, target)
            if not ok:
                raise InputError(f"{seg.path}: frame {f.index + 1} references the T1 map but is off its plane ({why})")
            on_grid = px if same_grid(f.geometry, target) else resample_to_grid(px, f.geometry, target, order=0)[0]
        elif px.shape == tuple(target.shape):
            on_grid = px
        else:
            raise InputError(f"{seg.path}: frame {f.index + 1} has no plane position and is {px.shape}, "
                             f"the T1 map is {tuple(target.shape)}")
        acc = np.maximum(acc, on_grid)
    return acc
