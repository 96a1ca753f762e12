"""`make demo`: the whole pipeline on the embedded shapes world, offline on CPU.

It runs the Prefect flow `train-all` (data -> bootstrap -> stages 1-3 -> evaluate -> gate ->
registry -> champion smoke test) in this process, with a temporary Prefect server, then leaves a
few images and answers of the registry's champion under runs/demo/ (README: "What the demo shows").
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

SHOWCASE_PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow circles",
                    "a red square left of a blue circle", "three triangles",
                    "a purple square and an orange triangle", "a circle"]


def champion_showcase(out: Path, *, corpus: str | Path = "data/corpora/shapes", steps: int = 30,
                      guidance: float = 3.0, questions: int = 8) -> dict:
    """Images and answers from models:/janusflow@champion, loaded the way MLflow serves it."""
    import mlflow
    import pandas as pd
    from PIL import Image

    from flows.evaluate.evaluate import questions as read_questions
    from flows.train.samples import grid

    model = mlflow.pyfunc.load_model("models:/janusflow@champion")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "steps": steps, "guidance": guidance, "seed": i}
            for i, p in enumerate(SHOWCASE_PROMPTS)]
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in model.predict(pd.DataFrame(rows))]
    for i, image in enumerate(images):
        image.save(out / f"image-{i:02d}.png")
    grid(images, SHOWCASE_PROMPTS).save(out / "images.png")
    qa = read_questions(corpus, "heldout", questions)
    encoded = []
    for image, question, _ in qa:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append({"image": base64.b64encode(buf.getvalue()).decode(), "question": question})
    answers = model.predict(pd.DataFrame(encoded)) if encoded else []
    answered = [{"question": q, "expected": a, "answer": got} for (_, q, a), got in zip(qa, answers)]
    for k, (image, _, _) in enumerate(qa):
        image.save(out / f"question-{k:02d}.png")
    (out / "answers.json").write_text(json.dumps(answered, indent=2))
    return {"images": len(images), "answers": answered, "out": str(out)}


def run_demo(out: Path) -> dict:
    from flows.evaluate.gate import describe
    from flows.pipeline import EVAL_DIR, ROOT, GateFailed, train_all

    start = time.perf_counter()
    try:
        summary = train_all(root=str(ROOT), showcase=str(out))
    except GateFailed as exc:
        minutes = (time.perf_counter() - start) / 60
        print(f"\n== demo stopped at the gate after {minutes:.1f} min: {exc}")
        print(describe(json.loads((ROOT / EVAL_DIR / "gate.json").read_text())))
        print(f"  report: {ROOT / EVAL_DIR / 'report' / 'report.md'}")
        raise SystemExit(1) from None
    minutes = (time.perf_counter() - start) / 60
    metrics = summary["metrics"]
    print(f"\n== demo finished in {minutes:.1f} min")
    for key in ("geneval_overall", "vqa_accuracy", "fd_fenc", "clip_score"):
        if key in metrics:
            print(f"  {key}: {metrics[key]:.4f}")
    print(f"  champion: version {summary['promotion']['version']} "
          f"({'promoted' if summary['promotion']['promoted'] else 'kept'}: {summary['promotion']['reason']})")
    print(f"  images and answers of the champion: {out}/images.png, {out}/answers.json")
    serving = summary.get("serving") or {}
    if serving:
        print(f"  ONNX export: {ROOT / 'runs/shapes/export'}; served over HTTP ({serving['backend']}): "
              f"image in {serving['image_seconds']} s, '{serving['question']}' -> '{serving['answer']}'")
    report = {"minutes": round(minutes, 2), **summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    return report
