"""`janusflow gate`: compare metrics with the thresholds in params.yaml (`gate:`) and decide.

Each threshold is `metric: {min: x}` (the metric must be >= x), `{max: x}` (<= x) or both. A
metric the evaluation did not produce fails its gate: a model is never passed on missing evidence.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def parse_thresholds(spec: dict) -> dict[str, dict[str, float]]:
    """Validate `gate:` from params.yaml; a bad entry is a one-line error naming it."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError("params: `gate` must map metric names to {min: x} and/or {max: x}")
    out = {}
    for metric, bounds in spec.items():
        if not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}:
            raise ValueError(f"gate.{metric} must be {{min: x}}, {{max: x}} or both, got {bounds!r}")
        for key, value in bounds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"gate.{metric}.{key} must be a finite number, got {value!r}")
        out[metric] = {k: float(v) for k, v in bounds.items()}
    return out


def decide(metrics: dict, thresholds: dict[str, dict[str, float]]) -> dict:
    """{"passed": bool, "checks": [{metric, value, op, threshold, passed}, ...]}."""
    checks = []
    for metric, bounds in thresholds.items():
        value = metrics.get(metric)
        ok_value = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        for key, threshold in bounds.items():
            op = ">=" if key == "min" else "<="
            passed = ok_value and (value >= threshold if key == "min" else value <= threshold)
            checks.append({"metric": metric, "value": value if ok_value else None, "op": op,
                           "threshold": threshold, "passed": bool(passed)})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def run_gate(metrics_path: str | Path, params_path: str | Path, out: str | Path) -> dict:
    import yaml

    metrics_file, params_file = Path(metrics_path), Path(params_path)
    if not metrics_file.is_file():
        raise FileNotFoundError(f"--metrics: {metrics_file} does not exist (run `janusflow eval` first)")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--metrics: {metrics_file} is not JSON ({exc})") from None
    params = yaml.safe_load(params_file.read_text()) or {}
    decision = decide(metrics, parse_thresholds(params.get("gate")))
    decision["metrics_file"] = str(metrics_file)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(decision, indent=2) + "\n")
    return decision


def describe(decision: dict) -> str:
    lines = [f"gate {'PASSED' if decision['passed'] else 'FAILED'}"]
    for c in decision["checks"]:
        value = "missing" if c["value"] is None else f"{c['value']:.4f}"
        lines.append(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['metric']} = {value} "
                     f"(needs {c['op']} {c['threshold']:g})")
    return "\n".join(lines)
