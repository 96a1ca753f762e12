"""JanusFlow: one Llama LLM that answers about images (SigLIP -> LLM -> text) and is the velocity
network of a rectified flow in VAE latent space (g_enc -> LLM -> g_dec).

The module knows nothing of files, distribution or training loops; those live in checkpoint.py,
flows/ and serving/.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, \
    SiglipVisionModel

from models import flow
from models.adapters import GenDecoder, GenEncoder, RepaHead, RMSNorm
from models.config import JanusFlowConfig
from models.processor import IGNORE_INDEX


def llama_config(cfg: JanusFlowConfig) -> LlamaConfig:
    c = cfg.llm
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="sdpa",
    )


def siglip_config(cfg: JanusFlowConfig) -> SiglipVisionConfig:
    v = cfg.vision
    return SiglipVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act, vision_use_head=False, attn_implementation="sdpa",
    )


def vae_from_config(cfg: JanusFlowConfig) -> AutoencoderKL:
    v = cfg.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups, sample_size=cfg.gen.image_size,
        scaling_factor=v.scaling_factor,
    )


def generation_mask(prompt_mask: torch.Tensor, m: int, *, full_image: bool) -> torch.Tensor:
    """Attention mask of right-padded prompts (B, P) followed by m new tokens [t_emb, z tokens].

    causal: the flat (B, P + m) key mask; the LLM adds its causal mask itself. full: a
    (B, 1, P + m, P + m) bool mask, causal except that the z tokens all see each other (the t_emb
    token still sees only what precedes it). Keep the last m query rows when the prompt is cached.
    """
    b = prompt_mask.shape[0]
    p = prompt_mask.shape[1]
    flat = torch.cat([prompt_mask, prompt_mask.new_ones(b, m)], dim=1)
    if not full_image:
        return flat
    i = torch.arange(p + m, device=flat.device)
    image = i > p  # z tokens: after the prompt and the t_emb slot
    allowed = (i[None, :] <= i[:, None]) | (image[:, None] & image[None, :])
    allowed = (allowed[None] & flat.bool()[:, None, :]) | (i[:, None] == i[None, :])[None]
    return allowed[:, None]


class JanusFlow(nn.Module):
    """The whole model. Components can be passed in already built (pretrained) or made from config.

    Attribute names are this project's; models/official.py maps the release's names onto them.
    """

    def __init__(self, config: JanusFlowConfig, *, llm: LlamaForCausalLM | None = None,
                 vision: SiglipVisionModel | None = None, vae: AutoencoderKL | None = None):
        super().__init__()
        self.config = config.validate()
        d_llm, d_enc, c_gen = config.llm.hidden_size, config.vision.hidden_size, config.gen.channels
        self.llm = llm if llm is not None else LlamaForCausalLM(llama_config(config))
        self.vision = vision if vision is not None else SiglipVisionModel(siglip_config(config))
        self.und_aligner = nn.Linear(d_enc, d_llm)
        self.beg_of_und_embed = nn.Parameter(torch.randn(1, d_llm) * 0.02)
        self.gen_encoder = GenEncoder(config.gen, latent_channels=config.vae.latent_channels,
                                      cond_dim=d_llm)
        self.gen_enc_aligner = nn.Linear(c_gen, d_llm)
        self.gen_dec_norm = RMSNorm(d_llm, config.llm.rms_norm_eps)
        self.gen_dec_aligner = nn.Linear(d_llm, c_gen)
        self.gen_decoder = GenDecoder(config.gen, latent_channels=config.vae.latent_channels,
                                      cond_dim=d_llm)
        self.repa_head = RepaHead(d_llm, config.repa.hidden_size, d_enc)
        self.vae = vae if vae is not None else vae_from_config(config)
        self.vae.requires_grad_(False)

    # -- components ---------------------------------------------------------------------------------
    COMPONENTS = {
        "llm": ("llm",),
        "f_enc": ("vision",),
        "und_aligner": ("und_aligner", "beg_of_und_embed"),
        "g_enc": ("gen_encoder",),
        "g_dec": ("gen_decoder",),
        "gen_aligners": ("gen_enc_aligner", "gen_dec_norm", "gen_dec_aligner"),
        "repa_head": ("repa_head",),
        "vae": ("vae",),
    }

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        counts = {}
        for name, attrs in self.COMPONENTS.items():
            total = 0
            for attr in attrs:
                obj = getattr(self, attr)
                total += obj.numel() if isinstance(obj, nn.Parameter) else sum(
                    p.numel() for p in obj.parameters())
            counts[name] = total
        return counts

    @property
    def device(self) -> torch.device:
        return self.beg_of_und_embed.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    # -- VAE ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (B, C_lat, H/f, W/f); the latent mean, no sampling."""
        dist = self.vae.encode(pixels_BCHW.to(self.vae.dtype)).latent_dist
        return dist.mean * self.config.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (B, 3, H, W)."""
        z = z_BCHW.to(self.vae.dtype) / self.config.vae.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

    @torch.no_grad()
    def repa_target(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """REPA's stop-gradient target: f_enc patch features (B, N, D_enc) of images in [-1, 1]."""
        return self.vision(pixel_values=pixels_BCHW.to(self.und_aligner.weight.dtype)).last_hidden_state

    # -- understanding ------------------------------------------------------------------------------
    def understanding_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) in [-1, 1] -> (M, 1 + N, D_llm): beg_of_und_embed then aligned f_enc tokens."""
        feats = self.vision(pixel_values=pixel_values.to(self.und_aligner.weight.dtype))
        tokens = self.und_aligner(feats.last_hidden_state)
        # Unlike the release (which detaches it), the begin-of-understanding embedding must train.
        begin = self.beg_of_und_embed.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return torch.cat([begin, tokens], dim=1)

    def understanding_embeds(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
                             pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every image's 1 + N positions (image_mask) filled, out of place."""
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        images = self.understanding_features(pixel_values).to(embeds.dtype)
        if int(image_mask.sum()) != images.shape[0] * images.shape[1]:
            raise ValueError(f"image_mask marks {int(image_mask.sum())} positions but "
                             f"{images.shape[0]} image(s) give {images.shape[0] * images.shape[1]}")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), images.reshape(-1, images.shape[-1]))

    def understanding_loss(self, *, input_ids, attention_mask, labels, image_mask, pixel_values,
                           position_ids=None) -> dict[str, torch.Tensor]:
        """Next-token loss on response tokens only, averaged over those tokens."""
        embeds = self.understanding_embeds(input_ids, image_mask, pixel_values)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False).last_hidden_state
        ar, n = self.ar_loss(hidden, labels)
        return {"loss": ar, "ar": ar.detach(), "ar_tokens": n.detach()}

    def ar_loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor):
        """(mean next-token loss over target tokens, their count); labels aligned with inputs."""
        target = labels_BT[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.llm.lm_head(hidden_BTD[:, :-1][keep])
        n = keep.sum()
        ar = F.cross_entropy(logits.float(), target[keep], reduction="sum") / n.clamp(min=1)
        return ar, n

    def repa_loss(self, hidden_GND: torch.Tensor, target_GND: torch.Tensor) -> torch.Tensor:
        """REPA: minus the mean cosine similarity of h_phi(hidden) and the stop-grad f_enc target."""
        pred = self.repa_head(hidden_GND)
        return -F.cosine_similarity(pred.float(), target_GND.detach().float(), dim=-1).mean()

    # -- generation ---------------------------------------------------------------------------------
    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> DynamicCache:
        """Key/value cache of the prompt prefix (B, P); computed once, reused every Euler step."""
        pos = torch.arange(prompt_ids.shape[1], device=prompt_ids.device).expand_as(prompt_ids)
        out = self.llm.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos,
                             use_cache=True)
        return out.past_key_values

    def image_tokens(self, z_t: torch.Tensor, t_B: torch.Tensor):
        """g_enc + aligner: (B, C_lat, H, W), t in [0, 1] -> ((B, 1 + N, D) [t_emb, z tokens], skip, t_emb)."""
        z_map, t_emb, skip = self.gen_encoder(z_t, flow.model_time(t_B))
        if not self.config.gen.skip:
            skip = torch.zeros_like(skip)
        tokens = self.gen_enc_aligner(z_map.flatten(2).transpose(1, 2))
        return torch.cat([t_emb.unsqueeze(1).to(tokens.dtype), tokens], dim=1), skip, t_emb

    def new_token_mask(self, prompt_mask: torch.Tensor, m: int, *, cached: bool) -> torch.Tensor:
        """generation_mask under this model's gen.image_attention; with a cached prompt only the m
        new tokens' query rows."""
        mask = generation_mask(prompt_mask, m, full_image=self.config.gen.full_image_attention)
        return mask[:, :, -m:] if cached and mask.dim() == 4 else mask

    def velocity_from_hidden(self, hidden_BND: torch.Tensor, skip, t_emb) -> torch.Tensor:
        """dec aligner + g_dec on the last N hidden states -> velocity (B, C_lat, H, W); with
        gen.dec_prompt the state before them (the t_emb slot's) must be there too."""
        b, n = hidden_BND.shape[0], self.config.num_gen_tokens
        grid = self.config.gen_grid
        h = self.gen_dec_aligner(self.gen_dec_norm(hidden_BND[:, -n:]))
        h = h.transpose(1, 2).reshape(b, -1, grid, grid)
        prompt = hidden_BND[:, -n - 1] if self.config.gen.dec_prompt else None
        return self.gen_decoder(h, skip, t_emb, prompt)

    def velocity(self, z_t: torch.Tensor, t_B: torch.Tensor, *, prompt_mask: torch.Tensor,
                 prompt_lengths: torch.Tensor, cache: DynamicCache | None = None,
                 prompt_embeds: torch.Tensor | None = None, hidden_layer: int | None = None):
        """v(z_t, t | prompt) for a batch whose prompts are right-padded to P tokens.

        Give either `cache` (from prefill; cropped back to P afterwards, so it can be reused) or
        `prompt_embeds` (B, P, D) for a full forward. Image tokens sit at positions L_i .. L_i + N
        of their row, whatever P is. Returns v, or (v, hidden after block `hidden_layer`).
        """
        x_new, skip, t_emb = self.image_tokens(z_t, t_B)
        b, m = x_new.shape[:2]
        p = prompt_mask.shape[1]
        new_pos = prompt_lengths.view(-1, 1) + torch.arange(m, device=x_new.device)
        mask = self.new_token_mask(prompt_mask, m, cached=cache is not None)
        want_hidden = hidden_layer is not None
        if cache is not None:
            out = self.llm.model(inputs_embeds=x_new, attention_mask=mask,
                                 position_ids=new_pos, past_key_values=cache, use_cache=True,
                                 output_hidden_states=want_hidden)
            cache.crop(-m)  # drop the image tokens again: the prefix is reused next step
        else:
            if prompt_embeds is None:
                raise ValueError("velocity needs either cache or prompt_embeds")
            old_pos = torch.arange(p, device=x_new.device).expand(b, p)
            out = self.llm.model(inputs_embeds=torch.cat([prompt_embeds.to(x_new.dtype), x_new], 1),
                                 attention_mask=mask, position_ids=torch.cat([old_pos, new_pos], 1),
                                 use_cache=False, output_hidden_states=want_hidden)
        v = self.velocity_from_hidden(out.last_hidden_state, skip, t_emb)
        if want_hidden:
            return v, out.hidden_states[hidden_layer]
        return v

    def generation_loss(self, *, prompt_ids, prompt_mask, prompt_lengths, latents,
                        repa_target=None, repa_pixels=None, t=None, noise=None,
                        generator: torch.Generator | None = None,
                        repa_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """RF loss ||v - (x - z0)||^2 plus REPA's negative cosine similarity.

        latents: (B, C_lat, H, W) scaled VAE latents x. REPA's target is f_enc's patch features of
        the same image, stop-gradient: pass `repa_target` (B, N, D_enc) or `repa_pixels`
        (B, 3, S, S) in [-1, 1]. t and noise default to logit-normal t and Gaussian z0.
        """
        b = latents.shape[0]
        if t is None:
            t = flow.sample_t(b, generator=generator).to(latents.device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
        z_t = flow.interpolate(latents, noise, t)
        need_repa = repa_target is not None or repa_pixels is not None
        out = self.velocity(z_t, t, prompt_mask=prompt_mask, prompt_lengths=prompt_lengths,
                            prompt_embeds=self.embed_tokens(prompt_ids),
                            hidden_layer=self.config.repa.layer if need_repa else None)
        v, hidden = out if need_repa else (out, None)
        rf = flow.rf_loss(v, latents, noise).mean()
        result = {"rf": rf.detach()}
        loss = rf
        if need_repa:
            if repa_target is None:
                repa_target = self.repa_target(repa_pixels)
            repa = self.repa_loss(hidden[:, -self.config.num_gen_tokens:], repa_target)
            loss = loss + repa_weight * repa
            result["repa"] = repa.detach()
        result["loss"] = loss
        return result
