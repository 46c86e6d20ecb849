"""A torch Dataset over the training cache (:mod:`vne.io.training_data`): patient-level splits,
consistent spatial augmentation of every input, and the normalised LGE target.

Target normalisation (the contract's output units: remote myocardium ~0, LV blood pool ~1),
computed on the whole cached window, before any crop, so a crop never changes it:

* ``"masks"``: the slice has masks (``has_masks``, the simulator): ``(lge − mean_remote) /
  (mean_blood − mean_remote)``. This also undoes a mis-set TI or a scaled PSIR, which is
  what the contract's units are for.
* ``"percentiles"``: no masks (real DICOM), or masks whose blood–remote contrast is below
  ``min_contrast`` of the image's 1–99 % spread (a badly nulled artefact slice): the robust
  percentiles ``p_lo → 0, p_hi → 1`` of the window. The default (50, 90) was calibrated on
  simulator slices with masks: on a heart-centred window the median lies at the remote
  myocardium level and the 90th percentile at the blood level (see
  :func:`calibrate_percentiles`, which prints the table for any cache with masks; rerun it on
  real data once some slices are contoured).

Splits are by ``patient_id`` (a patient never spans two splits), deterministic for a seed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vne.io.training_data import MASK_KEYS, read_index, read_slice
from vne.prepare.contract import normalise_psir

SPLITS = ("train", "val", "test")
TARGET_KEYS = ("lge", "lge_clean")
DEFAULT_PERCENTILES = (50.0, 90.0)
SPATIAL_KEYS = ("cine", "ir", "t1_map_ms", "lge", "masks")


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def split_patients(patient_ids: Iterable[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[str]]:
    """Assign patients to train/val/test.

    The unique ids are sorted, shuffled with ``seed`` and cut at ``round(n · fraction)``
    (val and test get at least one patient each when their fraction is > 0 and there are at
    least 3 patients). Deterministic: same ids and seed → same split, whatever their order.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, each sorted.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be 3 non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    f_val, f_test = fractions[1] / total, fractions[2] / total
    ids = sorted(set(patient_ids))
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(ids)
    n_val = int(round(n * f_val))
    n_test = int(round(n * f_test))
    if n >= 3:
        n_val = max(n_val, 1 if f_val > 0 else 0)
        n_test = max(n_test, 1 if f_test > 0 else 0)
        while n_val + n_test > n - 1:  # keep at least one training patient
            if n_test >= n_val and n_test > 0:
                n_test -= 1
            else:
                n_val -= 1
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }


def usable_entries(entries: list[dict], skip_qc_failures: bool = True) -> tuple[list[dict], list[dict]]:
    """(kept, left out): with ``skip_qc_failures``, entries the runtime quality guard would
    refuse (``qc_passed`` false, written by the cache writers with :func:`vne.runtime.qc.check_inputs`)
    are left out, so training and serving share one set of input thresholds. Entries without
    the field (older caches, real DICOM) are kept."""
    if not skip_qc_failures:
        return list(entries), []
    return ([e for e in entries if e.get("qc_passed") is not False],
            [e for e in entries if e.get("qc_passed") is False])


def split_entries(entries: list[dict], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[dict]]:
    """Cache index entries grouped by :func:`split_patients` (entry order kept)."""
    patients = split_patients((e["patient_id"] for e in entries), fractions, seed)
    where = {p: s for s, ps in patients.items() for p in ps}
    return {s: [e for e in entries if where[e["patient_id"]] == s] for s in SPLITS}


def data_summary(cache_dir: Path, index: dict, splits: dict[str, list[dict]], target_key: str) -> dict:
    """A JSON-able description of the training data (goes into checkpoints and the ONNX contract)."""
    entries = [e for s in SPLITS for e in splits[s]]
    provenance = {k: v for k, v in index.items() if k not in ("entries", "version")}
    return {
        "cache": str(cache_dir),
        "cache_version": index.get("version"),
        "target": target_key,
        "n_slices": {s: len(splits[s]) for s in SPLITS},
        "n_patients": {s: len({e["patient_id"] for e in splits[s]}) for s in SPLITS},
        "sources": dict(Counter(str(e.get("source", "unknown")) for e in entries)),
        "field_strength_t": dict(Counter(str(e.get("field_strength_t", "unknown")) for e in entries)),
        "with_masks": sum(bool(e.get("has_masks")) for e in entries),
        "provenance": provenance,
        **trained_ranges(cache_dir, splits["train"]),
    }


