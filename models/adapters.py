"""The generation adapters g_enc and g_dec, and the REPA projection head h_phi.

g_enc turns a noisy latent z_t and a time t into LLM-width-ready tokens, a time embedding and a skip
map; g_dec turns the LLM's last hidden states (mapped back to adapter width) plus that skip map into a
velocity of the latent's shape. Both are a stack of time-modulated ConvNeXt blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from models.config import GenConfig
from models.precision import fp32_on_cpu


class RMSNorm(nn.Module):
    """RMS norm over the last dimension, computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input (B, H, W, C); starts as the identity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x_BHWC, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return x_BHWC + self.gamma * (x_BHWC * n) + self.beta


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> RMSNorm -> MLP with GRN -> residual, then (scale, shift) from t_emb."""

    def __init__(self, channels: int, cond_dim: int, *, mlp_ratio: int = 4, eps: float = 1e-6,
                 dropout: float = 0.0):
        super().__init__()
        hidden = channels * mlp_ratio
        self.dwconv = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.norm = RMSNorm(channels, eps)
        self.fc1 = nn.Linear(channels, hidden)
        self.grn = GlobalResponseNorm(hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.dropout = nn.Dropout(dropout)
        self.modulation = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x_BCHW: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        h = fp32_on_cpu(self.dwconv, x_BCHW).permute(0, 2, 3, 1)
        h = self.fc2(self.grn(F.gelu(self.fc1(self.norm(h)))))
        x = x_BCHW + self.dropout(h).permute(0, 3, 1, 2)
        scale, shift = self.modulation(F.silu(cond_BD)).chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class GenEncoder(nn.Module):
    """g_enc: (z_t (B, C_lat, H, W), t (B,) in [0, 1000]) -> tokens, t_emb, skip.

    tokens: (B, C, H/p, W/p) adapter map; t_emb: (B, D_llm); skip: the same map, kept for g_dec.
    """

    def __init__(self, cfg: GenConfig, *, latent_channels: int, cond_dim: int):
        super().__init__()
        self.time_proj = Timesteps(cfg.time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(cfg.time_channels, cond_dim)
        self.patchify = nn.Conv2d(latent_channels, cfg.channels, kernel_size=cfg.patch_size,
                                  stride=cfg.patch_size)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(cfg.channels, cond_dim, mlp_ratio=cfg.mlp_ratio, eps=cfg.norm_eps,
                          dropout=cfg.dropout)
            for _ in range(cfg.blocks)
        )

    def forward(self, z_BCHW: torch.Tensor, t_B: torch.Tensor):
        t_emb = self.time_embed(self.time_proj(t_B.flatten()).to(z_BCHW.dtype))
        x = self.patchify(z_BCHW)
        for block in self.blocks:
            x = block(x, t_emb)
        return x, t_emb, x


class GenDecoder(nn.Module):
    """g_dec: (map (B, C, h, w), skip (B, C, h, w), t_emb (B, D)) -> velocity (B, C_lat, h*p, w*p)."""

    def __init__(self, cfg: GenConfig, *, latent_channels: int, cond_dim: int):
        super().__init__()
        wide = 2 * cfg.channels
        self.input_norm = RMSNorm(cfg.channels, cfg.norm_eps)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(wide, cond_dim, mlp_ratio=cfg.mlp_ratio, eps=cfg.norm_eps,
                          dropout=cfg.dropout)
            for _ in range(cfg.blocks)
        )
        self.out_norm = RMSNorm(wide, cfg.norm_eps)
        self.out_proj = nn.Conv2d(wide, latent_channels * cfg.patch_size**2, kernel_size=1)
        self.unpatchify = nn.PixelShuffle(cfg.patch_size)
        if cfg.dec_prompt:  # starts at zero: the decoder begins as JanusFlow's
            self.prompt_proj = nn.Sequential(RMSNorm(cond_dim, cfg.norm_eps), nn.Linear(cond_dim, cond_dim))
            nn.init.zeros_(self.prompt_proj[1].weight)
            nn.init.zeros_(self.prompt_proj[1].bias)

    def forward(self, x_BCHW: torch.Tensor, skip_BCHW: torch.Tensor, t_emb: torch.Tensor,
                prompt: torch.Tensor | None = None):
        """prompt (B, D): the LLM's output at the t_emb slot, read when built with dec_prompt."""
        if hasattr(self, "prompt_proj"):
            if prompt is None:
                raise ValueError("this g_dec was built with gen.dec_prompt and needs the prompt state")
            t_emb = t_emb + self.prompt_proj(prompt.to(t_emb.dtype))
        x = self.input_norm(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.cat([x, skip_BCHW], dim=1)
        for block in self.blocks:
            x = block(x, t_emb)
        x = self.out_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.unpatchify(self.out_proj(x))


class RepaHead(nn.Module):
    """h_phi: a 3-layer SiLU MLP, (B, N, D_llm) -> (B, N, D_enc). Training only."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
