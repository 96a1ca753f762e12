"""Packed-row attention that skips the work between samples: `attention: segments` in training.

A packed row holds several samples that never see each other, so its (T, T) mask is block-diagonal
and a dense kernel spends most of its work on masked-out pairs (a 512-token row of ~90-token samples:
~5/6 of it). FlexAttention skips those blocks on a GPU but has no backward on the CPU; this runs the
plain SDPA kernel once per block of whole samples instead, with that block's part of the mask, so the
result is the dense one. The blocks are read off the mask itself: position p may start a block when
no query from p on sees a key before p and no query before p sees a key from p on.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.precision import fp32_on_cpu

NAME = "packed_segments"
MIN_BLOCK = 64  # tokens: smaller blocks are merged, so padding does not become one call per token


def row_blocks(mask_TT: torch.Tensor, min_block: int = MIN_BLOCK) -> list[int]:
    """The lengths of consecutive blocks of one row whose queries only see keys inside their own
    block (bool mask, True = may attend), each at least `min_block` long except possibly the last."""
    t = mask_TT.shape[-1]
    idx = torch.arange(t, device=mask_TT.device)
    seen = mask_TT.any(-1)
    lo = torch.where(seen, mask_TT.int().argmax(-1), idx)  # first key each query sees
    hi = torch.where(seen, t - 1 - mask_TT.flip(-1).int().argmax(-1), idx)  # its last key
    # p starts a block iff min(lo[p:]) >= p and max(hi[:p]) < p
    lo_after = torch.flip(torch.cummin(torch.flip(lo, [0]), 0).values, [0])
    hi_before = torch.cat([idx.new_full((1,), -1), torch.cummax(hi, 0).values[:-1]])
    starts = ((lo_after >= idx) & (hi_before < idx)).nonzero().flatten().tolist()
    sizes, begin = [], 0
    for s in starts[1:] + [t]:
        if s - begin >= min_block or s == t:
            sizes.append(s - begin)
            begin = s
    return sizes


# Every layer of one forward gets the same mask tensor: its blocks are found once, by the first.
_last: tuple[torch.Tensor, list[list[int]]] | None = None


def _blocks_of(mask_B1TT: torch.Tensor) -> list[list[int]]:
    global _last
    if _last is None or _last[0] is not mask_B1TT:
        _last = (mask_B1TT, [row_blocks(m[0]) for m in mask_B1TT])
    return _last[1]


@torch.compiler.disable
def segments_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: (B, H, T, D) tensors in, (B, T, H, D) out.
    In fp32 under a CPU's bf16 autocast (models/precision.py). Left out of `torch.compile` (`compile:
    true` compiles the rest of each block): its loop over blocks follows each batch's packing, which
    would recompile the block at every new layout."""
    return fp32_on_cpu(lambda q, k, v: _segments(module, q, k, v, attention_mask, **kwargs),
                       query, key, value)


def _segments(module, query, key, value, attention_mask, **kwargs):
    if attention_mask is None or attention_mask.dtype != torch.bool or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    blocks = _blocks_of(attention_mask)
    rows = []
    for b, (q, k, v) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        row = b if attention_mask.shape[0] > 1 else 0
        m, sizes = attention_mask[row, 0], blocks[row]
        parts, at = [], 0
        for q_, k_, v_, n in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), sizes):
            sub = m[at:at + n, at:at + n][None, None]
            parts.append(sdpa_attention_forward(module, q_[None], k_[None], v_[None], sub, **kwargs)[0])
            at += n
        rows.append(torch.cat(parts, 1))
    return torch.cat(rows, 0), None


def register() -> str:
    """Make NAME a transformers attention implementation (idempotent); returns NAME."""
    AttentionInterface.register(NAME, segments_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
