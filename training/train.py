"""The training loop: ``train(config, resume)``.

One run directory (``config["out"]``) holds everything a run produces::

    config.json          the merged config this run started with
    split.json           patient ids of train / val / test
    train_log.csv        step, losses, learning rates, seconds per step (every log_every steps)
    val_log.csv          validation metrics (every val_every steps)
    loss_curves.png      both logs plotted
    panels/step_NNNNNNN.png  validation panels: T1 | VNE | LGE
    latest.pt, best.pt   checkpoints (best by ``schedule.best_metric``, lower is better)
    summary.json         status, step, best, data summary

Training runs for ``schedule.max_steps`` generator steps. ``schedule.max_minutes`` stops it
earlier with a checkpoint, and ``resume=True`` continues from ``latest.pt`` (weights,
optimisers, schedulers, step, RNG), so a long CPU training can be split across sessions by
rerunning the same command. The data order is a function of (seed, epoch) and the step, so a
resumed run sees the same batches as an uninterrupted one.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel and a
DistributedSampler; rank 0 validates, logs and checkpoints. On CUDA it uses mixed precision
(bfloat16 where supported, else float16 with a gradient scaler).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from vne import __version__ as vne_version
from vne.errors import InputError
from vne.io.atomic import atomic_path
from vne.io.training_data import read_index

from . import CONFIG_DIR
from .augment import augment_batch
from .checkpoint import load_checkpoint
from .dataset import VNEDataset, data_summary, split_entries, usable_entries
from .losses import GeneratorObjective, d_loss, heart_weight_map, ssim, weighted_l1
from .networks import (
    DiscriminatorConfig,
    GeneratorConfig,
    VNEDiscriminator,
    VNEGenerator,
    count_params,
)

log = logging.getLogger("vne.train")

DEFAULT_CONFIG: dict = {
    "name": "default",
    "model_name": "vne",
    "model_version": "0.1.0",
    "seed": 0,
    "cache": "data-cache/sim",
    "out": "runs/default",
    "device": "auto",            # auto | cpu | cuda
    "threads": None,             # torch CPU threads; None: cores / local processes
    "amp": True,                 # mixed precision on CUDA
    "progress": True,            # tqdm bar on rank 0
    "init_from": None,           # checkpoint whose weights start a new run (fine-tuning)
    "model": {},                 # training.networks.GeneratorConfig fields (its defaults: the shipped architecture)
    "discriminator": {"num_scales": 2},  # training.networks.DiscriminatorConfig fields
    "data": {
        "crop": 128,             # training crop (multiple of 16); null: the whole cached window
        "batch_size": 8,         # per process
        "split": [0.8, 0.1, 0.1],
        "split_seed": 0,
        "target": "lge_clean",   # lge (as acquired, artefacts) | lge_clean (simulator truth)
        "percentiles": [50, 90], # no-mask target normalisation (training.dataset)
        "num_workers": 1,
        "in_memory": False,      # keep decoded slices in RAM (small caches; with num_workers 0)
        "skip_qc_failures": True,  # leave out slices the runtime guard would refuse (entry qc_passed false)
        "val_max_slices": 32,    # validation on the first N val slices, whole window
        "val_batch_size": 4,
    },
    "augment": {},               # training.augment.DEFAULT_AUGMENT overrides ({"enabled": false}: none)
    "loss": {
        "adversarial": "lsgan",  # lsgan | hinge
        "w_adv": 1.0,
        "w_l1": 10.0,
        "w_grad": 10.0,          # L1 on finite differences (sharp blood/myocardium borders)
        "w_ssim": 1.0,
        "w_perc": 10.0,
        "perceptual": "fm",      # fm (discriminator feature matching) | vgg | none
        "vgg_weights": None,     # torchvision VGG16 state dict, for perceptual = vgg
        "heart_weight": 4.0,     # extra L1 weight inside the heart masks
        "ssim_data_range": 2.0,
        "gan_start_step": 1000,  # adversarial and feature-matching terms from this step
    },
    "optim": {
        "lr_g": 2e-4,
        "lr_d": 2e-4,
        "betas": [0.5, 0.999],
        "decay_start": 0.5,      # linear LR decay to 0 from this fraction of max_steps
    },
    "schedule": {
        "max_steps": 20000,
        "max_minutes": None,     # stop (with a checkpoint) after this wall time
        "log_every": 50,
        "val_every": 500,
        "ckpt_every": 250,
        "panels": 4,             # validation slices drawn per panel figure
        "best_metric": "val_l1",
    },
}

TRAIN_COLUMNS = ["step", "epoch", "elapsed_s", "s_per_step", "lr_g", "lr_d", "d_loss", "g_total", "g_l1", "g_grad", "g_ssim", "g_adv", "g_perc"]
VAL_COLUMNS = ["step", "val_l1", "val_l1_heart", "val_ssim", "val_crop_gap"]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
FREE_SECTIONS = ("model", "discriminator", "augment")  # checked by GeneratorConfig / DiscriminatorConfig / augment


def unknown_keys(config: dict, reference: dict = DEFAULT_CONFIG, prefix: str = "") -> list[str]:
    """Dotted keys of ``config`` that :data:`DEFAULT_CONFIG` does not have (typos), outside the
    free sections that their own classes check."""
    out = []
    for k, v in config.items():
        if k not in reference:
            out.append(prefix + k)
        elif isinstance(v, dict) and isinstance(reference[k], dict) and not (not prefix and k in FREE_SECTIONS):
            out += unknown_keys(v, reference[k], f"{prefix}{k}.")
    return out


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str | Path) -> dict:
    """Read a JSON config (a path, or the name of a packaged one: ``smoke``, ``default``) and
    merge it over :data:`DEFAULT_CONFIG`."""
    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.json").is_file():
        p = CONFIG_DIR / f"{path}.json"
    if not p.is_file():
        raise InputError(f"config {path} not found")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"config {p} is not valid JSON: {exc}") from None
    bad = unknown_keys(user)
    if bad:
        raise InputError(f"config {p}: unknown key(s) {', '.join(bad)}")
    return merge(DEFAULT_CONFIG, user)


# --------------------------------------------------------------------------------------------
# Distributed and device set-up
# --------------------------------------------------------------------------------------------
class Runtime:
    """Where this process runs: rank, world size, device, mixed precision."""

    def __init__(self, config: dict) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = config.get("device", "auto")
        use_cuda = torch.cuda.is_available() and want in ("auto", "cuda")
        if want == "cuda" and not torch.cuda.is_available():
            raise InputError("config device is 'cuda' but CUDA is not available")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.amp_dtype: torch.dtype | None = None
        if use_cuda and config.get("amp", True):
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        threads = config.get("threads") or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(int(threads))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (keeps ranks in step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


class _SkipSampler(Sampler):
    """The indices of ``sampler`` without the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


