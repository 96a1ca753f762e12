"""`janusflow eval` and `janusflow gate`: score a saved model, then decide whether it may ship."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def eval_config(params: str | None, **overrides):
    """EvalConfig from params.yaml's `eval:` section (if given), then CLI overrides."""
    import yaml

    from flows.evaluate.evaluate import EvalConfig
    from models.config import dataclass_from_dict

    values = {}
    if params:
        path = Path(params)
        if not path.is_file():
            raise FileNotFoundError(f"--params: {path} does not exist")
        values = dict((yaml.safe_load(path.read_text()) or {}).get("eval") or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return dataclass_from_dict(EvalConfig, values, prefix="eval.", unknown="unknown key(s) in 'eval'")


def cmd_eval(args) -> None:
    from flows.evaluate.evaluate import evaluate
    from flows.evaluate.tracking import log_evaluation

    cfg = eval_config(args.params, corpus=args.corpus, images_per_prompt=args.images_per_prompt,
                      steps=args.steps, guidance=args.guidance, detector=args.detector,
                      clip=args.clip, seed=args.seed, device=args.device, dtype=args.dtype)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model} is not a saved model directory (no config.json)")
    out = Path(args.out)
    report = Path(args.report) if args.report else out.parent / "report"
    metrics = evaluate(model, cfg, report_dir=report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    # per-category accuracy as a DVC plot (`dvc plots show`)
    categories = [{"category": k[len("geneval_"):], "accuracy": v} for k, v in metrics.items()
                  if k.startswith("geneval_") and not k.endswith("overall")]
    (out.parent / "categories.json").write_text(json.dumps(categories, indent=1) + "\n")
    if not args.no_mlflow:
        import os

        from flows.cli_train import PARENT_RUN_ENV

        run_id = log_evaluation(metrics, model=model, report=report, metrics_file=out, cfg=cfg,
                                parent_run_id=args.parent_run or os.environ.get(PARENT_RUN_ENV) or None)
        (out.parent / "mlflow_run.json").write_text(json.dumps({"run_id": run_id}) + "\n")
        print(f"mlflow run {run_id}")
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(json.dumps(shown))
    print(f"wrote {out} and {report / 'report.md'}")


def cmd_gate(args) -> None:
    from flows.evaluate.gate import describe, run_gate

    decision = run_gate(args.metrics, args.params, args.out)
    print(describe(decision))
    if not decision["passed"]:
        sys.exit(1)


def add_eval_commands(sub) -> None:
    ev = sub.add_parser("eval", help="GenEval-style, VQA, Frechet distance and CLIP scores of a model")
    ev.add_argument("--model", required=True, help="saved model directory")
    ev.add_argument("--out", required=True, help="metrics.json to write")
    ev.add_argument("--report", default=None, help="report folder (default: next to --out)")
    ev.add_argument("--params", default=None, help="params.yaml whose `eval:` section to use")
    ev.add_argument("--corpus", default=None)
    ev.add_argument("--images-per-prompt", type=int, default=None)
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--detector", default=None, help="'shapes' or 'package.module:function'")
    ev.add_argument("--clip", default=None, help="SiglipModel directory for clip_score")
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    ev.add_argument("--dtype", default=None, choices=["fp32", "bf16", "auto"],
                    help="fp32 (default), bf16, or auto: bf16 on a GPU or a CPU with AMX or AVX512-BF16")
    ev.add_argument("--parent-run", default=None, help="MLflow parent run id (default: $JANUSFLOW_PARENT_RUN_ID)")
    ev.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    ev.set_defaults(func=cmd_eval)

    gate = sub.add_parser("gate", help="check metrics against params.yaml thresholds (exit 1 on fail)")
    gate.add_argument("--metrics", required=True)
    gate.add_argument("--params", default="params.yaml")
    gate.add_argument("--out", required=True, help="gate.json to write")
    gate.set_defaults(func=cmd_gate)
