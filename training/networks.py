"""The VNE generator and its conditional PatchGAN discriminator.

Generator (after the VNE paper: three U-Net streams, a fusion block, one output image)::

    physical units                network units            half resolution (H/2, W/2)         full resolution
    cine      (B,25,H,W) ─┐                    ┌ blur ↓2 ─ cine U-Net ──┐
    ir        (B,7,H,W)  ─┤  InputNormalizer   ├ blur ↓2 ─ IR U-Net  ───┼ concat ─ fusion ─ 1×1 ─ bilinear ↑2 ─┐
    ir_ti_ms  (B,7)      ─┤  (in the graph)    │ clamp(TI) ─ FiLM ─┘    │  (1×1, residual 3×3)                 │
    t1_map_ms (B,1,H,W)  ─┘                    └ blur ↓2 ─ T1 U-Net  ───┘                head: [features, T1] ─┘─ vne (B,1,H,W)

* No layer has a stride-2 learned kernel or a sub-pixel output (0.2.0 had a 2×2 "patchify",
  2×2 transposed convolutions and a PixelShuffle, and printed a 2-pixel checkerboard):
  downsampling is a fixed binomial blur + stride 2 (:class:`BlurDown`), upsampling is a 1×1
  convolution + bilinear resize (:class:`ResizeUp`).
* Every stream starts by downsampling ×2, so the U-Nets run at half
  resolution: the T1 grid (0.94 mm) is interpolated from ~1.9 mm acquired pixels, and
  full-resolution convolutions dominate the CPU cost (docs/architecture.md). A light
  full-resolution head (two narrow 3×3 convolutions) sees the upsampled fused features and the
  normalised T1 map, so edges are placed on the T1 grid and the absolute T1 level reaches the
  output directly (instance norm, an option, would remove it inside the streams).
* Each U-Net has ``depth`` poolings after the first downsampling, so H and W must be multiples of
  ``2 ** (depth + 1)`` (16 for the default depth 3; :attr:`VNEGenerator.pad_multiple`).
* The IR stream is told the inversion times by FiLM (a per-channel scale and shift computed
  from TI/1000 by a small MLP) applied *after* the stem normalisation: a TI broadcast as a
  constant input channel would be removed again by instance norm.
* Normalisation layers are batch norm by default, so the output does not depend on the field
  of view (see :func:`make_norm`).
* Intensity normalisation from physical units is part of ``forward`` and therefore of the
  exported ONNX graph (see :class:`InputNormalizer`); the gadget feeds raw scanner units.

Discriminator: a pix2pix PatchGAN (optionally multi-scale) on [condition, image], where the
condition is built from the same normalised native inputs; it returns every layer's features
so the feature-matching loss (the default perceptual term, see :mod:`training.losses`) can use
them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from vne.prepare.contract import N_CINE_FRAMES, N_IR_IMAGES

# T1 normalisation: (T1 - T1_CENTRE_MS) / T1_SCALE_MS, clipped. Native myocardium (960-1170 ms)
# maps near 0, blood (1550-2000 ms) to 1.1-2; the clip keeps air and fit failures bounded.
T1_CENTRE_MS = 1000.0
T1_SCALE_MS = 500.0
T1_CLIP = (-2.0, 6.0)
TI_SCALE_MS = 1000.0
# TIs are clamped to the range the training data spans (ShMOLLI/MOLLI at 40-120 bpm) before they
# condition the IR stream, so a TI the model has not seen cannot push the features further than
# the most extreme TI it has seen (issue 14: a 46 bpm exam collapsed the blood pool of 0.2.0).
TI_CLAMP_MS = (50.0, 6500.0)
SCALE_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Input normalisation (exported into the graph)
# --------------------------------------------------------------------------------------------
def robust_scale(x: torch.Tensor, eps: float = SCALE_EPS, stride: int = 2) -> torch.Tensor:
    """Per-sample intensity scale of a (B, C, H, W) stack: ``sum(x²) / sum(|x|)``.

    This is the |x|-weighted mean of |x| over all channels and pixels of a sample, so

    * zero pixels do not change it: the zero padding of :func:`vne.prepare.contract.pad_to_multiple`
      and dark air contribute nothing, and a heart-centred crop and the full field of view
      give similar scales (a plain mean |x| would scale with the fraction of background);
    * one scale per stack keeps the relative intensities between cine frames, and between IR
      images (the recovery curve), intact;
    * it is computed on every ``stride``-th pixel in each direction (the T1 grid is
      interpolated, neighbours are nearly equal), which saves a full-resolution pass.

    Returns:
        (B, 1, 1, 1) scale in the units of ``x``, at least ``eps``.
    """
    x = x[:, :, ::stride, ::stride]
    num = (x * x).sum(dim=(1, 2, 3), keepdim=True)
    den = x.abs().sum(dim=(1, 2, 3), keepdim=True)
    return (num / (den + eps)).clamp_min(eps)


class InputNormalizer(nn.Module):
    """Physical units → network units. No parameters; identical in torch and ONNX.

    * cine, IR: divided by their per-sample :func:`robust_scale` (IR keeps its sign);
    * T1: ``clip((T1_ms - 1000) / 500, -2, 6)``;
    * TI: ``clip(TI_ms, 50, 6500) / 1000`` (:data:`TI_CLAMP_MS`).
    """

    def forward(
        self, cine: torch.Tensor, ir: torch.Tensor, ir_ti_ms: torch.Tensor, t1_map_ms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: cine (B,Nc,H,W), ir (B,Ni,H,W), ir_ti_ms (B,Ni), t1_map_ms (B,1,H,W), float32.

        Returns:
            (cine_n, ir_n, ti_n, t1_n) with the same shapes, float32.
        """
        cine_n = cine / robust_scale(cine)
        ir_n = ir / robust_scale(ir)
        ti_n = ir_ti_ms.clamp(TI_CLAMP_MS[0], TI_CLAMP_MS[1]) / TI_SCALE_MS
        t1_n = ((t1_map_ms - T1_CENTRE_MS) / T1_SCALE_MS).clamp(T1_CLIP[0], T1_CLIP[1])
        return cine_n, ir_n, ti_n, t1_n


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
NORMS = ("instance", "batch", "group", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2D normalisation layer: ``batch`` (default), ``instance`` (per-sample, affine),
    ``group`` (8 groups or fewer) or ``none``.

    Why batch: the generator is trained on heart-centred crops and run on the whole T1 grid.
    At inference batch norm applies fixed statistics, so the network stays a local, fully
    convolutional function of its input. Instance and group norm take their statistics over
    the whole image; with them the VNE of the heart changes with how much air, chest wall and
    liver the field of view holds. Model 0.1.0 (instance norm) read 0.29 (blood = 1) apart
    inside the myocardium between heart-window and full-field inference on the held-out exams,
    and its lesion-burden agreement fell from r 0.87 to 0.70 (``benchmarks/fov_sensitivity.py``).
    Exported, each batch norm folds into the convolution before it, which also saves time.
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}, expected one of {NORMS}")


