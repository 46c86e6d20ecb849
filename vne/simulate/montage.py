"""A montage PNG of simulated cases: cine (diastole, systole), IR, T1 map, LGE and truth."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exam.data import Role
from ..exam.geometry import resample_to_grid
from .case import SimulatedCase


def _window(img: np.ndarray, lo_pct=1, hi_pct=99.5) -> tuple[float, float]:
    finite = img[np.isfinite(img)]
    return float(np.percentile(finite, lo_pct)), float(np.percentile(finite, hi_pct))


def save_montage(cases: list[SimulatedCase], path: Path, slice_pick: str = "mid") -> Path:
    """One row per case (its ``slice_pick`` slice, or the first): six panels on the T1 grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("cine, diastole", "cine, systole", "IR, shortest TI", "native T1 map (ms)", "PSIR LGE", "truth: lesion")
    fig, axes = plt.subplots(len(cases), len(cols), figsize=(2.6 * len(cols), 2.7 * len(cases)), squeeze=False)
    for r, case in enumerate(cases):
        truth = next((t for t in case.truth if t.level == slice_pick), case.truth[0])
        s = truth.slice_index
        t1 = next(im for im in case.images if im.role == Role.T1_MAP and im.meta.get("slice") == s)
        g = t1.geometry
        cine = [im for im in case.images if im.role == Role.CINE and im.meta.get("slice") == s]
        ir = sorted((im for im in case.images if im.role == Role.IR_MAGNITUDE and im.meta.get("slice") == s),
                    key=lambda im: im.inversion_time_ms)
        lge = next(im for im in case.images if im.role == Role.LGE and im.meta.get("slice") == s)
        ii, jj = np.nonzero(truth.myocardium)
        ci, cj = (int(ii.mean()), int(jj.mean())) if ii.size else (g.shape[0] // 2, g.shape[1] // 2)
        half = int(70 / g.pixel_spacing_mm[0])
        win = (slice(max(ci - half, 0), ci + half), slice(max(cj - half, 0), cj + half))
        es = int(len(cine) * 0.35)
        panels = [
            resample_to_grid(cine[0].pixels, cine[0].geometry, g)[0],
            resample_to_grid(cine[es].pixels, cine[es].geometry, g)[0],
            ir[0].pixels,
            t1.pixels,
            resample_to_grid(lge.pixels, lge.geometry, g)[0],
        ]
        for c, img in enumerate(panels):
            ax = axes[r, c]
            crop = img[win]
            if c == 3:
                ax.imshow(crop, cmap="viridis", vmin=0, vmax=2200 if case.field_t < 2 else 2600)
            else:
                lo, hi = _window(crop)
                ax.imshow(crop, cmap="gray", vmin=lo, vmax=hi)
        ax = axes[r, 5]
        base = panels[3][win]
        ax.imshow(base, cmap="gray", vmin=0, vmax=2200 if case.field_t < 2 else 2600)
        over = np.zeros(base.shape + (4,))
        over[truth.myocardium[win]] = (0.2, 0.5, 1.0, 0.35)
        over[truth.remote[win]] = (0.2, 1.0, 0.2, 0.5)
        over[truth.lesion[win]] = (1.0, 0.1, 0.1, 0.8)
        ax.imshow(over)
        axes[r, 0].set_ylabel(f"{case.case_id}\n{case.phenotype}, {case.field_t:g} T\nburden {truth.lesion_burden:.0%}", fontsize=8)
        for c in range(len(cols)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
