"""`janusflow data ...` from the command line: shapes, import, verify, stats, encode."""

import json

import yaml

from conftest import SMALL_SHAPES
from flows.cli import main


def test_shapes_verify_and_stats(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": SMALL_SHAPES, "pack": {"max_len": 512}}))
    out, metrics = tmp_path / "corpus", tmp_path / "metrics.json"
    assert main(["data", "shapes", "--out", str(out), "--params", str(params), "--seed", "4",
                 "--quiet", "--metrics", str(metrics)]) == 0
    assert "train und 60 gen 60 text 30" in capsys.readouterr().out
    m = json.loads(metrics.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["seed"] == 4 and m["data_version"] == manifest["hash"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["packing"]["max_len"] == 512 and stats["packing"]["efficiency_mean"] >= 0.95
    assert stats["splits"]["train"]["held_out_pair_objects"] == 0
    assert "Packing at max_len 512" in (out / "stats.md").read_text()

    assert main(["data", "verify", str(out)]) == 0
    (out / "train" / "text-000000.tar").write_bytes(b"changed")
    assert main(["data", "verify", str(out)]) == 2
    assert "differ from the manifest" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"train_gen": -3}}))
    assert main(["data", "shapes", "--out", str(tmp_path / "c"), "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "janusflow: error: data.train_gen must be >= 0, got -3"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "captions.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    assert main(["data", "import", "folder", str(raw), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("janusflow: error: import of") and "missing_image 1" in err
    assert len(err.splitlines()) == 1


def test_encode_fills_the_latent_cache(tmp_path, tiny_pipe, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {**SMALL_SHAPES, "image_size": 32, "train_gen": 5,
                                               "train_und": 2, "train_text": 2}}))
    corpus, model = tmp_path / "c", tmp_path / "m"
    assert main(["data", "shapes", "--out", str(corpus), "--params", str(params), "--quiet"]) == 0
    tiny_pipe.save_pretrained(model)
    capsys.readouterr()
    assert main(["data", "encode", "--corpus", str(corpus), "--model", str(model),
                 "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    assert "encoded 5, already cached 0" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 5
