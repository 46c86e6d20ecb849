"""The simulator: ISMRMRD output as a scanner delivers it, DICOM, cache, determinism, physics."""
import json

import numpy as np

from vne.io import mrd as mrd_io
from vne.exam.data import Role
from vne.exam.roles import meta_text
from vne.exam.geometry import planes_match
from vne.simulate.case import simulate_case
from vne.prepare.slices import build_slices
from vne.io.training_data import read_index, read_slice


def read_case(path):
    header, images = mrd_io.read_mrd_file(path)
    key = mrd_io.study_key(mrd_io.parse_header(header))
    return header, images, [mrd_io.from_mrd(m, key) for m in images]


def test_layout_and_summary(sim_set):
    cases = json.loads((sim_set / "cases.json").read_text())
    assert cases["seed"] == 1 and len(cases["cases"]) == 3
    for c in cases["cases"]:
        assert (sim_set / "mrd" / f"{c['case_id']}.h5").is_file()
        assert (sim_set / "truth" / f"{c['case_id']}.npz").is_file()
        assert (sim_set / "dicom" / c["case_id"]).is_dir()
        assert 1 <= len(c["slices"]) <= 3
        assert 0.0 <= c["lesion_burden"] < 0.8


def test_ismrmrd_series_and_meta_follow_conventions(sim_set):
    for path in sorted((sim_set / "mrd").glob("*.h5")):
        header, raw, images = read_case(path)
        hdr = mrd_io.parse_header(header)
        study, for_uid, patient = mrd_io.study_key(hdr)
        assert study and for_uid and patient
        assert float(hdr.acquisitionSystemInformation.systemFieldStrength_T) in (1.5, 3.0)
        by_series = {}
        for m, im in zip(raw, images):
            by_series.setdefault(m.image_series_index, set()).add(im.role)
            assert im.role != Role.UNKNOWN, im.meta.get("role_reason")
            meta = mrd_io.meta_dict(m)
            assert "ImageType" in meta
            assert any(k in meta for k in ("SequenceDescription", "GADGETRON_SeqDescription"))
            assert np.asarray(m.data).dtype in (np.uint16, np.float32)
            assert m.image_index >= 1
            # real geometry: unit, orthogonal directions, oblique plane, position at the centre
            r, p, s = (np.asarray(v) for v in (m.read_dir, m.phase_dir, m.slice_dir))
            assert np.allclose([np.linalg.norm(r), np.linalg.norm(p)], 1, atol=1e-5) and abs(r @ p) < 1e-5
            assert np.allclose(np.cross(r, p), s, atol=1e-5)
            assert np.max(np.abs(s)) < 0.999  # oblique short axis
            assert m.field_of_view[0] > 250
            if im.role == Role.CINE:
                assert "TriggerTime" in meta and m.physiology_time_stamp[0] == round(im.trigger_time_ms / 2.5)
            if im.role in (Role.IR_MAGNITUDE, Role.IR_PHASE):
                assert im.inversion_time_ms and im.inversion_time_ms > 50
                if "ImageComments" in meta:
                    assert "TIeff" in meta_text(meta, "comments")
            if im.role == Role.IR_PHASE:
                assert m.image_type == 2 and np.abs(im.pixels).max() <= np.pi + 1e-5
        # one series per scan
        assert all(len(r) == 1 for r in by_series.values()), by_series
        assert set.union(*by_series.values()) == {Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE, Role.T1_MAP, Role.LGE}


def test_scans_have_their_own_grids_and_match_by_plane(sim_set):
    path = sorted((sim_set / "mrd").glob("*.h5"))[0]
    _, _, images = read_case(path)
    t1 = [im for im in images if im.role == Role.T1_MAP]
    cine = [im for im in images if im.role == Role.CINE]
    assert t1[0].geometry.pixel_spacing_mm != cine[0].geometry.pixel_spacing_mm
    assert t1[0].geometry.shape != cine[0].geometry.shape
    slices, reasons = build_slices(images, need_lge=True)
    assert len(slices) == len(t1) and not reasons
    for s in slices:
        assert 25 <= len(s.cine_frames) <= 30
        assert len(s.ir_images) in (7, 8) and len(s.ir_phase) == len(s.ir_images)
        assert planes_match(s.cine_frames[0].geometry, s.t1_map.geometry)[0]


