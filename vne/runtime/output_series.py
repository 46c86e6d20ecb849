"""The VNE series a stream gets back: numbering, UIDs, meta, pixels, and the image itself.

A VNE image is a new derived series on its T1 map's grid (documented in docs/gadget.md):

- ``image_series_index``: the ``series_index`` property if set, else the T1 map's series index
  + ``series_index_offset`` (1000), so T1 series 4 gives VNE series 1004 (DICOM SeriesNumber
  likewise); ``image_index`` counts 1, 2, ... within the VNE series (:class:`SeriesNumbering`);
- pixels: ``stored = vne * output_scale + output_offset`` as float32 (default; offset 0) or
  uint16 (offset 1000 by default, clipped to 0..65535; :func:`stored_pixels`); the meta
  ``RescaleSlope`` / ``RescaleIntercept`` give ``vne = stored * slope + intercept`` back;
- the header (position, directions, field of view, slice, ...) is the T1 map's
  (:func:`to_mrd_image`); the meta (:func:`vne_meta`) names the model, the inputs, the guard's
  verdict and the image processing history, whose ``VNE`` entry marks our own outputs
  (:func:`is_vne_output`), which are never taken as inputs.

``vne`` values are in normalised PSIR units (remote myocardium ~0, LV blood ~1).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import ismrmrd
import numpy as np

from ..exam.data import MRImage, Role
from ..exam.roles import meta_values
from ..io.mrd.image import to_mrd
from ..prepare import roi
from .config import PIXEL_TYPES, PipelineConfig
from .qc import QCResult

VNE_TAG = "VNE"


@dataclass
class VNEResult:
    """One VNE image, before it is encoded for the stream or DICOM.

    Attributes:
        vne: (H, W) float32 in normalised PSIR units, on the T1 map's grid.
        t1: the T1 map it was made for; ``t1_mrd`` its ISMRMRD image when it came from a stream.
    """

    key: str
    t1: MRImage
    t1_mrd: Any
    vne: np.ndarray
    series_index: int
    image_index: int
    series_uid: str
    description: str
    meta: dict
    cine_source: str
    seconds: float
    qc: QCResult | None = None
    window: tuple | None = None     # (rows, cols) of the T1 grid the model ran on (vne.prepare.roi)
    timings: dict = field(default_factory=dict)   # ms per step (vne.runtime.inference), match .. output


def history(meta: dict) -> list[str]:
    """The image processing history of an image's meta (every spelling of the key)."""
    return meta_values(meta, "history")


def is_vne_output(meta: dict) -> bool:
    """Whether an image is a VNE output (ours), which is never an input."""
    if any(h.upper() == VNE_TAG for h in history(meta)):
        return True
    if "VNE_ModelName" in meta:
        return True
    if any(t.upper() == VNE_TAG for t in meta_values(meta, "image_type")):
        return True
    return False


def new_uid() -> str:
    """A new DICOM UID (``2.25.`` + a random 128-bit UUID as a decimal)."""
    return "2.25." + str(uuid.uuid4().int)


def meta_first(meta: dict, key: str) -> str:
    """The first value of ``meta[key]`` as text ('' when absent or empty)."""
    v = meta.get(key)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else ""
    return str(v) if v else ""


class SeriesNumbering:
    """The VNE series of one stream: their numbers, UIDs and image counters.

    Not thread-safe: the caller holds its lock (slices may finish in any order, in any worker).
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.max_series_seen = 0      # the largest input image_series_index: the base without one on the T1 map
        self._series: dict[int, dict] = {}

    def note_input(self, series_index: int) -> None:
        """An input image of series ``series_index`` arrived."""
        self.max_series_seen = max(self.max_series_seen, int(series_index))

    def next_image(self, t1: MRImage) -> tuple[int, str, int]:
        """(series index 0..65535, series UID, image index from 1) of the next VNE image for ``t1``."""
        if self.config.series_index is not None:
            index = int(self.config.series_index)
        else:
            base = self.max_series_seen
            for candidate in (t1.series, t1.meta.get("SeriesNumber")):  # ISMRMRD index, else DICOM number
                try:
                    base = int(str(candidate))
                    break
                except (TypeError, ValueError):
                    continue
            index = base + int(self.config.series_index_offset)
        index = min(max(index, 0), 65535)
        st = self._series.get(index)
        if st is None:
            st = self._series[index] = {"index": index, "uid": new_uid(), "next": 1}
        image_index = st["next"]
        st["next"] += 1
        return st["index"], st["uid"], image_index


def series_description(t1: MRImage, config: PipelineConfig, qc: QCResult | None) -> str:
    """The T1 map's series description + ``description_suffix`` (+ ``_QCFAIL`` when the guard failed)."""
    base = t1.series_description or "T1"
    return base + config.description_suffix + ("" if qc is None or qc.passed else "_QCFAIL")


def display_window(config: PipelineConfig) -> tuple[int, int]:
    """(WindowCenter, WindowWidth) in stored units for ``window_low`` .. ``window_high`` (VNE units)."""
    c = config
    lo = c.window_low * c.output_scale + c.offset
    hi = c.window_high * c.output_scale + c.offset
    return int(round((lo + hi) / 2)), max(1, int(round(hi - lo)))


