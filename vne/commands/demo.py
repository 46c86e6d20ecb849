"""``vne demo``: the main job on an embedded default — the shipped model on a sample exam.

Simulates one HCM exam (fixed seed, never used in training), writes it as an ISMRMRD file as a
scanner would deliver it, runs it through the same pipeline as the Gadgetron gadget and
``vne infer`` with the shipped model (newest ``models/vne-sim-*.onnx``), and writes the output
file (inputs unchanged + the VNE series) and a figure: T1 map | VNE | LGE | true lesions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

NAME = "demo"
HELP = "run the shipped VNE model on a built-in simulated sample exam"
DEMO_SEED = 2026
DEMO_CASE = 2  # simulator 2.3: septal HCM, 3 T, 3 slices, true lesion burden 15.1 % (also the golden-test exam)


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, default=Path("vne-demo"), help="output folder (default ./vne-demo)")
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped model)")


def _figure(case, results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.analysis import heart_mask
    from ..prepare.contract import normalise_psir
    from ..exam.data import Role
    from ..prepare.slices import build_slices, lge_on_t1_grid

    slices, _ = build_slices(case.images, need_lge=True)
    lge_by_pos = {tuple(np.round(s.t1_map.geometry.position_mm, 2)): lge_on_t1_grid(s) for s in slices}
    t1_pos = [tuple(np.round(im.geometry.position_mm, 2)) for im in case.images if im.role == Role.T1_MAP]
    fig, axes = plt.subplots(len(results), 4, figsize=(11, 2.8 * len(results)), squeeze=False)
    for row, r in enumerate(results):
        pos = tuple(np.round(r.t1.geometry.position_mm, 2))
        truth = case.truth[t1_pos.index(pos)]
        ii, jj = np.nonzero(heart_mask(truth.myocardium, 14))
        win = (slice(ii.min(), ii.max() + 1), slice(jj.min(), jj.max() + 1))
        lge = normalise_psir(lge_by_pos[pos], truth.lge_remote, truth.lge_blood_pool)
        vne = normalise_psir(r.vne, truth.remote, truth.blood_pool)
        axes[row, 0].imshow(np.asarray(r.t1.pixels)[win], cmap="viridis", vmin=600, vmax=2000 if case.field_t < 2 else 2300)
        axes[row, 1].imshow(vne[win], cmap="gray", vmin=-0.4, vmax=1.6)
        axes[row, 2].imshow(lge[win], cmap="gray", vmin=-0.4, vmax=1.6)
        axes[row, 3].imshow(vne[win], cmap="gray", vmin=-0.4, vmax=1.6)
        axes[row, 3].contour(truth.lesion[win], levels=[0.5], colors="r", linewidths=0.8)
        axes[row, 3].contour(truth.myocardium[win], levels=[0.5], colors="c", linewidths=0.5)
        axes[row, 0].set_ylabel(f"{truth.level}\nburden {truth.lesion_burden:.0%}")
        for c, title in enumerate(("native T1 map", "VNE (no contrast)", "PSIR LGE (contrast)", "VNE + true lesions")):
            axes[row, c].set_xticks([])
            axes[row, c].set_yticks([])
            if row == 0:
                axes[row, c].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(args) -> int:
    from ..io.mrd.hdf5 import write_mrd_file
    from ..io.mrd.header import parse_header
    from ..runtime.model import find_default_model
    from ..runtime.config import PipelineConfig
    from ..runtime.pipeline import VNEPipeline
    from ..simulate.case import simulate_case
    from ..simulate.writers import case_to_mrd

    model = args.model or find_default_model()
    if model is None:
        raise InputError("no shipped model found (models/vne-sim-*.onnx); pass --model")
    if not Path(model).is_file():  # before the 8 s of simulation
        raise InputError(f"--model {model} does not exist")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    case = simulate_case(DEMO_SEED, DEMO_CASE)
    header, images = case_to_mrd(case)
    write_mrd_file(out / "sample-exam.h5", header, images)
    pipe = VNEPipeline(PipelineConfig(model=str(model), cache_dir="none"), header=parse_header(header))
    sent = []
    for im in images:
        sent.extend(pipe.feed(im))
    sent.extend(pipe.finish())
    if not pipe.results:
        raise InputError(f"no VNE produced: {'; '.join(pipe.problems)}")
    write_mrd_file(out / "sample-exam-vne.h5", header, sent)
    fig = _figure(case, pipe.results, out / "sample-exam-vne.png")
    print(f"sample exam {case.case_id}: {case.phenotype} HCM, {case.field_t:g} T, {len(case.truth)} slices, "
          f"true lesion burden {case.lesion_burden:.1%}")
    print(f"model {Path(model).name}: {len(pipe.results)} VNE images, "
          f"{np.median([r.seconds for r in pipe.results]) * 1000:.0f} ms per slice (median)")
    print(f"  {out / 'sample-exam.h5'}      the exam as a scanner delivers it")
    print(f"  {out / 'sample-exam-vne.h5'}  every input unchanged + the VNE series")
    print(f"  {fig}  T1 map | VNE | LGE | true lesions")
    return 0
