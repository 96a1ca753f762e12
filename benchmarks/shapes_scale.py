"""How far the shapes world's recipe gets with more training: the demo's configs (configs/shapes) at
`--scale` times their steps, scored after each stage-2 chunk and after stage 3.

    python benchmarks/shapes_scale.py --device cuda --dtype bf16 --scale 10 --points 1,3,10   # a GPU
    python benchmarks/shapes_scale.py --scale 0.02 --points 0.01,0.02 --images-per-prompt 1 \
        --max-questions 16 --prompt-gain 0                                     # CPU smoke, ~7 min

The demo's gates (GenEval-shapes >= 0.6, held-out VQA >= 0.8) are out of reach of the 2-core CPU
budget (docs/experiments.md: GenEval-shapes climbs ~0.03 per 1000 stage-2 steps past the first
2000, so the 0.6 gate lies near 14,000); this measures whether the recipe reaches them with 10x the
steps. `--set STAGE:KEY=VALUE` changes one stage's config before the scaling (any `janusflow train
--set`, e.g. `--set 'stage2:data.mix={und: 25, gen: 70, text: 5}'`: the shapes stage 2 is
understanding-heavy for the CPU's 1600 steps, while the paper's is generation-heavy). Bootstrap,
stage 1 and stage 3 run at `--scale` times their configured steps (the bootstrap at
`--bootstrap-scale`, default the same). Stage 2 runs in chunks ending at `--points` multiples of its
configured steps (1,3,10: 1600, 4800 and 16,000 steps; `--scale` does not apply to it); each chunk
starts from the previous chunk's EMA model, so its LR warm-up and EMA restart, as the continued
runs of docs/experiments.md did. After each chunk and after stage 3, `evaluate` (what `janusflow
eval` runs) scores the model with params.yaml's `eval:` settings on the chosen device.

Writes OUT/shapes_scale.json and .md after every evaluation, so a run stopped by `--budget-s` (no
new chunk starts past it) or by a time limit keeps what it measured. Tracking goes to a sqlite file
under OUT unless MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
KEPT = ("geneval_overall", "geneval_single_object", "geneval_two_object", "geneval_counting",
        "geneval_colors", "geneval_position", "geneval_color_attr", "vqa_accuracy",
        "vqa_unseen_accuracy", "vqa_shape_of", "prompt_gain", "fd_fenc")


STAGES = ("bootstrap", "stage1", "stage2", "stage3")


def stage_config(name: str, sets: Sequence[str] = (), **overrides) -> dict:
    """configs/shapes/NAME.yaml for one in-process run: a config's `procs` (the CPU demo's local
    processes) becomes that many times the rows, the same global batch in this one process. `sets`
    are `STAGE:KEY=VALUE` strings; those for NAME apply last, as `janusflow train --set` does."""
    from flows.train.config import TrainConfig, apply_set

    config = yaml.safe_load((ROOT / "configs" / "shapes" / f"{name}.yaml").read_text())
    procs = config.pop("procs", 1)
    if name != "bootstrap":
        config["rows"] = config.get("rows", TrainConfig.rows) * procs
    config.update(overrides)
    for item in sets:
        stage, _, assignment = item.partition(":")
        if stage not in STAGES:
            raise ValueError(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of {', '.join(STAGES)}")
        if stage == name:
            apply_set(config, assignment)
    return config


def scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def scale_bootstrap(part: dict, scale: float) -> None:
    """The bootstrap section's step counts at `scale`, in place; the VAE's crop steps keep their share
    of its steps (unscaled, the 1000 of the shapes config outnumber a small run's VAE steps)."""
    for key in ("vae_steps", "siglip_steps", "llm_steps"):
        part[key] = scaled(part[key], scale)
    if part.get("vae_crop_steps"):
        part["vae_crop_steps"] = min(part["vae_steps"], round(part["vae_crop_steps"] * scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--scale", type=float, default=10.0, help="steps of bootstrap, stages 1 and 3 (x config)")
    parser.add_argument("--bootstrap-scale", type=float, default=None, help="default: --scale")
    parser.add_argument("--points", default="1,3,10",
                        help="stage-2 totals at which to evaluate, as multiples of configs/shapes/stage2.yaml's steps")
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (default: the configs')")
    parser.add_argument("--corpus", default=None, help="an existing shapes corpus (default: build one under OUT)")
    parser.add_argument("--images-per-prompt", type=int, default=None)
    parser.add_argument("--max-questions", type=int, default=None)
    parser.add_argument("--prompt-gain", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no training chunk after this (0: none)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="change one stage's config, e.g. stage2:data.mix.gen=70 (repeatable)")
    parser.add_argument("--out", default="benchmarks/results/shapes_scale")
    args = parser.parse_args()
    try:
        points = sorted({float(p) for p in args.points.split(",")})
    except ValueError:
        points = []
    if not points or points[0] <= 0:
        raise SystemExit("--points: positive multiples of the stage-2 steps, e.g. 1,3,10")
    try:  # a bad --set fails here, before the corpus or any training
        for name in STAGES:
            stage_config(name, args.sets)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    if not sys.stderr.isatty():  # a log file (or the device tool's output tail) gets no progress bars
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from flows.cli_eval import eval_config
    from flows.evaluate.evaluate import evaluate
    from flows.train.bootstrap import Bootstrap
    from flows.train.config import TrainConfig
    from flows.train.trainer import Trainer

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    start = time.perf_counter()
    corpus = Path(args.corpus).resolve() if args.corpus else out / "corpus"
    if not (corpus / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "flows.cli", "data", "shapes", "--out", str(corpus),
                        "--params", str(ROOT / "params.yaml"), "--quiet"], check=True, cwd=ROOT)
    common = dict(corpus=str(corpus), device=args.device, dtype=args.dtype, sample_prompts=0,
                  sample_questions=0, **({"rows": args.rows} if args.rows else {}))
    ev = eval_config(str(ROOT / "params.yaml"), corpus=str(corpus), device=args.device, dtype=args.dtype,
                     images_per_prompt=args.images_per_prompt, max_questions=args.max_questions,
                     prompt_gain=args.prompt_gain)
    result = {"benchmark": "shapes_scale", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "dtype": args.dtype,
              "scale": args.scale, "sets": args.sets, "points": [],
              "eval": {"images_per_prompt": ev.images_per_prompt, "max_questions": ev.max_questions}}
    ev.validate()  # a device or dtype it cannot use fails here, before any training

    def train(name: str, config: dict) -> Path:
        cfg = TrainConfig.from_dict(config).validate()
        t0 = time.perf_counter()
        if cfg.stage == "bootstrap":
            model = Bootstrap(cfg, progress=sys.stderr.isatty()).run()
        else:
            model = Trainer(cfg, progress=sys.stderr.isatty()).run()
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        return model

    def score(label: str, stage: str, steps: int, model: Path) -> None:
        t0 = time.perf_counter()
        metrics = evaluate(model, ev, report_dir=out / "eval" / label)
        row = {"label": label, "stage": stage, "steps": steps, "eval_s": round(time.perf_counter() - t0, 1),
               "elapsed_s": round(time.perf_counter() - start, 1)}
        row.update({k: round(float(metrics[k]), 4) for k in KEPT if k in metrics})
        result["points"].append(row)
        write_result(out, "shapes_scale", result, markdown(result))
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "label"), flush=True)

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - start > args.budget_s

    b_scale = args.scale if args.bootstrap_scale is None else args.bootstrap_scale
    boot = stage_config("bootstrap", args.sets, out=str(out / "bootstrap"), **common)
    scale_bootstrap(boot["bootstrap"], b_scale)
    model = train("bootstrap", boot)
    s1 = stage_config("stage1", args.sets, **common)
    model = train("stage 1", {**s1, "init": str(model), "out": str(out / "stage1"),
                              "steps": scaled(s1["steps"], args.scale)})
    base = stage_config("stage2", args.sets, **common)
    done = 0
    for p in points:
        if over_budget():
            print(f"budget of {args.budget_s:.0f} s spent: no stage-2 chunk to {p}x", flush=True)
            break
        target = scaled(base["steps"], p)
        model = train(f"stage 2 to {target}", {**base, "init": str(model), "out": str(out / f"stage2-{target}"),
                                                "steps": target - done})
        done = target
        score(f"stage2-{target}", "2", target, model)
    s3 = stage_config("stage3", args.sets, **common)
    if not over_budget():
        steps3 = scaled(s3["steps"], args.scale)
        model = train("stage 3", {**s3, "init": str(model), "out": str(out / "stage3"), "steps": steps3})
        score("stage3", "3", steps3, model)
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out / 'shapes_scale.json'}")


def markdown(r: dict) -> str:
    sets = "".join(f"; --set {item}" for item in r.get("sets", []))
    head = (f"Shapes recipe at {r['scale']}x, {r['device']}, {r['dtype']}, {r['date']} (eval: "
            f"{r['eval']['images_per_prompt']} images per prompt{sets})\n\n"
            "| model | steps | GenEval-shapes | held-out VQA | unseen VQA | shape questions | prompt_gain | elapsed s |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [f"| {p['label']} | {p['steps']} | {p.get('geneval_overall', '-')} | {p.get('vqa_accuracy', '-')} | "
            f"{p.get('vqa_unseen_accuracy', '-')} | {p.get('vqa_shape_of', '-')} | {p.get('prompt_gain', '-')} | "
            f"{p['elapsed_s']} |" for p in r["points"]]
    return "\n".join([head, *rows])


if __name__ == "__main__":
    main()
