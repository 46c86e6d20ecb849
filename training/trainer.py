"""The model side of training, in the style of pytorch-CycleGAN-and-pix2pix's ``models/``.

:class:`VNETrainer` holds the generator, the discriminator, the objective, the optimisers, LR
schedulers and gradient scaler, the step and the best validation value. The loop
(:func:`training.train.train`) owns the data, the clock, logs and figures, and drives it::

    trainer = VNETrainer(config, runtime, data_summary=...)
    trainer.load(latest)            # resume: weights, optimisers, schedulers, step, best, RNG
    trainer.load_weights(init_from) # or: start a new run from another run's weights
    trainer.distribute()            # DDP when launched by torchrun
    for batch in loader:
        trainer.set_input(batch)        # batch augmentation (seeded by step) and device
        trainer.optimize_parameters()   # D step, then G step; step += 1
        trainer.current_losses()        # {"d_loss", "g_total", "g_l1", ...}
    metrics, panels = trainer.validate(val_loader)
    trainer.save(path)

:class:`Runtime` says where the process runs (rank, world, device, mixed precision).
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from vne import __version__ as vne_version
from vne.errors import InputError
from vne.io.atomic import atomic_path

from .augment import augment_batch
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .losses import GeneratorObjective, d_loss, heart_weight_map, ssim, weighted_l1
from .networks import GeneratorConfig, VNEDiscriminator, VNEGenerator

log = logging.getLogger("vne.train")


# --------------------------------------------------------------------------------------------
# Distributed and device set-up
# --------------------------------------------------------------------------------------------
class Runtime:
    """Where this process runs: rank, world size, device, mixed precision."""

    def __init__(self, config: TrainConfig) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = config.device
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
        if use_cuda and config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        threads = config.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
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


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) random states, as stored in checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(max_steps: int, decay_start: float):
    """Factor of the LR at a step: 1, then linear to 0 from ``decay_start · max_steps``."""
    start = int(max_steps * decay_start)

    def f(step: int) -> float:
        if step < start or max_steps <= start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / float(max_steps - start))

    return f


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _inputs(b: dict) -> tuple[torch.Tensor, ...]:
    return b["cine"], b["ir"], b["ir_ti_ms"], b["t1_map_ms"]


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class VNETrainer:
    """The conditional GAN being trained (pix2pix: a generator, a PatchGAN, their optimisers).

    Args:
        config: the run's config (the ``model``, ``discriminator``, ``loss``, ``optim``,
            ``augment`` and ``schedule.max_steps`` / ``best_metric`` entries are used here).
        runtime: device and distributed set-up (default: built from ``config``).
        data_summary: what the run trains on, written into every checkpoint (the export's
            contract reads it).

    The networks are initialised from the global torch RNG: seed it before (``train`` does).
    """

    def __init__(self, config: TrainConfig, runtime: Runtime | None = None, data_summary: dict | None = None) -> None:
        self.config = config
        self.rt = rt = runtime or Runtime(config)
        self.data_summary = data_summary or {}
        g_cfg = replace(config.model)
        self.g_core = VNEGenerator(g_cfg).to(rt.device)  # the networks without DDP
        self.d_core = VNEDiscriminator(config.discriminator.build(g_cfg.n_ir_images)).to(rt.device)
        self.generator: nn.Module = self.g_core  # DDP-wrapped after distribute() with several processes
        self.discriminator: nn.Module = self.d_core
        pad = self.g_core.pad_multiple
        if config.data.crop is not None and config.data.crop % pad:
            raise InputError(f"data.crop {config.data.crop} must be a multiple of {pad}")
        lcfg = config.loss
        self.objective = GeneratorObjective(asdict(lcfg)).to(rt.device)
        ocfg = config.optim
        betas = (ocfg.betas[0], ocfg.betas[1])
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=ocfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=ocfg.lr_d, betas=betas)
        lam = lr_lambda(config.schedule.max_steps, ocfg.decay_start)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lam)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lam)
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
        self.augment = asdict(config.augment)
        self.use_gan = lcfg.w_adv > 0 or lcfg.perceptual == "fm"
        self.step = 0
        self.best: dict = {"metric": config.schedule.best_metric, "value": None, "step": None}
        # set by set_input / optimize_parameters
        self.batch: dict = {}
        self.loss_d: torch.Tensor | None = None
        self.loss_g: torch.Tensor | None = None
        self.loss_parts: dict[str, float] = {}

    # ---- set-up ------------------------------------------------------------------------
    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint: weights, optimisers, schedulers, scaler, step, best, RNG."""
        state = load_checkpoint(path, map_location=self.rt.device)
        if GeneratorConfig.from_dict(state["config"].get("model")) != self.config.model:
            log.warning("resuming with a different model section than the checkpoint's; weights may not load")
        self.g_core.load_state_dict(state["generator"])
        self.d_core.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state["best"]
        set_rng_state(state["rng"])

    def load_weights(self, path: str | Path) -> dict:
        """Start from another run's generator and discriminator weights (fine-tuning); the
        optimisers and the step start fresh. Returns the checkpoint."""
        init = load_checkpoint(path, map_location=self.rt.device, require=("generator", "discriminator"))
        self.g_core.load_state_dict(init["generator"])
        self.d_core.load_state_dict(init["discriminator"])
        return init

    def distribute(self) -> None:
        """Wrap both networks in DistributedDataParallel when there are several processes."""
        if self.rt.world > 1:
            ids = [self.rt.local_rank] if self.rt.device.type == "cuda" else None
            self.generator = nn.parallel.DistributedDataParallel(self.g_core, device_ids=ids)
            self.discriminator = nn.parallel.DistributedDataParallel(self.d_core, device_ids=ids)

    def save(self, path: str | Path) -> None:
        """Write a checkpoint (atomically): everything :meth:`load` restores, the config as a
        plain dict, the data summary and the versions."""
        with atomic_path(Path(path)) as tmp:
            torch.save({
                "generator": self.g_core.state_dict(), "discriminator": self.d_core.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "best": self.best,
                "config": self.config.to_dict(), "rng": rng_state(), "data_summary": self.data_summary,
                "versions": {"vne": vne_version, "torch": str(torch.__version__)},
            }, tmp)

    # ---- one step ----------------------------------------------------------------------
    def train(self) -> None:
        self.generator.train()
        self.discriminator.train()

    def set_input(self, batch: dict) -> None:
        """Take a loader batch: domain randomisation (seeded by seed, rank and step), device."""
        seed = self.config.seed + 7919 * self.rt.rank
        self.batch = _to(augment_batch(batch, self.step, seed, self.augment), self.rt.device)

    @property
    def gan_on(self) -> bool:
        """Adversarial and feature-matching terms are on at this step."""
        return self.use_gan and self.step >= self.config.loss.gan_start_step

    def optimize_parameters(self) -> None:
        """One training step on the current input: discriminator, then generator."""
        b, rt = self.batch, self.rt
        x, real = _inputs(b), b["lge"]
        gan_on = self.gan_on
        with torch.no_grad():
            cond = self.d_core.condition(*x)
        with rt.autocast():
            fake = self.generator(*x)
        self.loss_d = self._optimize_d(cond, real, fake) if gan_on else None
        self._optimize_g(cond, real, fake, gan_on)
        self.scaler.update()
        self.sched_g.step()
        self.sched_d.step()
        self.step += 1

    def _optimize_d(self, cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Discriminator step: real and fake in one batch (one DDP forward/backward)."""
        self.discriminator.requires_grad_(True)
        with self.rt.autocast():
            out = self.discriminator(torch.cat([cond, cond]), torch.cat([real, fake.detach()]))
            n = real.shape[0]
            loss = d_loss([[f[:n] for f in s] for s in out], [[f[n:] for f in s] for s in out], self.config.loss.adversarial)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt_d)
        return loss

    def _optimize_g(self, cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, gan_on: bool) -> None:
        """Generator step: the discriminator is frozen and called without DDP."""
        b = self.batch
        self.discriminator.requires_grad_(False)
        with self.rt.autocast():
            d_fake = self.d_core(cond, fake) if gan_on else None
            d_real = None
            if gan_on and self.objective.perceptual == "fm":
                with torch.no_grad():
                    d_real = self.d_core(cond, real)
            weight = heart_weight_map(b["masks"], b["has_masks"], self.config.loss.heart_weight)
            self.loss_g, self.loss_parts = self.objective(fake, real, weight, d_fake, d_real)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(self.loss_g).backward()
        self.scaler.step(self.opt_g)

    def current_losses(self) -> dict[str, float | None]:
        """The last step's losses: ``d_loss`` (None while the GAN is off), ``g_total``, ``g_*``."""
        return {"d_loss": None if self.loss_d is None else float(self.loss_d.detach()),
                "g_total": None if self.loss_g is None else float(self.loss_g.detach()), **self.loss_parts}

    def learning_rates(self) -> dict[str, float]:
        return {"lr_g": float(self.sched_g.get_last_lr()[0]), "lr_d": float(self.sched_d.get_last_lr()[0])}

    # ---- validation --------------------------------------------------------------------
    def validate(self, loader: DataLoader) -> tuple[dict, dict]:
        """Metrics over the validation loader and arrays for the panels (:func:`validate`)."""
        return validate(self.generator, loader, self.rt, self.config.data.crop, self.config.schedule.panels)

    def record(self, metrics: dict) -> bool:
        """Keep the best value of ``schedule.best_metric`` (lower is better); True if ``metrics``
        improve on it."""
        value = metrics.get(self.best["metric"], math.nan)
        if np.isfinite(value) and (self.best["value"] is None or value < self.best["value"]):
            self.best = {"metric": self.best["metric"], "value": float(value), "step": self.step}
            return True
        return False


@torch.no_grad()
def validate(generator: nn.Module, loader: DataLoader, rt: Runtime, crop: int | None, n_panels: int) -> tuple[dict, dict]:
    """Metrics over the validation loader (whole cached windows) and arrays for the panels.

    Metrics: ``val_l1`` (mean |VNE − LGE|), ``val_l1_heart`` (inside the heart masks, slices
    with masks only), ``val_ssim``, ``val_crop_gap`` (mean |difference| between the VNE of the
    centre ``crop`` computed alone and computed within the whole window, a margin of
    min(16, crop/4) pixels excluded: how much the output depends on the field of view, e.g.
    through instance norm).
    """
    g = cast(VNEGenerator, _unwrap(generator))
    was_training = g.training
    g.eval()
    l1: list[float] = []
    l1h: list[float] = []
    ss: list[float] = []
    gaps: list[float] = []
    panels: dict[str, list] = {"t1": [], "vne": [], "lge": [], "ids": []}
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