def trained_ranges(cache_dir: Path, entries: list[dict]) -> dict:
    """What the training slices span, for the model contract and the runtime guard (vne.runtime.qc):
    field strengths (T), the TI range (ms) and the heart-rate range (bpm, where recorded)."""
    fields_t = sorted({float(e["field_strength_t"]) for e in entries if e.get("field_strength_t") not in (None, "unknown")})
    ti_lo, ti_hi = np.inf, -np.inf
    for e in entries:
        try:
            with np.load(Path(cache_dir) / f"{e['slice_id']}.npz") as z:
                ti = z["ir_ti_ms"]
        except (OSError, KeyError, ValueError):
            continue
        if ti.size:
            ti_lo, ti_hi = min(ti_lo, float(ti.min())), max(ti_hi, float(ti.max()))
    hr = [float(e["heart_rate_bpm"]) for e in entries if e.get("heart_rate_bpm")]
    return {
        "field_strengths_t": fields_t,
        "ti_range_ms": [round(ti_lo, 1), round(ti_hi, 1)] if np.isfinite(ti_lo) else None,
        "heart_rate_bpm": [round(min(hr), 1), round(max(hr), 1)] if hr else None,
    }


# --------------------------------------------------------------------------------------------
# Target normalisation
# --------------------------------------------------------------------------------------------
def normalise_target(
    lge: np.ndarray,
    remote: np.ndarray | None,
    blood_pool: np.ndarray | None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    min_contrast: float = 0.2,
) -> tuple[np.ndarray, str]:
    """PSIR LGE (scanner units) → normalised PSIR (remote ~0, blood ~1); see the module docstring.

    Args:
        lge: (H, W) PSIR image.
        remote, blood_pool: (H, W) masks, or None when unknown.
        percentiles: (p_lo, p_hi) of the no-mask fallback.
        min_contrast: masks are used only if ``mean_blood − mean_remote`` exceeds this fraction
            of the 1–99 % spread of the image.

    Returns:
        ((H, W) float32 normalised image, "masks" or "percentiles").
    """
    lge = np.asarray(lge, np.float32)
    p1, p99 = np.percentile(lge, (1, 99))
    spread = max(float(p99 - p1), 1e-6)
    if remote is not None and blood_pool is not None and remote.any() and blood_pool.any():
        r = float(lge[remote.astype(bool)].mean())
        b = float(lge[blood_pool.astype(bool)].mean())
        if b - r > min_contrast * spread:
            return normalise_psir(lge, remote.astype(bool), blood_pool.astype(bool)), "masks"
    lo, hi = np.percentile(lge, percentiles)
    return (lge - lo) / max(float(hi - lo), 1e-6 * spread, 1e-6), "percentiles"


