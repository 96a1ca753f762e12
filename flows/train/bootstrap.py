"""Stage `bootstrap`: the embedded world has no pretrained VAE, SigLIP or LLM, so train small ones on
the corpus before stage 1. Production skips this stage and converts DeepSeek-LLM, SigLIP-L and
SDXL-VAE from local directories (`janusflow convert`).

Three parts, each a short loop of its own:
- VAE: diffusers AutoencoderKL on the corpus images, reconstruction (MSE) + KL; afterwards the latent
  scaling factor is set to 1 / std of the latents, as SD does, so the flow sees unit-variance data.
- SigLIP: transformers SiglipModel (our vision tower + a small text tower) with the sigmoid
  image-text loss on (image, caption) pairs; the vision tower becomes f_enc, the whole SiglipModel is
  kept in OUT/siglip for the evaluation's image-text agreement score.
- LLM: next-token loss on the corpus' text (text samples, captions, prompts, questions and answers).

Each finished part is saved under OUT/parts; `--resume` skips the parts already done (a part is a
few minutes on CPU, so the unit of loss on a crash is the part in progress). With `procs: 2` the VAE
and then the LLM train in a second process while this one trains SigLIP, and whichever process
finishes first leaves its core to the other (flows/train/bootstrap_side.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer, SiglipConfig, SiglipModel

from data.sequences import conversation_turns, decode_image, preprocess_generation
from data.shards import ShardReader, read_manifest
from flows.train.bootstrap_side import SidePart
from flows.train.config import TrainConfig
from flows.train.distributed import fused_adamw
from flows.train.siglip_losses import (NegativeCaptions, ObjectQueries, pad_text_ids, sigmoid_loss,
                                       siglip_logits, siglip_text_ids)
from flows.train.tracking import Tracker
from models import attention as packed_attention
from models.checkpoint import save_pretrained
from models.janusflow import JanusFlow, siglip_config
from models.precision import resolve_dtype
from models.processor import JanusFlowProcessor
from models.tokenizer import IMAGE

PARTS = ("vae", "siglip", "llm")  # the order of one process, and of the step counter in either
# With procs: 2 these train one after the other in a second process, SigLIP in the first: the shapes
# SigLIP (~280-315 s, mostly on one thread) is about as long as the VAE and the LLM together on one
# thread (136-156 + 76-85 s in the stop-30 demos; docs/benchmarks.md).
SIDE_PARTS = ("vae", "llm")


class Bootstrap:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, parent_run_id: str | None = None,
                 progress: bool = True):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("stage bootstrap runs in one process: start it without torchrun")
        self.cfg, self.b = cfg, cfg.bootstrap
        self.resume, self.parent_run_id, self.progress = resume, parent_run_id, progress
        self.out = Path(cfg.out)
        self.parts_dir = self.out / "parts"
        self.device = torch.device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        config = self.b.model_config()
        tokenizer = AutoTokenizer.from_pretrained(str(Path(cfg.corpus) / "tokenizer"))
        self.processor = JanusFlowProcessor.for_config(tokenizer, config)
        torch.manual_seed(cfg.seed)
        self.model = JanusFlow(config).to(self.device)
        self.data_version = read_manifest(cfg.corpus)["hash"]
        self.step = 0  # one step counter over the three parts, for the MLflow curves
        # with procs: 2, a check (set by SidePart) whether the other process has finished and left
        # its core to this one; None once taken, or in one process
        self.freed_threads = None

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        run_id = None
        meta_path = self.parts_dir / "meta.json"
        if self.resume and meta_path.is_file():
            run_id = json.loads(meta_path.read_text()).get("run_id")
        tracker = Tracker(self.cfg, run_id=run_id, parent_run_id=self.parent_run_id,
                          tags={"data_version": self.data_version, "preset": self.b.preset})
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({"run_id": tracker.run_id}))
        self.log = open(self.out / "metrics.jsonl", "a")
        side = None
        try:
            if self.cfg.procs == 2:
                todo = [p for p in SIDE_PARTS if not (self.resume and self._part_file(p).is_file())]
                side = SidePart(self, todo) if todo else None
            for part in PARTS:
                if side is not None and part in side.parts:
                    continue
                if self.resume and self._load_part(part):
                    continue
                self.step = self.first_step(part)
                getattr(self, f"train_{part}")(tracker)
                self._save_part(part)
            if side is not None:
                side.join(tracker)
            self.model.eval()
            model_dir = save_pretrained(self.model, self.processor, self.out / "model")
            tracker.finish(self.out, status="FINISHED")
            return model_dir
        except BaseException:
            tracker.finish(self.out, status="FAILED")
            raise
        finally:
            if side is not None:
                side.stop()
            self.log.close()

    def first_step(self, part: str) -> int:
        """Where `part`'s steps start on the one step counter (PARTS' order, whichever process
        trains it)."""
        return sum(getattr(self.b, f"{p}_steps") for p in PARTS[:PARTS.index(part)])

    # -- parts --------------------------------------------------------------------------------------
    def train_vae(self, tracker: Tracker) -> None:
        vae, b = self.model.vae, self.b
        images = self._images()
        vae.requires_grad_(True).train()
        opt = self._optimizer(vae.parameters(), b.vae_lr)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for i in self._steps("vae", b.vae_steps):
            x = images[torch.randint(len(images), (b.vae_batch,), generator=gen)]
            if i < b.vae_crop_steps and b.vae_crop:
                x = random_crops(x, b.vae_crop, gen)
            x = x.to(self.device)
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(x)
            recon = F.mse_loss(vae.decode(z).sample, x)
            kl = dist.kl().mean() / dist.mean[0].numel()
            loss = recon + b.kl_weight * kl
            self._update(opt, loss, b.vae_lr * b.lr_factor(i, b.vae_steps))
            self._record(tracker, vae_loss=loss, vae_recon=recon, vae_kl=kl)
        vae.requires_grad_(False).eval()
        with torch.no_grad():
            means = [vae.encode(images[j:j + 256].to(self.device)).latent_dist.mean
                     for j in range(0, min(len(images), 1024), 256)]
            std = float(torch.cat(means).std())
        self._set_scaling(1.0 / std)
        self._record(tracker, vae_latent_std=std)

    def train_siglip(self, tracker: Tracker) -> None:
        b = self.b
        images, captions, scenes = self._captioned_images()
        siglip = self.siglip_model()
        siglip.vision_model.load_state_dict(self.model.vision.state_dict(), strict=False)
        siglip.train()
        length = siglip.config.text_config.max_position_embeddings
        encoded = [self.processor.tokenizer.encode(c, add_special_tokens=False) for c in captions]
        ids = pad_text_ids(encoded, length, eos_id=self.processor.eos_id, pad_id=self.processor.pad_id)
        cut = sum(len(row) >= length for row in encoded)
        if cut:
            self._record(tracker, siglip_captions_cut=cut)
            tqdm.write(f"bootstrap siglip: {cut} of {len(captions)} captions are longer than "
                       f"bootstrap.siglip_text_len={length} tokens and were cut")
        negatives = NegativeCaptions(scenes, b.siglip_negatives, seed=self.cfg.seed + 1)
        queries = ObjectQueries(scenes, siglip.config.vision_config, seed=self.cfg.seed + 3,
                                kinds=b.siglip_query_kinds) if b.siglip_queries else None
        head = [] if queries is None else list(queries.head.to(self.device).parameters())
        opt = self._optimizer(list(siglip.parameters()) + head, b.siglip_lr)
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        # bf16 autocast (`dtype`) for the towers and the query head; attention, the logits and the
        # losses in fp32 (models/precision.py: the CPU's bf16 attention backward is ~5x slower)
        siglip.set_attn_implementation(packed_attention.register())
        try:
            for i in self._steps("siglip", b.siglip_steps):
                idx = torch.randperm(len(images), generator=gen)[: b.siglip_batch]
                texts, hard = ids[idx], negatives.for_batch(idx.tolist())
                if hard:
                    texts = torch.cat([texts, self._tokens(hard, length)])
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
                    vision = siglip.vision_model(pixel_values=images[idx].to(self.device))
                    text = siglip.text_model(input_ids=texts.to(self.device))
                    if queries is not None:
                        query_loss, query_acc = queries.loss(vision.last_hidden_state, idx.tolist())
                logits = siglip_logits(siglip, vision.pooler_output, text.pooler_output)
                contrastive = loss = sigmoid_loss(logits)
                extra = {}
                if queries is not None:
                    loss = contrastive + b.siglip_queries * query_loss
                    extra = {"siglip_query": query_loss, "siglip_query_acc": query_acc}
                self._update(opt, loss, b.siglip_lr * b.lr_factor(i, b.siglip_steps))
                with torch.no_grad():  # retrieval among the batch's captions and the hard negatives
                    top1 = (logits.argmax(1).cpu() == torch.arange(len(idx))).float().mean()
                self._record(tracker, siglip_loss=contrastive, siglip_top1=top1, **extra)
        finally:
            siglip.set_attn_implementation("sdpa")
        siglip.eval()
        own = {k: v for k, v in siglip.vision_model.state_dict().items() if not k.startswith("head.")}
        self.model.vision.load_state_dict(own)
        siglip.save_pretrained(str(self.out / "siglip"))
        self.processor.tokenizer.save_pretrained(str(self.out / "siglip"))

    def train_llm(self, tracker: Tracker) -> None:
        b, llm = self.b, self.model.llm
        stream = torch.tensor(self._text_stream(), dtype=torch.long)
        rows = len(stream) // b.llm_seq_len
        if rows < 1:
            raise ValueError(f"bootstrap: the corpus has {len(stream)} text tokens, fewer than "
                             f"llm_seq_len={b.llm_seq_len}")
        chunks = stream[: rows * b.llm_seq_len].view(rows, b.llm_seq_len)
        llm.train()
        opt = self._optimizer(llm.parameters(), b.llm_lr)
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        # bf16 autocast (`dtype`) for the LLM as for SigLIP, its attention kept in fp32 as in the stages
        # (models/precision.py); the VAE stays fp32 (its reconstructions lost quality in bf16: MSE
        # 0.0016 -> 0.0020)
        llm.set_attn_implementation(packed_attention.register())
        try:
            for i in self._steps("llm", b.llm_steps):
                x = chunks[torch.randint(rows, (b.llm_batch,), generator=gen)].to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
                    loss = llm(input_ids=x, labels=x).loss
                self._update(opt, loss, b.llm_lr * b.lr_factor(i, b.llm_steps))
                self._record(tracker, llm_loss=loss)
        finally:
            llm.set_attn_implementation("sdpa")
        llm.eval()

    # -- data ---------------------------------------------------------------------------------------
    def _reader(self, kind: str) -> ShardReader | None:
        try:
            reader = ShardReader(self.cfg.corpus, "train", kind)
        except (FileNotFoundError, ValueError):
            return None
        return reader if len(reader) else None

    def _images(self) -> torch.Tensor:
        """Every train image (gen and und) at the generation size, (N, 3, S, S) in [-1, 1]."""
        size, rng, out = self.model.config.gen.image_size, np.random.default_rng(self.cfg.seed), []
        for kind in ("gen", "und"):
            reader = self._reader(kind)
            for i in range(len(reader) if reader else 0):
                _, data = reader.read(i)
                if data is not None:
                    out.append(preprocess_generation(decode_image(data), size, rng)[0])
        if not out:
            raise ValueError(f"bootstrap: no train images in {self.cfg.corpus}")
        return torch.stack(out)

    def _captioned_images(self) -> tuple[torch.Tensor, list[str], list[dict | None]]:
        """(image, caption, scene) for SigLIP: generation samples with their scene captions (the
        scene, where the record has one, is what hard-negative captions are made from)."""
        reader = self._reader("gen")
        if reader is None:
            raise ValueError(f"bootstrap: no generation samples in {self.cfg.corpus} for SigLIP")
        images, captions, scenes = [], [], []
        for i in range(len(reader)):
            record, data = reader.read(i)
            if data is not None:
                images.append(self.processor.preprocess_understanding(decode_image(data)))
                captions.append(record.get("caption") or record["prompt"])
                scenes.append(record.get("scene"))
        return torch.stack(images), captions, scenes

    def _text_stream(self) -> list[int]:
        """BOS text EOS for every text sample, caption, prompt, question and answer, in corpus order."""
        texts = []
        for kind in ("text", "gen", "und"):
            reader = self._reader(kind)
            for i in range(len(reader) if reader else 0):
                record, _ = reader.read(i)
                if kind == "text":
                    texts.append(record["text"])
                elif kind == "gen":
                    texts += [record["prompt"]] + ([record["caption"]] if record.get("caption") else [])
                else:
                    for user, answer in conversation_turns(record):
                        texts += [user.replace(IMAGE, "").strip(), answer]
        eos = self.processor.eos_id
        return [t for text in texts if text for t in (*self.processor.encode(text), eos)]

    def _tokens(self, texts: list[str], length: int) -> torch.Tensor:
        return siglip_text_ids(self.processor.tokenizer, texts, length, eos_id=self.processor.eos_id,
                               pad_id=self.processor.pad_id)

    # -- SigLIP -------------------------------------------------------------------------------------
    def siglip_model(self) -> SiglipModel:
        """Our vision tower's shape with a pooling head, and a small text tower, as one SiglipModel."""
        vision = siglip_config(self.model.config).to_dict()
        vision["vision_use_head"] = True
        v = self.model.config.vision
        text = dict(vocab_size=len(self.processor), hidden_size=v.hidden_size,
                    intermediate_size=v.intermediate_size, num_hidden_layers=self.b.siglip_text_layers,
                    num_attention_heads=v.num_attention_heads,
                    max_position_embeddings=self.b.siglip_text_len,
                    pad_token_id=self.processor.pad_id, bos_token_id=self.processor.bos_id,
                    eos_token_id=self.processor.eos_id,
                    projection_size=v.hidden_size)
        config = SiglipConfig(text_config=text, vision_config=vision)
        torch.manual_seed(self.cfg.seed + 1)
        model = SiglipModel(config).to(self.device)
        with torch.no_grad():  # the SigLIP paper's initial temperature and bias
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        return model

    # -- shared loop pieces -------------------------------------------------------------------------
    def _optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=self.cfg.betas,
                                 weight_decay=self.cfg.weight_decay, fused=fused_adamw(self.device))

    def _update(self, opt, loss: torch.Tensor, lr: float) -> None:
        """One optimizer step at `lr` (the part's LR times its schedule's factor)."""
        if not torch.isfinite(loss):
            raise ValueError(f"bootstrap step {self.step + 1}: non-finite loss {float(loss)}; "
                             "stopped without saving this part")
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                       self.cfg.grad_clip)
        opt.step()

    def _steps(self, part: str, steps: int):
        bar = tqdm(range(steps), desc=f"bootstrap {part}", unit="step", disable=not self.progress)
        self._bar = bar
        for i in bar:
            if self.freed_threads is not None and (threads := self.freed_threads()):
                torch.set_num_threads(threads)
                self.freed_threads = None
            yield i
        bar.close()

    def _record(self, tracker: Tracker, **values) -> None:
        metrics = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}
        if any(k.endswith("_loss") for k in metrics):
            self.step += 1
            first = next(k for k in metrics if k.endswith("_loss"))
            self._bar.set_postfix({first: f"{metrics[first]:.4f}"})
        self._write(tracker, self.step, metrics)

    def _write(self, tracker: Tracker | None, step: int, metrics: dict) -> None:
        """One row of metrics.jsonl, and of the MLflow run every log_every steps (no tracker: the
        second process of SidePart, whose rows the first one logs when it joins)."""
        self.log.write(json.dumps({"step": step, **metrics}) + "\n")
        self.log.flush()
        if tracker is not None and (step % self.cfg.log_every == 0
                                    or not any(k.endswith("_loss") for k in metrics)):
            tracker.log_metrics(metrics, step)

    def _set_scaling(self, factor: float) -> None:
        self.model.config.vae.scaling_factor = factor
        self.model.vae.register_to_config(scaling_factor=factor)

    # -- part files ---------------------------------------------------------------------------------
    def _part_modules(self, part: str) -> torch.nn.Module:
        return {"vae": self.model.vae, "siglip": self.model.vision, "llm": self.model.llm}[part]

    def _part_file(self, part: str) -> Path:
        return self.parts_dir / f"{part}.safetensors"

    def _save_part(self, part: str) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self._part_modules(part).state_dict().items()}
        tmp = self.parts_dir / f".{part}.safetensors.tmp"
        save_file(state, str(tmp), metadata={"scaling_factor": str(self.model.config.vae.scaling_factor),
                                             "step": str(self.step)})
        tmp.rename(self._part_file(part))

    def _load_part(self, part: str) -> bool:
        path = self._part_file(part)
        if not path.is_file() or (part == "siglip" and not (self.out / "siglip").is_dir()):
            return False
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        try:
            self._part_modules(part).load_state_dict(load_file(str(path)))
        except RuntimeError as exc:  # e.g. bootstrap.model changed since the part was saved
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
                          str(exc).splitlines()[0])
            raise ValueError(f"--resume: {path} does not fit this bootstrap's model ({detail}); "
                             f"delete it to train the part again") from None
        if part == "vae":
            self._set_scaling(float(meta["scaling_factor"]))
        self.step = int(meta["step"])
        return True


def random_crops(images: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """A (side x side) crop of each image in (N, C, H, W), each at its own random offset."""
    n, _, h, w = images.shape
    ys = torch.randint(h - side + 1, (n,), generator=gen).tolist()
    xs = torch.randint(w - side + 1, (n,), generator=gen).tolist()
    return torch.stack([im[:, y:y + side, x:x + side] for im, y, x in zip(images, ys, xs)])
