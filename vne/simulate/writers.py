"""Write simulated cases as a scanner delivers them (ISMRMRD, DICOM) and as a training cache.

Meta follows Siemens and Gadgetron conventions (``../shared/docs/scanner-streams.md``) in one
of several spellings per case (``case.meta_style``), so role detection is exercised on the
variety seen in the field rather than on one house style.
"""
from __future__ import annotations

import numpy as np

from ..io import mrd as mrd_io
from ..prepare.contract import ModelContract, model_inputs
from ..exam.data import MRImage, Role
from ..exam.geometry import crop_geometry
from ..runtime.qc import check_inputs
from ..prepare.slices import assemble, on_t1_grid
from ..io.training_data import heart_crop_window, write_slice
from .case import SIMULATOR_VERSION, SimulatedCase

# Scanner order and series numbers: cine, IR magnitude, IR phase, T1 map, LGE.
SERIES_INDEX = {Role.CINE: 1, Role.IR_MAGNITUDE: 2, Role.IR_PHASE: 3, Role.T1_MAP: 4, Role.LGE: 5}
IMAGE_TYPE = {
    Role.CINE: ["ORIGINAL", "PRIMARY", "M", "RETRO", "DIS2D"],
    Role.IR_MAGNITUDE: ["ORIGINAL", "PRIMARY", "M", "DIS2D"],
    Role.IR_PHASE: ["ORIGINAL", "PRIMARY", "P", "DIS2D"],
    Role.T1_MAP: ["DERIVED", "PRIMARY", "T1 MAP", "DIS2D"],
    Role.LGE: ["DERIVED", "PRIMARY", "PSIR", "DIS2D"],
}
T1_X10_STYLE = "gadgetron"  # Gadgetron's CmrParametricMapping stores maps x10 as integers


def scanner_meta(case: SimulatedCase, im: MRImage) -> dict:
    """Meta of one image in the case's spelling (Siemens, Siemens lower-case, or Gadgetron)."""
    style = case.meta_style
    desc = im.series_description if style != "siemens_lower" else im.series_description.lower()
    ti = im.inversion_time_ms
    m: dict = {}
    if style == "gadgetron":
        m["GADGETRON_SeqDescription"] = desc
        m["GADGETRON_DataRole"] = {Role.CINE: "Image", Role.IR_MAGNITUDE: "Image", Role.IR_PHASE: "Phase",
                                   Role.T1_MAP: "T1map", Role.LGE: "PSIR"}[im.role]
        if ti is not None and im.role != Role.LGE:
            m["GADGETRON_TI"] = f"{ti:g}"
        if im.role == Role.T1_MAP:
            m["GADGETRON_ImageComment"] = ["T1 map", "x10"]
        m["ImageType"] = "\\".join(IMAGE_TYPE[im.role])
    else:
        m["SequenceDescription"] = desc
        m["SeriesDescription"] = desc
        m["ImageType"] = IMAGE_TYPE[im.role]
        if ti is not None:
            m["InversionTime"] = f"{ti:g}"
        if im.role in (Role.IR_MAGNITUDE, Role.IR_PHASE):
            m["ImageComments"] = f"TIeff {ti:g} ms" if style == "siemens" else f"TIeff {ti:g}ms"
        elif im.role == Role.T1_MAP:
            m["ImageComments"] = f"{case.scheme} T1 Map" if style == "siemens" else "T1 Map"
    if im.trigger_time_ms is not None:
        m["TriggerTime"] = f"{im.trigger_time_ms:g}"
    if im.rr_interval_ms:
        m["NominalInterval"] = f"{im.rr_interval_ms:.0f}"
    m["FrameOfReferenceUID"] = case.frame_of_reference_uid
    m["StudyInstanceUID"] = case.study_uid
    return m


def case_to_mrd(case: SimulatedCase) -> tuple[str, list]:
    """The ISMRMRD header and images of a case, in scanner order (cine, T1 mapping, LGE)."""
    t1 = next(im for im in case.images if im.role == Role.T1_MAP)
    g = t1.geometry
    header = mrd_io.header_xml(
        study_uid=case.study_uid, patient_id=case.patient_id, frame_of_reference_uid=case.frame_of_reference_uid,
        field_strength_t=case.field_t, protocol_name="VNE_SIM_HCM", measurement_id=case.case_id,
        matrix=(g.shape[1], g.shape[0]), fov_mm=(g.fov_mm[1], g.fov_mm[0], g.slice_thickness_mm))
    order = sorted(range(len(case.images)), key=lambda k: (SERIES_INDEX[case.images[k].role], k))
    out, counters = [], {}
    for tick, k in enumerate(order):
        im = case.images[k]
        counters[im.role] = counters.get(im.role, 0) + 1
        meta = scanner_meta(case, im)
        pixels_im = im
        dtype = np.float32
        if im.role in (Role.CINE, Role.IR_MAGNITUDE):
            dtype = np.uint16
        if im.role == Role.T1_MAP and case.meta_style == T1_X10_STYLE:
            pixels_im = MRImage(**{**im.__dict__, "pixels": im.pixels * 10.0})
            dtype = np.uint16
        mrd = mrd_io.to_mrd(
            pixels_im, series_index=SERIES_INDEX[im.role], image_index=counters[im.role],
            slice_index=int(im.meta.get("slice", 0)), phase=int(im.meta.get("phase", 0)),
            contrast=int(im.meta.get("contrast", 0)), dtype=dtype, meta=meta)
        mrd.acquisition_time_stamp = tick + 1
        out.append(mrd)
    return header, out


