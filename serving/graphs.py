"""The model cut into graphs with plain-tensor boundaries: what `janusflow export` writes to ONNX, what
TensorRT builds engines from, and what the torch backend runs directly (so every backend runs the
same computation).

Keys and values cross every boundary as two tensors (layers, batch, heads, length, head_dim); the
transformers cache object is built inside forward, because cache objects as graph inputs or outputs
do not export. Generation:
- prefix:   prompt ids + mask -> keys, values of the prompt (computed once per request);
- velocity: z_t, t, prefix keys/values, prefix mask, prompt lengths -> v (g_enc, aligners, the LLM
  over the 1 + N new tokens, g_dec);
- cfg_step: one whole guided Euler step, z -> z + dt * v_cfg, with the CFG combination and the update
  fused in. g_enc runs once per row (its input is the same for the conditional and unconditional
  row) and the unconditional rows attend to the one BOS key/value instead of a padded prompt, so a
  step costs less than the velocity graph over doubled rows;
- vae_decoder: scaled latents -> images in [-1, 1].
Understanding:
- vision:   pixels -> the 1 + N image embeddings (beg_of_und + aligned f_enc tokens);
- und_prefill: ids, image positions, image embeddings, mask, last positions -> next-token logits and
  keys/values of the whole prompt;
- decode_step: one token per row, past keys/values, mask, positions -> logits and extended keys/values.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from models import flow
from models.janusflow import JanusFlow

# Inputs the sampler keeps in fp32 whatever the model's dtype: the latents being integrated and the
# per-row step size and guidance (the Euler update is done in fp32, as the reference sampler does).
FP32_INPUTS = frozenset({"z", "dt", "guidance"})


def stack_cache(cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers cache -> (keys, values), each (layers, B, H, T, head_dim)."""
    return (torch.stack([layer.keys for layer in cache.layers]),
            torch.stack([layer.values for layer in cache.layers]))


