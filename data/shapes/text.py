"""Language of the shapes world: generation prompts in GenEval's categories (with GenEval metadata),
scenes built to satisfy them, and understanding data (captions, VQA) read off a scene.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data.shapes.world import COLOURS, NUMBERS, SHAPES, Obj, Scene, _finish, pair_space, place

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITIONS = ("left of", "right of", "above", "below")
CAPTION_QUESTION = "Generate the caption of this picture."


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def sample_spec(rng: np.random.Generator, category: str, *, held_out: bool = False) -> dict:
    """A GenEval metadata record {tag, include, prompt}; held_out specs use an unseen pair."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}: choose from {', '.join(CATEGORIES)}")
    pairs = sorted(pair_space(False))
    if held_out:
        # an unseen colour-shape pair only makes sense where the prompt names a colour
        category = category if category in ("colors", "color_attr") else "colors"
    if category == "single_object":
        shape = _pick(rng, sorted({s for s, _ in pairs}))
        include, text = [{"class": shape, "count": 1}], f"{article(shape)} {shape}"
    elif category == "two_object":
        a, b = rng.choice(3, size=2, replace=False)
        s1, s2 = sorted({s for s, _ in pairs})[a], sorted({s for s, _ in pairs})[b]
        include, text = [{"class": s1, "count": 1}, {"class": s2, "count": 1}], f"{article(s1)} {s1} and {article(s2)} {s2}"
    elif category == "counting":
        shape, n = _pick(rng, sorted({s for s, _ in pairs})), int(rng.integers(2, 5))
        include, text = [{"class": shape, "count": n}], f"{NUMBERS[n]} {plural(shape, n)}"
    elif category == "colors":
        shape, colour = _pick(rng, sorted(pair_space(True)) if held_out else pairs)
        include, text = [{"class": shape, "count": 1, "color": colour}], f"{article(colour)} {colour} {shape}"
    elif category == "position":
        (s1, c1), (s2, c2) = _distinct_pairs(rng, pairs)
        rel = _pick(rng, POSITIONS)
        include = [{"class": s2, "count": 1, "color": c2},
                   {"class": s1, "count": 1, "color": c1, "position": [rel, 0]}]
        text = f"{article(c1)} {c1} {s1} {rel} {article(c2)} {c2} {s2}"
    else:  # color_attr
        first = _pick(rng, sorted(pair_space(True))) if held_out else None
        (s1, c1), (s2, c2) = _distinct_pairs(rng, pairs, first=first)
        include = [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]
        text = f"{article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}"
    return {"tag": category, "include": include, "prompt": _phrase(rng, text)}


def _distinct_pairs(rng, pairs, *, first=None):
    """Two (shape, colour) pairs of different shapes, so every object is named unambiguously."""
    a = first or _pick(rng, pairs)
    b = _pick(rng, [p for p in pairs if p[0] != a[0]])
    return a, b


def _phrase(rng: np.random.Generator, core: str) -> str:
    """Short prompts mostly; a quarter get a longer, descriptive sentence."""
    if rng.random() < 0.75:
        return core
    return _pick(rng, (f"a photo of {core}", f"a simple drawing showing {core}",
                       f"an image of {core} on a plain background"))


def scene_for_spec(rng: np.random.Generator, spec: dict, *, tries: int = 20) -> Scene | None:
    """A scene that satisfies a spec exactly: the named objects, nothing else (None if no room)."""
    for _ in range(tries):
        scene = _try_scene(rng, spec)
        if scene is not None:
            return scene
    return None


def _try_scene(rng: np.random.Generator, spec: dict) -> Scene | None:
    objects: list[Obj] = []
    anchor: Obj | None = None
    for item in spec["include"]:
        for _ in range(item["count"]):
            colour = item.get("color") or _pick(rng, [c for s, c in sorted(pair_space(False))
                                                      if s == item["class"]])
            size = _pick(rng, ("small", "large"))
            if "position" in item:
                obj = _place_relative(rng, item["class"], colour, size, objects, anchor,
                                      item["position"][0])
            else:
                obj = place(rng, item["class"], colour, size, objects)
            if obj is None:
                return None
            objects.append(obj)
            anchor = anchor or obj
    return _finish(rng, objects)


def _place_relative(rng, shape, colour, size, others, anchor: Obj, relation: str) -> Obj | None:
    """Place so the relation holds clearly (by at least 15% of the image side)."""
    for _ in range(300):
        obj = place(rng, shape, colour, size, others)
        if obj is not None and relation_holds(obj, anchor, relation, margin=0.15):
            return obj
    return None


