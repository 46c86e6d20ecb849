"""Bad and incomplete input: a specific logged reason, no VNE for the affected slices, no
exception out of the pipeline, and every original passed on (the same objects, in order).

No peer is mocked. Most cases drive :class:`vne.runtime.pipeline.VNEPipeline` directly (the function
every entry point shares) with a real ONNX model (a tiny random generator) on one simulated
slice, as a scanner sends it; the cases that live in the connection (a stream that drops
mid-study, a 4-byte int32 image from a C++ peer) run the real gadget over a real TCP socket
with the test playing Gadgetron's side (``vne_helpers.run_in_thread``).
"""
from __future__ import annotations

import logging

import ismrmrd
import numpy as np
import pytest

import vne_helpers as H
from vne.prepare.contract import ModelContract
from vne.runtime.model import clear_cache
from vne.runtime.config import PipelineConfig
from vne.runtime.pipeline import VNEPipeline, process_stream
from vne.runtime.stream_intake import t1_units_problem

T1, CINE, IR, PHASE = 4, 1, 2, 3


@pytest.fixture(scope="module")
def header():
    return H.sim_stream()[0]


@pytest.fixture(scope="module")
def slice0():
    """Every image of the first slice, in scanner order (cine, IR, IR phase, T1 map, LGE)."""
    return [im for im in H.sim_stream()[1] if im.slice == 0]


@pytest.fixture(scope="module")
def model():
    return str(H.tiny_model())


def clone(im: ismrmrd.Image, data=None, **header_fields) -> ismrmrd.Image:
    new = ismrmrd.Image.from_bytes(im.to_bytes())
    if data is not None:
        new = ismrmrd.Image(new.getHead(), new.attribute_string, data=np.asarray(data).reshape((1, 1) + np.shape(data)[-2:]))
    for k, v in header_fields.items():
        setattr(new, k, v)
    return new


def replace_where(images, pred, fn):
    return [fn(im) if pred(im) else im for im in images]


def run(items, header, model, **cfg):
    """The stream through the pipeline; checks pass-through and returns (vne images, pipeline)."""
    out, p = process_stream(items, PipelineConfig(model=model, cache_dir=cfg.pop("cache_dir", "none"), **cfg), header=header)
    vne = [o for o in out if isinstance(o, ismrmrd.Image) and o.image_series_index >= 1000]
    passed = [o for o in out if not any(o is v for v in vne)]
    assert len(passed) == len(items) and all(a is b for a, b in zip(passed, items)), "an original was lost or changed"
    return vne, p


def reasons(p) -> str:
    return " | ".join(p.problems)


def test_good_slice_makes_one_vne(slice0, header, model):
    vne, p = run(slice0, header, model)
    assert len(vne) == 1 and p.problems == []


def test_missing_t1_map(slice0, header, model):
    vne, p = run([im for im in slice0 if im.image_series_index != T1], header, model)
    assert vne == [] and "no T1 map in this stream" in reasons(p)


def test_missing_cine(slice0, header, model):
    vne, p = run([im for im in slice0 if im.image_series_index != CINE], header, model)
    assert vne == [] and "no cine slice matches the T1 map plane" in reasons(p)


@pytest.mark.parametrize("factor, expected", [(1e-3, "look like seconds"), (10.0, "ms x10 without an 'x10' declaration")])
def test_t1_map_in_wrong_units(slice0, header, model, factor, expected):
    bad = replace_where(slice0, lambda im: im.image_series_index == T1,
                        lambda im: clone(im, data=np.asarray(im.data, np.float32)[0, 0] * np.float32(factor)))
    vne, p = run(bad, header, model)
    assert vne == [] and expected in reasons(p)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_t1_map_with_nan_or_inf(slice0, header, model, value):
    def poison(im):
        d = np.asarray(im.data, np.float32)[0, 0].copy()
        d[10, 10:20] = value
        return clone(im, data=d)

    vne, p = run(replace_where(slice0, lambda im: im.image_series_index == T1, poison), header, model)
    assert vne == [] and "NaN or inf" in reasons(p)
    # the end summary names the real reason, not "no T1 map in this stream"
    assert "no T1 map in this stream" not in reasons(p)
    assert any(m.startswith("no usable T1 map in this stream: 1 refused") and "NaN or inf" in m for m in p.problems)


