"""Where a served model comes from: a model directory, an MLflow registry URI
(`models:/janusflow@champion`, `models:/janusflow/3`) or an export directory (`janusflow export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.precision import DTYPES, resolve_dtype
from serving.backends import load_backend
from serving.export import MANIFEST
from serving.sampler import DEFAULT_BUCKETS, Sampler


def model_dir(source: str | Path) -> Path:
    """A local model directory for a path or a models:/ URI (downloaded from the registry)."""
    text = str(source)
    if text.startswith("models:/"):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        except Exception as exc:  # MLflow raises its own types for unknown names/aliases
            raise ValueError(f"{text}: not in the MLflow registry ({str(exc).splitlines()[0]})") from None
        inner = local / "artifacts" / "model"  # the pyfunc keeps the model directory as an artifact
        if not (inner / "config.json").is_file():
            raise FileNotFoundError(f"{text}: the registered model has no model directory artifact")
        return inner
    path = Path(text)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return path


def is_export(source: str | Path) -> bool:
    return not str(source).startswith("models:/") and (Path(source) / MANIFEST).is_file()


def load_sampler(source: str | Path, *, backend: str = "torch",
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, workers: int = 1, dtype: str = "fp32") -> Sampler:
    """A Sampler over `source` with `backend` (torch backends load weights; onnxruntime and
    tensorrt need an export directory). `workers` > 1: that many onnxruntime session sets, a batch's
    rows split over them (serving/backends.py). `dtype`: the torch backends' weights, fp32, bf16 or
    auto (bf16 on a CPU with AMX or AVX512-BF16; models/precision.py); exported graphs keep their own precision."""
    if workers != 1 and backend != "onnxruntime":
        raise ValueError(f"--workers {workers} runs parallel onnxruntime sessions: use --backend onnxruntime "
                         f"(not {backend})")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be fp32, bf16 or auto, got {dtype!r}")
    if dtype != "fp32" and not backend.startswith("torch"):
        raise ValueError(f"--dtype {dtype} sets the torch backends' weights; {backend} runs the exported "
                         "graphs' precision (TensorRT: `janusflow export --engine --precision bf16`)")
    if is_export(source):
        if backend.startswith("torch"):
            raise ValueError(f"{source} is an export directory: serve it with --backend onnxruntime or "
                             "tensorrt, or give the model directory for the torch backend")
        extra = {"workers": workers} if backend == "onnxruntime" else {}
        return Sampler.from_export(source, load_backend(backend, export_dir=source, **extra), buckets=buckets)
    if not backend.startswith("torch"):
        raise ValueError(f"--backend {backend} runs exported graphs: run `janusflow export --model {source} "
                         "--out DIR` and serve DIR")
    from models.checkpoint import from_pretrained

    bf16 = resolve_dtype(dtype, "cpu") == "bf16"
    model, processor = from_pretrained(model_dir(source), dtype=torch.bfloat16 if bf16 else None)
    return Sampler.from_model(model, processor, load_backend(backend, model=model), buckets=buckets)
