"""ISMRMRD files written by tools other than VNE (issue 10: readers that accept what real writers produce).

Writers covered (docs/roles.md, "Who writes what"):

- the external simulator's ``exam.h5`` (``../shared/data/external-exams``): one image group per
  series, named after the series (``/dataset/cine_SAX_1``), ``position`` = image centre;
- python-ismrmrd-server's ``client.py`` output: everything under a top-level group named after a
  timestamp (``str(datetime.now())``), images in ``image_<series>``;
- python-ismrmrd-server's ``dicom2mrd.py``: ``position`` = DICOM ImagePositionPatient (the first
  pixel), the whole DICOM header as base64 JSON in the ``DicomJson`` meta, ``image_series_index``
  0-based by SeriesNumber, ``field_of_view`` = (PixelSpacing[1] * Rows, PixelSpacing[0] *
  Columns, SliceThickness) (x and y use the wrong matrix sides), ``physiology_time_stamp[0]`` =
  ``int(TriggerTime / 2.5)``, pixels = the DICOM stored values (no rescale), meta ``ImageType``
  as ``str(MultiValue)`` (``"['ORIGINAL', 'PRIMARY', 'M']"``).

:func:`dicom2mrd` below is a line-by-line port of ``dicom2mrd.py`` from
github.com/kspaceKelvin/python-ismrmrd-server (commit df45f516ac5ecadda5f6ad46bee96f0c52069bdb),
whose source was read for this test, for single-frame MR Image Storage. Two deviations: the XML
header is made with :func:`vne.io.mrd.header_xml` (the original's ``ismrmrd.xsd.ismrmrdHeader()``
fails with ismrmrd 1.15, which wants its required fields as keyword arguments), and a missing
AcquisitionTime (our simulator's DICOM has none) leaves ``acquisition_time_stamp`` 0 instead of
raising. With the header patched the same way, the original script converted
``ext_0/dicom`` to a file whose images (headers, meta, pixels) this port reproduces.

No mocks: the real CLI, the shared external exam (``VNE_SHARED_DATA``; a failure when absent),
the simulated exam of :mod:`vne_helpers`, and a tiny random ONNX generator.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pydicom
import pytest

import vne_helpers as H
from conftest import shared_data
from vne.io import mrd as mrd_io
from vne.cli import main
from vne.errors import InputError
from vne.exam.data import Role

TIMESTAMP_GROUP = "2024-05-17 14:03:27.512893"


def _qc_off() -> list[str]:
    """``-p qc=off`` where the pipeline has a quality guard: the tiny model's weights are random,
    and these tests check the data path, not the image quality."""
    import dataclasses

    from vne.runtime.config import PipelineConfig

    # python-ismrmrd-server client.py: str(datetime.datetime.now())
    return ["-p", "qc=off"] if "qc" in {f.name for f in dataclasses.fields(PipelineConfig)} else []


@pytest.fixture(scope="module")
def model() -> str:
    return str(H.tiny_model())


@pytest.fixture(scope="module")
def ext0() -> Path:
    return shared_data("external-exams/ext_0", "exam.h5", "dicom")


# ------------------------------------------------------------------------------ dicom2mrd.py port
IMTYPE_MAP = {"M": ismrmrd.IMTYPE_MAGNITUDE, "P": ismrmrd.IMTYPE_PHASE, "R": ismrmrd.IMTYPE_REAL, "I": ismrmrd.IMTYPE_IMAG}


def _calc_field_of_view(dset) -> tuple[float, float, float]:
    # dicom2mrd.CalcFieldOfView, 'MR Image Storage' branch (sic: Rows with PixelSpacing[1])
    return (dset.PixelSpacing[1] * dset.Rows, dset.PixelSpacing[0] * dset.Columns, float(dset.SliceThickness))


def dicom2mrd(folder: Path, out: Path, group: str = "dataset") -> Path:
    """Convert a DICOM folder as python-ismrmrd-server's dicom2mrd.py does (see the module docstring)."""
    dsets_all = [pydicom.dcmread(p) for p in sorted(Path(folder).rglob("*"))
                 if p.is_file() and p.suffix.lower() in (".dcm", ".ima")]
    series_nums = np.unique([d.SeriesNumber for d in dsets_all])
    if all(series_nums > 1000):
        for d in dsets_all:
            d.SeriesNumber = int(np.floor(d.SeriesNumber / 1000))
    series_nums = np.unique([d.SeriesNumber for d in dsets_all])
    d0 = dsets_all[0]
    header = mrd_io.header_xml(
        study_uid=str(d0.StudyInstanceUID), patient_id=str(d0.get("PatientID", "")),
        frame_of_reference_uid=str(d0.get("FrameOfReferenceUID", "")),
        field_strength_t=float(d0.get("MagneticFieldStrength", 1.5) or 1.5),
        protocol_name=str(d0.get("SeriesDescription", "")), matrix=(int(d0.Columns), int(d0.Rows)),
        fov_mm=tuple(float(v) for v in _calc_field_of_view(d0)))
    images = []
    for sn in series_nums:
        dsets = sorted([d for d in dsets_all if d.SeriesNumber == sn], key=lambda d: d.InstanceNumber)
        try:
            u_slice = np.unique([d.SliceLocation for d in dsets])
            if dsets[0].SliceLocation != u_slice[0]:
                u_slice = u_slice[::-1]
        except AttributeError:
            u_slice = np.zeros(len(series_nums))
        try:
            u_trig = np.unique([d.TriggerTime for d in dsets])
            if dsets[0].TriggerTime != u_trig[0]:
                u_trig = u_trig[::-1]
        except AttributeError:
            u_trig = np.zeros_like(u_slice)
        for d in dsets:
            img = ismrmrd.Image.from_array(d.pixel_array, transpose=False)
            meta = ismrmrd.Meta()
            try:
                img.image_type = IMTYPE_MAP[d.ImageType[2]]
            except (KeyError, IndexError, AttributeError):
                img.image_type = ismrmrd.IMTYPE_MAGNITUDE
            ipp, iop = d.ImagePositionPatient, d.ImageOrientationPatient
            acq_time = d.get("AcquisitionTime")
            try:
                trigger = float(d.TriggerTime)
            except (AttributeError, TypeError, ValueError):
                trigger = None
            img.field_of_view = _calc_field_of_view(d)
            img.position = tuple(np.stack(ipp))
            img.read_dir = tuple(np.stack(iop[0:3]))
            img.phase_dir = tuple(np.stack(iop[3:7]))
            img.slice_dir = tuple(np.cross(np.stack(iop[0:3]), np.stack(iop[3:7])))
            if acq_time:  # deviation: the original raises without AcquisitionTime
                img.acquisition_time_stamp = round((int(acq_time[0:2]) * 3600 + int(acq_time[2:4]) * 60
                                                    + int(acq_time[4:6]) + float(acq_time[6:] or 0)) * 1000 / 2.5)
            if trigger:
                img.physiology_time_stamp[0] = round(int(trigger / 2.5))
            img.image_series_index = series_nums.tolist().index(d.SeriesNumber)
            img.image_index = d.get("InstanceNumber", 0)
            img.slice = u_slice.tolist().index(getattr(d, "SliceLocation", 0))
            try:
                img.phase = u_trig.tolist().index(d.TriggerTime)
            except (AttributeError, ValueError):
                pass
            try:
                meta["ImageType"] = d.ImageType  # a pydicom MultiValue: serialized as str(list)
            except AttributeError:
                pass
            try:
                meta["ImageComments"] = d.ImageComments
            except AttributeError:
                pass
            meta["SequenceDescription"] = d.SeriesDescription
            if hasattr(d, "PixelData"):
                del d["PixelData"]
            meta["DicomJson"] = base64.b64encode(d.to_json().encode("utf-8")).decode("utf-8")
            img.attribute_string = meta.serialize()
            images.append(img)
    dset = ismrmrd.Dataset(str(out), group)
    dset._file.require_group(group)
    dset.write_xml_header(bytes(header, "utf-8"))
    for img in images:
        dset.append_image("image_%d" % img.image_series_index, img)
    dset.close()
    return out


