"""Plane maths and resampling in patient coordinates."""
import numpy as np
import pytest

from vne.errors import InputError
from vne.exam.data import Geometry
from vne.exam.geometry import (centre_from_first_pixel, crop_geometry, first_pixel_from_centre, pixel_centres_mm,
                          planes_match, resample_cycle, resample_to_grid)


def oblique(shape=(40, 60), spacing=(1.5, 1.5), position=(10.0, -20.0, 5.0), angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    read = np.array([c, s, 0.2]); read /= np.linalg.norm(read)
    phase = np.cross([0.1, -0.3, 1.0], read); phase /= np.linalg.norm(phase)
    return Geometry(position, tuple(read), tuple(phase), spacing, shape)


def test_pixel_centres_are_centred_on_position():
    g = oblique()
    pts = pixel_centres_mm(g)
    assert np.allclose(pts.reshape(-1, 3).mean(0), g.position_mm)
    step_j = pts[0, 1] - pts[0, 0]
    assert np.allclose(np.linalg.norm(step_j), 1.5) and np.allclose(step_j / 1.5, g.read_dir)


def test_first_pixel_round_trip():
    g = oblique()
    corner = first_pixel_from_centre(g)
    assert np.allclose(corner, pixel_centres_mm(g)[0, 0])
    assert np.allclose(centre_from_first_pixel(corner, g.read_dir, g.phase_dir, g.pixel_spacing_mm, g.shape), g.position_mm)


def test_matching_rule_thresholds():
    g = oblique()
    shifted = Geometry(tuple(np.asarray(g.position_mm) + 3.9 * g.slice_dir), g.read_dir, g.phase_dir, g.pixel_spacing_mm, g.shape)
    assert planes_match(shifted, g)[0]
    far = Geometry(tuple(np.asarray(g.position_mm) + 4.1 * g.slice_dir), g.read_dir, g.phase_dir, g.pixel_spacing_mm, g.shape)
    ok, why = planes_match(far, g)
    assert not ok and "mm apart" in why
    # rotate the plane by 30 degrees about the read axis: |cos| = 0.866 < 0.9
    p = np.asarray(g.phase_dir); n = g.slice_dir
    p2 = np.cos(np.pi / 6) * p + np.sin(np.pi / 6) * n
    tilted = Geometry(g.position_mm, g.read_dir, tuple(p2), g.pixel_spacing_mm, g.shape)
    ok, why = planes_match(tilted, g)
    assert not ok and "orientation" in why


def test_resample_linear_field_exactly_between_grids():
    """A field linear in patient coordinates survives resampling between different grids."""
    src = oblique(shape=(80, 100), spacing=(1.8, 1.8), angle=0.2)
    dst = oblique(shape=(120, 140), spacing=(0.94, 0.94), angle=1.1)
    dst = Geometry(tuple(np.asarray(dst.position_mm)), dst.read_dir, dst.phase_dir, dst.pixel_spacing_mm, dst.shape)
    # make dst coplanar with src (same normal, same plane)
    n = src.slice_dir
    r = np.asarray(dst.read_dir) - (np.asarray(dst.read_dir) @ n) * n; r /= np.linalg.norm(r)
    p = np.cross(n, r)
    dst = Geometry(src.position_mm, tuple(r), tuple(p), (0.94, 0.94), (60, 70))
    a = np.array([0.3, -0.2, 0.1])
    field = lambda pts: pts @ a + 7.0
    img = field(pixel_centres_mm(src)).astype(np.float32)
    out, inside = resample_to_grid(img, src, dst)
    assert inside.all()
    assert np.allclose(out, field(pixel_centres_mm(dst)), atol=1e-3)


def test_resample_marks_outside():
    src = oblique(shape=(20, 20))
    dst = Geometry(src.position_mm, src.read_dir, src.phase_dir, (1.5, 1.5), (60, 60))
    out, inside = resample_to_grid(np.ones((20, 20), np.float32), src, dst)
    assert 0 < inside.mean() < 0.2 and np.all(out[~inside] == 0)


def test_degenerate_direction_is_input_error():
    g = oblique()
    bad = Geometry(g.position_mm, (0.0, 0.0, 0.0), g.phase_dir, g.pixel_spacing_mm, g.shape)
    with pytest.raises(InputError, match="zero-length"):
        resample_to_grid(np.zeros(g.shape), bad, g)


def test_crop_geometry_matches_pixels():
    g = oblique(shape=(40, 60))
    c = crop_geometry(g, slice(5, 25), slice(10, 50))
    assert np.allclose(pixel_centres_mm(c), pixel_centres_mm(g)[5:25, 10:50])


def test_resample_cycle_is_cyclic_and_exact_on_grid():
    frames = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    t = np.arange(10) * 100.0
    out = resample_cycle(frames, t, 1000.0, 20)
    assert out.shape == (20, 2, 2)
    assert np.allclose(out[::2, 0, 0], np.arange(10))
    assert np.isclose(out[19, 0, 0], 4.5)  # halfway from the last frame back to the first
