"""The three JanusFlow objectives on packed sequences, in one LLM forward.

A packed row holds several samples, each with its own positions and a block-causal mask (built by
data/packing.py). Per-token roles say where the embeddings come from:

- TEXT: the embedding table;
- UND_IMAGE: [beg_of_und_embed, aligner(f_enc(image))], 1 + N_und per understanding image;
- GEN_TIME, GEN_IMAGE: [t_emb, g_enc tokens of z_t], 1 + N_gen per generation sample.

Each loss is normalised by its own count (AR by target tokens, RF by generation samples, REPA by
generation tokens), so how samples are packed does not change the loss.
"""

from __future__ import annotations

import torch

from models import flow

TEXT, UND_IMAGE, GEN_TIME, GEN_IMAGE = 0, 1, 2, 3


def _scatter(embeds_BTD: torch.Tensor, where_BT: torch.Tensor, values_KMD: torch.Tensor, what: str):
    if int(where_BT.sum()) != values_KMD.shape[0] * values_KMD.shape[1]:
        raise ValueError(f"{what}: {int(where_BT.sum())} token slots for {values_KMD.shape[0]} "
                         f"item(s) of {values_KMD.shape[1]} tokens")
    flat = values_KMD.reshape(-1, values_KMD.shape[-1]).to(embeds_BTD.dtype)
    return embeds_BTD.masked_scatter(where_BT.unsqueeze(-1), flat)


def packed_losses(model, *, input_ids, position_ids, attention_mask, roles, labels,
                  und_pixels=None, latents=None, repa_target=None, t=None, noise=None,
                  generator: torch.Generator | None = None, repa_weight: float = 1.0,
                  ar_weight: float = 1.0, rf_weight: float = 1.0, t_mean: float = 0.0,
                  t_std: float = 1.0) -> dict[str, torch.Tensor]:
    """AR + RF + REPA of a packed batch.

    input_ids, position_ids, roles, labels: (B, T); attention_mask: (B, 1, T, T) bool;
    und_pixels: (M, 3, S, S) in token order; latents: (G, C_lat, h, w) scaled VAE latents of the
    generation samples in token order; repa_target: (G, N_gen, D_enc) stop-grad f_enc features.
    t (G,) and noise (G, C_lat, h, w) default to logit-normal times sigmoid(N(t_mean, t_std)) and
    Gaussian noise.
    Returns loss plus detached terms, the AR token count, and per-sample rf (G,) for t-bins.
    """
    embeds = model.embed_tokens(input_ids)
    device = embeds.device
    if und_pixels is not None and len(und_pixels):
        embeds = _scatter(embeds, roles == UND_IMAGE, model.understanding_features(und_pixels),
                          "understanding images")
    gen_slots = (roles == GEN_TIME) | (roles == GEN_IMAGE)
    g = int((roles == GEN_TIME).sum())
    if g:
        if latents is None or latents.shape[0] != g:
            raise ValueError(f"the batch has {g} generation samples but latents for "
                             f"{0 if latents is None else latents.shape[0]}")
        if t is None:
            t = flow.sample_t(g, generator=generator, mean=t_mean, std=t_std).to(device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
        z_t = flow.interpolate(latents, noise, t)
        tokens, skip, t_emb = model.image_tokens(z_t, t)
        embeds = _scatter(embeds, gen_slots, tokens, "generation samples")
    need_repa = g > 0 and repa_target is not None and repa_weight > 0
    out = model.llm.model(inputs_embeds=embeds, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False,
                          output_hidden_states=need_repa)
    hidden = out.last_hidden_state
    ar, n_ar = model.ar_loss(hidden, labels)
    loss = ar_weight * ar  # 0 (with a graph) when the batch has no text targets
    result = {"ar": ar.detach(), "ar_tokens": n_ar.detach()}
    if g:
        n = model.config.num_gen_tokens
        gen_hidden = hidden[gen_slots].view(g, n + 1, -1)  # [t_emb slot, z tokens] per sample
        v = model.velocity_from_hidden(gen_hidden, skip, t_emb)
        rf_each = flow.rf_loss(v, latents, noise)
        rf = rf_each.mean()
        loss = loss + rf_weight * rf
        result.update(rf=rf.detach(), rf_each=rf_each.detach(), t=t.detach())
        if need_repa:
            layer_hidden = out.hidden_states[model.config.repa.layer]
            repa = model.repa_loss(layer_hidden[roles == GEN_IMAGE].view(g, n, -1), repa_target)
            loss = loss + repa_weight * repa
            result["repa"] = repa.detach()
    result["loss"] = loss
    return result


class PackedObjective(torch.nn.Module):
    """packed_losses as one module forward, the frozen VAE encoding and the REPA target included,
    so wrappers that hook a module's forward (DDP, FSDP2) see the whole computation.

    gen_pixels: (G, 3, S, S) generation images in [-1, 1], in token order; `generator` draws t and
    the noise. gen_latents (G, C_lat, h, w) and gen_repa (G, N_gen, D_enc), where given (a latent
    cache's entries), replace encoding gen_pixels with the VAE and SigLIP. autocast_dtype: e.g.
    torch.bfloat16 on GPU; None runs in the weights' dtype.
    """

    def __init__(self, model, *, repa_weight: float = 1.0, rf_weight: float = 1.0,
                 autocast_dtype: torch.dtype | None = None, t_mean: float = 0.0, t_std: float = 1.0):
        super().__init__()
        self.model, self.repa_weight, self.autocast_dtype = model, repa_weight, autocast_dtype
        self.rf_weight = rf_weight
        self.t_mean, self.t_std = t_mean, t_std

    def forward(self, *, input_ids, position_ids, attention_mask, roles, labels, und_pixels=None,
                gen_pixels=None, gen_latents=None, gen_repa=None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        latents = gen_latents
        repa = gen_repa if self.repa_weight > 0 else None
        device = input_ids.device
        # The frozen VAE and REPA encoder run under the same autocast as the rest: in fp32 (matmuls
        # and convolutions at a fraction of the bf16 rate) a 1.3B stage-2 step on an H200 took
        # 1.057 s instead of 0.906 s.
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if gen_pixels is not None and len(gen_pixels):
                if latents is None:
                    with torch.no_grad():
                        latents = self.model.encode_images(gen_pixels).float()
                if repa is None and self.repa_weight > 0:
                    repa = self.model.repa_target(gen_pixels)
            return packed_losses(self.model, input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask, roles=roles, labels=labels,
                                 und_pixels=und_pixels, latents=latents, repa_target=repa,
                                 generator=generator, repa_weight=self.repa_weight,
                                 rf_weight=self.rf_weight,
                                 t_mean=self.t_mean, t_std=self.t_std)
