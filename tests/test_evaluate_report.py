"""The evaluation report machinery on simulated slices (VNE replaced by known images)."""
import json

import numpy as np

from vne.evaluation.analysis import SliceResult, evaluate, write_report
from vne.io.training_data import read_index, read_slice


def results_from_cache(sim_set, vne_of):
    doc = read_index(sim_set / "cache")
    out = []
    for e in doc["entries"]:
        x = read_slice(sim_set / "cache", e["slice_id"])
        m = {k: x[k].astype(bool) for k in ("myocardium", "blood_pool", "remote", "lesion", "lge_myocardium", "lge_blood_pool", "lge_remote")}
        out.append(SliceResult(e["case_id"], e["patient_id"], e["slice_id"], x["t1_map_ms"], vne_of(x), x["lge"], x["lge_clean"],
                               m["myocardium"], m["blood_pool"], m["remote"], m["lesion"], e["lesion_free"], e["lge_artefacts"],
                               m["lge_myocardium"], m["lge_blood_pool"], m["lge_remote"]))
    return out


def test_perfect_vne_agrees_perfectly(sim_set, tmp_path):
    res = results_from_cache(sim_set, lambda x: x["lge"] * 3.0 + 7.0)  # an affine copy of the LGE
    for r in res:  # quantified with the same contours, an affine copy must agree exactly
        r.lge_myocardium, r.lge_blood_pool, r.lge_remote = r.myocardium, r.blood_pool, r.remote
    m = evaluate(res)
    a = m["agreement"]["VNE vs LGE FWHM"]
    assert a["r"] > 0.999 and a["icc"] > 0.999 and abs(a["bias"]) < 1e-9
    assert m["ssim_heart"]["mean"] > 0.999
    report = write_report(m, res, tmp_path)
    text = report.read_text()
    for f in ("fig5_agreement.png", "fig5_agreement_adjusted.png", "fig4_panels.png"):
        assert (tmp_path / f).stat().st_size > 10_000 and f in text
    assert json.loads((tmp_path / "metrics.json").read_text())["n_patients"] == 3
    # identical burdens: the paired Wilcoxon test finds nothing (the report's Wilcoxon p column)
    assert a["wilcoxon_p"] == 1.0 and "Wilcoxon p" in text


def test_noise_lowers_agreement(sim_set):
    rng = np.random.default_rng(0)
    good = evaluate(results_from_cache(sim_set, lambda x: x["lge_clean"]))
    bad = evaluate(results_from_cache(sim_set, lambda x: x["lge_clean"] + rng.normal(0, 3 * np.abs(x["lge_clean"]).mean(), x["lge"].shape)))
    assert bad["ssim_heart"]["mean"] < good["ssim_heart"]["mean"]
    assert bad["agreement"]["VNE vs LGE FWHM"]["icc"] < good["agreement"]["VNE vs LGE FWHM"]["icc"]
