"""Training stages on `tiny`: freezing, exact resume, atomic checkpoints, MLflow, bad input."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data.shards import read_manifest
from flows.cli import main
from flows.train.checkpointing import CheckpointError
from flows.train.config import ConfigError, TrainConfig, load_config
from flows.train.trainer import TrainError, Trainer, apply_stage
from models.checkpoint import from_pretrained
from models.pipeline import JanusFlowPipeline


def _cfg(env, out, **kw):
    base = dict(stage="2", init=str(env / "init"), corpus=str(env / "corpus"), out=str(out), steps=6,
                rows=2, max_len=256, warmup=2, save_every=3, sample_prompts=4, sample_questions=4,
                sample_steps=2, tracking_uri=f"sqlite:///{env}/mlflow.db",
                data={"warmup_mix_steps": 3} if kw.get("stage", "2") == "2" else {})
    return TrainConfig(**{**base, **kw}).validate()


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stage_sets_cover_every_parameter(tiny_copy):
    model = tiny_copy.model
    total = sum(1 for _ in model.named_parameters())
    for stage, trains_llm, trains_vision in (("1", False, False), ("2", True, False), ("3", True, True)):
        names = apply_stage(model, stage)
        parts = {n.split(".")[0] for n in names}
        assert ("llm" in parts) == trains_llm and ("vision" in parts) == trains_vision
        assert "vae" not in parts and {"gen_encoder", "gen_decoder", "repa_head", "und_aligner"} <= parts
        assert sum(p.requires_grad for p in model.parameters()) == len(names) < total


def test_stage_one_moves_only_new_parts(train_env, tmp_path):
    cfg = _cfg(train_env, tmp_path / "s1", stage="1", steps=2, save_every=2)
    trainer = Trainer(cfg, progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    for n, p in trainer.model.named_parameters():
        changed = not torch.equal(before[n], p)
        if n.split(".")[0] in ("llm", "vision", "vae"):
            assert not changed, n
    assert not torch.equal(before["gen_decoder.out_proj.weight"], trainer.model.gen_decoder.out_proj.weight)
    ema_model, _ = from_pretrained(tmp_path / "s1" / "model")
    # the exported model carries the EMA weights, which keep part of the start (decay 0.18, 0.25)
    w0 = before["gen_decoder.out_proj.weight"]
    assert not torch.equal(ema_model.gen_decoder.out_proj.weight, trainer.model.gen_decoder.out_proj.weight)
    assert (ema_model.gen_decoder.out_proj.weight - w0).abs().max() < \
        (trainer.model.gen_decoder.out_proj.weight - w0).abs().max()


def test_resume_gives_the_same_losses(train_env, tmp_path):
    full = _cfg(train_env, tmp_path / "full")
    Trainer(full, progress=False).run()
    part = _cfg(train_env, tmp_path / "part", steps=3)
    Trainer(part, progress=False).run()
    resumed = _cfg(train_env, tmp_path / "part", steps=6)
    trainer = Trainer(resumed, resume=True, progress=False)
    assert trainer.step == 3
    trainer.run()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a[3:], b[3:]):
        for k in ("loss", "ar", "rf", "repa", "grad_norm", "mix_gen"):
            assert x[k] == y[k], (x["step"], k)
    assert a[0]["mix_gen"] == pytest.approx(0.5, abs=0.25)  # the opening 30:50:20 phase


def test_prefetching_batches_changes_no_loss(train_env, tmp_path):
    """Batches built on the prefetch thread (the default) train exactly as batches built in the loop,
    with several micro-batches per step."""
    runs = {}
    for depth in (0, 3):
        cfg = _cfg(train_env, tmp_path / f"prefetch{depth}", steps=4, grad_accum=2, prefetch=depth,
                   sample_prompts=0, sample_questions=0)
        Trainer(cfg, progress=False).run()
        runs[depth] = _losses(tmp_path / f"prefetch{depth}")
    assert len(runs[0]) == len(runs[3]) == 4
    for x, y in zip(runs[0], runs[3]):
        for k in ("loss", "ar", "rf", "repa", "grad_norm", "mix_gen", "packing_efficiency"):
            assert x[k] == y[k], (x["step"], k)


def test_a_crash_mid_save_leaves_no_valid_looking_checkpoint(train_env, tmp_path, monkeypatch):
    cfg = _cfg(train_env, tmp_path / "crash", steps=4, save_every=2)
    trainer = Trainer(cfg, progress=False)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):  # the second checkpoint dies half-written
        if trainer.step >= 4:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="step-00000004 not written: rank 0: OSError: disk full"):
        trainer.run()
    assert list((tmp_path / "crash" / "checkpoints").glob(".tmp-step-00000004"))
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002"]
    assert Trainer(cfg, resume=True, progress=False).step == 2


def test_mlflow_records_the_run(train_env, tmp_path):
    cfg = _cfg(train_env, tmp_path / "tracked", steps=3, save_every=3)
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run = client.get_run(trainer.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_version"] == read_manifest(train_env / "corpus")["hash"]
    assert run.data.tags["stage"] == "2" and len(run.data.tags["git_commit"]) >= 7
    assert run.data.params["max_len"] == "256" and float(run.data.params["learning_rate"]) == 1e-4
    history = client.get_metric_history(trainer.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    for key in ("ar", "rf", "repa", "lr", "grad_norm", "tokens_per_s", "images_per_s",
                "packing_efficiency", "mix_und", "mix_gen", "mix_text"):
        assert key in run.data.metrics, key
    assert any(k.startswith("rf_t") for k in run.data.metrics)
    assert run.data.metrics["system_rss_gb"] > 0.1
    assert 0.0 <= run.data.metrics["sample_vqa_accuracy"] <= 1.0
    top = [a.path for a in client.list_artifacts(trainer.run_id)]
    assert {"metrics.jsonl", "config.yaml"} <= set(top)
    samples = [a.path for a in client.list_artifacts(trainer.run_id, "samples/step-00000003")]
    assert sorted(p.rsplit("/", 1)[1] for p in samples) == ["answers.json", "samples.png"]
    answers = json.loads((tmp_path / "tracked" / "samples" / "step-00000003" / "answers.json").read_text())
    assert answers and {"question", "expected", "answer", "correct"} <= set(answers[0])


def test_eval_every_writes_samples_during_the_run(train_env, tmp_path):
    cfg = _cfg(train_env, tmp_path / "ev", steps=4, save_every=4, eval_every=2, sample_prompts=2,
               sample_questions=2, sample_steps=2)
    Trainer(cfg, progress=False).run()
    steps = sorted(p.name for p in (tmp_path / "ev" / "samples").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    from PIL import Image

    grid = Image.open(tmp_path / "ev" / "samples" / "step-00000002" / "samples.png")
    assert grid.size[0] == 4 * 64  # 4 columns of 32 px images shown at 2x


@pytest.mark.parametrize("options", [{"activation_checkpointing": True},
                                     pytest.param({"compile": True}, marks=pytest.mark.slow),
                                     pytest.param({"compile": True, "attention": "segments"}, marks=pytest.mark.slow)],
                         ids=["activation_checkpointing", "compile", "compile_segments"])
def test_memory_and_speed_options_do_not_change_the_step(train_env, tmp_path, options):
    plain = Trainer(_cfg(train_env, tmp_path / "plain", steps=2), progress=False).train_step()
    other = Trainer(_cfg(train_env, tmp_path / "other", steps=2, **options), progress=False).train_step()
    for k in ("loss", "ar", "rf", "repa", "grad_norm"):
        assert other[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-6), k


def test_bf16_autocast_runs_on_the_cpu_near_the_fp32_step(train_env, tmp_path):
    """`dtype: bf16` autocasts on the CPU too (AMX makes it the faster one there; `auto` picks it
    where it is): the step's numbers move by bf16 rounding only, the weights stay fp32."""
    plain = Trainer(_cfg(train_env, tmp_path / "fp32", steps=2), progress=False)
    mixed = Trainer(_cfg(train_env, tmp_path / "bf16", steps=2, dtype="bf16"), progress=False)
    assert (plain.dtype, mixed.dtype) == ("fp32", "bf16")
    a, b = plain.train_step(), mixed.train_step()
    for k in ("loss", "ar", "rf", "repa"):
        assert b[k] == pytest.approx(a[k], rel=0.05, abs=0.02), k
    assert b["loss"] != a["loss"]  # autocast really ran
    assert all(p.dtype == torch.float32 for p in mixed.params.values())
    assert plain.optimizer.defaults["fused"] and mixed.optimizer.defaults["fused"]  # AdamW's one-pass kernel