def test_complex_cine_frame_is_skipped_and_complex_t1_map_blocks_its_slice(slice0, header, model):
    first_cine = next(im for im in slice0 if im.image_series_index == CINE)
    bad = replace_where(slice0, lambda im: im is first_cine, lambda im: clone(im, data=np.asarray(im.data)[0, 0].astype(np.complex64)))
    vne, p = run(bad, header, model)
    assert len(vne) == 1 and "complex image data" in reasons(p)  # 26 frames are enough
    bad = replace_where(slice0, lambda im: im.image_series_index == T1, lambda im: clone(im, data=np.asarray(im.data)[0, 0].astype(np.complex64)))
    vne, p = run(bad, header, model)
    assert vne == [] and "complex image data" in reasons(p) and "no T1 map" in reasons(p)


def test_int64_images_are_not_used(slice0, header, model):
    """ismrmrd for Python writes DATATYPE_INT as int64 (C++ readers cannot read it)."""
    bad = replace_where(slice0, lambda im: im.image_series_index == CINE, lambda im: clone(im, data=np.asarray(im.data)[0, 0].astype(np.int64)))
    vne, p = run(bad, header, model)
    assert vne == [] and "int64 pixel data" in reasons(p) and "no cine slice matches" in reasons(p)


def test_int32_image_from_a_cpp_peer_passes_byte_for_byte(slice0, header, model):
    """A C++ peer sends DATATYPE_INT as 4-byte int32; the gadget (real socket, real
    gadgetron.external.Connection) passes it on unchanged and does not use it."""
    ir = next(im for im in slice0 if im.image_series_index == IR)
    raw_head = ir.getHead()
    raw_head.data_type = ismrmrd.DATATYPE_INT
    raw_head.image_index = 999
    attr = ir.attribute_string.encode()
    raw_head.attribute_string_len = len(attr)
    data = np.asarray(ir.data, np.int32).tobytes()
    raw = bytes(raw_head) + np.uint64(len(attr)).tobytes() + attr + data
    items = slice0[:30] + [raw] + slice0[30:]
    got, p = H.run_in_thread(header, items, H.config_xml(model=model, cache_dir="none"), int32_safe=True)
    from vne.io.framing import RawImage

    raws = [g for g in got if isinstance(g, RawImage)]
    assert len(raws) == 1 and raws[0].payload == raw
    others = [g for g in got if isinstance(g, ismrmrd.Image) and g.image_series_index < 1000]
    assert H.serialized(others) == H.serialized(slice0)
    assert sum(isinstance(g, ismrmrd.Image) and g.image_series_index >= 1000 for g in got) == 1
    assert "int32 (ISMRMRD DATATYPE_INT) pixel data" in reasons(p)


@pytest.mark.parametrize("series, field, expected", [
    (T1, "read_dir", "zero-length read or phase direction"),
    (CINE, "phase_dir", "zero-length read or phase direction"),
])
def test_zero_direction_vectors(slice0, header, model, series, field, expected):
    bad = replace_where(slice0, lambda im: im.image_series_index == series, lambda im: clone(im, **{field: (0.0, 0.0, 0.0)}))
    vne, p = run(bad, header, model)
    assert vne == [] and expected in reasons(p)
    if series == CINE:
        assert "no cine slice matches" in reasons(p)


def test_mismatched_shapes_within_a_slice(slice0, header, model):
    third_ir = [im for im in slice0 if im.image_series_index == IR][2]
    bad = replace_where(slice0, lambda im: im is third_ir, lambda im: clone(im, data=np.asarray(im.data)[0, 0, :-20, :-30]))
    vne, p = run(bad, header, model)
    assert vne == [] and "mixed shapes" in reasons(p)


def test_duplicate_images(slice0, header, model):
    doubled = [im for im in slice0 for _ in range(2)]
    vne, p = run(doubled, header, model)
    assert len(vne) == 1 and "duplicate of an earlier image" in reasons(p)


def test_out_of_order_stream(slice0, header, model):
    """T1 map first, cine last: nothing is complete when the map arrives; VNE at the end."""
    vne, p = run(list(reversed(slice0)), header, model)
    assert len(vne) == 1 and p.results[0].image_index == 1


