"""Training throughput per stage: tokens/s, images/s and, on a GPU, model FLOPs utilisation.

    python benchmarks/train_throughput.py --preset shapes                          # CPU, fp32
    python benchmarks/train_throughput.py --preset janusflow-1.3b --stages 2 --device cuda \\
        --dtype bf16 --rows 4 --max-len 4096 --activation-checkpointing

Runs the real Trainer (packed batches, all three losses, AdamW, EMA) on a small synthetic shapes
corpus rendered at the preset's image size, with random weights (speed does not depend on them).
FLOPs are counted once per stage with torch.utils.flop_counter on a full training step (matmuls,
convolutions and attention, forward and backward, as executed), then steps are timed without it.
MFU = counted FLOPs per second / the device's dense bf16 peak. Writes JSON and a markdown table.
`--attention flex` (CUDA only) runs the LLM's attention under FlexAttention with a block mask that
skips the blocks between packed samples; its FLOPs are what FlopCounterMode attributes to it, so
compare the two modes by s/step. `--attention segments` runs SDPA once per block of whole samples
(`models/attention.py`, the CPU's way to skip those blocks); its FLOPs are counted as executed too.
`--attention-ab sdpa,segments` and `--dtype-ab fp32,bf16` time two variants against each other in
one process, switched every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from common import profile_table
from data.shapes.corpus import ShapesParams, build_shapes_corpus
from flows.train.config import TrainConfig
from flows.train.trainer import Trainer
from models.config import preset as preset_config
from models.precision import DTYPES
from models.pipeline import JanusFlowPipeline

# Dense bf16 peak (FLOP/s) of the GPUs we expect; MFU is not reported for unknown devices.
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def make_world(root: Path, preset: str) -> tuple[Path, Path]:
    """A small synthetic corpus at the preset's image size and a random-weights init model."""
    config = preset_config(preset)
    corpus = root / "corpus"
    build_shapes_corpus(corpus, ShapesParams(
        image_size=config.gen.image_size, train_gen=96, train_und=96, train_text=48, heldout_gen=2,
        heldout_und=2, unseen_gen=2, unseen_und=2, eval_per_category=1,
        vocab_size=min(2048, config.llm.vocab_size)), progress=False)
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    JanusFlowPipeline.from_config(config, tokenizer=tok, seed=0).save_pretrained(root / "init")
    return corpus, root / "init"


def bench_stage(stage: str, *, corpus: Path, init: Path, out: Path, args) -> dict:
    cfg = TrainConfig(stage=stage, init=str(init), corpus=str(corpus), out=str(out),
                      steps=args.warmup + args.steps + 1, rows=args.rows, max_len=args.max_len,
                      save_every=10**6, device=args.device, dtype=args.dtype,
                      activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                      attention=args.attention, sample_prompts=0, sample_questions=0,
                      latent_cache=str(out.parent / "latent-cache") if args.latent_cache else None,
                      tracking_uri=f"sqlite:///{out.parent}/mlflow.db").validate()
    trainer = Trainer(cfg, progress=False)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step()
        trainer.step += 1
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step()
    trainer.step += 1
    flops_per_step = counter.get_total_flops()
    rows, times = [], []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        rows.append(trainer.train_step())
        sync()
        times.append(time.perf_counter() - start)
        trainer.step += 1
    seconds = sum(times) / len(times)
    ab = attention_ab(trainer, args) if args.attention_ab else None
    dtypes = dtype_ab(trainer, args) if args.dtype_ab else None
    if args.profile:
        profile = profile_table(trainer.train_step, args.device)
        trainer.step += 1
    name = device_name(args.device)
    peak = peak_flops(name) if args.device.startswith("cuda") else None
    result = {
        "stage": stage, "seconds_per_step": seconds,
        "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "packing_efficiency": sum(r["packing_efficiency"] for r in rows) / len(rows),
        "tflops_per_step": flops_per_step / 1e12,
        "achieved_tflops": flops_per_step / seconds / 1e12,
        "mfu": (flops_per_step / seconds / peak) if peak else None,
    }
    if ab:
        result["attention_ab"] = ab
    if dtypes:
        result["dtype_ab"] = dtypes
    if args.profile:
        result["profile"] = profile
    if args.device.startswith("cuda"):
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return result


def alternate(trainer: Trainer, steps: int, variants: dict) -> dict:
    """Median s/step of each variant (name -> a function that switches the trainer to it), switched
    every step in this one process (alternating order), so the machine's drift reaches all alike."""
    chosen = list(variants)
    times: dict[str, list[float]] = {a: [] for a in chosen}
    for i in range(steps):
        for a in chosen if i % 2 == 0 else chosen[::-1]:
            variants[a]()
            start = time.perf_counter()
            trainer.train_step()
            times[a].append(time.perf_counter() - start)
            trainer.step += 1
    return {a: statistics.median(t) for a, t in times.items()}


