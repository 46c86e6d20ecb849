"""The model's input contract: what the ONNX generator expects, and how slices are shaped to it.

The contract travels inside the ONNX file as the metadata property ``vne_contract`` (JSON), so
nothing about the model's inputs is hard-coded in the gadget. Training writes it at export;
the runtime reads it. The array preparation in :func:`model_inputs` is the single place where
slices on the T1 grid become network inputs, used both by the training cache and by the gadget,
so the two cannot drift apart. Intensity normalisation from physical units lives inside the
ONNX graph (see ``training/networks.py``), not here.

Graph inputs (float32):
    cine       (B, n_cine_frames, H, W)  cine magnitude, raw scanner units, on the T1 grid
    ir         (B, n_ir_images, H, W)    IR-weighted images with the recovery sign restored
                                         (negative before the null), sorted by TI
    ir_ti_ms   (B, n_ir_images)          inversion time of each IR image (ms)
    t1_map_ms  (B, 1, H, W)              native T1 (ms)
Graph output:
    vne        (B, 1, H, W)              virtual LGE in normalised PSIR units
                                         (remote myocardium ~ 0, LV blood pool ~ 1)
H and W must be multiples of ``pad_multiple``; :func:`pad_to_multiple` zero-pads on the
bottom/right and :func:`crop_output` removes the padding again.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError
from ..exam.geometry import resample_cycle

CONTRACT_KEY = "vne_contract"
INPUT_NAMES = ("cine", "ir", "ir_ti_ms", "t1_map_ms")
OUTPUT_NAME = "vne"
# ShMOLLI 5(1)1(1)1 nominal TIs, sorted (ms); MOLLI and jittered TIs are matched to these.
SHMOLLI_NOMINAL_TI_MS = (100.0, 180.0, 260.0, 1100.0, 2100.0, 3100.0, 4100.0)
# the paper's inputs: one cardiac cycle of cine resampled to 25 phases, the 7 ShMOLLI IR images
N_CINE_FRAMES = 25
N_IR_IMAGES = len(SHMOLLI_NOMINAL_TI_MS)


@dataclass
class ModelContract:
    """What a generator expects. Serialised as JSON into the ONNX metadata."""

    n_cine_frames: int = N_CINE_FRAMES
    n_ir_images: int = N_IR_IMAGES
    nominal_ti_ms: tuple[float, ...] = SHMOLLI_NOMINAL_TI_MS
    pad_multiple: int = 16
    t1_units: str = "ms"
    ti_units: str = "ms"
    intensity_units: str = "raw scanner units (normalised inside the graph)"
    output_units: str = "normalised PSIR (remote myocardium ~0, LV blood ~1)"
    t1_valid_range_ms: tuple[float, ...] = (100.0, 4000.0)
    model_name: str = "vne"
    model_version: str = "0.0.0"
    training_data: dict = field(default_factory=dict)
    # What the training data spanned (filled at export from the cache; empty/None: not recorded).
    # The runtime guard (vne.runtime.qc) refuses slices outside them.
    trained_field_strengths_t: tuple[float, ...] = ()
    trained_ti_range_ms: tuple[float, ...] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelContract":
        try:
            raw = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise InputError(f"model metadata '{CONTRACT_KEY}' is not valid JSON: {exc}") from None
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        c = cls(**known)
        c.nominal_ti_ms = tuple(float(t) for t in c.nominal_ti_ms)
        c.t1_valid_range_ms = tuple(float(t) for t in c.t1_valid_range_ms)
        c.trained_field_strengths_t = tuple(float(t) for t in c.trained_field_strengths_t or ())
        if c.trained_ti_range_ms is not None:
            c.trained_ti_range_ms = tuple(float(t) for t in c.trained_ti_range_ms)
        if c.n_cine_frames < 1 or c.n_ir_images < 1 or c.pad_multiple < 1:
            raise InputError(f"model contract is invalid: {raw}")
        return c


def select_ir_order(ti_ms, n_ir: int, nominal_ti_ms=SHMOLLI_NOMINAL_TI_MS) -> np.ndarray:
    """Indices of the IR images to feed the model, sorted by TI.

    With exactly ``n_ir`` images they are all used, sorted by TI. With more (MOLLI 5(3)3 has 8),
    the images whose TIs are closest to the sorted nominal TIs are chosen, each used once.

    Raises:
        InputError: fewer images than the model needs.
    """
    ti = np.asarray(ti_ms, float)
    if ti.size < n_ir:
        raise InputError(f"{ti.size} IR images, the model needs {n_ir}")
    order = np.argsort(ti, kind="stable")
    if ti.size == n_ir:
        return order
    nominal = np.sort(np.asarray(nominal_ti_ms, float))[:n_ir]
    chosen: list[int] = []
    for t in nominal:
        left = [k for k in order if k not in chosen]
        chosen.append(min(left, key=lambda k: abs(np.log(ti[k]) - np.log(t))))
    return np.array(sorted(chosen, key=lambda k: ti[k]))


def model_inputs(
    contract: ModelContract,
    t1_map_ms: np.ndarray,
    ir_signed: np.ndarray,
    ir_ti_ms,
    cine_frames: np.ndarray,
    cine_trigger_ms,
    rr_interval_ms: float | None,
) -> dict[str, np.ndarray]:
    """Shape one slice, already on the T1 grid, into the model's inputs (batch of 1, unpadded).

    Args:
        t1_map_ms: (H, W) native T1 in ms.
        ir_signed: (n, H, W) IR images with the sign restored, any order.
        ir_ti_ms: (n,) their TIs.
        cine_frames: (m, H, W) one cardiac cycle.
        cine_trigger_ms: (m,) trigger times.
        rr_interval_ms: RR interval, or None to estimate it from the trigger times.

    Returns:
        dict of the four graph inputs, float32, batch dimension 1.
    """
    t1 = np.asarray(t1_map_ms, np.float32)
    cine = np.asarray(cine_frames, np.float32)
    _check_slice(t1, np.asarray(ir_signed, np.float32), cine)
    return inputs_from_cycle(contract, t1, ir_signed, ir_ti_ms, cine_cycle(contract, cine, cine_trigger_ms, rr_interval_ms))


def cine_cycle(contract: ModelContract, cine_frames: np.ndarray, cine_trigger_ms, rr_interval_ms: float | None) -> np.ndarray:
    """The cine as the model takes it: (n_cine_frames, H, W), equally spaced over one cycle
    (:func:`vne.exam.geometry.resample_cycle`; pixel by pixel, so a window of the result is the
    result of the window)."""
    return resample_cycle(np.asarray(cine_frames, np.float32), np.asarray(cine_trigger_ms, float),
                          rr_interval_ms or float("nan"), contract.n_cine_frames)


def inputs_from_cycle(contract: ModelContract, t1_map_ms: np.ndarray, ir_signed: np.ndarray, ir_ti_ms,
                      cine_cycle_frames: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`model_inputs` from a cine already resampled by :func:`cine_cycle`."""
    t1 = np.asarray(t1_map_ms, np.float32)
    ir = np.asarray(ir_signed, np.float32)
    cine = np.asarray(cine_cycle_frames, np.float32)
    _check_slice(t1, ir, cine)
    if cine.shape[0] != contract.n_cine_frames:
        raise InputError(f"cine cycle has {cine.shape[0]} frames, the model takes {contract.n_cine_frames}")
    sel = select_ir_order(ir_ti_ms, contract.n_ir_images, contract.nominal_ti_ms)
    ti = np.asarray(ir_ti_ms, np.float32)[sel]
    return {
        "cine": cine[None],
        "ir": ir[sel][None],
        "ir_ti_ms": ti[None],
        "t1_map_ms": t1[None, None],
    }


