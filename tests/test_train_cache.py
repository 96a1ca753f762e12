"""Training through the latent cache (`latent_cache:`) on `tiny`: the frozen encoders' outputs are
read instead of computed, and the run trains as it would without them."""

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flows.train.trainer import Trainer
from test_train import _cfg, _losses

GEN_IMAGES = 40  # train_gen of the train_env corpus


def _run(env, out, **kw):
    trainer = Trainer(_cfg(env, out, steps=3, sample_prompts=0, sample_questions=0, **kw), progress=False)
    trainer.run()
    return trainer, _losses(out)


def _entries(cache_dir):
    return sorted(cache_dir.glob("*/*/*.safetensors"))


def _same_losses(a, b):
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "ar", "rf", "repa"):
            # the cache was encoded in batches of 32, the live path encodes each micro-batch's images:
            # the CPU's convolution kernels round by batch size (~1e-6)
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (x["step"], k)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_the_cache_trains_like_encoding_live(train_env, tmp_path, stage):
    _, live = _run(train_env, tmp_path / "live", stage=stage)
    trainer, cached = _run(train_env, tmp_path / "cached", stage=stage, latent_cache=str(tmp_path / "lc"))
    _same_losses(live, cached)
    assert [r["latent_cache_hit_rate"] for r in cached] == [1.0, 1.0, 1.0]
    assert "latent_cache_hit_rate" not in live[0]
    files = _entries(tmp_path / "lc")
    assert len(files) == GEN_IMAGES  # every training image was encoded once, at the start
    # entries hold both, but only stage 2 (SigLIP frozen) reads the REPA targets; stage 3 trains
    # SigLIP and takes them from the training model, as without a cache
    assert set(load_file(str(files[0]))) == {"latent", "repa"}
    assert trainer.cache_repa == (stage == "2")


def test_a_second_stage_reuses_the_entries_and_bad_ones_are_encoded_live(train_env, tmp_path):
    cache = tmp_path / "lc"
    _, live = _run(train_env, tmp_path / "live")
    _run(train_env, tmp_path / "first", latent_cache=str(cache))
    files = _entries(cache)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[0].write_bytes(b"not a safetensors file")
    files[1].unlink()
    # without filling: the missing and the corrupt entry are encoded live, and counted
    trainer, partial = _run(train_env, tmp_path / "partial", latent_cache=str(cache), latent_cache_fill=False)
    _same_losses(live, partial)
    assert trainer.cache.corrupt >= 1 and trainer.cache.misses >= 2
    assert min(r["latent_cache_hit_rate"] for r in partial) < 1.0
    # filling again writes only what is missing; the corrupt entry stays a counted miss
    trainer, again = _run(train_env, tmp_path / "again", latent_cache=str(cache))
    _same_losses(live, again)
    assert files[1].is_file()
    # what the fill did is on the stage's MLflow run
    run = MlflowClient(tracking_uri=trainer.cfg.tracking_uri).get_run(trainer.run_id)
    assert {k: run.data.metrics[k] for k in ("latent_cache_encoded", "latent_cache_reused",
                                             "latent_cache_not_encodable")} == \
        {"latent_cache_encoded": 1, "latent_cache_reused": GEN_IMAGES - 1, "latent_cache_not_encodable": 0}
    assert run.data.metrics["latent_cache_fill_s"] > 0
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files[2:])
