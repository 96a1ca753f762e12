"""What a stage can show while it trains: a grid of generated images for evaluation prompts and a few
answers to held-out questions, written as files (and MLflow artifacts by the trainer).

This is a look, not the evaluation: `janusflow eval` scores GenEval-style with a detector. The
answer accuracy here is exact match on a handful of questions.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from models.pipeline import JanusFlowPipeline


def eval_prompts(corpus: str | Path, n: int) -> list[str]:
    """Up to n prompts from eval/geneval.jsonl, round-robin over its categories."""
    path = Path(corpus) / "eval" / "geneval.jsonl"
    if not path.is_file() or n <= 0:
        return []
    by_tag: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            by_tag.setdefault(item.get("tag", ""), []).append(item["prompt"])
    prompts, i = [], 0
    while len(prompts) < n and any(i < len(v) for v in by_tag.values()):
        prompts += [v[i] for v in by_tag.values() if i < len(v)]
        i += 1
    return prompts[:n]


def heldout_questions(corpus: str | Path, n: int) -> list[tuple[Image.Image, str, str]]:
    """Up to n (image, question, answer) triples from the held-out understanding split."""
    from flows.evaluate.evaluate import questions

    return questions(corpus, "heldout", n) if n > 0 else []


def grid(images: list[Image.Image], labels: list[str], *, columns: int = 4, scale: int = 2) -> Image.Image:
    """Images in a labelled grid, upscaled `scale` times (nearest) so small worlds stay visible."""
    w, h = images[0].size
    cw, ch = w * scale, h * scale + 14
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (image, label) in enumerate(zip(images, labels)):
        x, y = (k % columns) * cw, (k // columns) * ch
        canvas.paste(image.resize((cw, h * scale), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + h * scale + 1), label[: cw // 6], fill=(0, 0, 0))
    return canvas


def write_samples(pipe: JanusFlowPipeline, corpus: str | Path, out: Path, *, prompts: int = 8,
                  questions: int = 16, steps: int = 20, guidance: float = 3.0, seed: int = 0) -> dict:
    """samples.png + answers.json under `out`; returns {"sample_vqa_accuracy": ...} (if any)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}
    texts = eval_prompts(corpus, prompts)
    if texts:
        images = pipe(texts, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
        grid(images, texts).save(out / "samples.png")
    qa = heldout_questions(corpus, questions)
    if qa:
        answers = pipe.answer([q[0] for q in qa], [q[1] for q in qa], max_new_tokens=16)
        rows = [{"question": q, "expected": a, "answer": got, "correct": got.strip().lower() == a.lower()}
                for (_, q, a), got in zip(qa, answers)]
        (out / "answers.json").write_text(json.dumps(rows, indent=2))
        metrics["sample_vqa_accuracy"] = sum(r["correct"] for r in rows) / len(rows)
    return metrics
