"""``vne train``: train the VNE generator on a training cache (needs the ``train`` extras).

    vne train --config smoke                       # a packaged config (training/configs/)
    vne train --config my.json --cache DIR --out runs/x
    vne train --config default --out runs/x --max-minutes 50 --resume   # one session of many
    vne train --config default --set loss.perceptual=none --set schedule.max_steps=5000

torch is imported only when the command runs, so ``vne --help`` works without it. Under
``torchrun --nproc-per-node N -m vne.cli train ...`` it trains with DDP.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

NAME = "train"
HELP = "train the VNE generator on a training cache (needs torch: the train extras)"
MISSING_TORCH = "vne train needs the training extras: pip install -e .[train]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="JSON config file, or a packaged config name (smoke, default)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/latest.pt (a fresh run if there is none)")
    p.add_argument("--cache", metavar="DIR", help="training cache directory (overrides config 'cache')")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (overrides config 'out')")
    p.add_argument("--max-minutes", type=float, metavar="M", help="stop with a checkpoint after M minutes (overrides schedule.max_minutes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, dotted key, JSON value (repeatable), e.g. loss.w_l1=20")


def apply_overrides(config: dict, items: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as JSON, else kept as a string)."""
    from ..errors import InputError

    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {key}: {part} is not a section")
        node[leaf] = value
    return config


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        print(MISSING_TORCH, file=sys.stderr)
        return 2
    from training.config import TrainConfig, load_config
    from training.train import train

    config = load_config(args.config).to_dict()
    if args.cache:
        config["cache"] = args.cache
    if args.out:
        config["out"] = args.out
    if args.max_minutes is not None:
        config["schedule"]["max_minutes"] = args.max_minutes
    apply_overrides(config, args.set)
    config = TrainConfig.from_dict(config, where="--set")  # the file was checked: what is new came from --set
    summary = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("status", "step", "max_steps", "best", "run_dir", "elapsed_min")}))
    return 0
