"""Rectified-flow math in JanusFlow's time direction: noise at t = 0, data at t = 1.

z_t = t * x + (1 - t) * z0, the velocity target is x - z0, and the network is fed t * 1000.
(SD3, diffusers and most rectified-flow code run the other way; nothing here may be flipped.)
Training, evaluation, export parity and serving all call these functions.
"""

from __future__ import annotations

import torch

TIME_SCALE = 1000.0


def sample_t(batch: int, *, generator: torch.Generator | None = None, mean: float = 0.0,
             std: float = 1.0, device=None) -> torch.Tensor:
    """Logit-normal times in (0, 1), shape (batch,), as SD3 samples them."""
    u = torch.randn(batch, generator=generator, device=device) * std + mean
    return torch.sigmoid(u)


def interpolate(x: torch.Tensor, z0: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """z_t = t x + (1 - t) z0, with t broadcast over every non-batch dimension."""
    t = t_B.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return t * x + (1 - t) * z0


def velocity_target(x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    return x - z0


def rf_loss(v_pred: torch.Tensor, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error against x - z0, shape (B,)."""
    err = (v_pred.float() - velocity_target(x, z0).float()).pow(2)
    return err.flatten(1).mean(dim=1)


def model_time(t_B: torch.Tensor) -> torch.Tensor:
    """The time value the network sees (t in [0, 1] -> [0, 1000])."""
    return t_B * TIME_SCALE


def timesteps(num_steps: int) -> list[float]:
    """The Euler grid of the reference sampler: t_k = k / num_steps for k = 0 .. num_steps-1."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    return [k / num_steps for k in range(num_steps)]


def euler_step(z: torch.Tensor, v: torch.Tensor, dt: float) -> torch.Tensor:
    return z + dt * v


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale) -> torch.Tensor:
    """v = w v_cond - (w - 1) v_uncond; w may be a float or a per-row tensor (B,)."""
    w = guidance_scale
    if isinstance(w, torch.Tensor):
        w = w.view(-1, *([1] * (v_cond.dim() - 1))).to(v_cond.dtype)
    return w * v_cond - (w - 1) * v_uncond


def initial_noise(shape: tuple[int, ...], seeds: list[int], *, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """z at t = 0, one generator per row so a row's noise never depends on its batch."""
    if len(seeds) != shape[0]:
        raise ValueError(f"need one seed per row: {len(seeds)} seeds for batch {shape[0]}")
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)
