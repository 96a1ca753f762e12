"""Dynamic batching for the service: a bounded queue of jobs, grouped into batches of up to
`max_batch` rows that share a kind and step count, waiting at most `max_wait_s` for a batch to fill.

One worker thread runs the sampler (the model is not re-entrant and CPU/GPU work does not gain from
two batches at once); the event loop only queues, groups and hands back results. Prometheus metrics
(queue depth, batch sizes, latency, images, errors by kind) live in the batcher's own registry.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.api import ApiError


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("janusflow_queue_depth", "rows waiting to be batched", registry=r)
        self.batch_size = Histogram("janusflow_batch_size", "rows per executed batch", ["kind"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.latency = Histogram("janusflow_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.images = Counter("janusflow_images_total", "images generated", registry=r)
        self.images_per_s = Gauge("janusflow_images_per_second", "images/s of the last image batch",
                                  registry=r)
        self.errors = Counter("janusflow_errors_total", "failed requests by kind", ["kind"], registry=r)
        self.requests = Counter("janusflow_requests_total", "requests by endpoint and status",
                                ["endpoint", "status"], registry=r)


@dataclass
class Job:
    kind: str            # "image" or "chat"
    key: tuple           # jobs batch together only with the same key
    rows: list
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the client timed out: skip it if not started


class Batcher:
    def __init__(self, sampler, *, max_wait_s: float = 0.02, queue_size: int = 64,
                 metrics: Metrics | None = None):
        self.sampler = sampler
        self.max_batch = sampler.max_batch
        self.max_wait_s, self.queue_size = max_wait_s, queue_size
        self.metrics = metrics or Metrics()
        self.pending: deque[Job] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="janusflow-sampler")
        self.closing = False
        self.in_flight = 0
        self._cond: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._cond = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Stop accepting, finish every queued and running job, then stop."""
        self.closing = True
        async with self._cond:
            self._cond.notify_all()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)

    async def call(self, fn, *args):
        """Run fn in the sampler thread (warm-up and other one-off work)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- submitting ---------------------------------------------------------------------------------
    def queued_rows(self) -> int:
        return sum(len(j.rows) for j in self.pending)

    async def submit(self, kind: str, key: tuple, rows: list, timeout_s: float):
        if self.closing:
            raise ApiError(503, "the service is shutting down", headers={"Retry-After": "5"})
        if self.queued_rows() + len(rows) > self.queue_size:
            self.metrics.errors.labels("queue_full").inc()
            raise ApiError(429, f"the queue is full ({self.queue_size} rows); retry shortly",
                           headers={"Retry-After": "1"})
        job = Job(kind, key, rows, asyncio.get_running_loop().create_future())
        async with self._cond:
            self.pending.append(job)
            self.metrics.queue_depth.set(self.queued_rows())
            self._cond.notify_all()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.abandoned = True
            self.metrics.errors.labels("timeout").inc()
            raise ApiError(504, f"request timed out after {timeout_s:g}s") from None

    # -- the batching loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            async with self._cond:
                await self._cond.wait_for(lambda: self.pending or self.closing)
                if not self.pending and self.closing:
                    return
            batch = await self._gather()
            if batch:
                await self._execute(batch)

    async def _gather(self) -> list[Job]:
        first = self.pending[0]
        deadline = first.enqueued + self.max_wait_s
        while not self.closing:
            rows = sum(len(j.rows) for j in self.pending if j.key == first.key)
            remaining = deadline - time.monotonic()
            if rows >= self.max_batch or remaining <= 0:
                break
            async with self._cond:
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except asyncio.TimeoutError:
                    break
        batch, rows = [], 0
        for job in list(self.pending):
            if job.key != first.key:
                continue
            if batch and rows + len(job.rows) > self.max_batch:
                break
            self.pending.remove(job)
            if job.abandoned:
                continue
            batch.append(job)
            rows += len(job.rows)
        self.metrics.queue_depth.set(self.queued_rows())
        return batch

    async def _execute(self, batch: list[Job]) -> None:
        kind, rows = batch[0].kind, [r for j in batch for r in j.rows]
        self.metrics.batch_size.labels(kind).observe(len(rows))
        self.in_flight += 1
        start = time.perf_counter()
        try:
            results = await self.call(self._run, kind, rows)
        except Exception as exc:  # a backend failure fails this batch only
            self.metrics.errors.labels("backend").inc()
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(ApiError(500, f"inference failed: {str(exc).splitlines()[0]}"))
            return
        finally:
            self.in_flight -= 1
        if kind == "image":
            self.metrics.images.inc(len(rows))
            self.metrics.images_per_s.set(len(rows) / max(time.perf_counter() - start, 1e-9))
        i = 0
        for job in batch:
            part = results[i:i + len(job.rows)]
            i += len(job.rows)
            if not job.future.done():
                job.future.set_result(part)

    def _run(self, kind: str, rows: list) -> list:
        if kind == "image":
            return self.sampler.generate(rows)
        # chat jobs batch by max_tokens (their key), so every row decodes the same budget
        return self.sampler.answer([r[0] for r in rows], [r[1] for r in rows], max_new_tokens=rows[0][2])
