"""The batched sampler behind `janusflow serve`, `generate` and `ask`, over any backend.

Text to image: requests are grouped by step count and cut into batch buckets (a bucket is padded
with copies of its last row, so engines only ever see the bucket sizes they were built for). Each
prompt's key/value prefix is computed once and reused for every step; the unconditional CFG rows
share one BOS-only prefix computed when the sampler is built; every row carries its own positions,
guidance and seeded noise, so an image never depends on what it was batched with. A row whose
latents turn non-finite fails alone (`NonFiniteOutput`); the rest of its batch is returned. A backend
with several `replicas` (onnxruntime with `workers: N`) runs a bucket's rows split over them in
parallel threads, each part through the whole loop and the decoder.

Understanding: one prefill over image + question, then greedy decoding with the key/value cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from models import flow
from models.checkpoint import read_config
from models.processor import JanusFlowProcessor, tensor_to_pil
from serving.graphs import image_index

DEFAULT_BUCKETS = (1, 2, 4, 8)


class NonFiniteOutput(RuntimeError):
    """A request's latents or image became NaN/Inf (reported to that request only)."""


@dataclass
class ImageRequest:
    prompt: str
    seed: int = 0
    guidance: float = 2.0
    steps: int = 30


@dataclass
class ImageResult:
    image: Image.Image | None
    error: str | None = None
    batch_size: int = 0   # real rows in the batch the row ran in (observability: did batching happen)
    bucket: int = 0       # the batch size the graphs ran at (batch_size padded up to a bucket)


