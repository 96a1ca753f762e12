import hashlib

import numpy as np
import pytest

from data.shapes.corpus import scene_dict, scene_from_dict
from data.shapes.text import CATEGORIES, POSITIONS, caption, counterfactual_caption, relation_holds, \
    sample_spec, scene_for_spec, vqa
from data.shapes.world import COLOURS, HELD_OUT_PAIRS, NUMBERS, SHAPES, random_scene, render


def specs_and_scenes(seed, n=60, held_out=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        spec = sample_spec(rng, CATEGORIES[i % len(CATEGORIES)], held_out=held_out)
        out.append((spec, scene_for_spec(rng, spec)))
    return out


def test_world_has_the_required_variety():
    assert set(SHAPES) >= {"circle", "square", "triangle"} and len(COLOURS) >= 6


def test_rendering_is_deterministic_to_the_byte():
    def digest(seed):
        rng = np.random.default_rng(seed)
        return hashlib.sha256(b"".join(render(random_scene(rng), 64).tobytes() for _ in range(20))).hexdigest()
    assert digest(0) == digest(0) != digest(1)


def test_every_spec_gets_a_scene_that_satisfies_it():
    for spec, scene in specs_and_scenes(0):
        assert scene is not None, spec
        objs = scene.objects
        assert len(objs) == sum(item["count"] for item in spec["include"])
        for item in spec["include"]:
            matching = [o for o in objs if o.shape == item["class"] and o.colour == item.get("color", o.colour)]
            assert len(matching) >= item["count"], spec
        for item in spec["include"]:
            if "position" in item:
                rel, ref = item["position"]
                ref_item = spec["include"][ref]
                a = next(o for o in objs if (o.shape, o.colour) == (item["class"], item["color"]))
                b = next(o for o in objs if (o.shape, o.colour) == (ref_item["class"], ref_item["color"]))
                assert relation_holds(a, b, rel, margin=0.15), spec


def test_geneval_metadata_is_valid():
    for spec, _ in specs_and_scenes(1):
        assert set(spec) == {"tag", "include", "prompt"} and spec["tag"] in CATEGORIES
        assert spec["prompt"] and " a o" not in spec["prompt"]  # "an orange", never "a orange"
        for i, item in enumerate(spec["include"]):
            assert item["class"] in SHAPES and isinstance(item["count"], int) and item["count"] >= 1
            assert item.get("color", "red") in COLOURS
            if "position" in item:
                assert item["position"][0] in POSITIONS and 0 <= item["position"][1] < i


def test_held_out_pairs_never_reach_training_and_fill_the_held_out_split():
    for seed in range(3):
        for spec, scene in specs_and_scenes(seed):
            assert not {(o.colour, o.shape) for o in scene.objects} & HELD_OUT_PAIRS
        rng = np.random.default_rng(seed)
        for _ in range(50):
            assert not {(o.colour, o.shape) for o in random_scene(rng).objects} & HELD_OUT_PAIRS
    for spec, scene in specs_and_scenes(5, held_out=True):
        named = {(i.get("color"), i["class"]) for i in spec["include"]}
        assert named & HELD_OUT_PAIRS, spec
        assert {(o.colour, o.shape) for o in scene.objects} & HELD_OUT_PAIRS


def test_vqa_answers_are_true_of_the_scene():
    rng = np.random.default_rng(2)
    kinds = set()
    for _ in range(200):
        scene = random_scene(rng)
        for question, answer in vqa(rng, scene):
            words = question.rstrip("?").split()
            if question == "How many objects are there?":
                assert answer == NUMBERS[len(scene.objects)]
            elif question.startswith("How many"):
                shape = words[2][:-1]
                assert answer == NUMBERS[scene.count(shape=shape)]
            elif question.startswith("What colour"):
                assert [o.colour for o in scene.objects if o.shape == words[-1]] == [answer]
            elif question.startswith("What shape"):
                assert [o.shape for o in scene.objects if o.colour == words[-2]] == [answer]
            else:
                assert answer in ("yes", "no")
            kinds.add(question.split()[0] + ("" if answer not in ("yes", "no") else answer))
        assert caption(scene).startswith(f"A {scene.background} picture with {NUMBERS[len(scene.objects)]}")
    assert {"Isyes", "Isno", "How", "What"} <= kinds


def test_counterfactual_caption_changes_one_shape_or_colour():
    """SigLIP's hard negatives: the caption of the same scene with exactly one object's shape or
    colour changed (and nothing else), both kinds in use."""
    rng = np.random.default_rng(3)
    kinds = set()
    for _ in range(200):
        scene = scene_from_dict(scene_dict(random_scene(rng)))
        negative = counterfactual_caption(rng, scene)
        assert negative != caption(scene)
        head, _, things = negative.partition(": ")
        assert head == caption(scene).partition(": ")[0]  # same background and object count
        old = caption(scene).partition(": ")[2].rstrip(".").split(", ")
        new = things.rstrip(".").split(", ")
        changed = [(a.split(), b.split()) for a, b in zip(old, new) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(diff) == 1 and a[:2] == b[:2]  # article and size kept
        kinds.add("colour" if a[diff[0]] in COLOURS else "shape")
        assert (b[diff[0]] in COLOURS) == (a[diff[0]] in COLOURS)
    assert kinds == {"colour", "shape"}


def test_unknown_category_is_refused():
    with pytest.raises(ValueError, match="unknown category"):
        sample_spec(np.random.default_rng(0), "spatial")
