"""Prefect flows: `train-all` (the whole pipeline), `evaluate`, `promote`, `export`.

Each pipeline step is a task that calls `dvc repro <stage>`, so DVC decides what is stale (an
unchanged stage is skipped, by DVC and therefore by the flow) and the same stages run by hand with
`dvc repro`. After the gate, the evaluated model is registered in MLflow as `challenger` and promoted
to `champion` by the registry's rules, exported to ONNX (`dvc repro export`) and served over HTTP
once as a smoke test; a model that failed its gates stops the flow there, so nothing after it (export,
the smoke tests) runs and the champion is unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STAGES = ("data", "bootstrap", "stage1", "stage2", "stage3")
EVAL_DIR = Path("runs/shapes/eval")
EXPORT_DIR = Path("runs/shapes/export")


class GateFailed(RuntimeError):
    """The evaluated model missed a gate: it stays `challenger` and nothing after the gate runs."""


class StageFailed(RuntimeError):
    """`dvc repro STAGE` exited non-zero; the message ends with the command's last output line."""


def _env(root: Path) -> dict:
    """Subprocess environment: this interpreter's scripts first on PATH (DVC runs `janusflow`) and
    one MLflow database for every stage."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def repro(stage: str, root: Path = ROOT) -> dict:
    """Run `dvc repro STAGE`; returns {stage, ran, seconds}. `ran` is False when DVC skipped it."""
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", stage], cwd=root, env=_env(root), capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = output.splitlines()[-1] if output else "no output"
        raise StageFailed(f"dvc repro {stage} failed (exit {proc.returncode}): {last}")
    skipped = f"Stage '{stage}' didn't change, skipping" in output
    return {"stage": stage, "ran": not skipped, "seconds": round(time.perf_counter() - start, 1)}


@task(name="dvc-stage", retries=1, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def stage_task(stage: str, root: str = str(ROOT)) -> dict:
    result = repro(stage, Path(root))
    get_run_logger().info("%s: %s in %.1fs", stage, "ran" if result["ran"] else "unchanged, skipped",
                          result["seconds"])
    return result


@task(name="gate")
def gate_task(root: str = str(ROOT)) -> dict:
    """`dvc repro gate`; a failed gate is a decision, not an error: read it from gate.json."""
    base = Path(root)
    try:
        repro("gate", base)
    except StageFailed:
        if not (base / EVAL_DIR / "gate.json").is_file():
            raise
    decision = json.loads((base / EVAL_DIR / "gate.json").read_text())
    rows = [{"metric": c["metric"], "value": c["value"], "threshold": f"{c['op']} {c['threshold']}",
             "passed": c["passed"]} for c in decision["checks"]]
    create_table_artifact(key="gate-decision", table=rows,
                          description=f"gate {'passed' if decision['passed'] else 'FAILED'}")
    return decision


@task(name="report")
def report_task(root: str = str(ROOT)) -> dict:
    base = Path(root)
    metrics = json.loads((base / EVAL_DIR / "metrics.json").read_text())
    report = (base / EVAL_DIR / "report" / "report.md").read_text()
    run = base / EVAL_DIR / "mlflow_run.json"
    run_id = json.loads(run.read_text())["run_id"] if run.is_file() else None
    uri = _env(base)["MLFLOW_TRACKING_URI"]
    create_markdown_artifact(key="evaluation-report",
                             markdown=report + f"\n\nMLflow run: `{run_id}` in `{uri}`\n",
                             description="janusflow eval")
    return {"metrics": metrics, "run_id": run_id}


@task(name="register-and-promote")
def register_task(gate: dict, run_id: str | None, root: str = str(ROOT)) -> dict:
    from flows.cli_registry import promotion_params
    from flows.registry import log_and_register, promote_challenger

    base = Path(root)
    os.environ.setdefault("MLFLOW_TRACKING_URI", _env(base)["MLFLOW_TRACKING_URI"])
    metrics = json.loads((base / EVAL_DIR / "metrics.json").read_text())
    spec = promotion_params(str(base / "params.yaml"))
    version = log_and_register(base / "runs/shapes/stage3/model", metrics, gate, run_id=run_id)
    decision = promote_challenger(version, primary=spec["primary"], margin=float(spec["margin"]),
                                  run_id=run_id)
    create_markdown_artifact(key="promotion", markdown=(
        f"# Registry\n\nVersion **{version}** registered as `challenger`: "
        f"{'promoted to `champion`' if decision.promoted else 'not promoted'} ({decision.reason}).\n\n"
        + "\n".join(f"- delta {k}: {v:+.4f}" for k, v in decision.deltas.items())))
    return decision.to_dict()


@task(name="champion-smoke-test")
def smoke_task(out: str, root: str = str(ROOT)) -> dict:
    """Load models:/janusflow@champion as MLflow serves it, draw images and answer questions;
    writes them under `out`."""
    from flows.demo import champion_showcase

    os.environ.setdefault("MLFLOW_TRACKING_URI", _env(Path(root))["MLFLOW_TRACKING_URI"])
    return champion_showcase(Path(out))


@task(name="serving-smoke-test")
def serve_smoke_task(out: str, root: str = str(ROOT)) -> dict:
    """Serve the export with onnxruntime over HTTP: one image, one answer (serving/service.py)."""
    from serving.service import smoke_test

    result = smoke_test(Path(root) / EXPORT_DIR, out)
    create_markdown_artifact(key="serving-smoke-test", markdown=(
        f"# Serving smoke test ({result['backend']})\n\n- image for '{result['prompt']}' in "
        f"{result['image_seconds']} s\n- '{result['question']}' -> '{result['answer']}' "
        f"in {result['chat_seconds']} s\n"))
    return result


def parent_run(root: Path) -> str:
    """The pipeline's MLflow run; every stage's run nests under it (JANUSFLOW_PARENT_RUN_ID)."""
    from flows.cli_train import PARENT_RUN_ENV
    from flows.train.tracking import experiment_id, git_commit, open_client

    client = open_client(_env(root)["MLFLOW_TRACKING_URI"])
    run_id = client.create_run(experiment_id(client, "janusflow"), tags={"mlflow.runName": "train-all", "stage": "pipeline",
                                             "git_commit": git_commit()}).info.run_id
    os.environ[PARENT_RUN_ENV] = run_id
    return run_id


def end_run(root: Path, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    from flows.cli_train import PARENT_RUN_ENV

    MlflowClient(tracking_uri=_env(root)["MLFLOW_TRACKING_URI"]).set_terminated(run_id, status=status)
    os.environ.pop(PARENT_RUN_ENV, None)


@flow(name="train-all", log_prints=True)
def train_all(root: str = str(ROOT), showcase: str = "runs/demo") -> dict:
    """data -> bootstrap -> stage 1-3 -> evaluate -> gate -> registry -> export -> smoke tests."""
    run_id = parent_run(Path(root))
    try:
        summary = _train_all(root, showcase)
    except BaseException:
        end_run(Path(root), run_id, "FAILED")
        raise
    end_run(Path(root), run_id, "FINISHED")
    summary["mlflow_parent_run"] = run_id
    return summary


def _train_all(root: str, showcase: str) -> dict:
    ran = [stage_task(s, root) for s in TRAIN_STAGES]
    ran.append(stage_task("evaluate", root))
    evaluation = report_task(root)
    gate = gate_task(root)
    decision = register_task(gate, evaluation["run_id"], root)
    summary = {"stages": ran, "gate": gate["passed"], "promotion": decision,
               "metrics": evaluation["metrics"]}
    if not gate["passed"]:
        failed = [c["metric"] for c in gate["checks"] if not c["passed"]]
        raise GateFailed(f"gate failed on {', '.join(failed)}: version {decision['version']} "
                           f"stays challenger, champion unchanged, nothing exported")
    summary["export"] = stage_task("export", root)
    summary["showcase"] = smoke_task(str(Path(root) / showcase), root)
    summary["serving"] = serve_smoke_task(str(Path(root) / showcase), root)
    return summary


@flow(name="evaluate", log_prints=True)
def evaluate_flow(root: str = str(ROOT)) -> dict:
    stage_task("evaluate", root)
    out = report_task(root)
    out["gate"] = gate_task(root)["passed"]
    return out


@flow(name="export", log_prints=True)
def export_flow(model: str = "models:/janusflow@champion", out: str = "runs/champion-export",
                engine: bool = False, root: str = str(ROOT)) -> dict:
    """Export a model (default: the registry's champion) to ONNX, parity-checked; with engine=True
    also TensorRT engines (GPU hosts)."""
    from serving.export import export_model

    os.environ.setdefault("MLFLOW_TRACKING_URI", _env(Path(root))["MLFLOW_TRACKING_URI"])
    target = Path(root) / out
    manifest = export_model(model, target, engine=engine, progress=False)
    return {"out": str(target), "graphs": {k: v["max_abs_diff"] for k, v in manifest["graphs"].items()}}


@flow(name="promote", log_prints=True)
def promote_flow(version: str | None = None, rollback: bool = False, force: bool = False,
                 root: str = str(ROOT)) -> dict:
    """Promote a registered version to champion (or roll the champion back)."""
    from flows import registry

    os.environ.setdefault("MLFLOW_TRACKING_URI", _env(Path(root))["MLFLOW_TRACKING_URI"])
    if rollback:
        old, new = registry.rollback()
        return {"champion": new, "was": old}
    if version is None:
        raise ValueError("promote: give a version, or rollback=True")
    return {"champion": registry.promote(version, force=force)}
