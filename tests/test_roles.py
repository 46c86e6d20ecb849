"""Role rules: real Siemens / Gadgetron header conventions -> Role, overrides, TI and T1 scale."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vne.errors import InputError
from vne.exam.data import Role
from vne.exam.roles import (
    DEFAULT_RULES,
    OVERRIDE_PROPERTIES,
    RoleRules,
    classify,
    inversion_time_from_meta,
    rendering_reason,
    t1_scale_from_meta,
)

# The phantom's own headers (ShMOLLI, Siemens VE11C), as read by vne.io.dicom.
SHMOLLI_IR = {"SeriesDescription": "ShMOLLI_192i_e11", "ImageType": ["ORIGINAL", "PRIMARY", "M", "DIS2D"],
              "InversionTime": "100", "ImageComments": "TIeff 100 ms", "SequenceName": "tfi2d1_84",
              "ProtocolName": "ShMOLLI_192i_e11", "TriggerTime": "532.5"}
SHMOLLI_PHASE = dict(SHMOLLI_IR, ImageType=["ORIGINAL", "PRIMARY", "P", "DIS2D"], RescaleSlope="2", RescaleIntercept="-4096")
SHMOLLI_T1MAP = {"SeriesDescription": "ShMOLLI_192i_e11_T1MAP", "ImageType": ["ORIGINAL", "PRIMARY", "P", "DIS2D"],
                 "ImageComments": "ShMOLLI T1 Map", "ProtocolName": "ShMOLLI_192i_e11", "TriggerTime": "532.5"}
SHMOLLI_COLOUR = dict(SHMOLLI_T1MAP, ImageComments="ShMOLLI color 1198SD175ms")
SHMOLLI_FIT = {"SeriesDescription": "ShMOLLI_192i_e11_FITPARAMS", "ImageType": ["ORIGINAL", "PRIMARY", "P", "DIS2D"]}


@pytest.mark.parametrize(
    "meta,code,role",
    [
        (SHMOLLI_IR, None, Role.IR_MAGNITUDE),
        (SHMOLLI_PHASE, None, Role.IR_PHASE),
        (SHMOLLI_T1MAP, None, Role.T1_MAP),
        (SHMOLLI_COLOUR, None, Role.UNKNOWN),
        (SHMOLLI_FIT, None, Role.UNKNOWN),
        (dict(SHMOLLI_FIT, ImageComments="Signal(TI)=A-B*exp(-TI/[___T1starMap___])"), None, Role.UNKNOWN),
        # Siemens MOLLI
        ({"SeriesDescription": "MOLLI_5(3)3_sax", "ImageType": "ORIGINAL\\PRIMARY\\M\\DIS2D", "InversionTime": "180"}, None, Role.IR_MAGNITUDE),
        ({"SeriesDescription": "MOLLI_5(3)3_sax_MOCO", "ImageType": ["ORIGINAL", "PRIMARY", "M", "MOCO", "DIS2D"],
          "ImageComments": "TI 180 ms"}, None, Role.IR_MAGNITUDE),
        ({"SeriesDescription": "MOLLI_5(3)3_sax_MOCO_T1", "ImageType": ["DERIVED", "PRIMARY", "T1 MAP", "MOCO", "T1", "DIS2D"]}, None, Role.T1_MAP),
        ({"SeriesDescription": "MOLLI_5(3)3_sax_MOCO_T1", "ProtocolName": "MOLLI_sax"}, None, Role.T1_MAP),
        ({"SeriesDescription": "MOLLI_sax_T1MAP_SD", "ImageType": ["DERIVED", "PRIMARY", "M"]}, None, Role.UNKNOWN),
        # cine
        ({"SeriesDescription": "cine_retro_sax", "ImageType": "ORIGINAL\\PRIMARY\\M\\RETRO\\DIS2D", "TriggerTime": "40"}, None, Role.CINE),
        ({"SeriesDescription": "TrueFISP_cine_SA_basal", "TriggerTime": "40"}, None, Role.CINE),
        ({"SeriesDescription": "sa_bSSFP_stack"}, None, Role.CINE),
        ({"SeriesDescription": "4ch_trufi", "TriggerTime": "0"}, None, Role.CINE),
        # LGE (has an inversion time, must not become IR)
        ({"SeriesDescription": "LGE_PSIR_sax", "ImageType": ["DERIVED", "PRIMARY", "M"], "InversionTime": "300"}, None, Role.LGE),
        ({"SeriesDescription": "de_tfl2d1_psir", "InversionTime": "280"}, None, Role.LGE),
        ({"SeriesDescription": "late enhancement sax", "InversionTime": "280"}, None, Role.LGE),
        ({"SeriesDescription": "LGE_PSIR_sax", "ImageType": ["ORIGINAL", "PRIMARY", "P"], "InversionTime": "300"}, None, Role.UNKNOWN),
        # Gadgetron / ISMRMRD meta (values are strings or lists of strings)
        ({"GADGETRON_DataRole": ["T1"], "GADGETRON_ImageComment": ["T1", "x10", "0.1ms"]}, 1, Role.T1_MAP),
        ({"GT_DataRole": "T1", "GT_SeqDescription": ["T1SR"]}, 1, Role.T1_MAP),
        ({"GADGETRON_DataRole": ["T1SD"]}, 1, Role.UNKNOWN),
        ({"GADGETRON_DataRole": "Image", "GADGETRON_TI": ["180"], "GADGETRON_SeqDescription": ["MOLLI_RAW"]}, 1, Role.IR_MAGNITUDE),
        ({"GADGETRON_DataRole": "Image", "GADGETRON_TI": "180"}, 2, Role.IR_PHASE),
        ({"GADGETRON_DataRole": "PSIR", "GADGETRON_TI": "300", "GADGETRON_SeqDescription": "LGE"}, 3, Role.LGE),
        ({"GADGETRON_DataRole": "PSIR", "GADGETRON_TI": "300", "SequenceDescription": "MOLLI_5(3)3"}, 3, Role.UNKNOWN),
        ({"SequenceDescription": ["cine", "AI"], "GADGETRON_DataRole": "Image"}, 1, Role.CINE),
        # nothing to go by
        ({"SeriesDescription": "localizer"}, None, Role.UNKNOWN),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "P"]}, None, Role.UNKNOWN),
        ({}, None, Role.UNKNOWN),
    ],
)
def test_classify(meta, code, role):
    got, reason = classify(meta, image_type_code=code)
    assert got == role, reason
    assert isinstance(reason, str) and reason and "\n" not in reason


def test_keys_are_case_and_spelling_insensitive():
    for key in ("SeriesDescription", "seriesdescription", "Series Description", "SequenceDescription",
                "GADGETRON_SeqDescription", "GT_SeqDescription", "series_description"):
        assert classify({key: "cine_sax"})[0] == Role.CINE, key
    assert classify({"imagetype": "DERIVED\\PRIMARY\\T1 MAP"})[0] == Role.T1_MAP
    assert classify({"image_comments": ["ShMOLLI T1 Map"]})[0] == Role.T1_MAP
    assert classify({"GADGETRON_TI": ["260"]})[0] == Role.IR_MAGNITUDE


def test_reason_names_the_rule():
    assert "ImageComments" in classify(SHMOLLI_T1MAP)[1]
    assert "100" in classify(SHMOLLI_IR)[1]
    assert "excluded" in classify(SHMOLLI_COLOUR)[1]
    assert rendering_reason(SHMOLLI_COLOUR) and rendering_reason(SHMOLLI_T1MAP) is None
    assert rendering_reason({"ImageType": ["DERIVED", "SECONDARY", "RGB"]})


def test_inversion_time_sources():
    assert inversion_time_from_meta(SHMOLLI_IR) == 100.0
    assert inversion_time_from_meta({"ImageComments": "TIeff 1100 ms", "InversionTime": "1000"}) == 1100.0
    assert inversion_time_from_meta({"InversionTime": "180"}) == 180.0
    assert inversion_time_from_meta({"GADGETRON_TI": ["260.5"]}) == 260.5
    assert inversion_time_from_meta({"GT_TI": "300"}) == 300.0
    assert inversion_time_from_meta({"ImageComments": ["TI 180 ms"]}) == 180.0
    assert inversion_time_from_meta({"InversionTime": "0"}) is None
    assert inversion_time_from_meta({"InversionTime": "n/a"}) is None
    assert inversion_time_from_meta(SHMOLLI_T1MAP) is None


def test_t1_scale():
    assert t1_scale_from_meta({"GADGETRON_ImageComment": ["T1", "x10", "0.1ms"]}) == pytest.approx(0.1)
    assert t1_scale_from_meta({"ImageComments": "T1 map x10"}) == pytest.approx(0.1)
    assert t1_scale_from_meta({"GADGETRON_ScaleRatio": "10"}) == pytest.approx(0.1)
    assert t1_scale_from_meta({"GT_ScaleRatio": ["4"]}) == pytest.approx(0.25)
    assert t1_scale_from_meta(SHMOLLI_T1MAP) == 1.0
    assert t1_scale_from_meta({"ImageComments": "ShMOLLI color 1198SD175ms"}) == 1.0
    assert t1_scale_from_meta({}) == 1.0


def test_overrides_change_the_rules():
    meta = {"SeriesDescription": "my_funny_cine_name_xyz"}
    assert classify(meta)[0] == Role.CINE
    rules = DEFAULT_RULES.with_overrides({"role_cine_pattern": "nothing-matches-this", "unrelated": "x"})
    assert classify(meta, rules=rules)[0] == Role.UNKNOWN
    rules = DEFAULT_RULES.with_overrides({"role_t1_map_pattern": "funny"})
    assert classify(meta, rules=rules)[0] == Role.T1_MAP
    assert DEFAULT_RULES.cine_pattern != "nothing-matches-this"  # the defaults are untouched
    # switches
    phase_no_ti = {"ImageType": ["ORIGINAL", "PRIMARY", "P"]}
    rules = DEFAULT_RULES.with_overrides({"role_phase_without_ti_is_unknown": "false"})
    assert classify(phase_no_ti, rules=rules)[0] == Role.IR_PHASE
    assert classify({"SeriesDescription": "sa_stack_x", "TriggerTime": "40"})[0] == Role.CINE
    assert classify({"SeriesDescription": "mystery", "TriggerTime": "40"})[0] == Role.UNKNOWN
    rules = DEFAULT_RULES.with_overrides({"role_cine_by_trigger_time": "yes"})
    assert classify({"SeriesDescription": "mystery", "TriggerTime": "40"}, rules=rules)[0] == Role.CINE
    assert classify({"SeriesDescription": "mystery", "TriggerTime": "0"}, rules=rules)[0] == Role.UNKNOWN
    assert classify(SHMOLLI_T1MAP, rules=rules)[0] == Role.T1_MAP  # earlier rules still win
    # ISMRMRD properties may come as lists
    rules = DEFAULT_RULES.with_overrides({"role_lge_pattern": ["viab"]})
    assert rules.lge_pattern == "viab"


def test_bad_overrides_are_one_line_input_errors():
    with pytest.raises(InputError, match="role_cine_patern"):
        DEFAULT_RULES.with_overrides({"role_cine_patern": "x"})
    with pytest.raises(InputError, match="role_cine_pattern"):
        DEFAULT_RULES.with_overrides({"role_cine_pattern": "(unclosed"})
    with pytest.raises(InputError, match="true or false"):
        DEFAULT_RULES.with_overrides({"role_phase_without_ti_is_unknown": "maybe"})


def test_every_rule_is_overridable_and_documented():
    names = {f.name for f in dataclasses.fields(RoleRules)}
    assert set(OVERRIDE_PROPERTIES) == {"role_" + n for n in names}
    doc = Path(__file__).resolve().parents[1] / "docs" / "roles.md"
    text = doc.read_text()
    missing = [p for p in OVERRIDE_PROPERTIES if f"`{p}`" not in text]
    assert not missing, f"docs/roles.md does not document {missing}"
