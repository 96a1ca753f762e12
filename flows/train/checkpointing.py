"""Training checkpoints: torch.distributed.checkpoint (DCP) for the tensors, so one code path serves
one process, DDP and FSDP2 (each rank writes its own shards), plus a small file for the rest.

Layout of OUT/checkpoints/step-NNNNNNNN/:
    *.distcp, .metadata  trainable weights, EMA, optimizer state (DCP)
    extra.pt             LR schedule, data-stream position, RNG state, step
    meta.json            step, run id, stage, data version, config (written last)

Everything is written under .tmp-step-N and renamed when complete, so a crash mid-save never leaves
a directory that looks like a checkpoint; `latest` only considers directories with meta.json.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from flows.train.distributed import World


class CheckpointError(OSError):
    """A checkpoint that could not be written or read; the message says which and why."""


@contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _causes(e) -> str:
    return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in e.failures.items())


def _tensors(module, optimizer, params: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict:
    return {"model": {n: p.detach() for n, p in params.items()}, "ema": ema,
            "optimizer": get_optimizer_state_dict(module, optimizer)}


def save(ckpt_dir: Path, step: int, *, world: World, module, optimizer,
         params: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], extra: dict, meta: dict,
         keep: int) -> Path:
    """Write step `step` atomically; keep the newest `keep` checkpoints. Every rank must call it."""
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    try:
        with _single_process_quiet():
            dcp.save(_tensors(module, optimizer, params, ema), checkpoint_id=str(tmp))
    except CheckpointException as e:  # a BaseException: make it an ordinary, one-line error
        raise CheckpointError(f"checkpoint {final.name} not written: {_causes(e)}") from None
    world.barrier()
    if world.main:
        torch.save(extra, tmp / "extra.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    world.barrier()
    return final


def latest(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def load(path: Path, *, module, optimizer, params: dict[str, torch.Tensor],
         ema: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Load tensors in place (each rank its shards); returns (extra, meta)."""
    state = _tensors(module, optimizer, params, ema)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:
        raise CheckpointError(f"cannot resume from {path}: {_causes(e)}") from None
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
    extra = torch.load(path / "extra.pt", map_location="cpu", weights_only=False)
    return extra, json.loads((path / "meta.json").read_text())
