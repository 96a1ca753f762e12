"""`janusflow register | promote | rollback`: the MLflow model registry from the command line."""

from __future__ import annotations

import json
from pathlib import Path


def _read_json(path: str, flag: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: {p} is not JSON ({exc})") from None


def promotion_params(params: str | None) -> dict:
    """params.yaml `promote:` (primary metric, margin), with defaults."""
    import yaml

    spec = {"primary": "geneval_overall", "margin": 0.02}
    if params and Path(params).is_file():
        spec.update((yaml.safe_load(Path(params).read_text()) or {}).get("promote") or {})
    unknown = sorted(set(spec) - {"primary", "margin"})
    if unknown:
        raise ValueError(f"unknown key(s) in 'promote': {', '.join(unknown)}")
    if not isinstance(spec["margin"], (int, float)) or spec["margin"] < 0:
        raise ValueError(f"promote.margin must be a number >= 0, got {spec['margin']!r}")
    return spec


def cmd_register(args) -> None:
    from flows.registry import log_and_register, promote_challenger

    metrics = _read_json(args.metrics, "--metrics")
    gate = _read_json(args.gate, "--gate")
    spec = promotion_params(args.params)
    version = log_and_register(args.model, metrics, gate, run_id=args.run_id)
    decision = promote_challenger(version, primary=spec["primary"], margin=float(spec["margin"]),
                                  run_id=args.run_id)
    print(f"registered janusflow version {version} as challenger; "
          f"{'promoted to champion' if decision.promoted else 'not promoted'}: {decision.reason}")
    if args.out:
        Path(args.out).write_text(json.dumps(decision.to_dict(), indent=2) + "\n")


def cmd_promote(args) -> None:
    from flows.registry import promote

    version = promote(args.version, force=args.force)
    print(f"janusflow version {version} is now champion")


def cmd_rollback(args) -> None:
    from flows.registry import rollback

    old, new = rollback()
    print(f"champion rolled back from version {old} to version {new}")


def add_registry_commands(sub) -> None:
    reg = sub.add_parser("register", help="log + register an evaluated model, promote it if the rules allow")
    reg.add_argument("--model", required=True)
    reg.add_argument("--metrics", required=True)
    reg.add_argument("--gate", required=True, help="gate.json from `janusflow gate`")
    reg.add_argument("--params", default="params.yaml", help="params.yaml with `promote:`")
    reg.add_argument("--run-id", default=None, help="MLflow run to log the model under (the evaluation's)")
    reg.add_argument("--out", default=None, help="write the decision as JSON")
    reg.set_defaults(func=cmd_register)

    pro = sub.add_parser("promote", help="make a registered version champion")
    pro.add_argument("--version", required=True)
    pro.add_argument("--force", action="store_true", help="even if it failed its gates")
    pro.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", help="champion goes back to the version it replaced")
    rb.set_defaults(func=cmd_rollback)
