"""Evaluation of VNE against LGE on simulated exams: the paper's analyses as a tool.

Inputs per slice (:class:`SliceResult`): the T1 map, the VNE image and the LGE (both on the T1
grid), the ground-truth masks and the artefact-free LGE. :func:`evaluate` computes

- lesion burden per patient for LGE (FWHM / FWQM / FWEM), VNE at the same and at the paper's
  adjusted thresholds, and the T1-map baseline (T1 > remote + 2 SD);
- Pearson r, regression, ICC(A,1) with 95% CI and Bland–Altman per threshold (:mod:`vne.evaluation.stats`);
- SSIM and PSNR of VNE vs LGE inside the heart; the false-positive rate;
- image quality: myocardium–blood CNR, remote-myocardium variance and agreement with the
  artefact-free LGE, for slices with and without LGE artefacts.

:func:`write_report` writes ``report.md``, ``metrics.json`` and the figures. Images are compared in
normalised units ``(x - mean_remote) / (mean_blood - mean_remote)``, so VNE and LGE share a
scale (the quantification thresholds are affine-invariant anyway).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..prepare.contract import normalise_psir
from . import quantify, stats

THRESHOLDS = tuple(quantify.LGE_LEVELS)


@dataclass
class SliceResult:
    case_id: str
    patient_id: str
    slice_key: str
    t1_map_ms: np.ndarray
    vne: np.ndarray
    lge: np.ndarray
    lge_clean: np.ndarray
    myocardium: np.ndarray
    blood_pool: np.ndarray
    remote: np.ndarray
    lesion: np.ndarray
    lesion_free: bool
    artefacts: list[str] = field(default_factory=list)
    lge_myocardium: np.ndarray | None = None  # the LGE's own contours; default: the native ones
    lge_blood_pool: np.ndarray | None = None
    lge_remote: np.ndarray | None = None

    def lge_masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(myocardium, blood pool, remote) to quantify the LGE with."""
        if self.lge_myocardium is None:
            return self.myocardium, self.blood_pool, self.remote
        return self.lge_myocardium, self.lge_blood_pool, self.lge_remote


def write_scorer_exams(results: list[SliceResult], out_dir: Path) -> tuple[Path, Path, list[str]]:
    """Write exams and VNE in the layout of the external judge's scorer (``score_exams.py``).

    Per patient ``out_dir/cases/<patient>/truth.npz`` (``myo``, ``remote``, ``blood``,
    ``lge_clean``, ``t1_scanner``: (slices, H, W); ``burden_true``: lesion fraction of the
    myocardium) and ``out_dir/pred/<patient>.npy`` (the VNE stack, same shape). So our own test
    sets can be scored exactly as the external exams are: exam-level burden, no contour margin,
    blood reference from the central half of the pool. Only the slices VNE was produced for are
    written; a patient whose slices have different grids is left out and named in the result.

    Returns (cases folder, predictions folder, patients left out).
    """
    cases, pred = out_dir / "cases", out_dir / "pred"
    by_patient: dict[str, list[SliceResult]] = {}
    for r in results:
        by_patient.setdefault(r.patient_id, []).append(r)
    skipped = []
    for pid, rs in sorted(by_patient.items()):
        if len({r.vne.shape for r in rs}) != 1:
            skipped.append(pid)
            continue
        (cases / pid).mkdir(parents=True, exist_ok=True)
        pred.mkdir(parents=True, exist_ok=True)
        myo = np.stack([r.myocardium for r in rs]).astype(bool)
        lesion = np.stack([r.lesion for r in rs]).astype(bool) & myo
        np.savez_compressed(cases / pid / "truth.npz", myo=myo, remote=np.stack([r.remote for r in rs]).astype(bool),
                            blood=np.stack([r.blood_pool for r in rs]).astype(bool),
                            lge_clean=np.stack([r.lge_clean for r in rs]).astype(np.float32),
                            t1_scanner=np.stack([r.t1_map_ms for r in rs]).astype(np.float32),
                            burden_true=np.float64(0.0 if rs[0].lesion_free else lesion.sum() / max(1, myo.sum())))
        np.save(pred / f"{pid}.npy", np.stack([r.vne for r in rs]).astype(np.float32))
    return cases, pred, skipped


def heart_mask(myocardium: np.ndarray, dilate_px: int = 3) -> np.ndarray:
    """The LV: myocardium with its cavity filled, dilated a little."""
    filled = ndimage.binary_fill_holes(myocardium)
    return ndimage.binary_dilation(filled, iterations=dilate_px)


