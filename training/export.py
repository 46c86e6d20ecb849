"""ONNX export of a trained generator, with the model contract in its metadata.

``export(checkpoint, out_path)`` writes one self-contained ``.onnx`` file:

* graph inputs ``cine, ir, ir_ti_ms, t1_map_ms`` and output ``vne`` as in :mod:`vne.prepare.contract`,
  float32, with a dynamic batch and dynamic H, W (multiples of the model's pad multiple);
* opset 18, the input normalisation from physical units inside the graph;
* ``metadata_props``: ``vne_contract`` = :meth:`vne.prepare.contract.ModelContract.to_json` (model name
  and version, training-data summary from the checkpoint) and ``vne_producer`` (JSON: versions
  of vne / torch / onnx, exporter, checkpoint, step, time);
* then a parity check: torch and ONNX Runtime on the same realistic synthetic slice
  (:func:`example_inputs`) at a batch and size other than the traced ones; the max abs
  difference is printed and returned.

``fp16=True`` stores the body in float16 (for GPU inference): inputs and output stay float32
and the input normalisation runs in float32 (raw intensities squared overflow float16).

Exporters: ``"dynamo"`` (torch.export based, the current torch default; ~40 s on 2 CPU cores
because of the symbolic shapes) or ``"torchscript"`` (the legacy tracer, ~1 s, deprecated
by torch). Both give the same graph here (parity checked the same way).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vne import __version__ as vne_version
from vne.prepare.contract import CONTRACT_KEY, INPUT_NAMES, OUTPUT_NAME, SHMOLLI_NOMINAL_TI_MS, ModelContract

from .checkpoint import load_checkpoint
from .networks import VNEGenerator, generator_from_checkpoint

OPSET = 18
PRODUCER_KEY = "vne_producer"
EXPORTERS = ("dynamo", "torchscript")


def example_inputs(batch: int = 1, h: int = 288, w: int = 384, seed: int = 0, n_cine: int = 25,
                   ti_ms=SHMOLLI_NOMINAL_TI_MS) -> dict[str, np.ndarray]:
    """A synthetic short-axis slice in physical units, for parity checks and benchmarks.

    Body ellipse (tissue T1 800 ms) in air, LV myocardium ring (1000 ms) around a blood pool
    (1600 ms) that contracts over the cine cycle; bSSFP-like cine magnitudes (~0–1000),
    Look-Locker IR ``A·(1 − 1.9·exp(−0.9·TI/T1))`` with the sign kept, Rician-ish noise.

    Returns:
        dict of the four graph inputs, float32: cine (B, n_cine, h, w), ir (B, n_ir, h, w),
        ir_ti_ms (B, n_ir), t1_map_ms (B, 1, h, w).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = {k: [] for k in INPUT_NAMES}
    ti = np.asarray(ti_ms, np.float32)
    for _ in range(batch):
        cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
        body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.48 * w)) ** 2 < 1
        r = np.hypot(yy - cy, xx - cx)
        r_blood, wall = 0.09 * min(h, w), 0.05 * min(h, w)
        t1 = np.where(body, 800.0, 0.0)
        t1 = np.where(r < r_blood + wall, 1000.0, t1)
        t1 = np.where(r < r_blood, 1600.0, t1) + rng.normal(0, 30, (h, w)) * body
        cine = []
        for k in range(n_cine):
            rb = r_blood * (1 - 0.3 * np.sin(np.pi * k / n_cine))
            img = np.where(body, 600.0, 5.0)
            img = np.where(r < rb + wall * r_blood / rb, 450.0, img)
            img = np.where(r < rb, 1000.0, img)
            cine.append(np.abs(img + rng.normal(0, 15, (h, w))))
        t1_safe = np.maximum(t1, 50.0)
        amp = np.where(body, 150.0, 3.0)
        ti_b = ti + rng.normal(0, 5, ti.shape).astype(np.float32)
        ir = [amp * (1 - 1.9 * np.exp(-0.9 * t / t1_safe)) + rng.normal(0, 3, (h, w)) for t in ti_b]
        out["cine"].append(np.stack(cine))
        out["ir"].append(np.stack(ir))
        out["ir_ti_ms"].append(ti_b)
        out["t1_map_ms"].append(t1[None])
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


def _contract(state: dict, generator: VNEGenerator, model_name: str | None, model_version: str | None) -> ModelContract:
    cfg = state["config"]
    training_data = {
        "data": state.get("data_summary", {}),
        "steps": int(state.get("step", 0)),
        "best": state.get("best"),
        "config": cfg.get("name"),
        "losses": {k: cfg.get("loss", {}).get(k) for k in ("adversarial", "perceptual", "w_adv", "w_l1", "w_ssim", "w_perc")},
    }
    data = state.get("data_summary", {})
    ti_range = data.get("ti_range_ms")
    return ModelContract(
        trained_field_strengths_t=tuple(data.get("field_strengths_t") or ()),
        # a margin of 10 % beyond the longest TI seen: jitter, not a new heart-rate regime
        trained_ti_range_ms=(0.0, round(1.1 * ti_range[1], 1)) if ti_range else None,
        n_cine_frames=generator.config.n_cine_frames,
        n_ir_images=generator.config.n_ir_images,
        pad_multiple=generator.pad_multiple,
        model_name=model_name or cfg.get("model_name", "vne"),
        model_version=model_version or cfg.get("model_version", "0.0.0"),
        training_data=training_data,
    )


