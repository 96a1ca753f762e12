"""`janusflow train`: one training stage from a YAML config, with CLI overrides."""

from __future__ import annotations


PARENT_RUN_ENV = "JANUSFLOW_PARENT_RUN_ID"  # set by the Prefect pipeline: stage runs nest under it


def cmd_train(args) -> None:
    import os

    from flows.train.config import load_config

    parent = os.environ.get(PARENT_RUN_ENV) or None
    cfg = load_config(args.config, stage=args.stage, init=args.init, corpus=args.corpus,
                      out=args.out, steps=args.steps)
    if cfg.procs > 1 and cfg.stage != "bootstrap" and "WORLD_SIZE" not in os.environ:
        raise SystemExit(launch_processes(args, cfg.procs))
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
    argv += ["--resume"] * args.resume + ["--quiet"] * args.quiet
    threads = max(1, len(os.sched_getaffinity(0)) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "flows.cli", "train", *argv]
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        print(f"janusflow: error: training failed in one of its {procs} processes (exit "
              f"{done.returncode}); see the output above", file=sys.stderr)
    return done.returncode


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="run one training stage (bootstrap, 1, 2 or 3)")
    train.add_argument("--config", default=None, help="YAML training config (see configs/)")
    train.add_argument("--stage", default=None, choices=["bootstrap", "1", "2", "3"])
    train.add_argument("--init", default=None, help="model directory to start from")
    train.add_argument("--corpus", default=None)
    train.add_argument("--out", default=None)
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint under OUT/checkpoints")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)
