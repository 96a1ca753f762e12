"""Reference samplers: text-to-image Euler integration with CFG, and answer decoding.

sample_latents computes each prompt's key/value prefix once and reuses it for every step (the
official demo meant to, but recomputes the prefix every step); `use_cache=False` is that recompute
loop, kept as the ground truth the cached path must match.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from models import flow
from models.processor import Batch, JanusFlowProcessor


@torch.no_grad()
def sample_latents(model, processor: JanusFlowProcessor, prompts: Batch, *,
                   num_inference_steps: int = 30, guidance_scale: float = 2.0,
                   seeds: list[int], use_cache: bool = True, progress: bool = False,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integrate dz/dt = v from t = 0 (noise) to t = 1; returns scaled latents (B, C_lat, H, W).

    Rows are [cond..., uncond...] as in the release: the unconditional rows keep only BOS of
    their prompt (the rest padded and masked) and share the conditional rows' positions.
    guidance_scale == 1 drops the unconditional rows, since they would get zero weight.
    """
    cfg = model.config
    device = model.device
    dtype = dtype or model.gen_enc_aligner.weight.dtype
    b = prompts.input_ids.shape[0]
    use_cfg = float(guidance_scale) != 1.0
    batch = prompts
    if use_cfg:
        uncond = processor.unconditional(prompts)
        batch = Batch(input_ids=torch.cat([prompts.input_ids, uncond.input_ids]),
                      attention_mask=torch.cat([prompts.attention_mask, uncond.attention_mask]),
                      lengths=torch.cat([prompts.lengths, prompts.lengths]))
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    lengths = batch.lengths.to(device)
    cache = model.prefill(ids, mask) if use_cache else None
    embeds = None if use_cache else model.embed_tokens(ids)

    shape = (b, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    z = flow.initial_noise(shape, seeds, device=device, dtype=dtype)
    dt = 1.0 / num_inference_steps
    for t in tqdm(flow.timesteps(num_inference_steps), disable=not progress, desc="sampling"):
        z_in = torch.cat([z, z]) if use_cfg else z
        t_B = torch.full((z_in.shape[0],), t, device=device, dtype=dtype)
        v = model.velocity(z_in, t_B, prompt_mask=mask, prompt_lengths=lengths, cache=cache,
                           prompt_embeds=embeds)
        if use_cfg:
            v = flow.cfg_combine(*v.chunk(2), guidance_scale)
        z = flow.euler_step(z, v.to(z.dtype), dt)
    return z


def _pick(logits_BV: torch.Tensor, *, temperature: float, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)


@torch.no_grad()
def generate_text(model, processor: JanusFlowProcessor, batch: Batch, *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
                  progress: bool = False) -> list[list[int]]:
    """Decode answers after right-padded understanding prompts, with a KV cache.

    Greedy when temperature == 0, else sampling with temperature and nucleus top_p.
    Returns the new token ids of each row, without the EOS.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    lengths = batch.lengths.to(device)
    embeds = model.understanding_embeds(ids, batch.image_mask.to(device),
                                        batch.pixel_values.to(device))
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    out = model.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                          use_cache=True)
    cache = out.past_key_values
    rows = torch.arange(ids.shape[0], device=device)
    logits = model.llm.lm_head(out.last_hidden_state[rows, lengths - 1])
    generator = torch.Generator().manual_seed(seed)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for step in tqdm(range(max_new_tokens), disable=not progress, desc="decoding"):
        token = _pick(logits, temperature=temperature, top_p=top_p, generator=generator)
        for i in range(len(answers)):
            if not done[i] and int(token[i]) != processor.eos_id:
                answers[i].append(int(token[i]))
        done |= token == processor.eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model.llm.model(input_ids=token.unsqueeze(1), attention_mask=mask,
                              position_ids=(lengths + step).unsqueeze(1), past_key_values=cache,
                              use_cache=True)
        logits = model.llm.lm_head(out.last_hidden_state[:, -1])
    return answers
