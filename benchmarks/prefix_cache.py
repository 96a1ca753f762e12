"""Reference sampler with the prompt prefix cached vs recomputed every step (the official demo).

    python benchmarks/prefix_cache.py --preset shapes                      # CPU, fp32
    python benchmarks/prefix_cache.py --preset janusflow-1.3b --device cuda --dtype bf16

Random weights (speed does not depend on them). Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from common import batch_prompts, sampler_arguments, write_result
from models.pipeline import JanusFlowPipeline
from models.sampler import sample_latents

def run(preset: str, *, device: str, dtype: torch.dtype, batch: int, steps: int, guidance: float,
        repeats: int) -> dict:
    pipe = JanusFlowPipeline.from_config(preset, seed=0)
    pipe.model.to(device=device, dtype=dtype)
    prompts = batch_prompts(batch)
    enc = pipe.processor.encode_prompts(prompts)
    results = {}
    for name, use_cache in (("recompute_every_step", False), ("cached_prefix", True)):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, seeds=list(range(batch)),
                  use_cache=use_cache, dtype=dtype)
        sample_latents(pipe.model, pipe.processor, enc, **{**kw, "num_inference_steps": 1})  # warm-up
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample_latents(pipe.model, pipe.processor, enc, **kw)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = min(times)
        results[name] = {"seconds_per_batch": round(best, 4), "images_per_s": round(batch / best, 3)}
    results["speedup"] = round(results["recompute_every_step"]["seconds_per_batch"]
                               / results["cached_prefix"]["seconds_per_batch"], 3)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return {"preset": preset, "device": name, "dtype": str(dtype).replace("torch.", ""),
            "batch": batch, "steps": steps, "guidance": guidance,
            "prompt_tokens": enc.lengths.tolist(), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "results": results}


def markdown(r: dict) -> str:
    rows = [f"| {k} | {v['seconds_per_batch']} | {v['images_per_s']} |"
            for k, v in r["results"].items() if isinstance(v, dict)]
    return "\n".join([
        f"Prefix cache, preset `{r['preset']}`, {r['device']}, {r['dtype']}, batch {r['batch']}, "
        f"{r['steps']} steps, CFG {r['guidance']}, {r['date']}",
        "", "| sampler | s / batch | images/s |", "| --- | --- | --- |", *rows,
        "", f"speed-up of the cached prefix: {r['results']['speedup']}x"])


def main() -> None:
    parser = sampler_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.inference_mode():
        result = run(args.preset, device=args.device, dtype=dtype, batch=args.batch,
                     steps=args.steps, guidance=args.guidance, repeats=args.repeats)
    stem = f"prefix_cache_{args.preset}_{args.device.split(':')[0]}_{args.dtype}"
    write_result(args.out, stem, result, markdown(result))
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
