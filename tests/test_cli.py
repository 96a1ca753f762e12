import json

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
    # the torch backend needs weights, an export needs onnxruntime/tensorrt: one-line errors, exit 2
    assert main(["generate", "--model", str(export), "--prompt", "x", "--out", str(out)]) == 2
    assert "is an export directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "--backend", "onnxruntime", "--prompt", "x",
                 "--out", str(out)]) == 2
    assert "janusflow export" in capsys.readouterr().err
