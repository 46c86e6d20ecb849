"""`vne t1map` end to end on the real ShMOLLI phantom, through vne.cli.main."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from vne.cli import main
from vne.io.dicom import read_dicom_folder
from vne.exam.data import Role


@pytest.fixture(scope="module")
def t1map_run(tmp_path_factory, phantom_dir):
    out = tmp_path_factory.mktemp("t1map") / "out"
    rc = main(["t1map", str(phantom_dir), "--out", str(out)])
    return rc, out


def test_t1map_writes_t1_and_r2_series(t1map_run, phantom_dir, capsys):
    rc, out = t1map_run
    assert rc == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["1012_ShMOLLI_192i_e11_T1MAP_VNE", "2012_ShMOLLI_192i_e11_T1MAP_VNE_RSQUARE"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    [ex] = read_dicom_folder(out)
    [t1] = ex.by_role(Role.T1_MAP)
    [r2] = ex.by_role(Role.UNKNOWN)
    assert t1.series_description == "ShMOLLI_192i_e11_T1MAP_VNE"
    assert t1.meta["ImageComments"] == "T1 Map (vne)"
    assert t1.meta["ImageType"] == ["DERIVED", "PRIMARY", "T1 MAP", "VNE"]
    assert r2.series_description == "ShMOLLI_192i_e11_T1MAP_VNE_RSQUARE"
    # same study, patient, frame of reference and geometry as the source IR images
    [src] = read_dicom_folder(phantom_dir)
    ir = src.by_role(Role.IR_MAGNITUDE)[0]
    assert ex.study_uid == src.study_uid and ex.patient_id == src.patient_id
    assert t1.frame_of_reference_uid == ir.frame_of_reference_uid
    assert t1.series != ir.series and t1.series != r2.series
    np.testing.assert_allclose(t1.geometry.position_mm, ir.geometry.position_mm, atol=1e-4)
    assert t1.geometry.shape == ir.geometry.shape and t1.geometry.pixel_spacing_mm == ir.geometry.pixel_spacing_mm
    # values: ms, close to the scanner's map where both fitted; R^2 stored x4000, read back in [0, 1]
    ref = src.by_role(Role.T1_MAP)[0].pixels
    fit_range = pydicom.dcmread(phantom_dir / "ShMOLLI_192i_e11_FITPARAMS_15" / "IM-0004-0005.dcm").pixel_array
    both = (ref > 0) & (fit_range > 0) & (t1.pixels > 0)
    assert np.median(np.abs(t1.pixels[both] - ref[both]) / ref[both]) < 0.01
    assert r2.pixels.min() >= 0 and r2.pixels.max() <= 1.0 and np.median(r2.pixels[both]) > 0.99
    raw = pydicom.dcmread(next((out / "2012_ShMOLLI_192i_e11_T1MAP_VNE_RSQUARE").glob("*.dcm")))
    assert raw.pixel_array.max() <= 4000 and float(raw.RescaleSlope) == pytest.approx(1 / 4000)


def test_t1map_summary_is_one_line(tmp_path, capsys, phantom_dir):
    rc = main(["t1map", str(phantom_dir), "--out", str(tmp_path / "o"), "--scheme", "molli"])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vne t1map: 1 slice(s) from 1 IR series (1 with phase)")
    # rerunning into the same folder replaces the series
    assert main(["t1map", str(phantom_dir), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").rglob("*.dcm"))) == 2


def test_t1map_bad_input_is_a_one_line_error(tmp_path, capsys, phantom_dir):
    (tmp_path / "empty").mkdir()
    assert main(["t1map", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vne t1map: error:") and "empty" in err[0]
    # a folder with a T1 map but no IR series
    only_map = tmp_path / "only_map"
    only_map.mkdir()
    shutil.copy(phantom_dir / "ShMOLLI_192i_e11_T1MAP_14" / "IM-0003-0002.dcm", only_map)
    assert main(["t1map", str(only_map), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no IR-weighted magnitude series" in err[0] and "1 t1_map" in err[0]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # ShMOLLI forced on a series with the wrong number of images names the series
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted((phantom_dir / "ShMOLLI_192i_e11_12").glob("*.dcm"))[:5]:
        shutil.copy(f, few)
    assert main(["t1map", str(few), "--out", str(tmp_path / "o3"), "--scheme", "shmolli"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ShMOLLI_192i_e11" in err[0] and "7 IR images" in err[0]
    assert not (tmp_path / "o3").exists()
