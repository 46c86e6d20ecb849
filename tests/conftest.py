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
    """The shared real data: ``$VNE_SHARED_DATA``, else ``../shared/data`` beside the clone."""
    env = os.environ.get("VNE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def shared_data(relative: str, *needed: str) -> Path:
    """``shared_data_dir() / relative``, which must hold every path in ``needed``.

    Missing shared data fails the test (so CI cannot go green without the real-data tests);
    with ``VNE_ALLOW_MISSING_SHARED=1`` it skips instead, for a clone without ``../shared``.
    """
    d = shared_data_dir() / relative
    if d.is_dir() and all((d / n).exists() for n in needed):
        return d
    msg = (f"shared data not found: {d}{' with ' + ', '.join(needed) if needed else ''} "
           "(set VNE_SHARED_DATA to the shared data folder, or VNE_ALLOW_MISSING_SHARED=1 to skip)")
    if os.environ.get("VNE_ALLOW_MISSING_SHARED") == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="session")
def phantom_dir() -> Path:
    return shared_data("hcmr-shmolli-phantom")


@pytest.fixture(scope="session")
def sim_set(tmp_path_factory) -> Path:
    """`vne simulate --cases 3 --seed 1 --dicom` output, made once through the real CLI."""
    from vne.cli import main

    out = tmp_path_factory.mktemp("sim") / "set"
    assert main(["simulate", "--cases", "3", "--seed", "1", "--out", str(out), "--dicom"]) == 0
    return out
