"""Load test of the inference service: N concurrent clients for a fixed time.

    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 8 --seconds 60
    python benchmarks/load.py --model runs/shapes/export --backend onnxruntime --clients 8 --seconds 60

With --model the service is started in this process (serving/service.py, a real uvicorn server on a
free port); with --url an already running `janusflow serve` is used. Each client posts image
requests back to back (and every --chat-every-th request a chat request). Reports requests/s,
images/s, latency percentiles, the batch sizes the server reported, and errors by status; any 5xx
makes the exit code 1. JSON and a markdown table go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures as cf
import datetime
import io
import time

import httpx
import numpy as np
from PIL import Image

from common import write_result


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def client(url: str, until: float, index: int, steps: int, chat_every: int) -> list[dict]:
    out, image_url, k = [], _image_url(), 0
    with httpx.Client(timeout=300) as http:
        while time.monotonic() < until:
            k += 1
            start = time.perf_counter()
            if chat_every and k % chat_every == 0:
                kind = "chat"
                r = http.post(url + "/v1/chat/completions", json={"max_tokens": 8, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "How many objects are there?"},
                    {"type": "image_url", "image_url": {"url": image_url}}]}]})
            else:
                kind = "image"
                r = http.post(url + "/v1/images/generations",
                              json={"prompt": f"a red circle left of a blue square {index}-{k}", "seed": k,
                                    "num_inference_steps": steps, "guidance_scale": 2.0})
            row = {"kind": kind, "status": r.status_code, "seconds": time.perf_counter() - start}
            if kind == "image" and r.status_code == 200:
                row["batch_size"] = r.json()["data"][0]["batch_size"]
            out.append(row)
            if r.status_code == 429:
                time.sleep(float(r.headers.get("retry-after", "1")))
    return out


def run(url: str, args) -> dict:
    until = time.monotonic() + args.seconds
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(args.clients) as pool:
        rows = [r for f in [pool.submit(client, url, until, i, args.steps, args.chat_every)
                            for i in range(args.clients)] for r in f.result()]
    wall = time.perf_counter() - start
    ok = [r for r in rows if r["status"] == 200]
    lat = np.array([r["seconds"] for r in ok]) if ok else np.zeros(1)
    images = [r for r in ok if r["kind"] == "image"]
    return {"clients": args.clients, "seconds": round(wall, 1), "steps": args.steps,
            "requests": len(rows), "ok": len(ok), "requests_per_s": round(len(ok) / wall, 3),
            "images_per_s": round(len(images) / wall, 3),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3),
            "batch_sizes": dict(sorted(collections.Counter(r["batch_size"] for r in images).items())),
            "status_counts": dict(sorted(collections.Counter(r["status"] for r in rows).items())),
            "server_errors": sum(1 for r in rows if r["status"] >= 500),
            "date": datetime.date.today().isoformat()}


def markdown(r: dict) -> str:
    return "\n".join([
        f"Load test: {r['clients']} clients for {r['seconds']} s, {r['steps']} steps, backend {r.get('backend', '?')}"
        f"{' x ' + str(r['workers']) + ' workers' if r.get('workers', 1) > 1 else ''}, {r['date']}", "",
        "| requests/s | images/s | p50 s | p95 s | p99 s | batch sizes seen | statuses | 5xx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['requests_per_s']} | {r['images_per_s']} | {r['latency_p50_s']} | {r['latency_p95_s']} | "
        f"{r['latency_p99_s']} | {r['batch_sizes']} | {r['status_counts']} | {r['server_errors']} |"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service")
    parser.add_argument("--model", help="start the service in-process on this model/export")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--workers", type=int, default=1, help="onnxruntime session sets (janusflow serve --workers)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chat-every", type=int, default=4, help="every k-th request is a chat request (0: none)")
    parser.add_argument("--max-wait-ms", type=float, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if bool(args.url) == bool(args.model):
        parser.error("give exactly one of --url and --model")
    if args.url:
        result = {**run(args.url.rstrip("/"), args), "backend": "remote"}
    else:
        from serving.load import load_sampler
        from serving.service import BackgroundServer, ServiceConfig, create_app

        sampler = load_sampler(args.model, backend=args.backend, workers=args.workers)
        config = ServiceConfig(model=args.model, backend=args.backend, workers=args.workers,
                               max_wait_ms=args.max_wait_ms,
                               queue_size=4 * args.clients)
        with BackgroundServer(create_app(sampler, config)) as server:
            result = {**run(server.url, args), "backend": args.backend, "workers": args.workers}
    write_result(args.out, "load", result, markdown(result))
    print(markdown(result))
    return 1 if result["server_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
