"""`vne evaluate` end to end on simulated exams with a small random model (the project's own export)."""
import json

from vne.cli import main
from vne_helpers import tiny_model


def test_evaluate_writes_the_report(sim_set, tmp_path):
    model = tiny_model()
    out = tmp_path / "report"
    assert main(["evaluate", "--exams", str(sim_set), "--model", str(model), "--out", str(out),
                 "--ablation", f"same-model={model}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_patients"] == 3 and m["n_slices"] >= 3
    for key in ("VNE vs LGE FWHM", "VNE adjusted vs LGE FWQM", "T1>2SD baseline vs LGE FWEM"):
        assert key in m["agreement"]
    assert set(m["ablations"]) == {"full model", "same-model"}
    assert m["ablations"]["same-model"] == m["ablations"]["full model"]
    text = (out / "report.md").read_text()
    for fig in ("fig5_agreement.png", "fig5_agreement_adjusted.png", "fig4_panels.png"):
        assert (out / fig).is_file() and fig in text


def test_evaluate_refuses_a_folder_that_is_not_a_set(tmp_path, capsys):
    assert main(["evaluate", "--exams", str(tmp_path), "--model", str(tiny_model()), "--out", str(tmp_path / "r")]) == 2
    assert "no cases.json" in capsys.readouterr().err
