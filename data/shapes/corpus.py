"""`janusflow data shapes`: the embedded corpus, a pure function of its parameters and seed.

Splits:
- train:   generation prompts (GenEval categories) with scenes that satisfy them, conversations
           (captions, VQA, multi-turn) about random scenes, and text-only documents;
- heldout: the same kinds of samples on fresh scenes (any scene whose image also appears in train
           is dropped and counted), for evaluation on unseen scenes;
- unseen:  scenes and prompts with the held-out colour-shape pairs that train never shows.
eval/geneval.jsonl and eval/geneval_unseen.jsonl hold generation prompts in GenEval's metadata
format. tokenizer/ is a transformers tokenizer trained on the train text.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shapes.text import (CAPTION_QUESTION, CATEGORIES, FACTS, caption, sample_spec,
                              scene_for_spec, text_sample, vqa)
from data.shapes.world import Obj, Scene, overlaps, pair_space, random_scene, render
from data.shards import AtomicDir, DataError, ShardReader, ShardWriter, sha256_bytes, write_manifest
from models.config import dataclass_from_dict
from models.tokenizer import IMAGE, build_tokenizer

SPLITS = ("train", "heldout", "unseen")


@dataclass(frozen=True)
class ShapesParams:
    """Sizes of the shapes corpus (the `data` section of params.yaml)."""

    seed: int = 0
    image_size: int = 64
    train_gen: int = 4000
    train_und: int = 4000
    train_text: int = 2000
    heldout_gen: int = 256
    heldout_und: int = 256
    unseen_gen: int = 128
    unseen_und: int = 128
    eval_per_category: int = 16
    vocab_size: int = 2048
    shard_size: int = 1000
    # an understanding conversation asks every question its scene allows (shuffled) instead of one
    ask_all: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> "ShapesParams":
        try:
            params = dataclass_from_dict(cls, data, prefix="data.", unknown="unknown data parameter(s)")
        except ValueError as e:
            raise DataError(str(e)) from None
        for f in dataclasses.fields(cls):
            value = getattr(params, f.name)
            if value < 0:
                raise DataError(f"data.{f.name} must be >= 0, got {value}")
        for name in ("shard_size", "eval_per_category"):
            if getattr(params, name) < 1:
                raise DataError(f"data.{name} must be >= 1, got {getattr(params, name)}")
        if params.image_size < 16:
            raise DataError(f"data.image_size must be at least 16, got {params.image_size}")
        return params


def scene_dict(scene: Scene) -> dict:
    return {"background": scene.background, "textured": scene.textured,
            "objects": [dataclasses.asdict(o) for o in scene.objects]}


def scene_from_dict(data: dict) -> Scene:
    """The inverse of scene_dict (the `scene` a corpus record stores)."""
    return Scene(objects=[Obj(**o) for o in data["objects"]], background=data["background"],
                 textured=bool(data.get("textured", False)))


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def conversation(rng: np.random.Generator, scene: Scene, *, ask_all: bool) -> tuple[str, list[dict]]:
    """(task, turns) about a scene. With ask_all: a caption (1 in 5), else every question vqa()
    asks of the scene in random order, after the caption in a quarter of them: about 3.5 times the
    answers per image for ~50 more tokens (held-out VQA +0.03-0.06, docs/experiments.md, stop 25).
    Without: a caption, one question, or the caption and two or three questions (3:5:2)."""
    qa = vqa(rng, scene)
    roll = rng.random()
    if ask_all:
        if roll < 0.2:
            task, pairs = "caption", [(CAPTION_QUESTION, caption(scene))]
        else:
            task, pairs = "multi", [qa[i] for i in rng.permutation(len(qa))]
            if rng.random() < 0.25:
                pairs = [(CAPTION_QUESTION, caption(scene))] + pairs
    elif roll < 0.3:
        task, pairs = "caption", [(CAPTION_QUESTION, caption(scene))]
    elif roll < 0.8:
        task, pairs = "vqa", [qa[int(rng.integers(len(qa)))]]
    else:
        order = rng.permutation(len(qa))[: int(rng.integers(2, 4))]
        task, pairs = "multi", [(CAPTION_QUESTION, caption(scene))] + [qa[i] for i in order]
    turns = [{"user": (f"{IMAGE}\n{q}" if n == 0 else q), "assistant": a}
             for n, (q, a) in enumerate(pairs)]
    return task, turns


def _gen_sample(rng, category: str, *, held_out: bool, size: int):
    """(spec, scene, png) of one generation sample of a GenEval category."""
    while True:
        spec = sample_spec(rng, category, held_out=held_out)
        scene = scene_for_spec(rng, spec)
        if scene is not None:
            return spec, scene, png_bytes(render(scene, size))


def _und_scene(rng, *, held_out: bool) -> Scene:
    if not held_out:
        return random_scene(rng, pairs=pair_space(False))
    # an unseen-combination scene: at least one held-out pair, the rest from the training pairs
    first = random_scene(rng, n_objects=1, pairs=pair_space(True))
    rest = random_scene(rng, pairs=pair_space(False))
    objects = list(first.objects)
    objects += [o for o in rest.objects if not any(overlaps(o, p) for p in objects)][:3]
    return Scene(objects=objects, background=rest.background, textured=rest.textured,
                 texture_seed=rest.texture_seed)


def build_split(root: Path, split: str, rng: np.random.Generator, params: ShapesParams, *,
                n_gen: int, n_und: int, n_text: int, exclude: set[str] | None = None,
                progress: bool = True) -> dict:
    """Write one split's shards; returns counts (and how many duplicate scenes were dropped)."""
    held_out = split == "unseen"
    # unseen pairs only make sense where a prompt names colours
    categories = ("colors", "color_attr") if held_out else CATEGORIES
    counts = {"gen": 0, "und": 0, "text": 0, "dropped_seen_images": 0}
    bar = tqdm(total=n_gen + n_und + n_text, desc=f"shapes {split}", disable=not progress,
               unit="sample")
    with ShardWriter(root, split, "gen", shard_size=params.shard_size) as w:
        while counts["gen"] < n_gen:
            category = categories[counts["gen"] % len(categories)]
            spec, scene, png = _gen_sample(rng, category, held_out=held_out, size=params.image_size)
            if _is_seen(png, exclude, counts):
                continue
            w.write(f"gen{counts['gen']:07d}", {"prompt": spec["prompt"], "geneval": spec,
                                                "caption": caption(scene), "scene": scene_dict(scene)}, png)
            counts["gen"] += 1
            bar.update()
    with ShardWriter(root, split, "und", shard_size=params.shard_size) as w:
        while counts["und"] < n_und:
            scene = _und_scene(rng, held_out=held_out)
            png = png_bytes(render(scene, params.image_size))
            if _is_seen(png, exclude, counts):
                continue
            task, turns = conversation(rng, scene, ask_all=params.ask_all)
            w.write(f"und{counts['und']:07d}", {"task": task, "conversation": turns,
                                                "scene": scene_dict(scene)}, png)
            counts["und"] += 1
            bar.update()
    with ShardWriter(root, split, "text", shard_size=params.shard_size) as w:
        for i in range(n_text):
            w.write(f"text{i:07d}", {"text": text_sample(rng, random_scene(rng))})
            counts["text"] += 1
            bar.update()
    bar.close()
    return counts


