"""Stage bootstrap on `tiny`: VAE, SigLIP and LLM trained on the corpus, saved, resumable."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import SiglipModel

from flows.train.bootstrap import Bootstrap
from flows.train.config import BootstrapConfig, ConfigError, TrainConfig
from models.checkpoint import from_pretrained


def _boot_cfg(env, out, procs: int = 1, **bootstrap):
    parts = dict(preset="tiny", vae_steps=4, vae_batch=4, siglip_steps=4, siglip_batch=8, llm_steps=12,
                 llm_batch=4, llm_seq_len=32, warmup=2)
    parts.update(bootstrap)
    return TrainConfig.from_dict(dict(stage="bootstrap", corpus=str(env / "corpus"), out=str(out), procs=procs,
                                      tracking_uri=f"sqlite:///{env}/mlflow.db", bootstrap=parts)).validate()


@pytest.fixture(scope="module")
def booted(train_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("boot") / "run"
    boot = Bootstrap(_boot_cfg(train_env, out), progress=False)
    fresh = {n: p.detach().clone() for n, p in boot.model.named_parameters()}
    boot.run()
    return out, fresh, boot


def test_bootstrap_trains_the_three_parts_and_saves_a_model(booted):
    out, fresh, boot = booted
    model, processor = from_pretrained(out / "model")
    params = dict(model.named_parameters())
    for part in ("vae.", "vision.", "llm."):
        changed = [n for n in params if n.startswith(part) and not torch.equal(params[n], fresh[n])]
        assert changed, part
    # untouched parts keep their initialisation (stage 1 trains them)
    assert torch.equal(params["gen_decoder.out_proj.weight"], fresh["gen_decoder.out_proj.weight"])
    # the latent scaling factor makes the training images' latents unit-variance
    images = boot._images()
    assert model.config.vae.scaling_factor != 1.0
    assert float(model.encode_images(images).std()) == pytest.approx(1.0, abs=1e-3)
    # f_enc is the trained SigLIP's vision tower; the whole SiglipModel is kept for evaluation
    siglip = SiglipModel.from_pretrained(str(out / "siglip"))
    vision = siglip.vision_model.state_dict()
    for name, value in model.vision.state_dict().items():
        assert torch.equal(value, vision[name]), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    llm = [r["llm_loss"] for r in rows if "llm_loss" in r]
    assert len(llm) == 12 and llm[-1] < llm[0]
    assert {"vae_recon", "vae_kl", "siglip_loss", "siglip_top1", "vae_latent_std"} <= {k for r in rows for k in r}
    run = MlflowClient(tracking_uri=boot.cfg.tracking_uri).search_runs(
        [MlflowClient(tracking_uri=boot.cfg.tracking_uri).get_experiment_by_name("janusflow").experiment_id],
        filter_string="tags.stage = 'bootstrap'")
    assert run and run[0].info.status == "FINISHED"


def test_resume_skips_finished_parts(booted, train_env):
    out, _, _ = booted
    before = (out / "metrics.jsonl").read_text()
    weights = (out / "parts" / "llm.safetensors").read_bytes()
    resumed = Bootstrap(_boot_cfg(train_env, out), resume=True, progress=False)
    resumed.run()
    assert (out / "metrics.jsonl").read_text() == before  # no step trained again
    assert (out / "parts" / "llm.safetensors").read_bytes() == weights
    model, _ = from_pretrained(out / "model")
    assert model.config.vae.scaling_factor == resumed.model.config.vae.scaling_factor
    assert torch.equal(model.llm.lm_head.weight, resumed.model.llm.lm_head.weight)


def test_two_processes_train_the_same_parts(booted, train_env, tmp_path):
    """procs: 2 trains the VAE and then the LLM in a spawned process: the same weights, scaling,
    metrics rows and MLflow history as the one-process run (up to the threads' summation order)."""
    one, fresh, _ = booted
    out = tmp_path / "two"
    boot = Bootstrap(_boot_cfg(train_env, out, procs=2), progress=False)
    boot.run()
    a, _ = from_pretrained(one / "model")
    b, _ = from_pretrained(out / "model")
    pb = dict(b.named_parameters())
    compared = 0
    for name, p in a.named_parameters():  # Adam turns summation-order noise into up to lr-sized steps,
        moved = float((p.detach() - fresh[name]).abs().max())  # so compare with how far training moved
        if moved > 1e-4:  # (not e.g. attention key biases, whose gradient is zero up to rounding)
            assert float((p - pb[name]).detach().abs().max()) <= 0.02 * moved, name
            compared += name.startswith(("vae.", "llm."))
    assert compared > 30
    assert b.config.vae.scaling_factor == pytest.approx(a.config.vae.scaling_factor, rel=1e-5)
    both = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, out)]
    key = lambda r: (r["step"], sorted(r))  # noqa: E731 - the second process's rows come last
    seq, par = (sorted(r, key=key) for r in both)
    assert [key(r) for r in seq] == [key(r) for r in par]
    for x, y in zip(seq, par):
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    client = MlflowClient(tracking_uri=boot.cfg.tracking_uri)
    run_id = json.loads((out / "parts" / "meta.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "vae_loss")] == [1, 2, 3, 4]
    assert min(m.step for m in client.get_metric_history(run_id, "siglip_loss")) == 5
    assert [m.step for m in client.get_metric_history(run_id, "llm_loss")] == list(range(9, 21))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (out / "parts" / "side.threads").exists()  # the hand-over of the first process's threads
    # Run to run the two-process bootstrap is exact, whenever the hand-over of the threads happens:
    # the same bytes, so a DVC rerun reproduces its outputs (on the same machine and torch build).
    again = tmp_path / "again"
    Bootstrap(_boot_cfg(train_env, again, procs=2), progress=False).run()
    files = sorted(f.relative_to(out / "model") for f in (out / "model").rglob("*") if f.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert (out / "model" / f).read_bytes() == (again / "model" / f).read_bytes(), f


def test_a_failing_second_process_fails_the_bootstrap_in_one_line(train_env, tmp_path):
    boot = Bootstrap(_boot_cfg(train_env, tmp_path / "nan", procs=2, vae_lr=1e30, vae_steps=6), progress=False)
    with pytest.raises(ValueError, match=r"^bootstrap vae \(second process\) failed: ValueError: bootstrap "
                                         r"step \d+: non-finite loss"):
        boot.run()
    assert not (tmp_path / "nan" / "parts" / "vae.safetensors").exists()


def test_the_second_processs_llm_fails_after_its_vae_is_saved_and_resume_trains_only_the_llm(train_env, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^bootstrap llm \(second process\) failed: ValueError: bootstrap "
                                         r"step (9|1\d|20): non-finite loss"):
        Bootstrap(_boot_cfg(train_env, out, procs=2, llm_lr=1e30), progress=False).run()
    parts = out / "parts"
    assert (parts / "vae.safetensors").is_file() and (parts / "siglip.safetensors").is_file()
    assert not (parts / "llm.safetensors").exists()
    vae = (parts / "vae.safetensors").read_bytes()
    boot = Bootstrap(_boot_cfg(train_env, out, procs=2), resume=True, progress=False)
    boot.run()
    assert (parts / "vae.safetensors").read_bytes() == vae  # loaded, not trained again
    rows = [json.loads(line) for line in (parts / "side.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(9, 21)) and all("llm_loss" in r for r in rows)
    assert from_pretrained(out / "model")[0].config.vae.scaling_factor == boot.model.config.vae.scaling_factor


def test_sigmoid_loss_is_siglips_own_and_hard_negatives_only_add_negative_terms():
    from flows.train.siglip_losses import sigmoid_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 4) * 3
    eye = torch.eye(4)
    # transformers' SiglipModel loss: mean over images of -sum log sigmoid(+-logit)
    own = -torch.nn.functional.logsigmoid((2 * eye - 1) * logits).sum(-1).mean()
    assert float(sigmoid_loss(logits)) == pytest.approx(float(own), rel=1e-6)
    extra = torch.randn(4, 3) * 3
    with_negatives = sigmoid_loss(torch.cat([logits, extra], 1))
    assert float(with_negatives - sigmoid_loss(logits)) == pytest.approx(
        float(-torch.nn.functional.logsigmoid(-extra).sum() / 4), rel=1e-6)


def test_siglip_logits_are_siglipmodels_own_in_fp32_and_the_query_head_reads_its_token():
    """The bootstrap runs SigLIP's towers itself (under autocast where `dtype` is bf16): its logits
    equal SiglipModel.forward's; the query head's last block, which computes only the query token,
    gives what the full block gives at that token."""
    from transformers import SiglipConfig

    from flows.train.siglip_losses import QueryHead, siglip_logits

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = SiglipModel(SiglipConfig(text_config=dict(small, vocab_size=50, max_position_embeddings=8),
                                     vision_config=dict(small, image_size=16, patch_size=8))).eval()
    ids, pixels = torch.randint(50, (3, 8)), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
        ours = siglip_logits(model, model.vision_model(pixel_values=pixels).pooler_output,
                             model.text_model(input_ids=ids).pooler_output)
    assert torch.allclose(ours, out.logits_per_image, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = siglip_logits(model, model.vision_model(pixel_values=pixels).pooler_output,
                              model.text_model(input_ids=ids).pooler_output)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, out.logits_per_image, atol=0.5)

    head = QueryHead(32, 4, 5, heads=2).eval()
    feats, asks = torch.randn(3, 6, 32), torch.tensor([0, 3, 1])
    x = torch.cat([head.query(asks)[:, None], feats], 1)
    full = head.blocks[1](head.blocks[0](x))[:, 0]
    assert torch.allclose(head(feats, asks), head.out(full), atol=1e-5)


def test_captions_longer_than_the_text_tower_are_cut_and_counted(train_env, tmp_path, capsys):
    boot = Bootstrap(_boot_cfg(train_env, tmp_path / "run", vae_steps=0, llm_steps=0, siglip_steps=1,
                               siglip_text_len=8), progress=False)
    boot.run()
    _, captions, _ = boot._captioned_images()
    long = sum(len(boot.processor.tokenizer.encode(c, add_special_tokens=False)) >= 8 for c in captions)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert long > 0 and [r["siglip_captions_cut"] for r in rows if "siglip_captions_cut" in r] == [long]
    assert f"{long} of {len(captions)} captions are longer than bootstrap.siglip_text_len=8" in capsys.readouterr().out
    assert SiglipModel.from_pretrained(str(tmp_path / "run" / "siglip")).config.text_config.max_position_embeddings == 8
    with pytest.raises(ConfigError, match="siglip_text_len >= 8"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"siglip_text_len": 4}}).validate()


def test_siglip_trains_with_hard_negative_captions(train_env, tmp_path):
    """siglip_negatives: 1 adds one counterfactual caption per image and step as a negative: the same
    seeds without them train different weights."""
    from flows.train.siglip_losses import NegativeCaptions

    trained = {}
    for n in (0, 1):
        boot = Bootstrap(_boot_cfg(train_env, tmp_path / f"neg{n}", siglip_negatives=n, vae_steps=0,
                                   llm_steps=0), progress=False)
        boot.run()
        trained[n] = SiglipModel.from_pretrained(str(tmp_path / f"neg{n}" / "siglip")).state_dict()
    _, captions, scenes = boot._captioned_images()
    assert all(scenes)  # the shapes corpus stores every generation sample's scene
    negatives = NegativeCaptions(scenes, 2, seed=0).for_batch([0, 1, 2])
    assert len(negatives) == 6 and not set(negatives) & set(captions[:3])
    assert NegativeCaptions(scenes, 0, seed=0).for_batch([0, 1]) == []
    name = "text_model.embeddings.token_embedding.weight"
    assert not torch.equal(trained[0][name], trained[1][name])


def test_siglip_learns_from_object_queries(train_env, tmp_path):
    """siglip_queries: a head asks the shape of an object named by its (unique) colour; SigLIP's
    vision tower learns from it, the head is not saved, and the metrics record it."""
    from data.shapes.world import COLOURS, SHAPES
    from flows.train.siglip_losses import ObjectQueries

    trained = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"q{w}"
        boot = Bootstrap(_boot_cfg(train_env, out, siglip_queries=w, vae_steps=0, llm_steps=0), progress=False)
        boot.run()
        trained[w] = SiglipModel.from_pretrained(str(out / "siglip")).vision_model.state_dict()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        asked = [r for r in rows if "siglip_query" in r]
        assert len(asked) == (4 if w else 0)
        assert all(0.0 <= r["siglip_query_acc"] <= 1.0 and r["siglip_query"] > 0 for r in asked)
    name = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[0.0][name], trained[1.0][name])
    assert set(trained[0.0]) == set(trained[1.0])  # the head is not part of SigLIP
    from_pretrained(tmp_path / "q1.0" / "model")  # the model directory loads as before

    _, _, scenes = boot._captioned_images()
    vision = boot.siglip_model().config.vision_config
    queries = ObjectQueries(scenes, vision, seed=0, kinds=("shape", "colour", "count"))
    colours = sorted(COLOURS)
    # query tokens: 6 colours, 3 shapes, "how many"; answers: 3 shapes, 6 colours, counts 1-4
    assert (queries.head.query.num_embeddings, queries.head.out.out_features) == (10, 13)
    for scene, answers in zip(scenes, queries.answers):
        objects = scene["objects"]
        colour_of = [o["colour"] for o in objects]
        shape_of = [o["shape"] for o in objects]
        assert set(answers.get("shape", [])) == {
            (colours.index(o["colour"]), SHAPES.index(o["shape"])) for o in objects
            if colour_of.count(o["colour"]) == 1}
        assert set(answers.get("colour", [])) == {
            (6 + SHAPES.index(o["shape"]), 3 + colours.index(o["colour"])) for o in objects
            if shape_of.count(o["shape"]) == 1}
        assert answers["count"] == [(9, 9 + len(objects) - 1)]
    assert sum("shape" in a for a in queries.answers) > len(scenes) // 2
    # the default asks shapes only; one batch asks every kind a scene allows
    assert all(set(a) <= {"shape"} for a in ObjectQueries(scenes, vision, seed=0).answers)
    asked = [a for i in range(8) for a in _asks(queries, list(range(len(scenes))))]
    assert {0 <= q < 6 for q in asked} == {True, False} and 9 in asked and any(6 <= q < 9 for q in asked)
    loss, acc = queries.loss(torch.randn(3, 16, queries.head.out.in_features, requires_grad=True), [0, 1, 2])
    loss.backward()
    assert loss > 0 and 0 <= float(acc) <= 1


def _asks(queries, idx):
    """The query tokens one loss() call asks (read off the head's input)."""
    seen = []
    hook = queries.head.query.register_forward_hook(lambda m, args, out: seen.extend(args[0].tolist()))
    queries.loss(torch.randn(len(idx), 16, queries.head.out.in_features), idx)
    hook.remove()
    return seen


def test_resume_under_another_tracking_store_logs_to_a_new_run(booted, train_env, tmp_path, capsys):
    """A resumed stage whose MLflow run is not in the current store (MLFLOW_TRACKING_URI changed)
    warns and opens a new run instead of failing."""
    import shutil

    out = tmp_path / "moved"
    shutil.copytree(booted[0], out)
    cfg = _boot_cfg(train_env, out)
    cfg.tracking_uri = f"sqlite:///{tmp_path}/other.db"
    old_run = json.loads((out / "parts" / "meta.json").read_text())["run_id"]
    Bootstrap(cfg, resume=True, progress=False).run()
    new_run = json.loads((out / "parts" / "meta.json").read_text())["run_id"]
    assert new_run != old_run
    assert MlflowClient(tracking_uri=cfg.tracking_uri).get_run(new_run).info.status == "FINISHED"
    assert f"MLflow run {old_run} of the checkpoint is not in" in capsys.readouterr().err


def test_bootstrap_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="bootstrap.vae_lr must be a number"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"vae_lr": "fast"}})
    with pytest.raises(ConfigError, match="unknown key.*'bootstrap'.*vae_step"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"vae_step": 3}})
    with pytest.raises(ConfigError, match="bootstrap.preset must be one of"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"preset": "huge"}}).validate()
    with pytest.raises(ConfigError, match="bootstrap.vae_steps must be >= 0"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"vae_batch": 1}}).validate()
    with pytest.raises(ConfigError, match="siglip_negatives >= 0"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"siglip_negatives": -1}}).validate()
    with pytest.raises(ConfigError, match="siglip_queries >= 0"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"siglip_queries": -1.0}}).validate()
    with pytest.raises(ConfigError, match=r"siglip_query_kinds must be a non-empty list of shape, colour, "
                                          r"count, got \['size'\]"):
        TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"siglip_query_kinds": ["size"]}}).validate()
    for model, match in (({"llm": {"hidden": 3}}, r"bootstrap.model: unknown config key\(s\) in 'llm': hidden"),
                         ({"llm": {"num_hidden_layers": "six"}}, "bootstrap.model: llm.num_hidden_layers must be an integer"),
                         ({"llm": {"num_key_value_heads": 3}}, "bootstrap.model: llm.num_attention_heads .4. must be a multiple"),
                         ({"gen": {"patch_size": 3}}, "bootstrap.model: gen.image_size"),
                         ([3], "bootstrap.model must be a mapping")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict({"stage": "bootstrap", "bootstrap": {"model": model}}).validate()


def test_bootstrap_model_overrides_size_the_model(train_env, tmp_path):
    """bootstrap.model resizes the preset (here a 3-block LLM with full image attention) and the saved
    model, which the next stage starts from, carries it."""
    cfg = _boot_cfg(train_env, tmp_path / "run", vae_steps=1, siglip_steps=1, llm_steps=2,
                    model={"llm": {"num_hidden_layers": 3, "intermediate_size": 96},
                           "gen": {"image_attention": "full"}})
    Bootstrap(cfg, progress=False).run()
    model, _ = from_pretrained(tmp_path / "run" / "model")
    assert len(model.llm.model.layers) == 3 and model.config.llm.intermediate_size == 96
    assert model.llm.model.layers[0].mlp.up_proj.out_features == 96
    assert model.config.gen.full_image_attention and model.config.llm.hidden_size == 64  # tiny's width kept
    # resuming with another size: the saved LLM part does not fit, which is one clear error
    other = _boot_cfg(train_env, tmp_path / "run", vae_steps=1, siglip_steps=1, llm_steps=2)
    with pytest.raises(ValueError, match=r"--resume: .*llm.safetensors does not fit .*size mismatch"):
        Bootstrap(other, resume=True, progress=False).run()


def test_clip_score_reads_the_bootstrap_siglip_with_its_training_tokens(booted, train_env):
    """clip_score tokenizes as the bootstrap trained (text + EOS, padded to the tower's length):
    the scores equal the trained model's own cosine similarities on those token rows."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, SiglipModel

    from flows.evaluate.evaluate import clip_score
    from flows.train.siglip_losses import siglip_text_ids
    from models.processor import pil_to_tensor

    out = booted[0]
    images = [Image.new("RGB", (32, 32), c) for c in ((220, 40, 40), (40, 80, 220))]
    prompts = ["a red circle", "a blue square"]
    score = clip_score(out / "siglip", images, prompts)
    model = SiglipModel.from_pretrained(str(out / "siglip")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "siglip"))
    cfg = model.config.text_config
    ids = siglip_text_ids(tok, prompts, cfg.max_position_embeddings, eos_id=cfg.eos_token_id,
                          pad_id=cfg.pad_token_id)
    assert (ids[:, -1] == cfg.pad_token_id).all() and cfg.eos_token_id in ids[0].tolist()
    with torch.no_grad():
        o = model(input_ids=ids, pixel_values=torch.stack([pil_to_tensor(i) for i in images]))
    expected = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).mean()
    assert -1.0 <= score <= 1.0 and score == pytest.approx(float(expected), abs=1e-5)


def test_random_crops_are_windows_of_each_image_at_their_own_offsets():
    from flows.train.bootstrap import random_crops

    images = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).view(16, 3, 8, 8)
    crops = random_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (16, 3, 4, 4)
    offsets = set()
    for image, crop in zip(images, crops):
        y, x = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        assert torch.equal(crop, image[:, y:y + 4, x:x + 4])
        offsets.add((y, x))
    assert len(offsets) > 4


def test_vae_trains_on_crops_first_then_whole_images(train_env, tmp_path):
    cfg = _boot_cfg(train_env, tmp_path / "crop", vae_steps=4, vae_crop=8, vae_crop_steps=3)
    boot = Bootstrap(cfg, progress=False)
    size = boot.model.config.gen.image_size
    assert size > 8
    sizes, encode = [], boot.model.vae.encode
    boot.model.vae.encode = lambda x: (sizes.append(tuple(x.shape[-2:])), encode(x))[1]
    boot.out.mkdir(parents=True)
    with open(boot.out / "metrics.jsonl", "w") as boot.log:
        boot.train_vae(None)
    assert sizes[:4] == [(8, 8)] * 3 + [(size, size)]
    with pytest.raises(ConfigError, match=r"^bootstrap\.vae_crop must be 0 or a multiple"):
        _boot_cfg(train_env, tmp_path / "bad", vae_crop=6)
    with pytest.raises(ConfigError, match=r"^bootstrap\.vae_crop_steps must be in \[0, vae_steps=4\]"):
        _boot_cfg(train_env, tmp_path / "bad", vae_crop=8, vae_crop_steps=5)


def test_each_part_cools_down_over_the_last_fraction_of_its_steps(train_env, tmp_path):
    """`cooldown: f`: warm-up, constant LR, then a linear decay to 0 over the last f of a part's steps
    (the stages' schedule, `lr_schedule`)."""
    cfg = _boot_cfg(train_env, tmp_path / "cool", llm_steps=8, llm_lr=1e-3, warmup=2, cooldown=0.25)
    boot = Bootstrap(cfg, progress=False)
    lrs, update = [], boot._update
    boot._update = lambda opt, loss, lr: (lrs.append(lr), update(opt, loss, lr))[1]
    boot.out.mkdir(parents=True)
    with open(boot.out / "metrics.jsonl", "w") as boot.log:
        boot.train_llm(None)
    assert lrs == pytest.approx([5e-4] + [1e-3] * 5 + [5e-4, 0.0])
    assert [BootstrapConfig(warmup=2).lr_factor(i, 8) for i in range(8)] == [0.5] + [1.0] * 7  # the default
    with pytest.raises(ConfigError, match=r"^bootstrap\.cooldown must be in \[0, 1\]"):
        _boot_cfg(train_env, tmp_path / "bad", cooldown=1.5)


def test_a_part_takes_the_threads_the_other_process_leaves(train_env, tmp_path):
    from flows.train.bootstrap_side import _read_threads

    boot = Bootstrap(_boot_cfg(train_env, tmp_path / "threads"), progress=False)
    before = torch.get_num_threads()
    checks = []
    boot.freed_threads = lambda: (checks.append(1), 3 if len(checks) >= 3 else 0)[1]
    seen = []
    try:
        torch.set_num_threads(1)
        for _ in boot._steps("vae", 5):
            seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 3, 3, 3] and len(checks) == 3 and boot.freed_threads is None
    handover = tmp_path / "side.threads"
    assert _read_threads(handover) == 0  # not written yet
    handover.write_text("")
    assert _read_threads(handover) == 0  # caught half-written
    handover.write_text("2")
    assert _read_threads(handover) == 2


def test_bf16_trains_siglip_and_the_llm_in_autocast_and_the_vae_in_fp32(train_env, tmp_path):
    """`dtype: bf16`: SigLIP (its logits and losses in fp32) and the LLM part run under bf16 autocast,
    attention in fp32 and the saved configs back on plain SDPA; the VAE, which lost quality in bf16,
    trains exactly as in fp32."""
    def boot(dtype):
        out = tmp_path / dtype
        cfg = _boot_cfg(train_env, out, vae_steps=2, siglip_steps=3, llm_steps=3, siglip_queries=1.0)
        cfg.dtype = dtype
        b = Bootstrap(cfg.validate(), progress=False)
        b.run()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return b, {k: [r[k] for r in rows if k in r] for k in ("vae_loss", "siglip_loss", "siglip_query", "llm_loss")}

    b32, fp32 = boot("fp32")
    b16, bf16 = boot("bf16")
    assert b16.dtype == "bf16" and b32.dtype == "fp32"
    assert bf16["vae_loss"] == fp32["vae_loss"]
    for part in ("siglip_loss", "siglip_query", "llm_loss"):
        assert bf16[part] != fp32[part], part
        assert bf16[part] == pytest.approx(fp32[part], rel=0.05), part
    model, _ = from_pretrained(tmp_path / "bf16" / "model")
    assert model.llm.config._attn_implementation == "sdpa"
    siglip = SiglipModel.from_pretrained(str(tmp_path / "bf16" / "siglip"))
    assert siglip.config._attn_implementation == "sdpa" and siglip.text_model.config._attn_implementation == "sdpa"
