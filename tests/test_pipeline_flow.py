"""The Prefect `train-all` flow on a tiny copy of the project: a real DVC repo in a temp git repo, a
real Prefect test server, a real sqlite MLflow registry, and a deployment run by a real worker.

One module-scoped repo walks through the pipeline's life: first run (every stage runs, the model
becomes champion), a rerun with nothing changed (every stage skipped, same version), impossible
gates (stops at the gate, nothing promoted, champion unchanged), and a deployment run by a worker.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = dict(seed=0, image_size=32, train_gen=40, train_und=40, train_text=20, heldout_gen=4,
                 heldout_und=4, unseen_gen=2, unseen_und=2, eval_per_category=1, vocab_size=400,
                 shard_size=1000)
STAGE = dict(corpus="data/corpora/shapes", steps=2, rows=2, max_len=256, warmup=1, save_every=100,
             sample_prompts=1, sample_questions=1, sample_steps=2)


def _write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _params(gate_min: float) -> dict:
    return {"data": TINY_DATA, "pack": {"max_len": 256},
            "eval": {"corpus": "data/corpora/shapes", "images_per_prompt": 1, "steps": 2,
                     "guidance": 2.0, "seed": 0, "batch": 16, "detector": "shapes"},
            "gate": {"geneval_overall": {"min": gate_min}, "vqa_accuracy": {"min": gate_min}},
            "promote": {"primary": "geneval_overall", "margin": 0.02}}


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return env


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """The project's dvc.yaml, flows and code over tiny params and configs, as a git + DVC repo."""
    root = tmp_path_factory.mktemp("repo")
    ignore = shutil.ignore_patterns("__pycache__", "corpora", "metrics")
    for name in ("models", "flows", "data", "serving"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("dvc.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    _write_yaml(root / "params.yaml", _params(0.0))
    boot = {"stage": "bootstrap", "corpus": "data/corpora/shapes", "out": "runs/shapes/bootstrap",
            "bootstrap": {"preset": "tiny", "vae_steps": 2, "vae_batch": 4, "siglip_steps": 2,
                          "siglip_batch": 4, "llm_steps": 2, "llm_batch": 2, "llm_seq_len": 32}}
    _write_yaml(root / "configs/shapes/bootstrap.yaml", boot)
    prev = "bootstrap"
    for n in (1, 2, 3):
        _write_yaml(root / f"configs/shapes/stage{n}.yaml",
                    {"stage": n, "init": f"runs/shapes/{prev}/model", "out": f"runs/shapes/stage{n}", **STAGE})
        prev = f"stage{n}"
    (root / ".gitignore").write_text("runs/\nmlflow.db\nmlruns/\n__pycache__/\n")
    env = _env(root)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _champion(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return str(client.get_model_version_by_alias("janusflow", "champion").version)


def test_train_all_runs_skips_and_gates(tiny_repo, prefect_server, monkeypatch):
    from flows.pipeline import train_all

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_repo / 'mlflow.db'}")
    first = train_all(root=str(tiny_repo), showcase="runs/demo")
    stages = [s["stage"] for s in first["stages"]]
    assert stages == ["data", "bootstrap", "stage1", "stage2", "stage3", "evaluate"]
    assert all(s["ran"] for s in first["stages"])
    assert first["gate"] is True and first["promotion"]["promoted"]
    version = first["promotion"]["version"]
    assert _champion(tiny_repo) == version
    showcase = tiny_repo / "runs/demo"
    assert len(list(showcase.glob("image-*.png"))) == 8 and (showcase / "answers.json").is_file()
    metrics = json.loads((tiny_repo / "runs/shapes/eval/metrics.json").read_text())
    assert 0.0 <= metrics["geneval_overall"] <= 1.0 and 0.0 <= metrics["vqa_accuracy"] <= 1.0
    assert metrics["fd_fenc"] >= 0.0
    export = tiny_repo / "runs/shapes/export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert first["export"]["ran"] and max(g["max_abs_diff"] for g in manifest["graphs"].values()) <= 1e-4
    serving = json.loads((showcase / "serving.json").read_text())  # the export answered over HTTP
    assert first["serving"]["backend"] == "onnxruntime" and (showcase / "serving-image.png").is_file()
    assert isinstance(serving["answer"], str)
    from serving.load import model_dir  # what `janusflow export|serve --model models:/...` resolves

    assert (model_dir("models:/janusflow@champion") / "config.json").is_file()
    with pytest.raises(ValueError, match="not in the MLflow registry"):
        model_dir("models:/janusflow@nosuchalias")

    # nothing changed: DVC skips every stage, the same weights are the same registry version
    again = train_all(root=str(tiny_repo), showcase="runs/demo")
    assert not any(s["ran"] for s in again["stages"]) and not again["export"]["ran"]
    assert again["promotion"]["version"] == version and _champion(tiny_repo) == version

    # impossible thresholds: the gate stops the flow, nothing is promoted, no showcase is made, the
    # export is not touched (it stays, so that the next test's flow, with the thresholds back and the
    # same gate.json, finds it up to date instead of exporting again)
    _write_yaml(tiny_repo / "params.yaml", _params(1.01))
    shutil.rmtree(showcase)
    exported = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in export.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="gate failed"):
        train_all(root=str(tiny_repo), showcase="runs/demo")
    gate = json.loads((tiny_repo / "runs/shapes/eval/gate.json").read_text())
    assert gate["passed"] is False
    assert _champion(tiny_repo) == version
    assert not showcase.exists()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in export.rglob("*") if p.is_file()} == exported
    _write_yaml(tiny_repo / "params.yaml", _params(0.0))


def test_deployment_is_created_and_run_by_a_worker(tiny_repo, prefect_server):
    env = {**_env(tiny_repo), "PREFECT_API_URL": prefect_server, "JANUSFLOW_ROOT": str(tiny_repo)}
    prefect = [sys.executable, "-m", "prefect"]

    def run(*args, check=True):
        return subprocess.run([*prefect, *args], cwd=tiny_repo, env=env, capture_output=True, text=True,
                              check=check, timeout=300)

    run("work-pool", "create", "local", "--type", "process", check=False)
    run("--no-prompt", "deploy", "--name", "train-all")
    started = run("deployment", "run", "train-all/train-all")
    assert "Created flow run" in started.stdout
    flow_run = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout).group(1)
    run("worker", "start", "--pool", "local", "--run-once")
    state = run("flow-run", "inspect", flow_run).stdout
    assert "COMPLETED" in state.upper(), state[-2000:]
