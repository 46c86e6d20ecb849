"""``vne evaluate --exams DIR --model M --out REPORT_DIR``: VNE vs LGE on simulated exams.

Runs the model on every exam of a ``vne simulate`` output through the same pipeline as
``vne infer`` (:class:`vne.runtime.pipeline.VNEPipeline` fed the ISMRMRD images in stream order),
brings the LGE onto the T1 grid with the same matching code, quantifies lesions on both with
the simulator's ground-truth masks and writes the report (:mod:`vne.evaluation.analysis`). Ablation models
(``--ablation NAME=MODEL``) go through the same path and are compared at FWHM.
"""
from __future__ import annotations

import logging
from pathlib import Path

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
    p.add_argument("--export-scorer", type=Path, default=None, metavar="DIR",
                   help="also write the exams and VNE as DIR/cases/<patient>/truth.npz and DIR/pred/<patient>.npy, "
                        "the layout of the external judge's score_exams.py (--pred-npy)")


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
    from ..evaluation.collect_simulated import collect
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
    if args.export_scorer is not None:
        from ..evaluation.analysis import write_scorer_exams

        cases, pred, skipped = write_scorer_exams(results, args.export_scorer)
        print(f"scorer layout: {cases} (truth) and {pred} (VNE)" + (f"; left out (mixed grids): {', '.join(skipped)}" if skipped else ""))
    a = metrics["agreement"]
    print(f"{metrics['n_patients']} patients, {metrics['n_slices']} slices -> {report}")
    for name in ("VNE vs LGE FWHM", "VNE adjusted vs LGE FWHM", "T1>2SD baseline vs LGE FWHM"):
        print(f"  {name:<32} r={a[name]['r']:.3f}  ICC={a[name]['icc']:.3f}")
    return 0
