"""``vne export``: a training checkpoint → ONNX model with the ``vne_contract`` metadata.

    vne export runs/x/best.pt --out models/vne.onnx [--fp16] [--name vne-sim --version 0.2.0]

Prints the torch-vs-ONNX-Runtime parity (max abs difference). Needs the ``train`` extras.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError

NAME = "export"
HELP = "export a training checkpoint to ONNX with the model contract (needs torch: the train extras)"
MISSING_TORCH = "vne export needs the training extras: pip install -e .[train]"
PARITY_LIMIT = 1e-3
PARITY_LIMIT_FP16 = 5e-2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint written by vne train (best.pt or latest.pt)")
    p.add_argument("--out", required=True, metavar="FILE", help="ONNX file to write, e.g. models/vne.onnx")
    p.add_argument("--fp16", action="store_true", help="float16 weights and activations (GPU); float32 inputs/output")
    p.add_argument("--name", help="model name in the contract (default: config model_name)")
    p.add_argument("--version", dest="model_version", help="model version in the contract (default: config model_version)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch ONNX exporter (dynamo: current default, slower to export)")


def run(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_file():
        raise InputError(f"checkpoint {args.checkpoint} does not exist")
    if Path(args.out).suffix.lower() != ".onnx":
        raise InputError(f"--out {args.out}: expected an .onnx file")
    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ModuleNotFoundError:
        print(MISSING_TORCH, file=sys.stderr)
        return 2
    from training.export import export

    diff = export(args.checkpoint, args.out, fp16=args.fp16, exporter=args.exporter,
                  model_name=args.name, model_version=args.model_version)
    limit = PARITY_LIMIT_FP16 if args.fp16 else PARITY_LIMIT
    print(f"wrote {args.out}")
    if not diff <= limit:
        print(f"vne export: error: parity {diff:.3g} exceeds {limit:g}", file=sys.stderr)
        return 1
    return 0
