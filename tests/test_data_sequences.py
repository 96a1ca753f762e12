"""Templates, label masks, CFG prompt dropout and image preprocessing of training sequences."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.sequences import (GEN_IMAGE, GEN_TIME, TEXT, UND_IMAGE, encode_gen, encode_text, encode_und,
                            preprocess_generation)
from data.shards import DataError
from models.processor import IGNORE_INDEX, chat_prompt

N_GEN = 64  # the shapes preset's generation tokens


def _targets(proc, enc):
    return proc.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_text_targets_everything_after_bos(shapes_processor):
    enc = encode_text(shapes_processor, "A square has four corners.")
    assert enc.input_ids[0] == shapes_processor.bos_id and enc.input_ids[-1] == shapes_processor.eos_id
    assert enc.labels[0] == IGNORE_INDEX and enc.labels[1:] == enc.input_ids[1:]
    assert set(enc.roles) == {TEXT}


def test_chat_understanding_targets_only_answers(shapes_processor):
    record = {"conversation": [{"user": "<image_placeholder>\nHow many objects are there?", "assistant": "two"},
                               {"user": "What colour is the circle?", "assistant": "red"}]}
    enc = encode_und(shapes_processor, record, Image.new("RGB", (64, 64), "white"))
    # labels: each answer with its EOS, nothing of the questions, the template or the image
    kept = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert kept.count(shapes_processor.eos_id) == 2
    assert _targets(shapes_processor, enc).split() == ["two", "red"]
    assert enc.roles.count(UND_IMAGE) == shapes_processor.num_image_tokens + 1 == 65
    assert all(lab == IGNORE_INDEX for r, lab in zip(enc.roles, enc.labels) if r == UND_IMAGE)
    assert enc.image.shape == (3, 64, 64)
    ids, _ = shapes_processor.encode_conversation([(t["user"], t["assistant"]) for t in record["conversation"]])
    assert enc.input_ids == ids  # the same ids the answering path builds


def test_plain_understanding_is_image_then_answer(shapes_processor):
    record = {"conversation": [{"user": "<image_placeholder>\nGenerate the caption of this picture.",
                                "assistant": "A white picture with one object: a small red circle."}]}
    enc = encode_und(shapes_processor, record, None, template="plain")
    n_img = shapes_processor.num_image_tokens + 2  # <begin>, placeholders, <end>
    assert enc.input_ids[0] == shapes_processor.bos_id
    assert enc.input_ids[1] == shapes_processor.boi_id and enc.input_ids[n_img] == shapes_processor.eoi_id
    assert _targets(shapes_processor, enc) == record["conversation"][0]["assistant"]
    with pytest.raises(DataError, match="und_template"):
        encode_und(shapes_processor, record, None, template="sft")


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_generation_layout(shapes_processor, template):
    enc = encode_gen(shapes_processor, {"prompt": "a red circle"}, None, num_gen_tokens=N_GEN,
                     image_size=64, template=template)
    expected = (shapes_processor.generation_prompt("a red circle") if template == "chat"
                else shapes_processor.encode("a red circle"))
    p = len(expected)
    assert enc.input_ids[:p] == expected
    assert enc.roles == [TEXT] * p + [GEN_TIME] + [GEN_IMAGE] * N_GEN
    assert enc.input_ids[p] == shapes_processor.boi_id  # t_emb takes <begin_of_image>'s slot
    assert all(lab == IGNORE_INDEX for lab in enc.labels) and all(enc.visible)
    text = shapes_processor.tokenizer.decode(expected[1:])
    assert text == (chat_prompt([("a red circle", "")]) if template == "chat" else "a red circle")


def test_prompt_dropout_is_the_samplers_unconditional_row(shapes_processor):
    prompt = "a blue square above a green triangle"
    enc = encode_gen(shapes_processor, {"prompt": prompt}, None, num_gen_tokens=N_GEN, image_size=64,
                     template="chat", drop_prompt=True)
    uncond = shapes_processor.unconditional(shapes_processor.encode_prompts([prompt]))
    p = int(uncond.lengths[0])
    assert enc.input_ids[:p] == uncond.input_ids[0].tolist()
    assert enc.visible[:p] == [bool(m) for m in uncond.attention_mask[0].tolist()]
    assert enc.visible[0] and not any(enc.visible[1:p]) and all(enc.visible[p:])
    assert enc.dropped and len(enc) == p + 1 + N_GEN  # positions unchanged


def test_generation_preprocessing_short_side_and_random_crop():
    wide = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1))).convert("RGB")  # 200x100
    crops = {preprocess_generation(wide, 32, np.random.default_rng(s))[1] for s in range(20)}
    x, box = preprocess_generation(wide, 32, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert all(top == 0 and 0 <= left <= 32 for left, top in crops)  # resized to 64x32
    assert len(crops) > 5
    same = preprocess_generation(wide, 32, np.random.default_rng(3))
    again = preprocess_generation(wide, 32, np.random.default_rng(3))
    assert torch.equal(same[0], again[0]) and same[1] == again[1]


def test_understanding_preprocessing_pads_the_short_side(shapes_processor):
    tall = Image.new("RGB", (32, 128), (255, 0, 0))
    x = shapes_processor.preprocess_understanding(tall)
    assert x.shape == (3, 64, 64)
    grey = 127 / 127.5 - 1
    assert torch.allclose(x[:, :, 0], torch.full((3, 64), grey))    # padding column
    assert torch.allclose(x[0, :, 32], torch.ones(64))               # the red image in the middle
