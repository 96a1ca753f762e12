"""Packing: several encoded samples per sequence of max_len, isolated from each other.

Each sample keeps its own positions (0, 1, ... from its first token) and attends only within
itself, causally. The attention mask is a (B, 1, T, T) boolean tensor (True = may attend), which
transformers' Llama takes as is; padding at the end of a row attends only to itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.sequences import GEN_IMAGE, UND_IMAGE, Encoded
from models.processor import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], *, max_len: int, bins: int) -> tuple[list[list[int]], list[int]]:
    """Place sample indices into at most `bins` bins of max_len tokens.

    Longest first, each into the first bin with room (ties keep the input order, so the result is
    deterministic). Returns (bins of indices in input order, indices that did not fit).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room: list[int] = []
    placed: list[list[int]] = []
    left: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"a sample of {n} tokens cannot fit max_len {max_len}")
        for b, free in enumerate(room):
            if n <= free:
                room[b] -= n
                placed[b].append(i)
                break
        else:
            if len(room) < bins:
                room.append(max_len - n)
                placed.append([i])
            else:
                left.append(i)
    return [sorted(b) for b in placed], sorted(left)


@dataclass
class PackedBatch:
    """B packed rows of T = max_len tokens; images listed in the order their tokens appear."""

    input_ids: torch.Tensor        # (B, T) long
    position_ids: torch.Tensor     # (B, T) long, restart at 0 for each sample
    segment_ids: torch.Tensor      # (B, T) long, sample number within the row; -1 on padding
    labels: torch.Tensor           # (B, T) long, IGNORE_INDEX off the targets
    roles: torch.Tensor            # (B, T) uint8: TEXT / UND_IMAGE / GEN_TIME / GEN_IMAGE
    visible: torch.Tensor          # (B, T) bool, False for padding and dropped prompt tokens
    und_pixels: torch.Tensor | None    # (M, 3, S, S): one per understanding sample
    gen_pixels: torch.Tensor | None    # (G, 3, S, S): one per generation sample
    gen_keys: list[str | None]         # latent-cache key of each generation image
    kinds: list[list[str]]             # per row, the kind of each sample

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def efficiency(self) -> float:
        """Real tokens / capacity (B x T)."""
        return self.real_tokens / self.segment_ids.numel()

    def attention_mask(self, *, full_image: bool = False) -> torch.Tensor:
        """full_image: a generation sample's z tokens see each other (gen.image_attention 'full')."""
        return block_causal_mask(*self.mask_inputs(full_image=full_image))

    def mask_inputs(self, *, full_image: bool = False) -> tuple:
        """(segment_ids, visible, together or None): what block_causal_mask and flex_block_mask read."""
        return self.segment_ids, self.visible, self.roles == GEN_IMAGE if full_image else None


def may_attend(seg_q, seg_k, visible_k, q, k, together_q=None, together_k=None):
    """The packing rule on index-aligned (broadcastable) tensors: query q may attend key k iff both
    are in the same sample, k <= q (or both are marked `together`) and k is visible; every token
    also attends itself. One rule for the dense mask and for FlexAttention's mask_mod."""
    order = k <= q
    if together_q is not None:
        order = order | (together_q & together_k)
    return ((seg_q == seg_k) & (seg_q >= 0) & order & visible_k) | (q == k)


def block_causal_mask(segment_ids: torch.Tensor, visible: torch.Tensor,
                      together: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) segments + key visibility -> (B, 1, T, T) bool, True where query i may attend key j.

    i attends j iff both are in the same sample, j <= i and j is visible; every token also
    attends itself, so no query row is empty (padding and dropped tokens see only themselves).
    Tokens marked in `together` (B, T) also see the later ones of their sample so marked.
    """
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    pair = (together[:, :, None], together[:, None, :]) if together is not None else ()
    mask = may_attend(segment_ids[:, :, None], segment_ids[:, None, :], visible[:, None, :],
                      idx[:, None], idx[None, :], *pair)
    return mask[:, None]


def block_causal_mask_mod(segment_ids: torch.Tensor, visible: torch.Tensor,
                          together: torch.Tensor | None = None):
    """The same mask as a FlexAttention mask_mod(b, h, q, kv) -> bool, read from the (B, T)
    tensors instead of a (B, 1, T, T) one: torch.nn.attention.flex_attention.create_block_mask
    turns it into a BlockMask whose kernel skips the blocks between samples."""
    def mask_mod(b, h, q, kv):
        pair = (together[b, q], together[b, kv]) if together is not None else ()
        return may_attend(segment_ids[b, q], segment_ids[b, kv], visible[b, kv], q, kv, *pair)

    return mask_mod


def flex_block_mask(segment_ids: torch.Tensor, visible: torch.Tensor, together: torch.Tensor | None = None):
    """A FlexAttention BlockMask of block_causal_mask, built where the (B, T) tensors are."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = segment_ids.shape
    return create_block_mask(block_causal_mask_mod(segment_ids, visible, together), b, None, t, t,
                             device=segment_ids.device)


def collate_packed(rows: list[list[Encoded]], *, max_len: int, pad_id: int) -> PackedBatch:
    """Concatenate each row's samples and right-pad to max_len."""
    b = len(rows)
    ids = torch.full((b, max_len), pad_id, dtype=torch.long)
    pos = torch.zeros((b, max_len), dtype=torch.long)
    seg = torch.full((b, max_len), -1, dtype=torch.long)
    labels = torch.full((b, max_len), IGNORE_INDEX, dtype=torch.long)
    roles = torch.zeros((b, max_len), dtype=torch.uint8)
    visible = torch.zeros((b, max_len), dtype=torch.bool)
    und, gen, keys, kinds = [], [], [], []
    for r, samples in enumerate(rows):
        at = 0
        kinds.append([s.kind for s in samples])
        for k, s in enumerate(samples):
            n = len(s)
            if at + n > max_len:
                raise ValueError(f"row {r} holds {at + n} tokens, more than max_len {max_len}")
            span = slice(at, at + n)
            ids[r, span] = torch.tensor(s.input_ids)
            pos[r, span] = torch.arange(n)
            seg[r, span] = k
            labels[r, span] = torch.tensor(s.labels)
            roles[r, span] = torch.tensor(s.roles, dtype=torch.uint8)
            visible[r, span] = torch.tensor(s.visible)
            at += n
            if s.kind == "und" and UND_IMAGE in s.roles and s.image is not None:
                und.append(s.image)
            if s.kind == "gen" and GEN_IMAGE in s.roles:
                gen.append(s.image)
                keys.append(s.image_key)
    gen_pixels = torch.stack(gen) if gen and all(g is not None for g in gen) else None
    return PackedBatch(ids, pos, seg, labels, roles, visible,
                       torch.stack(und) if und else None, gen_pixels, keys, kinds)
