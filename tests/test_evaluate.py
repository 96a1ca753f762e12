"""`janusflow eval` on the tiny model: every metric present and in range, report and MLflow run
written; the Frechet distance behaves like one; bad input is a one-line error."""

import json

import numpy as np
import pytest

from flows.cli import main
from flows.evaluate.evaluate import EvalConfig, evaluate, frechet_distance, load_detector


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + 3.0
    assert frechet_distance(a, shifted) == pytest.approx(8 * 9.0, rel=1e-6)  # ||mu||^2 = 8 * 3^2
    wider = a * 2.0  # mean x2, covariance x4: ||mu||^2 + Tr(S + 4S - 2*2S) = ||mu||^2 + Tr(S)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, wider) == pytest.approx(expected, rel=1e-6)


def test_evaluate_tiny_model_writes_every_metric(train_env, tmp_path):
    cfg = EvalConfig(corpus=str(train_env / "corpus"), images_per_prompt=2, steps=2, batch=8)
    metrics = evaluate(train_env / "init", cfg, report_dir=tmp_path / "report")
    for key in ("geneval_overall", "geneval_unseen_overall", "vqa_accuracy", "fd_fenc", "prompt_gain",
                "vqa_count_all"):
        assert key in metrics
    assert 0.0 <= metrics["geneval_overall"] <= 1.0 and 0.0 <= metrics["vqa_accuracy"] <= 1.0
    assert metrics["fd_fenc"] > 0.0
    prompts = sum(1 for line in (train_env / "corpus/eval/geneval.jsonl").read_text().splitlines() if line)
    assert metrics["images"] == 2 * prompts
    report = (tmp_path / "report/report.md").read_text()
    assert "GenEval categories" in report and (tmp_path / "report/samples.png").is_file()
    details = json.loads((tmp_path / "report/details.json").read_text())
    assert len(details["geneval"]) == metrics["images"]


def test_eval_cli_logs_mlflow_and_dvc_outputs(train_env, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "params.yaml").write_text(
        f"eval:\n  corpus: {train_env / 'corpus'}\n  images_per_prompt: 1\n  steps: 2\n  batch: 8\n")
    out = tmp_path / "eval/metrics.json"
    assert main(["eval", "--model", str(train_env / "init"), "--params", str(tmp_path / "params.yaml"),
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    categories = json.loads((out.parent / "categories.json").read_text())
    assert {c["category"] for c in categories} == {k[len("geneval_"):] for k in metrics
                                                   if k.startswith("geneval_") and "overall" not in k}
    run_id = json.loads((out.parent / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.metrics["geneval_overall"] == pytest.approx(metrics["geneval_overall"])
    assert run.data.tags["stage"] == "evaluate"


def test_eval_bad_input_is_one_line(train_env, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "m.json"),
                 "--corpus", str(train_env / "corpus"), "--no-mlflow"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("eval:\n  stepz: 3\n")
    assert main(["eval", "--model", str(train_env / "init"), "--out", str(tmp_path / "m.json"),
                 "--params", str(tmp_path / "params.yaml")]) == 2
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(ValueError, match="package.module:function"):
        load_detector("nonsense")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_detector("no_such_module:detect")


def test_eval_runs_in_bf16_and_refuses_a_device_it_cannot_use(train_env, tmp_path, capsys):
    import torch

    small = dict(corpus=str(train_env / "corpus"), images_per_prompt=1, steps=2, batch=8, max_questions=8,
                 prompt_gain=4)
    fp32 = evaluate(train_env / "init", EvalConfig(**small))
    bf16 = evaluate(train_env / "init", EvalConfig(**small, dtype="bf16"))
    assert bf16.keys() == fp32.keys() and bf16["images"] == fp32["images"] and "prompt_gain" in bf16
    assert np.isfinite(bf16["fd_fenc"]) and bf16["fd_fenc"] != fp32["fd_fenc"]  # bf16 really ran
    from models.precision import cpu_has_bf16_matmul  # auto: bf16 where the CPU has AMX or AVX512-BF16, fp32 elsewhere
    auto = evaluate(train_env / "init", EvalConfig(**small, dtype="auto"))
    assert auto["fd_fenc"] == (bf16 if cpu_has_bf16_matmul() else fp32)["fd_fenc"]
    for bad, match in ((dict(dtype="fp16"), "eval.dtype"), (dict(device="tpu"), "eval.device"),
                       (dict(device="cuda:x"), "eval.device")):
        with pytest.raises(ValueError, match=match):
            EvalConfig(**small, **bad).validate()
    if not torch.cuda.is_available():
        assert main(["eval", "--model", str(train_env / "init"), "--out", str(tmp_path / "m.json"),
                     "--corpus", str(train_env / "corpus"), "--device", "cuda", "--no-mlflow"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_prompt_gain_is_zero_without_a_prompt_difference_and_reads_each_t(tiny_copy):
    import torch

    from conftest import randomize_
    from flows.evaluate.diagnostics import GAIN_TIMES, prompt_gain_of

    randomize_(tiny_copy.model)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = prompt_gain_of(tiny_copy, ["a red circle"] * 4, pixels)
    assert set(same) == {"prompt_gain"} | {f"prompt_gain_t{t:.2f}" for t in GAIN_TIMES}
    assert all(v == 0.0 for v in same.values())
    prompts = ["a red circle", "two blue squares", "a green triangle above a square", "four circles"]
    gain = prompt_gain_of(tiny_copy, prompts, pixels)
    assert all(v != 0.0 and abs(v) < 1.0 for v in gain.values())  # a random model: small either way
    assert gain == prompt_gain_of(tiny_copy, prompts, pixels)  # fixed t and noise: reproducible
    assert gain["prompt_gain"] == pytest.approx(np.mean([gain[f"prompt_gain_t{t:.2f}"] for t in GAIN_TIMES]))


def test_vqa_accuracy_per_question_kind():
    from data.shapes.text import question_kind
    from flows.evaluate.diagnostics import vqa_by_type

    rows = [{"question": "How many objects are there?", "correct": True},
            {"question": "How many circles are there?", "correct": False},
            {"question": "How many squares are there?", "correct": True},
            {"question": "What colour is the square?", "correct": True},
            {"question": "What shape is the red object?", "correct": False},
            {"question": "Is the red circle left of the blue square?", "correct": True},
            {"question": "Describe the picture.", "correct": False}]
    assert vqa_by_type(rows, question_kind) == {"vqa_count_all": 1.0, "vqa_count_shape": 0.5,
                                                "vqa_colour_of": 1.0, "vqa_shape_of": 0.0,
                                                "vqa_relation": 1.0}
