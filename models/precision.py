"""Which ops leave bf16 autocast on a CPU, and where bf16 is the faster dtype.

On a CPU with bf16 matrix units (Intel's AMX, or AVX512-BF16 as on AMD's Zen 4/5), bf16 autocast runs
the LLM's matmuls ~4x faster than fp32 (the shapes preset's stage-2 step on an AMX core: 0.39 -> 0.29 s),
but two kernels are slower in bf16 than in fp32 there:
the flash-attention kernel (forward + backward of a ~90-token packed sample 1.4 against 0.5 ms) and
the depthwise 7x7 convolution's backward in g_enc / g_dec (~2x). Those run in fp32 through
`fp32_on_cpu`; on a GPU, or without autocast, it is a plain call.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# What a training config, `janusflow eval` and the torch serving backend take. This module imports
# torch only inside its functions, so configs (and `janusflow train`'s launcher) read this without it.
DTYPES = ("fp32", "bf16", "auto")


def fp32_on_cpu(fn: Callable, *tensors: torch.Tensor, **kwargs):
    """fn(*tensors, **kwargs), in fp32 with autocast off when CPU autocast is on for these tensors."""
    import torch

    if tensors[0].device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return fn(*tensors, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return fn(*(t.float() for t in tensors), **kwargs)


# /proc/cpuinfo flags of the CPUs whose bf16 matmuls beat fp32 ones: Intel's AMX tiles, and AVX512-BF16
# (AMD Zen 4/5, Intel Cooper Lake): a SigLIP bootstrap step's matmuls 3.4x faster on a Zen 5 core
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (Linux: /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """'fp32' or 'bf16' for a config's dtype: 'auto' is bf16 where it is the faster one (a CUDA device
    with bf16 support, or a CPU with AMX or AVX512-BF16) and fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_matmul() else "fp32"
