"""``vne evaluate --exams DIR --model M --out REPORT_DIR``: VNE vs LGE on simulated exams.

Runs the model on every exam of a ``vne simulate`` output through the same pipeline as
``vne infer`` (:class:`vne.runtime.pipeline.VNEPipeline` fed the ISMRMRD images in stream order),
brings the LGE onto the T1 grid with the same matching code, quantifies lesions on both with
the simulator's ground-truth masks and writes the report (:mod:`vne.evaluation.analysis`). Ablation models
(``--ablation NAME=MODEL``) go through the same path and are compared at FWHM.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import InputError

NAME = "evaluate"
HELP = "run a model on simulated exams and report VNE-vs-LGE agreement, baselines and image quality"
log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--exams", type=Path, required=True,
                   help="a `vne simulate` output folder (mrd/, truth/, cases.json), or with --masks a folder of DICOM exams")
    p.add_argument("--masks", type=Path, default=None,
                   help="real data: masks folder (NumPy, NIfTI or DICOM-SEG; see docs/masks.md); --exams is then DICOM")
    p.add_argument("--lesion-free-csv", type=Path, default=None, help="real data: patient_id,lesion_free table")
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped model)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=MODEL", help="an ablation model to compare (repeatable)")
    p.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N cases")
    p.add_argument("--group", default=None, metavar="NAME",
                   help="HDF5 group of the exams' ISMRMRD files (default: /dataset, else the only top-level group)")
    p.add_argument("--contour-margin-px", type=int, default=None, metavar="PX",
                   help="pixels taken off the myocardium borders before quantifying (default 1; 0 for contours "
                        "already drawn inside the borders; see docs/evaluation.md)")


def slice_index_by_position(raw_images) -> dict[tuple, int]:
    """T1-map image position -> ISMRMRD slice index, to find each result's ground truth."""
    from ..io.mrd import from_mrd
    from ..exam.data import Role

    out = {}
    for m in raw_images:
        try:
            im = from_mrd(m)
        except InputError:
            continue
        if im.role == Role.T1_MAP:
            out[tuple(np.round(im.geometry.position_mm, 2))] = int(m.slice)
    return out


def run_model_on_file(path: Path, model: Path | None, group: str | None = None,
                      refused: list[str] | None = None) -> tuple[list, list, str]:
    """(VNE results, raw ISMRMRD images, header XML) of one exam file, through the gadget's pipeline.

    ``group``: the file's HDF5 group (:func:`vne.io.mrd.read_mrd_file`; default /dataset or the only one).
    ``refused``: when given, the quality guard's refusals are appended to it (one reason per
    slice) and an exam the guard refused entirely returns no results instead of raising: a
    refused slice counts as missing, not as correct.
    """
    from ..io import mrd as mrd_io
    from ..runtime.pipeline import PipelineConfig, VNEPipeline

    header, raw = mrd_io.read_mrd_file(path, group=group)
    pipe = VNEPipeline(PipelineConfig(model=str(model) if model else None, cache_dir="none"), header=mrd_io.parse_header(header))
    for item in raw:
        pipe.feed(item)
    pipe.finish()
    guard = [m for m in pipe.problems if "quality guard" in m]
    if refused is not None:
        refused.extend(f"{path.stem}: {m}" for m in guard)
    if not pipe.results and not (guard and refused is not None):
        raise InputError(f"{path.name}: no VNE produced: {'; '.join(pipe.problems) or 'no reason given'}")
    return pipe.results, raw, header


def collect(exams: Path, model: Path | None, max_cases: int | None = None, desc: str = "evaluate",
            group: str | None = None):
    """SliceResults for every case of a simulated set."""
    from ..io import mrd as mrd_io
    from ..evaluation.analysis import SliceResult
    from ..prepare.slices import build_slices, on_t1_grid

    doc = json.loads((exams / "cases.json").read_text())
    cases = doc["cases"][: max_cases or None]
    results, refused = [], []
    for c in tqdm(cases, desc=desc, unit="exam"):
        path = exams / "mrd" / f"{c['case_id']}.h5"
        vne_results, raw, header = run_model_on_file(path, model, group=group, refused=refused)
        key = mrd_io.study_key(mrd_io.parse_header(header))
        images = [mrd_io.from_mrd(m, key) for m in raw]
        slices, _ = build_slices(images, need_lge=True)
        lge_by_pos = {tuple(np.round(s.t1_map.geometry.position_mm, 2)): on_t1_grid(s).lge for s in slices}
        index_of = slice_index_by_position(raw)
        truth = np.load(exams / "truth" / f"{c['case_id']}.npz")
        for r in vne_results:
            pos = tuple(np.round(r.t1.geometry.position_mm, 2))
            s = index_of[pos]
            t = {k: truth[f"s{s}_{k}"] for k in ("myocardium", "blood_pool", "remote", "lesion", "lge_myocardium", "lge_blood_pool", "lge_remote")}
            results.append(SliceResult(
                case_id=c["case_id"], patient_id=c["patient_id"], slice_key=f"s{s}", t1_map_ms=np.asarray(r.t1.pixels, np.float32),
                vne=r.vne, lge=lge_by_pos[pos], lge_clean=truth[f"s{s}_lge_clean"],
                myocardium=t["myocardium"].astype(bool), blood_pool=t["blood_pool"].astype(bool), remote=t["remote"].astype(bool),
                lesion=t["lesion"].astype(bool), lesion_free=bool(c["lesion_free"]), artefacts=c["slices"][s]["lge_artefacts"],
                lge_myocardium=t["lge_myocardium"].astype(bool), lge_blood_pool=t["lge_blood_pool"].astype(bool),
                lge_remote=t["lge_remote"].astype(bool)))
    n_slices = sum(len(c["slices"]) for c in cases)
    doc = {**doc, "qc": {"slices": n_slices, "refused": len(refused), "refusal_rate": len(refused) / max(n_slices, 1),
                         "reasons": refused}}
    return results, doc


