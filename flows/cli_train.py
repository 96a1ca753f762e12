"""`janusflow train`: one training stage from a YAML config, with CLI overrides."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path


PARENT_RUN_ENV = "JANUSFLOW_PARENT_RUN_ID"  # set by the Prefect pipeline: stage runs nest under it


def cmd_train(args) -> None:
    with sigterm_unwinds():
        _train(args)


def _train(args) -> None:
    import os

    from flows.train.config import load_config

    parent = os.environ.get(PARENT_RUN_ENV) or None
    cfg = load_config(args.config, sets=args.set or [], stage=args.stage, init=args.init,
                      corpus=args.corpus, out=args.out, steps=args.steps)
    if cfg.procs > 1 and cfg.stage != "bootstrap" and "WORLD_SIZE" not in os.environ:
        code = launch_processes(args, cfg.procs)
        if code:
            raise SystemExit(code)
        return
    if cfg.stage == "bootstrap":
        from flows.train.bootstrap import Bootstrap

        model_dir = Bootstrap(cfg, resume=args.resume, parent_run_id=parent, progress=not args.quiet).run()
        print(f"stage bootstrap: trained VAE, SigLIP and LLM; model in {model_dir}")
        return
    from flows.train.distributed import close_world
    from flows.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, parent_run_id=parent, progress=not args.quiet)
    try:
        model_dir = trainer.run()
    finally:
        close_world(trainer.world)
    if trainer.world.main:
        print(f"stage {cfg.stage}: trained {cfg.steps} steps; EMA model in {model_dir}")


def launch_processes(args, procs: int) -> int:
    """Run this same command in `procs` local processes under torchrun (the config was checked
    here first, so a bad one fails once, in one line). Each process gets an equal share of the
    CPU threads unless OMP_NUM_THREADS is set. Returns the exit code of the group."""
    import os
    import subprocess
    import sys

    argv = ["--config", args.config] if args.config else []
    for flag in ("stage", "init", "corpus", "out", "steps"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    for item in args.set or []:
        argv += ["--set", item]
    argv += ["--resume"] * args.resume + ["--quiet"] * args.quiet
    threads = max(1, len(os.sched_getaffinity(0)) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    # each process imports this very package, whatever the working directory holds
    root = Path(__file__).resolve().parents[1]
    entry = f"import sys; sys.path.insert(0, {str(root)!r}); from flows.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "--no-python", sys.executable, "-c", entry, "train", *argv]
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM here: torchrun passes it on to the processes
        proc.terminate()
        proc.wait()
        raise
    if code:
        print(f"janusflow: error: training failed in one of its {procs} processes (exit {code}); "
              "see the output above", file=sys.stderr)
    return code


@contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM (a scheduler cancelling the run) raises SystemExit, so the stage's
    cleanup runs: a second process or a torchrun group is stopped, the MLflow run marked failed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="run one training stage (bootstrap, 1, 2 or 3)")
    train.add_argument("--config", default=None, help="YAML training config (see configs/)")
    train.add_argument("--stage", default=None, choices=["bootstrap", "1", "2", "3"])
    train.add_argument("--init", default=None, help="model directory to start from")
    train.add_argument("--corpus", default=None)
    train.add_argument("--out", default=None)
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one config value, after the YAML and the flags above (repeatable; "
                            "dotted keys reach into sections: --set lr=5e-4 --set data.mix.gen=70)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint under OUT/checkpoints")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)
