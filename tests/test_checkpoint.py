import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from models.checkpoint import CheckpointError
from models.config import GenConfig, RepaConfig
from models.pipeline import JanusFlowPipeline
from models.tokenizer import BEGIN_OF_IMAGE, build_tokenizer

from conftest import randomize_

PROMPTS = ["a red circle", "two blue squares"]


def latents(pipe, **kw):
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.5, seed=0, output_type="latent", **kw)


@pytest.fixture
def saved(tmp_path, tiny_copy):
    randomize_(tiny_copy.model)
    tiny_copy.save_pretrained(tmp_path / "model")
    return tiny_copy, tmp_path / "model"


def test_save_load_round_trip_is_identical(saved):
    pipe, path = saved
    assert {"config.json", "model.safetensors", "tokenizer.json", "vae"} <= {p.name for p in path.iterdir()}
    loaded = JanusFlowPipeline.from_pretrained(path)
    assert torch.equal(latents(pipe), latents(loaded))
    for (k, a), (_, b) in zip(pipe.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.processor.tokenizer.get_vocab() == pipe.processor.tokenizer.get_vocab()
    assert loaded.config == pipe.config


def test_sharded_save_round_trip(tmp_path, tiny_copy):
    from models.checkpoint import save_pretrained

    save_pretrained(tiny_copy.model, tiny_copy.processor, tmp_path, shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = JanusFlowPipeline.from_pretrained(tmp_path)
    assert torch.equal(latents(tiny_copy), latents(loaded))
    # saving again unsharded leaves no stale shard behind
    save_pretrained(tiny_copy.model, tiny_copy.processor, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def _rewrite(path, edit):
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda s: s.pop("gen_encoder.patchify.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing: gen_encoder\.patchify\.weight"):
        JanusFlowPipeline.from_pretrained(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda s: s.update({"extra.thing": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra\.thing"):
        JanusFlowPipeline.from_pretrained(path)


def test_misshaped_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda s: s.update({"und_aligner.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch: und_aligner\.bias \(3,\) != \(64,\)"):
        JanusFlowPipeline.from_pretrained(path)


def test_bad_config_and_wrong_directories(saved, tmp_path):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["gen"]["chanels"] = 4
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="chanels"):
        JanusFlowPipeline.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        JanusFlowPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "config.json").write_text(json.dumps({"model_type": "multi_modality"}))
    with pytest.raises(CheckpointError, match="convert --from-official"):
        JanusFlowPipeline.from_pretrained(tmp_path / "official")


@pytest.fixture
def component_dirs(tmp_path):
    """A DeepSeek-layout Llama + tokenizer, a full HF SigLIP and a diffusers VAE, all tiny.

    The tokenizer lacks <begin_of_image>, as DeepSeek-LLM's base tokenizer lacks the image tags,
    so loading must add it and grow the embeddings."""
    torch.manual_seed(0)
    llm_dir, vis_dir, vae_dir = tmp_path / "llm", tmp_path / "siglip", tmp_path / "vae"
    base = build_tokenizer(["a red circle", "two blue squares"], vocab_size=300)
    # drop the image tags by rebuilding a tokenizer whose vocabulary has no such tokens
    raw = json.loads(base.backend_tokenizer.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if "image" not in t["content"]]
    raw["model"]["vocab"] = {k: v for k, v in raw["model"]["vocab"].items() if "image" not in k}
    lacking = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)),
                                      bos_token=base.bos_token, eos_token=base.eos_token)
    assert BEGIN_OF_IMAGE not in lacking.get_vocab()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(lacking), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       bos_token_id=0, eos_token_id=1))
    llm.save_pretrained(llm_dir)
    lacking.save_pretrained(llm_dir)
    SiglipModel(SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2))).save_pretrained(vis_dir)
    AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, layers_per_block=1,
                  scaling_factor=0.5).save_pretrained(vae_dir)
    return llm, llm_dir, vis_dir, vae_dir


def test_build_from_pretrained_components(component_dirs, tmp_path):
    llm, llm_dir, vis_dir, vae_dir = component_dirs
    pipe = JanusFlowPipeline.from_components(llm_dir=llm_dir, vision_dir=vis_dir, vae_dir=vae_dir,
                                             gen=GenConfig(channels=32, time_channels=32),
                                             repa=RepaConfig(layer=1, hidden_size=64))
    cfg = pipe.config
    assert cfg.num_gen_tokens == cfg.num_und_tokens == 16 and cfg.gen.image_size == 32
    assert cfg.vae.scaling_factor == 0.5 and cfg.vision.hidden_act == "gelu_pytorch_tanh"
    assert cfg.llm.vocab_size == len(pipe.processor) > llm.config.vocab_size  # grew for the image tags
    emb = pipe.model.llm.get_input_embeddings().weight
    assert torch.equal(emb[: llm.config.vocab_size], llm.get_input_embeddings().weight)
    siglip = SiglipModel.from_pretrained(vis_dir)
    assert torch.equal(pipe.model.vision.embeddings.patch_embedding.weight,
                       siglip.vision_model.embeddings.patch_embedding.weight)
    # and the whole thing runs and round-trips through our own format
    z = latents(pipe)
    pipe.save_pretrained(tmp_path / "ours")
    assert torch.equal(z, latents(JanusFlowPipeline.from_pretrained(tmp_path / "ours")))


def test_missing_component_directory_is_named(component_dirs, tmp_path):
    _, llm_dir, vis_dir, _ = component_dirs
    with pytest.raises(FileNotFoundError, match="vae_dir"):
        JanusFlowPipeline.from_components(llm_dir=llm_dir, vision_dir=vis_dir, vae_dir=tmp_path / "x")
