"""Shared fixtures: a small simulated exam set (made once per test session) and the shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Most tests drive the data path with tiny random-weight models, whose output no quality guard
# would pass. They run with the guard off (the default of the `qc` property, also for the
# subprocesses they start); the guard's own tests and the golden tests set `qc` explicitly.
os.environ["VNE_QC"] = "off"


def shared_data_dir() -> Path:
    env = os.environ.get("VNE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def phantom_dir() -> Path:
    d = shared_data_dir() / "hcmr-shmolli-phantom"
    if not d.is_dir():
        pytest.skip(f"real phantom DICOMs not found at {d} (set VNE_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def sim_set(tmp_path_factory) -> Path:
    """`vne simulate --cases 3 --seed 1 --dicom` output, made once through the real CLI."""
    from vne.cli import main

    out = tmp_path_factory.mktemp("sim") / "set"
    assert main(["simulate", "--cases", "3", "--seed", "1", "--out", str(out), "--dicom"]) == 0
    return out
