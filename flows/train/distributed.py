"""Scale-out on PyTorch's own engine, applied to a built model from outside (the model code knows
nothing of it).

`torchrun --nproc_per_node N` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the process group (NCCL on
GPUs, gloo on CPU) and wrap the loss module in DDP or shard it with FSDP2 (`fully_shard` per LLM
and SigLIP block, then the root). The global batch is micro-batch x grad_accum x world size: at
every step the data stream yields that many micro-batches and rank r trains on its own slice, so N
processes see exactly the micro-batches one process with N x the accumulation would see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flows.train.config import PARALLEL

@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (a no-op in one process)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0


def init_world(device: str) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (if any); returns the world and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if size == 1:
        return World(), dev
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"local process {local} has no GPU of its own ({torch.cuda.device_count()} "
                             f"visible): start at most that many processes per machine (procs, "
                             f"--nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, local), dev


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def blocks(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the unit of sharding, checkpointing and compilation."""
    return list(model.llm.model.layers) + list(model.vision.encoder.layers)


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of storing them. transformers' own
    switch, so parameter names (which the stage sets and checkpoints key on) stay unchanged."""
    for part in (model.llm, model.vision):
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compile(model) -> None:
    """torch.compile each block (what torchtitan does: small graphs, compiled once, reused)."""
    for block in blocks(model):
        block.compile()


def parallelize(objective: torch.nn.Module, *, mode: str, world: World, device: torch.device,
                bf16: bool = False) -> torch.nn.Module:
    """Wrap the loss module for `world`; returns the module to call (itself in one process)."""
    if not world.distributed:
        return objective
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # A micro-batch without generation samples leaves g_enc/g_dec without gradients.
        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": mp} if mp else {}
        for block in blocks(objective.model):
            fully_shard(block, **kwargs)
        fully_shard(objective, **kwargs)
        return objective
    raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {mode!r}")


def fused_adamw(device: torch.device) -> bool | None:
    """AdamW's fused kernel where PyTorch has one (CUDA, CPU): one pass over the fp32 weights and both
    moments instead of foreach's several. The 1.3B step spends tens of ms there on a GPU; on the CPU
    the shapes stage-2 update (6.3M weights, one thread) takes 5 ms instead of 31-42 ms."""
    return True if device.type in ("cuda", "cpu") else None


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); shares storage."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
