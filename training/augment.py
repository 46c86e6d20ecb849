"""Domain randomisation on a training batch, in torch: our simulator becomes one sample of many.

The simulator already draws heart rates, schemes, field strengths, resolutions, frame counts,
noise and misregistration over wide ranges (``vne.simulate.case.FAMILIES["A"]``). What it cannot
vary cheaply per step, this module varies on every batch, independently per sample and per
input, with the target and masks moved by the same spatial transform:

* **geometry**: any in-plane rotation (not only multiples of 90°), isotropic scale 0.85-1.2 and
  a shift of a few pixels (bilinear; masks nearest);
* **tissue contrast**: blood-range-T1 pixels made up to 25 % darker or 60 % brighter relative
  to the rest, independently in the cine and the IR images (readout weighting, inflow, T2);
* **intensity**: a smooth multiplicative bias field per input (coil shading), a gamma on the
  magnitudes, Rician noise on the cine and Gaussian noise on the signed IR;
* **resolution**: a Gaussian blur per input (acquired resolution up to ~2.6 mm on a 0.94 mm grid);
* **T1 bias**: the map scaled by 0.94-1.04, blood-range T1 pulled down by up to a further 5 %
  (ShMOLLI reads 2-4 % low in myocardium and 5-8 % in blood), and pixel noise.

Every draw comes from a ``torch.Generator`` seeded with (seed, step), so a resumed run sees the
same batches. The ranges are the training config's ``augment`` section,
:class:`training.config.AugmentConfig` (defaults there; :data:`DEFAULT_AUGMENT` as a dict).
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch.nn import functional as F

from .config import AugmentConfig

DEFAULT_AUGMENT: dict = asdict(AugmentConfig())
"""The ranges, as a dict: :class:`training.config.AugmentConfig` (the ``augment`` section) holds
the defaults."""


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _robust_scale(x: torch.Tensor) -> torch.Tensor:
    num = (x * x).sum(dim=(1, 2, 3), keepdim=True)
    den = x.abs().sum(dim=(1, 2, 3), keepdim=True)
    return (num / (den + 1e-6)).clamp_min(1e-6)


def _bias_field(g: torch.Generator, n: int, h: int, w: int, amplitude: float) -> torch.Tensor:
    """(n, 1, h, w) smooth positive gain fields: exp of a bicubic-upsampled 4×4 random grid."""
    coarse = (torch.rand(n, 1, 4, 4, generator=g) * 2 - 1) * amplitude
    coarse = coarse * torch.rand(n, 1, 1, 1, generator=g)
    return torch.exp(F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, C, H, W) with (B,) sigmas in pixels (0: none)."""
    out = []
    for k in range(x.shape[0]):
        s = float(sigma[k])
        if s < 0.3:
            out.append(x[k:k + 1])
            continue
        r = max(1, int(math.ceil(2.5 * s)))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        ker = torch.exp(-0.5 * (t / s) ** 2)
        ker = ker / ker.sum()
        c = x.shape[1]
        y = F.pad(x[k:k + 1], (r, r, r, r), mode="replicate")
        y = F.conv2d(y, ker.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        y = F.conv2d(y, ker.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        out.append(y)
    return torch.cat(out)


def _affine(g: torch.Generator, b: int, cfg: dict, h: int, w: int) -> torch.Tensor:
    """(b, 2, 3) affine_grid matrices: rotation, isotropic scale and shift (identity for skipped samples)."""
    ang = _uniform(g, b, -1.0, 1.0) * math.radians(cfg["rotation_deg"])
    sc = torch.exp(_uniform(g, b, math.log(cfg["scale"][0]), math.log(cfg["scale"][1])))
    on = (torch.rand(b, generator=g) < cfg["p_geometry"]).float()
    ang, sc = ang * on, 1 + (sc - 1) * on
    tx = _uniform(g, b, -1.0, 1.0) * cfg["shift_px"] * 2 / w * on
    ty = _uniform(g, b, -1.0, 1.0) * cfg["shift_px"] * 2 / h * on
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def augment_batch(batch: dict, step: int, seed: int = 0, config: dict | None = None) -> dict:
    """A randomised copy of a training batch (CPU tensors; see the module docstring).

    Args:
        batch: the dataset's collated batch: cine (B, Nc, H, W), ir (B, Ni, H, W), ir_ti_ms,
            t1_map_ms (B, 1, H, W), lge (B, 1, H, W), masks (B, 4, H, W), ...
        step: the training step (with ``seed``, fixes every draw).
        config: overrides of :data:`DEFAULT_AUGMENT`.

    Returns:
        a new dict; arrays not listed above are passed through.
    """
    cfg = {**DEFAULT_AUGMENT, **(config or {})}
    if not cfg["enabled"]:
        return batch
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    cine, ir, t1 = batch["cine"].float(), batch["ir"].float(), batch["t1_map_ms"].float()
    lge, masks = batch["lge"].float(), batch["masks"].float()
    b, _, h, w = cine.shape

    # geometry: one transform per sample for every spatial array
    theta = _affine(g, b, cfg, h, w)
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    warp = lambda x, mode="bilinear": F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)  # noqa: E731
    cine, ir, t1, lge = warp(cine), warp(ir), warp(t1), warp(lge)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    # resolution: an independent blur per input
    bs = cfg["blur_sigma_px"]
    cine = _blur(cine, _uniform(g, b, 0, bs))
    ir = _blur(ir, _uniform(g, b, 0, bs))
    t1 = _blur(t1, _uniform(g, b, 0, bs * 0.7))

    # tissue contrast: blood (long T1) brighter or darker relative to myocardium in each input,
    # as readout weighting, inflow and T2 vary between sequences and scanners
    blood_w = ((t1 - 1100.0) / 500.0).clamp(0, 1)
    lo_g, hi_g = cfg["blood_gain"]
    cine = cine * (1 + _uniform(g, b, lo_g, hi_g).view(b, 1, 1, 1) * blood_w)
    ir = ir * (1 + _uniform(g, b, lo_g, hi_g).view(b, 1, 1, 1) * blood_w)

    # intensity: bias field, gamma, noise (per input)
    cine = cine.clamp_min(0) * _bias_field(g, b, h, w, cfg["bias_field"])
    ir = ir * _bias_field(g, b, h, w, cfg["bias_field"])
    s_c = _robust_scale(cine)
    gam = torch.exp(_uniform(g, b, math.log(cfg["gamma"][0]), math.log(cfg["gamma"][1]))).view(b, 1, 1, 1)
    cine = s_c * (cine / s_c) ** gam
    s_i = _robust_scale(ir)
    gam_ir = torch.sqrt(torch.exp(_uniform(g, b, math.log(cfg["gamma"][0]), math.log(cfg["gamma"][1])))).view(b, 1, 1, 1)
    ir = torch.sign(ir) * s_i * (ir.abs() / s_i) ** gam_ir
    sig_c = _uniform(g, b, 0, cfg["cine_noise"]).view(b, 1, 1, 1) * s_c
    # 5 independent noise frames tiled over the cycle: cheaper than one per frame, and the
    # network cannot tell (the frames move and are seen through different weights)
    nc = cine.shape[1]
    reps = -(-nc // 5)
    n1 = torch.randn(b, 5, h, w, generator=g).repeat(1, reps, 1, 1)[:, :nc] * sig_c
    n2 = torch.randn(b, 5, h, w, generator=g).repeat(1, reps, 1, 1)[:, :nc] * sig_c
    cine = torch.sqrt((cine + n1) ** 2 + n2 ** 2)
    sig_i = _uniform(g, b, 0, cfg["ir_noise"]).view(b, 1, 1, 1) * s_i
    ir = ir + torch.randn(ir.shape, generator=g) * sig_i

    # T1 bias: global scale, extra pull-down of blood-range T1, pixel noise; air stays 0
    body = t1 > 50
    scale = _uniform(g, b, *cfg["t1_scale"]).view(b, 1, 1, 1)
    pull = _uniform(g, b, 0, cfg["t1_blood_pull"]).view(b, 1, 1, 1)
    blood_w = ((t1 - 1100.0) / 500.0).clamp(0, 1)
    t1n = t1 * scale * (1 - pull * blood_w) + torch.randn(t1.shape, generator=g) * _uniform(g, b, 0, cfg["t1_noise_ms"]).view(b, 1, 1, 1)
    t1 = torch.where(body, t1n.clamp_min(0), torch.zeros_like(t1))

    out = dict(batch)
    out.update(cine=cine.contiguous(), ir=ir.contiguous(), t1_map_ms=t1.contiguous(), lge=lge.contiguous(),
               masks=masks.contiguous())
    return out
