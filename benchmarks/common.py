"""What the benchmark scripts share: the sampler benchmarks' prompts and arguments, and how every
benchmark writes its result (JSON + a markdown table under benchmarks/results/). The scripts run as
`python benchmarks/NAME.py`, so they import this as the sibling module `common`."""

from __future__ import annotations

import argparse
import json
import time
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


def profile_table(fn, device: str, rows: int = 25) -> str:
    """Run fn() once under torch.profiler; the `rows` operators that took the most self time on the
    device (GPU kernel time attributed to the operator that launched it when device is CUDA, else
    CPU time), with their share of the total, as a markdown table. On CUDA the total is the GPU's
    busy time: wall time minus it is time the GPU waited for the host."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # operators only: on CUDA their kernels are listed again as events of their own, and the
    # launch-queue marker "Command Buffer Full" is host waiting, not GPU work
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU
           and not e.key.startswith("Command Buffer Full")]
    ops.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in ops) or 1.0
    lines = ["| operator | calls | self ms | share |", "| --- | --- | --- | --- |"]
    for e in ops[:rows]:
        t = getattr(e, key)
        lines.append(f"| {e.key[:90]} | {e.count} | {t / 1e3:.2f} | {100 * t / total:.1f}% |")
    lines.append(f"| all ({'GPU busy' if cuda else 'CPU'}) | | {total / 1e3:.2f} | |")
    lines.append(f"| wall time under the profiler | | {wall * 1e3:.2f} | |")
    return "\n".join(lines)