def _burdens(results: list[SliceResult], image_of, levels, margin_px: int, lge: bool = False) -> dict[str, dict[str, float]]:
    per_patient: dict[str, list] = {}
    for r in results:
        myo, blood, remote = r.lge_masks() if lge else (r.myocardium, r.blood_pool, r.remote)
        per_patient.setdefault(r.patient_id, []).append(quantify.quantify_slice(image_of(r), myo, remote, blood, levels, margin_px))
    return {p: quantify.patient_burden(q) for p, q in per_patient.items()}


def _agreement(ref: np.ndarray, test: np.ndarray) -> dict:
    reg = stats.pearson_regression(ref, test)
    icc = stats.icc_a1(np.stack([ref, test], 1))
    ba = stats.bland_altman(ref, test)
    _, wilcoxon_p = stats.wilcoxon_signed_rank(ref, test)
    return {"r": reg.r, "p": reg.p, "slope": reg.slope, "intercept": reg.intercept,
            "icc": icc.icc, "icc_ci": [icc.ci_low, icc.ci_high], "bias": ba.bias, "loa": [ba.loa_low, ba.loa_high],
            "wilcoxon_p": wilcoxon_p, "n": reg.n}


def _quality(img: np.ndarray, r: SliceResult, lge: bool) -> dict:
    _, blood, remote = r.lge_masks() if lge else (r.myocardium, r.blood_pool, r.remote)
    n = normalise_psir(img, remote, blood)
    sd_remote = float(n[remote].std())
    return {"cnr": float((n[blood].mean() - n[remote].mean()) / max(sd_remote, 1e-6)), "remote_var": sd_remote ** 2}


def _normalised_lge(r: SliceResult) -> np.ndarray:
    _, blood, remote = r.lge_masks()
    return normalise_psir(r.lge, remote, blood)


