"""A cache of frozen-encoder outputs for generation images: VAE latents and REPA targets.

Keys are the hash of the source image bytes plus its crop (see sequences.encode_gen), stored
under a directory named by the encoder version: a hash of the VAE's and SigLIP's weights and
configs. Retraining or swapping an encoder changes the version, so stale entries are never read.
`fill` pre-encodes every generation image whose crop is unique (square images already at the
target size, as in the shapes world); training (`latent_cache:` in a train config) fills the cache
at the start of a stage and reads it through `get`, encoding live only what it misses (other crops,
a corrupt entry). Entries are computed in fp32 whatever the training autocast.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.sequences import decode_image, generation_image, latent_key
from data.shards import ShardReader


def module_version(*modules: torch.nn.Module, extra: dict | None = None) -> str:
    """sha256 over parameter/buffer names, shapes and bytes (and `extra` as JSON), 16 hex digits."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_version(model) -> str:
    """The version of a JanusFlow model's frozen encoders (VAE, and SigLIP for REPA)."""
    return module_version(model.vae, model.vision,
                          extra={"vae": model.config.to_dict()["vae"],
                                 "vision": model.config.to_dict()["vision"]})


class LatentCache:
    def __init__(self, root: str | Path, version: str):
        self.dir = Path(root) / version
        self.version = version
        self.hits = self.misses = self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str | None) -> dict[str, torch.Tensor] | None:
        if key is None:
            return None
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = load_file(str(path))
        except Exception:  # truncated or foreign bytes: a miss, encoded live instead
            self.misses += 1
            self.corrupt += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)

    def __contains__(self, key: str) -> bool:
        return self._path(key).is_file()


@torch.no_grad()
def encode_batch(model, pixels_BCHW: torch.Tensor, *, repa: bool = True) -> list[dict[str, torch.Tensor]]:
    """Latents (and REPA targets) of a batch of generation images, one dict per image."""
    pixels = pixels_BCHW.to(model.device)
    latents = model.encode_images(pixels).float()
    targets = model.repa_target(pixels).float() if repa else None
    return [{"latent": latents[i], **({"repa": targets[i]} if repa else {})}
            for i in range(len(latents))]


def fill(cache: LatentCache, model, corpus: str | Path, *, split: str = "train",
         batch_size: int = 32, repa: bool = True, progress: bool = True,
         shard: tuple[int, int] = (0, 1)) -> dict:
    """Pre-encode the split's square, target-size generation images. Returns counts.

    shard (rank, world): this process takes every world-th image from the rank-th on, so several
    processes fill one cache together without writing the same entry."""
    rank, world = shard
    reader = ShardReader(corpus, split, "gen")
    size = model.config.gen.image_size
    counts = {"encoded": 0, "cached": 0, "lazy": 0}
    todo: list[tuple[str, torch.Tensor]] = []

    def flush():
        if todo:
            for (key, _), out in zip(todo, encode_batch(model, torch.stack([p for _, p in todo]), repa=repa)):
                cache.put(key, out)
            counts["encoded"] += len(todo)
            todo.clear()

    for i, (_, data) in enumerate(tqdm(reader, desc="encode latents", unit="image", disable=not progress)):
        if i % world != rank:
            continue
        if data is None:  # a record without image bytes: nothing to encode
            counts["lazy"] += 1
            continue
        with Image.open(io.BytesIO(data)) as header:  # the size without decoding the pixels
            square = header.size == (size, size)
        if not square:
            counts["lazy"] += 1
            continue
        if latent_key(data, (0, 0), size) in cache:  # a target-size image's only crop
            counts["cached"] += 1
            continue
        pixels, key = generation_image(decode_image(data), size, np.random.default_rng(0), image_bytes=data)
        todo.append((key, pixels))
        if len(todo) == batch_size:
            flush()
    flush()
    return counts