def write_case_mrd(case: SimulatedCase, path) -> None:
    header, images = case_to_mrd(case)
    mrd_io.write_mrd_file(path, header, images)


def write_case_dicom(case: SimulatedCase, folder) -> None:
    """One Siemens-like DICOM series folder per scan under ``folder``."""
    from ..io.dicom import write_series

    for role, number in SERIES_INDEX.items():
        ims = [im for im in case.images if im.role == role]
        if not ims:
            continue
        for im in ims:
            im.meta = {**im.meta, **{k: v for k, v in scanner_meta(case, im).items() if k == "ImageComments"}}
        name = ims[0].series_description
        write_series(ims, folder / f"{number:02d}_{name}", series_number=number, image_type=IMAGE_TYPE[role],
                     series_description=name)


def as_delivered(case: SimulatedCase) -> list[MRImage]:
    """The case's images exactly as the gadget sees them: encoded as the scanner stream
    (:func:`case_to_mrd`: uint16 magnitudes, x10 T1 maps, meta spellings) and decoded again by the
    gadget's own reader (:func:`vne.io.mrd.from_mrd`). Training data made from these cannot
    differ from what the model meets at run time (quantisation, rounding, role and TI parsing)."""
    header, images = case_to_mrd(case)
    study = mrd_io.study_key(mrd_io.parse_header(header))
    return [mrd_io.from_mrd(m, study=study) for m in images]


def write_case_cache(case: SimulatedCase, directory, contract: ModelContract, crop: int = 160) -> list[dict]:
    """Write each slice of a case into the training cache, through the gadget's own decoding
    (:func:`as_delivered`), matching, resampling and input shaping. Returns the index entries."""
    entries = []
    delivered = as_delivered(case)
    t1_maps = [im for im in delivered if im.role == Role.T1_MAP]
    if len(t1_maps) != len(case.truth):
        raise RuntimeError(f"{case.case_id}: {len(t1_maps)} decoded T1 maps for {len(case.truth)} slices")
    for truth, t1 in zip(case.truth, t1_maps):
        ii, jj = np.nonzero(truth.myocardium)
        centre = (ii.mean(), jj.mean()) if ii.size else (t1.geometry.shape[0] / 2, t1.geometry.shape[1] / 2)
        size = min(crop, *t1.geometry.shape)
        rows, cols = heart_crop_window(centre, t1.geometry.shape, size)
        g_crop = crop_geometry(t1.geometry, rows, cols)
        t1_crop = MRImage(**{**t1.__dict__, "pixels": t1.pixels[rows, cols], "geometry": g_crop})
        s, why = assemble(t1_crop, delivered, need_lge=True)
        if s is None:
            raise RuntimeError(f"simulator produced an unmatched slice: {why}")
        grid = on_t1_grid(s)
        x = model_inputs(contract, grid.t1_map_ms, grid.ir_signed, grid.ir_ti_ms, grid.cine_frames,
                         grid.cine_trigger_ms, grid.rr_interval_ms)
        # the runtime guard's input checks, one definition for training and serving: a slice the
        # gadget would refuse is marked, and training leaves it out (data.skip_qc_failures)
        verdict, _ = check_inputs(x["t1_map_ms"][0, 0], x["cine"][0], x["ir"][0], x["ir_ti_ms"][0],
                                  pixel_mm=float(np.mean(g_crop.pixel_spacing_mm)), field_t=case.field_t,
                                  motion=grid.cine_motion)
        slice_id = f"{case.case_id}_s{truth.slice_index}"
        write_slice(directory, slice_id, {
            "cine": x["cine"][0], "ir": x["ir"][0], "ir_ti_ms": x["ir_ti_ms"][0], "t1_map_ms": x["t1_map_ms"][0, 0],
            "lge": grid.lge, "lge_clean": truth.lge_clean[rows, cols],
            "myocardium": truth.myocardium[rows, cols], "blood_pool": truth.blood_pool[rows, cols],
            "remote": truth.remote[rows, cols], "lesion": truth.lesion[rows, cols],
            "lge_myocardium": truth.lge_myocardium[rows, cols], "lge_blood_pool": truth.lge_blood_pool[rows, cols],
            "lge_remote": truth.lge_remote[rows, cols],
            "pixel_spacing_mm": np.asarray(g_crop.pixel_spacing_mm),
        })
        entries.append({
            "slice_id": slice_id, "patient_id": case.patient_id, "case_id": case.case_id,
            "slice_index": truth.slice_index, "level": truth.level, "lesion_burden": truth.lesion_burden,
            "lesion_free": bool(case.lesion_free), "has_masks": True, "field_strength_t": case.field_t,
            "phenotype": case.phenotype, "scheme": case.scheme, "lge_artefacts": truth.lge_artefacts,
            "source": f"vne-simulator {SIMULATOR_VERSION}", "family": case.family,
            "heart_rate_bpm": round(case.heart_rate_bpm, 1), "n_cine_acquired": len(grid.cine_frames),
            "qc_passed": bool(verdict.passed), "qc_reason": verdict.reason,
        })
    return entries
