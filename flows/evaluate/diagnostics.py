"""Diagnostics that move before the headline scores do.

- prompt_gain: how much the prompt tells the velocity network. Held-out generation pairs are scored
  with the RF loss twice at the same t and noise: once with each image's own prompt, once with the
  next image's prompt. The relative loss reduction is near 0 for a model that ignores its prompt
  (its layout, count and shapes then come from the noise alone); it grows as conditioning is learnt.
- vqa_by_type: held-out VQA accuracy per kind of question, where the corpus says what kinds it has.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from data.sequences import decode_image, preprocess_generation
from data.shards import ShardReader
from models import flow

GAIN_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def prompt_gain(pipe, corpus, *, split: str = "heldout", samples: int = 128, seed: int = 0,
                batch: int = 64, times: tuple[float, ...] = GAIN_TIMES) -> dict[str, float]:
    """prompt_gain_of on up to `samples` generation pairs of a corpus split."""
    reader = ShardReader(corpus, split, "gen")
    pairs = []
    for i in range(min(samples, len(reader))):
        record, data = reader.read(i)
        if data is not None and isinstance(record.get("prompt"), str):
            pairs.append((record["prompt"], data))
    if len(pairs) < 2:
        raise ValueError(f"prompt_gain needs at least 2 generation pairs in {corpus}/{split}, found {len(pairs)}")
    size = pipe.model.config.gen.image_size
    rng = np.random.default_rng(seed)
    pixels = torch.stack([preprocess_generation(decode_image(d), size, rng)[0] for _, d in pairs])
    return prompt_gain_of(pipe, [p for p, _ in pairs], pixels, seed=seed, batch=batch, times=times)


@torch.no_grad()
def prompt_gain_of(pipe, prompts: list[str], pixels: torch.Tensor, *, seed: int = 0, batch: int = 64,
                   times: tuple[float, ...] = GAIN_TIMES) -> dict[str, float]:
    """{'prompt_gain': mean over times, 'prompt_gain_t0.30': ...}: (L_other - L_own) / L_other of
    the RF loss of images (N, 3, S, S) in [-1, 1] with their own prompts vs the list rotated by
    one, at the same t and noise (t = 0 is noise, 1 the image)."""
    model, proc = pipe.model, pipe.processor
    others = prompts[1:] + prompts[:1]
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    own_sum = {t: 0.0 for t in times}
    other_sum = {t: 0.0 for t in times}
    for k in range(0, len(prompts), batch):
        latents = model.encode_images(pixels[k:k + batch].to(device))
        conditions = []  # (mask, lengths, embeds, sums) of the own and the other prompts
        for texts, sums in ((prompts, own_sum), (others, other_sum)):
            enc = proc.encode_prompts(texts[k:k + batch])
            conditions.append((enc.attention_mask.to(device), enc.lengths.to(device),
                               model.embed_tokens(enc.input_ids.to(device)), sums))
        for t in times:
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            t_B = torch.full((latents.shape[0],), t, device=device)
            z_t = flow.interpolate(latents, noise, t_B)
            for mask, lengths, embeds, sums in conditions:
                v = model.velocity(z_t, t_B, prompt_mask=mask, prompt_lengths=lengths, prompt_embeds=embeds)
                sums[t] += float(flow.rf_loss(v.float(), latents.float(), noise.float()).sum())
    out = {f"prompt_gain_t{t:.2f}": (other_sum[t] - own_sum[t]) / other_sum[t] for t in times}
    out["prompt_gain"] = float(np.mean(list(out.values())))
    return out


def vqa_by_type(rows: list[dict], kind) -> dict[str, float]:
    """{'vqa_<kind>': accuracy} over answered rows; `kind(question)` names a question's kind or
    returns None to leave it out."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        name = kind(row["question"])
        if name is not None:
            groups[name].append(bool(row["correct"]))
    return {f"vqa_{name}": sum(v) / len(v) for name, v in sorted(groups.items())}