def test_stream_that_drops_mid_study(header, model):
    """The peer goes away (no CLOSE) after the first slice's T1 map: the real gadget over a
    real socket returns every image it got and the VNE of the complete slice, then CLOSE."""
    two = [im for im in H.sim_stream()[1] if im.slice in (0, 1)]
    cut = next(k for k, im in enumerate(two) if im.image_series_index == T1 and im.slice == 0) + 1
    sent = two[:cut]
    got, p = H.run_in_thread(header, sent, H.config_xml(model=model, cache_dir="none"), close=False, timeout=60)
    passed = [g for g in got if g.image_series_index < 1000]
    assert H.serialized(passed) == H.serialized(sent)
    assert [g.slice for g in got if g.image_series_index >= 1000] == [0]
    assert "stream ended without CLOSE" in reasons(p)


def test_stream_ending_before_its_t1_maps(header, model):
    """A stream that ends (with CLOSE) mid-study, before any T1 map: no VNE, a reason."""
    part = [im for im in H.sim_stream()[1] if im.image_series_index in (CINE, IR)]
    vne, p = run(part, header, model)
    assert vne == [] and "no T1 map in this stream" in reasons(p)


def _model_cases(tmp_path):
    good = H.tiny_model()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07" + np.random.default_rng(0).bytes(5000))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:4000])
    no_contract = H.copy_model(tmp_path / "no-contract.onnx")
    H.set_contract(no_contract, None)
    bad_json = H.copy_model(tmp_path / "bad-json.onnx")
    H.set_contract(bad_json, "{not json")
    wrong_graph = H.copy_model(tmp_path / "wrong-graph.onnx")
    H.set_contract(wrong_graph, ModelContract(n_cine_frames=20, pad_multiple=8).to_json())
    return {
        "missing": (tmp_path / "nope.onnx", "does not exist"),
        "corrupt": (corrupt, "is not a loadable ONNX model"),
        "truncated": (truncated, "is not a loadable ONNX model"),
        "no contract": (no_contract, "has no 'vne_contract' metadata"),
        "invalid contract": (bad_json, "is not valid JSON"),
        "graph does not match contract": (wrong_graph, "input 'cine' has 25 channels, the contract says 20"),
    }


def test_unusable_model_is_reported_once_and_everything_passes(slice0, header, tmp_path, caplog):
    clear_cache()
    for name, (path, expected) in _model_cases(tmp_path).items():
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="vne.runtime.pipeline"):
            vne, p = run(slice0, header, str(path))
        assert vne == [], name
        assert p.disabled_reason and expected in p.disabled_reason, (name, p.disabled_reason)
        assert sum("VNE disabled" in r.getMessage() for r in caplog.records) == 1, name


def test_model_contract_that_does_not_match_the_data(slice0, header):
    """A model that needs 8 IR images (MOLLI 5(3)3) on a ShMOLLI slice with 7."""
    vne, p = run(slice0, header, str(H.tiny_model(n_ir_images=8)))
    assert vne == [] and "7 IR images, the model (vne-sim-test) needs 8" in reasons(p)


def test_bad_property_values_disable_vne_but_not_pass_through(slice0, header, model):
    from vne.errors import InputError

    with pytest.raises(InputError, match="pixel_type"):
        PipelineConfig.from_properties({"pixel_type": "int8"})
    with pytest.raises(InputError, match="role_cine_pattern"):
        PipelineConfig.from_properties({"role_cine_pattern": "(unclosed"})
    got, p = H.run_in_thread(header, slice0, H.config_xml(model=model, pixel_type="int8"))
    assert H.serialized([g for g in got if g.image_series_index < 1000]) == H.serialized(slice0)
    assert p.results == [] and p.disabled_reason


def test_internal_error_never_escapes(slice0, header, model, monkeypatch):
    """Even a bug inside the VNE step leaves the stream intact."""
    p = VNEPipeline(PipelineConfig(model=model, cache_dir="none"), header=header)
    monkeypatch.setattr(p, "_run_pending", lambda final: 1 / 0)
    out = [o for im in slice0 for o in p.feed_iter(im)] + p.finish()
    assert len(out) == len(slice0) and all(a is b for a, b in zip(out, slice0))
    assert any("internal error" in m for m in p.problems)


def test_t1_units_check():
    rng = np.random.default_rng(0)
    t1 = np.where(rng.random((64, 64)) > 0.4, rng.normal(1100, 200, (64, 64)), 0.0)
    assert t1_units_problem(t1, (100.0, 4000.0)) is None
    assert "seconds" in t1_units_problem(t1 / 1000, (100.0, 4000.0))
    assert "x10" in t1_units_problem(t1 * 10, (100.0, 4000.0))
    assert "empty" in t1_units_problem(np.zeros((64, 64)), (100.0, 4000.0))