def _check_slice(t1: np.ndarray, ir: np.ndarray, cine: np.ndarray) -> None:
    if t1.ndim != 2:
        raise InputError(f"T1 map must be 2D, got shape {t1.shape}")
    if ir.ndim != 3 or ir.shape[1:] != t1.shape:
        raise InputError(f"IR images {ir.shape} are not on the T1 grid {t1.shape}")
    if cine.ndim != 3 or cine.shape[1:] != t1.shape:
        raise InputError(f"cine frames {cine.shape} are not on the T1 grid {t1.shape}")
    for name, arr in (("T1 map", t1), ("IR images", ir), ("cine frames", cine)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} contain NaN or inf")


def pad_to_multiple(inputs: dict[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """Zero-pad the spatial inputs on the bottom/right to a multiple of ``multiple``.

    Returns:
        (padded inputs, original (H, W)).
    """
    h, w = inputs["t1_map_ms"].shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    out = {}
    for k, v in inputs.items():
        if v.ndim == 4:
            out[k] = np.pad(v, ((0, 0), (0, 0), (0, ph), (0, pw)))
        else:
            out[k] = v
    return out, (h, w)


def crop_output(vne: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Remove the padding of :func:`pad_to_multiple` from a (B, 1, H', W') output."""
    return vne[..., : shape[0], : shape[1]]


def normalise_psir(img: np.ndarray, remote: np.ndarray, blood: np.ndarray) -> np.ndarray:
    """An LGE / VNE image in the model's output units: ``(x - mean_remote) / (mean_blood - mean_remote)``
    (remote myocardium ~0, LV blood ~1), from boolean remote-myocardium and blood-pool masks.

    The one definition of those units: the training target (``training.dataset.normalise_target``,
    when masks are known) and the evaluation (:mod:`vne.evaluation.analysis`) both use it.
    """
    lo, hi = float(img[remote].mean()), float(img[blood].mean())
    return (img - lo) / (hi - lo if abs(hi - lo) > 1e-9 else 1.0)
