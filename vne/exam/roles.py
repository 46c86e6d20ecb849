"""Role rules: what an image is (cine, IR-weighted magnitude / phase, T1 map, LGE), from its header.

This is the single definition of the rules; the DICOM reader, the ISMRMRD stream gadget and the
training pipeline all call :func:`classify`. Every rule is a field of :class:`RoleRules` and can
be overridden from pipeline XML properties named ``role_<field>`` (see
:meth:`RoleRules.with_overrides` and docs/roles.md).

Meta dictionaries come from DICOM (keyword -> value) or ISMRMRD image meta (every value a string
or a list of strings). Keys are matched case-insensitively, ignoring ``_`` / spaces and a leading
``GADGETRON_`` or ``GT_``, with spelling variants (``SeriesDescription``,
``SequenceDescription``, ``GADGETRON_SeqDescription``, ...).

Rule order (first match wins):

1. excluded: colour renderings, fit-parameter / SD / T2 / SNR maps (description, comments,
   Gadgetron DataRole) -> UNKNOWN;
2. T1 map: ImageType token ``T1 MAP``, DataRole ``T1``, ImageComments ``T1 Map``, or a T1-map
   series description without an inversion time;
3. LGE: DataRole ``PSIR`` / ``MAGIR`` or an LGE description, unless the description names an
   IR T1-mapping series (phase images of an LGE are UNKNOWN);
4. IR phase: a phase image (ImageType ``P`` or ISMRMRD ``image_type`` 2) with an inversion time;
5. IR magnitude: any other image with an inversion time (InversionTime, GADGETRON_TI,
   ImageComments ``TIeff 100 ms``);
6. cine: a cine description, or ImageType ``RETRO`` / ``CINE`` (or, with
   ``role_cine_by_trigger_time``, any remaining image with TriggerTime > 0);
7. otherwise UNKNOWN.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import InputError
from .data import Role

# Field name -> the key spellings that hold it (compared after :func:`_norm_key`).
KEY_VARIANTS: dict[str, tuple[str, ...]] = {
    "description": ("seriesdescription", "sequencedescription", "seqdescription",
                    "sequencedescriptionadditional"),
    "protocol": ("protocolname",),
    "comments": ("imagecomments", "imagecomment"),
    "image_type": ("imagetype",),
    "data_role": ("datarole",),
    "history": ("imageprocessinghistory",),
    "inversion_time": ("inversiontime", "ti"),
    "trigger_time": ("triggertime",),
    "scale_ratio": ("scaleratio", "imagescaleratio"),
}

ISMRMRD_IMTYPE_PHASE = 2


_VENDOR_PREFIX = re.compile(r"^(gadgetron|gt)_", re.IGNORECASE)
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


@functools.lru_cache(maxsize=4096)
def _norm_key(key: str) -> str:
    """``GADGETRON_InversionTime`` -> ``inversiontime``: a meta key without prefix, case or punctuation.
    Cached: an image has ~100 keys, looked up ~20 times each, from a small vocabulary."""
    return _NOT_ALNUM.sub("", _VENDOR_PREFIX.sub("", key).lower())


def _values(v: Any) -> list[str]:
    """Meta value as a list of strings (ISMRMRD lists, pydicom MultiValue, backslash strings)."""
    if v is None:
        return []
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("latin-1", "replace")
    if isinstance(v, str):
        return [p.strip() for p in v.split("\\")] if "\\" in v else [v.strip()]
    if isinstance(v, Iterable):
        out: list[str] = []
        for item in v:
            out.extend(_values(item))
        return out
    return [str(v).strip()]


def meta_values(meta: dict, field_name: str) -> list[str]:
    """Every value of ``field_name`` (a key of :data:`KEY_VARIANTS`) in ``meta``, in key order."""
    wanted = KEY_VARIANTS[field_name]
    out: list[str] = []
    for k, v in meta.items():
        if _norm_key(str(k)) in wanted:
            out.extend(x for x in _values(v) if x != "")
    return out


def meta_text(meta: dict, field_name: str) -> str:
    """The values of ``field_name`` joined with `` | `` ('' when absent)."""
    return " | ".join(meta_values(meta, field_name))


def descriptions(meta: dict) -> list[str]:
    """Series / sequence descriptions; ``ProtocolName`` only when there is none of those."""
    return meta_values(meta, "description") or meta_values(meta, "protocol")


def _first_float(values: list[str]) -> float | None:
    for s in values:
        try:
            f = float(s)
        except (TypeError, ValueError):
            continue
        if f == f and abs(f) != float("inf"):
            return f
    return None


@dataclass(frozen=True)
class RoleRules:
    """Regular expressions (case-insensitive, ``re.search``) and switches that assign roles.

    Every field can be overridden by a pipeline property ``role_<field name>``.

    Attributes:
        exclude_pattern: description / comments of derived images that are never inputs.
        rendering_pattern: description / comments of colour or screenshot renderings.
        exclude_data_role_pattern: Gadgetron DataRole values that are never inputs.
        t1_map_pattern: series description of a T1 map (used only without an inversion time).
        t1_map_image_type_pattern: an ImageType token of a T1 map.
        t1_map_comment_pattern: ImageComments of a T1 map.
        t1_map_data_role_pattern: Gadgetron DataRole of a T1 map.
        lge_pattern: series description of an LGE series.
        lge_data_role_pattern: Gadgetron DataRole of an LGE image.
        ir_series_pattern: description of a Look-Locker T1-mapping series (never LGE).
        ir_comment_pattern: ImageComments that carry an effective TI (``TIeff 100 ms``).
        phase_image_type_pattern: an ImageType token of a phase image.
        cine_pattern: series description of a cine series.
        cine_image_type_pattern: an ImageType token of a cine image.
        phase_without_ti_is_unknown: phase images without a TI are UNKNOWN (else IR_PHASE).
        cine_by_trigger_time: an otherwise unmatched, non-phase image with TriggerTime > 0 is
            CINE (off by default: localizers and maps carry trigger times too).
    """

    exclude_pattern: str = (
        r"fit ?params|rsquare|r\^?2 ?map|t1 ?sd|sd ?map|_sd\b|\bsd_|t1 ?star|t1\*|t2 ?\*? ?map|t2map|t2star|"
        r"\bsnr\b|relsnr|chi ?sq|ameba|amoeba|t1 ?range|signal\(ti\)|\becv\b|perfusion|g-?factor"
    )
    rendering_pattern: str = r"colou?r(?! ?map)|\brgb\b|screen ?shot|snapshot|secondary capture"
    exclude_data_role_pattern: str = r"sd$|^t2|snr|std|gfactor|aif|perf|other|_map$"
    t1_map_pattern: str = r"t1 ?[-_ ]? ?map|moco[_ ]t1\b|(^|[_\s])t1$"
    t1_map_image_type_pattern: str = r"^t1 ?map$"
    t1_map_comment_pattern: str = r"t1 ?map"
    t1_map_data_role_pattern: str = r"^t1( ?map)?$"
    lge_pattern: str = r"lge|psir|(^|[_\s])de([_\s]|$)|\blate\b|delayed|mag_?ir|phase.?sensitive|viability|\bscar\b"
    lge_data_role_pattern: str = r"^(psir|magir)$"
    ir_series_pattern: str = r"(sh)?molli|look.?locker|t1.?mapping|\bll[_\s]"
    ir_comment_pattern: str = r"\bTI ?eff\b|\bTI\s*[=:]?\s*\d+(\.\d+)?\s*ms"
    phase_image_type_pattern: str = r"^(p|pha|phase)$"
    cine_pattern: str = r"cine|trufi|bssfp|\bssfp|fiesta|balanced|(^|[_\s])sax|(^|[_\s])sa([_\s]|$)|[234] ?ch|lvot|(^|[_\s])lax|retro"
    cine_image_type_pattern: str = r"^(retro|cine)$"
    phase_without_ti_is_unknown: bool = True
    cine_by_trigger_time: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type in ("str", str):
                try:
                    re.compile(getattr(self, f.name))
                except re.error as exc:
                    raise InputError(f"role rule role_{f.name} is not a valid regular expression: {exc}") from None

    def with_overrides(self, properties: dict[str, Any]) -> "RoleRules":
        """A copy with rules replaced from pipeline properties.

        Args:
            properties: e.g. the gadget's XML properties. Keys ``role_<field>`` replace that
                field (regular expressions as text; switches as true/false/1/0/yes/no);
                other keys are ignored.

        Raises:
            InputError: an unknown ``role_*`` name, an invalid regex or a non-boolean switch.
        """
        names = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, raw in properties.items():
            k = str(key)
            if not k.lower().startswith("role_"):
                continue
            name = k[5:].lower()
            if name not in names:
                raise InputError(f"unknown role rule property '{k}' (known: {', '.join('role_' + n for n in names)})")
            value = raw[0] if isinstance(raw, (list, tuple)) and raw else raw
            if names[name].type in ("bool", bool):
                text = str(value).strip().lower()
                if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise InputError(f"role rule property '{k}' must be true or false, got '{value}'")
                changes[name] = text in ("true", "1", "yes", "on")
            else:
                changes[name] = str(value)
        return dataclasses.replace(self, **changes)

    def search(self, name: str, text: str) -> bool:
        """Whether rule ``name`` matches ``text`` (case-insensitive ``re.search``)."""
        return bool(text) and re.search(getattr(self, name), text, flags=re.IGNORECASE) is not None

    def first_match(self, name: str, texts: Iterable[str]) -> str | None:
        """The first of ``texts`` that rule ``name`` matches, or None."""
        for t in texts:
            if self.search(name, t.strip()):
                return t
        return None


DEFAULT_RULES = RoleRules()
# Property names accepted by :meth:`RoleRules.with_overrides`.
OVERRIDE_PROPERTIES = tuple("role_" + f.name for f in dataclasses.fields(RoleRules))


def inversion_time_from_meta(meta: dict) -> float | None:
    """Inversion time in ms, or None.

    Order: ImageComments ``TIeff <n> ms`` (Siemens' effective TI), then ``InversionTime`` /
    ``GADGETRON_TI`` / ``GT_TI`` / ``TI``, then ImageComments ``TI <n> ms``. Zero or negative
    values count as absent.
    """
    comments = meta_values(meta, "comments")
    for c in comments:
        m = re.search(r"\bTI ?eff\s*[=:]?\s*(\d+(?:\.\d+)?)", c, flags=re.IGNORECASE)
        if m and float(m.group(1)) > 0:
            return float(m.group(1))
    ti = _first_float(meta_values(meta, "inversion_time"))
    if ti is not None and ti > 0:
        return ti
    for c in comments:
        m = re.search(r"\bTI\s*[=:]?\s*(\d+(?:\.\d+)?)\s*ms", c, flags=re.IGNORECASE)
        if m and float(m.group(1)) > 0:
            return float(m.group(1))
    return None


def trigger_time_from_meta(meta: dict) -> float | None:
    """Trigger time (ms after the R wave) from ``TriggerTime`` / ``GADGETRON_TriggerTime`` /
    ``GT_TriggerTime`` meta, or None. Zero is a valid trigger time (the first cine phase);
    negative values count as absent. ISMRMRD ``physiology_time_stamp`` is read by
    :func:`vne.io.mrd.image.from_mrd` when this gives None."""
    t = _first_float(meta_values(meta, "trigger_time"))
    return t if t is not None and t >= 0 else None


def t1_scale_from_meta(meta: dict) -> float:
    """Factor from stored T1-map values to ms (1.0 unless the map says it is scaled).

    ``GADGETRON_ScaleRatio`` / ``GT_ScaleRatio`` of N -> 1/N; else ImageComments with a token
    ``x10`` (Gadgetron's ``T1 x10 0.1ms``) -> 0.1 (``xN`` -> 1/N).
    """
    ratio = _first_float(meta_values(meta, "scale_ratio"))
    if ratio is not None and ratio > 0:
        return 1.0 / ratio
    for c in meta_values(meta, "comments"):
        m = re.search(r"(?<![A-Za-z0-9.])x\s?(\d+(?:\.\d+)?)(?![\d.]*[A-Za-z])", c)
        if m and float(m.group(1)) > 0:
            return 1.0 / float(m.group(1))
    return 1.0


def rendering_reason(meta: dict, rules: RoleRules = DEFAULT_RULES) -> str | None:
    """Why the image is a colour / screenshot rendering (to be dropped), or None."""
    for name, values in (("ImageComments", meta_values(meta, "comments")), ("description", descriptions(meta))):
        hit = rules.first_match("rendering_pattern", values)
        if hit:
            return f"rendering ({name} '{hit}')"
    if any(t.upper() in ("RGB", "COLOR", "COLOUR") for t in meta_values(meta, "image_type")):
        return "rendering (ImageType)"
    return None


def classify(meta: dict, *, image_type_code: int | None = None, rules: RoleRules = DEFAULT_RULES) -> tuple[Role, str]:
    """The role of one image and a short reason.

    Args:
        meta: header fields (DICOM keywords or ISMRMRD meta); values text or lists of text.
        image_type_code: ISMRMRD ``image_type`` (1 magnitude, 2 phase, 3 real, ...), if known.
        rules: the rules (default :data:`DEFAULT_RULES`).

    Returns:
        (role, reason), e.g. ``(Role.T1_MAP, "ImageType token 'T1 MAP'")``.
    """
    descs = descriptions(meta)
    comments = meta_values(meta, "comments")
    tokens = meta_values(meta, "image_type")
    roles = meta_values(meta, "data_role")
    ti = inversion_time_from_meta(meta)
    ti_comment = rules.first_match("ir_comment_pattern", comments)
    has_ti = ti is not None or ti_comment is not None

    # 1. excluded
    why = rendering_reason(meta, rules)
    if why:
        return Role.UNKNOWN, f"excluded: {why}"
    for name, values in (("description", descs), ("ImageComments", comments)):
        hit = rules.first_match("exclude_pattern", values)
        if hit:
            return Role.UNKNOWN, f"excluded: {name} '{hit}' matches role_exclude_pattern"
    hit = rules.first_match("exclude_data_role_pattern", roles)
    if hit:
        return Role.UNKNOWN, f"excluded: DataRole '{hit}'"

    # 2. T1 map
    hit = rules.first_match("t1_map_image_type_pattern", tokens)
    if hit:
        return Role.T1_MAP, f"ImageType token '{hit}'"
    hit = rules.first_match("t1_map_data_role_pattern", roles)
    if hit:
        return Role.T1_MAP, f"DataRole '{hit}'"
    if not has_ti:
        hit = rules.first_match("t1_map_comment_pattern", comments)
        if hit:
            return Role.T1_MAP, f"ImageComments '{hit}'"
        hit = rules.first_match("t1_map_pattern", descs)
        if hit:
            return Role.T1_MAP, f"description '{hit}' matches role_t1_map_pattern"

    is_phase = image_type_code == ISMRMRD_IMTYPE_PHASE or rules.first_match("phase_image_type_pattern", tokens) is not None
    ir_series = rules.first_match("ir_series_pattern", descs)

    # 3. LGE
    lge_role = rules.first_match("lge_data_role_pattern", roles)
    lge_desc = rules.first_match("lge_pattern", descs)
    if (lge_role or lge_desc) and not ir_series:
        lge_why = f"DataRole '{lge_role}'" if lge_role else f"description '{lge_desc}' matches role_lge_pattern"
        if is_phase:
            return Role.UNKNOWN, f"phase image of an LGE series ({lge_why})"
        return Role.LGE, lge_why
    if lge_role and ir_series:
        return Role.UNKNOWN, f"signed {lge_role} images of an IR T1-mapping series (the magnitude images are used)"

    # 4. / 5. IR-weighted
    ti_why = f"TI {ti:g} ms" if ti is not None else f"ImageComments '{ti_comment}'"
    if is_phase:
        if has_ti:
            return Role.IR_PHASE, f"phase image with {ti_why}"
        if rules.phase_without_ti_is_unknown:
            return Role.UNKNOWN, "phase image without an inversion time"
        return Role.IR_PHASE, "phase image (role_phase_without_ti_is_unknown is false)"
    if has_ti:
        moco = " MOCO" if any(t.strip().upper() == "MOCO" for t in tokens) else ""
        return Role.IR_MAGNITUDE, ti_why + moco + (f" (IR T1-mapping series '{ir_series}')" if ir_series else "")

    # 6. cine
    hit = rules.first_match("cine_image_type_pattern", tokens)
    if hit:
        return Role.CINE, f"ImageType token '{hit}'"
    hit = rules.first_match("cine_pattern", descs)
    if hit:
        return Role.CINE, f"description '{hit}' matches role_cine_pattern"
    trigger = _first_float(meta_values(meta, "trigger_time"))
    if rules.cine_by_trigger_time and trigger is not None and trigger > 0:
        return Role.CINE, f"TriggerTime {trigger:g} ms (role_cine_by_trigger_time)"
    return Role.UNKNOWN, "no role rule matched" + (f" (description '{descs[0]}')" if descs else "")
