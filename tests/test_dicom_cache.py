"""The real-DICOM training path: matching, quality checks, inclusion log, patient splits."""
import csv
import re

import numpy as np

from vne.cli import main
from vne.io.training_data import read_index, read_slice


def test_simulated_dicom_exams_become_a_cache(sim_set, tmp_path):
    out = tmp_path / "cache"
    assert main(["prepare", str(sim_set / "dicom"), "--out", str(out)]) == 0
    doc = read_index(out)
    rows = list(csv.DictReader(open(out / "inclusion_log.csv")))
    n_slices = sum(1 for p in (sim_set / "truth").glob("*.npz") for k in np.load(p).files if re.fullmatch(r"s\d+_myocardium", k))
    assert len(doc["entries"]) == n_slices
    assert sum(r["decision"] == "included" for r in rows) == n_slices
    e = doc["entries"][0]
    assert e["has_masks"] is False and e["patient_id"].startswith("VNE-SIM")
    x = read_slice(out, e["slice_id"])
    assert x["cine"].shape[0] == 25 and x["ir"].shape[0] == 7
    assert x["lge"].shape == x["t1_map_ms"].shape and np.any(x["lge"])


def test_phantom_is_excluded_with_a_clear_reason(phantom_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    # nothing usable (no cine): a user error, one line, exit 2 (as `vne infer` and `vne t1map`)
    assert main(["prepare", str(phantom_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vne prepare: error: no slice included") and "no cine slice matches" in err
    rows = list(csv.DictReader(open(out / "inclusion_log.csv")))
    assert rows and all(r["decision"] == "excluded" for r in rows)
    assert any("no cine slice matches" in r["reason"] for r in rows)
    assert read_index(out)["entries"] == []
