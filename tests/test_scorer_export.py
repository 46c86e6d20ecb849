"""`vne evaluate --export-scorer`: our exams in the external judge's layout.

The judge's `score_exams.py` (../shared/tools) is the real peer; where it is present the test runs
it on the exported files, so a change of layout on either side shows up here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vne.evaluation.analysis import SliceResult, write_scorer_exams

SCORER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "score_exams.py"


def _slice(pid: str, lesion_free: bool, vne_border_bright: bool) -> SliceResult:
    """A 64×64 ring of myocardium around a blood pool; optional lesion block and a bright VNE border."""
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    blood, myo = r < 10, (r >= 10) & (r < 16)
    lesion = myo & (xx > 40) & ~lesion_free
    remote = myo & (xx < 28)
    lge = np.where(blood, 1.0, 0.0) + np.where(lesion, 1.0, 0.0)
    vne = lge.copy()
    if vne_border_bright:  # a blurred blood/myocardium border: the inner ring of myocardium at 0.6
        vne[myo & (r < 11)] = 0.6
    t1 = np.full((64, 64), 1000.0, np.float32)
    return SliceResult(case_id=pid, patient_id=pid, slice_key="s0", t1_map_ms=t1, vne=vne.astype(np.float32),
                       lge=lge, lge_clean=lge, myocardium=myo, blood_pool=blood, remote=remote, lesion=lesion,
                       lesion_free=lesion_free)


def test_layout_and_truth(tmp_path):
    results = [_slice("P1", False, False), _slice("P1", False, False), _slice("P2", True, True)]
    cases, pred, skipped = write_scorer_exams(results, tmp_path)
    assert skipped == []
    t = np.load(cases / "P1" / "truth.npz")
    assert t["myo"].shape == (2, 64, 64) and t["myo"].dtype == bool
    assert np.load(pred / "P1.npy").shape == (2, 64, 64)
    lesion = results[0].lesion & results[0].myocardium
    assert float(t["burden_true"]) == pytest.approx(lesion.sum() / results[0].myocardium.sum())
    assert float(np.load(cases / "P2" / "truth.npz")["burden_true"]) == 0.0


@pytest.mark.skipif(not SCORER.is_file(), reason=f"the judge's scorer is not at {SCORER}")
def test_the_judges_scorer_reads_the_export(tmp_path):
    """A bright one-pixel border on a lesion-free exam reads as a false positive, as on the external exams."""
    results = [_slice("P1", False, False), _slice("P2", True, False), _slice("P3", True, True)]
    cases, pred, _ = write_scorer_exams(results, tmp_path)
    subprocess.run([sys.executable, str(SCORER), str(cases), "--pred-npy", str(pred), "--json", str(tmp_path / "s.json")],
                   check=True, capture_output=True)
    res = json.loads((tmp_path / "s.json").read_text())
    rows = {r["case"]: r for r in res["cases"]}
    assert rows["P1"]["pred"]["FWHM"] == pytest.approx(100 * float(np.load(cases / "P1" / "truth.npz")["burden_true"]))
    assert rows["P2"]["pred"]["FWHM"] == 0.0
    assert rows["P3"]["pred"]["FWHM"] > 2.0  # the inner ring at 0.6 is above 50 % of the blood–remote range
    vne_fp = next(c for c in res["compare"] if c["method"] == "VNE@FWHM" and c["ref"] == "lge_clean@FWHM")["fp"]
    assert vne_fp == 1
