"""``vne infer`` on an ISMRMRD file and on a DICOM folder (the same pipeline as the gadget).

No mocks: the real CLI, the simulated exam written by ``vne simulate`` (ISMRMRD and Siemens-like
DICOM), and a tiny random ONNX generator.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

import vne_helpers as H
from vne.cli import main


@pytest.fixture(scope="module")
def model() -> str:
    return str(H.tiny_model())


def test_infer_h5_keeps_every_input_and_adds_the_vne_series(model, tmp_path):
    from vne.io.mrd.hdf5 import read_mrd_file

    out = tmp_path / "out.h5"
    assert main(["infer", str(H.sim_h5()), "--out", str(out), "--model", model]) == 0
    header_in, images = H.sim_stream()
    header_out, back = read_mrd_file(out)
    assert header_out == header_in
    for series in sorted({im.image_series_index for im in images}):
        assert H.serialized([b for b in back if b.image_series_index == series]) == \
            H.serialized([i for i in images if i.image_series_index == series])
    vne = [b for b in back if b.image_series_index == 1004]
    t1 = {i.slice: i for i in images if i.image_series_index == 4}
    assert len(vne) == 3 and sorted(v.image_index for v in vne) == [1, 2, 3]
    for v in vne:
        assert v.data.dtype == np.float32 and H.geometry_fields(v) == H.geometry_fields(t1[v.slice])
        assert v.meta["ImageComments"] == "VNE vne-sim-test 0.0.1"
    assert len(back) == len(images) + 3


def test_infer_dicom_writes_a_new_derived_series_in_the_same_study(model, tmp_path):
    out = tmp_path / "vne-dicom"
    src = H.sim_dicom()
    assert main(["infer", str(src), "--out", str(out), "--model", model]) == 0
    inputs = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(src.rglob("*.dcm"))]
    t1 = {round(float(d.SliceLocation), 1): d for d in inputs if "T1 MAP" in list(d.ImageType)}
    folders = list(out.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("1004_")
    files = sorted(folders[0].glob("*.dcm"))
    assert len(files) == 3
    ds = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    assert ds[0].SeriesInstanceUID not in {d.SeriesInstanceUID for d in inputs}
    assert {d.StudyInstanceUID for d in ds} == {inputs[0].StudyInstanceUID}
    assert {d.FrameOfReferenceUID for d in ds} == {inputs[0].FrameOfReferenceUID}
    for d in ds:
        assert list(d.ImageType)[:3] == ["DERIVED", "PRIMARY", "VNE"] and d.SeriesNumber == 1004
        ref = t1[round(float(d.SliceLocation), 1)]
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            assert np.allclose([float(x) for x in getattr(d, key)], [float(x) for x in getattr(ref, key)], atol=1e-4), key
        assert (d.Rows, d.Columns) == (ref.Rows, ref.Columns)
        assert (float(d.RescaleSlope), float(d.RescaleIntercept)) == (0.001, -1.0)
        assert "VNE vne-sim-test" in d.ImageComments
    # the VNE series is never taken for an input when the folder is read again
    from vne.io.dicom import read_dicom_folder
    from vne.runtime.output_series import is_vne_output

    again = read_dicom_folder(out)[0].images
    assert all(is_vne_output(im.meta) for im in again)


def test_infer_user_errors_are_one_line(model, tmp_path, capsys):
    assert main(["infer", str(H.sim_h5()), "--out", str(tmp_path / "o.h5"), "--model", str(tmp_path / "none.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["infer", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o.h5"), "--model", model]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_infer_without_any_vne_says_why(model, tmp_path, capsys):
    from vne.io.mrd.hdf5 import write_mrd_file

    header, images = H.sim_stream()
    cine_only = tmp_path / "cine.h5"
    write_mrd_file(cine_only, header, [i for i in images if i.image_series_index == 1])
    assert main(["infer", str(cine_only), "--out", str(tmp_path / "o.h5"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vne infer: error: no VNE image made") and "no T1 map in this stream" in err


def test_default_model_is_the_newest_vne_sim_file(tmp_path, monkeypatch):
    from vne.runtime.model import find_default_model

    for name in ("vne-sim-1.9.onnx", "vne-sim-1.10.onnx", "other.onnx"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.delenv("VNE_MODEL", raising=False)
    monkeypatch.setenv("VNE_MODEL_DIR", str(tmp_path))
    assert find_default_model() == tmp_path / "vne-sim-1.10.onnx"
    monkeypatch.setenv("VNE_MODEL", "/x/y.onnx")
    assert find_default_model() == Path("/x/y.onnx")


def test_runtime_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, vne.runtime.pipeline, vne.runtime.model, vne.runtime.study_store, gadgets.vne_gadget, vne.commands.infer, "
            "vne.commands.serve, vne.commands.stream; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.stdout.strip() == "False", r.stderr
