"""The MLflow model registry of janusflow: `challenger`, `champion`, `previous`, promotion rules and
rollback.

Every evaluated model is logged as an MLflow pyfunc model (the pipeline directory is its artifact)
and registered under one name with alias `challenger`. It becomes `champion` only if it passed its
gates and is not worse than the current champion on the primary metric beyond a margin; the first
passing model is promoted. The champion it replaces keeps alias `previous`, and the version tag
`replaced` remembers the chain so `rollback` can walk back more than once. Facts the rules need
(gate result, metrics) are version tags, so `promote --version N` can check them later.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.train.tracking import experiment_id, open_client, tracking_uri

MODEL_NAME = "janusflow"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


class RegistryError(ValueError):
    """A promotion the rules forbid, or a version/alias that does not exist (one-line message)."""


class JanusFlowModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of the pipeline: rows with `prompt` (and optional seed, steps, guidance)
    give PNG images as base64; rows with `image` (base64) and `question` give answers. (Without the
    type hint on `predict`, MLflow warns at class definition, in every command importing this.)"""

    def load_context(self, context):
        from models.pipeline import JanusFlowPipeline

        self.pipe = JanusFlowPipeline.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import base64
        import io

        from PIL import Image

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        out = []
        for row in rows:
            if row.get("prompt"):
                image = self.pipe(row["prompt"], num_inference_steps=int(row.get("steps") or 30),
                                  guidance_scale=float(row.get("guidance") or 2.0),
                                  seed=int(row.get("seed") or 0))[0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                out.append(base64.b64encode(buf.getvalue()).decode())
            else:
                image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
                out.append(self.pipe.answer(image, row["question"]))
        return out


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    deltas: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def client() -> MlflowClient:
    uri = tracking_uri(None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return open_client(uri, registry=True)


def alias_version(c: MlflowClient, alias: str, name: str = MODEL_NAME) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_metrics(c: MlflowClient, version: str, name: str = MODEL_NAME) -> dict:
    tags = c.get_model_version(name, version).tags
    return json.loads(tags.get("metrics", "{}"))


def log_and_register(model_dir: str | Path, metrics: dict, gate: dict, *, run_id: str | None = None,
                     name: str = MODEL_NAME) -> str:
    """Log model_dir as a pyfunc model under `run_id` (a new run if None), register it, tag it with
    its metrics and gate result and give it alias `challenger`. Returns the version."""
    c = client()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model directory (no config.json)")
    digest = model_hash(model_dir)
    try:
        known = c.search_model_versions(f"name='{name}' and tag.model_hash='{digest}'")
    except MlflowException:
        known = []
    if known:  # the same weights were registered already (a rerun with nothing changed)
        version = str(max(int(v.version) for v in known))
        c.set_registered_model_alias(name, CHALLENGER, version)
        return version
    if run_id is None:
        run_id = c.create_run(experiment_id(c, "janusflow"), tags={"mlflow.runName": "register"}).info.run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=JanusFlowModel(),
                                       artifacts={"model": str(model_dir)},
                                       pip_requirements=["janusflow"])
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="JanusFlow pipelines that passed through janusflow eval")
    mv = c.create_model_version(name, source=info.model_uri, run_id=run_id,
                                tags={"gate_passed": str(bool(gate.get("passed"))).lower(),
                                      "metrics": json.dumps({k: v for k, v in metrics.items()
                                                             if isinstance(v, (int, float))}),
                                      "model_dir": str(model_dir.resolve()), "model_hash": digest})
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def model_hash(model_dir: Path) -> str:
    """sha256 over the directory's files (names and bytes): the identity of a set of weights."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _deltas(new: dict, old: dict) -> dict:
    return {k: new[k] - old[k] for k in new if k in old and isinstance(new[k], (int, float))}


def decide_promotion(version: str, *, primary: str, margin: float, higher_is_better: bool = True,
                     name: str = MODEL_NAME) -> Decision:
    """Apply the rules to a registered version (promote it or not); record nothing yet."""
    c = client()
    mv = c.get_model_version(name, version)
    metrics = json.loads(mv.tags.get("metrics", "{}"))
    champion = alias_version(c, CHAMPION, name)
    old = version_metrics(c, champion, name) if champion else {}
    deltas = _deltas(metrics, old)
    if mv.tags.get("gate_passed") != "true":
        return Decision(version, False, "failed its gates", champion, deltas)
    if champion is None:
        return Decision(version, True, "first model to pass the gates", None, deltas)
    if primary not in metrics or primary not in old:
        return Decision(version, False, f"primary metric {primary} missing", champion, deltas)
    gain = deltas[primary] if higher_is_better else -deltas[primary]
    if gain >= -margin:
        return Decision(version, True, f"{primary} {metrics[primary]:.4f} vs champion "
                                       f"{old[primary]:.4f} (within margin {margin})", champion, deltas)
    return Decision(version, False, f"{primary} {metrics[primary]:.4f} worse than champion "
                                    f"{old[primary]:.4f} by more than {margin}", champion, deltas)


def set_champion(version: str, *, name: str = MODEL_NAME) -> None:
    """Make `version` champion; the champion it replaces becomes `previous`."""
    c = client()
    current = alias_version(c, CHAMPION, name)
    if current == version:
        return
    if current is not None:
        c.set_registered_model_alias(name, PREVIOUS, current)
        c.set_model_version_tag(name, version, "replaced", current)
    c.set_registered_model_alias(name, CHAMPION, version)


def promote_challenger(version: str, *, primary: str, margin: float, run_id: str | None = None,
                       name: str = MODEL_NAME) -> Decision:
    """The pipeline's promotion step: decide, act, and record the decision on the run."""
    decision = decide_promotion(version, primary=primary, margin=margin, name=name)
    if decision.promoted:
        set_champion(version, name=name)
    if run_id:
        record(run_id, decision)
    return decision


def record(run_id: str, decision: Decision) -> None:
    c = client()
    c.set_tag(run_id, "promotion", "promoted" if decision.promoted else "not promoted")
    c.set_tag(run_id, "promotion_reason", decision.reason)
    c.set_tag(run_id, "champion_before", decision.champion_before or "none")
    for k, v in decision.deltas.items():
        c.log_metric(run_id, f"delta_{k}", float(v))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "promotion.json"
        path.write_text(json.dumps(decision.to_dict(), indent=2))
        c.log_artifact(run_id, str(path))


def promote(version: str, *, force: bool = False, name: str = MODEL_NAME) -> str:
    """`janusflow promote --version N`: a version that failed its gates needs force."""
    c = client()
    try:
        mv = c.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model {name} has no version {version}") from None
    if mv.tags.get("gate_passed") != "true" and not force:
        raise RegistryError(f"version {version} failed its gates; pass --force to promote it anyway")
    set_champion(str(version), name=name)
    return str(version)


def rollback(*, name: str = MODEL_NAME) -> tuple[str, str]:
    """Champion goes back to the version it replaced. Returns (old champion, new champion)."""
    c = client()
    current = alias_version(c, CHAMPION, name)
    if current is None:
        raise RegistryError(f"model {name} has no champion to roll back")
    replaced = c.get_model_version(name, current).tags.get("replaced")
    if not replaced:
        raise RegistryError(f"champion version {current} replaced nothing: no earlier champion")
    c.set_registered_model_alias(name, CHAMPION, replaced)
    before = c.get_model_version(name, replaced).tags.get("replaced")
    if before:
        c.set_registered_model_alias(name, PREVIOUS, before)
    else:
        c.delete_registered_model_alias(name, PREVIOUS)
    return current, replaced