def evaluate(results: list[SliceResult], margin_px: int = quantify.CONTOUR_MARGIN_PX) -> dict:
    """All numbers of the report (JSON-serialisable).

    ``margin_px``: the contour margin of the quantification (:func:`vne.evaluation.quantify.quantified_myocardium`).
    """
    patients = sorted({r.patient_id for r in results})
    lge_b = _burdens(results, lambda r: r.lge, quantify.LGE_LEVELS, margin_px, lge=True)
    vne_b = _burdens(results, lambda r: r.vne, quantify.LGE_LEVELS, margin_px)
    vne_adj = _burdens(results, lambda r: r.vne, quantify.VNE_ADJUSTED_LEVELS, margin_px)
    clean_b = _burdens(results, lambda r: r.lge_clean, quantify.LGE_LEVELS, margin_px)  # simulator only: no artefacts, registered
    per_p_t1: dict[str, list] = {}
    for r in results:
        per_p_t1.setdefault(r.patient_id, []).append(quantify.t1_baseline_slice(r.t1_map_ms, r.myocardium, r.remote, margin_px=margin_px))
    t1_b = {p: quantify.patient_burden(q)["T1>2SD"] for p, q in per_p_t1.items()}
    truth_b = {}
    for p in patients:
        rs = [r for r in results if r.patient_id == p]
        truth_b[p] = sum(int(r.lesion.sum()) for r in rs) / sum(int(r.myocardium.sum()) for r in rs)

    out: dict = {"n_patients": len(patients), "n_slices": len(results), "contour_margin_px": int(margin_px),
                 "agreement": {}, "burden_mean": {}}
    arr = lambda d, k=None: np.array([d[p][k] if k else d[p] for p in patients])  # noqa: E731
    for t in THRESHOLDS:
        ref = arr(lge_b, t)
        out["agreement"][f"VNE vs LGE {t}"] = _agreement(ref, arr(vne_b, t))
        out["agreement"][f"VNE adjusted vs LGE {t}"] = _agreement(ref, arr(vne_adj, t))
        out["agreement"][f"T1>2SD baseline vs LGE {t}"] = _agreement(ref, arr(t1_b))
        out["agreement"][f"VNE vs artefact-free LGE {t}"] = _agreement(arr(clean_b, t), arr(vne_b, t))
        out["agreement"][f"VNE adjusted vs artefact-free LGE {t}"] = _agreement(arr(clean_b, t), arr(vne_adj, t))
        out["agreement"][f"T1>2SD baseline vs artefact-free LGE {t}"] = _agreement(arr(clean_b, t), arr(t1_b))
        out["agreement"][f"LGE vs artefact-free LGE {t}"] = _agreement(arr(clean_b, t), ref)
        out["burden_mean"][f"LGE {t}"] = float(ref.mean())
        out["burden_mean"][f"VNE {t}"] = float(arr(vne_b, t).mean())
        out["burden_mean"][f"VNE adjusted {t}"] = float(arr(vne_adj, t).mean())
        out["burden_mean"][f"artefact-free LGE {t}"] = float(arr(clean_b, t).mean())
    out["burden_mean"]["T1>2SD baseline"] = float(arr(t1_b).mean())
    out["burden_mean"]["truth (fibrosis >= 0.5)"] = float(arr(truth_b).mean())
    out["agreement"]["LGE FWHM vs truth"] = _agreement(arr(truth_b), arr(lge_b, "FWHM"))
    out["agreement"]["VNE adjusted FWHM vs truth"] = _agreement(arr(truth_b), arr(vne_adj, "FWHM"))

    ssim, psnr = [], []
    for r in results:
        hm = heart_mask(r.myocardium)
        ref = _normalised_lge(r)
        test = normalise_psir(r.vne, r.remote, r.blood_pool)
        ssim.append(stats.ssim_in_mask(ref, test, hm))
        psnr.append(stats.psnr_in_mask(ref, test, hm))
    out["ssim_heart"] = {"mean": float(np.mean(ssim)), "sd": float(np.std(ssim))}
    out["psnr_heart_db"] = {"mean": float(np.mean(psnr)), "sd": float(np.std(psnr))}

    free = {p: all(r.lesion_free for r in results if r.patient_id == p) for p in patients}
    lge_free = {p: lge_b[p]["FWHM"] <= stats.FALSE_POSITIVE_BURDEN for p in patients}
    rate, fp, n = stats.false_positive_rate([free[p] for p in patients], [vne_adj[p]["FWHM"] for p in patients])
    rate_l, fp_l, n_l = stats.false_positive_rate([lge_free[p] for p in patients], [vne_adj[p]["FWHM"] for p in patients])
    out["false_positive"] = {"truth_lesion_free": {"rate": rate, "fp": fp, "n": n},
                             "lge_negative": {"rate": rate_l, "fp": fp_l, "n": n_l},
                             "definition": "VNE burden > 2% at FWHM (adjusted threshold 35%) in lesion-free patients"}

    quality = {}
    for group, sel in (("LGE with artefacts", [r for r in results if r.artefacts]), ("LGE without artefacts", [r for r in results if not r.artefacts])):
        if not sel:
            continue
        q = {"n_slices": len(sel)}
        for name, img_of, norm_of in (("LGE", lambda r: r.lge, _normalised_lge),
                                      ("VNE", lambda r: r.vne, lambda r: normalise_psir(r.vne, r.remote, r.blood_pool))):
            qs = [_quality(img_of(r), r, lge=name == "LGE") for r in sel]
            agree = [stats.ssim_in_mask(normalise_psir(r.lge_clean, r.remote, r.blood_pool), norm_of(r), heart_mask(r.myocardium)) for r in sel]
            q[name] = {"cnr_blood_myocardium": float(np.median([x["cnr"] for x in qs])),
                       "remote_variance": float(np.median([x["remote_var"] for x in qs])),
                       "ssim_vs_artefact_free_lge": float(np.mean(agree))}
        quality[group] = q
    out["image_quality"] = quality
    out["per_patient"] = {p: {"lge": lge_b[p], "vne": vne_b[p], "vne_adjusted": vne_adj[p], "t1_baseline": t1_b[p],
                              "lge_clean": clean_b[p],
                              "truth": truth_b[p], "lesion_free": free[p]} for p in patients}
    return out