def test_t1_map_values_follow_literature(sim_set):
    """The project's own fit of simulated ShMOLLI/MOLLI reads near literature native T1 values."""
    cases = json.loads((sim_set / "cases.json").read_text())["cases"]
    lesion_rises = []
    for c in cases:
        _, _, images = read_case(sim_set / "mrd" / f"{c['case_id']}.h5")
        truth = np.load(sim_set / "truth" / f"{c['case_id']}.npz")
        t1 = [im for im in images if im.role == Role.T1_MAP]
        for s, im in enumerate(t1):
            remote = truth[f"s{s}_remote"].astype(bool)
            blood = truth[f"s{s}_blood_pool"].astype(bool)
            myo = float(np.median(im.pixels[remote]))
            bl = float(np.median(im.pixels[blood]))
            lo, hi = (880, 1120) if c["field_t"] == 1.5 else (1050, 1350)
            assert lo < myo < hi, (c["case_id"], myo)
            assert bl > myo + 350, (c["case_id"], bl, myo)
            lesion = truth[f"s{s}_lesion"].astype(bool)
            if lesion.sum() > 20:
                lesion_rises.append(float(np.median(im.pixels[lesion])) - myo)
    # Fibrosis raises native T1 by anything from barely visible (+1.5 %) to conspicuous (+40 %)
    # (tissue.sample_tissue): every lesion reads above remote, and typically clearly so.
    assert lesion_rises and min(lesion_rises) > 0, lesion_rises
    assert np.median(lesion_rises) > 40, lesion_rises


def test_lge_nulls_remote_and_brightens_lesions(sim_set):
    cases = json.loads((sim_set / "cases.json").read_text())["cases"]
    enhancement = []  # lesion mean on the remote (0) to blood (1) scale
    for c in cases:
        truth = np.load(sim_set / "truth" / f"{c['case_id']}.npz")
        for s in range(len(c["slices"])):
            clean = truth[f"s{s}_lge_clean"]
            remote = clean[truth[f"s{s}_remote"].astype(bool)].mean()
            blood = clean[truth[f"s{s}_blood_pool"].astype(bool)].mean()
            assert abs(remote) < 0.15 * blood
            lesion = truth[f"s{s}_lesion"].astype(bool)
            if lesion.sum() > 20:
                enhancement.append(float((clean[lesion].mean() - remote) / (blood - remote)))
    # fibrotic ECV is drawn over 0.35-0.65 (tissue.sample_tissue): every lesion enhances, the
    # faint ones by a fifth of the blood pool, most by far more
    assert enhancement and min(enhancement) > 0.15, enhancement
    assert np.median(enhancement) > 0.3, enhancement


def test_training_cache_is_on_the_t1_grid(sim_set):
    doc = read_index(sim_set / "cache")
    assert doc["seed"] == 1 and doc["entries"]
    e = doc["entries"][0]
    x = read_slice(sim_set / "cache", e["slice_id"])
    h, w = x["t1_map_ms"].shape
    assert x["cine"].shape == (25, h, w) and x["ir"].shape == (7, h, w) and x["lge"].shape == (h, w)
    assert x["myocardium"].any() and x["remote"].any() and x["blood_pool"].any()
    # the first IR image (shortest TI) is negative in blood (restored polarity)
    blood = x["blood_pool"].astype(bool)
    assert np.median(x["ir"][0][blood]) < 0 < np.median(x["ir"][-1][blood])
    assert np.all(np.diff(x["ir_ti_ms"]) > 0)


