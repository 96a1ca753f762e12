"""One Trainer for stages 1-3: freezing, packed batches, AdamW, EMA, atomic checkpoints, exact
resume, NaN guard, MLflow tracking, one process or many (torchrun: DDP or FSDP2).

Randomness (logit-normal t and noise) comes from a generator seeded with (seed, step, micro-batch)
and the data stream's state is a few integers, so a run resumed from step k produces the same losses
from step k + 1 on as the run that never stopped, and N processes reproduce one process that
accumulates N times as many micro-batches.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from data.packing import flex_block_mask
from data.prefetch import PrefetchStream
from data.shards import read_manifest
from data.stages import stage_data
from data.stream import Mixer, PackedStream, SequenceSource
from flows.train import checkpointing
from flows.train.config import TrainConfig
from flows.train.distributed import (apply_activation_checkpointing, apply_compile, full, fused_adamw,
                                     init_world, local, parallelize)
from flows.train.samples import write_samples
from models import attention as packed_attention
from models.checkpoint import from_pretrained
from models.packed import PackedObjective
from models.pipeline import JanusFlowPipeline
from models.precision import resolve_dtype

if TYPE_CHECKING:  # MLflow is imported by run() only: stepping a Trainer (benchmarks) needs none
    from flows.train.tracking import Tracker

NEW_PARTS = ("und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner", "gen_dec_norm",
             "gen_dec_aligner", "gen_decoder", "repa_head")
# with `attention: flex`, the (B, T) tensors a micro-batch ships instead of its dense mask; the
# BlockMask is made from them after the copy to the device
FLEX_MASK_INPUTS = ("segment_ids", "visible", "together")
TRAINABLE = {"1": NEW_PARTS, "2": NEW_PARTS + ("llm",), "3": NEW_PARTS + ("llm", "vision")}
FROZEN = {"1": ("llm", "vision", "vae"), "2": ("vision", "vae"), "3": ("vae",)}
T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


class TrainError(ValueError):
    """A run that cannot go on (non-finite loss, ...); nothing corrupt has been saved.

    A ValueError so the CLI reports it as one line, like the config errors.
    """


def _component(name: str) -> str:
    return name.split(".", 1)[0]


def apply_stage(model, stage: str) -> list[str]:
    """Set requires_grad for a stage; returns the trainable parameter names.

    Every parameter must belong to exactly one of the stage's train or freeze sets.
    """
    trainable, frozen = set(TRAINABLE[stage]), set(FROZEN[stage])
    names = []
    for name, p in model.named_parameters():
        part = _component(name)
        if (part in trainable) == (part in frozen):
            raise TrainError(f"parameter {name} is in {'both' if part in trainable else 'neither'} "
                             f"of stage {stage}'s train and freeze sets")
        p.requires_grad_(part in trainable)
        if part in trainable:
            names.append(name)
    return names


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, parent_run_id: str | None = None,
                 progress: bool = True):
        self.cfg, self.resume = cfg, resume
        self.world, self.device = init_world(cfg.device)
        self.progress = progress and self.world.main
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.model, self.processor = from_pretrained(cfg.init)
        self.model.to(self.device)
        self.names = apply_stage(self.model, cfg.stage)
        # before any wrapper (FSDP2 shards the encoders' weights) or compiled block
        self.cache, self.cache_repa = self._open_latent_cache()
        if cfg.attention == "flex":
            self.model.llm.set_attn_implementation("flex_attention")
        elif cfg.attention == "segments":
            self.model.llm.set_attn_implementation(packed_attention.register())
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            apply_compile(self.model)
        # bf16 autocast on any device (models/precision.py: a CPU with AMX runs the shapes preset's
        # step ~1.2x faster); FSDP2's bf16 parameter all-gathers only on CUDA
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        bf16 = self.dtype == "bf16"
        objective = PackedObjective(self.model, repa_weight=cfg.repa_weight, rf_weight=cfg.rf_weight,
                                    t_mean=cfg.t_mean, t_std=cfg.t_std,
                                    autocast_dtype=torch.bfloat16 if bf16 else None)
        self.objective = parallelize(objective, mode=cfg.parallel, world=self.world,
                                     device=self.device, bf16=bf16 and self.device.type == "cuda")
        # After parallelize: FSDP2 replaces parameters with sharded DTensors.
        params = dict(self.model.named_parameters())
        self.params = {n: params[n] for n in self.names}
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.learning_rate,
                                           betas=cfg.betas, weight_decay=cfg.weight_decay,
                                           fused=fused_adamw(self.device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_factor)
        self.ema = {n: p.detach().float().clone() for n, p in self.params.items()}
        settings = stage_data(cfg.stage, **cfg.data)
        conf = self.model.config
        source = SequenceSource(cfg.corpus, "train", self.processor,
                                num_gen_tokens=conf.num_gen_tokens, gen_image_size=conf.gen.image_size,
                                gen_template=settings["gen_template"],
                                und_template=settings["und_template"],
                                cfg_dropout=settings["cfg_dropout"],
                                caption_prob=settings["caption_prob"], seed=cfg.seed)
        self.stream = PrefetchStream(
            PackedStream(source, Mixer(settings["mix"], source.sizes(), seed=cfg.seed), rows=cfg.rows,
                         max_len=cfg.max_len),
            per_step=cfg.grad_accum * self.world.size, depth=cfg.prefetch, prepare=self._prepare)
        self.data_version = read_manifest(cfg.corpus)["hash"]
        self.step = 0
        self.run_id = None
        self.parent_run_id = parent_run_id
        if resume:
            self._load_latest()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, main = self.cfg, self.world.main
        tracker = log = None
        if main:
            from flows.train.tracking import Tracker

            self.out.mkdir(parents=True, exist_ok=True)
            tracker = Tracker(cfg, run_id=self.run_id, parent_run_id=self.parent_run_id,
                              tags={"data_version": self.data_version,
                                    "preset": self.model.config.preset,
                                    "world_size": str(self.world.size),
                                    "autocast": self.dtype})
            self.run_id = tracker.run_id
            if self.cache_fill:  # what the stage's start encoded into the latent cache
                tracker.log_metrics(self.cache_fill, self.step)
            log = open(self.out / "metrics.jsonl", "a")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"stage {cfg.stage}", unit="step",
                   disable=not self.progress)
        try:
            while self.step < cfg.steps:
                metrics = self.train_step()
                self.step += 1
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if main:
                    log.write(json.dumps({"step": self.step, **metrics}) + "\n")
                    log.flush()
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        tracker.log_metrics({**metrics, **system_metrics(self.device)}, self.step)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.samples(self.ema_pipeline(), tracker)
            pipe = self.ema_pipeline()
            model_dir = self.out / "model"
            if main:
                pipe.save_pretrained(model_dir)
                self.samples(pipe, tracker)
                tracker.finish(self.out, status="FINISHED")
            self.world.barrier()
            return model_dir
        except BaseException:
            if main:
                tracker.finish(self.out, status="FAILED")
            raise
        finally:
            self.stream.close()
            bar.close()
            if log:
                log.close()

    def _param_groups(self) -> list[dict]:
        """One AdamW group at `lr`, then SigLIP's at `vision_lr` when set and the stage trains it
        (the schedule scales both alike; group 0's LR is the one logged)."""
        vision = [p for n, p in self.params.items() if n.startswith("vision.")]
        if self.cfg.vision_lr is None or not vision:
            return [{"params": list(self.params.values())}]
        rest = [p for n, p in self.params.items() if not n.startswith("vision.")]
        return [{"params": rest}, {"params": vision, "lr": self.cfg.vision_lr}]

    def train_step(self) -> dict:
        """One optimizer step over micro-batch x grad_accum x world size packed rows."""
        cfg, world = self.cfg, self.world
        self.model.train()
        self.model.vae.eval()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        rf_bins: dict[int, list[float]] = {}
        outs: list[dict[str, torch.Tensor]] = []  # read on the host once, after the backward passes
        self.optimizer.zero_grad(set_to_none=True)
        accum = cfg.grad_accum
        for m in range(accum * world.size):
            # every rank walks the same stream and keeps its own micro-batches
            batch, stats, host = self.stream.next_prepared(self.step)
            if m // accum != world.rank:
                continue
            last = m % accum == accum - 1
            gen = torch.Generator().manual_seed(micro_seed(cfg.seed, self.step, m))
            sync = nullcontext() if last or not hasattr(self.objective, "no_sync") else self.objective.no_sync()
            with sync:
                out = self.objective(**self._to_device(host), generator=gen)
                (out["loss"] / accum).backward()
            outs.append({k: out[k].detach() for k in ("loss", "ar", "rf", "repa", "t", "rf_each") if k in out})
            for k, v in stats.items():
                _add(sums, k, v)
            _add(sums, "micro_batches", 1.0)
            _add(sums, "tokens", batch.real_tokens)
            _add(sums, "images", (0 if batch.und_pixels is None else len(batch.und_pixels))
                 + len(batch.gen_keys))
            _add(sums, "gen_images", len(batch.gen_keys))
            _add(sums, "gen_cached", len(batch.gen_keys) if host.get("gen_latents") is not None else 0)
        norm_t = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
        # The host waits for the device once per step, here, not between a forward and its backward
        # (a wait there leaves the GPU idle while the host launches the backward). A non-finite loss
        # still stops the run before the optimizer steps, so nothing it touched is kept or saved.
        read = [{k: v.tolist() for k, v in o.items()} for o in outs]
        bad = next((v for v in read if not np.isfinite(v["loss"])), None)
        if world.any(bad is not None):
            if bad is None:
                raise TrainError(f"step {self.step + 1}: non-finite loss on another rank; stopped without saving")
            terms = ", ".join(f"{k}={bad[k]:.4g}" for k in ("ar", "rf", "repa") if k in bad)
            raise TrainError(f"step {self.step + 1}: non-finite loss {bad['loss']} ({terms}); "
                             f"stopped without saving")
        for v in read:
            for k in ("loss", "ar", "rf", "repa"):
                if k in v:
                    _add(sums, k, v[k])
                    _add(sums, f"n_{k}", 1.0)
            for t, rf in zip(v.get("t", []), v.get("rf_each", [])):
                rf_bins.setdefault(min(int(t * 4), 3), []).append(rf)
        norm = float(full(norm_t))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_([local(e) for e in self.ema.values()],
                                 [local(p).detach().float() for p in self.params.values()],
                                 1 - cfg.ema_decay(self.step))
        for b in range(len(T_BINS) - 1):
            values = rf_bins.get(b, [])
            sums[f"rf_bin{b}"], sums[f"n_rf_bin{b}"] = sum(values), len(values)
        for k in ("loss", "ar", "rf", "repa"):  # a rank whose rows hold no sample of a kind has no such
            sums.setdefault(k, 0.0)              # term: every rank sums the same keys, or the
            sums.setdefault(f"n_{k}", 0.0)       # all-reduce below mismatches across processes
        keys = sorted(sums)
        sums = dict(zip(keys, world.sum([sums[k] for k in keys])))
        elapsed = time.perf_counter() - start
        # Losses: the mean over micro-batches (what the gradient is the mean of); mix stats likewise.
        metrics = {k: sums[k] / sums[f"n_{k}"] for k in ("loss", "ar", "rf", "repa")
                   if sums.get(f"n_{k}")}
        metrics.update({k: sums[k] / sums["micro_batches"] for k in stats})
        metrics.update(lr=lr, grad_norm=norm, tokens_per_s=sums["tokens"] / elapsed,
                       images_per_s=sums["images"] / elapsed)
        if self.cache is not None and sums["gen_images"]:
            metrics["latent_cache_hit_rate"] = sums["gen_cached"] / sums["gen_images"]
        for b in range(len(T_BINS) - 1):
            if sums[f"n_rf_bin{b}"]:
                metrics[f"rf_t{T_BINS[b]:.2f}-{T_BINS[b + 1]:.2f}"] = sums[f"rf_bin{b}"] / sums[f"n_rf_bin{b}"]
        return metrics

    def _open_latent_cache(self):
        """(LatentCache or None, whether its REPA targets apply): filled here at the start of the
        stage, each process encoding its share. Entries always hold both (so any stage can read
        what another filled), but REPA targets are read only while SigLIP is frozen (stages 1-2):
        in stage 3 they come from the training SigLIP, as without a cache."""
        cfg = self.cfg
        self.cache_fill = {}
        if not cfg.latent_cache:
            return None, False
        from data.latent_cache import LatentCache, encoder_version, fill

        repa = cfg.repa_weight > 0 and "vision" in FROZEN[cfg.stage]
        cache = LatentCache(cfg.latent_cache, encoder_version(self.model))
        if cfg.latent_cache_fill:
            training = self.model.training
            self.model.eval()
            start = time.perf_counter()
            counts = fill(cache, self.model, cfg.corpus, progress=self.progress,
                          shard=(self.world.rank, self.world.size))
            self.model.train(training)
            # the sum over ranks also waits for every process's share of the entries
            totals = self.world.sum([counts["encoded"], counts["cached"], counts["lazy"]])
            self.cache_fill = {"latent_cache_encoded": totals[0], "latent_cache_reused": totals[1],
                               "latent_cache_not_encodable": totals[2],
                               "latent_cache_fill_s": time.perf_counter() - start}
        return cache, repa

    def _cached_latents(self, host: dict, keys: list) -> dict:
        """host with the cache's latents (and REPA targets) of the micro-batch's generation images
        in place of encoding them, when every one is cached; unchanged (encoded live) otherwise."""
        entries = [self.cache.get(k) for k in keys]
        if not keys or any(e is None or (self.cache_repa and "repa" not in e) for e in entries):
            return host
        host["gen_latents"] = torch.stack([e["latent"] for e in entries])
        if self.cache_repa:
            host["gen_repa"] = torch.stack([e["repa"] for e in entries])
        if self.cache_repa or self.cfg.repa_weight == 0:
            host["gen_pixels"] = None  # nothing left to encode from them
        return host

    def _prepare(self, index: int, batch) -> dict | None:
        """The model inputs of micro-batch `index` of a step as host tensors (pinned for a GPU), or
        None where another rank trains on it; runs on the prefetch thread when there is one."""
        if index // self.cfg.grad_accum != self.world.rank:
            return None
        full_image = self.model.config.gen.full_image_attention
        host = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, roles=batch.roles,
                    labels=batch.labels, und_pixels=batch.und_pixels, gen_pixels=batch.gen_pixels)
        if self.cache is not None:
            host = self._cached_latents(host, batch.gen_keys)
        if self.cfg.attention == "flex":  # the block mask is built on the device from (B, T) tensors
            host.update(zip(FLEX_MASK_INPUTS, batch.mask_inputs(full_image=full_image)))
        else:
            host["attention_mask"] = batch.attention_mask(full_image=full_image)
        if self.device.type == "cuda":
            host = {k: None if v is None else v.pin_memory() for k, v in host.items()}
        return host

    def _to_device(self, host: dict) -> dict:
        inputs = {k: None if v is None else v.to(self.device, non_blocking=True) for k, v in host.items()}
        if "segment_ids" in inputs:
            inputs["attention_mask"] = flex_block_mask(*(inputs.pop(k) for k in FLEX_MASK_INPUTS))
        return inputs

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        extra = {"scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                 "torch_rng": torch.get_rng_state(), "step": self.step}
        meta = {"step": self.step, "run_id": self.run_id, "stage": self.cfg.stage,
                "world_size": self.world.size, "data_version": self.data_version,
                "config": self.cfg.to_dict()}
        return checkpointing.save(self.ckpt_dir, self.step, world=self.world, module=self.objective,
                                  optimizer=self.optimizer, params=self.params, ema=self.ema,
                                  extra=extra, meta=meta, keep=self.cfg.keep_checkpoints)

    def _load_latest(self) -> None:
        path = checkpointing.latest(self.ckpt_dir)
        if path is None:
            return  # nothing to resume from: start at step 0
        extra, meta = checkpointing.load(path, module=self.objective, optimizer=self.optimizer,
                                         params=self.params, ema=self.ema)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.stream.load_state_dict(extra["stream"])
        torch.set_rng_state(extra["torch_rng"])
        self.step, self.run_id = extra["step"], meta.get("run_id")

    def ema_pipeline(self) -> JanusFlowPipeline | None:
        """The model with the EMA weights (what evaluation and export use), on rank 0 (None on the
        others). The EMA is gathered to whole tensors (a collective under FSDP2) and copied into a
        fresh copy of the init model: frozen parts never change, so they are the init's. It lives on
        the training device, so the sample grid of a GPU run is drawn there, not on the host."""
        whole = {n: full(e) for n, e in self.ema.items()}
        if not self.world.main:
            return None
        model, processor = from_pretrained(self.cfg.init, device=self.device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in whole.items():
                params[n].copy_(v.to(params[n].dtype))
        return JanusFlowPipeline(model.eval(), processor)

    def samples(self, pipe: JanusFlowPipeline | None, tracker: Tracker) -> None:
        """Sample grid + held-out answers under OUT/samples/step-N, as MLflow artifacts too."""
        cfg = self.cfg
        if pipe is None or (cfg.sample_prompts == 0 and cfg.sample_questions == 0):
            return
        out = self.out / "samples" / f"step-{self.step:08d}"
        metrics = write_samples(pipe, cfg.corpus, out, prompts=cfg.sample_prompts,
                                questions=cfg.sample_questions, steps=cfg.sample_steps,
                                guidance=cfg.sample_guidance, seed=cfg.seed)
        tracker.log_metrics(metrics, self.step)
        tracker.log_artifacts(out, f"samples/step-{self.step:08d}")


def system_metrics(device: torch.device) -> dict:
    """Process memory and CPU use (and GPU memory on CUDA), logged beside the losses."""
    import psutil

    proc = psutil.Process()
    out = {"system_rss_gb": proc.memory_info().rss / 2**30, "system_cpu_percent": psutil.cpu_percent()}
    if device.type == "cuda":
        out["system_cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The seed of micro-batch `micro` of step `step`: t and noise depend on nothing else, so a
    resumed or differently distributed run draws the same randomness."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def _add(sums: dict, key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value