def attention_ab(trainer: Trainer, args) -> dict:
    """`--attention-ab`: the LLM attention implementations against each other."""
    from models import attention as packed_attention

    names = {"sdpa": "sdpa", "segments": packed_attention.register()}
    llm = trainer.model.llm
    result = alternate(trainer, args.steps, {a: (lambda n=names[a]: llm.set_attn_implementation(n))
                                             for a in args.attention_ab.split(",")})
    llm.set_attn_implementation(names[args.attention])
    return result


def dtype_ab(trainer: Trainer, args) -> dict:
    """`--dtype-ab`: fp32 against bf16 autocast (one process: the objective is the trainer's own)."""
    objective, kept = trainer.objective, trainer.objective.autocast_dtype
    casts = {"fp32": None, "bf16": torch.bfloat16}
    result = alternate(trainer, args.steps, {d: (lambda c=casts[d]: setattr(objective, "autocast_dtype", c))
                                             for d in args.dtype_ab.split(",")})
    objective.autocast_dtype = kept
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES,
                        help="autocast dtype (auto: bf16 on a GPU or a CPU with AMX or AVX512-BF16, else fp32)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flex", "segments"],
                        help="the LLM's attention over packed rows (flex: CUDA only; segments: SDPA "
                             "per block of whole samples)")
    parser.add_argument("--attention-ab", default="", metavar="A,B",
                        help="also time these implementations (of sdpa, segments) against each other, "
                             "switched every step, --steps each (CPU or GPU)")
    parser.add_argument("--dtype-ab", default="", metavar="A,B",
                        help="also time fp32 and bf16 autocast against each other, switched every step")
    parser.add_argument("--latent-cache", action="store_true",
                        help="read the frozen VAE's latents and SigLIP's REPA targets from a latent cache "
                             "filled before the timed steps (TrainConfig.latent_cache)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per stage (torch.profiler, top operators)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    bad = [a for a in args.attention_ab.split(",") if args.attention_ab and a not in ("sdpa", "segments")]
    if bad or args.attention_ab and args.attention == "flex":
        parser.error(f"--attention-ab takes sdpa and/or segments with --attention sdpa or segments, got "
                     f"{args.attention_ab!r} with --attention {args.attention}")
    if args.dtype_ab and not set(args.dtype_ab.split(",")) <= {"fp32", "bf16"}:
        parser.error(f"--dtype-ab takes fp32 and/or bf16, got {args.dtype_ab!r}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus, init = make_world(root, args.preset)
        results = [bench_stage(s, corpus=corpus, init=init, out=root / f"stage{s}", args=args)
                   for s in args.stages.split(",")]
    from models.precision import resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device)
    dtype = dtype if args.dtype == dtype else f"{args.dtype} ({dtype})"
    report = {"date": datetime.date.today().isoformat(), "device": device_name(args.device),
              "preset": args.preset, "dtype": dtype, "rows": args.rows, "max_len": args.max_len,
              "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
              "attention": args.attention, "latent_cache": args.latent_cache, "stages": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput_{args.preset}_{args.device.split(':')[0]}_{args.dtype}" + \
        ("" if args.attention == "sdpa" else f"_{args.attention}") + ("_cache" if args.latent_cache else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = ["| date | device | preset | dtype | stage | rows x max_len | tokens/s | images/s | "
             "s/step | TFLOP/step | achieved TFLOP/s | MFU |", "|" + " --- |" * 12]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        lines.append(f"| {report['date']} | {report['device']} | {args.preset} | {dtype} | "
                     f"{r['stage']} | {args.rows} x {args.max_len} | {r['tokens_per_s']:.0f} | "
                     f"{r['images_per_s']:.1f} | {r['seconds_per_step']:.3f} | "
                     f"{r['tflops_per_step']:.3f} | {r['achieved_tflops']:.3f} | {mfu} |")
    lines += [f"\nStage {r['stage']}, attention switched every step (median s/step): " +
              ", ".join(f"{a} {t:.3f}" for a, t in r["attention_ab"].items()) for r in results if "attention_ab" in r]
    lines += [f"\nStage {r['stage']}, autocast switched every step (median s/step): " +
              ", ".join(f"{a} {t:.3f}" for a, t in r["dtype_ab"].items()) for r in results if "dtype_ab" in r]
    lines += [f"\nProfile of one stage-{r['stage']} step:\n\n{r['profile']}" for r in results if "profile" in r]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