@dataclass
class Sampler:
    backend: object
    processor: JanusFlowProcessor
    config: object
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    _uncond: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @classmethod
    def from_export(cls, export_dir: str | Path, backend, **kw) -> "Sampler":
        config = read_config(export_dir)
        return cls(backend, JanusFlowProcessor.from_pretrained(export_dir, config), config, **kw)

    @classmethod
    def from_model(cls, model, processor, backend, **kw) -> "Sampler":
        return cls(backend, processor, model.config, **kw)

    def __post_init__(self):
        self.buckets = tuple(sorted(set(int(b) for b in self.buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {self.buckets}")

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.max_batch)

    # -- text to image ------------------------------------------------------------------------------
    @property
    def replicas(self) -> list:
        return list(getattr(self.backend, "replicas", None) or [self.backend])

    def unconditional_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (L, 1, H, 1, hd) of the BOS-only prompt, computed once."""
        if self._uncond is None:
            ids = torch.tensor([[self.processor.bos_id]])
            self._uncond = self.backend.run("prefix", input_ids=ids, attention_mask=torch.ones_like(ids))
        return self._uncond

    def generate(self, requests: list[ImageRequest]) -> list[ImageResult]:
        """Images for `requests`, in order; batches by step count and bucket."""
        results: list[ImageResult | None] = [None] * len(requests)
        by_steps: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_steps.setdefault(int(r.steps), []).append(i)
        for steps, idx in by_steps.items():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start:start + self.max_batch]
                for i, res in zip(chunk, self._generate_bucket([requests[i] for i in chunk], steps)):
                    results[i] = res
        return results  # type: ignore[return-value]

    def prompt_prefix(self, prompts: list[str], backend=None):
        """Keys/values (L, B, H, P, hd) and the encoded batch of `prompts`. A prompt in several rows
        (a request for n images, bucket padding) goes through the prefix graph once; that run is
        padded to a bucket size again, since engines only have profiles for those."""
        unique = list(dict.fromkeys(prompts))
        run = unique + unique[-1:] * (self.bucket(len(unique)) - len(unique))
        enc = self.processor.encode_prompts(run)
        keys, values = (backend or self.backend).run("prefix", input_ids=enc.input_ids,
                                                     attention_mask=enc.attention_mask)
        if run == prompts:
            return keys, values, enc
        position = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([position[p] for p in prompts])
        enc.input_ids, enc.attention_mask = enc.input_ids[rows], enc.attention_mask[rows]
        enc.lengths = enc.lengths[rows]
        index = rows.to(keys.device)
        return keys.index_select(1, index), values.index_select(1, index), enc

    def latents(self, requests: list[ImageRequest], steps: int, backend=None) -> torch.Tensor:
        """Final latents (B, C, H, W) of requests sharing a step count (no bucket padding), on
        `backend` (default: the sampler's; a replica of it for a part of a split bucket).

        With a `cfg_step` graph (exports since it exists) each step is one call that does g_enc once per
        row, CFG and the Euler update; otherwise the `velocity` graph runs over [cond; uncond] rows."""
        cfg, backend = self.config, backend or self.backend
        b = len(requests)
        keys, values, enc = self.prompt_prefix([r.prompt for r in requests], backend)
        device = keys.device  # every tensor of the loop lives where the backend computes
        uk, uv = self.unconditional_prefix()
        guidance = torch.tensor([float(r.guidance) for r in requests], device=device)
        shape = (b, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
        z = flow.initial_noise(shape, [int(r.seed) for r in requests], device=device)
        dt = 1.0 / steps
        if "cfg_step" in backend.graphs:
            mask, lengths = enc.attention_mask.to(device), enc.lengths.to(device)
            dt_B = torch.full((b,), dt, device=device)
            for t in flow.timesteps(steps):
                (z,) = backend.run("cfg_step", z=z, t=torch.full((b,), t, device=device), dt=dt_B,
                                        guidance=guidance, keys=keys, values=values, prefix_mask=mask,
                                        lengths=lengths, uncond_keys=uk, uncond_values=uv)
            return z.float()
        p = keys.shape[3]
        pad = (0, 0, 0, p - 1)  # the BOS-only prefix, zero-padded to P and masked past BOS
        keys = torch.cat([keys, torch.nn.functional.pad(uk, pad).expand(-1, b, -1, -1, -1)], dim=1)
        values = torch.cat([values, torch.nn.functional.pad(uv, pad).expand(-1, b, -1, -1, -1)], dim=1)
        uncond_mask = torch.zeros_like(enc.attention_mask)
        uncond_mask[:, 0] = 1
        mask = torch.cat([enc.attention_mask, uncond_mask]).to(device)
        lengths = torch.cat([enc.lengths, enc.lengths]).to(device)  # the release's positions for uncond rows
        for t in flow.timesteps(steps):
            t_B = torch.full((2 * b,), t, device=device)
            (v,) = backend.run("velocity", z_t=torch.cat([z, z]), t=t_B, keys=keys, values=values,
                                    prefix_mask=mask, lengths=lengths)
            z = flow.euler_step(z, flow.cfg_combine(*v.float().chunk(2), guidance), dt)
        return z

    def decode(self, latents: torch.Tensor, backend=None) -> torch.Tensor:
        (images,) = (backend or self.backend).run("vae_decoder", latents=latents)
        return images

    def sample(self, requests: list[ImageRequest], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, images) of requests sharing a step count; with several replicas the rows are
        split into contiguous parts that run in parallel, one part per replica."""
        replicas = self.replicas[: len(requests)]
        if len(replicas) == 1:
            z = self.latents(requests, steps)
            return z, self.decode(z)
        self.unconditional_prefix()  # once, before the parts share it
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="janusflow-sampler")
        cuts = [len(requests) * i // len(replicas) for i in range(len(replicas) + 1)]

        def part(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.latents(requests[cuts[i]:cuts[i + 1]], steps, replicas[i])
            return z, self.decode(z, replicas[i])

        parts = list(self._pool.map(part, range(len(replicas))))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _generate_bucket(self, requests: list[ImageRequest], steps: int) -> list[ImageResult]:
        n, size = len(requests), self.bucket(len(requests))
        padded = requests + [requests[-1]] * (size - n)
        z, images = self.sample(padded, steps)
        out = []
        for i in range(n):
            if not (torch.isfinite(z[i]).all() and torch.isfinite(images[i]).all()):
                out.append(ImageResult(None, "non-finite latents: the model produced NaN/Inf", n, size))
                continue
            out.append(ImageResult(tensor_to_pil(images[i]), None, n, size))
        return out

    # -- understanding ------------------------------------------------------------------------------
    def answer(self, images: list[Image.Image], questions: list[str], *, max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per (image, question)."""
        out: list[str] = []
        for start in range(0, len(images), self.max_batch):
            out += self._answer_bucket(images[start:start + self.max_batch],
                                       questions[start:start + self.max_batch], max_new_tokens)
        return out

    def _answer_bucket(self, images, questions, max_new_tokens: int) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n, size = len(images), self.bucket(len(images))
        images = list(images) + [images[-1]] * (size - n)
        questions = list(questions) + [questions[-1]] * (size - n)
        batch = self.processor.encode_understanding(images, questions)
        (embeds,) = self.backend.run("vision", pixel_values=batch.pixel_values)
        logits, keys, values = self.backend.run(
            "und_prefill", input_ids=batch.input_ids, image_index=image_index(batch.image_mask),
            image_embeds=embeds, attention_mask=batch.attention_mask, last=batch.lengths - 1)
        mask, eos = batch.attention_mask, self.processor.eos_id
        done = torch.zeros(size, dtype=torch.bool, device=logits.device)
        tokens: list[list[int]] = [[] for _ in range(size)]
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            for i in range(size):
                if not done[i] and int(token[i]) != eos:
                    tokens[i].append(int(token[i]))
            done |= token == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(size, 1)], dim=1)
            logits, keys, values = self.backend.run(
                "decode_step", input_ids=token.view(-1, 1), keys=keys, values=values, attention_mask=mask,
                position_ids=(batch.lengths + step).view(-1, 1))
        return [self.processor.decode(t) for t in tokens[:n]]

