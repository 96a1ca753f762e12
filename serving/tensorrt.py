"""TensorRT engines from an export directory (`janusflow export --engine`) and the `tensorrt` backend.

Written against the TensorRT 10 Python API (`import tensorrt as trt`). TensorRT cannot be installed
on the CPU machines this project is developed on, so this module is tested against a stand-in
module with the same API (tests/fake_tensorrt.py) that runs the ONNX graphs with onnxruntime;
on a GPU host it runs the real thing.

- One optimization profile per batch bucket: the batch dims of a graph are fixed to the bucket's
  size (twice that for the CFG-doubled velocity graph), sequence dims range over 1 .. max length.
- Precision: at the export's precision (fp32) the network is strongly typed, every tensor as in the
  ONNX graph. `--precision bf16|fp16` builds a weakly typed network with the BF16/FP16 builder flag:
  TensorRT runs bf16 kernels wherever it supports them and they are faster, inputs and outputs stay
  fp32 (the sampler is unchanged), and the precision-sensitive layers (reductions, so RMS norms and
  the GRN, softmax, normalization) are pinned to fp32. (TensorRT 10 deprecates weak typing in favour
  of graphs exported in bf16; those are not written yet.) Precision is part of the cache key.
- A persistent timing cache (engines/timing.cache) makes rebuilds fast.
- Engines live under engines/<key>/, the key a hash of the ONNX file's sha256, the TensorRT
  version, the GPU name and compute capability, the precision and the profiles. Loading checks
  every one of those against the running host and refuses a mismatched engine with a clear message.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import torch

from serving.export import OUTPUTS, read_manifest

ENGINE_DIR = "engines"
TIMING_CACHE = "timing.cache"
# How many rows a graph runs per request row: the velocity graph carries the CFG rows too.
BATCH_MULTIPLIER = {"velocity": 2}
BATCH_DIMS = ("batch", "images")
DEFAULT_OPT_LENGTH = 64


class EngineMismatch(RuntimeError):
    """A cached engine was built for another GPU, TensorRT version, precision or ONNX file."""


def _trt():
    try:
        return importlib.import_module(os.environ.get("JANUSFLOW_TENSORRT_MODULE", "tensorrt"))
    except ImportError as exc:
        raise RuntimeError("the tensorrt backend needs NVIDIA TensorRT (pip install 'janusflow[gpu]' on a "
                           "CUDA host); use --backend onnxruntime or torch here") from exc


def device_info() -> dict:
    """The GPU the engines are for: name and compute capability ('cpu' without CUDA)."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    return {"gpu": "cpu", "compute_capability": "none"}


def profiles(entry: dict, buckets: list[int], max_length: int, multiplier: int = 1) -> list[dict]:
    """Per bucket: {input name: (min, opt, max) shapes} from the manifest's symbolic shapes."""
    out = []
    for b in buckets:
        rows = b * multiplier
        spec = {}
        for inp in entry["inputs"]:
            lo, opt, hi = [], [], []
            for d in inp["shape"]:
                if isinstance(d, int):
                    lo.append(d), opt.append(d), hi.append(d)
                elif d in BATCH_DIMS:
                    lo.append(rows), opt.append(rows), hi.append(rows)
                else:  # a sequence length
                    lo.append(1), opt.append(min(DEFAULT_OPT_LENGTH, max_length)), hi.append(max_length)
            spec[inp["name"]] = (tuple(lo), tuple(opt), tuple(hi))
        out.append(spec)
    return out


def cache_key(onnx_sha256: str, *, trt_version: str, device: dict, precision: str, profile_spec) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "tensorrt": trt_version, **device, "precision": precision,
                       "profiles": profile_spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _bucket_batches(buckets: list[int], graph: str) -> list[int]:
    # the prefix graph also runs the single BOS-only row: bucket 1 must exist for it
    return sorted(set(buckets) | ({1} if graph == "prefix" else set()))