def test_non_finite_loss_stops_with_the_step_and_terms(train_env, tmp_path):
    model, proc = from_pretrained(train_env / "init")
    with torch.no_grad():
        model.gen_decoder.out_proj.weight.fill_(float("nan"))
    JanusFlowPipeline(model, proc).save_pretrained(tmp_path / "bad")
    cfg = _cfg(train_env, tmp_path / "nan", init=str(tmp_path / "bad"), steps=2)
    with pytest.raises(TrainError, match=r"step 1: non-finite loss .*rf=nan"):
        Trainer(cfg, progress=False).run()
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_lr_schedule_warms_up_then_holds_or_decays(train_env, tmp_path):
    """Warm-up then constant (the paper's), or a linear decay to final_lr x lr at the last step; the
    optimizer really steps with those values."""
    constant = TrainConfig(stage="2", lr=1e-3, steps=10, warmup=4)
    assert [constant.lr_factor(s) for s in range(10)] == [0.25, 0.5, 0.75] + [1.0] * 7
    decay = TrainConfig(stage="2", lr=1e-3, steps=10, warmup=4, final_lr=0.1)
    factors = [decay.lr_factor(s) for s in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[3:], factors[4:]))  # strictly decreasing after warm-up
    # warm-up, stable, then a cool-down over the last decay_steps steps
    wsd = TrainConfig(stage="2", lr=1e-3, steps=20, warmup=4, final_lr=0.0, decay_steps=5)
    assert [wsd.lr_factor(s) for s in range(20)] == pytest.approx(
        [0.25, 0.5, 0.75] + [1.0] * 12 + [0.8, 0.6, 0.4, 0.2, 0.0])
    cfg = _cfg(train_env, tmp_path / "decay", steps=4, warmup=1, final_lr=0.0, lr=1e-3,
               sample_prompts=0, sample_questions=0)
    trainer = Trainer(cfg, progress=False)
    seen = []
    for _ in range(4):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.train_step()
        trainer.step += 1
    assert seen == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3, 0.0])


