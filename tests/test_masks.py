"""Evaluation masks from files (NumPy, NIfTI, DICOM-SEG) onto the T1 grid, and `collect_dicom` on DICOM exams.

The masks are the simulator's ground truth of ``sim_set`` written into each format; loaded back
onto the T1 grid they must be exactly the truth. The DICOM-SEG objects are built here with
pydicom, following the Segmentation IOD (binary frames bit-packed, fractional frames 8-bit).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, SegmentationStorage, generate_uid

from vne.io.dicom import read_dicom_folder
from vne.errors import InputError
from vne.exam.data import Geometry, MRImage
from vne.exam.geometry import first_pixel_from_centre, pixel_centres_mm
from vne.io import masks as M
from vne.io import nifti as N

MASKS = ("myocardium", "remote", "blood_pool", "lesion")


@pytest.fixture(scope="module")
def case(sim_set):
    """(T1 maps in slice order, {s<k>_<mask>: bool array}, patient id) of the first simulated case."""
    doc = json.loads((sim_set / "cases.json").read_text())
    c = doc["cases"][0]
    [exam] = read_dicom_folder(sim_set / "dicom" / c["case_id"])
    t1s = M.t1_slice_order(exam.images)
    with np.load(sim_set / "truth" / f"{c['case_id']}.npz") as z:
        truth = {k: z[k].astype(bool) for k in z.files if k.split("_", 1)[1] in MASKS + M.LGE_CONTOURS}
    assert len(t1s) == len(c["slices"]) == 3
    return t1s, truth, exam.patient_id


def truth_of(truth, k):
    return {m: truth[f"s{k}_{m}"] for m in MASKS}


def assert_masks_equal(got: M.SliceMasks, want: dict):
    for m, v in want.items():
        g = getattr(got, m)
        assert g is not None and g.dtype == bool and g.shape == v.shape, m
        assert np.array_equal(g, v), f"{m}: {int((g != v).sum())} pixels differ"


# ----------------------------------------------------------------------------- NumPy


def test_numpy_layouts_load_exactly(case, tmp_path):
    t1s, truth, pid = case
    root = tmp_path / "masks"
    root.mkdir()
    np.savez(root / f"{t1s[0].meta['SOPInstanceUID']}.npz", **{m: truth[f"s0_{m}"].astype(np.uint8) for m in MASKS})
    (root / pid).mkdir()
    for m in ("myocardium", "remote", "blood_pool"):  # no lesion mask for s1
        np.save(root / pid / f"s1_{m}.npy", truth[f"s1_{m}"])
    store = M.MaskStore(root)
    assert_masks_equal(store.load(t1s[0]), truth_of(truth, 0))
    m1 = store.load(t1s[1], slice_index=1, study_keys=[pid])
    assert_masks_equal(m1, {m: truth[f"s1_{m}"] for m in ("myocardium", "remote", "blood_pool")})
    assert m1.lesion is None
    with pytest.raises(M.MasksNotFound):
        store.load(t1s[1], slice_index=1)  # s<k> names need the study folder


def test_simulator_truth_file_is_a_study_npz(case, sim_set, tmp_path):
    t1s, truth, pid = case
    root = tmp_path / "masks"
    root.mkdir()
    shutil.copy(sorted((sim_set / "truth").glob("*.npz"))[0], root / f"{pid}.npz")
    store = M.MaskStore(root)
    for k, t1 in enumerate(t1s):
        m = store.load(t1, slice_index=k, study_keys=["elsewhere", pid])
        assert_masks_equal(m, {**truth_of(truth, k), **{c: truth[f"s{k}_{c}"] for c in M.LGE_CONTOURS}})
    one = M.load_masks(root / f"{pid}.npz", t1s[2], slice_index=2)  # a single file
    assert_masks_equal(one, truth_of(truth, 2))


# ----------------------------------------------------------------------------- NIfTI


def ras_affine(g: Geometry) -> np.ndarray:
    """Independent of vne.io.nifti: voxel (i=column, j=row, k) -> RAS mm for a mask stored as mask.T."""
    dy, dx = g.pixel_spacing_mm
    a = np.eye(4)
    a[:3, 0] = np.asarray(g.read_dir) * dx
    a[:3, 1] = np.asarray(g.phase_dir) * dy
    a[:3, 2] = np.cross(g.read_dir, g.phase_dir) * g.slice_thickness_mm
    a[:3, 3] = first_pixel_from_centre(g)
    a[:2] *= -1  # LPS -> RAS
    return a


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_on_the_t1_grid_loads_exactly(case, tmp_path, suffix):
    t1s, truth, pid = case
    root = tmp_path / "masks"
    for k, t1 in enumerate(t1s):
        for m in MASKS:
            N.write_nifti_mask(root / pid / f"s{k}_{m}{suffix}", truth[f"s{k}_{m}"], t1.geometry)
    store = M.MaskStore(root)
    for k, t1 in enumerate(t1s):
        assert_masks_equal(store.load(t1, slice_index=k, study_keys=[pid]), truth_of(truth, k))
    img = N.read_nifti(root / pid / f"s0_myocardium{suffix}")
    assert img.data.shape == (t1s[0].geometry.shape[1], t1s[0].geometry.shape[0], 1)
    assert np.allclose(img.affine, ras_affine(t1s[0].geometry), atol=1e-4)  # RAS, first pixel, mask.T


def test_nifti_files_of_nibabel_and_ours_agree(case, tmp_path):
    """nibabel's own sform-only, qform-only, NIfTI-2 and big-endian files load exactly through
    read_nifti / nifti_on_grid, and write_nifti_mask stores our affine as sform and qform."""
    import nibabel as nib
    t1s, truth, pid = case
    g, want = t1s[0].geometry, truth["s0_myocardium"]
    a = ras_affine(g)
    data = want.T[:, :, None].astype(np.int16)
    for name in ("sform", "qform", "nifti2", "big-endian"):
        if name == "nifti2":
            img = nib.Nifti2Image(data.astype(np.float32), a)
        else:
            img = nib.Nifti1Image(data.astype(">i2" if name == "big-endian" else np.int16), None,
                                  header=nib.Nifti1Header(endianness=">" if name == "big-endian" else "<"))
            img.set_sform(a if name != "qform" else None, code=0 if name == "qform" else 1)
            img.set_qform(a if name == "qform" else None, code=1 if name == "qform" else 0)
        path = tmp_path / f"{name}.nii.gz"
        nib.save(img, str(path))
        assert np.array_equal(N.nifti_on_grid(N.read_nifti(path), g) >= 0.5, want), name
    ours = nib.load(str(N.write_nifti_mask(tmp_path / "ours.nii", want, g)))
    assert np.allclose(ours.affine, a, atol=1e-4) and np.allclose(ours.get_qform(), a, atol=1e-4)
    assert np.array_equal(np.asarray(ours.dataobj)[:, :, 0].T, want)


def test_nifti_qform_only_flipped_rows_and_float_masks(case, tmp_path):
    """A dcm2niix-like file: rows stored bottom-up (the affine says so), qform only, float32 probabilities."""
    t1s, truth, pid = case
    g = t1s[1].geometry
    ny = g.shape[0]
    root = tmp_path / "m"
    for m in MASKS:
        flip = np.eye(4)
        flip[1, 1], flip[1, 3] = -1, ny - 1  # stored row j is T1 row ny-1-j
        a = ras_affine(g) @ flip
        data = truth[f"s1_{m}"][::-1].T[:, :, None].astype(np.float32) * 0.9 + 0.05
        path = N.write_nifti(root / f"{t1s[1].meta['SOPInstanceUID']}_{m}.nii", data, a)
        raw = bytearray(path.read_bytes())
        raw[254:256] = (0).to_bytes(2, "little")  # sform_code = 0: the qform places it
        path.write_bytes(bytes(raw))
    assert_masks_equal(M.MaskStore(root).load(t1s[1]), truth_of(truth, 1))


def test_nifti_on_another_grid_is_resampled_nearest_neighbour(case, tmp_path):
    t1s, truth, pid = case
    t1 = t1s[0]
    g = t1.geometry
    # (1) 3x finer, transposed (i along rows), shifted by whole fine voxels: the truth exactly
    fine = np.kron(truth["s0_myocardium"], np.ones((3, 3), bool))  # (3ny, 3nx) in T1 row/column order
    pad = np.zeros((fine.shape[0] + 7, fine.shape[1] + 4), bool)
    pad[5:5 + fine.shape[0], 1:1 + fine.shape[1]] = fine
    to_t1 = np.eye(4)  # fine (i = fine row, j = fine column) -> T1 voxel (column, row)
    to_t1[:3, :3] = [[0, 1 / 3, 0], [1 / 3, 0, 0], [0, 0, 1]]
    to_t1[:3, 3] = [-(1 + 1) / 3, -(5 + 1) / 3, 0]  # fine index 1 + 3c + pad offset is T1 index c
    path = N.write_nifti(tmp_path / "fine.nii.gz", pad[:, :, None].astype(np.uint8), ras_affine(g) @ to_t1)
    got = N.nifti_on_grid(N.read_nifti(path), g)
    assert np.array_equal(got >= 0.5, truth["s0_myocardium"])
    # (2) a coarser grid rotated in plane by 30 degrees, 1 mm off the plane: nearest voxel by inverse affine
    th = np.deg2rad(30)
    r, p = np.asarray(g.read_dir), np.asarray(g.phase_dir)
    other = Geometry(position_mm=tuple(np.asarray(g.position_mm) + 7.3 * r - 4.1 * p + 1.0 * g.slice_dir),
                     read_dir=tuple(np.cos(th) * r + np.sin(th) * p), phase_dir=tuple(-np.sin(th) * r + np.cos(th) * p),
                     pixel_spacing_mm=(1.9, 1.7), shape=(150, 170), slice_thickness_mm=8.0)
    rng = np.random.default_rng(3)
    data = (rng.random((170, 150)) > 0.5).astype(np.uint8)  # [i = column, j = row]
    a = ras_affine(other)
    path = N.write_nifti(tmp_path / "rot.nii", data[:, :, None], a)
    got = N.nifti_on_grid(N.read_nifti(path), g)
    ras = pixel_centres_mm(g) * np.array([-1, -1, 1])
    ijk = (np.linalg.inv(a) @ np.concatenate([ras, np.ones(ras.shape[:2] + (1,))], -1)[..., None])[..., :3, 0]
    ii, jj = np.rint(ijk[..., 0]).astype(int), np.rint(ijk[..., 1]).astype(int)
    inside = (ii >= 0) & (ii < 170) & (jj >= 0) & (jj < 150)
    want = np.zeros(g.shape, np.float32)
    want[inside] = data[ii[inside], jj[inside]]
    assert inside.mean() > 0.3 and not inside.all()
    frac = np.abs(ijk[..., :2] - np.rint(ijk[..., :2])).max(-1)
    clear = frac < 0.49  # away from ties
    assert np.array_equal(got[clear], want[clear])
    # (3) a plane 6 mm away does not match
    far = replace(other, position_mm=tuple(np.asarray(g.position_mm) + 6.0 * g.slice_dir))
    path = N.write_nifti(tmp_path / "far.nii", data[:, :, None], ras_affine(far))
    with pytest.raises(InputError, match="no slice of the mask volume lies in the T1 map plane"):
        N.nifti_on_grid(N.read_nifti(path), g)


def test_nifti_stack_picks_the_slice_in_the_t1_plane(case, tmp_path):
    t1s, truth, pid = case
    g = t1s[2].geometry
    vol = np.zeros((g.shape[1], g.shape[0], 5), np.uint8)
    vol[:, :, 3] = truth["s2_remote"].T
    vol[:, :, 2] = vol[:, :, 4] = truth["s2_myocardium"].T
    a = ras_affine(g)
    a[:3, 2] *= 3.0 / g.slice_thickness_mm  # 3 mm apart: the neighbours pass the 4 mm rule, the nearest wins
    a[:3, 3] -= 3 * a[:3, 2]  # slice 3 is the T1 plane
    path = N.write_nifti(tmp_path / "stack.nii.gz", vol, a)
    got = N.nifti_on_grid(N.read_nifti(path), g)
    assert np.array_equal(got >= 0.5, truth["s2_remote"])


# ----------------------------------------------------------------------------- DICOM-SEG

CODES = {  # SNOMED CT codes of the segmented property types
    "myocardium": ("74281007", "Myocardium"), "remote": ("74281007", "Myocardium"),
    "blood_pool": ("87878005", "Left ventricle"), "lesion": ("263863008", "Fibrosis"),
}


def _code(value, meaning, scheme="SCT"):
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _ds(v: float) -> str:
    for digits in (10, 9, 8, 7):
        s = f"{float(v):.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{float(v):.6e}"


def write_seg(path: Path, t1s: list[MRImage], segments: list[tuple[str, str, list[np.ndarray]]], *, fractional=False,
              references=True, values=None) -> Path:
    """A DICOM Segmentation of the T1 maps: ``segments`` are (label, role for the code, per-T1 masks);
    empty frames are left out, frames are written in a mixed-up order. ``values``: per-segment
    per-T1 fractional arrays in 0..1 (FRACTIONAL)."""
    ref = t1s[0]
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SegmentationStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = SegmentationStorage, fm.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "SEG", ["DERIVED", "PRIMARY"]
    ds.PatientID, ds.PatientName = ref.patient_id, ref.patient_id
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = ref.study_uid, ref.frame_of_reference_uid
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 900, 1
    ds.Manufacturer, ds.ContentLabel, ds.ContentDescription, ds.ContentCreatorName = "vne-test", "MASKS", "evaluation masks", "test"
    ds.ContentDate, ds.ContentTime, ds.SeriesDate, ds.SeriesTime = "20260101", "120000", "20260101", "120000"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ref.geometry.shape
    bits = 8 if fractional else 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.LossyImageCompression = "00"
    ds.SegmentationType = "FRACTIONAL" if fractional else "BINARY"
    if fractional:
        ds.SegmentationFractionalType, ds.MaximumFractionalValue = "PROBABILITY", 255
    seg_items = []
    for n, (label, role, _) in enumerate(segments, start=1):
        s = Dataset()
        s.SegmentNumber, s.SegmentLabel, s.SegmentAlgorithmType = n, label, "MANUAL"
        s.SegmentedPropertyCategoryCodeSequence = Sequence([_code("91723000", "Anatomical Structure")])
        s.SegmentedPropertyTypeCodeSequence = Sequence([_code(*CODES[role])])
        seg_items.append(s)
    ds.SegmentSequence = Sequence(seg_items)
    dim = Dataset()
    dim.DimensionOrganizationUID = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([dim])
    idx = []
    for pointer, group in ((0x0062000B, 0x0062000A), (0x00200032, 0x00209113)):
        d = Dataset()
        d.DimensionOrganizationUID, d.DimensionIndexPointer, d.FunctionalGroupPointer = dim.DimensionOrganizationUID, pointer, group
        idx.append(d)
    ds.DimensionIndexSequence = Sequence(idx)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [_ds(v) for v in ref.geometry.pixel_spacing_mm]
    pm.SliceThickness = _ds(ref.geometry.slice_thickness_mm)
    shared.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, per_frame = [], []
    for n, k in [(n, k) for k in reversed(range(len(t1s))) for n in range(len(segments))]:  # not in T1 order
        mask = segments[n][2][k]
        if not mask.any():
            continue
        t1 = t1s[k]
        fg = Dataset()
        fc = Dataset()
        fc.DimensionIndexValues = [n + 1, k + 1]
        fg.FrameContentSequence = Sequence([fc])
        pp = Dataset()
        pp.ImagePositionPatient = [_ds(v) for v in first_pixel_from_centre(t1.geometry)]
        fg.PlanePositionSequence = Sequence([pp])
        po = Dataset()
        po.ImageOrientationPatient = [_ds(v) for v in (*t1.geometry.read_dir, *t1.geometry.phase_dir)]
        fg.PlaneOrientationSequence = Sequence([po])
        si = Dataset()
        si.ReferencedSegmentNumber = n + 1
        fg.SegmentIdentificationSequence = Sequence([si])
        if references:
            src = Dataset()
            src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = MRImageStorage, t1.meta["SOPInstanceUID"]
            src.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "Source image for image processing operation", "DCM")])
            src.SpatialLocationsPreserved = "YES"
            der = Dataset()
            der.DerivationCodeSequence = Sequence([_code("113076", "Segmentation", "DCM")])
            der.SourceImageSequence = Sequence([src])
            fg.DerivationImageSequence = Sequence([der])
        per_frame.append(fg)
        frames.append(np.round(values[n][k] * 255).astype(np.uint8) if fractional else mask.astype(np.uint8))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(frames)
    rs = Dataset()
    rs.SeriesInstanceUID = ref.meta["SeriesInstanceUID"]
    items = []
    for t1 in t1s:
        ri = Dataset()
        ri.ReferencedSOPClassUID, ri.ReferencedSOPInstanceUID = MRImageStorage, t1.meta["SOPInstanceUID"]
        items.append(ri)
    rs.ReferencedInstanceSequence = Sequence(items)
    ds.ReferencedSeriesSequence = Sequence([rs])
    stack = np.stack(frames)
    if fractional:
        ds.PixelData = stack.tobytes()
    else:
        from pydicom.pixels import pack_bits

        ds.PixelData = pack_bits(stack)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_binary_dicom_seg_by_referenced_instance(case, tmp_path):
    t1s, truth, pid = case
    root = tmp_path / "seg"
    per = lambda m: [truth[f"s{k}_{m}"] for k in range(len(t1s))]  # noqa: E731
    write_seg(root / "study.dcm", t1s, [("Myocardium", "myocardium", per("myocardium")),
                                        ("LV blood pool", "blood_pool", per("blood_pool")),
                                        ("Remote myocardium", "remote", per("remote"))])
    write_seg(root / "lesions" / "scar", t1s, [("Scar", "lesion", per("lesion"))])  # a second object, no suffix
    (root / "notes.txt").write_text("not DICOM")
    px = pydicom.dcmread(root / "study.dcm").pixel_array  # the packed frames are valid for pydicom
    assert px.ndim == 3 and set(np.unique(px)) <= {0, 1}
    store = M.MaskStore(root)
    assert len(store.segs) == 2
    for k, t1 in enumerate(t1s):
        got = store.load(t1, slice_index=k, study_keys=[pid])
        assert_masks_equal(got, truth_of(truth, k))


def test_fractional_dicom_seg_by_plane_with_custom_names(case, tmp_path):
    t1s, truth, pid = case
    rng = np.random.default_rng(0)
    segs, values = [], []
    for label, role in (("MYO", "myocardium"), ("ROI 2", "remote"), ("LV", "blood_pool")):
        masks = [truth[f"s{k}_{role}"] for k in range(len(t1s))]
        segs.append((label, role, masks))
        # inside 0.5..1, outside 0..0.49 near the edge: the 0.5 cut gives the mask back
        values.append([np.where(m, rng.uniform(0.5, 1.0, m.shape), rng.uniform(0.0, 0.49, m.shape) * m.any()) for m in masks])
    path = write_seg(tmp_path / "frac.dcm", t1s, segs, fractional=True, references=False, values=values)
    names = {"myocardium": ["myo"], "remote": ["roi 2"], "blood_pool": ["LV"]}
    for k, t1 in enumerate(t1s):
        got = M.load_masks(path, t1, names=names)
        assert_masks_equal(got, {m: truth[f"s{k}_{m}"] for m in ("myocardium", "remote", "blood_pool")})
        assert got.lesion is None
    with pytest.raises(InputError, match="no segment labelled as remote.*'ROI 2'"):
        M.load_masks(path, t1s[0])  # default names do not know 'ROI 2'
    other = MRImage(**{**t1s[0].__dict__, "meta": {}, "frame_of_reference_uid": "1.2.3.4"})
    with pytest.raises(M.MasksNotFound):
        M.load_masks(path, other, names=names)  # another frame of reference: planes are not comparable


def test_dicom_seg_of_highdicom_and_ours_agree(case, tmp_path):
    """Cross-check with highdicom (when installed): it reads our SEG per source instance, and its
    BINARY and FRACTIONAL SEGs (one per T1 map: its T1 maps must share an orientation) load exactly."""
    hd = pytest.importorskip("highdicom")
    t1s, truth, pid = case
    roles = ("myocardium", "remote", "blood_pool")
    path = write_seg(tmp_path / "ours.dcm", t1s, [(r, r, [truth[f"s{k}_{r}"] for k in range(len(t1s))]) for r in roles])
    ours = hd.seg.segread(str(path))
    sources = []
    for k, t1 in enumerate(t1s):
        arr = ours.get_pixels_by_source_instance(source_sop_instance_uids=[t1.meta["SOPInstanceUID"]], segment_numbers=[1, 2, 3])
        assert all(np.array_equal(arr[0, :, :, n].astype(bool), truth[f"s{k}_{r}"]) for n, r in enumerate(roles))
        ds = pydicom.dcmread(t1.source)
        for kw in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            setattr(ds, kw, getattr(ds, kw, "") or "")
        sources.append(ds)
    descs = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=label, segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept(*CODES[r][:1], "SCT", CODES[r][1]), algorithm_type="MANUAL")
        for n, (label, r) in enumerate(zip(("Myocardium", "Remote", "Blood pool"), roles), start=1)]
    for kind in ("BINARY", "FRACTIONAL"):
        (tmp_path / kind).mkdir()
        for k, ds in enumerate(sources):
            stack = np.stack([truth[f"s{k}_{r}"] for r in roles], -1)[None]
            seg = hd.seg.Segmentation(
                source_images=[ds], pixel_array=stack.astype(np.uint8) if kind == "BINARY" else stack.astype(np.float32) * 0.8,
                segmentation_type=kind, segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=901,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="vne-test", manufacturer_model_name="test",
                software_versions="0", device_serial_number="0")
            seg.save_as(tmp_path / kind / f"seg{k}.dcm")
        store = M.MaskStore(tmp_path / kind)
        for k, t1 in enumerate(t1s):
            assert_masks_equal(store.load(t1), {r: truth[f"s{k}_{r}"] for r in roles})


def test_dicom_seg_with_unaligned_binary_frames_and_files_highdicom_refuses(case, tmp_path):
    """BINARY frames of 331x367 pixels (not a whole number of bytes) load exactly; a SEG that
    highdicom refuses (here: no SegmentLabel, a Type 1 attribute) is a one-line InputError."""
    from vne.exam.geometry import crop_geometry
    t1s, truth, pid = case
    roles = ("myocardium", "remote", "blood_pool")
    rows, cols = slice(0, 331), slice(0, 367)
    small = [MRImage(**{**t1.__dict__, "geometry": crop_geometry(t1.geometry, rows, cols), "pixels": None}) for t1 in t1s]
    path = write_seg(tmp_path / "odd" / "seg.dcm", small, [(r, r, [truth[f"s{k}_{r}"][rows, cols] for k in range(len(t1s))]) for r in roles])
    for k, t1 in enumerate(small):
        assert_masks_equal(M.load_masks(path, t1), {r: truth[f"s{k}_{r}"][rows, cols] for r in roles})
    ds = pydicom.dcmread(path)
    for item in ds.SegmentSequence:
        del item.SegmentLabel
    ds.save_as(tmp_path / "nolabel.dcm")
    with pytest.raises(InputError, match="not a valid DICOM Segmentation.*SegmentLabel") as e:
        M.load_masks(tmp_path / "nolabel.dcm", small[0])
    _one_line(e)


# ----------------------------------------------------------------------------- errors


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_and_mismatched_masks_are_one_line_input_errors(case, tmp_path):
    t1s, truth, pid = case
    t1 = t1s[0]
    uid = t1.meta["SOPInstanceUID"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.MasksNotFound) as e:
        M.load_masks(tmp_path / "empty", t1, slice_index=0, study_keys=[pid])
    assert uid in _one_line(e) and "s0" in _one_line(e)
    with pytest.raises(InputError, match="do not exist"):
        M.MaskStore(tmp_path / "nowhere")

    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / f"{uid}.npz", myocardium=truth["s0_myocardium"], blood_pool=truth["s0_blood_pool"])
    with pytest.raises(InputError, match="no remote mask") as e:
        M.load_masks(bad, t1)
    assert not isinstance(e.value, M.MasksNotFound) and str(bad) in _one_line(e)
    np.savez(bad / f"{uid}.npz", **{m: truth[f"s0_{m}"].T for m in MASKS})
    with pytest.raises(InputError, match=r"transposed\?"):
        M.load_masks(bad, t1)
    np.savez(bad / f"{uid}.npz", **{**{m: truth[f"s0_{m}"] for m in MASKS}, "remote": np.zeros(t1.geometry.shape)})
    with pytest.raises(InputError, match="empty remote mask"):
        M.load_masks(bad, t1)

    two = tmp_path / "two"
    (two / pid).mkdir(parents=True)
    np.savez(two / f"{uid}.npz", **{m: truth[f"s0_{m}"] for m in MASKS})
    np.savez(two / pid / "s0.npz", **{m: truth[f"s0_{m}"] for m in MASKS})
    with pytest.raises(InputError, match="found in 2 places") as e:
        M.load_masks(two, t1, slice_index=0, study_keys=[pid])
    _one_line(e)

    nii = tmp_path / "nii"
    for m in ("myocardium", "remote", "blood_pool"):
        N.write_nifti_mask(nii / f"{uid}_{m}.nii.gz", truth[f"s1_{m}"], t1s[1].geometry)  # the wrong slice
    with pytest.raises(InputError, match="no slice of the mask volume lies in the T1 map plane"):
        M.load_masks(nii, t1)
    (nii / "junk_myocardium.nii").write_bytes(b"\0" * 400)
    with pytest.raises(InputError, match="not a NIfTI file"):
        N.read_nifti(nii / "junk_myocardium.nii")
    raw = bytearray(N.write_nifti(tmp_path / "noorient.nii", np.zeros((4, 4), np.uint8), np.eye(4)).read_bytes())
    raw[252:256] = bytes(4)  # qform_code = sform_code = 0
    (tmp_path / "noorient.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="no orientation"):
        N.read_nifti(tmp_path / "noorient.nii")


def test_lesion_free_csv(tmp_path):
    p = tmp_path / "lesion_free.csv"
    p.write_text("PatientID,lesion_free,comment\nA,yes,x\nB,0,\n\n")
    assert M.read_lesion_free_csv(p) == {"A": True, "B": False}
    p.write_text("patient_id,lesion_free\nA,maybe\n")
    with pytest.raises(InputError, match=":2: lesion_free 'maybe'"):
        M.read_lesion_free_csv(p)


# ----------------------------------------------------------------------------- collect_dicom


def test_collect_dicom_on_simulated_dicom_with_numpy_masks(sim_set, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    import vne_helpers as H
    from vne.evaluation.analysis import evaluate
    from vne.evaluation.collect_dicom import collect_dicom

    doc = json.loads((sim_set / "cases.json").read_text())
    masks = tmp_path / "masks"
    want = {}
    for c in doc["cases"]:
        with np.load(sim_set / "truth" / f"{c['case_id']}.npz") as z:
            for s in c["slices"]:
                k = s["slice_index"]
                if c is doc["cases"][1] and k == 1:
                    continue  # a slice without masks: skipped with a logged reason
                arrays = {m: z[f"s{k}_{m}"].astype(bool) for m in MASKS}
                (masks / c["patient_id"]).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(masks / c["patient_id"] / f"s{k}.npz", **arrays)
                want[(c["case_id"], f"s{k}")] = arrays
    first = doc["cases"][0]
    (masks / "lesion_free.csv").write_text(f"patient_id,lesion_free\n{first['patient_id']},{int(not first['lesion_free'])}\n")
    with caplog.at_level(logging.INFO, logger="vne.evaluation.collect_dicom"):
        res = collect_dicom(sim_set / "dicom", masks, H.tiny_model())
    assert {(r.case_id, r.slice_key) for r in res} == set(want)
    skipped = doc["cases"][1]["case_id"]
    assert any(f"{skipped} s1: skipped: no masks" in r.getMessage() for r in caplog.records)
    by_case = {c["case_id"]: c for c in doc["cases"]}
    for r in res:
        for m in MASKS:
            assert np.array_equal(getattr(r, m), want[(r.case_id, r.slice_key)][m])
        assert r.vne.shape == r.lge.shape == r.t1_map_ms.shape == r.myocardium.shape
        assert np.all(np.isfinite(r.lge)) and r.lge[r.myocardium].std() > 0
        assert r.lge_clean is r.lge and r.lge_myocardium is None and r.artefacts == []
        c = by_case[r.case_id]
        assert r.patient_id == c["patient_id"]
        # the CSV wins for the first patient (here set to the opposite), the lesion masks decide the others
        assert r.lesion_free == ((not c["lesion_free"]) if c is first else c["lesion_free"])
    m = evaluate(res)
    assert m["n_slices"] == len(want) and m["n_patients"] == 3
