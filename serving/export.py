"""`janusflow export`: the graphs of serving/graphs.py to ONNX, each checked against PyTorch.

An export directory holds one .onnx file per graph, the model's config.json and tokenizer (so it can
be served without the PyTorch weights), and manifest.json: per graph its input/output names, shapes
(symbolic where dynamic) and dtypes, the sha256 of the file and the largest difference from PyTorch
measured on fresh random inputs of another batch size; plus opset, precision and the source model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim
from tqdm import tqdm

from data.shards import sha256_file
from models.checkpoint import write_config
from models.janusflow import JanusFlow
from serving.graphs import GRAPHS, image_index

OPSET = 18
MANIFEST = "manifest.json"
# fp32 parity bound the issue sets: ONNX Runtime on CPU lands near 1e-6 on these graphs.
PARITY_ATOL = 1e-4


class ExportError(RuntimeError):
    """An export or its parity check failed; the message names the graph."""


@dataclass
class Example:
    """Inputs of one graph: tensors by name and which dims are dynamic (dim index -> name)."""

    tensors: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]


def _kv(model: JanusFlow, b: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config.llm
    shape = (c.num_hidden_layers, b, c.num_key_value_heads, t, c.hidden_size // c.num_attention_heads)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _mask(b: int, t: int, lengths: torch.Tensor) -> torch.Tensor:
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()


def example(name: str, model: JanusFlow, *, batch: int, length: int, seed: int = 0) -> Example:
    """Random but valid inputs for graph `name`: prompts right-padded to `length` tokens."""
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    vocab = cfg.llm.vocab_size
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length  # the longest row fills the padded length, as a real batch does
    mask = _mask(batch, length, lengths)
    kv_dims = {1: "batch", 3: "prefix"}
    if name == "prefix":
        ids = torch.randint(2, vocab, (batch, length), generator=gen)
        return Example({"input_ids": ids, "attention_mask": mask},
                       {"input_ids": {0: "batch", 1: "prefix"}, "attention_mask": {0: "batch", 1: "prefix"}})
    if name == "velocity":
        keys, values = _kv(model, batch, length, gen)
        z = torch.randn(batch, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)
        return Example({"z_t": z, "t": torch.rand(batch, generator=gen), "keys": keys, "values": values,
                        "prefix_mask": mask, "lengths": lengths},
                       {"z_t": {0: "batch"}, "t": {0: "batch"}, "keys": kv_dims, "values": kv_dims,
                        "prefix_mask": {0: "batch", 1: "prefix"}, "lengths": {0: "batch"}})
    if name == "cfg_step":
        keys, values = _kv(model, batch, length, gen)
        uncond_keys, uncond_values = _kv(model, 1, 1, gen)
        z = torch.randn(batch, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)
        return Example({"z": z, "t": torch.rand(batch, generator=gen), "dt": torch.full((batch,), 1 / 30),
                        "guidance": 1 + 4 * torch.rand(batch, generator=gen), "keys": keys, "values": values,
                        "prefix_mask": mask, "lengths": lengths, "uncond_keys": uncond_keys,
                        "uncond_values": uncond_values},
                       {"z": {0: "batch"}, "t": {0: "batch"}, "dt": {0: "batch"}, "guidance": {0: "batch"},
                        "keys": kv_dims, "values": kv_dims, "prefix_mask": {0: "batch", 1: "prefix"},
                        "lengths": {0: "batch"}})
    if name == "vae_decoder":
        z = torch.randn(batch, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)
        return Example({"latents": z}, {"latents": {0: "batch"}})
    if name == "vision":
        s = cfg.vision.image_size
        return Example({"pixel_values": torch.rand(batch, 3, s, s, generator=gen) * 2 - 1},
                       {"pixel_values": {0: "batch"}})
    if name == "und_prefill":
        n = 1 + cfg.num_und_tokens
        t = length + n
        ids = torch.randint(2, vocab, (batch, t), generator=gen)
        image_mask = torch.zeros(batch, t, dtype=torch.bool)
        image_mask[:, 1:1 + n] = True  # one image per row after the first token
        embeds = torch.randn(batch, n, cfg.llm.hidden_size, generator=gen)
        full = lengths + n
        return Example({"input_ids": ids, "image_index": image_index(image_mask), "image_embeds": embeds,
                        "attention_mask": _mask(batch, t, full), "last": full - 1},
                       {"input_ids": {0: "batch", 1: "tokens"}, "image_index": {0: "batch", 1: "tokens"},
                        "image_embeds": {0: "images"}, "attention_mask": {0: "batch", 1: "tokens"},
                        "last": {0: "batch"}})
    if name == "decode_step":
        keys, values = _kv(model, batch, length, gen)
        return Example({"input_ids": torch.randint(2, vocab, (batch, 1), generator=gen), "keys": keys,
                        "values": values,
                        "attention_mask": torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1),
                        "position_ids": lengths.view(-1, 1)},
                       {"input_ids": {0: "batch"}, "keys": {1: "batch", 3: "past"},
                        "values": {1: "batch", 3: "past"}, "attention_mask": {0: "batch", 1: "total"},
                        "position_ids": {0: "batch"}})
    raise ValueError(f"unknown graph '{name}': choose from {', '.join(GRAPHS)}")


OUTPUTS = {"prefix": ["keys", "values"], "velocity": ["velocity"], "cfg_step": ["z_next"],
           "vae_decoder": ["images"],
           "vision": ["image_embeds"], "und_prefill": ["logits", "keys", "values"],
           "decode_step": ["logits", "new_keys", "new_values"]}


def _dynamic_shapes(ex: Example) -> dict:
    dims: dict[str, Dim] = {}
    out = {}
    for name, spec in ex.dynamic.items():
        out[name] = {i: dims.setdefault(d, Dim(d, min=1, max=4096)) for i, d in spec.items()}
    for name in ex.tensors:
        out.setdefault(name, None)
    return out


def export_graph(model: JanusFlow, name: str, path: Path, *, opset: int = OPSET) -> None:
    """Write graph `name` to `path` (ONNX, fp32) with dynamic batch and sequence dims."""
    module = GRAPHS[name](model).eval()
    # batch 2 and length 5 as trace sizes: 0 and 1 would be specialised by torch.export
    ex = example(name, model, batch=2, length=5)
    names = list(ex.tensors)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tuple(ex.tensors.values()), dynamo=True, opset_version=opset,
                                    input_names=names, output_names=OUTPUTS[name],
                                    dynamic_shapes=_dynamic_shapes(ex), verbose=False)
    if program is None:
        raise ExportError(f"{name}: torch.onnx.export returned no program")
    tmp = path.with_suffix(".onnx.tmp")
    program.save(str(tmp))
    fusable(tmp)
    os.replace(tmp, path)


def _gelu_order(graph, consumers: dict[str, list]) -> None:
    """Erf -> Add(1) -> Mul(0.5) -> Mul(x)  becomes  Erf -> Add(1) -> Mul(x) -> Mul(0.5)."""
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        add = consumers.get(erf.output[0], [])
        if len(add) != 1 or add[0].op_type != "Add":
            continue
        half = consumers.get(add[0].output[0], [])
        if len(half) != 1 or half[0].op_type != "Mul":
            continue
        last = consumers.get(half[0].output[0], [])
        if len(last) != 1 or last[0].op_type != "Mul":
            continue
        half, last = half[0], last[0]
        scale = [i for i in half.input if i != add[0].output[0]]
        x = [i for i in last.input if i != half.output[0]]
        if len(scale) != 1 or len(x) != 1:
            continue
        del half.input[:]
        half.input.extend([x[0], add[0].output[0]])
        del last.input[:]
        last.input.extend([half.output[0], scale[0]])


def fusable(path: Path) -> None:
    """Rewrite three exporter idioms, in place, into the same math in forms runtimes do better with:
    x * Reciprocal(Sqrt(s)) -> x / Sqrt(s), the pattern ONNX Runtime fuses into one RMS-norm kernel
    (SimplifiedLayerNormalization); x * (0.5 * (1 + erf(.))) -> (x * (1 + erf(.))) * 0.5, the order its
    GELU fusion matches (exact: scaling by 0.5 rounds nothing); and ReduceL2 -> Sqrt(ReduceSum(x * x)),
    since ONNX Runtime's ReduceL2 (and ReduceSumSquare) over inner axes, the GRN of g_enc/g_dec, is
    about ten times slower than its ReduceSum there.
    Weights stay where the exporter put them (inline or external data)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    _gelu_order(graph, consumers)
    nodes = []
    for node in graph.node:
        if node.op_type == "Reciprocal" and node.output[0] not in outputs:
            users = consumers.get(node.output[0], [])
            mul = users[0] if len(users) == 1 and users[0].op_type == "Mul" else None
            other = [i for i in mul.input if i != node.output[0]] if mul is not None else []
            if len(other) == 1:
                mul.op_type = "Div"
                del mul.input[:]
                mul.input.extend([other[0], node.input[0]])
                continue  # the Reciprocal is gone
        if node.op_type == "ReduceL2":
            x, out = node.input[0], node.output[0]
            total = onnx.NodeProto()
            total.CopyFrom(node)
            total.op_type, total.name = "ReduceSum", f"{node.name}_sum"
            total.input[0], total.output[0] = f"{out}_sq", f"{out}_sum"
            nodes += [onnx.helper.make_node("Mul", [x, x], [f"{out}_sq"], name=f"{node.name}_sq"), total,
                      onnx.helper.make_node("Sqrt", [f"{out}_sum"], [out], name=f"{node.name}_sqrt")]
            continue
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    onnx.save(model, str(path))


class _quiet:
    """Silence the exporter's logging (it reports every decomposition at INFO)."""

    def __enter__(self):
        self.saved = {n: logging.getLogger(n).level for n in ("torch.onnx", "onnxscript", "torch.export")}
        for n in self.saved:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for n, level in self.saved.items():
            logging.getLogger(n).setLevel(level)


def torch_outputs(model: JanusFlow, name: str, ex: Example) -> list[np.ndarray]:
    with torch.no_grad():
        out = GRAPHS[name](model).eval()(*ex.tensors.values())
    out = out if isinstance(out, tuple) else (out,)
    return [o.float().numpy() for o in out]


def check_parity(model: JanusFlow, name: str, path: Path, *, atol: float = PARITY_ATOL) -> float:
    """Largest |onnxruntime - torch| over the outputs, on inputs of a batch and length the graph was
    not traced with; raises ExportError above atol."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in ((3, 7), (1, 4)):
        ex = example(name, model, batch=batch, length=length, seed=batch)
        feeds = {k: v.numpy() for k, v in ex.tensors.items()}
        got = session.run(None, feeds)
        want = torch_outputs(model, name, ex)
        for g, w, out_name in zip(got, want, OUTPUTS[name]):
            if g.shape != w.shape:
                raise ExportError(f"{name}: output {out_name} has shape {g.shape}, PyTorch {w.shape}")
            worst = max(worst, float(np.abs(g - w).max()) if g.size else 0.0)
    if not worst <= atol:
        raise ExportError(f"{name}: onnxruntime differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst


def _io(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def export(model: JanusFlow, processor, out: str | Path, *, graphs: list[str] | None = None,
           source: str = "", source_hash: str = "", opset: int = OPSET, progress: bool = True) -> dict:
    """Export `graphs` (default all) of an fp32 model into `out`; returns the manifest.

    Written into a temporary directory next to `out` and renamed at the end, so an interrupted
    export never leaves a directory that looks complete."""
    out = Path(out)
    names = graphs or list(GRAPHS)
    unknown = [g for g in names if g not in GRAPHS]
    if unknown:
        raise ValueError(f"unknown graph(s) {', '.join(unknown)}: choose from {', '.join(GRAPHS)}")
    model = model.float().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries = {}
        for name in tqdm(names, desc="export", unit="graph", disable=not progress):
            path = work / f"{name}.onnx"
            try:
                export_graph(model, name, path, opset=opset)
            except ExportError:
                raise
            except Exception as exc:  # the exporter's own errors are long; keep the first line
                raise ExportError(f"{name}: export failed: {str(exc).splitlines()[0]}") from exc
            err = check_parity(model, name, path)
            entries[name] = {"file": path.name, "sha256": sha256_file(path), "max_abs_diff": err, **_io(path)}
        write_config(model.config, work)
        processor.save_pretrained(work)
        manifest = {"format": "janusflow-onnx", "version": 1, "opset": opset, "precision": "fp32",
                    "source": source, "source_hash": source_hash, "parity_atol": PARITY_ATOL,
                    "graphs": entries}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        return manifest
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def export_model(source: str | Path, out: str | Path, *, graphs: list[str] | None = None,
                 engine: bool = False, buckets: list[int] = (1, 2, 4, 8), precision: str = "fp32",
                 progress: bool = True) -> dict:
    """Export a model directory or models:/ URI (`janusflow export`, the Prefect `export` flow);
    with engine=True also build TensorRT engines (manifest["engines"])."""
    from flows.registry import model_hash
    from models.checkpoint import from_pretrained
    from serving.load import model_dir

    src = model_dir(source)
    model, processor = from_pretrained(src)
    manifest = export(model, processor, out, graphs=graphs, source=str(source), source_hash=model_hash(src),
                      progress=progress)
    if engine:
        from serving.tensorrt import build_engines

        manifest["engines"] = build_engines(out, buckets=list(buckets), precision=precision, progress=progress)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """An export directory's manifest, with every graph file present and its hash matching."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an export directory: no {MANIFEST} "
                                "(write one with `janusflow export`)")
    manifest = json.loads(file.read_text())
    for name, entry in manifest["graphs"].items():
        graph = path / entry["file"]
        if not graph.is_file():
            raise FileNotFoundError(f"{path}: graph '{name}' is missing ({entry['file']})")
    return manifest
