"""The embedded shapes world: scenes of 1-4 coloured shapes, rendered deterministically.

A scene is plain data (objects with shape, colour, size and centre); rendering draws it with PIL at
any resolution, so the same scene serves every preset. All randomness comes from a numpy Generator
the caller seeds, which makes a corpus a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SIZES = {"small": 0.16, "large": 0.28}  # object extent as a fraction of the image side
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (225, 225, 225)}
NUMBERS = ("zero", "one", "two", "three", "four")

# Colour-shape pairs that never appear in training scenes: the unseen-combination split uses them.
HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "circle")})


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the width (0 = left)
    y: float  # centre, fraction of the height (0 = top)


@dataclass
class Scene:
    objects: list[Obj]
    background: str = "white"
    textured: bool = False
    texture_seed: int = 0
    meta: dict = field(default_factory=dict)

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects
                   if (shape is None or o.shape == shape) and (colour is None or o.colour == colour))


def overlaps(a: Obj, b: Obj) -> bool:
    gap = (SIZES[a.size] + SIZES[b.size]) / 2 + 0.04
    return abs(a.x - b.x) < gap and abs(a.y - b.y) < gap


def place(rng: np.random.Generator, shape: str, colour: str, size: str, others: list[Obj], *,
          x_range: tuple[float, float] = (0.0, 1.0), tries: int = 200) -> Obj | None:
    """An object at a random free spot (None when the image is too crowded)."""
    half = SIZES[size] / 2 + 0.02
    lo, hi = max(half, x_range[0]), min(1 - half, x_range[1])
    if lo >= hi:
        return None
    for _ in range(tries):
        obj = Obj(shape, colour, size, float(rng.uniform(lo, hi)), float(rng.uniform(half, 1 - half)))
        if not any(overlaps(obj, o) for o in others):
            return obj
    return None


def random_attributes(rng: np.random.Generator, *, allowed_pairs) -> tuple[str, str]:
    pairs = sorted(allowed_pairs)
    shape, colour = pairs[int(rng.integers(len(pairs)))]
    return shape, colour


def pair_space(held_out: bool) -> frozenset[tuple[str, str]]:
    """(shape, colour) pairs of the training world, or only the held-out ones."""
    every = {(s, c) for s in SHAPES for c in COLOURS}
    held = {(s, c) for c, s in HELD_OUT_PAIRS}
    return frozenset(held if held_out else every - held)


def random_scene(rng: np.random.Generator, *, n_objects: int | None = None,
                 pairs: frozenset[tuple[str, str]] = pair_space(False)) -> Scene:
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    objects: list[Obj] = []
    while len(objects) < n:
        shape, colour = random_attributes(rng, allowed_pairs=pairs)
        size = ("small", "large")[int(rng.integers(2))]
        obj = place(rng, shape, colour, size, objects)
        if obj is None:
            size = "small"
            obj = place(rng, shape, colour, size, objects)
        if obj is None:
            break
        objects.append(obj)
    return _finish(rng, objects)


def _finish(rng: np.random.Generator, objects: list[Obj]) -> Scene:
    background = ("white", "light grey")[int(rng.integers(2))]
    return Scene(objects=objects, background=background, textured=bool(rng.random() < 0.3),
                 texture_seed=int(rng.integers(2**31)))


def render(scene: Scene, size: int) -> Image.Image:
    """Draw a scene at size x size pixels (RGB). Identical bytes for identical scenes."""
    base = np.full((size, size, 3), BACKGROUNDS[scene.background], dtype=np.int16)
    if scene.textured:
        noise = np.random.default_rng(scene.texture_seed).integers(-12, 13, (size, size, 1))
        base = base + noise
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        r = SIZES[o.size] * size / 2
        cx, cy = o.x * size, o.y * size
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image