def unstack_cache(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    """(layers, B, H, T, head_dim) keys and values -> a fresh transformers cache (never shared)."""
    return DynamicCache(ddp_cache_data=[(keys[i], values[i]) for i in range(keys.shape[0])])


class Prefix(nn.Module):
    """Prompt ids (B, P) int64 + mask (B, P) int64 -> keys, values (L, B, H, P, hd)."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        out = self.model.llm.model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=pos, use_cache=True)
        return stack_cache(out.past_key_values)


class Velocity(nn.Module):
    """z_t (B, C, H, W), t (B,) in [0, 1], prefix keys/values (L, B, H, P, hd), prefix mask (B, P),
    prompt lengths (B,) -> velocity (B, C, H, W). Image tokens sit at positions L_i .. L_i + N."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, z_t, t, keys, values, prefix_mask, lengths):
        m = self.model
        x_new, skip, t_emb = m.image_tokens(z_t, t)
        return m.velocity_from_hidden(after_prefix(m, x_new, keys, values, prefix_mask, lengths), skip, t_emb)


def after_prefix(m: JanusFlow, x_new, keys, values, prefix_mask, lengths) -> torch.Tensor:
    """The LLM's last hidden states (B, 1 + N, D) over new tokens x_new that follow a cached prefix
    (keys/values (L, B, H, P, hd), mask (B, P)); they sit at positions L_i .. L_i + N of their row."""
    n = x_new.shape[1]
    pos = lengths.view(-1, 1) + torch.arange(n, device=x_new.device).unsqueeze(0)
    out = m.llm.model(inputs_embeds=x_new, attention_mask=m.new_token_mask(prefix_mask, n, cached=True),
                      position_ids=pos,
                      past_key_values=unstack_cache(keys, values), use_cache=True)
    return out.last_hidden_state


class CfgStep(nn.Module):
    """One classifier-free-guided Euler step: z (B, C, H, W) fp32, t, dt, guidance (B,), the prompts'
    keys/values (L, B, H, P, hd), prefix mask (B, P), prompt lengths (B,), and the BOS-only prompt's
    keys/values (L, 1, H, 1, hd) -> z + dt * (w v_cond - (w - 1) v_uncond) (B, C, H, W) fp32.

    The same velocity as two Velocity rows: the unconditional row sees only BOS, at the conditional
    row's positions, exactly as the padded-and-masked prompt of the reference sampler."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, z, t, dt, guidance, keys, values, prefix_mask, lengths, uncond_keys, uncond_values):
        m = self.model
        dtype = m.gen_enc_aligner.weight.dtype
        x_new, skip, t_emb = m.image_tokens(z.to(dtype), t)  # identical for both rows of a prompt
        b = x_new.shape[0]
        cond = after_prefix(m, x_new, keys, values, prefix_mask, lengths)
        uk, uv = (u.expand(-1, b, -1, -1, -1) for u in (uncond_keys, uncond_values))
        bos = torch.ones(b, uk.shape[3], dtype=prefix_mask.dtype, device=x_new.device)
        uncond = after_prefix(m, x_new, uk, uv, bos, lengths)
        v = m.velocity_from_hidden(torch.cat([cond, uncond]), torch.cat([skip, skip]), torch.cat([t_emb, t_emb]))
        v = flow.cfg_combine(v[:b].float(), v[b:].float(), guidance)  # (slices: chunk() pins batch in export)
        return flow.euler_step(z, v.to(z.dtype), dt.view(-1, 1, 1, 1).to(z.dtype))


class VAEDecoder(nn.Module):
    """Scaled latents (B, C, H, W) -> images (B, 3, S, S) in [-1, 1]."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, latents):
        z = latents / self.model.config.vae.scaling_factor
        return self.model.vae.decode(z).sample.clamp(-1, 1)


class Vision(nn.Module):
    """Understanding pixels (B, 3, S, S) in [-1, 1] -> image embeddings (B, 1 + N, D_llm)."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.understanding_features(pixel_values)


class UndPrefill(nn.Module):
    """Understanding prompt -> logits at each row's last token (B, V), keys, values (L, B, H, T, hd).

    input_ids (B, T) with image placeholders anywhere; image_index (B, T) int64: for a placeholder
    position, its row in the flattened image embeddings (M * (1 + N), D), else -1; attention_mask
    (B, T); last (B,) the index of each row's last real token."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_index, image_embeds, attention_mask, last):
        m = self.model
        text = m.embed_tokens(input_ids.clamp(min=0))
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(text.dtype)
        picked = flat[image_index.clamp(min=0)]
        embeds = torch.where((image_index >= 0).unsqueeze(-1), picked, text)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        out = m.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos,
                          use_cache=True)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = m.llm.lm_head(out.last_hidden_state[rows, last])
        keys, values = stack_cache(out.past_key_values)
        return logits, keys, values


class DecodeStep(nn.Module):
    """One new token per row: ids (B, 1), past keys/values (L, B, H, T, hd), attention_mask
    (B, T + 1), positions (B, 1) -> logits (B, V), keys, values (L, B, H, T + 1, hd)."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, input_ids, keys, values, attention_mask, position_ids):
        m = self.model
        out = m.llm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=unstack_cache(keys, values), use_cache=True)
        logits = m.llm.lm_head(out.last_hidden_state[:, -1])
        new_keys, new_values = stack_cache(out.past_key_values)
        return logits, new_keys, new_values


GRAPHS = {"prefix": Prefix, "velocity": Velocity, "cfg_step": CfgStep, "vae_decoder": VAEDecoder,
          "vision": Vision, "und_prefill": UndPrefill, "decode_step": DecodeStep}


def image_index(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool placeholder mask -> (B, T) int64 row into the flattened image embeddings, -1 else."""
    flat = image_mask.flatten()
    index = torch.cumsum(flat.long(), 0) - 1
    return torch.where(flat, index, torch.full_like(index, -1)).view_as(image_mask)