def vne_meta(config: PipelineConfig, model, t1: MRImage, desc: str, uid: str, s, cine_source: str,
             qc: QCResult | None = None, prep=None) -> dict:
    """The meta (ISMRMRD and DICOM fields) of a VNE image.

    Args:
        model: the :class:`vne.runtime.model.VNEModel` that made it (name, version, file).
        t1: its T1 map (study UIDs, history, patient and study fields are carried over).
        desc: the series description; ``uid``: the series instance UID.
        s: the slice's :class:`vne.exam.SliceSet` (its key and inputs are recorded).
        cine_source: ``"stream"`` or ``"study cache"``.
        qc: the guard's verdict (None: qc off); ``prep``: the :class:`vne.runtime.inference.Prepared`
            slice (its model window is recorded as ``VNE_Region``).
    """
    c = config
    m = model
    center, width = display_window(c)
    hist = [h for h in history(t1.meta)] + ["AI", VNE_TAG]
    comment = f"VNE {m.name} {m.version}"
    if qc is not None:
        comment += f" QC {qc.verdict} {qc.score:.2f}" + ("" if qc.passed else f": {qc.reason}")
    slope = 1.0 / c.output_scale
    intercept = -c.offset / c.output_scale
    study_uid = t1.study_uid or meta_first(t1.meta, "StudyInstanceUID")
    for_uid = t1.frame_of_reference_uid or meta_first(t1.meta, "FrameOfReferenceUID")
    meta = {
        "DataRole": c.data_role, "GADGETRON_DataRole": c.data_role,
        "SeriesDescription": desc, "SequenceDescription": desc, "GADGETRON_SeqDescription": desc,
        "SequenceDescriptionAdditional": VNE_TAG,
        "ImageProcessingHistory": hist, "GADGETRON_ImageProcessingHistory": hist,
        "ImageComments": comment, "GADGETRON_ImageComment": comment,
        "ImageType": ["DERIVED", "PRIMARY", VNE_TAG, "AI"],
        "WindowCenter": str(center), "WindowWidth": str(width),
        "GADGETRON_WindowCenter": str(center), "GADGETRON_WindowWidth": str(width),
        "RescaleSlope": f"{slope:.10g}", "RescaleIntercept": f"{intercept:.10g}",
        "Keep_image_geometry": "1",
        "SeriesInstanceUID": uid, "SeriesNumberRangeNameUID": uid,
        "VNE_ModelName": m.name, "VNE_ModelVersion": m.version, "VNE_ModelFile": m.path.name,
        "VNE_Units": "normalised PSIR (remote myocardium ~0, LV blood ~1) = stored * RescaleSlope + RescaleIntercept",
        "VNE_SourceSeries": str(t1.series), "VNE_Slice": s.key, "VNE_CineSource": cine_source,
        "VNE_Inputs": f"{len(s.cine_frames)} cine, {len(s.ir_images)} IR ({'with' if s.ir_phase else 'without'} phase)",
        "VNE_QC": qc.verdict if qc is not None else "OFF",
    }
    if prep is not None:
        # where the model ran; the rest of the grid holds the background value (vne.prepare.roi)
        meta["VNE_Region"] = roi.describe(prep.window, prep.shape)
    if qc is not None:
        meta["VNE_QCScore"] = f"{qc.score:.3f}"
        if not qc.passed:
            meta["VNE_QCReason"] = qc.reason
    if study_uid:
        meta["StudyInstanceUID"] = study_uid
    if for_uid:
        meta["FrameOfReferenceUID"] = for_uid
    # no TriggerTime: an image with one and no other role reads as cine to some rules
    for k in ("PatientName", "StudyDate", "StudyTime", "StudyDescription"):
        if k in t1.meta:
            meta[k] = t1.meta[k]
    return meta


def stored_pixels(vne: np.ndarray, config: PipelineConfig) -> np.ndarray:
    """VNE values (H, W) -> stored pixels of the configured type (:attr:`PipelineConfig.pixel_type`)."""
    c = config
    v = np.asarray(vne, np.float64) * c.output_scale + c.offset
    if c.pixel_type == "uint16":
        return np.clip(np.rint(v), 0, 65535).astype(np.uint16)
    return v.astype(np.float32)


def to_mrd_image(r: VNEResult, config: PipelineConfig) -> ismrmrd.Image:
    """The VNE image for the stream: the T1 map's header, a new series, new meta."""
    data = stored_pixels(r.vne, config)
    meta = ismrmrd.Meta()
    for k, v in r.meta.items():
        meta[k] = [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
    if r.t1_mrd is not None:
        head = r.t1_mrd.getHead()
        img = ismrmrd.Image(head, data=data[None, None])
    else:
        img = to_mrd(MRImage(pixels=data, geometry=r.t1.geometry, role=Role.UNKNOWN),
                            series_index=r.series_index, image_index=r.image_index,
                            dtype=PIXEL_TYPES[config.pixel_type], meta={})
    img.image_series_index = r.series_index
    img.image_index = r.image_index
    img.image_type = ismrmrd.IMTYPE_MAGNITUDE
    img.meta = meta
    return img


def to_dicom_image(r: VNEResult) -> MRImage:
    """The VNE as an :class:`MRImage` in VNE units for :func:`vne.io.dicom.write_series`."""
    keep: dict[str, Any] = {k: r.t1.meta[k] for k in ("PatientName", "StudyDate", "StudyTime", "StudyDescription", "Manufacturer")
            if k in r.t1.meta}
    keep["ImageComments"] = r.meta["ImageComments"]
    return MRImage(pixels=r.vne, geometry=r.t1.geometry, role=Role.UNKNOWN, series=r.series_uid,
                   series_description=r.description, study_uid=r.t1.study_uid,
                   frame_of_reference_uid=r.t1.frame_of_reference_uid, patient_id=r.t1.patient_id,
                   meta=keep, source=r.t1.source)
