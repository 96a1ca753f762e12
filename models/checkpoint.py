"""On-disk formats: our save_pretrained directory, and building from pretrained component dirs.

A model directory holds config.json, model.safetensors (or shards + model.safetensors.index.json),
the tokenizer files, and the frozen VAE in vae/ as a diffusers AutoencoderKL directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM, SiglipVisionModel

from models.config import GenConfig, JanusFlowConfig, LLMConfig, RepaConfig, VAEConfig, VisionConfig
from models.janusflow import JanusFlow
from models.processor import JanusFlowProcessor

FORMAT = "janusflow"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 4 * 1024**3

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the offending tensors."""


def _trainable_state(model: JanusFlow) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
    if model.config.llm.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    return state


def check_state_dict(model: JanusFlow, state: dict[str, torch.Tensor], *,
                     allow_missing: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in _trainable_state(model).items()}
    missing = sorted(k for k in expected if k not in state and not k.startswith(allow_missing))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
                        if k in state and tuple(state[k].shape) != expected[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))


def load_weights(model: JanusFlow, state: dict[str, torch.Tensor], *,
                 allow_missing: tuple[str, ...] = ()) -> None:
    check_state_dict(model, state, allow_missing=allow_missing)
    model.load_state_dict(state, strict=False)
    if model.config.llm.tie_word_embeddings:
        model.llm.tie_weights()


def save_pretrained(model: JanusFlow, processor: JanusFlowProcessor, path: str | Path, *,
                    shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the model directory; files are written beside and renamed, so a crash never leaves
    a half-written weights file under its final name."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _trainable_state(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    written = set()
    if len(shards) == 1:
        _atomic_save(shards[0], path / WEIGHTS)
        written.add(WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, path / name)
            weight_map.update({k: name for k in shard})
            written.add(name)
        _atomic_write(path / INDEX, json.dumps({"weight_map": weight_map}, indent=1))
        written.add(INDEX)
    for stale in path.glob("model*.safetensors*"):
        if stale.name not in written:  # a previous save with another sharding
            stale.unlink()
    model.vae.save_pretrained(str(path / "vae"))
    processor.save_pretrained(path)
    write_config(model.config, path)
    return path


def write_config(config: JanusFlowConfig, path: str | Path) -> None:
    """config.json of a model directory (also written into export directories)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
    _atomic_write(Path(path) / "config.json", json.dumps(meta, indent=2))


def read_config(path: str | Path) -> JanusFlowConfig:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: not a janusflow model directory")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_file} is not a janusflow config (format={meta.get('format')!r}); "
                              f"an official release checkpoint needs `janusflow convert --from-official`")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_file} has format_version {meta['format_version']}, newer than "
                              f"this code understands ({FORMAT_VERSION})")
    return JanusFlowConfig.from_dict(meta["model"])


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a sharded index (our layout and the HF layout)."""
    if (path / WEIGHTS).is_file():
        return load_file(str(path / WEIGHTS))
    if (path / INDEX).is_file():
        names = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        state = {}
        for name in names:
            state.update(load_file(str(path / name)))
        return state
    raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {path}")


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[JanusFlow, JanusFlowProcessor]:
    path = Path(path)
    config = read_config(path)
    vae = AutoencoderKL.from_pretrained(str(path / "vae"))
    model = JanusFlow(config, vae=vae)
    load_weights(model, read_weights(path))
    processor = JanusFlowProcessor.from_pretrained(path, config)
    return model.to(device=device, dtype=dtype).eval(), processor


def from_components(*, llm_dir: str | Path, vision_dir: str | Path, vae_dir: str | Path,
                    gen: GenConfig | None = None, repa: RepaConfig | None = None,
                    system_prompt: str | None = None) -> tuple[JanusFlow, JanusFlowProcessor]:
    """Production stage 1's starting point: a pretrained Llama LLM + tokenizer (DeepSeek-LLM
    layout), a SigLIP (HF layout, full SiglipModel or vision-only), and a diffusers VAE.

    The new parts (aligners, g_enc, g_dec, REPA head) start from their initialisation. The
    generation image size is chosen so g_enc's token grid equals f_enc's, as REPA needs.
    """
    for name, d in (("llm_dir", llm_dir), ("vision_dir", vision_dir), ("vae_dir", vae_dir)):
        if not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(f"{name}: no config.json in {d}")
    llm = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    vision = SiglipVisionModel.from_pretrained(str(vision_dir), vision_use_head=False,
                                               dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(vae_dir))

    lc, vc, ac = llm.config, vision.config, vae.config
    llm_cfg = LLMConfig(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads or lc.num_attention_heads,
        max_position_embeddings=lc.max_position_embeddings, rms_norm_eps=lc.rms_norm_eps,
        rope_theta=float(_rope_theta(lc)), bos_token_id=lc.bos_token_id, eos_token_id=lc.eos_token_id,
        tie_word_embeddings=bool(lc.tie_word_embeddings))
    vis_cfg = VisionConfig(
        image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads, layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act)
    vae_cfg = VAEConfig(
        block_out_channels=tuple(ac.block_out_channels), layers_per_block=ac.layers_per_block,
        latent_channels=ac.latent_channels, norm_num_groups=ac.norm_num_groups,
        scaling_factor=float(ac.scaling_factor))
    gen = gen or GenConfig()
    grid = vis_cfg.image_size // vis_cfg.patch_size
    gen = GenConfig(**{**gen.__dict__, "image_size": grid * gen.patch_size * vae_cfg.downsample})
    repa = repa or RepaConfig(layer=min(6, llm_cfg.num_hidden_layers), hidden_size=llm_cfg.hidden_size)
    config = JanusFlowConfig(llm=llm_cfg, vision=vis_cfg, vae=vae_cfg, gen=gen, repa=repa,
                             preset="components")
    if system_prompt is not None:
        config.system_prompt = system_prompt
    processor = JanusFlowProcessor.for_config(tokenizer, config, check_vocab=False)
    if len(processor) > llm_cfg.vocab_size:
        # The processor added special tokens the tokenizer lacked: give them embedding rows.
        llm.resize_token_embeddings(len(processor))
        config.llm.vocab_size = len(processor)
    model = JanusFlow(config.validate(), llm=llm, vision=vision, vae=vae)
    return model.eval(), processor


def _rope_theta(llama_config) -> float:
    theta = getattr(llama_config, "rope_theta", None)
    if theta is None:
        params = getattr(llama_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return theta


def _atomic_save(state: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)


def _atomic_write(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
