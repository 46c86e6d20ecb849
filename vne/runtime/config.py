"""The settings of one VNE stream: the gadget's properties, parsed into a :class:`PipelineConfig`.

Properties arrive as text (``<property name=.. value=..>`` of a Gadgetron pipeline XML, the
JSON ``parameters`` of an MRD client, ``vne serve --property NAME=VALUE``, ``vne infer
-p NAME=VALUE``); :data:`PROPERTY_DOCS` lists every name with its meaning (docs/gadget.md).
:meth:`PipelineConfig.from_properties` parses them on top of a base config; a client's stream
configuration is untrusted (``trusted=False``) and cannot set :data:`SERVER_ONLY_PROPERTIES`.

Output pixels: ``stored = vne * output_scale + offset``, where ``vne`` is in normalised PSIR
units (remote myocardium ~0, LV blood ~1) and ``offset`` is ``output_offset`` or, unset, 0 for
float32 and :data:`DEFAULT_UINT16_OFFSET` (1000) for uint16 (so ``vne = -1`` is stored as 0).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from ..errors import InputError
from ..exam.roles import RoleRules
from .qc import DEFAULT_QC_ACTION, QC_ACTIONS
from .study_store import DEFAULT_MAX_AGE_HOURS, DEFAULT_MAX_MB

log = logging.getLogger(__name__)

# numpy type of the stored VNE pixels, by the ``pixel_type`` property
PIXEL_TYPES = {"float32": np.float32, "uint16": np.uint16}
DEFAULT_SERIES_OFFSET = 1000
DEFAULT_UINT16_OFFSET = 1000.0
# Properties that name files: taken from the server's own configuration (CLI, pipeline XML in
# execute mode), never from a client's stream configuration (``from_properties(trusted=False)``).
SERVER_ONLY_PROPERTIES = ("model", "model_sha256", "cache_dir")

# Every property the gadget reads (pipeline XML <property name=... value=...>), with its meaning.
PROPERTY_DOCS: dict[str, str] = {
    "model": "path of the ONNX model; empty: $VNE_MODEL, else the newest vne-sim-*.onnx in $VNE_MODEL_DIR or models/ "
             "(server-side only: ignored from a vne serve client's configuration)",
    "model_sha256": "sha256 the model file must have (server-side only, like model); without it a shipped model is "
                    "checked against models/manifest.json",
    "enabled": "true/false; false passes everything through and only fills the study cache",
    "cache_dir": "study cache folder ('none' disables it); default $VNE_CACHE_DIR, else $XDG_CACHE_HOME/vne-study-cache, "
                 "else <tmp>/vne-study-cache-<uid> (server-side only)",
    "cache_max_mb": f"size limit of the study cache in MB (default {DEFAULT_MAX_MB:g}; oldest entries evicted first)",
    "cache_max_age_hours": f"entries older than this are ignored and deleted (default {DEFAULT_MAX_AGE_HOURS:g})",
    "series_index": "image_series_index of the VNE series; empty: T1 map's series index + series_index_offset",
    "series_index_offset": f"added to the T1 map's series index when series_index is empty (default {DEFAULT_SERIES_OFFSET})",
    "pixel_type": "float32 (default) or uint16",
    "output_scale": "stored = vne * output_scale + output_offset (default 1000)",
    "output_offset": f"default 0 for float32, {DEFAULT_UINT16_OFFSET:g} for uint16 (so vne = -1 is stored as 0)",
    "window_low": "VNE value at the bottom of the display window (default -0.2)",
    "window_high": "VNE value at the top of the display window (default 1.6)",
    "data_role": "meta DataRole / GADGETRON_DataRole of the VNE series (default Quantitative: no renormalisation)",
    "description_suffix": "appended to the T1 map's series description (default _VNE)",
    "intra_op_threads": "ONNX Runtime intra-op threads (default: $VNE_ORT_THREADS, else ORT's default)",
    "batch_size": "largest batch per inference call (default 8; slices run one at a time, as they complete)",
    "prefer_gpu": "use CUDAExecutionProvider when available (default true)",
    "qc": "quality guard (vne.runtime.qc): withhold (default: a slice that fails gets no VNE and one logged reason), "
          "mark (the VNE is sent with VNE_QC=FAIL in its meta and description) or off",
    "role_<rule>": "override one role rule of vne.exam.roles.RoleRules (regular expression or true/false), see docs/roles.md",
}


def _bool(text: str, name: str) -> bool:
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise InputError(f"property '{name}' must be true or false, got '{text}'")


def default_qc_action() -> str:
    """The ``qc`` property's default: ``$VNE_QC`` if set (an operator's, or the test suite's
    random-weight models), else :data:`vne.runtime.qc.DEFAULT_QC_ACTION` (withhold)."""
    return os.environ.get("VNE_QC", "").strip().lower() or DEFAULT_QC_ACTION


@dataclass
class PipelineConfig:
    """Settings of one :class:`vne.runtime.pipeline.VNEPipeline` (pipeline XML properties, CLI options)."""

    model: str | None = None
    model_sha256: str | None = None     # pinned for ``model`` (vne.runtime.model.pin_sha256); server-side only
    enabled: bool = True
    role_overrides: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None        # None: default_cache_dir(); "" / "none": disabled
    cache_max_mb: float = DEFAULT_MAX_MB
    cache_max_age_hours: float = DEFAULT_MAX_AGE_HOURS
    series_index: int | None = None
    series_index_offset: int = DEFAULT_SERIES_OFFSET
    pixel_type: str = "float32"
    output_scale: float = 1000.0
    output_offset: float | None = None
    window_low: float = -0.2
    window_high: float = 1.6
    data_role: str = "Quantitative"
    description_suffix: str = "_VNE"
    intra_op_threads: int | None = None
    batch_size: int = 8
    prefer_gpu: bool = True
    qc: str = field(default_factory=default_qc_action)

    def __post_init__(self) -> None:
        if self.qc not in QC_ACTIONS:
            raise InputError(f"qc must be one of {', '.join(QC_ACTIONS)}, got '{self.qc}'")
        if self.pixel_type not in PIXEL_TYPES:
            raise InputError(f"pixel_type must be one of {sorted(PIXEL_TYPES)}, got '{self.pixel_type}'")
        if not (self.output_scale > 0 and np.isfinite(self.output_scale)):
            raise InputError(f"output_scale must be positive, got {self.output_scale}")
        if not self.window_high > self.window_low:
            raise InputError("window_high must be above window_low")
        if self.series_index is not None and not 0 <= int(self.series_index) <= 65535:
            raise InputError(f"series_index must be 0..65535, got {self.series_index}")
        if self.model_sha256:
            from .model import find_default_model, normalize_sha256, pin_sha256

            self.model_sha256 = normalize_sha256(self.model_sha256)
            target = self.model or find_default_model()
            if target:
                pin_sha256(target, self.model_sha256)  # every load of that file must match

    @property
    def offset(self) -> float:
        """Stored value of VNE 0: ``output_offset``, else 0 (float32) or 1000 (uint16)."""
        if self.output_offset is not None:
            return float(self.output_offset)
        return DEFAULT_UINT16_OFFSET if self.pixel_type == "uint16" else 0.0

    @classmethod
    def from_properties(cls, props: dict[str, Any], base: "PipelineConfig | None" = None, *,
                        trusted: bool = True) -> "PipelineConfig":
        """A config from text properties (pipeline XML), on top of ``base`` (CLI defaults).

        Unknown names are logged and ignored; ``role_*`` names are checked by
        :meth:`vne.exam.roles.RoleRules.with_overrides`.

        Args:
            trusted: the properties come from the server's own configuration (CLI, pipeline XML
                of a gadget Gadgetron started). False for a client's stream configuration
                (``vne serve``): :data:`SERVER_ONLY_PROPERTIES` are then ignored, with one
                logged warning.

        Raises:
            InputError: a value that cannot be parsed.
        """
        cfg = base or cls()
        kinds = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        roles = dict(cfg.role_overrides)
        refused: list[str] = []
        for raw_name, raw in (props or {}).items():
            name = str(raw_name).strip()
            value = raw[0] if isinstance(raw, (list, tuple)) and raw else raw
            value = "" if value is None else str(value).strip()
            if name.lower().startswith("role_"):
                roles[name] = value
                continue
            if name not in kinds or name == "role_overrides":
                log.warning("VNE gadget: unknown property '%s' ignored (known: %s)", name, ", ".join(PROPERTY_DOCS))
                continue
            if name in SERVER_ONLY_PROPERTIES and not trusted:
                refused.append(f"{name}={value[:80]!r}")
                continue
            kind = str(kinds[name])
            try:
                if name in ("model", "cache_dir"):
                    changes[name] = value
                elif name == "model_sha256":
                    changes[name] = value or None
                elif "bool" in kind:
                    changes[name] = _bool(value, name)
                elif "int" in kind:
                    changes[name] = None if value == "" and "None" in kind else int(float(value))
                elif "float" in kind:
                    changes[name] = None if value == "" and "None" in kind else float(value)
                else:
                    changes[name] = value
            except ValueError:
                raise InputError(f"property '{name}' has an invalid value '{value}'") from None
        if refused:
            log.warning("VNE gadget: client properties %s ignored: the model and the study cache folder are set by the "
                        "server (vne serve --model, --model-sha256, --cache-dir), not by a stream's configuration",
                        ", ".join(refused))
        RoleRules().with_overrides(roles)  # validate now, with a clear message
        return replace(cfg, role_overrides=roles, **changes)


def properties_from_config(config) -> dict[str, str]:
    """``<property name=.. value=..>`` (or ``<property><name/><value/></property>``) of a
    Gadgetron external configuration (an ElementTree element, XML text, or None)."""
    import xml.etree.ElementTree as ET

    if config is None:
        return {}
    if isinstance(config, (bytes, str)):
        text = config.decode("utf-8", "replace") if isinstance(config, bytes) else config
        if not text.strip():
            return {}
        try:
            config = ET.fromstring(text)
        except ET.ParseError as exc:
            log.warning("VNE: configuration is not valid XML (%s); using defaults", exc)
            return {}
    props: dict[str, str] = {}
    for p in config.iter():
        if not (isinstance(p.tag, str) and p.tag.split("}")[-1] == "property"):
            continue
        name = p.get("name")
        value = p.get("value")
        if name is None:
            name = p.findtext("name") or p.findtext("{*}name")
            value = p.findtext("value") or p.findtext("{*}value")
        if name:
            props[name.strip()] = (value or "").strip()
    return props
