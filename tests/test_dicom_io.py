"""DICOM reading (the real ShMOLLI phantom) and writing (round trip, atomicity, bad input)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pydicom
import pytest

from vne.io.dicom import choose_rescale, read_dicom_folder, write_series
from vne.errors import InputError
from vne.exam.data import Geometry, MRImage, Role
from vne.exam.geometry import pixel_centres_mm


@pytest.fixture(scope="module")
def phantom_exam(phantom_dir):
    exams = read_dicom_folder(phantom_dir)
    assert len(exams) == 1
    return exams[0]


# ----------------------------------------------------------------------------- the real phantom


def test_phantom_roles_and_inversion_times(phantom_exam):
    ex = phantom_exam
    assert ex.patient_id == "HCMR_phantom_1916_26.0C"
    assert ex.study_uid == "1.3.12.2.1107.5.2.43.166021.30000018070308032162900000025"
    mag = ex.by_role(Role.IR_MAGNITUDE)
    pha = ex.by_role(Role.IR_PHASE)
    t1 = ex.by_role(Role.T1_MAP)
    assert len(mag) == 7 and len(pha) == 7 and len(t1) == 1
    assert [m.inversion_time_ms for m in mag] == [100, 1100, 2100, 3100, 4100, 180, 260]  # instance order
    assert [p.inversion_time_ms for p in pha] == [100, 1100, 2100, 3100, 4100, 180, 260]
    assert {m.series_description for m in mag} == {"ShMOLLI_192i_e11"}
    assert len({m.series for m in mag}) == 1 and {m.series for m in mag} != {p.series for p in pha}
    assert t1[0].source.endswith("IM-0003-0002.dcm")
    assert t1[0].inversion_time_ms is None
    # the colour rendering is not read at all; the FITPARAMS series is unknown
    assert not any(im.source.endswith("IM-0003-0001.dcm") for im in ex.images)
    assert len(ex.by_role(Role.UNKNOWN)) == 7
    assert len(ex.images) == 22
    for im in ex.images:
        assert im.trigger_time_ms == pytest.approx(532.5)
        assert im.rr_interval_ms is None  # NominalInterval 0: unknown
        assert im.frame_of_reference_uid.startswith("1.3.12.2.1107.5.2.43.166021.2.")
        assert isinstance(im.meta["ImageType"], list)
        assert im.meta["RoleReason"]
    assert mag[0].meta["ImageComments"] == "TIeff 100 ms"
    assert mag[0].meta["ImageType"] == ["ORIGINAL", "PRIMARY", "M", "DIS2D"]
    assert mag[0].meta["SequenceName"] == "tfi2d1_84"
    assert mag[0].meta["SeriesNumber"] == "12" and mag[3].meta["InstanceNumber"] == "4"


def test_phantom_geometry_is_the_image_centre(phantom_exam):
    im = phantom_exam.by_role(Role.IR_MAGNITUDE)[0]
    g = im.geometry
    assert g.shape == (288, 384) and g.pixel_spacing_mm == (0.9375, 0.9375) and g.slice_thickness_mm == 8.0
    assert g.read_dir == (1.0, 0.0, 0.0) and g.phase_dir == (0.0, 1.0, 0.0)
    ipp = np.array([-176.55328440666, -110.78246879578, 2.5585625171661])
    expected = ipp + np.array([383 / 2 * 0.9375, 287 / 2 * 0.9375, 0.0])
    np.testing.assert_allclose(g.position_mm, expected, atol=1e-6)
    # and the first pixel centre is ImagePositionPatient again
    np.testing.assert_allclose(pixel_centres_mm(g)[0, 0], ipp, atol=1e-6)
    # all 22 images share the plane
    for other in phantom_exam.images:
        np.testing.assert_allclose(other.geometry.position_mm, g.position_mm, atol=1e-6)


def test_phantom_pixels_in_physical_units(phantom_exam):
    mag = phantom_exam.by_role(Role.IR_MAGNITUDE)[0]
    pha = phantom_exam.by_role(Role.IR_PHASE)[0]
    t1 = phantom_exam.by_role(Role.T1_MAP)[0]
    raw_pha = pydicom.dcmread(pha.source).pixel_array.astype(float)
    np.testing.assert_allclose(pha.pixels, (raw_pha * 2 - 4096) / 4096 * np.pi, atol=1e-5)
    assert pha.pixels.min() >= -np.pi - 1e-6 and pha.pixels.max() < np.pi
    np.testing.assert_array_equal(mag.pixels, pydicom.dcmread(mag.source).pixel_array.astype(np.float32))
    raw_t1 = pydicom.dcmread(t1.source).pixel_array
    np.testing.assert_array_equal(t1.pixels, raw_t1.astype(np.float32))  # ShMOLLI maps are in ms
    assert mag.pixels.dtype == np.float32 and mag.pixels.shape == (288, 384)


def test_nested_folders_and_junk_files(tmp_path, caplog, phantom_dir):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for f in sorted((phantom_dir / "ShMOLLI_192i_e11_12").glob("*.dcm"))[:2]:
        shutil.copy(f, deep / f.name)
    shutil.copy(phantom_dir / "ShMOLLI_192i_e11_T1MAP_14" / "IM-0003-0001.dcm", tmp_path / "a" / "colour.dcm")
    (tmp_path / "a" / "notes.txt").write_text("not a dicom file")
    with caplog.at_level(logging.WARNING, logger="vne.io.dicom"):
        exams = read_dicom_folder(tmp_path)
    assert [im.role for im in exams[0].images] == [Role.IR_MAGNITUDE, Role.IR_MAGNITUDE]
    text = caplog.text
    assert "notes.txt" in text and "not a readable DICOM" in text
    assert "colour.dcm" in text and "rendering" in text


@pytest.mark.parametrize("implicit", [True, False])
def test_files_without_preamble_are_read(tmp_path, implicit, phantom_dir):
    src = phantom_dir / "ShMOLLI_192i_e11_12" / "IM-0001-0001.dcm"
    ds = pydicom.dcmread(src)
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "raw", ds, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "raw").read_bytes()[128:132] != b"DICM"
    [ex] = read_dicom_folder(tmp_path)
    [im] = ex.images
    assert im.role == Role.IR_MAGNITUDE and im.inversion_time_ms == 100.0
    np.testing.assert_array_equal(im.pixels, pydicom.dcmread(src).pixel_array.astype(np.float32))


# ----------------------------------------------------------------------------- bad input


def test_empty_folder_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        read_dicom_folder(tmp_path)
    assert "empty" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_file_is_a_one_line_input_error(tmp_path):
    junk = tmp_path / "IM-0001.dcm"
    junk.write_bytes(b"\x00" * 64 + b"garbage that is not DICOM")
    with pytest.raises(InputError) as e:
        read_dicom_folder(tmp_path)
    msg = str(e.value)
    assert "IM-0001.dcm" in msg and "no usable DICOM" in msg and "\n" not in msg
    with pytest.raises(InputError) as e:
        read_dicom_folder(junk)  # a single file works as a path too
    assert "IM-0001.dcm" in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        read_dicom_folder(tmp_path / "nope")


def _geometry(oblique: bool = True, shape=(24, 32)) -> Geometry:
    if not oblique:
        return Geometry((1.0, -2.0, 3.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.5, 1.25), shape, 8.0)
    th = np.deg2rad(30.0)
    read = np.array([np.cos(th), np.sin(th), 0.0])
    phase = np.array([-np.sin(th) * np.cos(0.4), np.cos(th) * np.cos(0.4), np.sin(0.4)])
    return Geometry((12.3, -45.6, 78.9), tuple(read), tuple(phase), (1.4, 1.6), shape, 6.0)


def _image(pixels, role, geom, **kw) -> MRImage:
    base = dict(study_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5", patient_id="P1", series_description="test")
    base.update(kw)
    return MRImage(pixels=np.asarray(pixels, np.float32), geometry=geom, role=role, **base)


def test_rgb_and_multiframe_instances_are_excluded(tmp_path, caplog):
    geom = _geometry(False)
    im = _image(np.arange(24 * 32).reshape(24, 32), Role.IR_MAGNITUDE, geom, inversion_time_ms=100.0)
    [good] = write_series([im], tmp_path / "s", series_number=1, image_type=["ORIGINAL", "PRIMARY", "M"])
    rgb = pydicom.dcmread(good)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = np.zeros((24, 32, 3), np.uint8).tobytes()
    rgb.save_as(tmp_path / "s" / "rgb.dcm")
    multi = pydicom.dcmread(good)
    multi.NumberOfFrames = 2
    multi.PixelData = np.zeros((2, 24, 32), np.uint16).tobytes()
    multi.save_as(tmp_path / "s" / "multi.dcm")
    with caplog.at_level(logging.WARNING, logger="vne.io.dicom"):
        [ex] = read_dicom_folder(tmp_path)
    assert len(ex.images) == 1 and ex.images[0].source == str(good)
    assert "rgb.dcm" in caplog.text and "colour" in caplog.text
    assert "multi.dcm" in caplog.text and "2 frames" in caplog.text


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("oblique", [False, True])
def test_write_series_round_trip(tmp_path, oblique):
    rng = np.random.default_rng(0)
    geom = _geometry(oblique)
    ny, nx = geom.shape
    t1 = rng.uniform(0, 2400, (ny, nx))
    psir = rng.uniform(-1.5, 2.5, (ny, nx))
    mag = np.round(rng.uniform(0, 1000, (ny, nx)))
    pha = rng.uniform(-np.pi, np.pi, (ny, nx))
    cases = [
        (_image(t1, Role.T1_MAP, geom, trigger_time_ms=530.0, rr_interval_ms=1000.0, meta={"ImageComments": "T1 Map (vne)"}),
         ["DERIVED", "PRIMARY", "T1 MAP"], "x_T1MAP_VNE", 2400 / 20000),
        (_image(psir, Role.LGE, geom, inversion_time_ms=300.0), ["DERIVED", "PRIMARY", "M", "PSIR"], "LGE_PSIR_VNE", 4 / 20000),
        (_image(mag, Role.IR_MAGNITUDE, geom, inversion_time_ms=180.0, trigger_time_ms=500.0,
                meta={"ImageComments": "TIeff 180 ms"}), ["ORIGINAL", "PRIMARY", "M"], "ShMOLLI_test", 0.0),
        (_image(pha, Role.IR_PHASE, geom, inversion_time_ms=180.0), ["ORIGINAL", "PRIMARY", "P"], "ShMOLLI_test", np.pi / 4096 + 1e-6),
    ]
    for n, (im, itype, desc, tol) in enumerate(cases, start=1):
        folder = tmp_path / f"series{n}"
        files = write_series([im, replace(im, pixels=im.pixels[::-1].copy())], folder, series_number=100 + n,
                             image_type=itype, series_description=desc)
        assert [f.name for f in files] == [f"IM-{100 + n:04d}-0001.dcm", f"IM-{100 + n:04d}-0002.dcm"]
        assert sorted(folder.iterdir()) == files
        [ex] = read_dicom_folder(folder)
        assert ex.study_uid == "1.2.3.4" and ex.patient_id == "P1"
        back = ex.images
        assert len(back) == 2 and len({b.series for b in back}) == 1
        for b, src in zip(back, [im.pixels, im.pixels[::-1]]):
            assert b.role == im.role, (desc, b.meta["RoleReason"])
            assert b.series_description == desc
            assert b.frame_of_reference_uid == "1.2.3.5"
            assert b.meta["SeriesNumber"] == str(100 + n)
            np.testing.assert_allclose(b.geometry.position_mm, geom.position_mm, atol=1e-4)
            np.testing.assert_allclose(b.geometry.read_dir, geom.read_dir, atol=1e-6)
            np.testing.assert_allclose(b.geometry.phase_dir, geom.phase_dir, atol=1e-6)
            assert b.geometry.pixel_spacing_mm == geom.pixel_spacing_mm and b.geometry.shape == geom.shape
            assert b.geometry.slice_thickness_mm == geom.slice_thickness_mm
            assert b.inversion_time_ms == im.inversion_time_ms
            assert b.trigger_time_ms == im.trigger_time_ms
            assert b.rr_interval_ms == im.rr_interval_ms
            if im.role == Role.IR_PHASE:
                err = np.abs(np.angle(np.exp(1j * (b.pixels - src))))
            else:
                err = np.abs(b.pixels - src)
            assert err.max() <= tol + 1e-9, (desc, err.max())
        ds = pydicom.dcmread(files[0])
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert ds.SliceLocation == pytest.approx(float(np.asarray(geom.position_mm) @ geom.slice_dir), abs=1e-4)
        if im.role == Role.IR_PHASE:
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (2.0, -4096.0)
        if "ImageComments" in im.meta:
            assert ds.ImageComments == im.meta["ImageComments"]


def test_write_series_keeps_a_given_series_uid_and_is_atomic(tmp_path, monkeypatch):
    geom = _geometry(False)
    ims = [_image(np.full(geom.shape, 500.0 + i), Role.T1_MAP, geom) for i in range(3)]
    files = write_series(ims, tmp_path / "out", series_number=7, image_type=["DERIVED", "PRIMARY", "T1 MAP"],
                         series_uid="1.2.3.4.99")
    assert {pydicom.dcmread(f).SeriesInstanceUID for f in files} == {"1.2.3.4.99"}
    # a failure on the second file leaves nothing behind: no new files, no temporary folder
    calls = {"n": 0}
    real_save = pydicom.dataset.Dataset.save_as

    def failing_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", failing_save)
    with pytest.raises(OSError):
        write_series(ims, tmp_path / "new", series_number=8, image_type=["DERIVED", "PRIMARY", "T1 MAP"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(InputError):
        write_series([], tmp_path / "none", series_number=1, image_type=["DERIVED"])


def test_choose_rescale():
    assert choose_rescale(np.array([0.0, 12.0, 1000.0])) == (1.0, 0.0)  # integers: as they are
    s, i = choose_rescale(np.array([-1.0, 0.25, 3.0]))
    assert i <= -1.0 and s * 65535 + i >= 3.0 and s < 1e-4
    s, i = choose_rescale(np.array([5.0, 5.0]))
    assert s == 1.0 and i <= 5.0