def build_engines(export_dir: str | Path, *, buckets: list[int], precision: str = "fp32",
                  max_length: int | None = None, progress: bool = True) -> dict:
    """Build (or reuse from the cache) one engine per graph; writes engines/engines.json."""
    trt = _trt()
    from models.checkpoint import read_config

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    max_length = max_length or read_config(export_dir).llm.max_position_embeddings
    if manifest["precision"] != "fp32" and precision != manifest["precision"]:
        raise ValueError(f"the ONNX graphs are {manifest['precision']}: build them at that precision")
    root = export_dir / ENGINE_DIR
    root.mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    timing_path = root / TIMING_CACHE
    device = device_info()
    index = {"tensorrt": trt.__version__, **device, "precision": precision, "buckets": buckets, "engines": {}}
    for graph, entry in manifest["graphs"].items():
        spec = profiles(entry, _bucket_batches(buckets, graph), max_length, BATCH_MULTIPLIER.get(graph, 1))
        key = cache_key(entry["sha256"], trt_version=trt.__version__, device=device, precision=precision,
                        profile_spec=spec)
        target = root / key / f"{graph}.engine"
        if not target.is_file():
            if progress:
                print(f"building TensorRT engine for {graph} ({len(spec)} profiles)", flush=True)
            _build_one(trt, logger, export_dir / entry["file"], target, spec, precision, timing_path)
        meta = {"graph": graph, "key": key, "onnx_sha256": entry["sha256"], "tensorrt": trt.__version__,
                **device, "precision": precision, "profiles": [{k: list(map(list, v)) for k, v in p.items()}
                                                                for p in spec],
                "batches": [p[next(iter(p))][1][0] for p in spec]}  # rows of the first input
        (target.parent / f"{graph}.json").write_text(json.dumps(meta, indent=1))
        index["engines"][graph] = str(target.relative_to(export_dir))
    (root / "engines.json").write_text(json.dumps(index, indent=2))
    return index


def _build_one(trt, logger, onnx_path: Path, target: Path, spec: list[dict], precision: str,
               timing_path: Path) -> None:
    builder = trt.Builder(logger)
    mixed = precision in ("bf16", "fp16")  # over fp32 graphs: TensorRT picks lower-precision kernels
    flags = 0 if mixed else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if mixed:
        config.set_flag(trt.BuilderFlag.BF16 if precision == "bf16" else trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        keep = {trt.LayerType.REDUCE, trt.LayerType.SOFTMAX, trt.LayerType.NORMALIZATION}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in spec:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, target)
    timing_tmp = timing_path.with_suffix(".tmp")
    timing_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(timing_tmp, timing_path)


def check_engine(meta: dict, *, trt_version: str, device: dict, onnx_sha256: str) -> None:
    """Raise EngineMismatch naming what differs between an engine and this host/export."""
    wants = {"tensorrt": trt_version, "gpu": device["gpu"], "compute_capability": device["compute_capability"],
             "onnx_sha256": onnx_sha256}
    diffs = [f"{k} {meta.get(k)!r} (here {v!r})" for k, v in wants.items() if meta.get(k) != v]
    if diffs:
        raise EngineMismatch(f"engine for '{meta.get('graph')}' was built for another setup: "
                             f"{', '.join(diffs)}; rebuild with `janusflow export --engine`")


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


class TensorRTBackend:
    """Runs the engines built by build_engines; picks each call's profile from its batch size."""

    def __init__(self, export_dir: str | Path):
        trt = self.trt = _trt()
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        index_path = self.export_dir / ENGINE_DIR / "engines.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no TensorRT engines in {self.export_dir}: build them with "
                                    "`janusflow export --engine`")
        index = json.loads(index_path.read_text())
        self.name = "tensorrt"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        here = device_info()
        self.engines, self.contexts, self.batches = {}, {}, {}
        for graph, rel in index["engines"].items():
            path = self.export_dir / rel
            meta = json.loads(path.with_suffix(".json").read_text())
            check_engine(meta, trt_version=trt.__version__, device=here,
                         onnx_sha256=manifest["graphs"][graph]["sha256"])
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineMismatch(f"TensorRT could not load {path}; rebuild with `janusflow export --engine`")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
            self.batches[graph] = meta["batches"]
        self.graphs = set(self.engines)
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def _profile(self, graph: str, rows: int) -> int:
        batches = self.batches[graph]
        if rows not in batches:
            raise ValueError(f"no TensorRT profile of '{graph}' for batch {rows}: built for {batches}")
        return batches.index(rows)

    def run(self, graph: str, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trt, engine, context = self.trt, self.engines[graph], self.contexts[graph]
        first = next(iter(inputs.values()))
        rows = first.shape[0]  # every graph's first input is batch-major
        handle = self.stream.cuda_stream if self.stream is not None else 0
        context.set_optimization_profile_async(self._profile(graph, rows), handle)
        keep = []
        for name, tensor in inputs.items():
            want = _TORCH_DTYPES[trt.nptype(engine.get_tensor_dtype(name)).__name__]
            t = tensor.to(self.device, dtype=want).contiguous()
            keep.append(t)
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in OUTPUTS[graph]:
            shape = tuple(context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[trt.nptype(engine.get_tensor_dtype(name)).__name__]
            out = torch.empty(shape, dtype=dtype, device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(handle):
            raise RuntimeError(f"TensorRT execution of '{graph}' failed")
        if self.stream is not None:
            self.stream.synchronize()
        del keep
        return tuple(outputs)  # on the GPU, for the next call (see serving/backends.py)
