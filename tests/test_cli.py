import json

import numpy as np
import pytest
from PIL import Image

from flows.cli import main


def test_summary_json(capsys):
    assert main(["model", "summary", "--preset", "janusflow-1.3b", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    p = summary["parameters"]
    assert set(p) == {"llm", "f_enc", "und_aligner", "g_enc", "g_dec", "gen_aligners", "repa_head", "vae"}
    assert summary["total"] == sum(p.values()) and summary["gen_tokens"] == 576


def test_init_generate_ask(tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["model", "init", "--preset", "tiny", "--out", str(model)]) == 0
    out = tmp_path / "images"
    assert main(["generate", "--model", str(model), "--prompt", "a red circle", "--n", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (32, 32)
    capsys.readouterr()
    assert main(["ask", "--model", str(model), "--image", str(images[0]), "--question", "What colour?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""
    # --dtype bf16: the torch backend's weights in bf16 (AMX CPUs run it faster), the same images
    # to bf16's rounding; exported graphs keep their own precision, so other backends refuse it
    half = tmp_path / "bf16"
    assert main(["generate", "--model", str(model), "--prompt", "a red circle", "--n", "2",
                 "--steps", "2", "--out", str(half), "--dtype", "bf16"]) == 0
    a, b = (np.asarray(Image.open(d / "000.png"), dtype=np.int16) for d in (out, half))
    assert 0 < np.abs(a - b).max() <= 8 and np.abs(a - b).mean() < 2  # 5 and 0.68 seen
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--backend", "onnxruntime", "--dtype", "bf16",
                 "--prompt", "x", "--out", str(half)]) == 2
    assert "--dtype bf16 sets the torch backends' weights" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["ask", "--model", str(model), "--image", str(bad), "--question", "q"]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_export_then_generate_on_onnxruntime(tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["model", "init", "--preset", "tiny", "--out", str(model)]) == 0
    export = tmp_path / "export"
    assert main(["export", "--model", str(model), "--out", str(export),
                 "--graphs", "prefix", "velocity", "vae_decoder"]) == 0
    assert "onnxruntime vs PyTorch max |diff|" in capsys.readouterr().out
    out = tmp_path / "images"
    assert main(["generate", "--model", str(export), "--backend", "onnxruntime", "--prompt", "a red circle",
                 "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 2
    # --workers 2: the two rows run on two onnxruntime session sets, the same images
    split = tmp_path / "split"
    assert main(["generate", "--model", str(export), "--backend", "onnxruntime", "--workers", "2",
                 "--prompt", "a red circle", "--n", "2", "--steps", "2", "--out", str(split)]) == 0
    for name in ("000.png", "001.png"):
        a, b = (np.asarray(Image.open(d / name), dtype=np.int16) for d in (out, split))
        assert np.abs(a - b).max() <= 1
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(export), "--backend", "onnxruntime", "--workers", "0",
              "--prompt", "x", "--out", str(split)])
    assert "--workers: must be a positive integer, got '0'" in capsys.readouterr().err
    # the torch backend needs weights, an export needs onnxruntime/tensorrt: one-line errors, exit 2
    assert main(["generate", "--model", str(export), "--prompt", "x", "--out", str(out)]) == 2
    assert "is an export directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "--backend", "onnxruntime", "--prompt", "x",
                 "--out", str(out)]) == 2
    assert "janusflow export" in capsys.readouterr().err
