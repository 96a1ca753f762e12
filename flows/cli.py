"""`janusflow`: one command line for the whole project.

User mistakes (bad preset, missing directory, a checkpoint that does not fit) print one line
`janusflow: error: ...` and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Tell libraries we are offline before they import.
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_summary(preset_name: str) -> dict:
    """Parameter counts per component, built on the meta device (costs no memory)."""
    import torch

    from models.config import preset
    from models.janusflow import JanusFlow

    config = preset(preset_name)
    with torch.device("meta"):
        model = JanusFlow(config)
    counts = model.component_parameters()
    return {"preset": preset_name, "parameters": counts, "total": sum(counts.values()),
            "gen_tokens": config.num_gen_tokens, "und_tokens": config.num_und_tokens,
            "latent": [config.vae.latent_channels, config.latent_size, config.latent_size]}


def _print_summary(summary: dict) -> None:
    print(f"preset {summary['preset']}: {summary['total'] / 1e6:,.2f}M parameters")
    for name, n in summary["parameters"].items():
        print(f"  {name:<13} {n / 1e6:>10,.2f}M")
    c, h, w = summary["latent"]
    print(f"  latent {c}x{h}x{w}, {summary['gen_tokens']} generation tokens, "
          f"{summary['und_tokens']} understanding tokens")


def cmd_model(args) -> None:
    if args.action == "summary":
        summary = model_summary(args.preset)
        print(json.dumps(summary, indent=2)) if args.json else _print_summary(summary)
    elif args.action == "init":
        from models.pipeline import JanusFlowPipeline

        pipe = JanusFlowPipeline.from_config(args.preset, seed=args.seed)
        print(f"wrote {pipe.save_pretrained(args.out)} (random weights, preset {args.preset})")


def cmd_convert(args) -> None:
    from models.checkpoint import save_pretrained
    from models.official import load_official

    model, processor, dropped = load_official(args.from_official, vae_dir=args.vae)
    save_pretrained(model, processor, args.out)
    print(f"converted {args.from_official} -> {args.out}; dropped {len(dropped)} unused tensor(s) "
          f"of the SigLIP attention-pooling head; REPA head initialised fresh")


def cmd_demo(args) -> None:
    from flows.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    from flows.cli_data import add_data_commands
    from flows.cli_eval import add_eval_commands
    from flows.cli_registry import add_registry_commands
    from flows.cli_serve import add_serve_commands
    from flows.cli_train import add_train_command
    from models.config import PRESETS

    parser = argparse.ArgumentParser(prog="janusflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect or create models")
    model_sub = model.add_subparsers(dest="action", required=True)
    summary = model_sub.add_parser("summary", help="parameter counts per component")
    summary.add_argument("--preset", required=True, choices=list(PRESETS))
    summary.add_argument("--json", action="store_true", help="print JSON")
    init = model_sub.add_parser("init", help="write a randomly initialised model directory")
    init.add_argument("--preset", required=True, choices=list(PRESETS))
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    model.set_defaults(func=cmd_model)

    convert = sub.add_parser("convert", help="import a checkpoint of the official release")
    convert.add_argument("--from-official", required=True, metavar="SRC",
                         help="directory with the release's config.json, weights and tokenizer")
    convert.add_argument("--vae", required=True, metavar="DIR",
                         help="diffusers AutoencoderKL directory (SDXL-VAE for the release)")
    convert.add_argument("--out", required=True, metavar="DST")
    convert.set_defaults(func=cmd_convert)

    add_data_commands(sub)
    add_train_command(sub)
    add_eval_commands(sub)
    add_registry_commands(sub)
    add_serve_commands(sub)

    demo = sub.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"janusflow: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