def calibrate_percentiles(cache_dir: Path, target_key: str = "lge", qs: Sequence[float] = (5, 10, 25, 40, 50, 60, 75, 85, 90, 95, 99)) -> dict:
    """Where the remote and blood levels sit among the percentiles of each masked slice.

    Returns:
        {"q": qs, "remote": median over slices of (p_q − remote)/(blood − remote),
         "blood": same for (p_q − blood), "remote_iqr", "blood_iqr": their interquartile ranges,
         "n": slices used}. The best ``p_lo`` has "remote" ≈ 0 with a small IQR, the best
        ``p_hi`` has "blood" ≈ 0.
    """
    cache_dir = Path(cache_dir)
    rows_r, rows_b = [], []
    for e in read_index(cache_dir)["entries"]:
        if not e.get("has_masks"):
            continue
        z = read_slice(cache_dir, e["slice_id"])
        x, m, b = z[target_key], z["remote"].astype(bool), z["blood_pool"].astype(bool)
        if not (m.any() and b.any()):
            continue
        r, bl = float(x[m].mean()), float(x[b].mean())
        if bl - r <= 0.2 * float(np.subtract(*np.percentile(x, (99, 1)))):
            continue
        p = np.percentile(x, qs)
        rows_r.append((p - r) / (bl - r))
        rows_b.append((p - bl) / (bl - r))
    if not rows_r:
        return {"q": list(qs), "remote": [], "blood": [], "remote_iqr": [], "blood_iqr": [], "n": 0}

    def iqr(rows: list) -> list[float]:
        return np.subtract(*np.percentile(rows, (75, 25), axis=0)).round(3).tolist()

    return {"q": list(qs), "remote": np.median(rows_r, 0).round(3).tolist(), "blood": np.median(rows_b, 0).round(3).tolist(),
            "remote_iqr": iqr(rows_r), "blood_iqr": iqr(rows_b), "n": len(rows_r)}


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
class VNEDataset(Dataset):
    """Slices of a training cache as network inputs and normalised targets.

    Each item (a dict; shapes for a crop of size h = w = ``crop``, else the cached window)::

        cine        (n_cine, h, w) float32  raw units
        ir          (n_ir, h, w)   float32  signed, raw units
        ir_ti_ms    (n_ir,)        float32
        t1_map_ms   (1, h, w)      float32
        lge         (1, h, w)      float32  normalised target (``target_key``)
        masks       (4, h, w)      float32  myocardium, blood_pool, remote, lesion (0/1)
        has_masks   ()             bool
        target_norm str            "masks" or "percentiles"
        slice_id    str

    Augmentation (``augment=True``): a uniformly placed random crop, random horizontal and
    vertical flips and a random multiple of 90° rotation, the same for every spatial array.
    Without augmentation the crop is centred. The randomness of item ``i`` depends only on
    (``seed``, epoch, ``i``), so runs and resumed runs see the same samples whatever the
    number of workers. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        entries: list[dict],
        crop: int | None = 128,
        augment: bool = True,
        target_key: str = "lge_clean",
        seed: int = 0,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        in_memory: bool = False,
    ) -> None:
        if target_key not in TARGET_KEYS:
            raise ValueError(f"target_key must be one of {TARGET_KEYS}, got {target_key!r}")
        self.cache_dir = Path(cache_dir)
        self.entries = list(entries)
        self.crop = crop
        self.augment = augment
        self.target_key = target_key
        self.seed = seed
        self.percentiles = tuple(percentiles)
        self.in_memory = in_memory
        self.epoch = 0
        self._memory: dict[int, dict[str, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> dict[str, np.ndarray]:
        """Arrays of slice ``i`` before cropping, with the target already normalised."""
        if i in self._memory:
            return self._memory[i]
        entry = self.entries[i]
        z = read_slice(self.cache_dir, entry["slice_id"])
        has_masks = bool(entry.get("has_masks", False))
        target, how = normalise_target(
            z[self.target_key],
            z["remote"] if has_masks else None,
            z["blood_pool"] if has_masks else None,
            self.percentiles,
        )
        arrays = {
            "cine": z["cine"].astype(np.float32),
            "ir": z["ir"].astype(np.float32),
            "ir_ti_ms": z["ir_ti_ms"].astype(np.float32),
            "t1_map_ms": z["t1_map_ms"][None].astype(np.float32),
            "lge": target[None].astype(np.float32),
            "masks": np.stack([z[k] for k in MASK_KEYS]).astype(np.float32),
            "has_masks": np.array(has_masks),
            "target_norm": np.array(how),
        }
        if self.in_memory:
            self._memory[i] = arrays
        return arrays

    def __getitem__(self, i: int) -> dict:
        a = self._load(i)
        h, w = a["t1_map_ms"].shape[-2:]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        size = self.crop
        if size is not None and (size > h or size > w):
            raise ValueError(f"crop {size} is larger than the cached window {h}x{w} ({self.entries[i]['slice_id']})")
        if size is None:
            rows, cols = slice(0, h), slice(0, w)
        elif self.augment:
            i0, j0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            rows, cols = slice(i0, i0 + size), slice(j0, j0 + size)
        else:
            i0, j0 = (h - size) // 2, (w - size) // 2
            rows, cols = slice(i0, i0 + size), slice(j0, j0 + size)
        out = {k: a[k][..., rows, cols] for k in SPATIAL_KEYS}
        if self.augment:
            k90 = int(rng.integers(0, 4))
            flip_v, flip_h = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
            for key, v in out.items():
                v = np.rot90(v, k90, axes=(-2, -1))
                if flip_v:
                    v = v[..., ::-1, :]
                if flip_h:
                    v = v[..., :, ::-1]
                out[key] = v
        item = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        item["ir_ti_ms"] = torch.from_numpy(a["ir_ti_ms"].copy())
        item["has_masks"] = torch.tensor(bool(a["has_masks"]))
        item["target_norm"] = str(a["target_norm"])
        item["slice_id"] = self.entries[i]["slice_id"]
        return item
