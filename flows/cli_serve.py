"""`janusflow export | generate | ask | serve`: shipping and serving a trained model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from serving import BACKENDS


def _buckets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"buckets must be positive, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def cmd_export(args) -> None:
    from serving.export import export_model

    start = time.perf_counter()
    manifest = export_model(args.model, args.out, graphs=args.graphs, engine=args.engine, buckets=args.buckets,
                            precision=args.precision)
    worst = max(e["max_abs_diff"] for e in manifest["graphs"].values())
    print(f"exported {len(manifest['graphs'])} graph(s) to {args.out} in {time.perf_counter() - start:.0f}s; "
          f"onnxruntime vs PyTorch max |diff| {worst:.1e}")
    if args.engine:
        index = manifest["engines"]
        print(f"TensorRT {index['tensorrt']} engines for {index['gpu']} in {Path(args.out) / 'engines'}")


def cmd_generate(args) -> None:
    from serving.load import load_sampler
    from serving.sampler import ImageRequest

    sampler = load_sampler(args.model, backend=args.backend, workers=args.workers, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requests = [ImageRequest(args.prompt, seed=args.seed + i, guidance=args.guidance, steps=args.steps)
                for i in range(args.n)]
    start = time.perf_counter()
    results = sampler.generate(requests)
    written = 0
    for i, r in enumerate(results):
        if r.image is None:
            print(f"image {i}: {r.error}")
            continue
        r.image.save(out / f"{i:03d}.png")
        written += 1
    print(f"wrote {written} image(s) to {out} in {time.perf_counter() - start:.1f}s ({args.backend})")


def cmd_ask(args) -> None:
    from PIL import Image

    from serving.load import load_sampler

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image {args.image}: not a readable image ({exc})") from None
    sampler = load_sampler(args.model, backend=args.backend, workers=args.workers, dtype=args.dtype)
    print(sampler.answer([image], [args.question], max_new_tokens=args.max_new_tokens)[0])


def cmd_serve(args) -> None:
    if args.ray:
        from serving.ray_app import run

        run(args.model, backend=args.backend, buckets=args.buckets, replicas=args.replicas, host=args.host,
            port=args.port, max_wait_ms=args.max_wait_ms, dtype=args.dtype)
        return
    from serving.service import ServiceConfig, serve

    serve(ServiceConfig(model=args.model, backend=args.backend, buckets=args.buckets, workers=args.workers,
                        dtype=args.dtype, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                        timeout_s=args.timeout), host=args.host, port=args.port)


def _served(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--model and --backend, as generate, ask and serve take them."""
    parser.add_argument("--model", required=True, help="model directory, models:/ URI, or an export directory")
    parser.add_argument("--backend", choices=list(BACKENDS), default="torch",
                        help="torch needs weights; onnxruntime/tensorrt an export directory")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="onnxruntime: parallel session sets a batch's rows are split over, one "
                             "thread each by default (2 on a 2-core CPU: 1.1-1.3x the throughput)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="torch backends: the weights' dtype (auto: bf16 on a CPU with AMX or AVX512-BF16)")
    return parser


def add_serve_commands(sub) -> None:
    exp = sub.add_parser("export", help="ONNX graphs (+ TensorRT engines) of a model, parity-checked")
    exp.add_argument("--model", required=True, help="model directory or models:/janusflow@champion")
    exp.add_argument("--out", required=True)
    exp.add_argument("--graphs", nargs="+", default=None, help="subset of graphs (default all)")
    exp.add_argument("--engine", action="store_true", help="also build TensorRT engines (GPU hosts)")
    exp.add_argument("--buckets", type=_buckets, default=(1, 2, 4, 8), help="batch buckets, e.g. 1,2,4,8")
    exp.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    exp.set_defaults(func=cmd_export)

    gen = _served(sub.add_parser("generate", help="text to image with the serving sampler"))
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=2.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    ask = _served(sub.add_parser("ask", help="answer a question about an image"))
    ask.add_argument("--image", required=True)
    ask.add_argument("--question", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.set_defaults(func=cmd_ask)

    serve = _served(sub.add_parser("serve", help="the HTTP inference service (OpenAI-style images + chat)"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--buckets", type=_buckets, default=(1, 2, 4, 8))
    serve.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    serve.add_argument("--queue-size", type=int, default=64, help="queued requests before 429")
    serve.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve (scale-out: one replica per GPU)")
    serve.add_argument("--replicas", type=int, default=None, help="Ray Serve replicas (default: one per GPU, else 1)")
    serve.set_defaults(func=cmd_serve)

