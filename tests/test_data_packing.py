"""Packing: samples never see each other, positions restart, and the shapes corpus packs >= 95%."""

import torch
from PIL import Image

from data.packing import block_causal_mask, collate_packed, first_fit_decreasing
from data.sequences import encode_gen, encode_text, encode_und
from data.stream import Mixer, PackedStream, SequenceSource


def test_first_fit_decreasing_places_everything_that_fits():
    bins, left = first_fit_decreasing([5, 3, 8, 2, 7, 1], max_len=10, bins=2)
    placed = sorted(i for b in bins for i in b)
    assert sorted(placed + left) == list(range(6))
    assert all(sum([5, 3, 8, 2, 7, 1][i] for i in b) <= 10 for b in bins)
    assert sum([5, 3, 8, 2, 7, 1][i] for i in placed) == 20  # 8+2 and 7+3: both bins full


def test_mask_matches_a_dense_reference():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    vis = torch.tensor([[1, 1, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    dense = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        for j in range(8):
            same = seg[0, i] == seg[0, j] and seg[0, i] >= 0
            dense[i, j] = bool((same and j <= i and vis[0, j]) or i == j)
    assert torch.equal(block_causal_mask(seg, vis)[0, 0], dense)


def _samples(proc, cfg):
    white = Image.new("RGB", (32, 32), "white")
    und = {"conversation": [{"user": "<image_placeholder>\nWhat is it?", "assistant": "a red circle"}]}
    return [
        encode_text(proc, "A triangle has three corners."),
        encode_gen(proc, {"prompt": "a blue square"}, None, num_gen_tokens=cfg.num_gen_tokens,
                   image_size=32, template="chat", drop_prompt=True),
        encode_und(proc, und, white),
        encode_gen(proc, {"prompt": "two circles"}, None, num_gen_tokens=cfg.num_gen_tokens,
                   image_size=32, template="plain"),
    ]


def test_packed_llm_equals_each_sample_alone(tiny_pipe):
    """The LLM over one packed row gives, for every visible token, the hidden state the sample
    gets when run alone with its ordinary 2-D mask (the sampler's form for dropped prompts)."""
    model, proc = tiny_pipe.model, tiny_pipe.processor
    samples = _samples(proc, model.config)
    total = sum(len(s) for s in samples)
    batch = collate_packed([samples], max_len=total + 5, pad_id=proc.pad_id)
    assert batch.position_ids[0, : len(samples[0])].tolist() == list(range(len(samples[0])))
    assert batch.position_ids[0, len(samples[0])] == 0
    llm = model.llm.model
    with torch.no_grad():
        packed = llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask(),
                     position_ids=batch.position_ids).last_hidden_state[0]
        at = 0
        for s in samples:
            ids = torch.tensor([s.input_ids])
            mask = torch.tensor([s.visible], dtype=torch.long)
            alone = llm(input_ids=ids, attention_mask=mask).last_hidden_state[0]
            vis = torch.tensor(s.visible)
            diff = (packed[at: at + len(s)][vis] - alone[vis]).abs().max()
            assert diff < 1e-5, (s.kind, diff)
            at += len(s)
    # and the packing actually matters: without the block mask the later samples change
    with torch.no_grad():
        leaky = llm(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state[0]
    start = len(samples[0])
    assert (leaky[start:total] - packed[start:total]).abs().max() > 1e-3


def test_batch_lists_images_in_token_order(tiny_pipe):
    proc, cfg = tiny_pipe.processor, tiny_pipe.model.config
    samples = _samples(proc, cfg)
    batch = collate_packed([samples[:2], samples[2:]], max_len=200, pad_id=proc.pad_id)
    assert batch.und_pixels.shape == (1, 3, 32, 32)
    assert batch.gen_pixels is None and len(batch.gen_keys) == 2  # prompts only, no images here
    assert batch.kinds == [["text", "gen"], ["und", "gen"]]
    assert batch.real_tokens == sum(len(s) for s in samples)


def test_shapes_corpus_packs_at_95_percent_or_more(shapes_corpus, shapes_processor):
    source = SequenceSource(shapes_corpus, "train", shapes_processor, num_gen_tokens=64,
                            gen_image_size=64, with_images=False)
    stream = PackedStream(source, Mixer({"und": 14, "gen": 80, "text": 6}, source.sizes()),
                          rows=4, max_len=1024)
    effs = [stream.next_batch(step)[1]["packing_efficiency"] for step in range(10)]
    assert min(effs) >= 0.95, effs
