"""One Trainer for stages 1-3: freezing, packed batches, AdamW, EMA, atomic checkpoints, exact
resume, NaN guard, MLflow tracking.

Randomness per step (logit-normal t and noise) comes from a generator seeded with (seed, step) and
the data stream's state is a few integers, so a run resumed from step k produces the same losses
from step k + 1 on as the run that never stopped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.shards import read_manifest
from data.stages import stage_data
from data.stream import Mixer, PackedStream, SequenceSource
from flows.train.config import TrainConfig
from flows.train.tracking import Tracker
from models.checkpoint import from_pretrained, save_pretrained
from models import flow
from models.packed import packed_losses

NEW_PARTS = ("und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner", "gen_dec_norm",
             "gen_dec_aligner", "gen_decoder", "repa_head")
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
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = torch.device(cfg.device)
        self.model, self.processor = from_pretrained(cfg.init)
        self.model.to(self.device)
        self.names = apply_stage(self.model, cfg.stage)
        params = dict(self.model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = [p.detach().float().clone() for p in self.params]
        settings = stage_data(cfg.stage, **cfg.data)
        conf = self.model.config
        source = SequenceSource(cfg.corpus, "train", self.processor,
                                num_gen_tokens=conf.num_gen_tokens, gen_image_size=conf.gen.image_size,
                                gen_template=settings["gen_template"],
                                und_template=settings["und_template"],
                                cfg_dropout=settings["cfg_dropout"], seed=cfg.seed)
        self.stream = PackedStream(source, Mixer(settings["mix"], source.sizes(), seed=cfg.seed),
                                   rows=cfg.rows, max_len=cfg.max_len)
        self.data_version = read_manifest(cfg.corpus)["hash"]
        self.step = 0
        self.run_id = None
        self.parent_run_id = parent_run_id
        if resume:
            self._load_latest()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(cfg, run_id=self.run_id, parent_run_id=self.parent_run_id,
                          tags={"data_version": self.data_version, "git_commit": git_commit(),
                                "stage": cfg.stage, "preset": self.model.config.preset})
        self.run_id = tracker.run_id
        log = open(self.out / "metrics.jsonl", "a")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"stage {cfg.stage}", unit="step",
                   disable=not self.progress)
        try:
            while self.step < cfg.steps:
                metrics = self.train_step()
                self.step += 1
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                log.write(json.dumps({"step": self.step, **metrics}) + "\n")
                log.flush()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    tracker.log_metrics(metrics, self.step)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
            model_dir = self.export_ema(self.out / "model")
            tracker.finish(self.out, status="FINISHED")
            return model_dir
        except BaseException:
            tracker.finish(self.out, status="FAILED")
            raise
        finally:
            bar.close()
            log.close()

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        model.vae.eval()
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        totals: dict[str, float] = {}
        rf_bins: dict[int, list[float]] = {}
        tokens = images = 0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            batch, stats = self.stream.next_batch(self.step)
            out = self._forward(batch, gen)
            if not torch.isfinite(out["loss"]):
                terms = ", ".join(f"{k}={float(out[k]):.4g}" for k in ("ar", "rf", "repa") if k in out)
                raise TrainError(f"step {self.step + 1}: non-finite loss {float(out['loss'].detach())} ({terms}); "
                                 "stopped without saving")
            (out["loss"] / cfg.grad_accum).backward()
            for k in ("loss", "ar", "rf", "repa"):
                if k in out:
                    totals[k] = totals.get(k, 0.0) + float(out[k].detach()) / cfg.grad_accum
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            if "rf_each" in out:
                for t, rf in zip(out["t"].tolist(), out["rf_each"].tolist()):
                    b = min(int(t * 4), 3)
                    rf_bins.setdefault(b, []).append(rf)
            tokens += batch.real_tokens
            images += (0 if batch.und_pixels is None else len(batch.und_pixels)) + len(batch.gen_keys)
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - cfg.ema)
        elapsed = time.perf_counter() - start
        totals.update(lr=lr, grad_norm=float(norm),
                      tokens_per_s=tokens / elapsed, images_per_s=images / elapsed)
        for b, values in rf_bins.items():
            totals[f"rf_t{T_BINS[b]:.2f}-{T_BINS[b + 1]:.2f}"] = sum(values) / len(values)
        return totals

    def _forward(self, batch, gen: torch.Generator) -> dict:
        model, dev = self.model, self.device
        latents = repa = None
        if batch.gen_pixels is not None:
            pixels = batch.gen_pixels.to(dev)
            latents = model.encode_images(pixels).float()
            repa = model.repa_target(pixels) if self.cfg.repa_weight > 0 else None
        g = 0 if latents is None else latents.shape[0]
        t = noise = None
        if g:
            t = flow.sample_t(g, generator=gen).to(dev)
            noise = torch.randn(latents.shape, generator=gen).to(latents)
        use_bf16 = self.cfg.dtype == "bf16" and dev.type == "cuda"
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            return packed_losses(model, input_ids=batch.input_ids.to(dev),
                                 position_ids=batch.position_ids.to(dev),
                                 attention_mask=batch.attention_mask().to(dev),
                                 roles=batch.roles.to(dev), labels=batch.labels.to(dev),
                                 und_pixels=None if batch.und_pixels is None else batch.und_pixels.to(dev),
                                 latents=latents, repa_target=repa, t=t, noise=noise,
                                 repa_weight=self.cfg.repa_weight)

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write step-N/ under a temporary name and rename it: a crash never leaves a checkpoint
        that looks complete. Keeps the newest `keep_checkpoints`."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_dir / f"step-{self.step:08d}"
        tmp = self.ckpt_dir / f".tmp-step-{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        params = dict(self.model.named_parameters())
        state = {"model": {n: params[n].detach().cpu() for n in self.names},
                 "ema": [e.cpu() for e in self.ema], "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                 "torch_rng": torch.get_rng_state(), "step": self.step}
        torch.save(state, tmp / "state.pt")
        meta = {"step": self.step, "run_id": self.run_id, "stage": self.cfg.stage,
                "data_version": self.data_version, "config": self.cfg.to_dict()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(self.ckpt_dir.glob("step-*"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def _load_latest(self) -> None:
        ckpts = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / "meta.json").is_file())
        if not ckpts:
            return  # nothing to resume from: start at step 0
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        meta = json.loads((ckpts[-1] / "meta.json").read_text())
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in state["model"].items():
                params[n].copy_(v)
            for e, v in zip(self.ema, state["ema"]):
                e.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.run_id = state["step"], meta.get("run_id")

    def export_ema(self, path: Path) -> Path:
        """save_pretrained with the EMA weights (what evaluation and export use)."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.ema):
                p.copy_(e.to(p.dtype))
            try:
                return save_pretrained(self.model, self.processor, path)
            finally:
                for p, s in zip(self.params, saved):
                    p.copy_(s)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

