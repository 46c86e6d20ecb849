"""The training configuration: :class:`TrainConfig`, typed sections, the one set of defaults.

A config is JSON with the sections below; every key it leaves out takes the default written
here (the shipped model's), and a key this module does not define is refused, with its dotted
name (a typo must not silently train with a default)::

    TrainConfig                top level: name, model_name, model_version, seed, cache, out,
                               device, threads, amp, progress, init_from
      .model                   training.networks.GeneratorConfig (ModelConfig): the architecture,
                               whose defaults live with the network (it is built without a
                               training config too)
      .discriminator           DiscriminatorOptions: the PatchGAN (2 scales here)
      .data  .augment  .loss  .optim  .schedule
                               DataConfig, AugmentConfig, LossConfig, OptimConfig, ScheduleConfig

Values are checked against the field types where that is cheap (an int is an int, a float
field takes any number, a string field one of its choices, a pair two numbers) and refused
with one line naming the key: :class:`vne.errors.InputError`, which ``vne train`` prints as
``vne train: error: ...``.

A checkpoint stores :meth:`TrainConfig.to_dict` (plain builtins, so it loads with
``torch.load(weights_only=True)``); :meth:`TrainConfig.from_dict` reads it back, and reads the
partial dicts older checkpoints and the packaged ``configs/*.json`` hold (missing keys take
today's defaults, as the merge over ``DEFAULT_CONFIG`` did before).
"""
from __future__ import annotations

import copy
import json
import os
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from vne.errors import InputError

from . import CONFIG_DIR
from .networks import DiscriminatorConfig, GeneratorConfig

ModelConfig = GeneratorConfig
"""The ``model`` section: :class:`training.networks.GeneratorConfig` itself."""

VAL_METRICS = ("val_l1", "val_l1_heart", "val_ssim", "val_crop_gap")
"""Validation metrics, written to ``val_log.csv``; ``schedule.best_metric`` is one of them."""


@dataclass
class DiscriminatorOptions:
    """The ``discriminator`` section: :class:`training.networks.DiscriminatorConfig` with the
    training default of 2 scales (pix2pixHD) and the IR count taken from the generator."""

    base_channels: int = DiscriminatorConfig.base_channels
    n_layers: int = DiscriminatorConfig.n_layers
    num_scales: int = 2
    n_ir_images: int | None = None   # None: the generator's (model.n_ir_images)

    def build(self, n_ir_images: int) -> DiscriminatorConfig:
        """The network's config, for a generator with ``n_ir_images`` IR inputs."""
        return DiscriminatorConfig(n_ir_images=n_ir_images if self.n_ir_images is None else self.n_ir_images,
                                   base_channels=self.base_channels,
                                   n_layers=self.n_layers, num_scales=self.num_scales)


@dataclass
class DataConfig:
    """The ``data`` section: the cache split, the dataset and the loaders."""

    crop: int | None = 128                # training crop (multiple of 16); None: the whole cached window
    batch_size: int = 8                   # per process
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train / val / test patients
    split_seed: int = 0
    target: Literal["lge_clean", "lge"] = "lge_clean"  # lge (as acquired, artefacts) | lge_clean (simulator truth)
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0])  # no-mask target normalisation
    num_workers: int = 1
    in_memory: bool = False               # keep decoded slices in RAM (small caches; with num_workers 0)
    skip_qc_failures: bool = True         # leave out slices the runtime guard would refuse (entry qc_passed false)
    val_max_slices: int = 32              # validation on the first N val slices, whole window
    val_batch_size: int = 4


@dataclass
class AugmentConfig:
    """The ``augment`` section: the batch domain randomisation of :mod:`training.augment`
    (``enabled: false``: none). Pairs are (low, high) ranges."""

    enabled: bool = True
    p_geometry: float = 0.8
    rotation_deg: float = 180.0
    scale: list[float] = field(default_factory=lambda: [0.85, 1.2])
    shift_px: float = 6.0
    bias_field: float = 0.3               # max amplitude of log-gain of the smooth field
    gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])  # cine magnitude gamma; the IR uses its square root
    cine_noise: float = 0.05              # max Rician sigma relative to the cine's robust scale
    ir_noise: float = 0.04                # max Gaussian sigma relative to the IR's robust scale
    blur_sigma_px: float = 1.0            # max Gaussian blur sigma per input
    t1_scale: list[float] = field(default_factory=lambda: [0.94, 1.04])
    t1_blood_pull: float = 0.05           # max extra relative drop of blood-range T1
    t1_noise_ms: float = 30.0
    blood_gain: list[float] = field(default_factory=lambda: [-0.25, 0.6])  # extra gain of blood-range-T1 pixels