def _is_seen(png: bytes, exclude: set[str] | None, counts: dict) -> bool:
    """True (and counted) when a held-out image is byte-identical to a train image."""
    if exclude is not None and sha256_bytes(png) in exclude:
        counts["dropped_seen_images"] += 1
        return True
    return False


def write_eval_prompts(path: Path, rng: np.random.Generator, per_category: int, *, held_out: bool) -> int:
    """GenEval metadata lines {tag, include, prompt}, per_category of each category."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    categories = ("colors", "color_attr") if held_out else CATEGORIES
    for category in categories:
        for _ in range(per_category):
            lines.append(json.dumps(sample_spec(rng, category, held_out=held_out), sort_keys=True))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def training_texts(root: Path) -> list[str]:
    """Every string of the train split the tokenizer should know, in corpus order."""
    texts = list(FACTS)
    for kind in ("gen", "und", "text"):
        for record, _ in ShardReader(root, "train", kind):
            if kind == "gen":
                texts += [record["prompt"], record["caption"]]
            elif kind == "und":
                texts += [t for turn in record["conversation"] for t in (turn["user"], turn["assistant"])]
            else:
                texts.append(record["text"])
    return texts


def build_shapes_corpus(out: str | Path, params: ShapesParams | None = None, *,
                        progress: bool = True) -> dict:
    """Build the corpus into `out` (replaced atomically); returns its manifest."""
    params = params or ShapesParams()
    streams = np.random.SeedSequence(params.seed).spawn(5)
    rng = {name: np.random.default_rng(s) for name, s in
           zip(("train", "heldout", "unseen", "eval", "eval_unseen"), streams)}
    with AtomicDir(out) as root:
        counts = {"train": build_split(root, "train", rng["train"], params, n_gen=params.train_gen,
                                       n_und=params.train_und, n_text=params.train_text,
                                       exclude=None, progress=progress)}
        train_images = _image_hashes(root, "train")
        for split in ("heldout", "unseen"):
            counts[split] = build_split(root, split, rng[split], params,
                                        n_gen=getattr(params, f"{split}_gen"),
                                        n_und=getattr(params, f"{split}_und"), n_text=0,
                                        exclude=train_images, progress=progress)
        counts["eval"] = {
            "geneval": write_eval_prompts(root / "eval" / "geneval.jsonl", rng["eval"],
                                          params.eval_per_category, held_out=False),
            "geneval_unseen": write_eval_prompts(root / "eval" / "geneval_unseen.jsonl",
                                                 rng["eval_unseen"], params.eval_per_category,
                                                 held_out=True)}
        tokenizer = build_tokenizer(training_texts(root), vocab_size=params.vocab_size)
        tokenizer.save_pretrained(str(root / "tokenizer"))
        manifest = write_manifest(root, name="shapes", counts=counts,
                                  source={"generator": "shapes", **dataclasses.asdict(params)})
    return manifest


def _image_hashes(root: Path, split: str) -> set[str]:
    return {sha256_bytes(image) for kind in ("gen", "und")
            for _, image in ShardReader(root, split, kind)}
