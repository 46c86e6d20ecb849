"""``vne t1map DICOM_DIR --out OUT_DIR``: fit T1 maps to the IR-weighted images of a DICOM folder.

For every IR magnitude series and every slice in it (images grouped by series and plane), the
matching phase images (same plane, shape and TI) are used for the sign when all are there; the
fit is :func:`vne.t1.fit_t1`. Per source series two DICOM series are written under ``OUT_DIR``:

- ``<SeriesNumber+1000>_<desc>_T1MAP_VNE``: T1 in ms (ImageType ``DERIVED\\PRIMARY\\T1 MAP\\VNE``,
  ImageComments ``T1 Map (vne)``), on the IR images' geometry;
- ``<SeriesNumber+2000>_<desc>_T1MAP_VNE_RSQUARE``: the fit's R^2 stored as R^2 * 4000 with
  RescaleSlope 1/4000 (ImageComments ``Rsquare*4000 Map (vne)``, as the scanner's FITPARAMS).

Everything is written into a temporary folder and renamed into ``OUT_DIR`` at the end.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io.atomic import move_into
from ..io.dicom import read_dicom_folder, series_folder_name, write_series
from ..errors import InputError
from ..exam.data import Exam, MRImage, Role
from ..t1 import SCHEMES, detect_scheme, fit_t1

NAME = "t1map"
HELP = "fit T1 maps (ShMOLLI / MOLLI) to the IR-weighted images in a DICOM folder and write them as DICOM"

log = logging.getLogger(__name__)

T1_SERIES_OFFSET = 1000
R2_SERIES_OFFSET = 2000
R2_STORED_SCALE = 4000.0
TI_MATCH_MS = 0.5
PLANE_MATCH_MM = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dicom_dir", metavar="DICOM_DIR", help="folder with the IR-weighted DICOM images (any nesting)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder for the T1-map DICOM series")
    parser.add_argument("--scheme", choices=SCHEMES, default="auto",
                        help="sampling scheme: ShMOLLI conditional 5/6/7-sample fit, MOLLI (all samples), or auto (default)")


@dataclass
class IRSlice:
    """The IR images of one slice of one series, sorted by TI, with matching phase if any."""

    magnitude: list[MRImage]
    phase: list[MRImage] = field(default_factory=list)

    @property
    def key(self) -> str:
        g = self.magnitude[0].geometry
        return f"{self.magnitude[0].series_description or self.magnitude[0].series} @ {np.round(g.position_mm, 1).tolist()}"


def _plane_key(im: MRImage) -> tuple:
    g = im.geometry
    n = g.slice_dir
    return (g.shape, tuple(np.round(n, 2)), round(float(np.asarray(g.position_mm) @ n), 1))


def _same_plane(a: MRImage, b: MRImage) -> bool:
    ga, gb = a.geometry, b.geometry
    if ga.shape != gb.shape:
        return False
    d = np.asarray(ga.position_mm, float) - np.asarray(gb.position_mm, float)
    return float(np.linalg.norm(d)) < PLANE_MATCH_MM and float(abs(ga.slice_dir @ gb.slice_dir)) > 0.999


def find_ir_slices(exam: Exam) -> list[IRSlice]:
    """IR magnitude images grouped by (series, plane), each with its phase images if complete."""
    groups: dict[tuple, list[MRImage]] = {}
    for im in exam.by_role(Role.IR_MAGNITUDE):
        if im.inversion_time_ms is None:
            continue
        groups.setdefault((im.series, _plane_key(im)), []).append(im)
    phases = [p for p in exam.by_role(Role.IR_PHASE) if p.inversion_time_ms is not None]
    out = []
    for (_, _), ims in groups.items():
        ims = sorted(ims, key=lambda m: m.inversion_time_ms)
        matched = []
        for m in ims:
            cands = [p for p in phases if abs(p.inversion_time_ms - m.inversion_time_ms) < TI_MATCH_MS and _same_plane(m, p)]
            if not cands:
                break
            # prefer the phase image acquired with the magnitude one (same instance number)
            cands.sort(key=lambda p: (p.meta.get("InstanceNumber") != m.meta.get("InstanceNumber"),
                                      p.meta.get("AcquisitionTime") != m.meta.get("AcquisitionTime")))
            matched.append(cands[0])
        out.append(IRSlice(magnitude=ims, phase=matched if len(matched) == len(ims) else []))
    return out


def _scheme_for(sl: IRSlice, requested: str) -> str:
    if requested != "auto":
        return requested
    desc = " ".join(im.series_description for im in sl.magnitude[:1]).lower()
    if "shmolli" in desc and len(sl.magnitude) == 7:
        return "shmolli"
    return detect_scheme([m.inversion_time_ms for m in sl.magnitude])


def _derived(src: MRImage, pixels: np.ndarray, role: Role, description: str, comments: str) -> MRImage:
    keep = ("PatientName", "StudyDate", "StudyTime", "StudyDescription", "Manufacturer", "SequenceName",
            "ScanningSequence", "SequenceVariant", "MRAcquisitionType")
    meta = {k: src.meta[k] for k in keep if k in src.meta}
    meta["ImageComments"] = comments
    return MRImage(
        pixels=pixels.astype(np.float32), geometry=src.geometry, role=role, series="",
        series_description=description, inversion_time_ms=None, trigger_time_ms=src.trigger_time_ms,
        rr_interval_ms=src.rr_interval_ms, study_uid=src.study_uid, frame_of_reference_uid=src.frame_of_reference_uid,
        patient_id=src.patient_id, meta=meta, source=src.source,
    )


def _series_number(src: MRImage) -> int:
    try:
        return int(float(src.meta.get("SeriesNumber", 0)))
    except (TypeError, ValueError):
        return 0


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    src = Path(args.dicom_dir)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    exams = read_dicom_folder(src)
    work: list[tuple[Exam, IRSlice]] = [(ex, sl) for ex in exams for sl in find_ir_slices(ex)]
    if not work:
        found = {}
        for ex in exams:
            for im in ex.images:
                found[im.role.value] = found.get(im.role.value, 0) + 1
        listing = ", ".join(f"{n} {r}" for r, n in sorted(found.items())) or "nothing"
        raise InputError(f"no IR-weighted magnitude series with inversion times in {src} (found {listing})")

    # fit everything first (in memory), then write
    by_series: dict[tuple[str, str], dict] = {}
    t1_values = []
    n_phase = 0
    for exam, sl in tqdm(work, desc="vne t1map", unit="slice", disable=None, file=sys.stderr):
        mags = sl.magnitude
        ti = [m.inversion_time_ms for m in mags]
        if len(mags) < 4 or len(set(np.round(ti, 1))) < 4:
            log.warning("skipping %s: %d IR images with %d distinct TIs (need 4)", sl.key, len(mags), len(set(ti)))
            continue
        try:
            stack = np.stack([m.pixels for m in mags])
            phase = np.stack([p.pixels for p in sl.phase]) if sl.phase else None
        except ValueError:
            log.warning("skipping %s: IR images of different sizes", sl.key)
            continue
        rr = [m.rr_interval_ms for m in mags if m.rr_interval_ms]
        scheme = _scheme_for(sl, args.scheme)
        try:
            fit = fit_t1(stack, ti, ir_phase=phase, scheme=scheme, rr_interval_ms=float(np.median(rr)) if rr else None)
        except InputError as exc:
            raise InputError(f"series '{mags[0].series_description}' ({mags[0].source}): {exc}") from None
        n_phase += phase is not None
        ref = mags[0]
        desc = (ref.series_description or "IR") + "_T1MAP_VNE"
        entry = by_series.setdefault((exam.study_uid, ref.series), {"ref": ref, "desc": desc, "t1": [], "r2": []})
        entry["t1"].append(_derived(ref, fit.t1_ms, Role.T1_MAP, desc, "T1 Map (vne)"))
        entry["r2"].append(_derived(ref, fit.r2, Role.UNKNOWN, desc + "_RSQUARE", "Rsquare*4000 Map (vne)"))
        ok = fit.t1_ms > 0
        if ok.any():
            t1_values.append(fit.t1_ms[ok])
    if not by_series:
        raise InputError(f"no IR series in {src} has enough inversion times to fit T1")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    written = 0
    try:
        for entry in by_series.values():
            number = _series_number(entry["ref"])
            t1_no, r2_no = number + T1_SERIES_OFFSET, number + R2_SERIES_OFFSET
            written += len(write_series(entry["t1"], tmp_root / series_folder_name(t1_no, entry["desc"]),
                                        series_number=t1_no, image_type=["DERIVED", "PRIMARY", "T1 MAP", "VNE"],
                                        series_description=entry["desc"]))
            written += len(write_series(entry["r2"], tmp_root / series_folder_name(r2_no, entry["desc"] + "_RSQUARE"),
                                        series_number=r2_no, image_type=["DERIVED", "PRIMARY", "RSQUARE", "VNE"],
                                        series_description=entry["desc"] + "_RSQUARE",
                                        rescale=(1.0 / R2_STORED_SCALE, 0.0)))
        move_into(tmp_root, out)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    n_slices = sum(len(e["t1"]) for e in by_series.values())
    allv = np.concatenate(t1_values) if t1_values else np.zeros(0)
    med = f"median T1 {np.median(allv):.0f} ms over {allv.size} pixels" if allv.size else "no pixel fitted"
    print(f"vne t1map: {n_slices} slice(s) from {len(by_series)} IR series ({n_phase} with phase) -> "
          f"{written} files in {out}; {med}; {time.perf_counter() - t0:.1f} s")
    return 0