@dataclass
class LossConfig:
    """The ``loss`` section (:class:`training.losses.GeneratorObjective`)."""

    adversarial: Literal["lsgan", "hinge"] = "lsgan"
    w_adv: float = 1.0
    w_l1: float = 10.0
    w_grad: float = 10.0                  # L1 on finite differences (sharp blood/myocardium borders)
    w_ssim: float = 1.0
    w_perc: float = 10.0
    perceptual: Literal["fm", "vgg", "none"] = "fm"  # fm: discriminator feature matching
    vgg_weights: str | None = None        # torchvision VGG16 state dict, for perceptual = vgg
    heart_weight: float = 4.0             # extra L1 weight inside the heart masks
    ssim_data_range: float = 2.0
    gan_start_step: int = 1000            # adversarial and feature-matching terms from this step


@dataclass
class OptimConfig:
    """The ``optim`` section: Adam for both networks, linear decay to 0."""

    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    decay_start: float = 0.5              # linear LR decay to 0 from this fraction of max_steps


@dataclass
class ScheduleConfig:
    """The ``schedule`` section: length, time budget, logging, validation, checkpoints."""

    max_steps: int = 20000                # generator steps
    max_minutes: float | None = None      # stop (with a checkpoint) after this wall time
    log_every: int = 50
    val_every: int = 500
    ckpt_every: int = 250
    panels: int = 4                       # validation slices drawn per panel figure
    best_metric: Literal["val_l1", "val_l1_heart", "val_ssim", "val_crop_gap"] = "val_l1"  # lower is better


