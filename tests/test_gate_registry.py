"""Gating and the MLflow registry (a real sqlite registry in a temp dir): promotion rules,
forced promotion, rollback, and the CLI's exit codes."""

import json

import pytest

from flows.cli import main
from flows.evaluate.gate import decide, parse_thresholds


def test_gate_decides_each_threshold_and_fails_on_missing_metrics():
    th = parse_thresholds({"geneval_overall": {"min": 0.6}, "fd_fenc": {"max": 5.0}, "vqa": {"min": 0.8}})
    d = decide({"geneval_overall": 0.61, "fd_fenc": 4.0, "vqa": 0.79}, th)
    assert not d["passed"]
    assert [c["passed"] for c in d["checks"]] == [True, True, False]
    assert decide({"geneval_overall": 0.7, "fd_fenc": 1.0, "vqa": 0.8}, th)["passed"]
    missing = decide({"geneval_overall": 0.7, "fd_fenc": float("nan")}, th)
    assert not missing["passed"] and missing["checks"][1]["value"] is None


@pytest.mark.parametrize("spec, field", [({"a": 0.5}, "gate.a"), ({"a": {"least": 1}}, "gate.a"),
                                         ({"a": {"min": "high"}}, "gate.a.min"), ({}, "gate")])
def test_gate_refuses_bad_thresholds(spec, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_thresholds(spec)


def test_gate_cli_writes_decision_and_exits_nonzero_on_failure(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"geneval_overall": 0.65, "vqa_accuracy": 0.9}))
    (tmp_path / "params.yaml").write_text("gate:\n  geneval_overall: {min: 0.6}\n  vqa_accuracy: {min: 0.8}\n")
    args = ["gate", "--metrics", str(tmp_path / "m.json"), "--params", str(tmp_path / "params.yaml"),
            "--out", str(tmp_path / "gate.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is True
    (tmp_path / "params.yaml").write_text("gate:\n  geneval_overall: {min: 0.99}\n")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is False
    assert "FAIL geneval_overall" in capsys.readouterr().out


@pytest.fixture
def registry(tmp_path, monkeypatch, train_env):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from flows import registry as reg

    return reg, train_env / "init"


def _variant(model, tmp_path, tag: str, folder: str | None = None):
    """A copy of the model directory with different bytes (a different set of weights)."""
    import shutil

    out = tmp_path / f"model-{folder or tag}"
    shutil.copytree(model, out)
    (out / "variant.txt").write_text(tag)
    return out


def test_promotion_rules_rollback_and_forced_promotion(registry, tmp_path):
    reg, model = registry
    passed, failed = {"passed": True}, {"passed": False}

    def add(score, gate, margin=0.02):
        path = _variant(model, tmp_path, f"{score}-{gate['passed']}")
        v = reg.log_and_register(path, {"geneval_overall": score, "vqa_accuracy": 0.9}, gate)
        return v, reg.promote_challenger(v, primary="geneval_overall", margin=margin)

    c = reg.client()
    v1, d1 = add(0.70, failed)                     # fails its gates: never champion
    assert not d1.promoted and reg.alias_version(c, "champion") is None
    assert reg.alias_version(c, "challenger") == v1
    v2, d2 = add(0.70, passed)                     # first passing model
    assert d2.promoted and reg.alias_version(c, "champion") == v2
    v3, d3 = add(0.65, passed)                     # worse by more than the margin
    assert not d3.promoted and reg.alias_version(c, "champion") == v2
    assert d3.deltas["geneval_overall"] == pytest.approx(-0.05)
    v4, d4 = add(0.69, passed)                     # slightly worse, within the margin
    assert d4.promoted and reg.alias_version(c, "champion") == v4 and reg.alias_version(c, "previous") == v2
    with pytest.raises(reg.RegistryError, match="failed its gates"):
        reg.promote(v1)
    assert reg.alias_version(c, "champion") == v4
    assert reg.rollback() == (v4, v2)
    assert reg.alias_version(c, "champion") == v2 and reg.alias_version(c, "previous") is None
    with pytest.raises(reg.RegistryError, match="replaced nothing"):
        reg.rollback()
    assert reg.promote(v1, force=True) == v1 and reg.alias_version(c, "previous") == v2
    with pytest.raises(reg.RegistryError, match="no version 99"):
        reg.promote("99")
    # the same weights registered again (a pipeline rerun) are the same version, not a new one
    again = reg.log_and_register(_variant(model, tmp_path, "0.69-True", folder="rerun"), {"geneval_overall": 0.69}, passed)
    assert again == v4


def test_registered_model_loads_and_generates_through_pyfunc(registry):
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    reg, model = registry
    v = reg.log_and_register(model, {"geneval_overall": 0.7}, {"passed": True})
    reg.promote_challenger(v, primary="geneval_overall", margin=0.0)
    loaded = mlflow.pyfunc.load_model("models:/janusflow@champion")
    out = loaded.predict(pd.DataFrame([{"prompt": "a red circle", "steps": 2, "guidance": 2.0, "seed": 1}]))
    image = Image.open(io.BytesIO(base64.b64decode(out[0])))
    assert image.size == (32, 32)
