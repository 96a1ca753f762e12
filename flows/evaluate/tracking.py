"""The evaluation's MLflow run: metrics, the report folder and metrics.json as artifacts."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import mlflow

from flows.train.tracking import experiment_id, flatten, git_commit, open_client, tracking_uri
from models.precision import resolve_dtype

EXPERIMENT = "janusflow"


def log_evaluation(metrics: dict, *, model: Path, report: Path, metrics_file: Path, cfg,
                   parent_run_id: str | None = None, experiment: str = EXPERIMENT) -> str:
    uri = tracking_uri(None)
    client = open_client(uri)
    exp_id = experiment_id(client, experiment)
    tags = {"stage": "evaluate", "git_commit": git_commit(), "model_dir": str(model.resolve()),
            "mlflow.runName": "evaluate", "dtype": resolve_dtype(cfg.dtype, cfg.device)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    params = flatten("eval", dataclasses.asdict(cfg), {})
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in sorted(params.items())],
                     metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())
                              if isinstance(v, (int, float))])
    client.log_artifacts(run_id, str(report), "report")
    client.log_artifact(run_id, str(metrics_file))
    client.set_terminated(run_id, status="FINISHED")
    return run_id