@dataclass
class TrainConfig:
    """A whole training run's configuration; its defaults are the model to ship."""

    name: str = "default"
    model_name: str = "vne"               # written into the model contract at export
    model_version: str = "0.1.0"
    seed: int = 0                         # model init, data order, augmentation
    cache: str = "data-cache/sim"
    out: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None            # torch CPU threads; None: cores / local processes
    amp: bool = True                      # mixed precision on CUDA
    progress: bool = True                 # tqdm bar on rank 0
    init_from: str | None = None          # checkpoint whose weights start a new run (fine-tuning)
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorOptions = field(default_factory=DiscriminatorOptions)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None, where: str = "config") -> TrainConfig:
        """A config from a (partial) plain dict: a JSON config, a checkpoint's ``config``.

        Raises InputError naming ``where`` and the dotted key: unknown keys (all of them), then
        the first value of the wrong type.
        """
        d = d or {}
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(d).__name__}")
        bad = unknown_keys(d)
        if bad:
            raise InputError(f"{where}: unknown key{'s' if len(bad) > 1 else ''} {', '.join(bad)}")
        try:
            config = _build(cls, d, "")
            config.check()
        except _ValueProblem as exc:
            raise InputError(f"{where}: {exc}") from None
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins (JSON, and ``torch.load(weights_only=True)`` in checkpoints)."""
        return _plain(asdict(self))

    def with_overrides(self, overrides: dict, where: str = "config") -> TrainConfig:
        """A copy with a nested dict of overrides merged in (checked like :meth:`from_dict`)."""
        return TrainConfig.from_dict(merge(self.to_dict(), overrides), where)

    def check(self) -> None:
        """Relations a field type cannot say; raises _ValueProblem."""
        pairs = {"data.split": (self.data.split, 3), "data.percentiles": (self.data.percentiles, 2),
                 "optim.betas": (self.optim.betas, 2)}
        pairs.update({f"augment.{k}": (getattr(self.augment, k), 2) for k in ("scale", "gamma", "t1_scale", "blood_gain")})
        for key, (seq, n) in pairs.items():
            if len(seq) != n:
                raise _ValueProblem(f"{key} must hold {n} numbers, got {seq}")
        positive = {"data.batch_size": self.data.batch_size, "data.val_batch_size": self.data.val_batch_size,
                    "schedule.log_every": self.schedule.log_every, "schedule.val_every": self.schedule.val_every,
                    "schedule.ckpt_every": self.schedule.ckpt_every}
        for key, value in positive.items():
            if value < 1:
                raise _ValueProblem(f"{key} must be at least 1, got {value}")
        for key, value in {"schedule.max_steps": self.schedule.max_steps, "data.num_workers": self.data.num_workers,
                           "data.val_max_slices": self.data.val_max_slices, "schedule.panels": self.schedule.panels}.items():
            if value < 0:
                raise _ValueProblem(f"{key} must not be negative, got {value}")
        if self.data.crop is not None and self.data.crop < 1:
            raise _ValueProblem(f"data.crop must be a positive multiple of 16 or null, got {self.data.crop}")
        try:
            GeneratorConfig.from_dict(asdict(self.model))  # its own checks (ablate)
        except ValueError as exc:
            raise _ValueProblem(f"model: {exc}") from None


# -------------------------------------------------------------------------------------------
# Reading configs
# -------------------------------------------------------------------------------------------
def config_path(name_or_path: str | Path) -> Path:
    """A config file: a path, or the name of a packaged one (``smoke``, ``default``)."""
    p = Path(name_or_path)
    if not p.is_file() and (CONFIG_DIR / f"{name_or_path}.json").is_file():
        p = CONFIG_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise InputError(f"config {name_or_path} not found")
    return p


def load_config(name_or_path: str | Path) -> TrainConfig:
    """Read a JSON config (a path, or a packaged config's name) over the defaults."""
    p = config_path(name_or_path)
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"config {p} is not valid JSON: {exc}") from None
    return TrainConfig.from_dict(user, where=f"config {p}")


def unknown_keys(d: dict, cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``d`` that the config class ``cls`` does not define (typos)."""
    known = {f.name: f for f in fields(cls)}
    hints = get_type_hints(cls)
    out = []
    for k, v in d.items():
        if k not in known:
            out.append(prefix + str(k))
        elif isinstance(v, dict) and isinstance(hints[k], type) and is_dataclass(hints[k]):
            out += unknown_keys(v, hints[k], f"{prefix}{k}.")
    return out


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# -------------------------------------------------------------------------------------------
# Type checks (cheap ones: the field annotations)
# -------------------------------------------------------------------------------------------
class _ValueProblem(ValueError):
    """A value that does not fit its field; the message starts with the dotted key."""


def _build(cls: type, d: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(d[f.name], hints[f.name], prefix + f.name)
        elif f.default is MISSING and f.default_factory is MISSING:  # pragma: no cover - every field has a default
            raise _ValueProblem(f"{prefix}{f.name} is required")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (ints for int fields, floats for float fields), or _ValueProblem."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(value, rest[0], key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or not isinstance(value, str):
            raise _ValueProblem(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if isinstance(tp, type) and is_dataclass(tp):
        if isinstance(value, tp):
            value = asdict(value)
        if not isinstance(value, dict):
            raise _ValueProblem(f"{key} must be a section (a JSON object), got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _ValueProblem(f"{key} must be a list, got {value!r}")
        (item, *_) = get_args(tp)
        items = [_coerce(v, item, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise _ValueProblem(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _ValueProblem(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _ValueProblem(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise _ValueProblem(f"{key} must be a string, got {value!r}")
        return value
    return value  # pragma: no cover - every field type is one of the above


def _plain(x: Any) -> Any:
    """Tuples as lists, recursively (the JSON view)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


__all__ = [
    "AugmentConfig", "DataConfig", "DiscriminatorOptions", "LossConfig", "ModelConfig", "OptimConfig",
    "ScheduleConfig", "TrainConfig", "VAL_METRICS", "config_path", "load_config", "merge", "unknown_keys",
]
