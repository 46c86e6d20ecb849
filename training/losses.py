"""Losses for the conditional GAN: adversarial, L1, SSIM and a perceptual term.

Generator objective (weights from the config's ``loss`` section)::

    L_G = w_adv·adv(D(fake)) + w_l1·L1_w(fake, lge) + w_grad·∇L1_w(fake, lge)
          + w_ssim·(1 − SSIM) + w_perc·perceptual

* ``L1_w`` weights pixels inside the heart (myocardium ∪ blood pool ∪ lesion) by
  ``1 + heart_weight`` when the slice has masks, 1 elsewhere.
* ``∇L1_w`` is the same weighted L1 on the images' finite differences along x and y. L1 alone
  lets a blurred blood/myocardium border cost little; a border one pixel too wide reads as
  lesion at the FWHM threshold (50 % of the remote-to-blood range). Added for vne-sim-0.4.0; it
  did not remove the border excess on the lesion-free external exams (0.3.0: 2.3–2.8 %, 0.4.0:
  2.5–3.0 %; models/README.md).
* ``perceptual`` (config ``loss.perceptual``):
    - ``"fm"`` (default): discriminator feature matching (pix2pixHD): L1 between the
      discriminator's intermediate features of (condition, VNE) and (condition, LGE). It needs
      no pretrained weights, which cannot be downloaded here.
    - ``"vgg"``: the paper's VGG perceptual loss, L1 between VGG16 features (relu1_2, relu2_2,
      relu3_3, relu4_3) of VNE and LGE; needs ``loss.vgg_weights`` (a torchvision VGG16
      ``state_dict`` file; torchvision itself is not needed, :class:`VGG16Features` builds the
      layers).
    - ``"none"``: no perceptual term (ablation).
  Switching this flag and comparing the validation metrics of the runs (``val_log.csv``) is
  how the default is justified (docs/training.md).

All image tensors are (B, 1, H, W) in normalised PSIR units (remote myocardium 0, blood 1).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vne.evaluation.stats import SSIM_SIGMA_PX, ssim_constants, ssim_map

ADVERSARIAL_MODES = ("lsgan", "hinge")
PERCEPTUAL_MODES = ("fm", "vgg", "none")


# --------------------------------------------------------------------------------------------
# Adversarial
# --------------------------------------------------------------------------------------------
def _logits(outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The last feature (logits) of each discriminator scale."""
    return [feats[-1].float() for feats in outputs]


def d_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]], mode: str = "lsgan") -> torch.Tensor:
    """Discriminator loss, averaged over scales.

    lsgan: ``(D(real) − 1)² + D(fake)²``; hinge: ``relu(1 − D(real)) + relu(1 + D(fake))``.
    """
    terms = []
    for r, f in zip(_logits(real), _logits(fake)):
        if mode == "lsgan":
            terms.append(((r - 1) ** 2).mean() + (f**2).mean())
        elif mode == "hinge":
            terms.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
        else:
            raise ValueError(f"unknown adversarial mode {mode!r}, expected one of {ADVERSARIAL_MODES}")
    return 0.5 * torch.stack(terms).mean()


def g_adv_loss(fake: list[list[torch.Tensor]], mode: str = "lsgan") -> torch.Tensor:
    """Generator adversarial loss: lsgan ``(D(fake) − 1)²``, hinge ``−D(fake)``."""
    terms = []
    for f in _logits(fake):
        if mode == "lsgan":
            terms.append(((f - 1) ** 2).mean())
        elif mode == "hinge":
            terms.append(-f.mean())
        else:
            raise ValueError(f"unknown adversarial mode {mode!r}, expected one of {ADVERSARIAL_MODES}")
    return torch.stack(terms).mean()


