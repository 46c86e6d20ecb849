"""The external exams' ISMRMRD files give the same VNE as their DICOM folders (issue 10, Targets).

``../shared/data/external-exams/ext_0`` and ``ext_1`` hold the same exam twice, written by an
independent simulator: ``exam.h5`` (one HDF5 group per series, named after the series, positions
at the image centre) and ``dicom/`` (MR Image Storage, positions at the first pixel). ``vne infer``
on each, through the real CLI with a tiny random-weight model (the data path is compared, not the
image quality), must give the same VNE image per slice: same slice geometry, and pixels equal up
to the DICOM output's storage step (uint16 with RescaleSlope; the ISMRMRD output is float32, so
the largest difference is half a step). The max |difference| is printed for each exam.

Needs the shared data (``VNE_SHARED_DATA``, see tests/conftest.py ``shared_data``).
"""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

import vne_helpers as H
from conftest import shared_data
from vne.io import mrd as mrd_io
from vne.cli import main


def _units(img) -> np.ndarray:
    """VNE values of an ISMRMRD VNE image (stored * RescaleSlope + RescaleIntercept)."""
    m = img.meta
    return np.asarray(img.data[0, 0], np.float64) * float(m["RescaleSlope"]) + float(m["RescaleIntercept"])


@pytest.mark.parametrize("exam", ["ext_0", "ext_1"])
def test_exam_h5_and_dicom_folder_give_the_same_vne(exam, tmp_path):
    d = shared_data(f"external-exams/{exam}", "exam.h5", "dicom")
    from vne.io.dicom import read_dicom_folder

    model = str(H.tiny_model())
    h5_out, dcm_out = tmp_path / "vne.h5", tmp_path / "vne-dicom"
    assert main(["infer", str(d / "exam.h5"), "--out", str(h5_out), "--model", model]) == 0
    assert main(["infer", str(d / "dicom"), "--out", str(dcm_out), "--model", model]) == 0

    header, inputs = mrd_io.read_mrd_file(d / "exam.h5")
    study = mrd_io.study_key(mrd_io.parse_header(header))
    series = {m.image_series_index for m in inputs}
    vne = [b for b in mrd_io.read_mrd_file(h5_out)[1] if b.image_series_index not in series]
    ref = [im for exam_ in read_dicom_folder(dcm_out) for im in exam_.images]
    assert len(vne) == len(ref) >= 1, (len(vne), len(ref))

    worst = 0.0
    for v in vne:
        g = mrd_io.from_mrd(v, study).geometry  # the ISMRMRD VNE image in VNE's own geometry terms
        r = min(ref, key=lambda x: np.linalg.norm(np.subtract(x.geometry.position_mm, g.position_mm)))
        np.testing.assert_allclose(g.position_mm, r.geometry.position_mm, atol=1e-3)
        np.testing.assert_allclose(g.read_dir, r.geometry.read_dir, atol=1e-5)
        np.testing.assert_allclose(g.phase_dir, r.geometry.phase_dir, atol=1e-5)
        np.testing.assert_allclose(g.pixel_spacing_mm, r.geometry.pixel_spacing_mm, rtol=1e-6)
        a, b = _units(v), np.asarray(r.pixels, np.float64)
        assert a.shape == b.shape
        step = float(pydicom.dcmread(r.source, stop_before_pixels=True).RescaleSlope)
        assert np.ptp(a) > 100 * step, "VNE is flat: the comparison would say nothing"
        diff = float(np.abs(a - b).max())
        worst = max(worst, diff)
        assert diff <= step / 2 + 1e-5, f"{exam}: max |VNE(h5) - VNE(DICOM)| = {diff:.6g} > half the DICOM step {step:g}"
    print(f"{exam}: {len(vne)} VNE slice(s), max |VNE(exam.h5) - VNE(dicom)| = {worst:.6g} "
          f"(DICOM storage step {step:g})")