def test_vision_lr_is_siglips_own_in_stage_three(train_env, tmp_path):
    """`vision_lr`: SigLIP's weights step at their own LR (same warm-up), the rest at `lr`; ignored
    by a stage that keeps SigLIP frozen."""
    cfg = _cfg(train_env, tmp_path / "s3", stage="3", steps=2, warmup=2, lr=1e-3, vision_lr=1e-5,
               sample_prompts=0, sample_questions=0)
    trainer = Trainer(cfg, progress=False)
    vision, rest = trainer.optimizer.param_groups[1], trainer.optimizer.param_groups[0]
    assert {id(p) for p in vision["params"]} == {id(p) for n, p in trainer.params.items() if n.startswith("vision.")}
    assert len(rest["params"]) + len(vision["params"]) == len(trainer.params)
    assert (rest["lr"], vision["lr"]) == pytest.approx((5e-4, 5e-6))  # warm-up step 1 of 2
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.train_step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in trainer.params.items()}
    # AdamW's first step moves each weight by about its LR
    assert max(v for n, v in moved.items() if n.startswith("vision.")) < 2e-5
    assert max(v for n, v in moved.items() if n.startswith("llm.")) > 2e-4
    two = Trainer(_cfg(train_env, tmp_path / "s2", vision_lr=1e-5, sample_prompts=0, sample_questions=0),
                  progress=False)
    assert len(two.optimizer.param_groups) == 1  # stage 2: SigLIP frozen


def test_ema_warms_up_then_holds_the_configured_decay(train_env, tmp_path):
    """Decay min(ema, (1 + n) / (10 + n)) after update n, so a short stage's EMA is not mostly its
    starting weights (with a flat 0.99, 100 steps would keep 37% of them); the trainer applies it."""
    cfg = TrainConfig(stage="1", ema=0.99)
    assert [round(cfg.ema_decay(s), 4) for s in (0, 1, 7, 99)] == [0.1818, 0.25, 0.5, 0.9182]
    assert cfg.ema_decay(5000) == 0.99 and TrainConfig(ema=0.5).ema_decay(100) == 0.5
    trainer = Trainer(_cfg(train_env, tmp_path / "ema", stage="1", steps=3, sample_prompts=0,
                           sample_questions=0), progress=False)
    name = "gen_decoder.out_proj.weight"
    expect = trainer.params[name].detach().clone()
    for step in range(3):
        trainer.train_step()
        d = trainer.cfg.ema_decay(step)
        expect = d * expect + (1 - d) * trainer.params[name].detach()
        trainer.step += 1
        assert torch.allclose(trainer.ema[name], expect, atol=1e-7)