def _study(header: str):
    return mrd_io.study_key(mrd_io.parse_header(header))


def _vne_images(path: Path, input_series: set[int]) -> list:
    _, back = mrd_io.read_mrd_file(path)
    return [b for b in back if b.image_series_index not in input_series]


def _vne_units(img) -> np.ndarray:
    m = img.meta
    return np.asarray(img.data[0, 0], np.float64) * float(m["RescaleSlope"]) + float(m["RescaleIntercept"])


# ------------------------------------------------------------------------------ (a) series-named groups
def test_infer_reads_the_external_exams_series_named_groups(model, ext0, tmp_path):
    header, images = mrd_io.read_mrd_file(ext0 / "exam.h5")
    groups = {"cine_SAX_1": 30, "ShMOLLI_MAG": 7, "ShMOLLI_PHA": 7, "ShMOLLI_T1MAP": 1, "de_psir_SAX": 1}
    assert len(images) == sum(groups.values())
    roles = [mrd_io.from_mrd(m, _study(header)).role for m in images]
    assert roles.count(Role.CINE) == 30 and roles.count(Role.IR_MAGNITUDE) == 7 and roles.count(Role.IR_PHASE) == 7
    assert roles.count(Role.T1_MAP) == 1 and roles.count(Role.LGE) == 1
    # scanner order: acquisition time stamps (cine, then ShMOLLI, then LGE), stable within a series
    assert [m.image_series_index for m in images][:30] == [5] * 30
    assert [m.image_index for m in images][:30] == list(range(1, 31))
    assert images[-1].image_series_index == 20

    out = tmp_path / "ext0-vne.h5"
    assert main(["infer", str(ext0 / "exam.h5"), "--out", str(out), "--model", model, *_qc_off()]) == 0
    vne = _vne_images(out, {m.image_series_index for m in images})
    t1 = next(m for m in images if m.image_series_index == 10)
    assert len(vne) == 1 and vne[0].image_series_index == 1010
    assert H.geometry_fields(vne[0]) == H.geometry_fields(t1)
    assert np.isfinite(_vne_units(vne[0])).all()


