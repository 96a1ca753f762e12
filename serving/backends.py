"""Backends that run the graphs of serving/graphs.py: `torch` (eager or torch.compile), `onnxruntime`
(an export directory), `tensorrt` (engines built from it, serving/tensorrt.py).

Every backend has one method, `run(graph, **inputs) -> tuple of tensors`, with the graph's input
names, and a set `graphs` of the graphs it can run, so the sampler above them is backend-agnostic.
Outputs stay where the backend computed them (the GPU for torch and tensorrt on a CUDA host, in the
model's dtype): the prompt's keys/values are reused at every step, and copying them to the host and
back each step would cost more than the step.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from serving import BACKENDS
from serving.export import OUTPUTS, read_manifest
from serving.graphs import FP32_INPUTS, GRAPHS


class TorchBackend:
    """The PyTorch model itself, through the same graph modules that are exported."""

    def __init__(self, model, *, compile: bool = False):
        self.model = model.eval()
        self.name = "torch-compile" if compile else "torch"
        self.device = model.device
        self.dtype = model.gen_enc_aligner.weight.dtype
        self.modules = {}
        for name, cls in GRAPHS.items():
            module = cls(model).eval()
            self.modules[name] = torch.compile(module, dynamic=True) if compile else module
        self.graphs = set(self.modules)

    @torch.no_grad()
    def run(self, graph: str, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {k: v.to(self.device, dtype=torch.float32 if k in FP32_INPUTS else self.dtype)
                 if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()}
        out = self.modules[graph](**feeds)
        return out if isinstance(out, tuple) else (out,)


class OnnxRuntimeBackend:
    """ONNX Runtime sessions over an export directory; providers default to what is installed, best
    first (TensorRT, CUDA, CPU).

    `workers: N` opens N independent sets of sessions (`replicas`), each with `threads` threads (default:
    this machine's cores / N); the sampler runs a batch's rows on them in parallel. On a CPU, N
    one-thread workers on N cores beat one N-thread session: most of a step's kernels are too small
    to split over threads (2 cores, shapes preset, batch 8: 2.36x against 1.87x the official loop,
    docs/benchmarks.md). Each worker holds its own copy of the weights."""

    def __init__(self, export_dir: str | Path, *, providers: list[str] | None = None, threads: int = 0,
                 workers: int = 1):
        import onnxruntime as ort

        if workers < 1 or threads < 0:
            raise ValueError(f"onnxruntime needs workers >= 1 and threads >= 0, got {workers} and {threads}")
        if workers > 1 and not threads:
            threads = max(1, len(os.sched_getaffinity(0)) // workers)
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider") if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ValueError(f"onnxruntime has no {', '.join(missing)} here (available: {', '.join(available)})")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.name = "onnxruntime"
        self.sessions = {name: ort.InferenceSession(str(self.export_dir / entry["file"]), options,
                                                    providers=wanted)
                         for name, entry in self.manifest["graphs"].items()}
        self.graphs = set(self.sessions)
        self.replicas = [self] + [OnnxRuntimeBackend(export_dir, providers=wanted, threads=threads)
                                  for _ in range(workers - 1)]

    def run(self, graph: str, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        session = self.sessions.get(graph)
        if session is None:
            raise KeyError(f"the export in {self.export_dir} has no '{graph}' graph")
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        return tuple(torch.from_numpy(o) for o in session.run(OUTPUTS[graph], feeds))


def load_backend(name: str, *, model=None, export_dir: str | Path | None = None, **kwargs):
    """A backend by name: torch ones need `model`, onnxruntime and tensorrt an export directory."""
    if name in ("torch", "torch-compile"):
        if model is None:
            raise ValueError(f"backend '{name}' needs a PyTorch model (a model directory or models:/ URI)")
        return TorchBackend(model, compile=name == "torch-compile")
    if export_dir is None:
        raise ValueError(f"backend '{name}' needs an export directory (write one with `janusflow export`)")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(export_dir, **kwargs)
    if name == "tensorrt":
        from serving.tensorrt import TensorRTBackend

        return TensorRTBackend(export_dir, **kwargs)
    raise ValueError(f"unknown backend '{name}': choose from {', '.join(BACKENDS)}")