def test_config_errors_name_the_field(train_env, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown training config key"):
        TrainConfig.from_dict({"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="steps must be an integer"):
        TrainConfig.from_dict({"steps": "ten"})
    with pytest.raises(ConfigError, match="lr must be positive"):
        TrainConfig(lr=-1.0).validate(check_paths=False)
    with pytest.raises(ConfigError, match=r"final_lr must be in \[0, 1\]"):
        TrainConfig(final_lr=1.5).validate(check_paths=False)
    with pytest.raises(ConfigError, match=r"decay_steps must be >= 1"):
        TrainConfig(decay_steps=0).validate(check_paths=False)
    with pytest.raises(ConfigError, match="vision_lr must be positive"):
        TrainConfig(vision_lr=0.0).validate(check_paths=False)
    with pytest.raises(ConfigError, match="rf_weight must be >= 0, got -2.0"):
        TrainConfig(rf_weight=-2.0).validate(check_paths=False)
    with pytest.raises(ConfigError, match="t_std must be positive"):
        TrainConfig(t_std=0.0).validate(check_paths=False)
    with pytest.raises(ConfigError, match="attention must be one of sdpa, flex"):
        TrainConfig(attention="flash").validate(check_paths=False)
    with pytest.raises(ConfigError, match="attention: flex needs a CUDA device"):
        TrainConfig(attention="flex").validate(check_paths=False)
    with pytest.raises(ConfigError, match="procs must be >= 1, got 0"):
        TrainConfig(procs=0).validate(check_paths=False)
    with pytest.raises(ConfigError, match="procs must be 1 or 2 for stage bootstrap"):
        TrainConfig(stage="bootstrap", procs=3).validate(check_paths=False)
    with pytest.raises(ConfigError, match="init: no model directory"):
        TrainConfig(init=str(tmp_path / "none"), corpus=str(train_env / "corpus")).validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 2\nema: 1.5\n")
    assert main(["train", "--config", str(bad), "--init", str(train_env / "init"),
                 "--corpus", str(train_env / "corpus")]) == 2
    assert capsys.readouterr().err.strip() == "janusflow: error: ema must be in [0, 1), got 1.5"
    with pytest.raises(ConfigError, match="data: unknown data setting"):
        TrainConfig(data={"mixx": 1}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="stage must be one of"):
        load_config(None, stage="4", init=str(train_env / "init"), corpus=str(train_env / "corpus"))


def test_set_overrides_reach_into_sections_and_bad_ones_name_themselves(train_env, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"stage: 2\ninit: {train_env / 'init'}\ncorpus: {train_env / 'corpus'}\nlr: 1.0e-3\n"
                    "data:\n  mix: {und: 45, gen: 50, text: 5}\n")
    cfg = load_config(path, sets=["lr=5e-4", "data.mix.gen=70", "decay_steps=400", "betas=[0.9, 0.99]",
                                  "bootstrap.siglip_steps=1800", "steps=7"], steps=3)
    assert (cfg.lr, cfg.decay_steps, cfg.betas, cfg.steps) == (5e-4, 400, (0.9, 0.99), 7)
    assert cfg.data["mix"] == {"und": 45, "gen": 70, "text": 5}
    assert cfg.bootstrap.siglip_steps == 1800
    for bad, message in [("lr", "expected KEY=VALUE"), ("=1", "expected KEY=VALUE"),
                         ("data..mix=1", "expected KEY=VALUE"), ("lr.x=1", "lr is a value, not a section"),
                         ("lr=[1", "the value is not YAML"), ("learning_rat=1", "unknown training config key"),
                         ("steps=ten", "steps must be an integer")]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, sets=[bad])
    assert main(["train", "--config", str(path), "--set", "lr=-1"]) == 2
    assert capsys.readouterr().err.strip().startswith("janusflow: error: lr must be positive")


def test_example_configs_parse():
    from pathlib import Path

    import yaml

    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/shapes/*.yaml"))
    assert [p.stem for p in paths] == ["bootstrap", "stage1", "stage2", "stage3"]
    for path in paths:
        TrainConfig.from_dict(yaml.safe_load(path.read_text())).validate(check_paths=False)


def test_what_training_learns_the_sampler_draws(tmp_path):
    """End to end: corpus -> packed stream -> Trainer -> EMA export -> pipeline sampler. A model
    trained on four generation samples must, from the same noise, draw each prompt's own image:
    training and sampling agree on template, time direction, latent scaling, token layout and
    how the prompt conditions the image."""
    from transformers import AutoTokenizer

    from data.sequences import decode_image
    from data.shapes.corpus import ShapesParams, build_shapes_corpus
    from data.shards import ShardReader
    from models.processor import pil_to_tensor

    corpus = tmp_path / "four"
    build_shapes_corpus(corpus, ShapesParams(
        image_size=32, train_gen=4, train_und=1, train_text=1, heldout_gen=1, heldout_und=1,
        unseen_gen=1, unseen_und=1, eval_per_category=1, vocab_size=400, seed=5), progress=False)
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    JanusFlowPipeline.from_config("tiny", tokenizer=tok, seed=0).save_pretrained(tmp_path / "init")
    samples = [ShardReader(corpus, "train", "gen").read(i) for i in range(4)]
    prompts = [record["prompt"] for record, _ in samples]
    assert len(set(prompts)) == 4
    cfg = TrainConfig(stage="2", init=str(tmp_path / "init"), corpus=str(corpus), out=str(tmp_path / "run"),
                      steps=150, lr=3e-3, warmup=5, ema=0.8, rows=1, max_len=512, save_every=150,
                      sample_prompts=0, sample_questions=0, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                      data={"gen_template": "chat", "mix": {"und": 0, "gen": 1, "text": 0}}).validate()
    Trainer(cfg, progress=False).run()
    pipe = JanusFlowPipeline.from_pretrained(tmp_path / "run" / "model")
    # compare latents: the tiny VAE is untrained, so judge what the flow draws, not the decoder
    targets = torch.cat([pipe.model.encode_images(pil_to_tensor(decode_image(data))[None])
                         for _, data in samples])
    z = pipe(prompts, num_inference_steps=20, guidance_scale=1.0, seed=[3] * 4, output_type="latent")
    d = ((z[:, None] - targets[None]) ** 2).mean((2, 3, 4))  # (drawn, target)
    own, others = d.diagonal(), d + torch.eye(4) * 1e9
    assert torch.all(own < 0.5 * others.min(1).values), d


def test_flex_attention_inputs_give_the_dense_masks_objective(train_env, tmp_path):
    """With `attention: flex` the trainer ships the rows' (B, T) segment tensors and makes the
    BlockMask after the copy to the device; the objective's forward then equals the dense mask's.
    (CPU cannot train with FlexAttention, so the config switch is made after validation here.)"""
    from torch.nn.attention.flex_attention import BlockMask

    trainer = Trainer(_cfg(train_env, tmp_path / "flex", steps=1, prefetch=0), progress=False)
    batch, _, host = trainer.stream.next_prepared(0)
    assert host["attention_mask"].shape[-2:] == (256, 256) and "segment_ids" not in host
    trainer.cfg.attention = "flex"
    flex_host = trainer._prepare(0, batch)
    assert "attention_mask" not in flex_host and flex_host["segment_ids"].shape == (2, 256)
    outputs = []
    for attention, inputs in (("sdpa", trainer._to_device(host)), ("flex_attention", trainer._to_device(flex_host))):
        assert isinstance(inputs["attention_mask"], BlockMask) == (attention == "flex_attention")
        trainer.model.llm.set_attn_implementation(attention)
        with torch.no_grad():
            outputs.append(trainer.objective(**inputs, generator=torch.Generator().manual_seed(0)))
    trainer.model.llm.set_attn_implementation("sdpa")
    dense, flex = outputs
    for key in ("ar", "rf", "repa", "loss"):
        if key in dense:
            assert abs(float(dense[key]) - float(flex[key])) < 1e-5, key
    assert "rf" in dense and "ar" in dense


def test_tracker_sends_buffered_metrics_in_batches_and_all_of_them_at_the_end(train_env, tmp_path, monkeypatch):
    from flows.train import tracking

    cfg = _cfg(train_env, tmp_path / "buffered", steps=1)
    tracker = tracking.Tracker(cfg, run_id=None, parent_run_id=None, tags={})
    sent, real = [], tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch",
                        lambda run_id, **kw: (sent.append(len(kw["metrics"])), real(run_id, **kw))[1])
    monkeypatch.setattr(tracking, "FLUSH_METRICS", 10)
    for step in range(1, 8):
        tracker.log_metrics({"a": step, "b": -step}, step)  # two values a step: due after five steps
    assert sent == [10]
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "a")] == [1, 2, 3, 4, 5]
    (tmp_path / "buffered").mkdir()
    tracker.finish(tmp_path / "buffered", status="FINISHED")
    assert sent == [10, 4]
    assert sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "b")) == \
        [(s, -float(s)) for s in range(1, 8)]


def test_processes_that_open_a_fresh_mlflow_database_together_all_get_their_run(tmp_path):
    """Stages or sweeps started at the same moment on a new sqlite file: MLflow's table creation is
    done under a lock, and the experiment is created once (without: 'table experiments already
    exists' in one of two processes, seen 2026-12-02)."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    code = ("import sys, time; from flows.train.tracking import experiment_id, open_client\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "c = open_client(sys.argv[1]); print(c.create_run(experiment_id(c, 'janusflow')).info.run_id)\n")
    start = time.time() + 8  # after every interpreter has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outs]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("janusflow").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for out, _ in outs)