def test_simulator_is_deterministic_per_seed():
    a, b = simulate_case(7, 2), simulate_case(7, 2)
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images):
        assert x.role == y.role and x.geometry == y.geometry
        assert np.array_equal(x.pixels, y.pixels)
    c = simulate_case(8, 2)
    assert c.study_uid != a.study_uid


def test_dicom_output_reads_back(sim_set):
    from vne.io.dicom import read_dicom_folder

    case = sorted((sim_set / "dicom").iterdir())[0]
    exams = read_dicom_folder(case)
    assert len(exams) == 1
    roles = {im.role for im in exams[0].images}
    assert {Role.CINE, Role.IR_MAGNITUDE, Role.IR_PHASE, Role.T1_MAP, Role.LGE} <= roles
    slices, reasons = build_slices(exams[0].images, need_lge=True)
    assert slices and not reasons


def test_existing_output_is_refused(tmp_path, capsys):
    from vne.cli import main

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    assert main(["simulate", "--cases", "1", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "user data"


def test_lge_fat_brightness_is_a_protocol_draw_that_leaves_other_tissues_alone():
    """Fat's LGE brightness is drawn per exam over darker-than-blood to brighter (so no bright
    epicardial rim can be learned from the native images); every other tissue is unchanged."""
    import dataclasses

    from vne.simulate import anatomy, signals, tissue
    from vne.simulate.case import _psir_image

    rng = np.random.default_rng(5)
    tis = tissue.sample_tissue(rng, 1.5, hcm=False)
    heart = anatomy.sample_heart(rng, "normal", "mid", lesion_free=True)
    u, v = np.meshgrid(np.linspace(-70, 70, 141), np.linspace(-70, 70, 141))
    fr, _, _ = anatomy.tissue_fractions(heart, u, v, 0.0, 1.0)
    fat = fr[anatomy.T["fat"]] + fr[anatomy.T["pericardial_fat"]]
    rr = 900.0
    k_myo = anatomy.T["lv_myocardium"]
    ti_null = signals.psir_null_ti_ms(float(tissue.post_contrast_t1_ms(tis, tis.t1_ms[k_myo], tis.ecv[k_myo])), rr)
    lo, hi = tissue.LGE_FAT_SCALE
    dim = _psir_image(dataclasses.replace(tis, lge_fat_scale=lo), heart, u, v, 1.0, ti_null, rr)
    bright = _psir_image(dataclasses.replace(tis, lge_fat_scale=hi), heart, u, v, 1.0, ti_null, rr)
    blood = fr[anatomy.T["lv_blood"]] > 0.99
    pure_fat = fr[anatomy.T["pericardial_fat"]] > 0.99
    assert pure_fat.sum() > 5
    assert np.array_equal(dim[fat == 0], bright[fat == 0])
    assert np.mean(dim[pure_fat]) < 0.5 * np.mean(dim[blood])
    assert np.mean(bright[pure_fat]) > 1.5 * np.mean(bright[blood])
    draws = [tissue.sample_tissue(np.random.default_rng(s), 1.5, hcm=False).lge_fat_scale for s in range(200)]
    assert lo <= min(draws) < 1.5 * lo and 0.8 * hi < max(draws) <= hi


def test_epicardial_fat_is_patchy():
    """The epicardial fat layer is thick in places and absent in others, as on real hearts."""
    from vne.simulate import anatomy

    theta = np.linspace(-np.pi, np.pi, 360)
    gaps = 0
    for s in range(40):
        h = anatomy.sample_heart(np.random.default_rng(s), "normal", "mid", lesion_free=True)
        thick = h.pericardial_fat_thickness_mm(theta)
        assert thick.min() >= 0 and thick.max() <= 2 * h.pericardial_fat_mm + 1e-9
        gaps += bool((thick == 0).any())
    assert 5 <= gaps <= 35
