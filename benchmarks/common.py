"""What the benchmark scripts share: the sampler benchmarks' prompts and arguments, and how every
benchmark writes its result (JSON + a markdown table under benchmarks/results/). The scripts run as
`python benchmarks/NAME.py`, so they import this as the sibling module `common`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# A long-ish prompt, as real text-to-image prompts are; cut shorter per row, so prompts differ in
# length within the batch (19-30 tokens with the shapes tokenizer).
BASE_PROMPT = ("a detailed photograph of a small red circle to the left of a large blue square, "
               "with a green triangle above them on a light grey background, soft shadows")


def batch_prompts(batch: int) -> list[str]:
    return [BASE_PROMPT[: len(BASE_PROMPT) - 7 * i] for i in range(batch)]


def sampler_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> argparse.ArgumentParser:
    """The arguments of the sampler benchmarks: what is compared is the same in each."""
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def write_result(out: str | Path, stem: str, result: dict, table: str) -> None:
    """OUT/STEM.json and OUT/STEM.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
