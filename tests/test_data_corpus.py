"""The shapes corpus on disk: determinism, held-out splits, GenEval files, manifest, tokenizer."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import SMALL_SHAPES
from data.shapes.corpus import ShapesParams, build_shapes_corpus
from data.shapes.text import CATEGORIES, POSITIONS
from data.shapes.world import COLOURS, HELD_OUT_PAIRS, SHAPES
from data.shards import DataError, ShardReader, read_manifest, sha256_bytes, verify
from models import tokenizer as tk


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(shapes_corpus, tmp_path):
    again = tmp_path / "again"
    build_shapes_corpus(again, ShapesParams.from_dict(SMALL_SHAPES), progress=False)
    assert _files(again) == _files(shapes_corpus)
    other = build_shapes_corpus(tmp_path / "other", ShapesParams.from_dict({**SMALL_SHAPES, "seed": 1}),
                                progress=False)
    assert other["hash"] != read_manifest(shapes_corpus)["hash"]


def test_counts_shards_and_manifest(shapes_corpus):
    manifest = read_manifest(shapes_corpus)
    assert manifest["counts"]["train"]["gen"] == 60 and manifest["counts"]["unseen"]["und"] == 8
    for split, kind, n in [("train", "gen", 60), ("train", "und", 60), ("train", "text", 30),
                           ("heldout", "gen", 12), ("unseen", "und", 8)]:
        reader = ShardReader(shapes_corpus, split, kind)
        assert len(reader) == n
    assert len(ShardReader(shapes_corpus, "train", "gen").paths) == 3  # 60 samples / 25 per shard
    assert verify(shapes_corpus) == []


def test_verify_catches_a_changed_file(shapes_corpus, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shapes_corpus, copy)
    (copy / "eval" / "geneval.jsonl").write_text("{}\n")
    assert verify(copy) == ["eval/geneval.jsonl"]
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(tmp_path)


def _pairs(record):
    return {(o["colour"], o["shape"]) for o in record["scene"]["objects"]}


def test_train_never_shows_a_held_out_pair_and_unseen_always_does(shapes_corpus):
    for kind in ("gen", "und"):
        for record, _ in ShardReader(shapes_corpus, "train", kind):
            assert not _pairs(record) & HELD_OUT_PAIRS
        for record, _ in ShardReader(shapes_corpus, "unseen", kind):
            assert _pairs(record) & HELD_OUT_PAIRS
    train_text = " ".join(r["text"] for r, _ in ShardReader(shapes_corpus, "train", "text"))
    prompts = " ".join(r["prompt"] for r, _ in ShardReader(shapes_corpus, "train", "gen"))
    for colour, shape in HELD_OUT_PAIRS:
        assert f"{colour} {shape}" not in train_text + prompts


def test_understanding_conversations_ask_every_question_of_their_scene(shapes_corpus):
    """ask_all (the default): apart from captions, a conversation asks each question vqa() asks of
    its scene once, every answer right for the scene; without it, mostly one question."""
    import numpy as np

    from data.shapes.corpus import conversation, scene_from_dict
    from data.shapes.text import CAPTION_QUESTION, question_kind, vqa
    from data.shapes.world import NUMBERS

    records = [record for record, _ in ShardReader(shapes_corpus, "train", "und")]
    asked = []
    for record in records:
        turns = record["conversation"]
        questions = [t["user"].replace(tk.IMAGE, "").strip() for t in turns]
        qa = [(q, t["assistant"]) for q, t in zip(questions, turns) if q != CAPTION_QUESTION]
        if record["task"] == "caption":
            assert len(turns) == 1 and not qa
            continue
        kinds = [question_kind(q) for q, _ in qa]
        assert len(set(kinds)) == len(kinds) and {"count_all", "count_shape"} <= set(kinds)
        scene = scene_from_dict(record["scene"])
        assert ("How many objects are there?", NUMBERS[len(scene.objects)]) in qa
        # every kind the scene allows is asked (the relation kind only when the pair drawn has one)
        allowed = {question_kind(q) for seed in range(20) for q, _ in vqa(np.random.default_rng(seed), scene)}
        assert allowed - {"relation"} <= set(kinds) <= allowed
        asked.append(len(qa))
    assert len(asked) > len(records) // 2 and np.mean(asked) > 3
    one = [conversation(np.random.default_rng(i), scene_from_dict(records[0]["scene"]), ask_all=False)
           for i in range(40)]
    assert sum(task == "vqa" and len(turns) == 1 for task, turns in one) > 10


def test_held_out_scenes_are_not_train_images(shapes_corpus):
    train = {sha256_bytes(img) for k in ("gen", "und") for _, img in ShardReader(shapes_corpus, "train", k)}
    for split in ("heldout", "unseen"):
        for k in ("gen", "und"):
            assert not {sha256_bytes(img) for _, img in ShardReader(shapes_corpus, split, k)} & train


def _check_geneval(spec):
    assert set(spec) == {"tag", "include", "prompt"}
    assert spec["tag"] in CATEGORIES and spec["prompt"].strip()
    for n, item in enumerate(spec["include"]):
        assert item["class"] in SHAPES and isinstance(item["count"], int) and item["count"] >= 1
        assert set(item) <= {"class", "count", "color", "position"}
        if "color" in item:
            assert item["color"] in COLOURS
        if "position" in item:
            rel, anchor = item["position"]
            assert rel in POSITIONS and 0 <= anchor < n


def test_geneval_files_are_valid_metadata(shapes_corpus):
    lines = (shapes_corpus / "eval" / "geneval.jsonl").read_text().splitlines()
    specs = [json.loads(line) for line in lines]
    assert len(specs) == 2 * len(CATEGORIES)
    assert {s["tag"] for s in specs} == set(CATEGORIES)
    for spec in specs:
        _check_geneval(spec)
    unseen = [json.loads(x) for x in (shapes_corpus / "eval" / "geneval_unseen.jsonl").read_text().splitlines()]
    for spec in unseen:
        _check_geneval(spec)
        assert {(i.get("color"), i["class"]) for i in spec["include"]} & HELD_OUT_PAIRS


def test_generation_scenes_match_their_prompts(shapes_corpus):
    for record, _ in ShardReader(shapes_corpus, "train", "gen"):
        _check_geneval(record["geneval"])
        objects = record["scene"]["objects"]
        assert len(objects) == sum(i["count"] for i in record["geneval"]["include"])
        for item in record["geneval"]["include"]:
            found = [o for o in objects if o["shape"] == item["class"]
                     and item.get("color", o["colour"]) == o["colour"]]
            assert len(found) == item["count"]


def test_tokenizer_is_a_transformers_directory_with_the_special_tokens(shapes_corpus, shapes_processor):
    tok = AutoTokenizer.from_pretrained(str(shapes_corpus / "tokenizer"))
    vocab = tok.get_vocab()
    for t in tk.SPECIAL_TOKENS:
        assert t in vocab
    assert vocab[tk.BOS] == 0 and vocab[tk.EOS] == 1
    text = "a red circle left of a blue square"
    assert shapes_processor.decode(shapes_processor.encode(text)) == text
    assert len(shapes_processor) <= SMALL_SHAPES["vocab_size"]


def test_params_refuse_unknown_keys_and_bad_values():
    with pytest.raises(DataError, match="unknown data parameter"):
        ShapesParams.from_dict({"train_imgs": 3})
    with pytest.raises(DataError, match="data.image_size"):
        ShapesParams.from_dict({"image_size": 8})
    with pytest.raises(DataError, match="data.train_gen must be an integer"):
        ShapesParams.from_dict({"train_gen": "many"})
    with pytest.raises(DataError, match="data.heldout_und must be >= 0"):
        ShapesParams.from_dict({"heldout_und": -1})
