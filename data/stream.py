"""The training data stream: a ratio mixer over und/gen/text, encoding, packing, exact resume.

Everything random about a sample (its generation crop, whether its prompt is dropped for CFG)
comes from a generator seeded with (seed, draw number), so the stream's whole state is a handful
of integers: the mixer's counters, each kind's epoch and cursor, and the samples drawn but not yet
packed. `state_dict()` returns it as plain JSON-able data; `load_state_dict()` continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.packing import PackedBatch, collate_packed, first_fit_decreasing
from data.sequences import Encoded, decode_image, encode_gen, encode_text, encode_und
from data.shards import KINDS, DataError, ShardReader
from models.processor import JanusFlowProcessor


@dataclass(frozen=True)
class Phase:
    until: int | None               # first step after this phase (None: to the end)
    ratio: dict[str, float]         # und/gen/text weights


def parse_schedule(spec) -> list[Phase]:
    """A mix schedule from config: a ratio {und, gen, text} or a list of {until, ratio} phases.

    Stage 2 of the paper: [{until: 10000, ratio: {und: 30, gen: 50, text: 20}},
    {ratio: {und: 14, gen: 80, text: 6}}].
    """
    items = [{"ratio": spec}] if isinstance(spec, dict) and "ratio" not in spec else spec
    if isinstance(items, dict):
        items = [items]
    phases, last = [], -1
    for n, item in enumerate(items):
        ratio = {k: float(v) for k, v in item["ratio"].items()}
        unknown = sorted(set(ratio) - set(KINDS))
        if unknown:
            raise DataError(f"mix ratio has unknown kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")
        if any(v < 0 for v in ratio.values()) or sum(ratio.values()) <= 0:
            raise DataError(f"mix ratio {ratio} must be non-negative with a positive sum")
        until = item.get("until")
        if until is None and n != len(items) - 1:
            raise DataError("only the last mix phase may omit 'until'")
        if until is not None and until <= last:
            raise DataError(f"mix phase 'until' values must increase, got {until} after {last}")
        last = until if until is not None else last
        phases.append(Phase(until, {k: ratio.get(k, 0.0) for k in KINDS}))
    return phases


class Mixer:
    """Chooses the kind of each next sample so realised fractions track the phase's ratio.

    Smooth weighted round-robin instead of random draws: after n draws in a phase each kind has
    been drawn within one sample of ratio x n, so small runs see the ratio they ask for.
    """

    def __init__(self, schedule, sizes: dict[str, int], *, seed: int = 0):
        self.phases = parse_schedule(schedule)
        self.sizes, self.seed = sizes, seed
        for phase in self.phases:
            for kind, r in phase.ratio.items():
                if r > 0 and sizes.get(kind, 0) == 0:
                    raise DataError(f"the mix asks for {kind!r} samples but the corpus has none")
        self.phase_index, self.phase_counts = 0, {k: 0 for k in KINDS}
        self.cursor = {k: [0, 0] for k in KINDS}   # kind -> [epoch, position]
        self.draws = 0
        self._perms: dict[str, tuple[int, np.ndarray]] = {}  # kind -> (epoch, order)

    def phase_at(self, step: int) -> int:
        for i, p in enumerate(self.phases):
            if p.until is None or step < p.until:
                return i
        return len(self.phases) - 1

    def next(self, step: int) -> tuple[str, int, int]:
        """(kind, sample index, draw number) of the next sample for optimizer step `step`."""
        phase = self.phase_at(step)
        if phase != self.phase_index:
            self.phase_index, self.phase_counts = phase, {k: 0 for k in KINDS}
        ratio = self.phases[phase].ratio
        total = sum(ratio.values())
        n = sum(self.phase_counts.values()) + 1
        kind = max((k for k in KINDS if ratio[k] > 0),
                   key=lambda k: (ratio[k] / total * n - self.phase_counts[k], -KINDS.index(k)))
        self.phase_counts[kind] += 1
        index = self._take(kind)
        self.draws += 1
        return kind, index, self.draws - 1

    def _take(self, kind: str) -> int:
        epoch, pos = self.cursor[kind]
        cached = self._perms.get(kind)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, KINDS.index(kind), epoch])
            cached = self._perms[kind] = (epoch, rng.permutation(self.sizes[kind]))
        index = int(cached[1][pos])
        pos += 1
        if pos == self.sizes[kind]:
            epoch, pos = epoch + 1, 0
        self.cursor[kind] = [epoch, pos]
        return index

    def state_dict(self) -> dict:
        return {"phase_index": self.phase_index, "phase_counts": dict(self.phase_counts),
                "cursor": {k: list(v) for k, v in self.cursor.items()}, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.phase_index = state["phase_index"]
        self.phase_counts = dict(state["phase_counts"])
        self.cursor = {k: list(v) for k, v in state["cursor"].items()}
        self.draws = state["draws"]


class SequenceSource:
    """Reads one split of a corpus and encodes samples for a stage's templates."""

    def __init__(self, root: str | Path, split: str, processor: JanusFlowProcessor, *,
                 num_gen_tokens: int, gen_image_size: int, gen_template: str = "plain",
                 und_template: str = "chat", cfg_dropout: float = 0.1, caption_prob: float = 0.0,
                 seed: int = 0, with_images: bool = True):
        for name, value in (("cfg_dropout", cfg_dropout), ("caption_prob", caption_prob)):
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{name} must be in [0, 1], got {value}")
        self.readers = {k: ShardReader(root, split, k) for k in KINDS}
        self.processor = processor
        self.num_gen_tokens, self.gen_image_size = num_gen_tokens, gen_image_size
        self.gen_template, self.und_template = gen_template, und_template
        self.cfg_dropout, self.seed, self.with_images = cfg_dropout, seed, with_images
        self.caption_prob = caption_prob

    def sizes(self) -> dict[str, int]:
        return {k: len(r) for k, r in self.readers.items()}

    def encode(self, kind: str, index: int, draw: int) -> Encoded:
        record, data = self.readers[kind].read(index)
        image = decode_image(data) if (data is not None and self.with_images) else None
        rng = np.random.default_rng([self.seed, draw])
        if kind == "text":
            return encode_text(self.processor, record["text"])
        if kind == "und":
            return encode_und(self.processor, record, image, template=self.und_template)
        drop = bool(rng.random() < self.cfg_dropout)
        if self.caption_prob and record.get("caption") and rng.random() < self.caption_prob:
            # the detailed caption instead of the short prompt: every word of it is visible in
            # the image, which teaches the flow to read its prompt sooner
            record = {**record, "prompt": record["caption"]}
        return encode_gen(self.processor, record, image, num_gen_tokens=self.num_gen_tokens,
                          image_size=self.gen_image_size, template=self.gen_template,
                          drop_prompt=drop, rng=rng, image_bytes=data)


