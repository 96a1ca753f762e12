"""The evaluation report: report.md (scores, per-category table, a sample grid) beside a
details.json of every judged image and answered question."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from flows.train.samples import grid

GRID_IMAGES = 32


def metrics_table(metrics: dict) -> str:
    rows = ["| metric | value |", "| --- | ---: |"]
    rows += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
             for k, v in metrics.items()]
    return "\n".join(rows)


def category_table(per_category: dict) -> str:
    rows = ["| category | accuracy |", "| --- | ---: |"]
    rows += [f"| {tag} | {acc:.3f} |" for tag, acc in per_category.items()]
    return "\n".join(rows)


def write_report(out: Path, *, metrics: dict, details: dict, images: list[Image.Image],
                 prompts: list[str], per_category: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    step = max(1, len(images) // GRID_IMAGES)
    picked = list(range(0, len(images), step))[:GRID_IMAGES]
    grid([images[i] for i in picked], [prompts[i] for i in picked], columns=8).save(out / "samples.png")
    (out / "details.json").write_text(json.dumps(details, indent=1))
    wrong = [r for r in details.get("geneval", []) if not r["correct"]][:10]
    text = "\n\n".join([
        "# Evaluation report",
        metrics_table(metrics),
        "## GenEval categories\n\n" + category_table(per_category),
        "## Samples\n\n![samples](samples.png)",
        "## Some misses\n\n" + ("\n".join(f"- `{r['prompt']}`: {r['reason']}" for r in wrong) or "none"),
    ])
    (out / "report.md").write_text(text + "\n")
    return out / "report.md"
