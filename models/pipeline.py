"""JanusFlowPipeline: what a user calls, diffusers-style.

    pipe = JanusFlowPipeline.from_pretrained("runs/model")
    images = pipe(["a red circle"], num_inference_steps=30, guidance_scale=2.0, seed=0)
    answers = pipe.answer([image], ["What colour is the circle?"])
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from models import checkpoint
from models.config import JanusFlowConfig, preset
from models.janusflow import JanusFlow
from models.processor import JanusFlowProcessor, tensor_to_pil
from models.sampler import generate_text, sample_latents
from models.tokenizer import build_tokenizer

# Seed text for the tokenizer of a randomly initialised preset (no corpus yet).
_SEED_TEXT = [
    "a red circle left of a blue square", "two green triangles", "What colour is the circle?",
    "How many objects are there?", "Generate the caption of this picture.", "yes", "no",
    "a small yellow square above a large purple triangle on a white background",
]


class JanusFlowPipeline:
    def __init__(self, model: JanusFlow, processor: JanusFlowProcessor):
        self.model = model
        self.processor = processor

    @property
    def config(self) -> JanusFlowConfig:
        return self.model.config

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "JanusFlowPipeline":
        return cls(*checkpoint.from_pretrained(path, dtype=dtype, device=device))

    @classmethod
    def from_config(cls, config: JanusFlowConfig | str, *, tokenizer=None,
                    seed: int = 0) -> "JanusFlowPipeline":
        """Randomly initialised model of a preset or config (for tests, benchmarks, stage 0)."""
        config = preset(config) if isinstance(config, str) else config
        if tokenizer is None:
            tokenizer = build_tokenizer(_SEED_TEXT, vocab_size=min(config.llm.vocab_size, 512))
        torch.manual_seed(seed)
        model = JanusFlow(config)
        processor = JanusFlowProcessor.for_config(tokenizer, config)
        return cls(model.eval(), processor)

    @classmethod
    def from_components(cls, **kwargs) -> "JanusFlowPipeline":
        return cls(*checkpoint.from_components(**kwargs))

    def save_pretrained(self, path: str | Path) -> Path:
        return checkpoint.save_pretrained(self.model, self.processor, path)

    def to(self, device=None, dtype=None) -> "JanusFlowPipeline":
        self.model.to(device=device, dtype=dtype)
        return self

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, num_inference_steps: int = 30,
                 guidance_scale: float = 2.0, seed: int | list[int] = 0,
                 output_type: str = "pil", use_cache: bool = True, progress: bool = False):
        """Text to image. One image per prompt; `seed` is a base (row i gets seed + i) or a list.

        output_type: "pil" (list of images), "pt" ((B, 3, H, W) in [-1, 1]) or "latent".
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or list of non-empty strings")
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
        batch = self.processor.encode_prompts(prompts)
        z = sample_latents(self.model, self.processor, batch, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, seeds=seeds, use_cache=use_cache,
                           progress=progress)
        if output_type == "latent":
            return z
        images = self.model.decode_latents(z).float()
        if output_type == "pt":
            return images
        return [tensor_to_pil(x) for x in images]

    # -- understanding ------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, image: Image.Image | list[Image.Image], question: str | list[str], *,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
               seed: int = 0) -> str | list[str]:
        """Answer a question about an image (or lists of both); greedy unless temperature > 0."""
        single = isinstance(question, str)
        images = [image] if single else list(image)
        questions = [question] if single else list(question)
        batch = self.processor.encode_understanding(images, questions)
        ids = generate_text(self.model, self.processor, batch, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed)
        texts = [self.processor.decode(row) for row in ids]
        return texts[0] if single else texts
