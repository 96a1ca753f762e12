"""GenEval's scoring rules on top of any detector.

A prompt's metadata lists the objects it asks for (`include`: class, count, optional colour and a
position relative to an earlier group) and optionally what must not be there (`exclude`). An image
is correct when every requirement holds, as in GenEval's evaluate_images.py: at least `count`
objects of the class, `count` of them in the asked colour, the position relation between every
found object and every object of the target group, and fewer than `count` of an excluded class.
The detector is pluggable: anything that maps an image to Detection-like objects (shape, colour,
box) serves; the shapes world's analytic one is data.shapes.detect.detect.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Protocol

import numpy as np

# GenEval's dead zone for relative positions: offsets are shrunk by this fraction of the two
# boxes' sizes before the direction is read.
POSITION_THRESHOLD = 0.1


class DetectionLike(Protocol):
    shape: str
    colour: str
    box: tuple[float, float, float, float]


Detector = Callable[[object], list[DetectionLike]]


def relations(a: DetectionLike, b: DetectionLike) -> set[str]:
    """Where a lies relative to b: a subset of {left of, right of, above, below}."""
    box_a, box_b = np.asarray(a.box, dtype=float), np.asarray(b.box, dtype=float)
    centre_a, centre_b = (box_a[:2] + box_a[2:]) / 2, (box_b[:2] + box_b[2:]) / 2
    dims = (box_a[2:] - box_a[:2]) + (box_b[2:] - box_b[:2])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def judge(metadata: dict, detections: Iterable[DetectionLike]) -> tuple[bool, str]:
    """(correct, reason) of one image against one GenEval metadata record."""
    by_class: dict[str, list] = defaultdict(list)
    for d in detections:
        by_class[d.shape].append(d)
    groups: list[list | None] = []
    reasons = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req.get("count", 1))
        found = by_class.get(cls, [])
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if ok and "color" in req:
            coloured = [d for d in found if d.colour == req["color"]]
            if len(coloured) < count:
                ok = False
                reasons.append(f"expected {req['color']} {cls}>={count}, found {len(coloured)}")
            found = coloured
        found = found[:count]
        if ok and "position" in req:
            relation, target = req["position"][0], int(req["position"][1])
            anchor = groups[target] if target < len(groups) else None
            if anchor is None:
                ok = False
                reasons.append(f"no target group {target} for '{relation}'")
            elif not all(relation in relations(d, t) for d in found for t in anchor):
                ok = False
                reasons.append(f"expected {cls} {relation} target")
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req.get("count", 1))
        if len(by_class.get(cls, [])) >= count:
            reasons.append(f"expected {cls}<{count}, found {len(by_class[cls])}")
    return not reasons, "; ".join(reasons) or "ok"


def with_exact_counts(metadata: dict) -> dict:
    """GenEval's counting prompts also exclude count + 1 of the class (exactly n, not at least n);
    metadata files that leave the exclusion implicit get it here."""
    if metadata.get("tag") != "counting" or "exclude" in metadata:
        return metadata
    extra = [{"class": r["class"], "count": int(r.get("count", 1)) + 1} for r in metadata["include"]]
    return {**metadata, "exclude": extra}


def summarise(results: list[dict]) -> dict:
    """Per-category accuracy over images, and GenEval's overall score: the mean over categories."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_tag[r["tag"]].append(bool(r["correct"]))
    per = {tag: sum(v) / len(v) for tag, v in sorted(by_tag.items())}
    return {"overall": sum(per.values()) / len(per) if per else 0.0, "per_category": per,
            "images": len(results)}
