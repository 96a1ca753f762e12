"""`janusflow data ...`: build, import, inspect and pre-encode corpora."""

from __future__ import annotations

import json
from pathlib import Path


def read_params(path: str | Path | None, section: str) -> dict:
    """One section of a params.yaml (empty when no file is given)."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--params {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    value = data.get(section, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: section '{section}' must be a mapping")
    return value


def _stats_for(corpus: Path, *, preset_name: str, tokenizer: str | None, max_len: int | None) -> dict:
    from data.stats import corpus_stats
    from models.config import preset
    from models.processor import JanusFlowProcessor

    config = preset(preset_name)
    tok_dir = Path(tokenizer) if tokenizer else corpus / "tokenizer"
    if not tok_dir.is_dir():
        return corpus_stats(corpus)
    processor = JanusFlowProcessor.from_pretrained(tok_dir, config, check_vocab=False)
    return corpus_stats(corpus, processor=processor, num_gen_tokens=config.num_gen_tokens,
                        gen_image_size=config.gen.image_size,
                        max_len=max_len or config.llm.max_position_embeddings)


def cmd_shapes(args) -> None:
    from data.shapes.corpus import ShapesParams, build_shapes_corpus
    from data.stats import write_stats

    values = read_params(args.params, "data")
    if args.seed is not None:
        values["seed"] = args.seed
    params = ShapesParams.from_dict(values)
    out = Path(args.out)
    manifest = build_shapes_corpus(out, params, progress=not args.quiet)
    max_len = read_params(args.params, "pack").get("max_len")
    stats = _stats_for(out, preset_name="shapes", tokenizer=None, max_len=max_len)
    write_stats(out, stats)
    counts = manifest["counts"]["train"]
    if args.metrics:
        write_metrics(args.metrics, manifest, stats)
    print(f"wrote {out}: train und {counts['und']} gen {counts['gen']} text {counts['text']}, "
          f"packing {stats['packing']['efficiency_mean']:.2%}; data version {manifest['hash'][:12]}")


def write_metrics(path: str | Path, manifest: dict, stats: dict) -> None:
    """The corpus numbers DVC tracks as metrics: sizes, packing efficiency, data version."""
    metrics = {"data_version": manifest["hash"],
               **{f"{split}_{kind}": n for split, c in manifest["counts"].items()
                  for kind, n in c.items() if split != "eval"},
               **{f"eval_{name}": n for name, n in manifest["counts"].get("eval", {}).items()}}
    if "packing" in stats:
        metrics["packing_efficiency"] = stats["packing"]["efficiency_mean"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def cmd_import(args) -> None:
    from data.importers import import_corpus
    from data.stats import corpus_stats, write_stats

    kinds = tuple(k for k in args.kinds.split(",") if k)
    manifest, report = import_corpus(
        args.source, args.out, fmt=args.format, captions=args.captions, kinds=kinds,
        min_valid_fraction=args.min_valid_fraction, max_pixels=args.max_pixels,
        non_rgb=args.non_rgb, shard_size=args.shard_size, name=args.name, progress=not args.quiet)
    write_stats(args.out, corpus_stats(args.out))
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "none"
    print(f"imported {report.valid} of {report.total} samples into {args.out} "
          f"({', '.join(f'{k} {v}' for k, v in report.written.items())}); skipped: {skipped}; "
          f"data version {manifest['hash'][:12]}")


def cmd_stats(args) -> None:
    from data.stats import write_stats

    stats = _stats_for(Path(args.corpus), preset_name=args.preset, tokenizer=args.tokenizer,
                       max_len=args.max_len)
    write_stats(args.corpus, stats)
    print(json.dumps(stats, indent=2) if args.json else (Path(args.corpus) / "stats.md").read_text())


def cmd_verify(args) -> None:
    from data.shards import verify

    bad = verify(args.corpus)
    if bad:
        raise ValueError(f"{args.corpus}: {len(bad)} file(s) differ from the manifest, first {bad[0]}")
    print(f"{args.corpus}: every file matches its manifest")


def cmd_encode(args) -> None:
    from data.latent_cache import LatentCache, encoder_version, fill
    from models.checkpoint import from_pretrained

    model, _ = from_pretrained(args.model)
    model.eval()
    cache = LatentCache(args.cache, encoder_version(model))
    counts = fill(cache, model, args.corpus, split=args.split, batch_size=args.batch_size,
                  progress=not args.quiet)
    print(f"latent cache {cache.dir}: encoded {counts['encoded']}, already cached "
          f"{counts['cached']}, left to encode lazily {counts['lazy']}")


def add_data_commands(sub) -> None:
    from data.importers import FORMATS
    from data.validate import DEFAULT_MAX_PIXELS, NON_RGB_POLICIES
    from models.config import PRESETS

    data = sub.add_parser("data", help="build, import and inspect corpora")
    data_sub = data.add_subparsers(dest="action", required=True)

    shapes = data_sub.add_parser("shapes", help="generate the embedded shapes-world corpus")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--seed", type=int, default=None, help="overrides data.seed of --params")
    shapes.add_argument("--params", default=None, help="params.yaml with a 'data' section")
    shapes.add_argument("--quiet", action="store_true", help="no progress bars")
    shapes.add_argument("--metrics", default=None, help="also write DVC metrics JSON here")
    shapes.set_defaults(func=cmd_shapes)

    imp = data_sub.add_parser("import", help="import real data into the corpus format")
    imp.add_argument("format", choices=FORMATS)
    imp.add_argument("source", help="image folder, LLaVA JSON file, or .tar / folder of .tar")
    imp.add_argument("--out", required=True)
    imp.add_argument("--captions", default=None, help="folder format: captions JSONL or CSV")
    imp.add_argument("--kinds", default="gen,und", help="captioned data becomes these kinds")
    imp.add_argument("--min-valid-fraction", type=float, default=0.5)
    imp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    imp.add_argument("--non-rgb", choices=NON_RGB_POLICIES, default="convert")
    imp.add_argument("--shard-size", type=int, default=1000)
    imp.add_argument("--name", default=None)
    imp.add_argument("--quiet", action="store_true")
    imp.set_defaults(func=cmd_import)

    stats = data_sub.add_parser("stats", help="(re)compute stats.json and stats.md of a corpus")
    stats.add_argument("corpus")
    stats.add_argument("--preset", default="shapes", choices=list(PRESETS))
    stats.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the corpus')")
    stats.add_argument("--max-len", type=int, default=None)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    ver = data_sub.add_parser("verify", help="check a corpus' files against its manifest")
    ver.add_argument("corpus")
    ver.set_defaults(func=cmd_verify)

    enc = data_sub.add_parser("encode", help="pre-encode generation images into a latent cache")
    enc.add_argument("--corpus", required=True)
    enc.add_argument("--model", required=True, help="model directory whose VAE/SigLIP encode")
    enc.add_argument("--cache", required=True)
    enc.add_argument("--split", default="train")
    enc.add_argument("--batch-size", type=int, default=32)
    enc.add_argument("--quiet", action="store_true")
    enc.set_defaults(func=cmd_encode)
