"""The SigLIP bootstrap's losses and text input: the sigmoid image-text loss and its fp32 logits,
hard-negative captions, the object-query head, and the text tower's token rows (shared with the
evaluation's clip_score). flows/train/bootstrap.py trains SigLIP with them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SiglipModel

from models.precision import fp32_on_cpu


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss for B images against T >= B texts where text i is image i's caption and every
    other pair (texts beyond B are hard negatives) is a negative: -sum log sigmoid(+-logit) / B."""
    labels = -torch.ones_like(logits)
    labels[:, : logits.shape[0]].fill_diagonal_(1.0)
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def siglip_logits(siglip: SiglipModel, image_BD: torch.Tensor, text_TD: torch.Tensor) -> torch.Tensor:
    """(B, T) image-text logits as SiglipModel.forward computes them, in fp32 whatever the towers ran in."""
    image = F.normalize(image_BD.float(), dim=-1)
    text = F.normalize(text_TD.float(), dim=-1)
    return image @ text.t() * siglip.logit_scale.exp() + siglip.logit_bias


class NegativeCaptions:
    """`per_image` counterfactual captions per image and step: the caption of the image's scene with
    one object's shape or colour changed (data/shapes/text.py). Images without a scene get none.
    Scenes are parsed once here, not at every step; with per_image 0 nothing of the shapes world is
    imported (a corpus from elsewhere has no scenes)."""

    def __init__(self, scenes: list[dict | None], per_image: int, *, seed: int):
        self.per_image, self.rng = per_image, np.random.default_rng(seed)
        self.scenes: list = []
        if per_image:
            from data.shapes.corpus import scene_from_dict
            from data.shapes.text import counterfactual_caption

            self._caption = counterfactual_caption
            self.scenes = [scene_from_dict(s) if s else None for s in scenes]

    def for_batch(self, idx: list[int]) -> list[str]:
        if not self.per_image:
            return []
        return [self._caption(self.rng, self.scenes[i])
                for _ in range(self.per_image) for i in idx if self.scenes[i] is not None]


class ObjectQueries:
    """The object-query loss of the SigLIP bootstrap (`bootstrap.siglip_queries`). Sigmoid image-text
    training alone leaves shape hard to read off the small SigLIP's patch features: a reader trained
    on them answered "what shape is the <colour> object" 61% right after 64k questions, against 97%
    when the same ViT learnt that task itself (2026-12-02, docs/experiments.md); a pretrained SigLIP
    knows shapes. So a small head (two transformer layers over a query token and the patch
    features) asks, per image and step, one question about its scene, and SigLIP learns from its
    cross-entropy; the head is dropped after the bootstrap. Kinds (`bootstrap.siglip_query_kinds`):
    "shape" (of the object whose colour is unique, the query token being that colour), "colour" (of
    the object whose shape is unique) and "count" (how many objects); each image asks one of the kinds
    its scene allows, drawn evenly. Images without a scene (a corpus from elsewhere) ask nothing."""

    def __init__(self, scenes: list[dict | None], vision_config, *, seed: int,
                 kinds: tuple[str, ...] = ("shape",)):
        from data.shapes.world import COLOURS, NUMBERS, SHAPES

        self.rng = np.random.default_rng(seed)
        colours, counts = sorted(COLOURS), len(NUMBERS) - 1
        # query tokens: the colours, then the shapes, then "how many"; answers: the shapes, then the
        # colours, then the counts 1..4
        ask_shape, ask_colour, ask_count = 0, len(colours), len(colours) + len(SHAPES)
        is_shape, is_colour, is_count = 0, len(SHAPES), len(SHAPES) + len(colours)
        # per image and kind: the (query token, answer) pairs its scene has
        self.answers: list[dict[str, list[tuple[int, int]]]] = []
        for scene in scenes:
            objects = [o for o in (scene or {}).get("objects") or []
                       if o["colour"] in colours and o["shape"] in SHAPES]
            same_colour = [o["colour"] for o in objects]
            same_shape = [o["shape"] for o in objects]
            pairs = {
                "shape": [(ask_shape + colours.index(o["colour"]), is_shape + SHAPES.index(o["shape"]))
                          for o in objects if same_colour.count(o["colour"]) == 1],
                "colour": [(ask_colour + SHAPES.index(o["shape"]), is_colour + colours.index(o["colour"]))
                           for o in objects if same_shape.count(o["shape"]) == 1],
                "count": [(ask_count, is_count + len(objects) - 1)] if 1 <= len(objects) <= counts else [],
            }
            self.answers.append({k: pairs[k] for k in kinds if pairs[k]})
        d = vision_config.hidden_size
        self.head = QueryHead(d, ask_count + 1, is_count + counts, heads=vision_config.num_attention_heads)

    def loss(self, features_BND: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, accuracy) over the batch's images that have a question."""
        rows, asks, labels = [], [], []
        for row, i in enumerate(idx):
            if self.answers[i]:
                kinds = sorted(self.answers[i])
                pairs = self.answers[i][kinds[int(self.rng.integers(len(kinds)))]]
                ask, answer = pairs[int(self.rng.integers(len(pairs)))]
                rows.append(row)
                asks.append(ask)
                labels.append(answer)
        if not rows:
            zero = features_BND.sum() * 0.0
            return zero, zero.detach()
        device = features_BND.device
        logits = self.head(features_BND[rows], torch.tensor(asks, device=device))
        target = torch.tensor(labels, device=device)
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean().detach()