def write_onnx(generator: VNEGenerator, path: Path, exporter: str = "dynamo") -> None:
    """Export ``generator`` (any dtype) to ``path`` with dynamic batch and H, W; no metadata."""
    sample = example_inputs(batch=2, h=4 * generator.pad_multiple, w=6 * generator.pad_multiple, seed=1,
                            n_cine=generator.config.n_cine_frames)
    args = tuple(torch.from_numpy(sample[k]) for k in INPUT_NAMES)
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export",
                                                  "torch.onnx._internal.exporter._registration")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            _export(generator, args, path, exporter)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)


def _export(generator: VNEGenerator, args: tuple, path: Path, exporter: str) -> None:
    names = {"input_names": list(INPUT_NAMES), "output_names": [OUTPUT_NAME], "opset_version": OPSET}
    if exporter == "dynamo":
        m = generator.pad_multiple
        batch = torch.export.Dim("batch", min=1, max=1024)
        spatial = {0: batch, 2: m * torch.export.Dim("h_blocks", min=1, max=4096 // m),
                   3: m * torch.export.Dim("w_blocks", min=1, max=4096 // m)}
        dynamic = {"cine": spatial, "ir": spatial, "ir_ti_ms": {0: batch}, "t1_map_ms": spatial}
        torch.onnx.export(generator, args, str(path), dynamo=True, dynamic_shapes=dynamic, external_data=False,
                          verbose=False, **names)
    elif exporter == "torchscript":
        axes = {k: {0: "batch", 2: "height", 3: "width"} for k in ("cine", "ir", "t1_map_ms", OUTPUT_NAME)}
        axes["ir_ti_ms"] = {0: "batch"}
        torch.onnx.export(generator, args, str(path), dynamo=False, dynamic_axes=axes, **names)
    else:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def parity_check(generator: VNEGenerator, onnx_path: Path, batch: int = 2, h: int = 96, w: int = 128, seed: int = 2) -> float:
    """Max abs difference between torch (float32 eager) and ONNX Runtime outputs on
    :func:`example_inputs` (CUDA provider when available, else CPU)."""
    import onnxruntime as ort

    feed = example_inputs(batch, h, w, seed, n_cine=generator.config.n_cine_frames)
    ref_model = generator.float().eval()
    with torch.no_grad():
        ref = ref_model(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES)).numpy()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    got = sess.run([OUTPUT_NAME], feed)[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} != torch {ref.shape}")
    return float(np.abs(got - ref).max())


def export(checkpoint: str | Path, out_path: str | Path, fp16: bool = False, *, exporter: str = "dynamo",
           model_name: str | None = None, model_version: str | None = None, check: bool = True) -> float:
    """Export a training checkpoint's generator to ONNX (see the module docstring).

    Args:
        checkpoint: ``best.pt`` / ``latest.pt`` written by :func:`training.train.train`.
        out_path: the ``.onnx`` file to write (parent directories are created).
        fp16: float16 body (GPU inference); float32 inputs and output.
        exporter: "dynamo" or "torchscript".
        model_name, model_version: override the config's ``model_name`` / ``model_version``.
        check: run the ONNX Runtime parity check.

    Returns:
        max abs difference torch vs ONNX Runtime (NaN when ``check`` is False).
    """
    import onnx

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    state = load_checkpoint(checkpoint)
    generator = generator_from_checkpoint(state)
    contract = _contract(state, generator, model_name, model_version)
    body = VNEGenerator(generator.config).eval()
    body.load_state_dict(generator.state_dict())
    if fp16:
        body = body.half()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.onnx")
    write_onnx(body, tmp, exporter)

    model = onnx.load(str(tmp))
    tmp.unlink()
    producer = {
        "vne": vne_version, "torch": torch.__version__, "onnx": onnx.__version__, "exporter": exporter,
        "opset": OPSET, "fp16": fp16, "checkpoint": checkpoint.name, "step": int(state.get("step", 0)),
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    del model.metadata_props[:]
    for key, value in ((CONTRACT_KEY, contract.to_json()), (PRODUCER_KEY, json.dumps(producer, sort_keys=True))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"VNE generator {contract.model_name} {contract.model_version}: virtual LGE from cine, IR images and T1 map"
    model.model_version = int(state.get("step", 0))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))

    if not check:
        return float("nan")
    diff = parity_check(generator, out_path)
    print(f"parity: max |torch - onnxruntime| = {diff:.3g} ({'fp16' if fp16 else 'fp32'} export, batch 2, 96x128)")
    return diff
