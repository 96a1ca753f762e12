"""Scale-out on Ray Serve: the same sampler, validation and responses as `janusflow serve`, one
replica per GPU (or N CPU replicas), batched by Ray Serve's own `@serve.batch`.

    janusflow serve --model runs/shapes/export --backend onnxruntime --ray [--replicas N]

Ray Serve's HTTP proxy routes requests to replicas; each replica loads the model once, warms its
buckets and groups concurrent image rows into batches of up to its largest bucket.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.api import (ApiError, Limits, chat_request, chat_response, image_rows, images_request,
                         images_response, parse_json)
from serving.sampler import DEFAULT_BUCKETS


def _deployment():
    from ray import serve

    @serve.deployment(name="janusflow", max_ongoing_requests=64)
    class JanusFlowDeployment:
        def __init__(self, model: str, backend: str, buckets: tuple[int, ...], max_wait_ms: float,
                     dtype: str = "fp32"):
            from serving.load import load_sampler
            from serving.service import warm_up

            self.sampler = load_sampler(model, backend=backend, buckets=buckets, dtype=dtype)
            warm_up(self.sampler, steps=1)
            self.limits = Limits(image_size=self.sampler.config.gen.image_size,
                                 max_n=max(8, self.sampler.max_batch))
            self._generate_batched.set_max_batch_size(self.sampler.max_batch)
            self._generate_batched.set_batch_wait_timeout_s(max_wait_ms / 1000)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
        async def _generate_batched(self, rows: list) -> list:
            return await asyncio.get_running_loop().run_in_executor(None, self.sampler.generate, rows)

        async def __call__(self, request: Request):
            path = request.url.path.rstrip("/")
            if request.method == "GET" and path in ("/healthz", "/readyz"):
                return JSONResponse({"status": "ready", "backend": self.sampler.backend.name})
            try:
                body = parse_json(await request.body(), request.headers.get("content-type"), self.limits)
                if path == "/v1/images/generations":
                    req = images_request(body, self.limits)
                    rows = image_rows(req)
                    results = await asyncio.gather(*[self._generate_batched(r) for r in rows])
                    return JSONResponse(images_response(req, rows, results))
                if path == "/v1/chat/completions":
                    image, question, max_tokens = chat_request(body, self.limits)
                    (answer,) = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: self.sampler.answer([image], [question], max_new_tokens=max_tokens))
                    return JSONResponse(chat_response(self.sampler.processor, question, answer, body.get("model")))
                raise ApiError(404, f"no route {request.method} {path}")
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    return JanusFlowDeployment


def build_app(model: str, *, backend: str = "torch", buckets: tuple[int, ...] = DEFAULT_BUCKETS,
              replicas: int | None = None, max_wait_ms: float = 20.0, dtype: str = "fp32"):
    """The bound Ray Serve application: `replicas` replicas (default: one per GPU, else one), each
    holding one GPU when there are GPUs."""
    import torch

    gpus = torch.cuda.device_count()
    n = replicas or max(gpus, 1)
    options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    return _deployment().options(num_replicas=n, ray_actor_options=options).bind(
        model, backend, tuple(buckets), max_wait_ms, dtype)


def run(model: str, *, backend: str, buckets, replicas: int | None, host: str, port: int,
        max_wait_ms: float, blocking: bool = True, dtype: str = "fp32"):
    """Start Ray (local), Ray Serve's proxy on host:port and the application at route '/'."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(model, backend=backend, buckets=buckets, replicas=replicas,
                                 max_wait_ms=max_wait_ms, dtype=dtype), route_prefix="/", name="janusflow",
                       blocking=False)
    print(json.dumps({"ray_serve": f"http://{host}:{port}", "model": model, "backend": backend}), flush=True)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