def feature_matching_loss(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD feature matching: mean over scales and layers (logits excluded) of
    ``L1(feat_fake, feat_real.detach())``."""
    terms = []
    for ff, fr in zip(fake, real):
        for a, b in zip(ff[:-1], fr[:-1]):
            terms.append(F.l1_loss(a.float(), b.detach().float()))
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------
# Pixel losses
# --------------------------------------------------------------------------------------------
def heart_weight_map(masks: torch.Tensor, has_masks: torch.Tensor, heart_weight: float) -> torch.Tensor:
    """Per-pixel L1 weights.

    Args:
        masks: (B, 4, H, W) myocardium, blood_pool, remote, lesion (0/1).
        has_masks: (B,) bool; slices without masks get uniform weight.
        heart_weight: extra weight inside myocardium ∪ blood pool ∪ lesion.

    Returns:
        (B, 1, H, W) weights ≥ 1.
    """
    heart = (masks[:, 0] + masks[:, 1] + masks[:, 3]).clamp(max=1).unsqueeze(1).float()
    heart = heart * has_masks.float().view(-1, 1, 1, 1)
    return 1.0 + heart_weight * heart


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(w·|pred − target|) / sum(w)`` (plain mean L1 when ``weight`` is None)."""
    diff = (pred.float() - target.float()).abs()
    if weight is None:
        return diff.mean()
    weight = weight.expand_as(diff)
    return (weight * diff).sum() / weight.sum().clamp_min(1e-8)


def gradient_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted L1 between the forward differences of ``pred`` and ``target`` (x and y, averaged).

    Args:
        pred, target: (B, 1, H, W); weight: (B, 1, H, W) or None. Each difference takes the
        larger weight of the two pixels it joins, so a border between heart and background
        counts as heart.
    """
    def diffs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (px, py), (tx, ty) = diffs(pred), diffs(target)
    if weight is None:
        return 0.5 * (weighted_l1(px, tx) + weighted_l1(py, ty))
    weight = weight.expand_as(pred).float()
    wx = torch.maximum(weight[..., :, 1:], weight[..., :, :-1])
    wy = torch.maximum(weight[..., 1:, :], weight[..., :-1, :])
    return 0.5 * (weighted_l1(px, tx, wx) + weighted_l1(py, ty, wy))


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = SSIM_SIGMA_PX,
         reduce: bool = True) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), Gaussian window, valid region only: the formula
    and constants of :func:`vne.evaluation.stats.ssim_map`, with the training convention there.

    Args:
        pred, target: (B, 1, H, W), H, W ≥ ``window``.
        data_range: the dynamic range L in ``C1 = (0.01 L)², C2 = (0.03 L)²``; 2 suits
            normalised PSIR (remote 0, blood 1, scar up to ~1.5, air ~ −0.5).
        reduce: mean over everything (scalar) or per sample (B,).
    """
    pred, target = pred.float(), target.float()
    w = _gaussian_window(window, sigma, pred.device, pred.dtype)
    c1, c2 = ssim_constants(data_range)
    mu_x, mu_y = F.conv2d(pred, w), F.conv2d(target, w)
    sxx = F.conv2d(pred * pred, w) - mu_x**2
    syy = F.conv2d(target * target, w) - mu_y**2
    sxy = F.conv2d(pred * target, w) - mu_x * mu_y
    s = ssim_map(mu_x, mu_y, sxx, syy, sxy, c1, c2)
    return s.mean() if reduce else s.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# VGG16 perceptual
# --------------------------------------------------------------------------------------------
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (3, 8, 15, 22)  # indices in ``features`` after relu1_2, relu2_2, relu3_3, relu4_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` (same layer indices, so its state dict loads), frozen,
    truncated after relu4_3. Input: (B, 1, H, W) normalised PSIR."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers[: VGG16_TAPS[-1] + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | Path) -> "VGG16Features":
        """Load a torchvision VGG16 state dict (``features.N.weight`` keys; classifier ignored;
        a bare ``features`` state dict with ``N.weight`` keys works too)."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or dict(state)
        net = cls()
        wanted = net.features.state_dict().keys()
        missing = [k for k in wanted if k not in feats]
        if missing:
            raise ValueError(f"{path}: not a VGG16 state dict (missing {missing[:3]}...)")
        net.features.load_state_dict({k: feats[k] for k in wanted})
        return net.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # normalised PSIR (≈ −0.5 … 1.5) → [0, 1]-ish grey → ImageNet statistics, 3 channels
        x = ((x.float() + 0.5) / 2.0).clamp(0, 1).expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out


def vgg_loss(vgg: VGG16Features, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the tapped layers of L1(VGG(pred), VGG(target))."""
    fp = vgg(pred)
    with torch.no_grad():
        ft = vgg(target)
    return torch.stack([F.l1_loss(a, b) for a, b in zip(fp, ft)]).mean()


# --------------------------------------------------------------------------------------------
# The generator objective
# --------------------------------------------------------------------------------------------
class GeneratorObjective(nn.Module):
    """Weighted sum of the generator terms; returns the total and each term (for logging).

    Config keys (``loss`` section): adversarial, w_adv, w_l1, w_grad, w_ssim, w_perc, perceptual,
    vgg_weights, heart_weight, ssim_data_range.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.mode = cfg.get("adversarial", "lsgan")
        if self.mode not in ADVERSARIAL_MODES:
            raise ValueError(f"loss.adversarial must be one of {ADVERSARIAL_MODES}, got {self.mode!r}")
        self.perceptual = cfg.get("perceptual", "fm")
        if self.perceptual not in PERCEPTUAL_MODES:
            raise ValueError(f"loss.perceptual must be one of {PERCEPTUAL_MODES}, got {self.perceptual!r}")
        self.vgg: VGG16Features | None = None
        if self.perceptual == "vgg":
            if not cfg.get("vgg_weights"):
                raise ValueError("loss.perceptual = 'vgg' needs loss.vgg_weights (a torchvision VGG16 state dict file)")
            self.vgg = VGG16Features.from_file(cfg["vgg_weights"])

    def forward(
        self,
        fake: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        d_fake: list[list[torch.Tensor]] | None,
        d_real: list[list[torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Args:
            fake, target: (B, 1, H, W); weight: (B, 1, H, W) L1 weights or None;
            d_fake: discriminator outputs on (condition, fake) with gradients to the generator,
            d_real: on (condition, target), no gradients needed; both None while the GAN is off.
        """
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        terms["l1"] = weighted_l1(fake, target, weight)
        if c.get("w_grad", 0):
            terms["grad"] = gradient_l1(fake, target, weight)
        if c.get("w_ssim", 0):
            terms["ssim"] = 1.0 - ssim(fake, target, c.get("ssim_data_range", 2.0))
        if d_fake is not None:
            terms["adv"] = g_adv_loss(d_fake, self.mode)
            if self.perceptual == "fm":
                terms["perc"] = feature_matching_loss(d_fake, d_real)
        if self.perceptual == "vgg":
            terms["perc"] = vgg_loss(self.vgg, fake, target)
        weights = {"l1": c.get("w_l1", 10.0), "grad": c.get("w_grad", 0.0), "ssim": c.get("w_ssim", 1.0),
                   "adv": c.get("w_adv", 1.0), "perc": c.get("w_perc", 10.0)}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {f"g_{k}": float(v.detach()) for k, v in terms.items()}