class ConvNormAct(nn.Sequential):
    """3×3 (or ``k``×``k``) convolution → norm → LeakyReLU(0.1). Keeps H, W when stride is 1."""

    def __init__(self, c_in: int, c_out: int, norm: str, k: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2 if stride == 1 else 0,
                      bias=norm == "none"),
            make_norm(norm, c_out),
            nn.LeakyReLU(0.1, inplace=True),
        )


class BlurDown(nn.Module):
    """Anti-aliased 2× downsampling: a fixed binomial [1 2 1]⊗[1 2 1]/16 low-pass per channel,
    sampled with stride 2 (Zhang, "Making convolutional networks shift-invariant again", 2019).

    It replaces the learned 2×2 stride-2 "patchify" of 0.2.0, whose four different weights per
    2×2 cell made the features depend on the pixel's position modulo 2: a 2-pixel texture.
    (B, C, H, W) → (B, C, H/2, W/2) for even H, W.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).clone())
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=self.channels)


class ResizeUp(nn.Sequential):
    """2× upsampling without checkerboard: a 1×1 convolution (channel change at the low
    resolution, where it is cheap), then bilinear resizing (Odena et al., "Deconvolution and
    checkerboard artifacts", Distill 2016). Replaces 2×2 transposed convolutions and
    PixelShuffle, whose four sub-pixel kernels print a 2-pixel pattern on flat regions."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` 3×3 layers (one U-Net level)."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__(ConvNormAct(c_in, c_out, norm), ConvNormAct(c_out, c_out, norm))


class FiLM(nn.Module):
    """Feature-wise affine modulation from a conditioning vector: ``x * (1 + γ) + β``.

    γ and β are bounded (``γ = 0.5·tanh(·)``, ``β = tanh(·)``), so no conditioning value, seen
    or not, can scale a feature by more than 1.5× or flip its sign. The last layer starts at
    zero, so an untrained FiLM is the identity.
    """

    def __init__(self, n_cond: int, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_cond, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), cond (B, n_cond) → (B, C, h, w)."""
        gamma, beta = self.mlp(cond).chunk(2, dim=1)
        gamma, beta = 0.5 * torch.tanh(gamma), torch.tanh(beta)
        return x * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]


class UNetStream(nn.Module):
    """One encoder-decoder stream at half resolution.

    (B, c_in, H, W) → blur-downsample ×2 and a 3×3 stem → ``depth`` poolings (channels ×2
    each) → decoder (bilinear resize + convolutions) with skip connections → (B, base, H/2, W/2).
    H, W multiples of ``2 ** (depth + 1)``.
    """

    def __init__(self, c_in: int, base: int, depth: int, norm: str, n_cond: int = 0, film_hidden: int = 32) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.stem = nn.Sequential(BlurDown(c_in), ConvNormAct(c_in, base, norm))
        self.film = FiLM(n_cond, base, film_hidden) if n_cond else None
        self.enc = nn.ModuleList([DoubleConv(base, chans[0], norm)])
        self.enc.extend(DoubleConv(chans[i - 1], chans[i], norm) for i in range(1, depth + 1))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(ResizeUp(chans[i], chans[i - 1]) for i in range(depth, 0, -1))
        self.dec = nn.ModuleList(DoubleConv(2 * chans[i - 1], chans[i - 1], norm) for i in range(depth, 0, -1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stem(x)
        if self.film is not None:
            h = self.film(h, cond)
        skips = []
        for i, block in enumerate(self.enc):
            h = block(h if i == 0 else self.pool(h))
            skips.append(h)
        for up, block, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            h = block(torch.cat([up(h), skip], dim=1))
        return h


@dataclass
class GeneratorConfig:
    """Hyper-parameters of :class:`VNEGenerator` (stored in checkpoints as a dict)."""

    n_cine_frames: int = N_CINE_FRAMES
    n_ir_images: int = N_IR_IMAGES
    base_channels: int = 16      # channels of each stream's first level (doubling per pooling)
    depth: int = 3               # poolings per stream after the first downsampling (pad multiple 2**(depth+1))
    norm: str = "batch"          # normalisation inside the streams and fusion block (see NORMS; why batch: make_norm)
    fusion_channels: int = 32    # width of the half-resolution fusion block
    head_channels: int = 12      # channels upsampled to full resolution
    film_hidden: int = 32        # hidden width of the TI FiLM MLP
    ablate: tuple[str, ...] = ()  # streams removed for ablation studies: "cine" and/or "ir"

    @classmethod
    def from_dict(cls, d: dict | None) -> "GeneratorConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d or {}) - names
        if unknown:
            raise ValueError(f"unknown generator options {sorted(unknown)}")
        cfg = cls(**(d or {}))
        cfg.ablate = tuple(cfg.ablate)
        bad = set(cfg.ablate) - {"cine", "ir"}
        if bad:
            raise ValueError(f"unknown streams to ablate {sorted(bad)} (known: cine, ir)")
        return cfg


class VNEGenerator(nn.Module):
    """cine, signed IR images + TIs, T1 map (physical units) → virtual LGE (normalised PSIR).

    Fully convolutional; one forward for any H, W that are multiples of :attr:`pad_multiple`.
    The body may be cast to float16 (``.half()``) for a GPU export: the inputs are normalised in
    float32 first and the output is returned as float32.
    """

    def __init__(self, config: GeneratorConfig | dict | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, GeneratorConfig) else GeneratorConfig.from_dict(config)
        self.config = cfg
        b, d, n = cfg.base_channels, cfg.depth, cfg.norm
        self.normalizer = InputNormalizer()
        self.cine_stream = UNetStream(cfg.n_cine_frames, b, d, n)
        self.ir_stream = UNetStream(cfg.n_ir_images, b, d, n, n_cond=cfg.n_ir_images, film_hidden=cfg.film_hidden)
        self.t1_stream = UNetStream(1, b, d, n)
        f = cfg.fusion_channels
        self.fuse_in = ConvNormAct(3 * b, f, n, k=1)
        self.fuse_res = ConvNormAct(f, f, n)
        self.to_full = ResizeUp(f, cfg.head_channels)
        self.head = nn.Sequential(
            nn.Conv2d(cfg.head_channels + 1, cfg.head_channels, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(cfg.head_channels, 1, 3, padding=1),
        )

    @property
    def pad_multiple(self) -> int:
        """H and W must be multiples of this (16 for depth 3)."""
        return 2 ** (self.config.depth + 1)

    def forward(
        self, cine: torch.Tensor, ir: torch.Tensor, ir_ti_ms: torch.Tensor, t1_map_ms: torch.Tensor
    ) -> torch.Tensor:
        """Args (float32, physical units, see :mod:`vne.prepare.contract`):
            cine (B, n_cine_frames, H, W) raw magnitude; ir (B, n_ir_images, H, W) signed IR;
            ir_ti_ms (B, n_ir_images) in ms; t1_map_ms (B, 1, H, W) in ms.

        Returns:
            vne (B, 1, H, W) float32, normalised PSIR (remote myocardium ~0, LV blood ~1).
        """
        cine_n, ir_n, ti_n, t1_n = self.normalizer(cine, ir, ir_ti_ms, t1_map_ms)
        dt = self.head[0].weight.dtype
        cine_n, ir_n, ti_n, t1_n = cine_n.to(dt), ir_n.to(dt), ti_n.to(dt), t1_n.to(dt)
        # An ablated stream sees zeros, in training and in the exported graph alike, so the model
        # keeps the full input contract but cannot use that input.
        if "cine" in self.config.ablate:
            cine_n = torch.zeros_like(cine_n)
        if "ir" in self.config.ablate:
            ir_n, ti_n = torch.zeros_like(ir_n), torch.zeros_like(ti_n)
        feats = torch.cat([self.cine_stream(cine_n), self.ir_stream(ir_n, ti_n), self.t1_stream(t1_n)], dim=1)
        h = self.fuse_in(feats)
        h = h + self.fuse_res(h)
        full = self.to_full(h)
        return self.head(torch.cat([full, t1_n], dim=1)).float()


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------
def discriminator_condition(
    normalizer: InputNormalizer, cine: torch.Tensor, ir: torch.Tensor, ir_ti_ms: torch.Tensor, t1_map_ms: torch.Tensor
) -> torch.Tensor:
    """The native inputs the discriminator is conditioned on, in network units.

    Returns:
        (B, 2 + n_ir, H, W): normalised T1, temporal mean of the normalised cine, normalised IR.
    """
    cine_n, ir_n, _, t1_n = normalizer(cine, ir, ir_ti_ms, t1_map_ms)
    return torch.cat([t1_n, cine_n.mean(dim=1, keepdim=True), ir_n], dim=1)


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4×4 convolutions, ``n_layers`` stride-2 steps (70×70 receptive field
    for 3), instance norm, LeakyReLU(0.2); returns the features of every layer, logits last."""

    def __init__(self, c_in: int, base: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_in, base, 4, 2, 1), nn.LeakyReLU(0.2, True))]
        c = base
        for i in range(1, n_layers + 1):
            c_next = min(base * 2**i, 8 * base)
            stride = 2 if i < n_layers else 1
            layers.append(nn.Sequential(nn.Conv2d(c, c_next, 4, stride, 1), nn.InstanceNorm2d(c_next, affine=True),
                                        nn.LeakyReLU(0.2, True)))
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


