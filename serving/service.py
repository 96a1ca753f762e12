"""`janusflow serve`: the HTTP inference service (FastAPI + uvicorn) over the batched sampler.

    POST /v1/images/generations   text to image, OpenAI images API shape (b64_json)
    POST /v1/chat/completions     image understanding, OpenAI chat shape (image as a data URL)
    GET  /healthz                 the process is up
    GET  /readyz                  200 only after every batch bucket has been warmed
    GET  /metrics                 Prometheus text format

Bad input gets a 4xx with a one-line message naming the field (serving/api.py); a full queue a 429
with Retry-After; a slow request a 504 after its timeout. On SIGINT/SIGTERM uvicorn stops accepting
and the batcher finishes every queued and running request before the process exits.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.api import (ApiError, Limits, chat_request, chat_response, image_rows, images_request,
                         images_response, parse_json)
from serving.batcher import Batcher
from serving.sampler import DEFAULT_BUCKETS, ImageRequest, Sampler


@dataclass
class ServiceConfig:
    model: str
    backend: str = "torch"
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_wait_ms: float = 20.0
    queue_size: int = 64
    timeout_s: float = 120.0
    warm_steps: int = 2
    workers: int = 1               # onnxruntime session sets a batch's rows are split over
    dtype: str = "fp32"            # torch backends: fp32, bf16 or auto (serving/load.py)


def warm_up(sampler: Sampler, steps: int = 2) -> None:
    """Run every bucket once for both paths (engines/compiled graphs specialise per batch size)."""
    blank = Image.new("RGB", (8, 8), (255, 255, 255))
    for b in sampler.buckets:
        sampler.generate([ImageRequest("warm-up", seed=i, steps=steps) for i in range(b)])
        sampler.answer([blank] * b, ["warm-up"] * b, max_new_tokens=2)


def create_app(sampler: Sampler, config: ServiceConfig, *, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits(image_size=sampler.config.gen.image_size, max_n=max(8, sampler.max_batch))
    batcher = Batcher(sampler, max_wait_s=config.max_wait_ms / 1000, queue_size=config.queue_size)
    metrics = batcher.metrics
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        await batcher.call(warm_up, sampler, config.warm_steps)
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.close()

    app = FastAPI(title="janusflow", version="1", lifespan=lifespan)
    app.state.batcher, app.state.limits = batcher, limits

    def reply(endpoint: str, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    async def handle(endpoint: str, request: Request, work) -> JSONResponse:
        start = time.perf_counter()
        try:
            body = parse_json(await request.body(), request.headers.get("content-type"), limits)
            result = await work(body)
            return reply(endpoint, 200, result)
        except ApiError as exc:
            if exc.status < 500 and exc.status not in (429, 503):
                metrics.errors.labels("invalid_request").inc()
            return reply(endpoint, exc.status, exc.body(), exc.headers)
        finally:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def generate_images(body: dict) -> dict:
        req = images_request(body, limits)
        rows = image_rows(req)
        results = await batcher.submit("image", ("image", req.num_inference_steps), rows, config.timeout_s)
        if any(r.image is None for r in results):
            metrics.errors.labels("non_finite").inc()
        return images_response(req, rows, results)

    async def chat(body: dict) -> dict:
        image, question, max_tokens = chat_request(body, limits)
        (answer,) = await batcher.submit("chat", ("chat", max_tokens), [(image, question, max_tokens)],
                                         config.timeout_s)
        return chat_response(sampler.processor, question, answer, body.get("model"))

    @app.post("/v1/images/generations")
    async def images_endpoint(request: Request):
        return await handle("images", request, generate_images)

    @app.post("/v1/chat/completions")
    async def chat_endpoint(request: Request):
        return await handle("chat", request, chat)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ready", "buckets": list(sampler.buckets), "backend": sampler.backend.name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(config: ServiceConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    from serving.load import load_sampler

    sampler = load_sampler(config.model, backend=config.backend, buckets=config.buckets,
                           workers=config.workers, dtype=config.dtype)
    app = create_app(sampler, config)
    workers = f" x {config.workers} workers" if config.workers > 1 else ""
    if config.dtype != "fp32":  # what `auto` chose
        from models.precision import resolve_dtype

        workers += f", {resolve_dtype(config.dtype, 'cpu')}"
    print(f"janusflow serve: {config.model} ({config.backend}{workers}) on http://{host}:{port} "
          f"(buckets {list(sampler.buckets)}; ready after warm-up: GET /readyz)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=config.timeout_s)


class BackgroundServer:
    """The service on a free local port in a background thread (smoke tests, the tests, benchmarks):
    `with BackgroundServer(app) as s: httpx.get(s.url + "/readyz")`. Entering waits for /readyz."""

    def __init__(self, app, *, ready_timeout_s: float = 300.0):
        import socket

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=60))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="janusflow-serve")

    def __enter__(self) -> "BackgroundServer":
        import httpx

        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline and self.thread.is_alive():
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"the service on {self.url} did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def smoke_test(export_dir: str | Path, out: str | Path, *, prompt: str = "a red circle",
               question: str = "How many objects are there?", backend: str = "onnxruntime") -> dict:
    """Serve an export over HTTP, generate one image and answer one question about it through the
    real endpoints; writes serving-image.png and serving.json into `out`."""
    import httpx

    from serving.load import load_sampler

    sampler = load_sampler(export_dir, backend=backend, buckets=(1, 2))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(create_app(sampler, ServiceConfig(model=str(export_dir), backend=backend))) as s:
        start = time.perf_counter()
        r = httpx.post(s.url + "/v1/images/generations", timeout=300,
                       json={"prompt": prompt, "seed": 0, "num_inference_steps": 30, "guidance_scale": 3.0})
        r.raise_for_status()
        image_s = time.perf_counter() - start
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        (out / "serving-image.png").write_bytes(png)
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        start = time.perf_counter()
        r = httpx.post(s.url + "/v1/chat/completions", timeout=300, json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}]})
        r.raise_for_status()
        result = {"backend": backend, "prompt": prompt, "image_seconds": round(image_s, 3), "question": question,
                  "answer": r.json()["choices"][0]["message"]["content"],
                  "chat_seconds": round(time.perf_counter() - start, 3), "url": s.url}
    (out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