def relation_holds(a: Obj, b: Obj, relation: str, *, margin: float = 0.0) -> bool:
    """`a relation b`, in image coordinates (y grows downwards): the offset along the relation's
    axis exceeds `margin` and is at least twice the offset across it, so the direction is the
    dominant one (what GenEval's position check reads off the boxes)."""
    dx, dy = a.x - b.x, a.y - b.y
    along, across = {"left of": (-dx, dy), "right of": (dx, dy),
                     "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > margin and abs(across) <= along / 2


# -- understanding --------------------------------------------------------------------------------
def describe(o: Obj) -> str:
    return f"{article(o.size)} {o.size} {o.colour} {o.shape}"


def caption(scene: Scene) -> str:
    things = ", ".join(describe(o) for o in sorted(scene.objects, key=lambda o: o.x))
    n = len(scene.objects)
    return f"A {scene.background} picture with {NUMBERS[n]} {plural('object', n)}: {things}."


def counterfactual_caption(rng: np.random.Generator, scene: Scene) -> str:
    """The caption of the scene with one object's shape or colour changed: a hard negative that an
    image-text model can only reject by looking at that object (in-batch captions differ in so much
    else that a contrastive encoder learns colours and counts and next to nothing of shape)."""
    k = int(rng.integers(len(scene.objects)))
    o = scene.objects[k]
    if rng.random() < 0.5:
        o = dataclasses.replace(o, shape=_pick(rng, [s for s in SHAPES if s != o.shape]))
    else:
        o = dataclasses.replace(o, colour=_pick(rng, [c for c in sorted(COLOURS) if c != o.colour]))
    return caption(dataclasses.replace(scene, objects=[*scene.objects[:k], o, *scene.objects[k + 1:]]))


def vqa(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str]]:
    """Question-answer pairs whose answers are unambiguous in this scene."""
    qa = [("How many objects are there?", NUMBERS[len(scene.objects)])]
    shape = _pick(rng, ("circle", "square", "triangle"))
    qa.append((f"How many {plural(shape, 2)} are there?", NUMBERS[scene.count(shape=shape)]))
    unique_shapes = [o for o in scene.objects if scene.count(shape=o.shape) == 1]
    if unique_shapes:
        o = _pick(rng, unique_shapes)
        qa.append((f"What colour is the {o.shape}?", o.colour))
    unique_colours = [o for o in scene.objects if scene.count(colour=o.colour) == 1]
    if unique_colours:
        o = _pick(rng, unique_colours)
        qa.append((f"What shape is the {o.colour} object?", o.shape))
    named = [o for o in scene.objects if scene.count(shape=o.shape, colour=o.colour) == 1]
    if len(named) >= 2:
        a, b = rng.choice(len(named), size=2, replace=False)
        a, b = named[a], named[b]
        rel = _pick(rng, POSITIONS)
        if relation_holds(a, b, rel, margin=0.1) or relation_holds(b, a, rel, margin=0.1):
            answer = "yes" if relation_holds(a, b, rel, margin=0.1) else "no"
            qa.append((f"Is the {a.colour} {a.shape} {rel} the {b.colour} {b.shape}?", answer))
    return qa


def question_kind(question: str) -> str | None:
    """The kind of a question vqa() asks (for accuracy per kind), None for any other question."""
    q = question.strip()
    if q == "How many objects are there?":
        return "count_all"
    for start, kind in (("How many ", "count_shape"), ("What colour is the ", "colour_of"),
                        ("What shape is the ", "shape_of"), ("Is the ", "relation")):
        if q.startswith(start):
            return kind
    return None


FACTS = (
    "A circle is round and has no corners.", "A square has four equal sides and four corners.",
    "A triangle has three sides and three corners.", "Red, green and blue are colours.",
    "Yellow is the colour of the sun in a drawing.", "Purple is a mix of red and blue.",
    "Orange is a mix of red and yellow.", "Objects on the left are closer to the left edge.",
    "Something above another thing is closer to the top of the picture.",
    "Counting goes one, two, three, four.",
)


def text_sample(rng: np.random.Generator, scene: Scene) -> str:
    """A text-only document: a fact, or a description of a scene."""
    if rng.random() < 0.3:
        return _pick(rng, FACTS)
    return caption(scene)
