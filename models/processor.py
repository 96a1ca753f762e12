"""Text and image conventions of JanusFlow: the deepseek chat template, image placeholders, CFG rows.

Every batch here is right-padded: a row's real tokens come first, then pad tokens with mask 0.
With explicit per-row positions this lets prompts of different lengths share one batch without any
query row being fully masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from models import tokenizer as tk

IGNORE_INDEX = -100


def chat_prompt(turns: list[tuple[str, str]], *, system_prompt: str = "") -> str:
    """The deepseek template: '<|User|>: q\\n\\n<|Assistant|>: a<eos>...', open last answer.

    `turns` are (user, assistant) pairs; an empty assistant text leaves the turn open
    ('<|Assistant|>:'), which is how prompts for answering and for generation end.
    """
    text = f"{system_prompt}\n\n" if system_prompt else ""
    for user, assistant in turns:
        text += f"{tk.USER}: {user.strip()}\n\n{tk.ASSISTANT}:"
        if assistant:
            text += f" {assistant.strip()}{tk.EOS}"
    return text


@dataclass
class Batch:
    """Right-padded token rows. image_mask marks <begin_of_image> + placeholder positions."""

    input_ids: torch.Tensor          # (B, T) long
    attention_mask: torch.Tensor     # (B, T) long, 1 = real token
    lengths: torch.Tensor            # (B,) long, real tokens per row
    labels: torch.Tensor | None = None       # (B, T) long, IGNORE_INDEX off the responses
    image_mask: torch.Tensor | None = None   # (B, T) bool
    pixel_values: torch.Tensor | None = None  # (M, 3, S, S) in image order


class JanusFlowProcessor:
    """Tokenizer + image preprocessing with the official processor's token conventions."""

    def __init__(self, tokenizer, *, image_size: int, num_image_tokens: int,
                 system_prompt: str = ""):
        tk.ensure_special_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab()
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = vocab[tk.PAD]
        self.image_id = vocab[tk.IMAGE]
        self.boi_id = vocab[tk.BEGIN_OF_IMAGE]
        self.eoi_id = vocab[tk.END_OF_IMAGE]
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("the tokenizer must define bos_token and eos_token")

    @classmethod
    def for_config(cls, tokenizer, config, *, check_vocab: bool = True) -> "JanusFlowProcessor":
        """The processor of a model config; refuses a tokenizer the LLM has no embeddings for."""
        processor = cls(tokenizer, image_size=config.vision.image_size,
                        num_image_tokens=config.num_und_tokens, system_prompt=config.system_prompt)
        if check_vocab and len(processor) > config.llm.vocab_size:
            raise ValueError(f"the tokenizer has {len(processor)} tokens but llm.vocab_size is "
                             f"{config.llm.vocab_size}: the LLM has no embedding for the rest")
        return processor

    @classmethod
    def from_pretrained(cls, path: str | Path, config, *, check_vocab: bool = True) -> "JanusFlowProcessor":
        return cls.for_config(AutoTokenizer.from_pretrained(str(path)), config, check_vocab=check_vocab)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    def __len__(self) -> int:
        return len(self.tokenizer)

    # -- text ---------------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def pad(self, rows: list[list[int]], labels: list[list[int]] | None = None) -> Batch:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = int(lengths.max())
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if labels else None
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
            if lab is not None:
                lab[i, : len(row)] = torch.tensor(labels[i], dtype=torch.long)
        return Batch(input_ids=ids, attention_mask=mask, lengths=lengths, labels=lab)

    # -- generation prompts -------------------------------------------------------------------------
    def generation_prompt(self, prompt: str) -> list[int]:
        """Token ids of a text-to-image prompt, up to but excluding <begin_of_image>.

        The release appends <begin_of_image> and then replaces its embedding with t_emb; we leave
        it out and let t_emb take its position, which is the same sequence.
        """
        return self.encode(chat_prompt([(prompt, "")]))

    def encode_prompts(self, prompts: list[str]) -> Batch:
        return self.pad([self.generation_prompt(p) for p in prompts])

    def unconditional(self, batch: Batch, rows: torch.Tensor | None = None) -> Batch:
        """CFG's unconditional form: keep BOS, replace the rest by pad and mask it out.

        Positions are untouched (lengths stay), so image tokens sit where the conditional row's do.
        `rows` (bool (B,)) restricts it to some rows, as the 10% prompt dropout of training does.
        """
        ids = batch.input_ids.clone()
        mask = batch.attention_mask.clone()
        sel = torch.ones(ids.shape[0], dtype=torch.bool) if rows is None else rows.bool()
        ids[sel, 1:] = self.pad_id
        mask[sel, 1:] = 0
        return Batch(input_ids=ids, attention_mask=mask, lengths=batch.lengths.clone())

    # -- understanding ------------------------------------------------------------------------------
    def expand_images(self, ids: list[int]) -> list[int]:
        """Each <image_placeholder> becomes <begin_of_image> + N placeholders + <end_of_image>."""
        out: list[int] = []
        for i in ids:
            if i == self.image_id:
                out += [self.boi_id] + [self.image_id] * self.num_image_tokens + [self.eoi_id]
            else:
                out.append(i)
        return out

    def encode_conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation; labels cover the assistant answers and their EOS.

        Pieces are tokenised separately so the label boundary is exact; answering at inference
        tokenises the same prefix the same way.
        """
        head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        ids = [self.bos_id]
        labels = [IGNORE_INDEX]
        for n, (user, assistant) in enumerate(turns):
            prefix = (head if n == 0 else "") + f"{tk.USER}: {user.strip()}\n\n{tk.ASSISTANT}:"
            p_ids = self.expand_images(self.encode(prefix, bos=False))
            ids += p_ids
            labels += [IGNORE_INDEX] * len(p_ids)
            if assistant:
                a_ids = self.encode(f" {assistant.strip()}", bos=False) + [self.eos_id]
                ids += a_ids
                labels += a_ids
        return ids, labels

    def encode_understanding(self, images: list[Image.Image], questions: list[str],
                             answers: list[str] | None = None) -> Batch:
        """One image and one question (and answer, for training) per row."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        rows, labels = [], []
        for k, q in enumerate(questions):
            a = answers[k] if answers is not None else ""
            ids, lab = self.encode_conversation([(f"{tk.IMAGE}\n{q}", a)])
            rows.append(ids)
            labels.append(lab)
        batch = self.pad(rows, labels if answers is not None else None)
        batch.image_mask = (batch.input_ids == self.image_id) | (batch.input_ids == self.boi_id)
        batch.pixel_values = torch.stack([self.preprocess_understanding(im) for im in images])
        return batch

    # -- images -------------------------------------------------------------------------------------
    def preprocess_understanding(self, image: Image.Image) -> torch.Tensor:
        """Long side to image_size (bicubic), pad to square with the mean colour, to [-1, 1].

        Returns (3, S, S) float32, normalised with mean = std = 0.5 as the release does.
        """
        image = to_rgb(image)
        w, h = image.size
        scale = self.image_size / max(w, h)
        nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (self.image_size, self.image_size), (127, 127, 127))
        canvas.paste(image, ((self.image_size - nw) // 2, (self.image_size - nh) // 2))
        return pil_to_tensor(canvas)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode; transparent pixels land on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_pil(x_CHW: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB uint8 image (values outside are clipped)."""
    arr = ((x_CHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())
