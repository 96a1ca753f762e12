"""The prefetching stream: the wrapped stream's batches in its order, a checkpointable state as of
the batches handed out, a clean stop and restart, and errors raised where the batch was asked for."""

import json

import pytest
import torch

from data.prefetch import PrefetchStream
from data.shards import DataError
from data.stream import Mixer, PackedStream, SequenceSource

MIX = [{"until": 3, "ratio": {"und": 30, "gen": 50, "text": 20}}, {"ratio": {"und": 10, "gen": 85, "text": 5}}]


def _stream(corpus, proc):
    source = SequenceSource(corpus, "train", proc, num_gen_tokens=64, gen_image_size=64, cfg_dropout=0.1)
    return PackedStream(source, Mixer(MIX, source.sizes()), rows=2, max_len=512)


def _same(a, b):
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            and a.gen_keys == b.gen_keys and eq(a.gen_pixels, b.gen_pixels) and eq(a.und_pixels, b.und_pixels))


def _steps(n, per_step):
    return [s for s in range(n) for _ in range(per_step)]


def test_prefetched_batches_and_states_equal_the_plain_streams(shapes_corpus, shapes_processor):
    plain = _stream(shapes_corpus, shapes_processor)
    expected = []
    for step in _steps(4, 2):
        batch, stats = plain.next_batch(step)
        expected.append((batch, stats, json.loads(json.dumps(plain.state_dict()))))
    for depth in (3, 0):  # on the thread, and built by the call itself
        prepared_by = []
        pre = PrefetchStream(_stream(shapes_corpus, shapes_processor), per_step=2, depth=depth,
                             prepare=lambda i, b: prepared_by.append(i) or b.input_ids.sum())
        try:
            for (batch, stats, state), step in zip(expected, _steps(4, 2)):
                got, got_stats, prepared = pre.next_prepared(step)
                assert _same(got, batch) and got_stats == stats
                assert int(prepared) == int(batch.input_ids.sum())
                assert json.loads(json.dumps(pre.state_dict())) == state  # as of the batches handed out
            assert prepared_by[:8] == [0, 1] * 4
        finally:
            pre.close()


def test_close_rewinds_what_was_built_ahead_and_load_resumes(shapes_corpus, shapes_processor):
    plain = _stream(shapes_corpus, shapes_processor)
    batches = [plain.next_batch(step)[0] for step in range(6)]
    pre = PrefetchStream(_stream(shapes_corpus, shapes_processor), per_step=1, depth=2)
    for step in range(2):
        pre.next_batch(step)
    state = pre.state_dict()
    pre.close()  # the thread had built steps 2-3 already: dropped
    assert _same(pre.next_batch(2)[0], batches[2])
    resumed = PrefetchStream(_stream(shapes_corpus, shapes_processor), per_step=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    try:
        for step in range(2, 6):
            assert _same(resumed.next_batch(step)[0], batches[step])
    finally:
        pre.close()
        resumed.close()


class _Failing:
    """A stream whose third batch cannot be built (a corrupt shard, say)."""

    def __init__(self):
        self.n = 0

    def next_batch(self, step):
        self.n += 1
        if self.n == 3:
            raise DataError("shard 00001: truncated record")
        return f"batch {self.n}", {}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_errors_are_raised_by_the_call_that_asks_for_the_batch():
    pre = PrefetchStream(_Failing(), per_step=1)
    assert pre.next_batch(0)[0] == "batch 1" and pre.next_batch(1)[0] == "batch 2"
    with pytest.raises(DataError, match="truncated record"):
        pre.next_batch(2)
    assert pre.state_dict() == {"n": 2}


def test_steps_must_be_consecutive(shapes_corpus, shapes_processor):
    pre = PrefetchStream(_stream(shapes_corpus, shapes_processor), per_step=2)
    pre.next_batch(0)
    with pytest.raises(RuntimeError, match="steps must be consecutive"):
        pre.next_batch(1)  # step 0 has a second batch
    with pytest.raises(ValueError, match="depth"):
        PrefetchStream(_stream(shapes_corpus, shapes_processor), per_step=1, depth=-1)
