"""The training loop: ``train(config, resume)``, driving a :class:`training.trainer.VNETrainer`.

The split follows pytorch-CycleGAN-and-pix2pix: options are :class:`training.config.TrainConfig`,
the model (networks, losses, optimisers, checkpoints) is :class:`training.trainer.VNETrainer`,
the data is :mod:`training.dataset`; this module sets them up and runs the loop, with the
progress bar, the time budget, logs, figures, validation and checkpoints.

One run directory (``config.out``) holds everything a run produces::

    config.json          the full config this run started with (TrainConfig.to_dict)
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

import csv
import json
import logging
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from vne.errors import InputError
from vne.io.training_data import read_index

from .config import VAL_METRICS, TrainConfig
from .dataset import VNEDataset, data_summary, split_entries, usable_entries
from .networks import count_params
from .trainer import Runtime, VNETrainer

log = logging.getLogger("vne.train")

TRAIN_COLUMNS = ["step", "epoch", "elapsed_s", "s_per_step", "lr_g", "lr_d", "d_loss", "g_total", "g_l1", "g_grad", "g_ssim", "g_adv", "g_perc"]
VAL_COLUMNS = ["step", *VAL_METRICS]


# --------------------------------------------------------------------------------------------
# Data, logs and figures
# --------------------------------------------------------------------------------------------
class _SkipSampler(Sampler):
    """The indices of ``sampler`` without the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler: DistributedSampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


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
# The loop
# --------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Data:
    """The cache split into train / val and its loaders (the pix2pix ``data`` side)."""

    def __init__(self, cfg: TrainConfig, rt: Runtime) -> None:
        dcfg, cache_dir = cfg.data, Path(cfg.cache)
        index = read_index(cache_dir)
        entries, refused = usable_entries(index["entries"], dcfg.skip_qc_failures)
        if refused and rt.main:
            log.info("%d slices the quality guard would refuse are left out (data.skip_qc_failures): %s",
                     len(refused), "; ".join(sorted({e.get("qc_reason", "")[:60] for e in refused}))[:400])
        self.splits = split_entries(entries, dcfg.split, dcfg.split_seed)
        if not self.splits["train"]:
            raise InputError(f"{cache_dir}: no training slices after the patient split")
        self.summary = data_summary(cache_dir, index, self.splits, dcfg.target)
        self.train_ds = VNEDataset(cache_dir, self.splits["train"], dcfg.crop, True, dcfg.target, cfg.seed,
                                   dcfg.percentiles, dcfg.in_memory)
        val_entries = self.splits["val"][:dcfg.val_max_slices]
        self.val_ds = VNEDataset(cache_dir, val_entries, None, False, dcfg.target, cfg.seed, dcfg.percentiles, dcfg.in_memory)
        self.batch, self.num_workers, self.pin = dcfg.batch_size, dcfg.num_workers, rt.device.type == "cuda"
        self.sampler: DistributedSampler = DistributedSampler(self.train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(self.train_ds)} training slices for {rt.world} process(es) of batch {self.batch}: "
                             "reduce data.batch_size")
        self.val_loader = DataLoader(self.val_ds, batch_size=dcfg.val_batch_size, shuffle=False, num_workers=0)

    def train_loader(self, step: int) -> tuple[int, DataLoader]:
        """The epoch ``step`` falls in and its loader, from ``step`` on (resuming mid-epoch)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        return epoch, DataLoader(self.train_ds, batch_size=self.batch, sampler=_SkipSampler(self.sampler, offset * self.batch),
                                 num_workers=self.num_workers, drop_last=True, pin_memory=self.pin)


def train(config: TrainConfig | dict, resume: bool = False) -> dict:
    """Train the VNE generator; see the module docstring for what is written where.

    Args:
        config: a :class:`TrainConfig`, or a (partial) config dict read over its defaults.
        resume: continue from ``<out>/latest.pt`` if it exists (else start fresh, with a log
            line). Without it an existing checkpoint in ``out`` is an error.

    Returns:
        the run summary: {"status": "done" | "time_budget", "step", "best", "run_dir", ...}.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    rt = Runtime(cfg)
    t_start = time.time()
    run_dir = Path(cfg.out)
    scfg = cfg.schedule
    max_steps = scfg.max_steps
    latest = run_dir / "latest.pt"
    if latest.is_file() and not resume:
        raise InputError(f"{run_dir} already holds a run (latest.pt): use --resume, or another --out")
    _seed_everything(cfg.seed)

    data = _Data(cfg, rt)
    trainer = VNETrainer(cfg, rt, data_summary=data.summary)
    if resume and latest.is_file():
        trainer.load(latest)
        if rt.main:
            _truncate_csv(run_dir / "train_log.csv", trainer.step)
            _truncate_csv(run_dir / "val_log.csv", trainer.step)
            log.info("resumed %s at step %d", latest, trainer.step)
    else:
        if resume and rt.main:
            log.info("no checkpoint in %s, starting a new run", run_dir)
        if cfg.init_from:
            init = trainer.load_weights(cfg.init_from)
            if rt.main:
                log.info("weights from %s (step %s); optimisers and step start fresh", cfg.init_from, init.get("step"))
    trainer.distribute()

    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (run_dir / "split.json").write_text(json.dumps(
            {s: sorted({e["patient_id"] for e in data.splits[s]}) for s in data.splits}, indent=1))
        log.info("generator %.2f M params, discriminator %.2f M params; %d train / %d val slices; device %s, world %d",
                 count_params(trainer.g_core) / 1e6, count_params(trainer.d_core) / 1e6, len(data.train_ds),
                 len(data.val_ds), rt.device, rt.world)

    def run_validation() -> None:
        metrics, panels = trainer.validate(data.val_loader)
        step = trainer.step
        _append_csv(run_dir / "val_log.csv", VAL_COLUMNS, {"step": step, **metrics})
        if panels["ids"]:
            save_panels(run_dir / "panels" / f"step_{step:07d}.png", np.stack(panels["t1"]), np.stack(panels["vne"]),
                        np.stack(panels["lge"]), panels["ids"])
        plot_curves(run_dir)
        if trainer.record(metrics):
            trainer.save(run_dir / "best.pt")
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)

    # ---- loop
    status = "done"
    bar = tqdm(total=max_steps, initial=trainer.step, disable=not (rt.main and cfg.progress), desc="train",
               dynamic_ncols=True, file=sys.stderr)
    trainer.train()
    t_log, step_log = time.time(), trainer.step
    try:
        while trainer.step < max_steps:
            epoch, loader = data.train_loader(trainer.step)
            for b in loader:
                trainer.set_input(b)
                trainer.optimize_parameters()
                step = trainer.step
                bar.update(1)
                if rt.main and (step % scfg.log_every == 0 or step == max_steps):
                    now = time.time()
                    losses = trainer.current_losses()
                    row = {"step": step, "epoch": epoch, "elapsed_s": round(now - t_start, 2),
                           "s_per_step": round((now - t_log) / max(1, step - step_log), 4), **trainer.learning_rates(),
                           **losses}
                    _append_csv(run_dir / "train_log.csv", TRAIN_COLUMNS, row)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in trainer.loss_parts.items()})
                    t_log, step_log = now, step
                if step % scfg.val_every == 0 or step == max_steps:
                    if rt.main:
                        run_validation()
                    rt.barrier()
                if rt.main and step % scfg.ckpt_every == 0:
                    trainer.save(latest)
                out_of_time = scfg.max_minutes is not None and rt.any_rank((time.time() - t_start) / 60.0 >= scfg.max_minutes)
                if out_of_time and step < max_steps:
                    status = "time_budget"
                    break
                if step >= max_steps:
                    break
            if status == "time_budget":
                break
    except KeyboardInterrupt:
        if rt.main:
            trainer.save(latest)
            log.info("interrupted at step %d, checkpoint written to %s", trainer.step, latest)
        raise
    finally:
        bar.close()

    best = trainer.best
    summary = {"status": status, "step": trainer.step, "max_steps": max_steps, "best": best, "run_dir": str(run_dir),
               "elapsed_min": round((time.time() - t_start) / 60.0, 2), "data": data.summary}
    if rt.main:
        trainer.save(latest)
        plot_curves(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("%s at step %d/%d (%.1f min); best %s = %s at step %s", status, trainer.step, max_steps,
                 summary["elapsed_min"], best["metric"], best["value"], best["step"])
    rt.barrier()
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary
