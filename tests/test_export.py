"""ONNX export with parity checks, the backends and the batched sampler against the reference sampler,
and the TensorRT path against the stand-in module (tests/fake_tensorrt.py): TensorRT itself cannot be
installed on these machines."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GEN_VARIANTS, randomize_, tiny_variant
from models.pipeline import JanusFlowPipeline
from serving.backends import OnnxRuntimeBackend, TorchBackend, load_backend
from data.shards import sha256_file as sha256
from serving.export import PARITY_ATOL, ExportError, check_parity, export, read_manifest
from serving.graphs import GRAPHS
from serving.sampler import ImageRequest, Sampler

PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a square"]


@pytest.fixture(scope="module")
def pipe():
    p = JanusFlowPipeline.from_config("tiny", seed=0)
    randomize_(p.model, seed=3)  # non-trivial adapters, so every graph's output depends on them
    return p


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    manifest = export(pipe.model, pipe.processor, out, source="test", progress=False)
    return out, manifest


def _requests(guidance=3.0, steps=4):
    return [ImageRequest(p, seed=11 + i, guidance=guidance, steps=steps) for i, p in enumerate(PROMPTS)]


def _reference(pipe, guidance=3.0, steps=4):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, seed=[11, 12, 13], output_type="pt")


def _images():
    return [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 30, 3), dtype=np.uint8))
            for i in range(3)]


def test_manifest_lists_every_graph_with_parity_and_hashes(exported):
    out, manifest = exported
    assert set(manifest["graphs"]) == set(GRAPHS)
    assert manifest["precision"] == "fp32" and manifest["opset"] >= 17
    for name, entry in manifest["graphs"].items():
        assert entry["max_abs_diff"] <= PARITY_ATOL
        assert entry["sha256"] == sha256(out / entry["file"])
        assert entry["inputs"] and entry["outputs"]
    velocity = {i["name"]: i["shape"] for i in manifest["graphs"]["velocity"]["inputs"]}
    assert velocity["z_t"][0] == "batch" and velocity["keys"][3] == "prefix"  # dynamic dims
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_exported_graphs_use_the_fused_forms_onnxruntime_optimizes(exported, tmp_path):
    import onnx
    import onnxruntime as ort

    out, _ = exported
    ops = {n.op_type for n in onnx.load(str(out / "cfg_step.onnx")).graph.node}
    assert "ReduceL2" not in ops and "Reciprocal" not in ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "cfg_step.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("SimplifiedLayerNormalization") >= 2 * 2  # the RMS norms of both LLM passes
    assert "Erf" not in fused  # every GELU became one kernel


def test_fused_cfg_step_matches_the_velocity_path(pipe, exported):
    out, _ = exported
    mixed = [ImageRequest(p, seed=3 + i, guidance=g, steps=5)
             for i, (p, g) in enumerate(zip(PROMPTS, (1.0, 2.5, 6.0)))]
    for backend in (TorchBackend(pipe.model), OnnxRuntimeBackend(out)):
        fused = Sampler.from_model(pipe.model, pipe.processor, backend).latents(mixed, 5)
        backend.graphs = backend.graphs - {"cfg_step"}  # an export made before the fused graph existed
        unfused = Sampler.from_model(pipe.model, pipe.processor, backend).latents(mixed, 5)
        assert float((fused - unfused).abs().max()) < 1e-5, backend.name


def test_parity_check_catches_a_graph_that_does_not_match(pipe, exported, tmp_path):
    out, _ = exported
    other = JanusFlowPipeline.from_config("tiny", seed=5).model  # different weights, same shapes
    randomize_(other, seed=9)
    with pytest.raises(ExportError, match="velocity: onnxruntime differs"):
        check_parity(other, "velocity", out / "velocity.onnx")


def test_missing_graph_file_is_a_clear_error(exported, tmp_path):
    out, manifest = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="graph 'prefix' is missing"):
        read_manifest(broken)
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_every_backend_gives_the_reference_images_and_answers(pipe, exported, backend, monkeypatch):
    out, _ = exported
    if backend == "tensorrt":
        monkeypatch.syspath_prepend(os.path.dirname(__file__))
        monkeypatch.setenv("JANUSFLOW_TENSORRT_MODULE", "fake_tensorrt")
        from serving.tensorrt import build_engines

        build_engines(out, buckets=[1, 2, 4], progress=False)
    runner = load_backend(backend, model=pipe.model, export_dir=out)
    sampler = Sampler.from_model(pipe.model, pipe.processor, runner, buckets=(1, 2, 4))
    reqs = _requests()
    got = sampler.decode(sampler.latents(reqs + reqs[-1:], 4))[:3]  # engines run bucket sizes only
    assert float((got - _reference(pipe)).abs().max()) < 1e-4
    results = sampler.generate(reqs)
    assert [(r.batch_size, r.bucket) for r in results] == [(3, 4)] * 3  # 3 rows run in the 4-bucket
    want = _reference(pipe)
    for r, w in zip(results, want):
        assert np.abs(np.asarray(r.image, dtype=np.float32) / 127.5 - 1 - w.permute(1, 2, 0).numpy()).max() <= 1.5 / 127.5
    questions = ["what is it?", "how many?", "colour of the square?"]
    assert sampler.answer(_images(), questions, max_new_tokens=5) == pipe.answer(_images(), questions,
                                                                              max_new_tokens=5)


def test_rows_do_not_depend_on_their_batch(pipe):
    sampler = Sampler.from_model(pipe.model, pipe.processor, TorchBackend(pipe.model))
    mixed = [ImageRequest("a red circle", seed=1, guidance=5.0, steps=3),
             ImageRequest("a blue square", seed=2, guidance=1.5, steps=3)]
    both = sampler.latents(mixed, 3)
    alone = sampler.latents(mixed[1:], 3)
    assert float((both[1] - alone[0]).abs().max()) < 1e-5
    ref = pipe(["a blue square"], num_inference_steps=3, guidance_scale=1.5, seed=[2], output_type="latent")
    assert float((alone - ref).abs().max()) < 1e-5  # per-row guidance matches a batch of its own


def test_a_prompt_in_several_rows_runs_its_prefix_once(pipe):
    class Counting(TorchBackend):
        rows = 0

        def run(self, graph, **inputs):
            if graph == "prefix":
                Counting.rows += inputs["input_ids"].shape[0]
            return super().run(graph, **inputs)

    sampler = Sampler.from_model(pipe.model, pipe.processor, Counting(pipe.model))
    sampler.unconditional_prefix()
    Counting.rows = 0
    reqs = [ImageRequest("a red circle", seed=1, steps=3), ImageRequest("a red circle", seed=2, steps=3),
            ImageRequest("a blue square", seed=3, steps=3)]
    together = sampler.latents(reqs, 3)
    assert Counting.rows == 2  # two distinct prompts (a bucket size), three rows
    for i, r in enumerate(reqs):
        assert float((together[i] - sampler.latents([r], 3)[0]).abs().max()) < 1e-5


def test_steps_group_and_non_finite_rows_fail_alone(pipe):
    sampler = Sampler.from_model(pipe.model, pipe.processor, TorchBackend(pipe.model), buckets=(1, 2))
    reqs = [ImageRequest("a", seed=1, steps=2), ImageRequest("b", seed=2, steps=3), ImageRequest("c", seed=3, steps=2)]
    results = sampler.generate(reqs)
    assert all(r.image is not None for r in results) and [r.batch_size for r in results] == [2, 1, 2]

    class Poisoned(TorchBackend):
        def run(self, graph, **inputs):
            out = super().run(graph, **inputs)
            if graph in ("velocity", "cfg_step"):
                out[0][1] = float("nan")  # the second row goes bad (its conditional velocity, or its z)
            return out

    bad = Sampler.from_model(pipe.model, pipe.processor, Poisoned(pipe.model), buckets=(2,))
    first, second = bad.generate([reqs[0], ImageRequest("d", seed=4, steps=2)])
    assert first.image is not None and second.image is None and "non-finite" in second.error


def test_tensorrt_engine_cache_and_mismatch(exported, monkeypatch):
    out, _ = exported
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    monkeypatch.setenv("JANUSFLOW_TENSORRT_MODULE", "fake_tensorrt")
    import fake_tensorrt

    from serving.tensorrt import EngineMismatch, TensorRTBackend, build_engines

    index = build_engines(out, buckets=[2], progress=False)
    built = fake_tensorrt.Builder.builds
    again = build_engines(out, buckets=[2], progress=False)
    assert fake_tensorrt.Builder.builds == built and again["engines"] == index["engines"]  # cache hit
    assert (out / "engines" / "timing.cache").is_file()
    meta = json.loads((out / index["engines"]["prefix"]).with_suffix(".json").read_text())
    assert meta["batches"] == [1, 2]  # bucket 2 plus the BOS-only unconditional row

    def built_with(idx, graph):  # how the stand-in built an engine (its engine files are JSON)
        return json.loads((out / idx["engines"][graph]).read_bytes())

    assert built_with(index, "prefix")["strongly_typed"] and not built_with(index, "prefix")["flags"]
    mixed = build_engines(out, buckets=[2], precision="bf16", progress=False)
    assert mixed["engines"]["prefix"] != index["engines"]["prefix"]  # precision is part of the cache key
    info = built_with(mixed, "cfg_step")
    assert not info["strongly_typed"]  # TensorRT may pick bf16 kernels over the fp32 graph...
    flag = fake_tensorrt.BuilderFlag
    assert info["flags"] == sorted([flag.BF16, flag.PREFER_PRECISION_CONSTRAINTS])
    assert info["fp32_layers"] >= 9  # ...but not for the reductions of the RMS norms and the GRN
    (images,) = TensorRTBackend(out).run("vae_decoder", latents=torch.zeros(2, 4, 8, 8))
    assert images.dtype == torch.float32 and images.shape[0] == 2  # fp32 in and out either way
    build_engines(out, buckets=[2], progress=False)
    runner = TensorRTBackend(out)
    with pytest.raises(ValueError, match="no TensorRT profile of 'vae_decoder' for batch 3"):
        runner.run("vae_decoder", latents=torch.zeros(3, 4, 8, 8))
    vel = json.loads((out / index["engines"]["velocity"]).with_suffix(".json").read_text())
    assert vel["batches"] == [4]  # the CFG-doubled rows
    path = (out / index["engines"]["vision"]).with_suffix(".json")
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}))
    with pytest.raises(EngineMismatch, match="gpu 'NVIDIA H100 80GB HBM3'"):
        TensorRTBackend(out)
    path.write_text(json.dumps(meta))


def test_backend_errors_name_the_fix(pipe, exported):
    with pytest.raises(ValueError, match="needs an export directory"):
        load_backend("onnxruntime")
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend("tflite", export_dir=exported[0])
    with pytest.raises(ValueError, match="no CUDAExecutionProvider"):
        OnnxRuntimeBackend(exported[0], providers=["CUDAExecutionProvider"])


@pytest.mark.parametrize("variant", ["full_attention", "dec_prompt"])
def test_gen_options_export_and_keep_parity(tmp_path, variant):
    p = tiny_variant(variant)
    randomize_(p.model, seed=3)
    out = tmp_path / variant
    manifest = export(p.model, p.processor, out, graphs=["velocity", "cfg_step"], source="test", progress=False)
    assert set(manifest["graphs"]) == {"velocity", "cfg_step"}
    assert all(e["max_abs_diff"] <= PARITY_ATOL for e in manifest["graphs"].values())
    saved = json.loads((out / "config.json").read_text())["model"]["gen"]
    assert all(saved[k] == v for k, v in GEN_VARIANTS[variant].items())
    # the graph really carries the option: the release path computes something else
    if variant == "full_attention":
        p.model.config.gen.image_attention = "causal"
    else:
        with torch.no_grad():
            p.model.gen_decoder.prompt_proj[1].weight.zero_()
            p.model.gen_decoder.prompt_proj[1].bias.zero_()
    with pytest.raises(ExportError):
        check_parity(p.model, "velocity", out / manifest["graphs"]["velocity"]["file"])


def test_onnxruntime_workers_split_a_batch_and_keep_its_images(pipe, exported):
    out, _ = exported
    one = Sampler.from_model(pipe.model, pipe.processor, OnnxRuntimeBackend(out), buckets=(1, 2, 4))
    two = Sampler.from_model(pipe.model, pipe.processor, OnnxRuntimeBackend(out, workers=2), buckets=(1, 2, 4))
    assert len(two.replicas) == 2 and two.replicas[0] is two.backend and len(one.replicas) == 1
    rows = {}
    for i, replica in enumerate(two.replicas):
        run = replica.run

        def counted(graph, _run=run, _i=i, **inputs):
            if graph == "cfg_step":
                rows.setdefault(_i, set()).add(int(inputs["z"].shape[0]))
            return _run(graph, **inputs)
        replica.run = counted
    reqs = _requests()
    results = two.generate(reqs)
    assert rows == {0: {2}, 1: {2}}  # the 4-bucket (3 rows + 1 padding) split 2 + 2 over the workers
    assert [(r.batch_size, r.bucket) for r in results] == [(3, 4)] * 3
    for a, b in zip(results, one.generate(reqs)):
        assert np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max() <= 1
    z, images = two.sample(reqs, 4)
    assert float((images - _reference(pipe)).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="workers >= 1"):
        OnnxRuntimeBackend(out, workers=0)
    from serving.load import load_sampler

    with pytest.raises(ValueError, match=r"^--workers 2 runs parallel onnxruntime sessions: use --backend onnxruntime"):
        load_sampler(out, backend="tensorrt", workers=2)
