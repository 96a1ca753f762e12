"""Corpus records -> token sequences for training: templates per stage, labels, CFG prompt dropout.

Every encoded sample is a flat token row with per-token roles, ready to be packed with others:

- TEXT tokens are looked up in the embedding table;
- UND_IMAGE tokens (<begin_of_image> + N placeholders) take [beg_of_und_embed, aligner(f_enc)];
- GEN_TIME is the slot of <begin_of_image> in a generation prompt, where t_emb goes;
- GEN_IMAGE tokens are the g_enc tokens of the noisy latent, whose hidden states give the velocity.

Labels follow transformers' convention (aligned with input_ids; the loss shifts them) and are
IGNORE_INDEX everywhere but on response tokens.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data.shards import DataError
from models.packed import GEN_IMAGE, GEN_TIME, TEXT, UND_IMAGE  # noqa: F401  (roles)
from models.processor import IGNORE_INDEX, JanusFlowProcessor, pil_to_tensor, to_rgb
from models.tokenizer import IMAGE

TEMPLATES = ("plain", "chat")


@dataclass
class Encoded:
    """One training sample as a token row (all lists have the sample's length)."""

    kind: str
    input_ids: list[int]
    labels: list[int]
    roles: list[int]               # TEXT / UND_IMAGE / GEN_TIME / GEN_IMAGE per token
    visible: list[bool]            # False: other tokens must not attend to it (a dropped prompt)
    image: torch.Tensor | None = None   # (3, S, S) in [-1, 1]: f_enc input (und) or VAE input (gen)
    image_key: str | None = None        # hash of the source image + its crop, for the latent cache
    dropped: bool = False               # gen: prompt dropped for CFG

    def __len__(self) -> int:
        return len(self.input_ids)


def _check_template(name: str, template: str) -> None:
    if template not in TEMPLATES:
        raise DataError(f"{name} must be one of {', '.join(TEMPLATES)}, got {template!r}")


# -- text -------------------------------------------------------------------------------------------
def encode_text(processor: JanusFlowProcessor, text: str) -> Encoded:
    """A text-only document: BOS + text + EOS, every token after BOS is a target."""
    ids = processor.encode(text) + [processor.eos_id]
    labels = [IGNORE_INDEX] + ids[1:]
    return Encoded("text", ids, labels, [TEXT] * len(ids), [True] * len(ids))


# -- understanding ----------------------------------------------------------------------------------
def conversation_turns(record: dict) -> list[tuple[str, str]]:
    return [(turn["user"], turn["assistant"]) for turn in record["conversation"]]


def encode_und(processor: JanusFlowProcessor, record: dict, image: Image.Image | None, *,
               template: str = "chat") -> Encoded:
    """A conversation about one image.

    chat:  the deepseek template, every assistant answer (and its EOS) is a target;
    plain: '<image> answer<eos>' from the first turn only, for caption-style pretraining.
    """
    _check_template("und_template", template)
    turns = conversation_turns(record)
    if template == "chat":
        ids, labels = processor.encode_conversation(turns)
    else:
        head = processor.expand_images([processor.bos_id, processor.image_id])
        answer = processor.encode(f" {turns[0][1].strip()}", bos=False) + [processor.eos_id]
        ids, labels = head + answer, [IGNORE_INDEX] * len(head) + answer
    image_ids = (processor.image_id, processor.boi_id)
    roles = [UND_IMAGE if i in image_ids else TEXT for i in ids]
    pixels = processor.preprocess_understanding(image) if image is not None else None
    return Encoded("und", ids, labels, roles, [True] * len(ids), image=pixels)


# -- generation -------------------------------------------------------------------------------------
def generation_prompt_ids(processor: JanusFlowProcessor, prompt: str, *, template: str) -> list[int]:
    """plain: BOS + prompt (pretraining '<prompt><image>'); chat: the sampler's own prompt."""
    _check_template("gen_template", template)
    if template == "chat":
        return processor.generation_prompt(prompt)
    return processor.encode(prompt)


def encode_gen(processor: JanusFlowProcessor, record: dict, image: Image.Image | None, *,
               num_gen_tokens: int, image_size: int, template: str = "plain",
               drop_prompt: bool = False, rng: np.random.Generator | None = None,
               image_bytes: bytes | None = None) -> Encoded:
    """Prompt tokens, then the t_emb slot and num_gen_tokens image slots; no text targets.

    drop_prompt applies CFG's unconditional form exactly as the sampler builds it
    (processor.unconditional: BOS kept, the rest pad and invisible, positions unchanged).
    """
    prompt = generation_prompt_ids(processor, record["prompt"], template=template)
    batch = processor.pad([prompt])
    if drop_prompt:
        batch = processor.unconditional(batch)
    ids = batch.input_ids[0].tolist() + [processor.boi_id] + [processor.image_id] * num_gen_tokens
    visible = [bool(v) for v in batch.attention_mask[0].tolist()] + [True] * (num_gen_tokens + 1)
    roles = [TEXT] * len(prompt) + [GEN_TIME] + [GEN_IMAGE] * num_gen_tokens
    enc = Encoded("gen", ids, [IGNORE_INDEX] * len(ids), roles, visible, dropped=drop_prompt)
    if image is not None:
        enc.image, enc.image_key = generation_image(image, image_size, rng or np.random.default_rng(0),
                                                    image_bytes=image_bytes)
    return enc


def generation_image(image: Image.Image, size: int, rng: np.random.Generator, *,
                     image_bytes: bytes | None = None) -> tuple[torch.Tensor, str | None]:
    """(3, S, S) VAE input of a generation image and its latent-cache key (None without bytes)."""
    pixels, box = preprocess_generation(image, size, rng)
    return pixels, None if image_bytes is None else latent_key(image_bytes, box, size)


def latent_key(image_bytes: bytes, box: tuple[int, int], size: int) -> str:
    """The latent-cache key of one crop (its (left, top) box at `size`) of an encoded image."""
    return hashlib.sha256(image_bytes + repr((box, size)).encode()).hexdigest()


def preprocess_generation(image: Image.Image, size: int, rng: np.random.Generator):
    """Short side to `size` (bicubic), then a random size x size crop; returns ((3, S, S), box).

    The box (left, top) in resized pixels identifies the crop for the latent cache.
    """
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left = int(rng.integers(0, nw - size + 1))
    top = int(rng.integers(0, nh - size + 1))
    crop = image.crop((left, top, left + size, top + size))
    return pil_to_tensor(crop), (left, top)


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def count_placeholders(turns: list[tuple[str, str]]) -> int:
    return sum(user.count(IMAGE) + answer.count(IMAGE) for user, answer in turns)

