"""Training stack: dataset and splits, networks, a smoke training with resume, ONNX export.

The cache is built here from structured synthetic slices (piecewise-constant anatomy, so
augmentation consistency can be checked exactly); the ``cache`` fixture can be swapped for
simulator output (``vne simulate``) when that is fast enough for the suite. ~35 s on 2 cores,
most of it the dynamo ONNX export.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from vne.prepare.contract import CONTRACT_KEY, ModelContract  # noqa: E402
from vne.io.training_data import MASK_KEYS, read_index, write_index, write_slice  # noqa: E402

from training.checkpoint import load_checkpoint  # noqa: E402
from vne.errors import InputError  # noqa: E402
from training.dataset import VNEDataset, normalise_target, split_entries, split_patients  # noqa: E402
from training.networks import VNEGenerator, count_macs, count_params, robust_scale  # noqa: E402

WINDOW = 48
N_PATIENTS = 6
TI_MS = np.array([100, 180, 260, 1100, 2100, 3100, 4100], np.float32)
BLOOD_LGE, REMOTE_LGE = 300.0, 20.0  # PSIR scanner units of the synthetic LGE


def _slice_arrays(rng: np.random.Generator, with_lesion: bool) -> dict[str, np.ndarray]:
    """One synthetic heart-centred window: blood disk, myocardial ring, optional lesion wedge."""
    yy, xx = np.mgrid[0:WINDOW, 0:WINDOW].astype(np.float32)
    cy, cx = WINDOW / 2 + rng.uniform(-3, 3, 2)
    r = np.hypot(yy - cy, xx - cx)
    blood = r < 8
    myo = (r >= 8) & (r < 13)
    lesion = myo & (xx > cx + 4) if with_lesion else np.zeros_like(myo)
    remote = myo & ~lesion
    t1 = np.where(blood, 1600.0, np.where(myo, 1000.0, 700.0)) + 100.0 * lesion
    cine = np.stack([np.where(blood, 900.0, np.where(myo, 400.0, 250.0)) * (1 + 0.02 * k) for k in range(25)])
    ir = np.stack([150.0 * (1 - 1.9 * np.exp(-0.9 * t / t1)) for t in TI_MS])
    lge = np.where(blood, BLOOD_LGE, np.where(remote, REMOTE_LGE, -50.0)) + np.where(lesion, 250.0, 0.0)
    return {
        "cine": cine, "ir": ir, "ir_ti_ms": TI_MS, "t1_map_ms": t1, "lge": lge, "lge_clean": lge,
        "myocardium": myo, "blood_pool": blood, "remote": remote, "lesion": lesion,
        "pixel_spacing_mm": np.array([0.94, 0.94], np.float32),
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """6 patients × 2 slices; patient p5 has no masks (the real-DICOM case)."""
    d = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    entries = []
    for p in range(N_PATIENTS):
        for s in range(2):
            sid = f"p{p}_s{s}"
            arrays = _slice_arrays(rng, with_lesion=s == 1)
            has_masks = p != N_PATIENTS - 1
            if not has_masks:
                for k in MASK_KEYS:
                    arrays[k] = np.zeros_like(arrays[k])
            write_slice(d, sid, arrays)
            entries.append({"slice_id": sid, "patient_id": f"p{p}", "case_id": f"p{p}", "slice_index": s,
                            "lesion_burden": 0.3 * s, "lesion_free": s == 0, "has_masks": has_masks,
                            "field_strength_t": 1.5, "source": "test-synthetic"})
    write_index(d, entries, {"generator": "tests/test_training.py"})
    return d


def _config(cache: Path, out: Path, **schedule) -> dict:
    return {
        "name": "test", "model_name": "vne-test", "model_version": "0.0.1", "seed": 0, "threads": 1,
        "cache": str(cache), "out": str(out), "progress": False,
        "model": {"base_channels": 4, "fusion_channels": 8, "head_channels": 4, "film_hidden": 8},
        "discriminator": {"base_channels": 8, "n_layers": 2, "num_scales": 1},
        "data": {"crop": 32, "batch_size": 2, "split": [0.5, 0.25, 0.25], "val_max_slices": 2, "val_batch_size": 2,
                 "num_workers": 0},
        "loss": {"w_ssim": 1.0, "gan_start_step": 0},
        "schedule": {"max_steps": 4, "log_every": 1, "val_every": 2, "ckpt_every": 2, "panels": 1, **schedule},
    }


# ---------------------------------------------------------------------------------------------
def test_patient_split_is_disjoint_and_deterministic(cache):
    entries = read_index(cache)["entries"]
    ids = [e["patient_id"] for e in entries]
    a = split_patients(ids, (0.6, 0.2, 0.2), seed=3)
    b = split_patients(list(reversed(ids)), (0.6, 0.2, 0.2), seed=3)
    assert a == b
    sets = [set(a[s]) for s in ("train", "val", "test")]
    assert sets[0] | sets[1] | sets[2] == set(ids)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(sets)  # every split non-empty with 6 patients
    by_split = split_entries(entries, (0.6, 0.2, 0.2), seed=3)
    owners = {}
    for split, es in by_split.items():
        for e in es:
            assert owners.setdefault(e["patient_id"], split) == split
    big = split_patients([f"id{i}" for i in range(1000)], (0.8, 0.1, 0.1), seed=0)
    assert [len(big[s]) for s in ("train", "val", "test")] == [800, 100, 100]


def test_target_normalisation():
    rng = np.random.default_rng(1)
    a = _slice_arrays(rng, with_lesion=True)
    norm, how = normalise_target(a["lge"], a["remote"], a["blood_pool"])
    assert how == "masks"
    assert norm[a["remote"]].mean() == pytest.approx(0.0, abs=1e-6)
    assert norm[a["blood_pool"]].mean() == pytest.approx(1.0, abs=1e-6)
    _, how = normalise_target(a["lge"], None, None)
    assert how == "percentiles"
    flat = np.full_like(a["lge"], 5.0) + a["blood_pool"]  # blood − remote contrast ≈ spread·0: falls back
    _, how = normalise_target(flat, a["remote"], a["blood_pool"], min_contrast=2.0)
    assert how == "percentiles"


def test_dataset_augmentation_is_consistent(cache):
    entries = [e for e in read_index(cache)["entries"] if e["has_masks"]]
    ds = VNEDataset(cache, entries, crop=32, augment=True, seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["cine"].shape == (25, 32, 32) and item["ir"].shape == (7, 32, 32)
            assert item["t1_map_ms"].shape == item["lge"].shape == (1, 32, 32) and item["masks"].shape == (4, 32, 32)
            blood, remote = item["masks"][1] > 0, item["masks"][2] > 0
            if blood.any():  # every array was flipped/rotated/cropped the same way
                assert item["lge"][0][blood].mean().item() == pytest.approx(1.0, abs=1e-5)
                assert torch.all(item["t1_map_ms"][0][blood] == 1600.0)
                assert torch.all(item["cine"][0][blood] == 900.0)
            if remote.any():
                assert item["lge"][0][remote].mean().item() == pytest.approx(0.0, abs=1e-5)
    ds.set_epoch(1)
    again = VNEDataset(cache, entries, crop=32, augment=True, seed=0)
    again.set_epoch(1)
    assert torch.equal(ds[0]["cine"], again[0]["cine"])  # same (seed, epoch, index) → same sample
    full = VNEDataset(cache, entries, crop=None, augment=False)[0]
    assert full["t1_map_ms"].shape == (1, WINDOW, WINDOW)


def test_generator_shapes_and_input_normalisation():
    torch.manual_seed(0)
    g = VNEGenerator({"base_channels": 4, "fusion_channels": 8, "head_channels": 4}).eval()
    assert g.pad_multiple == 16
    rng = np.random.default_rng(0)
    x = [torch.from_numpy(v) for v in (
        rng.uniform(0, 500, (2, 25, 32, 48)).astype(np.float32), rng.normal(0, 100, (2, 7, 32, 48)).astype(np.float32),
        np.tile(TI_MS, (2, 1)), rng.uniform(600, 1800, (2, 1, 32, 48)).astype(np.float32))]
    with torch.no_grad():
        y = g(*x)
        y_scaled = g(x[0] * 7.0, x[1] * 0.1, x[2], x[3])  # raw scanner units differ by site
    assert y.shape == (2, 1, 32, 48) and y.dtype == torch.float32
    assert torch.allclose(y, y_scaled, atol=1e-4)
    padded = torch.nn.functional.pad(x[0], (0, 16, 0, 16))  # zero padding leaves the scale alone
    assert torch.allclose(robust_scale(padded), robust_scale(x[0]), rtol=1e-5)
    assert count_params(g) > 0 and count_macs(g, *x) > 0


def test_batch_norm_generator_does_not_depend_on_the_field_of_view():
    """Trained on heart crops, run on the whole T1 grid: the output near the heart must not change
    when air is added around it. Instance norm (the 0.1.0 default) fails this: its statistics
    are taken over the whole image, and on the held-out exams the full-field VNE differed from the
    heart-window VNE by 0.29 (blood = 1) inside the myocardium. Batch norm at inference uses
    fixed statistics. The inputs have one magnitude c wherever they are non-zero, so the
    per-image intensity scale (:func:`robust_scale`) is c for the crop and the full field alike.
    """
    rng = np.random.default_rng(1)
    crop, full = 160, 320
    c = 250.0
    cine = np.zeros((1, 25, full, full), np.float32)
    ir = np.zeros((1, 7, full, full), np.float32)
    t1 = np.zeros((1, 1, full, full), np.float32)  # air: T1 fit fails -> 0 ms
    inner = (slice(None), slice(None), slice(80, 80 + crop), slice(80, 80 + crop))
    cine[inner] = c * (rng.random((1, 25, crop, crop)) > 0.3)
    ir[inner] = c * rng.choice([-1.0, 1.0, 0.0], (1, 7, crop, crop))
    t1[inner] = rng.uniform(900, 1800, (1, 1, crop, crop))
    ti = torch.from_numpy(TI_MS[None])
    centre = (slice(None), slice(None), slice(64, 96), slice(64, 96))  # 64 px from the crop edges

    def gap(norm: str) -> float:
        torch.manual_seed(0)
        g = VNEGenerator({"base_channels": 4, "fusion_channels": 8, "head_channels": 4, "norm": norm})
        if norm == "batch":  # non-trivial running statistics, as after training
            for m in g.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        g.eval()
        with torch.no_grad():
            y_full = g(*(torch.from_numpy(v) for v in (cine, ir)), ti, torch.from_numpy(t1))[inner]
            y_crop = g(*(torch.from_numpy(v[inner].copy()) for v in (cine, ir)), ti, torch.from_numpy(t1[inner].copy()))
        return float((y_full[centre] - y_crop[centre]).abs().max())

    assert gap("batch") < 1e-4
    assert gap("instance") > 1e-2


def test_train_resume_and_time_budget(cache, tmp_path):
    from training.train import train

    # one uninterrupted run ...
    ref = train(_config(cache, tmp_path / "ref"))
    assert ref["status"] == "done" and ref["step"] == 4
    # ... and the same run cut by a time budget after one step, then resumed
    out = tmp_path / "run"
    first = train(_config(cache, out, max_minutes=0.0))
    assert first["status"] == "time_budget" and first["step"] == 1
    with pytest.raises(Exception, match="--resume"):
        train(_config(cache, out))
    second = train(_config(cache, out), resume=True)
    assert second["status"] == "done" and second["step"] == 4
    with (out / "train_log.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4]
    for name in ("latest.pt", "best.pt", "loss_curves.png", "summary.json", "split.json", "val_log.csv"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "panels").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    # resuming restored weights, optimisers, schedulers and data order: same weights as uninterrupted
    a = load_checkpoint(tmp_path / "ref" / "latest.pt")["generator"]
    b = load_checkpoint(out / "latest.pt")["generator"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])


def test_export_parity_and_contract(cache, tmp_path):
    from training.export import export
    from training.train import train

    train(_config(cache, tmp_path / "run", max_steps=2))
    onnx_path = tmp_path / "models" / "vne-test.onnx"
    diff = export(tmp_path / "run" / "latest.pt", onnx_path)
    assert diff < 1e-3
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    contract = ModelContract.from_json(meta[CONTRACT_KEY])
    assert (contract.model_name, contract.model_version) == ("vne-test", "0.0.1")
    assert (contract.n_cine_frames, contract.n_ir_images, contract.pad_multiple) == (25, 7, 16)
    assert contract.training_data["data"]["n_patients"]["train"] >= 1
    assert json.loads(meta["vne_producer"])["exporter"] == "dynamo"
    assert [i.name for i in sess.get_inputs()] == ["cine", "ir", "ir_ti_ms", "t1_map_ms"]
    assert [o.name for o in sess.get_outputs()] == ["vne"]
    # dynamic batch and H, W
    from training.export import example_inputs

    out = sess.run(None, example_inputs(batch=3, h=48, w=80, seed=5))[0]
    assert out.shape == (3, 1, 48, 80)


def test_train_command_without_torch(monkeypatch, capsys):
    import argparse

    from vne.commands import train as train_cmd

    monkeypatch.setitem(sys.modules, "torch", None)
    rc = train_cmd.run(argparse.Namespace(config="smoke", resume=False, cache=None, out=None, max_minutes=None, set=[]))
    assert rc == 2
    assert capsys.readouterr().err.strip() == "vne train needs the training extras: pip install -e .[train]"


def test_vgg_perceptual_loads_a_torchvision_state_dict(tmp_path):
    from training.losses import VGG16_CFG, GeneratorObjective

    layers, c = [], 3  # torchvision.models.vgg16().features, built here (torchvision is not installed)
    for v in VGG16_CFG:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(2))
        else:
            layers += [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU()]
            c = v
    state = {f"features.{k}": t for k, t in torch.nn.Sequential(*layers).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, tmp_path / "vgg16.pt")
    objective = GeneratorObjective({"perceptual": "vgg", "vgg_weights": str(tmp_path / "vgg16.pt")})
    assert torch.equal(objective.vgg.features[0].weight, state["features.0.weight"])
    fake = torch.rand(2, 1, 32, 32, requires_grad=True)
    total, parts = objective(fake, torch.rand(2, 1, 32, 32), None, None, None)
    total.backward()
    assert parts["g_perc"] > 0 and fake.grad is not None
    with pytest.raises(ValueError, match="vgg_weights"):
        GeneratorObjective({"perceptual": "vgg"})


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
    return out


def test_packaged_configs_agree_with_the_one_set_of_defaults():
    """training.config.TrainConfig is the one source of defaults: configs/default.json restates
    nothing differently, and no packaged config has a key the defaults lack (a typo)."""
    from training import CONFIG_DIR
    from training.config import TrainConfig, load_config, unknown_keys

    default = json.loads((CONFIG_DIR / "default.json").read_text())
    defaults = _leaves(TrainConfig().to_dict())
    assert {k: v for k, v in _leaves(default).items() if defaults.get(k) != v} == {}
    assert load_config("default") == TrainConfig()
    for path in CONFIG_DIR.glob("*.json"):
        assert unknown_keys(json.loads(path.read_text())) == [], path.name


def test_unknown_config_keys_are_refused(tmp_path):
    from training.config import TrainConfig, load_config

    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps({"schedule": {"val_evry": 5}, "loss": {"w_l1": 1.0}}))
    with pytest.raises(InputError, match="schedule.val_evry"):
        load_config(bad)
    # every section is checked, the model's, the discriminator's and the augmentation's too
    for key in ("bogus", "model.base_chanels", "discriminator.layers", "augment.rotation", "data.crop.x"):
        *parents, leaf = key.split(".")
        d: dict = {leaf: 1}
        for part in reversed(parents):
            d = {part: d}
        if key == "data.crop.x":
            with pytest.raises(InputError, match="data.crop must be an integer"):
                TrainConfig.from_dict(d)
            continue
        with pytest.raises(InputError, match=f"unknown key {key}$"):
            TrainConfig.from_dict(d)


@pytest.mark.parametrize("override,words", [
    ({"schedule": {"max_steps": "abc"}}, "schedule.max_steps must be an integer, got 'abc'"),
    ({"schedule": {"max_steps": 1.5}}, "schedule.max_steps must be an integer"),
    ({"amp": 1}, "amp must be true or false"),
    ({"loss": {"w_l1": "ten"}}, "loss.w_l1 must be a number"),
    ({"loss": {"perceptual": "lpips"}}, "loss.perceptual must be one of fm, vgg, none"),
    ({"data": {"target": "lge_truth"}}, "data.target must be one of"),
    ({"schedule": {"best_metric": "g_l1"}}, "schedule.best_metric must be one of"),
    ({"optim": {"betas": [0.5]}}, "optim.betas must hold 2 numbers"),
    ({"data": 5}, "data must be a section"),
    ({"model": {"ablate": ["t1"]}}, "model: unknown streams to ablate"),
    ({"schedule": {"val_every": 0}}, "schedule.val_every must be at least 1"),
])
def test_config_values_are_type_checked(override, words):
    from training.config import TrainConfig

    with pytest.raises(InputError) as info:
        TrainConfig.from_dict(override)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_config_round_trips_through_the_checkpoint_dict(tmp_path):
    from training.config import TrainConfig

    cfg = TrainConfig.from_dict({"name": "x", "cache": tmp_path, "model": {"base_channels": 4, "ablate": ["ir"]},
                                 "schedule": {"max_steps": 2e4}, "loss": {"w_l1": 20}})
    assert cfg.cache == str(tmp_path) and cfg.schedule.max_steps == 20000 and isinstance(cfg.loss.w_l1, float)
    assert cfg.model.ablate == ("ir",)
    plain = cfg.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # builtins only
    assert TrainConfig.from_dict(plain) == cfg
    torch.save({"config": plain}, tmp_path / "c.pt")
    assert TrainConfig.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["config"]) == cfg
    # a checkpoint of the nested-dict era: partial sections, the rest today's defaults
    old = {"name": "smoke", "model": {"base_channels": 8, "fusion_channels": 16}, "discriminator": {"num_scales": 1},
           "augment": {}, "data": {"percentiles": [50, 90]}, "schedule": {"max_steps": 20}}
    back = TrainConfig.from_dict(old)
    assert (back.model.base_channels, back.model.depth, back.discriminator.num_scales, back.discriminator.n_layers) == (8, 3, 1, 3)
    assert back.data.percentiles == [50.0, 90.0] and back.augment == TrainConfig().augment
    assert cfg.with_overrides({"schedule": {"max_minutes": 5}}).schedule.max_minutes == 5.0
    # the discriminator sees the generator's IR images unless told otherwise
    assert TrainConfig.from_dict({"model": {"n_ir_images": 5}}).discriminator.build(5).n_ir_images == 5


def test_trainer_steps_saves_and_loads(cache, tmp_path):
    from training.config import TrainConfig
    from training.trainer import VNETrainer

    cfg = TrainConfig.from_dict(_config(cache, tmp_path))
    torch.manual_seed(0)
    trainer = VNETrainer(cfg)
    ds = VNEDataset(cache, read_index(cache)["entries"][:2], crop=32, augment=True, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    trainer.train()
    trainer.set_input(batch)
    trainer.optimize_parameters()
    losses = trainer.current_losses()
    assert trainer.step == 1 and losses["d_loss"] is not None and {"g_total", "g_l1", "g_adv", "g_perc"} <= set(losses)
    trainer.save(tmp_path / "t.pt")
    other = VNETrainer(cfg)
    other.load(tmp_path / "t.pt")
    assert other.step == 1
    for k, v in trainer.g_core.state_dict().items():
        assert torch.equal(v, other.g_core.state_dict()[k]), k
    assert TrainConfig.from_dict(load_checkpoint(tmp_path / "t.pt")["config"]) == cfg
