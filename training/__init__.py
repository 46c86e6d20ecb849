"""Training of the VNE generator (torch): networks, losses, dataset, train loop and ONNX export.

Modules (one idea each):
    networks   the 3-stream U-Net generator (input normalisation inside), the PatchGAN
               discriminator, parameter/FLOP counting
    losses     adversarial (LSGAN / hinge), L1, SSIM, perceptual (discriminator feature matching
               or VGG16)
    dataset    a torch Dataset over the training cache, patient-level splits, augmentation,
               target normalisation
    train      ``train(config, resume)``: the loop, checkpoints, logs, figures, DDP
    export     ``export(checkpoint, out_path)``: ONNX with the ``vne_contract`` metadata and a
               torch-vs-ONNX-Runtime parity check

This package imports torch, the runtime package :mod:`vne` never does. Importing ``training``
itself is cheap (no torch); the submodules import torch.
"""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
