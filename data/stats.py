"""Corpus statistics: counts, image sizes, text lengths, attribute coverage, token lengths and
packing efficiency; written as stats.json (DVC metrics) and stats.md (for people)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data.shapes.world import HELD_OUT_PAIRS
from data.shards import KINDS, ShardReader, read_manifest
from data.stream import Mixer, PackedStream, SequenceSource

PACKING_MIX = [{"until": 10, "ratio": {"und": 30, "gen": 50, "text": 20}},
               {"ratio": {"und": 14, "gen": 80, "text": 6}}]


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "mean": round(float(a.mean()), 3), "max": float(a.max())}


def _texts(kind: str, record: dict) -> list[str]:
    if kind == "gen":
        return [record["prompt"]]
    if kind == "text":
        return [record["text"]]
    return [t for turn in record["conversation"] for t in (turn["user"], turn["assistant"])]


def corpus_stats(root: str | Path, *, processor=None, num_gen_tokens: int = 0,
                 gen_image_size: int = 0, max_len: int = 0, rows: int = 4, steps: int = 20) -> dict:
    """Statistics of every split; with a processor also token lengths and packing efficiency."""
    root = Path(root)
    manifest = read_manifest(root)
    stats: dict = {"name": manifest["name"], "hash": manifest["hash"], "splits": {}}
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))
    for split in splits:
        s: dict = {"counts": {}, "image_side": {}, "words": {}}
        pairs, tags, objects = Counter(), Counter(), Counter()
        for kind in KINDS:
            reader = ShardReader(root, split, kind)
            s["counts"][kind] = len(reader)
            sides, words = [], []
            for record, image in reader:
                if image is not None:
                    sides.append(min(Image.open(io.BytesIO(image)).size))
                words += [len(t.split()) for t in _texts(kind, record)]
                if "scene" in record:
                    objects[len(record["scene"]["objects"])] += 1
                    for o in record["scene"]["objects"]:
                        pairs[f"{o['colour']} {o['shape']}"] += 1
                if "geneval" in record:
                    tags[record["geneval"]["tag"]] += 1
            if sides:
                s["image_side"][kind] = _summary(sides)
            if words:
                s["words"][kind] = _summary(words)
        if pairs:
            s["colour_shape_pairs"] = dict(sorted(pairs.items()))
            s["objects_per_scene"] = {str(k): v for k, v in sorted(objects.items())}
            s["held_out_pair_objects"] = sum(pairs[f"{c} {sh}"] for c, sh in HELD_OUT_PAIRS)
        if tags:
            s["geneval_tags"] = dict(sorted(tags.items()))
        stats["splits"][split] = s
    evals = sorted((root / "eval").glob("*.jsonl")) if (root / "eval").is_dir() else []
    stats["eval"] = {p.stem: dict(Counter(json.loads(line)["tag"] for line in p.read_text().splitlines()
                                          if line.strip())) for p in evals}
    if processor is not None and "train" in splits:
        stats["tokens"], stats["packing"] = _token_stats(root, processor, num_gen_tokens,
                                                        gen_image_size, max_len, rows, steps)
    return stats


def _token_stats(root, processor, num_gen_tokens, gen_image_size, max_len, rows, steps):
    source = SequenceSource(root, "train", processor, num_gen_tokens=num_gen_tokens,
                            gen_image_size=gen_image_size, with_images=False)
    sizes = source.sizes()
    lengths = {k: [len(source.encode(k, i, i)) for i in range(min(n, 500))] for k, n in sizes.items()}
    tokens = {k: _summary(v) for k, v in lengths.items() if v}
    # an imported corpus may lack a kind: mix what it has
    mix = [{**phase, "ratio": {k: v for k, v in phase["ratio"].items() if sizes.get(k)}}
           for phase in PACKING_MIX]
    stream = PackedStream(source, Mixer(mix, sizes), rows=rows, max_len=max_len)
    effs = [stream.next_batch(step)[1]["packing_efficiency"] for step in range(steps)]
    packing = {"max_len": max_len, "rows": rows, "steps": steps,
               "efficiency_mean": round(float(np.mean(effs)), 5),
               "efficiency_min": round(float(np.min(effs)), 5),
               "skipped_too_long": stream.skipped_too_long}
    return tokens, packing


def write_stats(root: str | Path, stats: dict) -> None:
    root = Path(root)
    (root / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    lines = [f"# Corpus `{stats['name']}`", "", f"Data version (manifest hash): `{stats['hash']}`", "",
             "| split | und | gen | text | held-out pair objects |", "| --- | ---: | ---: | ---: | ---: |"]
    for split, s in stats["splits"].items():
        c = s["counts"]
        lines.append(f"| {split} | {c['und']} | {c['gen']} | {c['text']} | "
                     f"{s.get('held_out_pair_objects', '-')} |")
    if stats.get("eval"):
        lines += ["", "Evaluation prompt files (GenEval metadata): " +
                  ", ".join(f"{k} ({sum(v.values())} prompts)" for k, v in stats["eval"].items())]
    if "tokens" in stats:
        lines += ["", "| kind | tokens min | mean | max |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['min']:.0f} | {v['mean']:.1f} | {v['max']:.0f} |"
                  for k, v in stats["tokens"].items()]
        p = stats["packing"]
        lines += ["", f"Packing at max_len {p['max_len']} ({p['rows']} rows x {p['steps']} steps, "
                      f"stage-2 mix): efficiency mean {p['efficiency_mean']:.2%}, "
                      f"min {p['efficiency_min']:.2%}."]
    (root / "stats.md").write_text("\n".join(lines) + "\n")