# ------------------------------------------------------------------------------ (b) top-level groups
def test_images_under_a_timestamp_group_are_read_with_and_without_group(model, tmp_path, capsys):
    header, images = H.sim_stream()
    f = mrd_io.write_mrd_file(tmp_path / "client-out.h5", header, images, group=TIMESTAMP_GROUP)
    h_auto, auto = mrd_io.read_mrd_file(f)
    h_named, named = mrd_io.read_mrd_file(f, group=TIMESTAMP_GROUP)
    assert h_auto == h_named == header
    assert H.serialized(auto) == H.serialized(named) == H.serialized(images)

    assert main(["infer", str(f), "--out", str(tmp_path / "a.h5"), "--model", model, *_qc_off()]) == 0
    assert main(["infer", str(f), "--out", str(tmp_path / "b.h5"), "--model", model, "--group", TIMESTAMP_GROUP, *_qc_off()]) == 0
    a, b = (_vne_images(tmp_path / n, {1, 2, 3, 4, 5}) for n in ("a.h5", "b.h5"))
    assert len(a) == len(b) == 3
    assert [H.geometry_fields(x) for x in a] == [H.geometry_fields(x) for x in b]
    capsys.readouterr()

    # a second client run appends another timestamp group: ambiguous without --group
    mrd_io.write_mrd_file(tmp_path / "second.h5", header, images[:5], group="2024-05-17 15:10:02.004711")
    with h5py.File(tmp_path / "second.h5", "r") as src, h5py.File(f, "a") as dst:
        src.copy(src["2024-05-17 15:10:02.004711"], dst, "2024-05-17 15:10:02.004711")
    assert main(["infer", str(f), "--out", str(tmp_path / "c.h5"), "--model", model, *_qc_off()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vne infer: error:")
    assert TIMESTAMP_GROUP in err and "2024-05-17 15:10:02.004711" in err and "--group" in err
    assert main(["infer", str(f), "--out", str(tmp_path / "c.h5"), "--model", model, "--group", TIMESTAMP_GROUP, *_qc_off()]) == 0
    capsys.readouterr()

    # a missing group is one line, for every command that reads .h5 exams
    assert main(["infer", str(f), "--out", str(tmp_path / "d.h5"), "--model", model, "--group", "dataset"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no group 'dataset'" in err and TIMESTAMP_GROUP in err
    assert main(["stream", str(f), "--port", "9", "--out", str(tmp_path / "s.h5"), "--group", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vne stream: error:") and "no group 'nope'" in err
    assert main(["evaluate", "--exams", str(H.sim_dir()), "--model", model, "--out", str(tmp_path / "rep"),
                 "--group", "nope"]) == 2
    err = capsys.readouterr().err
    assert "vne evaluate: error:" in err and "no group 'nope'" in err
    assert main(["infer", str(H.sim_dicom()), "--out", str(tmp_path / "dcm"), "--model", model, "--group", "x"]) == 2
    assert "--group is for ISMRMRD" in capsys.readouterr().err


def test_files_are_opened_read_only_and_can_be_shared(tmp_path):
    header, images = H.sim_stream()
    f = mrd_io.write_mrd_file(tmp_path / "ro.h5", header, images)
    os.chmod(f, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    with h5py.File(f, "r"):  # another reader holds the file open
        h, back = mrd_io.read_mrd_file(f)
    assert h == header and len(back) == len(images)


def test_every_image_group_is_read_whatever_its_name(tmp_path):
    """Any subgroup with image ``header`` and ``data`` is an image group, whatever its name; the XML
    header and other datasets are not. Without time stamps the order is the groups' file order
    (by name, numbers compared as numbers: ``image_2`` before ``image_10``), stored order inside."""
    header, images = H.sim_stream()
    names = {1: "cine", 2: "image_2", 3: "images_3", 4: "ShMOLLI_T1MAP", 5: "image_10"}
    f = tmp_path / "names.h5"
    ds = ismrmrd.Dataset(str(f), "dataset", create_if_needed=True)
    ds.write_xml_header(header)
    for im in images:
        c = ismrmrd.Image(im.getHead(), im.attribute_string, data=np.asarray(im.data).copy())
        c.acquisition_time_stamp = 0
        ds.append_image(names[im.image_series_index], c)
    ds._dataset.create_dataset("waveforms", data=np.zeros(3))
    ds.close()
    _, back = mrd_io.read_mrd_file(f)
    assert len(back) == len(images)
    runs = [s for k, s in enumerate(b.image_series_index for b in back) if k == 0 or back[k - 1].image_series_index != s]
    assert runs == [4, 1, 2, 5, 3]  # ShMOLLI_T1MAP, cine, image_2, image_10, images_3
    for s in names:
        mine = [b for b in back if b.image_series_index == s]
        theirs = [i for i in images if i.image_series_index == s]
        assert [np.asarray(x.data).tobytes() for x in mine] == [np.asarray(x.data).tobytes() for x in theirs]
        assert [x.attribute_string for x in mine] == [x.attribute_string for x in theirs]


# ------------------------------------------------------------------------------ (c) dicom2mrd files
@pytest.mark.parametrize("source", ["sim", "ext_0"])
def test_dicom2mrd_file_gives_the_same_vne_as_the_dicom_folder(model, source, tmp_path):
    if source == "ext_0":
        d = shared_data("external-exams/ext_0/dicom")
    else:
        d = H.sim_dicom()
    f = dicom2mrd(d, tmp_path / "d2m.h5")
    header, images = mrd_io.read_mrd_file(f)
    assert all("DicomJson" in m.meta for m in images)

    dcm_out, h5_out = tmp_path / "vne-dicom", tmp_path / "vne.h5"
    assert main(["infer", str(d), "--out", str(dcm_out), "--model", model, *_qc_off()]) == 0
    assert main(["infer", str(f), "--out", str(h5_out), "--model", model, *_qc_off()]) == 0
    from vne.io.dicom import read_dicom_folder

    ref = read_dicom_folder(dcm_out)[0].images
    vne = _vne_images(h5_out, {m.image_series_index for m in images})
    assert len(vne) == len(ref) >= 1
    t1_maps = {int(m.slice): m for m in images if mrd_io.from_mrd(m, _study(header)).role == Role.T1_MAP}
    for v in vne:
        # the VNE image carries its T1 map's header (dicom2mrd's conventions); VNE's slice
        # geometry is the T1 map's as VNE reads it (from DicomJson)
        t1_mrd = t1_maps[int(v.slice)]
        assert H.geometry_fields(v) == H.geometry_fields(t1_mrd)
        g = mrd_io.from_mrd(t1_mrd, _study(header)).geometry
        r = min(ref, key=lambda x: np.linalg.norm(np.subtract(x.geometry.position_mm, g.position_mm)))
        np.testing.assert_allclose(g.position_mm, r.geometry.position_mm, atol=1e-3)
        np.testing.assert_allclose(g.read_dir, r.geometry.read_dir, atol=1e-5)
        np.testing.assert_allclose(g.phase_dir, r.geometry.phase_dir, atol=1e-5)
        np.testing.assert_allclose(g.pixel_spacing_mm, r.geometry.pixel_spacing_mm, rtol=1e-6)
        assert g.shape == r.geometry.shape == tuple(v.data.shape[-2:])
        # same inputs in physical units, same slice matching -> the same VNE (up to DICOM's uint16 steps)
        step = float(pydicom.dcmread(r.source, stop_before_pixels=True).RescaleSlope)
        np.testing.assert_allclose(_vne_units(v), r.pixels, atol=step + 1e-4)


# ------------------------------------------------------------------------------ (e) DicomJson geometry
def test_dicom_json_geometry_pixels_and_times_match_the_dicom_reader(tmp_path):
    """Every image of a dicom2mrd file reads as the DICOM reader reads its source file: image
    centre (not ImagePositionPatient, which dicom2mrd puts in ``position``), spacing (not
    dicom2mrd's swapped field_of_view), pixels in physical units, role, TI and trigger time."""
    from vne.io.dicom import read_dicom_folder

    src = H.sim_dicom()
    ref = {(int(m.meta["SeriesNumber"]), int(m.meta["InstanceNumber"])): m for m in read_dicom_folder(src)[0].images}
    header, images = mrd_io.read_mrd_file(dicom2mrd(src, tmp_path / "d2m.h5"))
    assert len(images) == len(ref)
    n_far = 0
    for m in images:
        im = mrd_io.from_mrd(m, _study(header))
        r = ref[(int(im.meta["SeriesNumber"]), int(m.image_index))]
        assert im.meta["VNE_GeometryFrom"] == "DicomJson" and "DicomJson" not in im.meta
        np.testing.assert_allclose(im.geometry.position_mm, r.geometry.position_mm, atol=1e-3)
        np.testing.assert_allclose(im.geometry.pixel_spacing_mm, r.geometry.pixel_spacing_mm, rtol=1e-6)
        assert im.geometry.shape == r.geometry.shape
        n_far += np.linalg.norm(np.subtract(m.position, r.geometry.position_mm)) > 50  # position = first pixel
        assert im.role == r.role and im.inversion_time_ms == r.inversion_time_ms
        if r.trigger_time_ms is not None:
            assert im.trigger_time_ms == pytest.approx(r.trigger_time_ms)
        assert (im.study_uid, im.frame_of_reference_uid) == (r.study_uid, r.frame_of_reference_uid)
        np.testing.assert_allclose(im.pixels, r.pixels, atol=1e-4, rtol=1e-6)
    assert n_far == len(images)


def test_dicom_json_fills_ti_trigger_and_descriptions_missing_from_meta():
    header, images = H.sim_stream()
    t1 = next(m for m in images if m.image_series_index == 4)
    g = mrd_io.geometry_of(t1)
    from vne.exam.geometry import first_pixel_from_centre

    dj = {"00200032": {"vr": "DS", "Value": [float(v) for v in first_pixel_from_centre(g)]},
          "00200037": {"vr": "DS", "Value": [*map(float, g.read_dir), *map(float, g.phase_dir)]},
          "00280030": {"vr": "DS", "Value": list(g.pixel_spacing_mm)},
          "00280010": {"vr": "US", "Value": [g.shape[0]]}, "00280011": {"vr": "US", "Value": [g.shape[1]]},
          "00180050": {"vr": "DS", "Value": [6.0]},
          "00180082": {"vr": "DS", "Value": [183.0]}, "00181060": {"vr": "DS", "Value": [412.5]},
          "0008103E": {"vr": "LO", "Value": ["MOLLI_5s(3s)3s"]},
          "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "M", "DIS2D"]}}
    im = ismrmrd.Image.from_array(np.full((1, 1, *g.shape), 100, np.uint16), transpose=False)
    im.position = tuple(float(v) for v in first_pixel_from_centre(g))  # dicom2mrd's position
    im.field_of_view = (1.0, 1.0, 1.0)
    im.read_dir, im.phase_dir = tuple(g.read_dir), tuple(g.phase_dir)
    im.physiology_time_stamp[0] = 164  # 410 ms: DicomJson's TriggerTime (412.5 ms) wins
    m = ismrmrd.Meta()
    m["DicomJson"] = base64.b64encode(json.dumps(dj).encode()).decode()
    im.attribute_string = m.serialize()
    out = mrd_io.from_mrd(im)
    assert out.role == Role.IR_MAGNITUDE and out.inversion_time_ms == 183.0 and out.trigger_time_ms == 412.5
    assert out.series_description == "MOLLI_5s(3s)3s" and out.geometry.slice_thickness_mm == 6.0
    np.testing.assert_allclose(out.geometry.position_mm, g.position_mm, atol=1e-4)
    np.testing.assert_allclose(out.pixels, 100.0)
    # the meta's own values win over DicomJson
    m["InversionTime"] = "250"
    im.attribute_string = m.serialize()
    assert mrd_io.from_mrd(im).inversion_time_ms == 250.0


# ------------------------------------------------------------------------------ (d) trigger time
def test_trigger_time_from_physiology_time_stamp_without_trigger_meta(model, tmp_path):
    header, images = H.sim_stream()
    stripped = []
    for im in images:
        c = ismrmrd.Image(im.getHead(), data=np.asarray(im.data).copy())
        meta = dict(im.meta)
        meta.pop("TriggerTime", None)
        c.meta = ismrmrd.Meta(meta)
        stripped.append(c)
    key = _study(header)
    cine = [(im, mrd_io.from_mrd(im, key)) for im in stripped if im.image_series_index == 1]
    assert all(c.role == Role.CINE for _, c in cine)
    for raw, c in cine:
        assert c.trigger_time_ms == int(raw.physiology_time_stamp[0]) * mrd_io.PHYSIO_TICK_MS
    assert min(c.trigger_time_ms for _, c in cine) == 0.0  # the first phase's zero stamp is 0 ms, not "unset"
    with_meta = {(int(i.slice), int(i.phase)): mrd_io.from_mrd(i, key).trigger_time_ms
                 for i in images if i.image_series_index == 1}
    for raw, c in cine:
        assert abs(c.trigger_time_ms - with_meta[(int(raw.slice), int(raw.phase))]) <= mrd_io.PHYSIO_TICK_MS / 2

    f = mrd_io.write_mrd_file(tmp_path / "physio.h5", header, stripped)
    assert main(["infer", str(f), "--out", str(tmp_path / "o.h5"), "--model", model, *_qc_off()]) == 0
    assert len(_vne_images(tmp_path / "o.h5", {1, 2, 3, 4, 5})) == 3


def test_trigger_and_ti_parsing_helpers():
    from vne.exam.roles import inversion_time_from_meta, trigger_time_from_meta

    assert trigger_time_from_meta({"TriggerTime": "0.00"}) == 0.0
    assert trigger_time_from_meta({"GADGETRON_TriggerTime": ["26.76"]}) == 26.76
    assert trigger_time_from_meta({"TriggerTime": "-1"}) is None and trigger_time_from_meta({}) is None
    assert inversion_time_from_meta({"ImageComments": "TIeff 103 ms", "InversionTime": "100"}) == 103.0
    assert inversion_time_from_meta({"ImageComments": None, "InversionTime": "0.0"}) is None


def test_meta_is_read_as_its_xml_would_be_read_back():
    """meta_dict takes the image's ismrmrd.Meta without writing and parsing its XML; the values
    must be exactly those of the XML round trip (numbers as text, a one-item list as its item,
    an empty string as None), for in-process images and for images decoded from bytes."""
    import io

    from vne.io.framing import decode_image, pack_image, read_frame
    from vne.io.mrd.image import meta_dict

    im = ismrmrd.Image.from_array(np.zeros((4, 4), np.uint16))
    for k, v in {"InversionTime": 105.5, "ImageType": ["ORIGINAL", "PRIMARY", "M"], "One": ["x"], "Empty": "",
                 "EmptyItems": ["", "y"], "Int": 3, "Nested": [[1, 2], "z"], "None": [], "Text": "ShMOLLI T1 map"}.items():
        im.meta[k] = v
    back = ismrmrd.Meta.deserialize(im.attribute_string)
    expected = {k: back[k] for k in back.keys()}
    assert meta_dict(im) == expected
    assert expected["InversionTime"] == "105.5" and expected["One"] == "x" and expected["Empty"] is None
    decoded = decode_image(read_frame(io.BytesIO(pack_image(im))))
    assert meta_dict(decoded) == expected


# ------------------------------------------------------------------------------ position = first pixel
def _with_positions_as_first_pixels(images):
    from vne.exam.geometry import first_pixel_from_centre

    out = []
    for im in images:
        c = ismrmrd.Image(im.getHead(), im.attribute_string, data=np.asarray(im.data).copy())
        c.position = tuple(float(v) for v in first_pixel_from_centre(mrd_io.geometry_of(im)))
        out.append(c)
    return out


def test_first_pixel_check_is_silent_on_centre_conventions_and_keeps_geometry(ext0, tmp_path, caplog):
    """No false alarm on files that store centres (the external simulator's, ours), and the
    geometry of a first-pixel file is left as stored. (ext_0's series each have their own FOV
    centre, so with first pixels stored only one of its pairs agrees: below the 60 % needed,
    which is the price of not warning on every one of our own simulator's files.)"""
    header, images = mrd_io.read_mrd_file(ext0 / "exam.h5")
    assert mrd_io.position_convention_findings(images) == []
    _, ours = H.sim_stream()
    assert mrd_io.position_convention_findings(ours) == []
    f = mrd_io.write_mrd_file(tmp_path / "first-pixel.h5", header, _with_positions_as_first_pixels(images))
    _, back = mrd_io.read_mrd_file(f)
    assert [tuple(b.position) for b in back] == [tuple(i.position) for i in _with_positions_as_first_pixels(images)]


def test_first_pixel_check_on_same_centre_series_and_dicom_json(tmp_path, caplog):
    """Two series planned on one slice with one FOV centre but different FOVs: centres agree as
    stored; first pixels stored instead disagree by half the FOV difference -> warning."""
    from vne.exam.data import Geometry, MRImage

    n = np.array([0.3, -0.2, 0.93])
    n /= np.linalg.norm(n)
    r = np.cross(n, [0, 0, 1.0])
    r /= np.linalg.norm(r)
    p = np.cross(n, r)
    centre = (12.0, -30.0, 45.0)
    geoms = [Geometry(centre, tuple(r), tuple(p), (1.75, 1.75), (176, 224), 8.0),
             Geometry(centre, tuple(r), tuple(p), (0.9375, 0.9375), (288, 384), 8.0)]
    ims = [mrd_io.to_mrd(MRImage(np.zeros(g.shape, np.float32), g), series_index=k + 1, image_index=1)
           for k, g in enumerate(geoms)]
    assert mrd_io.position_convention_findings(ims) == []
    moved = _with_positions_as_first_pixels(ims)
    found = mrd_io.position_convention_findings(moved)
    assert len(found) == 1 and "0.0 mm as first pixels" in found[0]
    # the same images from dicom2mrd (DicomJson present) are not suspicious: DicomJson gives the geometry
    for im in moved:
        m = ismrmrd.Meta({"DicomJson": base64.b64encode(b"{}").decode()})
        im.attribute_string = m.serialize()
    assert mrd_io.position_convention_findings(moved) == []


def test_unreadable_or_incomplete_dicom_json_falls_back_to_the_header(caplog):
    header, images = H.sim_stream()
    t1 = next(m for m in images if m.image_series_index == 4)
    meta = dict(t1.meta)
    for bad in ("not base64 json!", base64.b64encode(b'{"00200032": {"vr": "DS", "Value": [1, 2, 3]}}').decode()):
        c = ismrmrd.Image(t1.getHead(), data=np.asarray(t1.data).copy())
        c.meta = ismrmrd.Meta({**meta, "DicomJson": bad})
        with caplog.at_level(logging.WARNING, logger="vne.io.mrd"):
            im = mrd_io.from_mrd(c, _study(header))
        assert im.geometry == mrd_io.from_mrd(t1, _study(header)).geometry and im.role == Role.T1_MAP
    assert any("DicomJson" in r.getMessage() for r in caplog.records)


def test_read_mrd_file_user_errors(tmp_path):
    with pytest.raises(InputError, match="no such"):
        mrd_io.read_mrd_file(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not a readable"):
        mrd_io.read_mrd_file(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("a")
        f.create_group("b")
    with pytest.raises(InputError, match=r"2 top-level groups .*'a', 'b'"):
        mrd_io.read_mrd_file(tmp_path / "empty.h5")
    with pytest.raises(InputError, match="no ISMRMRD XML header in group 'a'"):
        mrd_io.read_mrd_file(tmp_path / "empty.h5", group="a")
