"""``vne demo``: the main job on an embedded default — a sample exam the project generates.

Simulates one HCM exam (fixed seed), writes it as an ISMRMRD file and a picture of its inputs
(and, once a shipped model is in ``models/``, runs VNE on it; see ``vne infer``).
"""
from __future__ import annotations

from pathlib import Path

NAME = "demo"
HELP = "run the shipped pipeline on a built-in simulated sample exam"
DEMO_SEED = 2026
DEMO_CASE = 3


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, default=Path("vne-demo"), help="output folder (default ./vne-demo)")


def run(args) -> int:
    from ..simulate.case import simulate_case
    from ..simulate.montage import save_montage
    from ..simulate.writers import write_case_mrd

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    case = simulate_case(DEMO_SEED, DEMO_CASE)
    exam = out / "sample-exam.h5"
    write_case_mrd(case, exam)
    fig = save_montage([case], out / "sample-exam.png")
    print(f"sample exam {case.case_id} ({case.phenotype}, {case.field_t:g} T, true lesion burden "
          f"{case.lesion_burden:.1%}) -> {exam}")
    print(f"inputs figure -> {fig}")
    return 0
