"""torchrun with 2 CPU processes on gloo reproduces 1 process with the same global batch; a config's
`procs: 2` starts the same two processes from a plain `janusflow train`."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from flows.train.trainer import Trainer
from models.checkpoint import from_pretrained
from test_train import _cfg, _losses


def _train(cfg, tmp_path, launcher: list[str], *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{cfg.parallel}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *launcher, "-m", "flows.cli", "train", "--config", str(path),
                           "--quiet", *extra], env=env, capture_output=True, text=True, timeout=300)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def one_process(train_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    cfg = _cfg(train_env, out, steps=3, grad_accum=2, save_every=3)
    Trainer(cfg, progress=False).run()
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(train_env, one_process, tmp_path, mode):
    # ddp: `procs: 2` in the config, started as one plain process; fsdp: started by torchrun. Both
    # read the frozen encoders' outputs from a latent cache the two processes fill together (the
    # one-process run encodes them live)
    # (ddp's config says 2 steps and `--set steps=3` overrides it: the launcher passes it on to both)
    procs = 2 if mode == "ddp" else 1
    cfg = _cfg(train_env, tmp_path / mode, steps=3 if procs == 1 else 2, grad_accum=1, save_every=3,
               parallel=mode, procs=procs, latent_cache=str(tmp_path / "cache"))
    done = _train(cfg, tmp_path, [] if procs > 1 else TORCHRUN, *(["--set", "steps=3"] if procs > 1 else []))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _losses(one_process), _losses(tmp_path / mode)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert len(list((tmp_path / "cache").glob("*/*/*.safetensors"))) == 40  # train_env's generation images
    assert all(r["latent_cache_hit_rate"] == 1.0 for r in b)
    for x, y in zip(a, b):
        assert y["samples"] == x["samples"]  # the same micro-batches, split over the ranks
        for k in ("loss", "ar", "rf", "repa", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    m1, _ = from_pretrained(one_process / "model")
    m2, _ = from_pretrained(tmp_path / mode / "model")
    p2 = dict(m2.named_parameters())
    moved = 0
    for name, p in m1.named_parameters():
        assert torch.allclose(p, p2[name], atol=2e-5), name
        moved += name.startswith("gen_decoder")
    assert moved
    meta = json.loads(next((tmp_path / mode / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3
    # each process encoded its half; the run records the sum
    metrics = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(meta["run_id"]).data.metrics
    assert (metrics["latent_cache_encoded"], metrics["latent_cache_reused"]) == (40, 0)


def test_more_processes_than_gpus_is_one_line_before_joining(monkeypatch):
    """A process whose local rank has no GPU (e.g. `procs: 2` on a one-GPU machine) stops with one
    line naming the setting, before it waits for a process group that would never form."""
    from flows.train.distributed import init_world

    gpus = torch.cuda.device_count()
    monkeypatch.setenv("WORLD_SIZE", str(max(2, gpus + 1)))
    monkeypatch.setenv("RANK", str(gpus))
    monkeypatch.setenv("LOCAL_RANK", str(gpus))
    with pytest.raises(ValueError, match=rf"local process {gpus} has no GPU of its own \({gpus} visible\)"):
        init_world("cuda")


def test_a_rank_without_a_kind_of_sample_in_its_rows_does_not_break_the_step(train_env, tmp_path):
    """With rows of one short sample each and a text-heavy mix, one rank's micro-batch often holds no
    generation (or no understanding) sample while the other's does: the loss terms summed over the
    ranks must still line up (they crashed gloo's all-reduce with a size mismatch before)."""
    cfg = _cfg(train_env, tmp_path / "run", steps=6, rows=1, max_len=96, grad_accum=1, save_every=6,
               parallel="ddp", procs=2, data={"mix": {"und": 30, "gen": 30, "text": 40}})
    done = _train(cfg, tmp_path, [])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _losses(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in rows) and any("rf" in r for r in rows) and any("ar" in r for r in rows)
