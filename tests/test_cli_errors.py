"""The CLI's promise, as a new user meets it: every user error is one line ``vne CMD: error: ...``
on stderr and exit code 2, never a traceback. Each case runs the real ``vne`` in a subprocess.

Every subcommand is walked through its bad-argument cases (``test_every_subcommand_is_covered``
fails when a command is added without any). Argument errors are checked before any model is
loaded or any exam simulated, so their stderr is exactly that one line. Input folders with
nothing usable (a T1-map-only DICOM folder) are the same user error in ``infer``, ``prepare``
and ``t1map``; those commands log what they tried first, so there the error is the last line.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vne_helpers as H
from vne.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli-errors")
    junk = d / "not-a-checkpoint.pt"
    junk.write_bytes(b"this is not a checkpoint\n")
    t1_only = d / "t1-only"
    series = [p for p in H.sim_dicom().iterdir() if p.name.startswith("04_")]
    assert len(series) == 1, "the simulator's T1 map series folder"
    shutil.copytree(series[0], t1_only / series[0].name)
    (d / "empty").mkdir()
    return {"junk": str(junk), "t1_only": str(t1_only), "empty": str(d / "empty"), "h5": str(H.sim_h5()),
            "missing": str(d / "missing"), "out": str(d / "out"), "dir": str(d)}


# (command, arguments, words the error line must contain, only line on stderr?)
CASES = [
    ("simulate", ["--cases", "0", "--out", "{out}/sim"], "--cases must be at least 1", True),
    ("simulate", ["--cases", "abc", "--out", "{out}/sim"], "invalid int value", True),
    ("t1map", ["{missing}", "--out", "{out}/t1"], "does not exist", True),
    ("t1map", ["{t1_only}", "--out", "{out}/t1"], "", False),
    ("prepare", ["{missing}", "--out", "{out}/cache"], "does not exist", True),
    ("prepare", ["{t1_only}", "--out", "{out}/cache"], "no slice included", False),
    ("infer", ["{missing}.h5", "--out", "{out}/o.h5"], "does not exist", True),
    ("infer", ["{h5}", "--out", "{out}/o.h5", "--model", "{missing}.onnx"], "does not exist", True),
    ("infer", ["{h5}"], "--out", True),
    ("infer", ["{t1_only}", "--out", "{out}/vne"], "no VNE image made", False),
    ("serve", ["--port", "99999"], "invalid port 99999", True),
    ("serve", ["--port", "-1"], "invalid port -1", True),
    ("serve", ["--port", "0", "--model", "{missing}.onnx"], "does not exist", True),
    ("serve", ["--port", "0", "--max-active", "0", "--model", "{missing}.onnx"], "does not exist", True),
    ("stream", ["{missing}.h5", "--port", "9002", "--out", "{out}/s.h5"], "no such ISMRMRD file", True),
    ("stream", ["{h5}", "--port", "70000", "--out", "{out}/s.h5"], "invalid port 70000", True),
    ("train", ["--config", "{missing}.json"], "not found", True),
    ("train", ["--config", "smoke", "--set", "bogus=1"], "unknown key bogus", True),
    ("train", ["--config", "smoke", "--set", "schedule.max_steps=abc"], "schedule.max_steps must be an integer", True),
    ("export", ["{junk}", "--out", "{out}/m.onnx"], "not a readable VNE training checkpoint", True),
    ("export", ["{missing}.pt", "--out", "{out}/m.onnx"], "does not exist", True),
    ("evaluate", ["--exams", "{missing}", "--out", "{out}/report"], "does not exist", True),
    ("evaluate", ["--exams", "{empty}", "--out", "{out}/report"], "not a `vne simulate` output", True),
    ("evaluate", ["--exams", "{empty}", "--masks", "{missing}", "--out", "{out}/report"], "does not exist", True),
    ("demo", ["--model", "{missing}.onnx", "--out", "{out}/demo"], "does not exist", True),
]


def test_every_subcommand_is_covered():
    assert set(COMMANDS) == {c for c, *_ in CASES}


@pytest.mark.parametrize("cmd,argv,words,only_line", CASES,
                         ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)])
def test_user_error_is_one_line_and_exit_2(files, cmd, argv, words, only_line):
    args = [a.format(**files) for a in argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "vne.cli", cmd, *args], capture_output=True, text=True, timeout=120,
                       env=env, cwd=files["dir"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in lines if ln.startswith(f"vne {cmd}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-2000:]
    assert words in errors[0], errors[0]
    if only_line:
        assert len(lines) == 1, r.stderr[-2000:]