ABLATION_KEYS = ("VNE adjusted vs LGE FWHM", "VNE adjusted vs LGE FWQM", "VNE adjusted vs artefact-free LGE FWHM")


def _ablation_summary(metrics: dict) -> dict:
    """The comparisons reported per ablation model, plus its SSIM inside the heart."""
    out = {k: metrics["agreement"][k] for k in ABLATION_KEYS if k in metrics["agreement"]}
    out["ssim_heart"] = metrics["ssim_heart"]["mean"]
    return out


def _check_arguments(args, model: Path) -> None:
    """Every argument problem before any model runs: one line each (InputError)."""
    if not args.exams.exists():
        raise InputError(f"--exams {args.exams} does not exist")
    if not args.exams.is_dir():
        raise InputError(f"--exams {args.exams} is not a folder")
    for flag, path in (("--masks", args.masks), ("--lesion-free-csv", args.lesion_free_csv)):
        if path is not None and not path.exists():
            raise InputError(f"{flag} {path} does not exist")
    if args.masks is None and not (args.exams / "cases.json").is_file():
        raise InputError(f"{args.exams} is not a `vne simulate` output (no cases.json); for DICOM exams pass --masks")
    if args.masks is not None and args.group:
        raise InputError("--group is for ISMRMRD exams; with --masks the exams are DICOM")
    if args.contour_margin_px is not None and args.contour_margin_px < 0:
        raise InputError(f"--contour-margin-px must be >= 0, got {args.contour_margin_px}")
    if args.max_cases is not None and args.max_cases < 1:
        raise InputError(f"--max-cases must be at least 1, got {args.max_cases}")
    models = [("--model", Path(model))]
    for spec in args.ablation:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise InputError(f"--ablation wants NAME=MODEL, got '{spec}'")
        models.append((f"--ablation {name}", Path(path)))
    for flag, path in models:
        if not path.is_file():
            raise InputError(f"{flag} {path} does not exist")


def run(args) -> int:
    from ..evaluation.analysis import evaluate, write_report
    from ..runtime.model import find_default_model

    model = args.model or find_default_model()
    if model is None:
        raise InputError("no model given and no shipped model found in models/")
    _check_arguments(args, model)

    def gather(m: Path, desc: str):
        if args.masks is not None:
            from ..evaluation.collect_dicom import collect_dicom

            return collect_dicom(args.exams, args.masks, m, lesion_free_csv=args.lesion_free_csv), {"source": "dicom"}
        return collect(args.exams, m, args.max_cases, desc=desc, group=args.group)

    results, doc = gather(model, "evaluate")
    if not results:
        raise InputError("no slice could be evaluated (see the log for the reasons)")
    from ..evaluation.quantify import CONTOUR_MARGIN_PX

    margin = CONTOUR_MARGIN_PX if args.contour_margin_px is None else args.contour_margin_px
    metrics = evaluate(results, margin)
    metrics["model"] = str(model)
    metrics["exams"] = {"folder": str(args.exams), "seed": doc.get("seed"), "simulator_version": doc.get("simulator_version"),
                        "family": doc.get("family", "A")}
    if "qc" in doc:  # slices the quality guard refused: missing, not correct
        metrics["qc"] = doc["qc"]
    ablations = {}
    for spec in args.ablation:
        name, _, path = spec.partition("=")
        res_a, _ = gather(Path(path), f"ablation {name}")
        m = evaluate(res_a, margin)
        ablations[name] = _ablation_summary(m)
    if ablations:
        ablations = {"full model": _ablation_summary(metrics), **ablations}
        metrics["ablations"] = ablations
    report = write_report(metrics, results, args.out, title=f"VNE evaluation of {Path(model).name}")
    a = metrics["agreement"]
    print(f"{metrics['n_patients']} patients, {metrics['n_slices']} slices -> {report}")
    for name in ("VNE vs LGE FWHM", "VNE adjusted vs LGE FWHM", "T1>2SD baseline vs LGE FWHM"):
        print(f"  {name:<32} r={a[name]['r']:.3f}  ICC={a[name]['icc']:.3f}")
    return 0
