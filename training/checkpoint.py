"""Training checkpoints (``latest.pt``, ``best.pt``): loaded without running pickled code.

A checkpoint is a dict of tensors, numbers, strings, the config and the random states (NumPy's
is an array). :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)`` and allows
exactly the few non-tensor types such a dict holds, so a file from elsewhere cannot execute code
when it is exported or resumed from. Anything else is an :class:`vne.errors.InputError` with one
line naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.torch_version import TorchVersion

from vne.errors import InputError

# the non-tensor types in a checkpoint written by training.trainer: NumPy's RNG state (an array)
# and torch.__version__ (checkpoints written before it was stored as a plain str)
SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), TorchVersion]


def load_checkpoint(path, map_location="cpu", require=("generator", "config")) -> dict:
    """The checkpoint dict at ``path``; InputError when it is missing, unreadable or not a VNE
    training checkpoint (a dict with the keys in ``require``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler fails in many ways on a file that is not a checkpoint
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{path} is not a readable VNE training checkpoint ({reason})") from None
    missing = [k for k in require if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path} is not a VNE training checkpoint (no {', '.join(missing)})")
    return state
