"""An exact, analytic object detector for the shapes world (the GenEval detector of the demo).

The world draws flat shapes in six known colours on a near-uniform background, so detection needs
no learned weights: estimate the background from the border, label each foreground pixel with its
nearest palette colour, split each colour into connected components, and classify a component by
how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2). Generated images
are blurrier than rendered ones; the thresholds leave room for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from data.shapes.world import COLOURS, SIZES

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (6, 3)
# A pixel belongs to an object when it is this far (RGB distance) from the background and this
# close to a palette colour; both are well inside the gaps between the world's colours.
FOREGROUND_DISTANCE = 70.0
PALETTE_DISTANCE = 90.0
# Fill ratio (area / bounding-box area) boundaries: triangle < 0.64 <= circle < 0.89 <= square.
TRIANGLE_BELOW, SQUARE_FROM = 0.64, 0.89


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side
    area: float                             # fraction of the image

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def min_area_pixels(size: int) -> int:
    """Components smaller than half the smallest triangle the world draws are noise."""
    side = SIZES["small"] * size
    return max(4, int(side * side / 4))


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects in an RGB image (PIL or (H, W, 3) uint8), left to right."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                     dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"detect needs an (H, W, 3) RGB image, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(rgb - background, axis=-1) > FOREGROUND_DISTANCE
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest = dist.argmin(-1)
    labelled = foreground & (dist.min(-1) < PALETTE_DISTANCE)
    found: list[Detection] = []
    min_area = min_area_pixels(min(h, w))
    for ci, colour in enumerate(PALETTE_NAMES):
        mask = labelled & (nearest == ci)
        if not mask.any():
            continue
        components, n = ndimage.label(mask)
        for k, sl in enumerate(ndimage.find_objects(components), start=1):
            area = int((components[sl] == k).sum())
            if area < min_area:
                continue
            ys, xs = sl
            bw, bh = xs.stop - xs.start, ys.stop - ys.start
            fill = area / float(bw * bh)
            shape = "triangle" if fill < TRIANGLE_BELOW else "circle" if fill < SQUARE_FROM else "square"
            found.append(Detection(shape, colour, (xs.start / w, ys.start / h, xs.stop / w, ys.stop / h),
                                   area / float(h * w)))
    return sorted(found, key=lambda d: d.centre)
