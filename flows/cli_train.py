"""`janusflow train`: one training stage from a YAML config, with CLI overrides."""

from __future__ import annotations


PARENT_RUN_ENV = "JANUSFLOW_PARENT_RUN_ID"  # set by the Prefect pipeline: stage runs nest under it


def cmd_train(args) -> None:
    import os

    from flows.train.config import load_config

    parent = os.environ.get(PARENT_RUN_ENV) or None
    cfg = load_config(args.config, stage=args.stage, init=args.init, corpus=args.corpus,
                      out=args.out, steps=args.steps)
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
