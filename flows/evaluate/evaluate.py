"""`janusflow eval`: every score of a saved model, as one metrics.json and a markdown report.

- geneval_*: GenEval-style generation accuracy (flows/evaluate/geneval.py) with a pluggable
  detector, on the corpus' eval/geneval.jsonl (and geneval_unseen.jsonl: unseen colour-shape pairs);
- vqa_accuracy / vqa_unseen_accuracy: exact match on the held-out and unseen understanding splits;
- fd_fenc: Frechet distance between generated and real images in the understanding encoder's
  feature space (mean-pooled f_enc tokens);
- clip_score: mean SigLIP image-text cosine similarity of generated images and their prompts
  (needs a whole SiglipModel directory: the bootstrap writes one; production passes SigLIP's own);
- prompt_gain (+ per t) and vqa_<kind>: diagnostics (flows/evaluate/diagnostics.py).
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from data.sequences import conversation_turns, decode_image
from data.shapes.text import question_kind
from data.shards import ShardReader
from flows.evaluate.diagnostics import prompt_gain, vqa_by_type
from flows.evaluate.geneval import judge, summarise, with_exact_counts
from models.pipeline import JanusFlowPipeline
from models.precision import DTYPES, resolve_dtype
from models.processor import pil_to_tensor
from models.tokenizer import IMAGE


@dataclass
class EvalConfig:
    """What `janusflow eval` runs; `params.yaml: eval` holds the pipeline's values."""

    corpus: str = "data/corpora/shapes"
    images_per_prompt: int = 4
    steps: int = 30
    guidance: float = 3.0
    seed: int = 0
    batch: int = 64
    detector: str = "shapes"     # or "package.module:function" (image -> detections)
    clip: str | None = None      # SiglipModel directory for clip_score
    max_questions: int = 0       # 0: every held-out question
    prompt_gain: int = 128       # held-out generation pairs for prompt_gain (0: skip it)
    device: str = "cpu"          # where the model runs: cpu, cuda, cuda:N
    dtype: str = "fp32"          # the model's weights and activations: fp32, bf16, or auto (bf16 on a
                                 # GPU or a CPU with AMX or AVX512-BF16, where it is the faster one; models/precision.py)

    def validate(self) -> "EvalConfig":
        if self.images_per_prompt < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError("eval.images_per_prompt, eval.steps and eval.batch must be >= 1")
        if self.prompt_gain < 0:
            raise ValueError(f"eval.prompt_gain must be >= 0, got {self.prompt_gain}")
        if self.guidance < 1.0:
            raise ValueError(f"eval.guidance must be >= 1, got {self.guidance}")
        if self.dtype not in DTYPES:
            raise ValueError(f"eval.dtype must be fp32, bf16 or auto, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"eval.device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"eval.device must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"eval.device is {self.device!r} but this machine has no CUDA device")
        if not (Path(self.corpus) / "eval").is_dir():
            raise FileNotFoundError(f"eval.corpus: {self.corpus} has no eval/ folder of GenEval prompts")
        return self


def load_detector(name: str) -> Callable:
    """'shapes' (the world's analytic detector) or 'package.module:function'."""
    if name == "shapes":
        from data.shapes.detect import detect

        return detect
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"eval.detector must be 'shapes' or 'package.module:function', got {name!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"eval.detector {name!r} cannot be loaded: {exc}") from None


def read_metadata(path: Path) -> list[dict]:
    """GenEval metadata lines; a line that is not a valid record is an error naming the line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item.get("prompt"), str) or not isinstance(item.get("include"), list):
                raise ValueError("needs 'prompt' and 'include'")
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not a GenEval metadata record ({exc})") from None
        out.append(item)
    return out


def generate(pipe: JanusFlowPipeline, prompts: list[str], cfg: EvalConfig, *, desc: str) -> list[Image.Image]:
    """cfg.images_per_prompt images per prompt; image j of prompt i always uses seed + i*1000 + j."""
    jobs = [(p, cfg.seed + i * 1000 + j) for i, p in enumerate(prompts)
            for j in range(cfg.images_per_prompt)]
    images: list[Image.Image] = []
    for k in tqdm(range(0, len(jobs), cfg.batch), desc=desc, unit="batch", leave=False):
        chunk = jobs[k:k + cfg.batch]
        images += pipe([p for p, _ in chunk], num_inference_steps=cfg.steps,
                       guidance_scale=cfg.guidance, seed=[s for _, s in chunk])
    return images


def geneval(pipe, metadata: list[dict], detector, cfg: EvalConfig, *, desc: str):
    """(summary, per-image results, images) over a metadata list."""
    images = generate(pipe, [m["prompt"] for m in metadata], cfg, desc=desc)
    results = []
    for k, image in enumerate(images):
        meta = with_exact_counts(metadata[k // cfg.images_per_prompt])
        correct, reason = judge(meta, detector(image))
        results.append({"prompt": meta["prompt"], "tag": meta.get("tag", "all"),
                        "correct": correct, "reason": reason})
    return summarise(results), results, images


def questions(corpus: str | Path, split: str, limit: int = 0) -> list[tuple[Image.Image, str, str]]:
    """(image, question, answer) of a split's understanding records with a short answer; caption
    turns are left out (exact match says little about a sentence)."""
    try:
        reader = ShardReader(corpus, split, "und")
    except (FileNotFoundError, ValueError):
        return []
    out = []
    for i in range(len(reader)):
        record, data = reader.read(i)
        if data is None or record.get("task") == "caption":
            continue
        image = decode_image(data)
        for user, answer in conversation_turns(record):
            question = user.replace(IMAGE, "").strip()
            if question.startswith("Generate the caption"):
                continue
            out.append((image, question, answer))
            if limit and len(out) >= limit:
                return out
    return out


def vqa(pipe, qa: list[tuple[Image.Image, str, str]], *, batch: int, desc: str) -> tuple[float, list[dict]]:
    rows = []
    for k in tqdm(range(0, len(qa), batch), desc=desc, unit="batch", leave=False):
        chunk = qa[k:k + batch]
        answers = pipe.answer([c[0] for c in chunk], [c[1] for c in chunk], max_new_tokens=8)
        rows += [{"question": q, "expected": a, "answer": got,
                  "correct": got.strip().rstrip(".").lower() == a.lower()}
                 for (_, q, a), got in zip(chunk, answers)]
    return (sum(r["correct"] for r in rows) / len(rows) if rows else 0.0), rows


@torch.no_grad()
def encoder_features(pipe: JanusFlowPipeline, images: list[Image.Image], batch: int = 128) -> np.ndarray:
    """Mean-pooled f_enc (SigLIP vision tower) tokens, (N, D_enc) float64."""
    model, proc = pipe.model, pipe.processor
    feats = []
    for k in range(0, len(images), batch):
        x = torch.stack([proc.preprocess_understanding(im) for im in images[k:k + batch]])
        x = x.to(model.device, next(model.vision.parameters()).dtype)
        feats.append(model.vision(pixel_values=x).last_hidden_state.mean(1).double().cpu())
    return torch.cat(feats).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (N, D)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples make S singular; checked just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the FID code does
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def real_images(corpus: str | Path, split: str = "heldout") -> list[Image.Image]:
    reader = ShardReader(corpus, split, "gen")
    return [decode_image(reader.read(i)[1]) for i in range(len(reader))]


@torch.no_grad()
def clip_score(clip_dir: str | Path, images: list[Image.Image], prompts: list[str], *,
               batch: int = 128, device: str = "cpu") -> float:
    """Mean cosine similarity of SigLIP image and text embeddings (higher: prompts followed)."""
    from transformers import AutoTokenizer, SiglipModel

    from flows.train.siglip_losses import siglip_text_ids

    path = Path(clip_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip: {path} is not a SiglipModel directory (no config.json)")
    model = SiglipModel.from_pretrained(str(path)).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    size = model.config.vision_config.image_size
    text_config = model.config.text_config
    sims = []
    for k in range(0, len(images), batch):
        pixels = torch.stack([pil_to_tensor(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                              for im in images[k:k + batch]])
        ids = siglip_text_ids(tokenizer, prompts[k:k + batch], text_config.max_position_embeddings,
                              eos_id=text_config.eos_token_id, pad_id=text_config.pad_token_id)
        out = model(input_ids=ids.to(device), pixel_values=pixels.to(device))
        sims.append(torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).double())
    return float(torch.cat(sims).mean())


def evaluate(model_dir: str | Path, cfg: EvalConfig, *, report_dir: str | Path | None = None) -> dict:
    """Every score of the model in model_dir; writes the report (markdown + sample grid) when
    report_dir is given. Returns the metrics dict (what metrics.json holds)."""
    from flows.evaluate.report import write_report

    cfg.validate()
    detector = load_detector(cfg.detector)
    bf16 = resolve_dtype(cfg.dtype, cfg.device) == "bf16"
    pipe = JanusFlowPipeline.from_pretrained(model_dir, device=cfg.device,
                                             dtype=torch.bfloat16 if bf16 else None)
    eval_dir = Path(cfg.corpus) / "eval"
    metrics: dict = {}
    details: dict = {}
    main = read_metadata(eval_dir / "geneval.jsonl")
    summary, results, images = geneval(pipe, main, detector, cfg, desc="geneval")
    metrics["geneval_overall"] = summary["overall"]
    metrics.update({f"geneval_{k}": v for k, v in summary["per_category"].items()})
    details["geneval"] = results
    if (eval_dir / "geneval_unseen.jsonl").is_file():
        unseen = read_metadata(eval_dir / "geneval_unseen.jsonl")
        s_unseen, details["geneval_unseen"], _ = geneval(pipe, unseen, detector, cfg, desc="geneval unseen")
        metrics["geneval_unseen_overall"] = s_unseen["overall"]
    for split, key in (("heldout", "vqa_accuracy"), ("unseen", "vqa_unseen_accuracy")):
        qa = questions(cfg.corpus, split, cfg.max_questions)
        if qa:
            metrics[key], details[key] = vqa(pipe, qa, batch=cfg.batch, desc=f"vqa {split}")
    if "vqa_accuracy" in details:
        metrics.update(vqa_by_type(details["vqa_accuracy"], question_kind))
    if cfg.prompt_gain:
        try:
            metrics.update(prompt_gain(pipe, cfg.corpus, samples=cfg.prompt_gain, seed=cfg.seed,
                                       batch=cfg.batch))
        except (FileNotFoundError, ValueError) as exc:  # a corpus without held-out pairs
            tqdm.write(f"prompt_gain skipped: {exc}")
    metrics["fd_fenc"] = frechet_distance(encoder_features(pipe, images),
                                          encoder_features(pipe, real_images(cfg.corpus)))
    prompts = [m["prompt"] for m in main for _ in range(cfg.images_per_prompt)]
    if cfg.clip:
        metrics["clip_score"] = clip_score(cfg.clip, images, prompts, device=cfg.device)
    metrics["images"] = len(images)
    if report_dir is not None:
        write_report(Path(report_dir), metrics=metrics, details=details, images=images,
                     prompts=prompts, per_category=summary["per_category"])
    return metrics