def _fig_agreement(metrics: dict, path: Path, title_prefix: str, key_fmt: str, vne_key: str) -> None:
    import matplotlib.pyplot as plt

    pp = metrics["per_patient"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for c, t in enumerate(THRESHOLDS):
        x = np.array([pp[p]["lge"][t] for p in pp]) * 100
        y = np.array([pp[p][vne_key][t] for p in pp]) * 100
        a = metrics["agreement"][key_fmt.format(t)]
        ax = axes[0, c]
        ax.scatter(x, y, s=14, alpha=0.8)
        lim = max(x.max(), y.max(), 1) * 1.05
        xx = np.array([0, lim])
        ax.plot(xx, a["slope"] * xx + a["intercept"] * 100, "r-", label=f"y = {a['slope']:.2f}x {a['intercept'] * 100:+.1f}")
        ax.plot(xx, xx, "k:", lw=0.8)
        ax.set(xlim=(0, lim), ylim=(0, lim), xlabel=f"LGE burden {t} (%)", ylabel="VNE burden (%)",
               title=f"{t}: r={a['r']:.2f}, ICC={a['icc']:.2f}")
        ax.legend(fontsize=8)
        ax = axes[1, c]
        m, d = (x + y) / 2, y - x
        ax.scatter(m, d, s=14, alpha=0.8)
        for v, ls in ((a["bias"] * 100, "-"), (a["loa"][0] * 100, "--"), (a["loa"][1] * 100, "--")):
            ax.axhline(v, color="r", ls=ls, lw=1)
        ax.set(xlabel="mean of VNE and LGE (%)", ylabel="VNE - LGE (%)",
               title=f"bias {a['bias'] * 100:+.1f}%, LoA [{a['loa'][0] * 100:+.1f}, {a['loa'][1] * 100:+.1f}]")
    fig.suptitle(title_prefix)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fig_panels(results: list[SliceResult], path: Path, n: int = 6, margin_px: int = quantify.CONTOUR_MARGIN_PX) -> None:
    import matplotlib.pyplot as plt

    chosen = sorted(results, key=lambda r: -int(r.lesion.sum()))[: max(n - 1, 1)] + [r for r in results if r.lesion_free][:1]
    fig, axes = plt.subplots(5, len(chosen), figsize=(2.4 * len(chosen), 12), squeeze=False)
    colours = {"FWEM": (0.3, 0.8, 1.0, 0.9), "FWQM": (1.0, 0.9, 0.1, 0.9), "FWHM": (1.0, 0.1, 0.1, 0.9)}
    for c, r in enumerate(chosen):
        ii, jj = np.nonzero(heart_mask(r.myocardium, 12))
        win = (slice(ii.min(), ii.max() + 1), slice(jj.min(), jj.max() + 1))
        vne_n = normalise_psir(r.vne, r.remote, r.blood_pool)
        lge_n = _normalised_lge(r)
        axes[0, c].imshow(r.t1_map_ms[win], cmap="viridis", vmin=700, vmax=1700 if np.median(r.t1_map_ms[r.remote]) < 1100 else 2000)
        axes[1, c].imshow(vne_n[win], cmap="gray", vmin=-0.5, vmax=1.5)
        axes[2, c].imshow(lge_n[win], cmap="gray", vmin=-0.5, vmax=1.5)
        for row, (img, levels, (myo, blood, remote)) in ((3, (r.vne, quantify.VNE_ADJUSTED_LEVELS, (r.myocardium, r.blood_pool, r.remote))),
                                                          (4, (r.lge, quantify.LGE_LEVELS, r.lge_masks()))):
            masks = quantify.lesion_masks(img, myo, remote, blood, levels, margin_px)
            axes[row, c].imshow(normalise_psir(img, remote, blood)[win], cmap="gray", vmin=-0.5, vmax=1.5)
            over = np.zeros(masks["FWEM"].shape + (4,))
            for name in ("FWEM", "FWQM", "FWHM"):
                over[masks[name]] = colours[name]
            axes[row, c].imshow(over[win])
        axes[0, c].set_title(f"{r.case_id[-5:]} {r.slice_key[:14]}", fontsize=7)
    for row, label in enumerate(("T1 map", "VNE", "LGE", "VNE lesions\n(35/20/10%)", "LGE lesions\n(50/25/12.5%)")):
        axes[row, 0].set_ylabel(label)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(metrics: dict, results: list[SliceResult], out_dir: Path, title: str = "VNE evaluation") -> Path:
    """``report.md``, ``metrics.json`` and the PNG figures in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    figs = {
        "fig5_agreement.png": "Figure 5 A–C: VNE vs LGE burden at the same thresholds, regression and Bland–Altman",
        "fig5_agreement_adjusted.png": "Figure 5 D–F: VNE at the adjusted thresholds (35/20/10%) vs LGE (50/25/12.5%)",
        "fig4_panels.png": "Figure 4: T1 map | VNE | LGE, lesions at three threshold levels in colour",
    }
    _fig_agreement(metrics, out_dir / "fig5_agreement.png", "VNE vs LGE (same thresholds)", "VNE vs LGE {}", "vne")
    _fig_agreement(metrics, out_dir / "fig5_agreement_adjusted.png", "VNE (adjusted thresholds) vs LGE", "VNE adjusted vs LGE {}", "vne_adjusted")
    _fig_panels(results, out_dir / "fig4_panels.png", margin_px=metrics.get("contour_margin_px", quantify.CONTOUR_MARGIN_PX))
    lines = [f"# {title}", "", f"{metrics['n_patients']} patients, {metrics['n_slices']} slices.", ""]
    if "qc" in metrics:
        q = metrics["qc"]
        lines += [f"Quality guard (vne.runtime.qc, qc=withhold): {q['refused']} of {q['slices']} slices refused "
                  f"({100 * q['refusal_rate']:.1f} %); refused slices are missing from every figure below, not counted as correct.", ""]
        lines += [f"- {r}" for r in q["reasons"][:20]] + ([""] if q["reasons"] else [])
    lines += ["## Lesion burden agreement (per patient)", "",
             "| comparison | r | slope | ICC(A,1) [95% CI] | bias | LoA | Wilcoxon p |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in metrics["agreement"].items():
        lines.append(f"| {name} | {a['r']:.3f} | {a['slope']:.2f} | {a['icc']:.3f} [{a['icc_ci'][0]:.2f}, {a['icc_ci'][1]:.2f}] | "
                     f"{a['bias'] * 100:+.1f}% | [{a['loa'][0] * 100:+.1f}, {a['loa'][1] * 100:+.1f}]% | {a['wilcoxon_p']:.3g} |")
    lines += ["", "## Mean burden", "", "| method | mean burden |", "| --- | --- |"]
    lines += [f"| {k} | {v * 100:.1f}% |" for k, v in metrics["burden_mean"].items()]
    fp = metrics["false_positive"]
    lines += ["", "## Image similarity and false positives", "",
              f"- SSIM inside the heart (VNE vs LGE, normalised): {metrics['ssim_heart']['mean']:.3f} ± {metrics['ssim_heart']['sd']:.3f}",
              f"- PSNR inside the heart: {metrics['psnr_heart_db']['mean']:.1f} ± {metrics['psnr_heart_db']['sd']:.1f} dB",
              f"- false positives ({fp['definition']}): {fp['truth_lesion_free']['fp']}/{fp['truth_lesion_free']['n']} truly lesion-free patients, "
              f"{fp['lge_negative']['fp']}/{fp['lge_negative']['n']} LGE-negative patients", "",
              "## Image quality (median over slices)", "",
              "| slices | image | CNR blood–myocardium | remote variance | SSIM vs artefact-free LGE |", "| --- | --- | --- | --- | --- |"]
    for group, q in metrics["image_quality"].items():
        for name in ("LGE", "VNE"):
            v = q[name]
            lines.append(f"| {group} (n={q['n_slices']}) | {name} | {v['cnr_blood_myocardium']:.1f} | {v['remote_variance']:.4f} | "
                         f"{v['ssim_vs_artefact_free_lge']:.3f} |")
    if metrics.get("ablations"):
        keys = [k for k in next(iter(metrics["ablations"].values())) if k != "ssim_heart"]
        lines += ["", "## Ablations (burden agreement r / ICC(A,1), adjusted VNE thresholds)", "",
                  "| model | " + " | ".join(keys) + " | SSIM heart |", "| --- |" + " --- |" * (len(keys) + 1)]
        for name, a in metrics["ablations"].items():
            cells = [f"{a[k]['r']:.3f} / {a[k]['icc']:.3f}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {a['ssim_heart']:.3f} |")
    lines += ["", "## Figures", "", "| file | what |", "| --- | --- |"]
    lines += [f"| [{k}]({k}) | {v} |" for k, v in figs.items()]
    lines += ["", "## Definitions", "", "See `vne/evaluation/stats.py` and `vne/evaluation/quantify.py` docstrings: ICC(A,1) is two-way, absolute agreement, "
              "single measure (McGraw & Wong case 2A); Bland–Altman limits are bias ± 1.96 SD; Wilcoxon p is the two-sided "
              "signed-rank test of the paired per-patient burdens (zero differences dropped); burden = lesion area / "
              "myocardium area over all slices of a patient, the myocardium taken "
              f"{metrics.get('contour_margin_px', quantify.CONTOUR_MARGIN_PX)} pixel(s) inside its borders (contour margin, "
              "docs/evaluation.md)."]
    for k in figs:
        lines.append(f"\n![{figs[k]}]({k})")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
