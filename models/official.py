"""Import a checkpoint in the layout of the official JanusFlow release.

The release is one state dict (`language_model.*`, a timm-layout SigLIP under
`vision_und_enc_model.vision_tower.*` with fused qkv, the ShallowUViT g_enc/g_dec, the aligners and
`beg_of_und_embed`) with a MultiModalityConfig config.json and the tokenizer files; its VAE
(SDXL-VAE) is a separate diffusers directory. The SigLIP tower's attention-pooling head
(`vision_tower.attn_pool.*`) is never called by inference and is dropped here, knowingly. The release
has no REPA head (training only): ours starts from its initialisation.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer

from models.checkpoint import CheckpointError, load_weights, read_weights
from models.config import GenConfig, JanusFlowConfig, LLMConfig, RepaConfig, VAEConfig, VisionConfig
from models.janusflow import JanusFlow
from models.processor import JanusFlowProcessor

# SigLIP attention heads cannot be read off the weights; the release names its tower by model_name.
SIGLIP_HEADS = {"siglip_large_patch16_384": 16, "siglip_large_patch16_256": 16,
                "siglip_so400m_patch14_384": 16, "siglip_so400m_patch14_224": 16}

TOWER = "vision_und_enc_model.vision_tower."
DROPPED_PREFIX = TOWER + "attn_pool."

# (official regex, our name template); ConvNeXt blocks of g_enc and g_dec share the inner names.
_BLOCK = {
    "depthwise": "dwconv", "norm": "norm", "channelwise_linear_1": "fc1",
    "channelwise_linear_2": "fc2", "cond_embeds_mapper": "modulation",
}
_RULES: list[tuple[str, str]] = [
    (r"language_model\.(.+)", r"llm.\1"),
    (r"vision_und_enc_aligner\.(weight|bias)", r"und_aligner.\1"),
    (r"beg_of_und_embed", "beg_of_und_embed"),
    (r"vision_gen_enc_model\.time_embed\.(linear_[12]\.(?:weight|bias))", r"gen_encoder.time_embed.\1"),
    (r"vision_gen_enc_model\.in_conv\.(weight|bias)", r"gen_encoder.patchify.\1"),
    (r"vision_gen_enc_aligner\.(weight|bias)", r"gen_enc_aligner.\1"),
    (r"vision_gen_dec_model\.input_norm\.weight", "gen_decoder.input_norm.weight"),
    (r"vision_gen_dec_model\.out_convs\.0\.norm\.weight", "gen_decoder.out_norm.weight"),
    (r"vision_gen_dec_model\.out_convs\.0\.unpatch_conv\.(weight|bias)", r"gen_decoder.out_proj.\1"),
    (r"vision_gen_dec_aligner_norm\.weight", "gen_dec_norm.weight"),
    (r"vision_gen_dec_aligner\.(weight|bias)", r"gen_dec_aligner.\1"),
    (TOWER.replace(".", r"\.") + r"patch_embed\.proj\.(weight|bias)",
     r"vision.embeddings.patch_embedding.\1"),
    (TOWER.replace(".", r"\.") + r"blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (TOWER.replace(".", r"\.") + r"blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (TOWER.replace(".", r"\.") + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision.encoder.layers.\1.self_attn.out_proj.\2"),
    (TOWER.replace(".", r"\.") + r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (TOWER.replace(".", r"\.") + r"norm\.(weight|bias)", r"vision.post_layernorm.\1"),
]
for _side, _ours in (("enc", "gen_encoder"), ("dec", "gen_decoder")):
    for _theirs, _mine in _BLOCK.items():
        _RULES.append((rf"vision_gen_{_side}_model\.mid_block\.res_blocks\.(\d+)\.{_theirs}\.(weight|bias)",
                       rf"{_ours}.blocks.\1.{_mine}.\2"))
_RULES = [(re.compile(f"^{pattern}$"), target) for pattern, target in _RULES]


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official names -> ours. Returns (converted state, dropped keys); unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, tensor in state.items():
        if key.startswith(DROPPED_PREFIX):
            dropped.append(key)
            continue
        block = re.match(r"^" + re.escape(TOWER) + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if block:
            layer, kind = block.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"vision.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.clone()
            continue
        if key == TOWER + "pos_embed":
            out["vision.embeddings.position_embedding.weight"] = tensor.reshape(-1, tensor.shape[-1])
            continue
        grn = re.match(r"^vision_gen_(enc|dec)_model\.mid_block\.res_blocks\.(\d+)\.channelwise_norm\."
                       r"(weight|bias)$", key)
        if grn:
            side, n, kind = grn.groups()
            ours = "gen_encoder" if side == "enc" else "gen_decoder"
            out[f"{ours}.blocks.{n}.grn.{'gamma' if kind == 'weight' else 'beta'}"] = tensor.reshape(-1)
            continue
        for pattern, target in _RULES:
            if pattern.match(key):
                out[pattern.sub(target, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise CheckpointError(f"{len(unknown)} tensor(s) not in the official layout: {shown}")
    return out, dropped


def read_official_state(src: Path) -> dict[str, torch.Tensor]:
    try:
        return read_weights(src)
    except FileNotFoundError:
        pass
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no model.safetensors, safetensors index or pytorch_model*.bin in {src}")
    state: dict[str, torch.Tensor] = {}
    for path in bins:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def official_config(meta: dict, state: dict[str, torch.Tensor], vae: AutoencoderKL) -> JanusFlowConfig:
    """Our config from the release's config.json, with SigLIP's shapes read off its tensors."""
    lang = dict(meta.get("language_config", {}))
    llm_fields = LLMConfig.__dataclass_fields__
    embed = state["language_model.model.embed_tokens.weight"]
    llm = LLMConfig(**{k: v for k, v in lang.items() if k in llm_fields})
    llm.vocab_size, llm.hidden_size = embed.shape
    llm.num_hidden_layers = 1 + max(int(m.group(1)) for k in state
                                    if (m := re.match(r"language_model\.model\.layers\.(\d+)\.", k)))
    llm.intermediate_size = state["language_model.model.layers.0.mlp.gate_proj.weight"].shape[0]
    llm.tie_word_embeddings = "language_model.lm_head.weight" not in state

    und = meta.get("vision_und_enc_config", {}).get("params", {})
    pos = state[TOWER + "pos_embed"]
    patch = state[TOWER + "patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = math.isqrt(pos.shape[-2])
    heads = und.get("heads") or SIGLIP_HEADS.get(und.get("model_name", ""))
    if heads is None:
        raise CheckpointError(f"cannot tell the SigLIP head count of model_name="
                              f"{und.get('model_name')!r}; add 'heads' to vision_und_enc_config.params")
    vision = VisionConfig(
        image_size=grid * patch_size, patch_size=patch_size, hidden_size=width,
        intermediate_size=state[TOWER + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(m.group(1)) for k in state
                                  if (m := re.match(re.escape(TOWER) + r"blocks\.(\d+)\.", k))),
        num_attention_heads=int(heads), hidden_act="gelu")

    enc = meta.get("vision_gen_enc_config", {}).get("params", {})
    dec = meta.get("vision_gen_dec_config", {}).get("params", {})
    kernel, stride = enc.get("kernel_size", 2), enc.get("stride", 2)
    if kernel != stride or dec.get("upsamples", 1) != 1:
        raise CheckpointError(f"unsupported g_enc/g_dec: kernel_size={kernel}, stride={stride}, "
                              f"upsamples={dec.get('upsamples')}; only a single 2x2-style patchify "
                              f"with one unpatchify (the released JanusFlow) is supported")
    channels = state["vision_gen_enc_model.in_conv.weight"].shape[0]
    ac = vae.config
    vae_cfg = VAEConfig(block_out_channels=tuple(ac.block_out_channels),
                        layers_per_block=ac.layers_per_block, latent_channels=ac.latent_channels,
                        norm_num_groups=ac.norm_num_groups, scaling_factor=float(ac.scaling_factor))
    gen = GenConfig(
        image_size=grid * stride * vae_cfg.downsample, channels=channels, patch_size=stride,
        blocks=enc.get("layers_in_middle", 2),
        time_channels=state["vision_gen_enc_model.time_embed.linear_1.weight"].shape[1])
    return JanusFlowConfig(llm=llm, vision=vision, vae=vae_cfg, gen=gen,
                           repa=RepaConfig(layer=min(6, llm.num_hidden_layers),
                                           hidden_size=llm.hidden_size),
                           preset="official").validate()


def load_official(src: str | Path, *, vae_dir: str | Path) -> tuple[JanusFlow, JanusFlowProcessor, list[str]]:
    """Build our model from an official-layout directory; returns (model, processor, dropped)."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    if not (Path(vae_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in the VAE directory {vae_dir}")
    meta = json.loads((src / "config.json").read_text())
    state = read_official_state(src)
    for required in ("language_model.model.embed_tokens.weight", TOWER + "pos_embed",
                     TOWER + "patch_embed.proj.weight", "vision_gen_enc_model.in_conv.weight"):
        if required not in state:
            raise CheckpointError(f"missing tensor {required}: not an official JanusFlow checkpoint")
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    config = official_config(meta, state, vae)
    converted, dropped = convert_state_dict(state)
    model = JanusFlow(config, vae=vae)
    load_weights(model, converted, allow_missing=("repa_head.",))
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    processor = JanusFlowProcessor.for_config(tokenizer, config)
    return model.eval(), processor, dropped