@dataclass
class DiscriminatorConfig:
    """Hyper-parameters of :class:`VNEDiscriminator`."""

    n_ir_images: int = N_IR_IMAGES
    base_channels: int = 32
    n_layers: int = 3
    num_scales: int = 1          # >1: multi-scale (pix2pixHD), each scale on a 2× average-pooled input

    @classmethod
    def from_dict(cls, d: dict | None) -> "DiscriminatorConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d or {}) - names
        if unknown:
            raise ValueError(f"unknown discriminator options {sorted(unknown)}")
        return cls(**(d or {}))


class VNEDiscriminator(nn.Module):
    """Conditional (multi-scale) PatchGAN on [native condition, VNE or normalised LGE]."""

    def __init__(self, config: DiscriminatorConfig | dict | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, DiscriminatorConfig) else DiscriminatorConfig.from_dict(config)
        self.config = cfg
        self.normalizer = InputNormalizer()
        c_in = 2 + cfg.n_ir_images + 1
        self.scales = nn.ModuleList(PatchDiscriminator(c_in, cfg.base_channels, cfg.n_layers) for _ in range(cfg.num_scales))

    def condition(self, cine: torch.Tensor, ir: torch.Tensor, ir_ti_ms: torch.Tensor, t1_map_ms: torch.Tensor) -> torch.Tensor:
        """(B, 2 + n_ir, H, W) condition; compute once per batch and pass to :meth:`forward`."""
        return discriminator_condition(self.normalizer, cine, ir, ir_ti_ms, t1_map_ms)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        """condition (B, 2+n_ir, H, W), image (B, 1, H, W) →
        per scale, the list of layer features (logits (B, 1, h', w') last)."""
        x = torch.cat([condition, image.to(condition.dtype)], dim=1)
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out


# --------------------------------------------------------------------------------------------
# Size and cost
# --------------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward, counted by forward hooks on Conv2d,
    ConvTranspose2d and Linear (normalisation, activations and pooling are not counted;
    FLOPs ≈ 2 × MACs)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def convt_hook(m: nn.ConvTranspose2d, inp, out):
        nonlocal total
        total += inp[0].numel() * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(convt_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def generator_from_checkpoint(state: dict) -> VNEGenerator:
    """Rebuild the generator of a checkpoint written by :mod:`training.train` (weights loaded, eval mode)."""
    g = VNEGenerator(GeneratorConfig.from_dict(state["config"].get("model")))
    g.load_state_dict(state["generator"])
    return g.eval()