# --------------------------------------------------------------------------------------------
# Checkpoints and logs
# --------------------------------------------------------------------------------------------
def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _append_csv(path: Path, columns: list[str], row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _truncate_csv(path: Path, max_step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else None
    if fields is None:
        return
    keep = [r for r in rows if int(float(r["step"])) <= max_step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(keep)


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def plot_curves(run_dir: Path) -> Path:
    """``loss_curves.png``: training losses (left) and validation metrics (right) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, va = _read_csv(run_dir / "train_log.csv"), _read_csv(run_dir / "val_log.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in ("g_l1", "g_grad", "g_ssim", "g_adv", "g_perc", "d_loss"):
        if k in tr and np.isfinite(tr[k]).any():
            axes[0].plot(tr["step"], tr[k], label=k)
    axes[0].set(xlabel="step", ylabel="loss", title="training", yscale="log")
    for k in VAL_COLUMNS[1:]:
        if k in va and np.isfinite(va[k]).any():
            axes[1].plot(va["step"], va[k], marker="o", label=k)
    axes[1].set(xlabel="step", title="validation")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss_curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def save_panels(path: Path, t1_ms: np.ndarray, vne: np.ndarray, lge: np.ndarray, ids: list[str]) -> Path:
    """One row per slice: T1 (ms, 0-2500) | VNE | LGE (normalised PSIR, −0.5 … 1.5).

    Args: t1_ms, vne, lge (n, H, W); ids: n slice ids.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ids)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for r in range(n):
        for c, (img, title, lim) in enumerate(((t1_ms[r], "T1 (ms)", (0, 2500)), (vne[r], "VNE", (-0.5, 1.5)), (lge[r], "LGE", (-0.5, 1.5)))):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=lim[0], vmax=lim[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
        axes[r, 0].set_ylabel(ids[r], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _inputs(b: dict) -> tuple[torch.Tensor, ...]:
    return b["cine"], b["ir"], b["ir_ti_ms"], b["t1_map_ms"]


@torch.no_grad()
def validate(generator: nn.Module, loader: DataLoader, rt: Runtime, crop: int | None, n_panels: int) -> tuple[dict, dict]:
    """Metrics over the validation loader (whole cached windows) and arrays for the panels.

    Metrics: ``val_l1`` (mean |VNE − LGE|), ``val_l1_heart`` (inside the heart masks, slices
    with masks only), ``val_ssim``, ``val_crop_gap`` (mean |difference| between the VNE of the
    centre ``crop`` computed alone and computed within the whole window, a margin of
    min(16, crop/4) pixels excluded: how much the output depends on the field of view, e.g.
    through instance norm).
    """
    g = _unwrap(generator)
    was_training = g.training
    g.eval()
    l1, l1h, ss, gaps = [], [], [], []
    panels = {"t1": [], "vne": [], "lge": [], "ids": []}
    pad = g.pad_multiple
    for b in loader:
        b = _to(b, rt.device)
        h, w = b["t1_map_ms"].shape[-2:]
        ph, pw = (-h) % pad, (-w) % pad
        x = [torch.nn.functional.pad(t, (0, pw, 0, ph)) if t.dim() == 4 else t for t in _inputs(b)]
        with rt.autocast():
            vne = g(*x)[..., :h, :w].float()
        lge = b["lge"]
        l1.append(weighted_l1(vne, lge).item())
        ss.append(ssim(vne, lge).item())
        heart = heart_weight_map(b["masks"], b["has_masks"], 1.0) - 1.0
        if heart.sum() > 0:
            l1h.append(((vne - lge).abs() * heart).sum().item() / heart.sum().item())
        if crop and not gaps and crop + 32 <= min(h, w) and crop % pad == 0:
            i0, j0 = (h - crop) // 2, (w - crop) // 2
            xc = [t[..., i0:i0 + crop, j0:j0 + crop] if t.dim() == 4 else t for t in _inputs(b)]
            with rt.autocast():
                vc = g(*xc).float()
            m = min(16, crop // 4)
            gaps.append((vc[..., m:-m, m:-m] - vne[..., i0 + m:i0 + crop - m, j0 + m:j0 + crop - m]).abs().mean().item())
        if len(panels["ids"]) < n_panels:
            k = n_panels - len(panels["ids"])
            panels["t1"].extend(b["t1_map_ms"][:k, 0].cpu().numpy())
            panels["vne"].extend(vne[:k, 0].cpu().numpy())
            panels["lge"].extend(lge[:k, 0].cpu().numpy())
            panels["ids"].extend(b["slice_id"][:k])
    g.train(was_training)
    metrics = {
        "val_l1": float(np.mean(l1)) if l1 else math.nan,
        "val_l1_heart": float(np.mean(l1h)) if l1h else math.nan,
        "val_ssim": float(np.mean(ss)) if ss else math.nan,
        "val_crop_gap": float(np.mean(gaps)) if gaps else math.nan,
    }
    return metrics, panels


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _lr_lambda(max_steps: int, decay_start: float):
    start = int(max_steps * decay_start)

    def f(step: int) -> float:
        if step < start or max_steps <= start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / float(max_steps - start))

    return f


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: dict, resume: bool = False) -> dict:
    """Train the VNE generator; see the module docstring for what is written where.

    Args:
        config: a config dict (merged over :data:`DEFAULT_CONFIG` here, so partial ones work).
        resume: continue from ``<out>/latest.pt`` if it exists (else start fresh, with a log
            line). Without it an existing checkpoint in ``out`` is an error.

    Returns:
        the run summary: {"status": "done" | "time_budget", "step", "best", "run_dir", ...}.
    """
    bad = unknown_keys(config)
    if bad:
        raise InputError(f"config: unknown key(s) {', '.join(bad)}")
    cfg = merge(DEFAULT_CONFIG, config)
    rt = Runtime(cfg)
    t_start = time.time()
    run_dir = Path(cfg["out"])
    cache_dir = Path(cfg["cache"])
    dcfg, lcfg, ocfg, scfg = cfg["data"], cfg["loss"], cfg["optim"], cfg["schedule"]
    max_steps = int(scfg["max_steps"])
    latest = run_dir / "latest.pt"
    if latest.is_file() and not resume:
        raise InputError(f"{run_dir} already holds a run (latest.pt): use --resume, or another --out")
    _seed_everything(int(cfg["seed"]))

    # ---- data
    index = read_index(cache_dir)
    entries, refused = usable_entries(index["entries"], bool(dcfg.get("skip_qc_failures", True)))
    if refused and rt.main:
        log.info("%d slices the quality guard would refuse are left out (data.skip_qc_failures): %s",
                 len(refused), "; ".join(sorted({e.get("qc_reason", "")[:60] for e in refused}))[:400])
    splits = split_entries(entries, dcfg["split"], int(dcfg["split_seed"]))
    if not splits["train"]:
        raise InputError(f"{cache_dir}: no training slices after the patient split")
    summary_data = data_summary(cache_dir, index, splits, dcfg["target"])
    train_ds = VNEDataset(cache_dir, splits["train"], dcfg["crop"], True, dcfg["target"], int(cfg["seed"]),
                          dcfg["percentiles"], dcfg["in_memory"])
    val_entries = splits["val"][: int(dcfg["val_max_slices"])]
    val_ds = VNEDataset(cache_dir, val_entries, None, False, dcfg["target"], int(cfg["seed"]), dcfg["percentiles"], dcfg["in_memory"])
    batch = int(dcfg["batch_size"])
    sampler = DistributedSampler(train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=int(cfg["seed"]), drop_last=True)
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch == 0:
        raise InputError(f"{len(train_ds)} training slices for {rt.world} process(es) of batch {batch}: reduce data.batch_size")
    val_loader = DataLoader(val_ds, batch_size=int(dcfg["val_batch_size"]), shuffle=False, num_workers=0)

    # ---- models and optimisers
    g_cfg = GeneratorConfig.from_dict(cfg["model"])
    generator = VNEGenerator(g_cfg).to(rt.device)
    discriminator = VNEDiscriminator(DiscriminatorConfig.from_dict({"n_ir_images": g_cfg.n_ir_images, **cfg["discriminator"]})).to(rt.device)
    if dcfg["crop"] is not None and int(dcfg["crop"]) % generator.pad_multiple:
        raise InputError(f"data.crop {dcfg['crop']} must be a multiple of {generator.pad_multiple}")
    objective = GeneratorObjective(lcfg).to(rt.device)
    betas = tuple(ocfg["betas"])
    opt_g = torch.optim.Adam(generator.parameters(), lr=float(ocfg["lr_g"]), betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=float(ocfg["lr_d"]), betas=betas)
    lam = _lr_lambda(max_steps, float(ocfg["decay_start"]))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lam)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lam)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)

    step, best = 0, {"metric": scfg["best_metric"], "value": None, "step": None}
    if resume and latest.is_file():
        state = load_checkpoint(latest, map_location=rt.device)
        if GeneratorConfig.from_dict(state["config"].get("model")) != GeneratorConfig.from_dict(cfg["model"]):
            log.warning("resuming with a different model section than the checkpoint's; weights may not load")
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched_g.load_state_dict(state["sched_g"])
        sched_d.load_state_dict(state["sched_d"])
        scaler.load_state_dict(state["scaler"])
        step, best = int(state["step"]), state["best"]
        _set_rng_state(state["rng"])
        if rt.main:
            _truncate_csv(run_dir / "train_log.csv", step)
            _truncate_csv(run_dir / "val_log.csv", step)
            log.info("resumed %s at step %d", latest, step)
    else:
        if resume and rt.main:
            log.info("no checkpoint in %s, starting a new run", run_dir)
        if cfg.get("init_from"):
            init = load_checkpoint(cfg["init_from"], map_location=rt.device, require=("generator", "discriminator"))
            generator.load_state_dict(init["generator"])
            discriminator.load_state_dict(init["discriminator"])
            if rt.main:
                log.info("weights from %s (step %s); optimisers and step start fresh", cfg["init_from"], init.get("step"))

    if rt.world > 1:
        ddp_kw = {"device_ids": [rt.local_rank]} if rt.device.type == "cuda" else {}
        generator = nn.parallel.DistributedDataParallel(generator, **ddp_kw)
        discriminator = nn.parallel.DistributedDataParallel(discriminator, **ddp_kw)
    g_core, d_core = _unwrap(generator), _unwrap(discriminator)

    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))
        (run_dir / "split.json").write_text(json.dumps(
            {s: sorted({e["patient_id"] for e in splits[s]}) for s in splits}, indent=1))
        log.info("generator %.2f M params, discriminator %.2f M params; %d train / %d val slices; device %s, world %d",
                 count_params(g_core) / 1e6, count_params(d_core) / 1e6, len(train_ds), len(val_ds), rt.device, rt.world)

    def checkpoint(path: Path) -> None:
        _atomic_save({
            "generator": g_core.state_dict(), "discriminator": d_core.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "best": best, "config": cfg, "rng": _rng_state(), "data_summary": summary_data,
            "versions": {"vne": vne_version, "torch": str(torch.__version__)},
        }, path)

    def run_validation() -> None:
        nonlocal best
        metrics, panels = validate(generator, val_loader, rt, dcfg["crop"], int(scfg["panels"]))
        _append_csv(run_dir / "val_log.csv", VAL_COLUMNS, {"step": step, **metrics})
        if panels["ids"]:
            save_panels(run_dir / "panels" / f"step_{step:07d}.png", np.stack(panels["t1"]), np.stack(panels["vne"]),
                        np.stack(panels["lge"]), panels["ids"])
        plot_curves(run_dir)
        value = metrics.get(best["metric"], math.nan)
        if np.isfinite(value) and (best["value"] is None or value < best["value"]):
            best = {"metric": best["metric"], "value": float(value), "step": step}
            checkpoint(run_dir / "best.pt")
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)

    # ---- loop
    max_minutes = scfg.get("max_minutes")
    status = "done"
    gan_start = int(lcfg.get("gan_start_step", 0))
    use_gan = float(lcfg.get("w_adv", 0)) > 0 or lcfg.get("perceptual", "fm") == "fm"
    bar = tqdm(total=max_steps, initial=step, disable=not (rt.main and cfg.get("progress", True)), desc="train",
               dynamic_ncols=True, file=sys.stderr)
    generator.train()
    discriminator.train()
    t_log, step_log = time.time(), step
    try:
        while step < max_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            loader = DataLoader(train_ds, batch_size=batch, sampler=_SkipSampler(sampler, offset * batch),
                                num_workers=int(dcfg["num_workers"]), drop_last=True,
                                pin_memory=rt.device.type == "cuda")
            for b in loader:
                b = _to(augment_batch(b, step, int(cfg["seed"]) + 7919 * rt.rank, cfg["augment"]), rt.device)
                x, real = _inputs(b), b["lge"]
                gan_on = use_gan and step >= gan_start
                with torch.no_grad():
                    cond = d_core.condition(*x)
                with rt.autocast():
                    fake = generator(*x)

                # discriminator step: real and fake in one batch (one DDP forward/backward)
                loss_d = None
                if gan_on:
                    discriminator.requires_grad_(True)
                    with rt.autocast():
                        out = discriminator(torch.cat([cond, cond]), torch.cat([real, fake.detach()]))
                        n = real.shape[0]
                        loss_d = d_loss([[f[:n] for f in s] for s in out], [[f[n:] for f in s] for s in out], lcfg["adversarial"])
                    opt_d.zero_grad(set_to_none=True)
                    scaler.scale(loss_d).backward()
                    scaler.step(opt_d)

                # generator step: the discriminator is frozen and called without DDP
                discriminator.requires_grad_(False)
                with rt.autocast():
                    d_fake = d_core(cond, fake) if gan_on else None
                    d_real = None
                    if gan_on and objective.perceptual == "fm":
                        with torch.no_grad():
                            d_real = d_core(cond, real)
                    weight = heart_weight_map(b["masks"], b["has_masks"], float(lcfg["heart_weight"]))
                    loss_g, parts = objective(fake, real, weight, d_fake, d_real)
                opt_g.zero_grad(set_to_none=True)
                scaler.scale(loss_g).backward()
                scaler.step(opt_g)
                scaler.update()
                sched_g.step()
                sched_d.step()
                step += 1
                bar.update(1)

                if rt.main and (step % int(scfg["log_every"]) == 0 or step == max_steps):
                    now = time.time()
                    row = {"step": step, "epoch": epoch, "elapsed_s": round(now - t_start, 2),
                           "s_per_step": round((now - t_log) / max(1, step - step_log), 4),
                           "lr_g": sched_g.get_last_lr()[0], "lr_d": sched_d.get_last_lr()[0],
                           "d_loss": None if loss_d is None else float(loss_d.detach()), "g_total": float(loss_g.detach()), **parts}
                    _append_csv(run_dir / "train_log.csv", TRAIN_COLUMNS, row)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()})
                    t_log, step_log = now, step
                if step % int(scfg["val_every"]) == 0 or step == max_steps:
                    if rt.main:
                        run_validation()
                    rt.barrier()
                if rt.main and step % int(scfg["ckpt_every"]) == 0:
                    checkpoint(latest)
                out_of_time = max_minutes is not None and rt.any_rank((time.time() - t_start) / 60.0 >= float(max_minutes))
                if out_of_time and step < max_steps:
                    status = "time_budget"
                    break
                if step >= max_steps:
                    break
            if status == "time_budget":
                break
    except KeyboardInterrupt:
        if rt.main:
            checkpoint(latest)
            log.info("interrupted at step %d, checkpoint written to %s", step, latest)
        raise
    finally:
        bar.close()

    summary = {"status": status, "step": step, "max_steps": max_steps, "best": best, "run_dir": str(run_dir),
               "elapsed_min": round((time.time() - t_start) / 60.0, 2), "data": summary_data}
    if rt.main:
        checkpoint(latest)
        plot_curves(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("%s at step %d/%d (%.1f min); best %s = %s at step %s", status, step, max_steps,
                 summary["elapsed_min"], best["metric"], best["value"], best["step"])
    rt.barrier()
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary
