"""Test helpers for the official release's layout, written from its description, not its code:
a writer of release-layout checkpoints and reference forwards of its SigLIP (timm ViT, fused qkv,
exact GELU) and ConvNeXt blocks (GRN weights shaped (1, 1, 1, C)) that read the release's tensors."""

import json
import math

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

TOWER = "vision_und_enc_model.vision_tower."
SIGLIP_HEADS = 2


def official_state(model) -> dict:
    """The release's tensor names for our model's weights, plus an attn_pool head."""
    s = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("vae.", "repa_head."))}
    out = {}
    for k, v in s.items():
        if k.startswith("llm."):
            out["language_model." + k[4:]] = v
    out["vision_und_enc_aligner.weight"] = s["und_aligner.weight"]
    out["vision_und_enc_aligner.bias"] = s["und_aligner.bias"]
    out["beg_of_und_embed"] = s["beg_of_und_embed"]
    v = "vision."
    out[TOWER + "patch_embed.proj.weight"] = s[v + "embeddings.patch_embedding.weight"]
    out[TOWER + "patch_embed.proj.bias"] = s[v + "embeddings.patch_embedding.bias"]
    out[TOWER + "pos_embed"] = s[v + "embeddings.position_embedding.weight"].unsqueeze(0)
    n_layers = 1 + max(int(k.split(".")[3]) for k in s if k.startswith(v + "encoder.layers."))
    for i in range(n_layers):
        p, b = f"{v}encoder.layers.{i}.", f"{TOWER}blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + "norm1." + kind] = s[p + "layer_norm1." + kind]
            out[b + "norm2." + kind] = s[p + "layer_norm2." + kind]
            out[b + "attn.qkv." + kind] = torch.cat([s[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[b + "attn.proj." + kind] = s[p + "self_attn.out_proj." + kind]
            out[b + "mlp.fc1." + kind] = s[p + "mlp.fc1." + kind]
            out[b + "mlp.fc2." + kind] = s[p + "mlp.fc2." + kind]
    for kind in ("weight", "bias"):
        out[TOWER + "norm." + kind] = s[v + "post_layernorm." + kind]
    width = out[TOWER + "pos_embed"].shape[-1]
    g = torch.Generator().manual_seed(3)
    for name, shape in {"latent": (1, 1, width), "q.weight": (width, width), "q.bias": (width,),
                        "kv.weight": (2 * width, width), "kv.bias": (2 * width,),
                        "proj.weight": (width, width), "proj.bias": (width,), "norm.weight": (width,),
                        "norm.bias": (width,), "mlp.fc1.weight": (4 * width, width),
                        "mlp.fc1.bias": (4 * width,), "mlp.fc2.weight": (width, 4 * width),
                        "mlp.fc2.bias": (width,)}.items():
        out[TOWER + "attn_pool." + name] = torch.randn(shape, generator=g)
    for side, ours in (("enc", "gen_encoder"), ("dec", "gen_decoder")):
        n_blocks = 1 + max(int(k.split(".")[2]) for k in s if k.startswith(ours + ".blocks."))
        for i in range(n_blocks):
            p, b = f"{ours}.blocks.{i}.", f"vision_gen_{side}_model.mid_block.res_blocks.{i}."
            for theirs, mine in (("depthwise", "dwconv"), ("channelwise_linear_1", "fc1"),
                                 ("channelwise_linear_2", "fc2"), ("cond_embeds_mapper", "modulation")):
                out[b + theirs + ".weight"] = s[p + mine + ".weight"]
                out[b + theirs + ".bias"] = s[p + mine + ".bias"]
            out[b + "norm.weight"] = s[p + "norm.weight"]
            out[b + "channelwise_norm.weight"] = s[p + "grn.gamma"].view(1, 1, 1, -1)
            out[b + "channelwise_norm.bias"] = s[p + "grn.beta"].view(1, 1, 1, -1)
    e = "vision_gen_enc_model."
    for lin in ("linear_1", "linear_2"):
        for kind in ("weight", "bias"):
            out[f"{e}time_embed.{lin}.{kind}"] = s[f"gen_encoder.time_embed.{lin}.{kind}"]
    for kind in ("weight", "bias"):
        out[e + "in_conv." + kind] = s["gen_encoder.patchify." + kind]
        out["vision_gen_enc_aligner." + kind] = s["gen_enc_aligner." + kind]
        out["vision_gen_dec_aligner." + kind] = s["gen_dec_aligner." + kind]
        out["vision_gen_dec_model.out_convs.0.unpatch_conv." + kind] = s["gen_decoder.out_proj." + kind]
    out["vision_gen_dec_model.input_norm.weight"] = s["gen_decoder.input_norm.weight"]
    out["vision_gen_dec_model.out_convs.0.norm.weight"] = s["gen_decoder.out_norm.weight"]
    out["vision_gen_dec_aligner_norm.weight"] = s["gen_dec_norm.weight"]
    return out


def write_official(path, model, tokenizer, *, as_bin=False) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    state = official_state(model)
    cfg = model.config
    meta = {
        "model_type": "multi_modality",
        "language_config": {"hidden_size": cfg.llm.hidden_size, "num_attention_heads": cfg.llm.num_attention_heads,
                            "num_key_value_heads": cfg.llm.num_key_value_heads, "rms_norm_eps": cfg.llm.rms_norm_eps,
                            "max_position_embeddings": cfg.llm.max_position_embeddings,
                            "bos_token_id": cfg.llm.bos_token_id, "eos_token_id": cfg.llm.eos_token_id},
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "params": {
            "model_name": "siglip_tiny_test", "heads": SIGLIP_HEADS, "image_size": cfg.vision.image_size,
            "select_feature": "same", "select_layer": -1}},
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "params": {
            "input_channels": 4, "stride": 2, "kernel_size": 2, "block_out_channels": [cfg.gen.channels],
            "layers_in_middle": cfg.gen.blocks, "hidden_size": cfg.llm.hidden_size}},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "params": {
            "in_channels": cfg.gen.channels, "out_channels": 4, "block_out_channels": [cfg.gen.channels],
            "upsamples": 1, "layers_in_middle": cfg.gen.blocks, "hidden_size": cfg.llm.hidden_size}},
    }
    (path / "config.json").write_text(json.dumps(meta))
    if as_bin:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    tokenizer.save_pretrained(path)
    return state


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_siglip(state, pixels, *, heads=SIGLIP_HEADS, eps=1e-6):
    """timm ViT forward on the release's tensors: patchify + pos, pre-norm blocks, final norm."""
    x = F.conv2d(pixels, state[TOWER + "patch_embed.proj.weight"], state[TOWER + "patch_embed.proj.bias"],
                 stride=state[TOWER + "patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2) + state[TOWER + "pos_embed"]
    b, n, d = x.shape
    i = 0
    while f"{TOWER}blocks.{i}.norm1.weight" in state:
        p = f"{TOWER}blocks.{i}."
        h = F.layer_norm(x, (d,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps)
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(b, n, d), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps)
        h = F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))  # exact GELU
        x = x + F.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        i += 1
    return F.layer_norm(x, (d,), state[TOWER + "norm.weight"], state[TOWER + "norm.bias"], eps)


def reference_convnext(state, prefix, x, cond):
    """The release's ConvNeXt block: residual first, then x * (1 + scale) + shift."""
    c = x.shape[1]
    h = F.conv2d(x, state[prefix + "depthwise.weight"], state[prefix + "depthwise.bias"], padding=3, groups=c)
    h = _rms(h.permute(0, 2, 3, 1), state[prefix + "norm.weight"])
    h = F.gelu(F.linear(h, state[prefix + "channelwise_linear_1.weight"], state[prefix + "channelwise_linear_1.bias"]))
    gx = torch.norm(h, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    h = state[prefix + "channelwise_norm.bias"] + (state[prefix + "channelwise_norm.weight"] * nx + 1) * h
    h = F.linear(h, state[prefix + "channelwise_linear_2.weight"], state[prefix + "channelwise_linear_2.bias"])
    x = x + h.permute(0, 3, 1, 2)
    scale, shift = F.linear(F.silu(cond), state[prefix + "cond_embeds_mapper.weight"],
                            state[prefix + "cond_embeds_mapper.bias"]).chunk(2, dim=1)
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
