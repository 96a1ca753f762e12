"""Text-to-image sampler speed: the official demo's loop vs our batched sampler on each backend.

    python benchmarks/sampler.py --preset shapes                       # CPU: official, torch, onnxruntime
    python benchmarks/sampler.py --preset shapes --backends official onnxruntime onnxruntime-workers
    python benchmarks/sampler.py --preset janusflow-1.3b --device cuda --dtype bf16 --backends official torch

One process, the same random weights, prompts, steps, CFG and batch for every variant:
- official: recomputes the prompt prefix at every Euler step, eager (what demo/app_janusflow.py does);
- torch / torch-compile: serving/sampler.py over the PyTorch graphs (prefix once, shared BOS prefix,
  one fused cfg_step call per Euler step);
- onnxruntime: the same sampler over graphs exported to a temporary directory;
- onnxruntime-workers: the same with `--workers` session sets (default: one per core, one thread
  each), the batch's rows split over them (`janusflow serve --workers N`).
Each variant includes VAE decoding. Reports images/s, per-batch latency p50/p95 (timed repeats
interleave the variants) and peak memory, measured in one extra untimed run per variant (GPU:
torch's peak allocation; CPU: the process's peak RSS above its level before the run), as
JSON and a markdown table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from common import batch_prompts, profile_table, sampler_arguments, write_result
from models.pipeline import JanusFlowPipeline
from models.sampler import sample_latents
from serving.backends import OnnxRuntimeBackend, TorchBackend
from serving.sampler import ImageRequest, Sampler

VARIANTS = ("official", "torch", "torch-compile", "onnxruntime", "onnxruntime-workers")


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or process RSS sampled every 5 ms on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.base = self.peak = self.proc.memory_info().rss
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mib = (self.peak - self.base) / 2**20


def official(pipe, prompts, seeds, steps, guidance, dtype):
    enc = pipe.processor.encode_prompts(prompts)
    z = sample_latents(pipe.model, pipe.processor, enc, num_inference_steps=steps, guidance_scale=guidance,
                       seeds=seeds, use_cache=False, dtype=dtype)
    return pipe.model.decode_latents(z)


def ours(sampler: Sampler, prompts, seeds, steps, guidance):
    requests = [ImageRequest(p, seed=s, guidance=guidance, steps=steps) for p, s in zip(prompts, seeds)]
    return sampler.sample(requests, steps)[1]


def run(args) -> dict:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = JanusFlowPipeline.from_config(args.preset, seed=0)
    pipe.model.to(device=args.device, dtype=dtype).eval()
    prompts = batch_prompts(args.batch)
    seeds = list(range(args.batch))
    tmp = None
    calls = {}
    for name in args.backends:
        if name == "official":
            calls[name] = lambda: official(pipe, prompts, seeds, args.steps, args.guidance, dtype)
        elif name in ("torch", "torch-compile"):
            s = Sampler.from_model(pipe.model, pipe.processor, TorchBackend(pipe.model, compile=name != "torch"))
            calls[name] = lambda s=s: ours(s, prompts, seeds, args.steps, args.guidance)
        elif name.startswith("onnxruntime"):
            from serving.export import export

            if tmp is None:
                tmp = tempfile.TemporaryDirectory()
                export(pipe.model.float(), pipe.processor, Path(tmp.name) / "export", progress=False,
                       graphs=["prefix", "cfg_step", "vae_decoder"])
                pipe.model.to(dtype=dtype)
            workers = args.workers if name == "onnxruntime-workers" else 1
            s = Sampler.from_export(Path(tmp.name) / "export",
                                    OnnxRuntimeBackend(Path(tmp.name) / "export", workers=workers))
            calls[name] = lambda s=s: ours(s, prompts, seeds, args.steps, args.guidance)
        else:
            raise SystemExit(f"unknown variant {name}: choose from {', '.join(VARIANTS)}")
    results, images = {}, {}
    times = {name: [] for name in calls}
    peak = dict.fromkeys(calls, 0.0)
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up (and compilation)
        # repeats interleave the variants, so a machine whose speed drifts (shared CPUs) favours none
        for _ in range(args.repeats):
            for name, call in calls.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                images[name] = call().float().cpu()
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        # memory in a run of its own: on CPU the RSS poller is a thread that would steal cycles from
        # the timed runs' thread pools
        for name, call in calls.items():
            with PeakMemory(args.device) as mem:
                call()
            peak[name] = mem.mib
        profiles = {name: profile_table(call, args.device) for name, call in calls.items()} \
            if args.profile else {}
    for name, measured in times.items():
        t = np.array(measured)
        results[name] = {"images_per_s": round(args.batch / float(np.median(t)), 3),
                         "latency_p50_s": round(float(np.percentile(t, 50)), 4),
                         "latency_p95_s": round(float(np.percentile(t, 95)), 4),
                         "peak_memory_mib": round(peak[name], 1)}
    if "official" in results:
        base = results["official"]["images_per_s"]
        for name, r in results.items():
            r["speedup_vs_official"] = round(r["images_per_s"] / base, 3)
            r["max_abs_diff_vs_official"] = float((images[name] - images["official"]).abs().max())
    if tmp is not None:
        tmp.cleanup()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return {"preset": args.preset, "device": device, "dtype": args.dtype, "batch": args.batch,
            "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
            "workers": args.workers if "onnxruntime-workers" in args.backends else None,
            "date": datetime.date.today().isoformat(), "results": results, "profiles": profiles}


def markdown(r: dict) -> str:
    rows = [f"| {k} | {v['images_per_s']} | {v['latency_p50_s']} | {v['latency_p95_s']} | "
            f"{v['peak_memory_mib']} | {v.get('speedup_vs_official', '-')} |" for k, v in r["results"].items()]
    return "\n".join([
        f"Sampler, preset `{r['preset']}`, {r['device']}, {r['dtype']}, batch {r['batch']}, {r['steps']} steps, "
        f"CFG {r['guidance']}, {r['date']}"
        + (f", onnxruntime-workers: {r['workers']}" if r.get("workers") else ""), "",
        "| variant | images/s | p50 s/batch | p95 s/batch | peak MiB | x official |",
        "| --- | --- | --- | --- | --- | --- |", *rows,
        *(f"\n\nProfile of one batch, {k}:\n\n{v}" for k, v in r.get("profiles", {}).items())])


def main() -> None:
    parser = sampler_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=5)
    parser.add_argument("--backends", nargs="+", default=["official", "torch", "onnxruntime"])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="session sets of the onnxruntime-workers variant (default: one per core)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one batch per variant (torch.profiler, top operators)")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out, f"sampler_{args.preset}_{args.device.split(':')[0]}_{args.dtype}", result,
                 markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
