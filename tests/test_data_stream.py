"""The mixer: ratios per stage with a step schedule, realised fractions, exact resume."""

import json

import pytest
import torch

from data.shards import DataError
from data.stream import Mixer, PackedStream, SequenceSource, parse_schedule

STAGE2 = [{"until": 40, "ratio": {"und": 30, "gen": 50, "text": 20}},
          {"ratio": {"und": 14, "gen": 80, "text": 6}}]
SIZES = {"und": 50, "gen": 70, "text": 30}


def test_realised_fractions_follow_the_schedule():
    mixer = Mixer(STAGE2, SIZES)
    first = [mixer.next(step=0)[0] for _ in range(100)]
    later = [mixer.next(step=40)[0] for _ in range(500)]
    for draws, ratio in ((first, STAGE2[0]["ratio"]), (later, STAGE2[1]["ratio"])):
        for kind, r in ratio.items():
            assert abs(draws.count(kind) - r / 100 * len(draws)) <= 1, (kind, draws.count(kind))


def test_each_kind_is_a_permutation_per_epoch():
    mixer = Mixer({"gen": 1}, SIZES, seed=3)
    epoch1 = [mixer.next(0)[1] for _ in range(70)]
    epoch2 = [mixer.next(0)[1] for _ in range(70)]
    assert sorted(epoch1) == sorted(epoch2) == list(range(70)) and epoch1 != epoch2


def test_schedule_validation():
    with pytest.raises(DataError, match="unknown kind"):
        parse_schedule({"und": 1, "video": 2})
    with pytest.raises(DataError, match="non-negative"):
        parse_schedule({"und": -1, "gen": 2})
    with pytest.raises(DataError, match="must increase"):
        parse_schedule([{"until": 10, "ratio": {"gen": 1}}, {"until": 5, "ratio": {"gen": 1}},
                        {"ratio": {"gen": 1}}])
    with pytest.raises(DataError, match="has none"):
        Mixer({"text": 1}, {"und": 3, "gen": 3, "text": 0})


def _stream(corpus, proc, seed=0):
    source = SequenceSource(corpus, "train", proc, num_gen_tokens=64, gen_image_size=64,
                            cfg_dropout=0.1, seed=seed)
    return PackedStream(source, Mixer(STAGE2, source.sizes(), seed=seed), rows=2, max_len=512)


def _same(a, b):
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.visible, b.visible)
            and torch.equal(a.gen_pixels, b.gen_pixels) and a.gen_keys == b.gen_keys
            and torch.equal(a.und_pixels, b.und_pixels))


def test_resume_continues_exactly(shapes_corpus, shapes_processor):
    full = _stream(shapes_corpus, shapes_processor)
    batches = [full.next_batch(step)[0] for step in range(6)]
    first = _stream(shapes_corpus, shapes_processor)
    for step in range(3):
        first.next_batch(step)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = _stream(shapes_corpus, shapes_processor)
    resumed.load_state_dict(state)
    for step in range(3, 6):
        assert _same(resumed.next_batch(step)[0], batches[step])
    other = _stream(shapes_corpus, shapes_processor, seed=1)
    assert not _same(other.next_batch(0)[0], batches[0])


def test_stream_reports_mix_and_drops_about_ten_percent(shapes_corpus, shapes_processor):
    stream = _stream(shapes_corpus, shapes_processor)
    dropped = total = 0
    for step in range(12):
        batch, stats = stream.next_batch(step)
        assert abs(sum(stats[f"mix_{k}"] for k in ("und", "gen", "text")) - 1) < 1e-9
        total += sum(k.count("gen") for k in batch.kinds)
        dropped += _count_dropped(batch)
    assert total > 50 and 0.02 < dropped / total < 0.25
    assert abs(stats["mix_total_gen"] - 0.5) < 0.1


def _count_dropped(batch):
    """Samples with invisible text tokens: the gen samples whose prompt was dropped."""
    n = 0
    for r in range(batch.input_ids.shape[0]):
        segs = batch.segment_ids[r]
        for k in range(int(segs.max()) + 1):
            sel = segs == k
            text_hidden = (batch.roles[r][sel] == 0) & ~batch.visible[r][sel]
            n += int(text_hidden.any())
    return n


def test_stage_defaults_follow_the_paper():
    from data.stages import stage_data

    two = stage_data(2, warmup_mix_steps=25)
    mixer = Mixer(two["mix"], SIZES)
    opening = [mixer.next(step=s)[0] for s in range(20)]
    assert opening.count("und") == 6 and opening.count("gen") == 10 and opening.count("text") == 4
    assert mixer.phase_at(24) == 0 and mixer.phase_at(25) == 1
    assert stage_data(3)["gen_template"] == "chat" and stage_data(1)["mix"]["text"] == 0
    with pytest.raises(DataError, match="unknown data setting"):
        stage_data(1, ratio=3)
    with pytest.raises(DataError, match="stage 2"):
        stage_data(3, warmup_mix_steps=5)


def test_caption_prob_swaps_the_prompt_for_the_scene_caption(shapes_corpus, shapes_processor):
    """caption_prob p: about p of the generation samples are conditioned on the detailed caption;
    0 keeps the short prompt, and the rest of the sample (image crop, dropout) is unchanged."""
    from data.shards import ShardReader
    from data.stream import SequenceSource

    reader = ShardReader(shapes_corpus, "train", "gen")

    def source(p):
        return SequenceSource(shapes_corpus, "train", shapes_processor, num_gen_tokens=64,
                              gen_image_size=64, gen_template="plain", cfg_dropout=0.0, caption_prob=p)

    plain, always, half = source(0.0), source(1.0), source(0.5)
    n, captioned = 40, 0
    for i in range(n):
        record, _ = reader.read(i)
        prompt_ids = shapes_processor.encode(record["prompt"])
        caption_ids = shapes_processor.encode(record["caption"])
        assert plain.encode("gen", i, draw=i).input_ids[:len(prompt_ids)] == prompt_ids
        assert always.encode("gen", i, draw=i).input_ids[:len(caption_ids)] == caption_ids
        captioned += half.encode("gen", i, draw=i).input_ids[:len(caption_ids)] == caption_ids
    assert 0.25 * n < captioned < 0.75 * n
    with pytest.raises(Exception, match="caption_prob"):
        source(1.5)
