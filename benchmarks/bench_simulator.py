"""Simulator speed per slice on one core, by stage. A benchmark that prints figures, not a test.

    python benchmarks/bench_simulator.py [--cases 6] [--seed 100]

Stages: simulate_case (anatomy, signals, acquisition, the project's own T1 fit), then the
writers (ISMRMRD file, training cache). Thread pools are pinned to one thread so that the figure
is per core.
"""
from __future__ import annotations

import argparse
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    from vne.prepare.contract import ModelContract
    from vne.simulate import case as case_mod
    from vne.simulate.writers import write_case_cache, write_case_mrd

    fit_time = [0.0]
    real_fit = case_mod.fit_t1

    def timed_fit(*a, **k):
        t = time.perf_counter()
        r = real_fit(*a, **k)
        fit_time[0] += time.perf_counter() - t
        return r

    case_mod.fit_t1 = timed_fit
    sim, mrd, cache, n_slices = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.cases):
            t0 = time.perf_counter()
            c = case_mod.simulate_case(args.seed, k)
            t1 = time.perf_counter()
            write_case_mrd(c, Path(tmp) / f"{k}.h5")
            t2 = time.perf_counter()
            write_case_cache(c, Path(tmp) / "cache", ModelContract())
            t3 = time.perf_counter()
            n = len(c.truth)
            n_slices += n
            sim.append((t1 - t0) / n)
            mrd.append((t2 - t1) / n)
            cache.append((t3 - t2) / n)
    total = np.array(sim) + np.array(mrd) + np.array(cache)
    print(f"simulator benchmark: {args.cases} cases, {n_slices} slices, seed {args.seed}, 1 thread")
    print(f"{'stage':<28}{'median s/slice':>16}{'max s/slice':>14}")
    for name, v in (("simulate_case (all scans)", sim), ("  of which T1 fit", None), ("ISMRMRD writer", mrd),
                    ("training-cache writer", cache), ("total", total)):
        if v is None:
            print(f"{name:<28}{fit_time[0] / n_slices:>16.3f}{'':>14}")
        else:
            print(f"{name:<28}{np.median(v):>16.3f}{np.max(v):>14.3f}")


if __name__ == "__main__":
    main()