class PackedStream:
    """Batches of `rows` packed sequences of max_len tokens, drawn by the mixer."""

    def __init__(self, source: SequenceSource, mixer: Mixer, *, rows: int, max_len: int):
        if rows < 1 or max_len < 1:
            raise DataError(f"rows and max_len must be >= 1, got {rows} and {max_len}")
        self.source, self.mixer, self.rows, self.max_len = source, mixer, rows, max_len
        self.pending: list[tuple[tuple[str, int, int], Encoded]] = []
        self.emitted = {k: 0 for k in KINDS}
        self.skipped_too_long = 0

    def next_batch(self, step: int) -> tuple[PackedBatch, dict]:
        """The packed batch of step `step` and its stats (efficiency, kind fractions)."""
        capacity = self.rows * self.max_len
        while sum(len(e) for _, e in self.pending) < capacity:
            ref = self.mixer.next(step)
            enc = self.source.encode(*ref)
            if len(enc) > self.max_len:
                self.skipped_too_long += 1
                continue
            self.pending.append((ref, enc))
        bins, left = first_fit_decreasing([len(e) for _, e in self.pending],
                                          max_len=self.max_len, bins=self.rows)
        rows = [[self.pending[i][1] for i in b] for b in bins]
        self.pending = [self.pending[i] for i in left]
        batch = collate_packed(rows, max_len=self.max_len, pad_id=self.source.processor.pad_id)
        counts = {k: sum(kinds.count(k) for kinds in batch.kinds) for k in KINDS}
        for k in KINDS:
            self.emitted[k] += counts[k]
        n = max(1, sum(counts.values()))
        total = max(1, sum(self.emitted.values()))
        stats = {"packing_efficiency": batch.efficiency, "samples": sum(counts.values()),
                 **{f"mix_{k}": counts[k] / n for k in KINDS},
                 **{f"mix_total_{k}": self.emitted[k] / total for k in KINDS}}
        return batch, stats

    def state_dict(self) -> dict:
        return {"mixer": self.mixer.state_dict(), "pending": [list(r) for r, _ in self.pending],
                "emitted": dict(self.emitted), "skipped_too_long": self.skipped_too_long}

    def load_state_dict(self, state: dict) -> None:
        self.mixer.load_state_dict(state["mixer"])
        self.pending = [(tuple(r), self.source.encode(*r)) for r in state["pending"]]
        self.emitted = dict(state["emitted"])
        self.skipped_too_long = state["skipped_too_long"]