class QueryHead(torch.nn.Module):
    """A query token (the question) prepended to the patch features, `layers` pre-norm transformer
    blocks, and a linear answer layer on the query token. The last block computes only that token."""

    def __init__(self, d: int, queries: int, answers: int, *, heads: int, layers: int = 2):
        super().__init__()
        self.query = torch.nn.Embedding(queries, d)
        self.blocks = torch.nn.ModuleList(QueryBlock(d, heads) for _ in range(layers))
        self.out = torch.nn.Linear(d, answers)

    def forward(self, features_BND: torch.Tensor, query_B: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.query(query_B)[:, None].to(features_BND.dtype), features_BND], dim=1)
        for k, block in enumerate(self.blocks):
            x = block(x, first_only=k == len(self.blocks) - 1)
        return self.out(x[:, 0])


class QueryBlock(torch.nn.Module):
    """Pre-norm self-attention (fp32 under a CPU's autocast) and GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x_BTD: torch.Tensor, *, first_only: bool = False) -> torch.Tensor:
        b, t, d = x_BTD.shape
        q, k, v = self.qkv(self.norm1(x_BTD)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if first_only:  # only the query token's row is read afterwards
            q, x_BTD = q[:, :, :1], x_BTD[:, :1]
        a = fp32_on_cpu(F.scaled_dot_product_attention, q, k, v)
        x = x_BTD + self.proj(a.transpose(1, 2).reshape(b, -1, d).to(x_BTD.dtype))
        return x + self.mlp(self.norm2(x))


def siglip_text_ids(tokenizer, texts: list[str], length: int, *, eos_id: int, pad_id: int) -> torch.Tensor:
    """(N, length) text-tower input: each text + EOS, right-padded to `length`. SigLIP's text tower
    pools the last position, so every row has the same length and no attention mask, as SigLIP was
    trained; the bootstrap and the evaluation's clip_score both tokenize through here."""
    return pad_text_ids([tokenizer.encode(t, add_special_tokens=False) for t in texts], length,
                        eos_id=eos_id, pad_id=pad_id)


def pad_text_ids(rows: list[list[int]], length: int, *, eos_id: int, pad_id: int) -> torch.Tensor:
    """Token rows cut to length - 1, + EOS, right-padded to `length`: (N, length)."""
    rows = [r[: length - 1] + [eos_id] for r in rows]
    return torch.tensor([r + [pad_id] * (length - len(r)) for r in rows], dtype=torch.long)
