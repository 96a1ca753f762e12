"""`janusflow data import`: every bad-input case is skipped and counted; the rest is usable."""

import io
import json
import tarfile

import pytest
from PIL import Image

from data.importers import import_corpus
from data.shards import DataError, ShardReader, read_manifest, verify
from data.stream import SequenceSource


def _png(size=(40, 30), mode="RGB", colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else None).save(buf, format="PNG")
    return buf.getvalue()


def _encode(image, fmt):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _write_folder(root):
    """21 captions: 6 good RGB, 4 non-RGB, 11 bad, one of each reason."""
    root.mkdir()
    rows = []
    for i in range(5):
        (root / f"good{i}.png").write_bytes(_png(colour=(40 * i, 100, 100)))
        rows.append({"image": f"good{i}.png", "caption": f"a picture number {i}"})
    (root / "photo.jpg").write_bytes(_encode(Image.new("RGB", (50, 40), (10, 200, 10)), "JPEG"))
    rows.append({"image": "photo.jpg", "caption": "a green photo", "id": "photo"})
    modes = {"grey.png": Image.new("L", (30, 30), 90), "cmyk.jpg": Image.new("CMYK", (30, 30), (0, 50, 50, 0)),
             "palette.png": Image.new("P", (30, 30), 3), "alpha.png": Image.new("RGBA", (30, 30), (0, 0, 255, 128))}
    for name, image in modes.items():
        (root / name).write_bytes(_encode(image, "JPEG" if name.endswith("jpg") else "PNG"))
        rows.append({"image": name, "caption": f"a {name}"})
    (root / "truncated.png").write_bytes(_png((64, 64))[:60])
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "huge.png").write_bytes(_png((400, 400)))
    (root / "nocap.png").write_bytes(_png())
    rows += [{"image": "truncated.png", "caption": "x"}, {"image": "zero.png", "caption": "x"},
             {"image": "text.png", "caption": "x"}, {"image": "huge.png", "caption": "x"},
             {"image": "nocap.png"}, {"image": "nocap.png", "caption": "   ", "id": "blank"},
             {"image": "good0.png", "caption": "again", "id": "good0"},  # duplicate id
             {"image": "missing.png", "caption": "x"}, {"image": "../outside.png", "caption": "x"}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(3, b'{"image": "good1.png", "caption": "caf\xe9 au lait"}')  # latin-1, not UTF-8
    lines.insert(7, b'{"image": "good2.png", "caption": ')                    # broken JSON
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


FOLDER_SKIPS = {"bad_path": 1, "corrupt_image": 1, "duplicate_id": 1, "empty_caption": 1,
                "empty_file": 1, "malformed_record": 1, "missing_caption": 1, "missing_image": 1,
                "not_an_image": 1, "not_utf8": 1, "too_many_pixels": 1}


def test_folder_import_counts_every_reason(tmp_path):
    src = _write_folder(tmp_path / "raw")
    manifest, report = import_corpus(src, tmp_path / "corpus", fmt="folder", max_pixels=100_000,
                                     min_valid_fraction=0.4, progress=False)
    assert report.total == 21 and report.valid == 10
    assert dict(report.skipped) == FOLDER_SKIPS
    assert dict(report.notes) == {"converted_CMYK": 1, "converted_L": 1, "converted_P": 1,
                                  "converted_RGBA": 1}
    assert report.written == {"gen": 10, "und": 10}
    assert manifest["counts"]["train"] == {"gen": 10, "und": 10}
    saved = json.loads((tmp_path / "corpus" / "import_report.json").read_text())
    assert saved["skipped"] == FOLDER_SKIPS and saved["examples"]["duplicate_id"] == ["good0"]
    assert verify(tmp_path / "corpus") == []
    # every stored image decodes as RGB; the JPEG is kept as JPEG bytes
    records = list(ShardReader(tmp_path / "corpus", "train", "gen"))
    assert all(Image.open(io.BytesIO(img)).mode == "RGB" for _, img in records)
    assert {r["id"] for r, _ in records} >= {"photo", "good0", "grey"}


def test_non_rgb_can_be_skipped_instead(tmp_path):
    src = _write_folder(tmp_path / "raw")
    _, report = import_corpus(src, tmp_path / "corpus", fmt="folder", max_pixels=100_000,
                              min_valid_fraction=0.2, non_rgb="skip", progress=False)
    assert report.valid == 6
    for mode in ("L", "CMYK", "P", "RGBA"):
        assert report.skipped[f"non_rgb_{mode}"] == 1


def test_import_fails_below_the_threshold_and_keeps_the_report(tmp_path):
    src = _write_folder(tmp_path / "raw")
    with pytest.raises(DataError, match=r"10 of 21 samples valid \(48% < threshold 50%\)"):
        import_corpus(src, tmp_path / "corpus", fmt="folder", max_pixels=100_000, progress=False)
    assert not (tmp_path / "corpus").exists()
    assert not list(tmp_path.glob(".corpus.tmp-*"))
    report = json.loads((tmp_path / "corpus.import_report.json").read_text())
    assert report["valid"] == 10 and report["skipped"]["not_utf8"] == 1


def test_csv_captions(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(_png())
    (src / "captions.csv").write_bytes(b'image,caption\n0.png,"a red, small box"\n1.png,na\xefve\n2.png,\n')
    _, report = import_corpus(src, tmp_path / "c", fmt="folder", kinds=("gen",),
                              min_valid_fraction=0.3, progress=False)
    assert report.valid == 1 and dict(report.skipped) == {"not_utf8": 1, "empty_caption": 1}
    (record, _), = ShardReader(tmp_path / "c", "train", "gen")
    assert record["prompt"] == "a red, small box"


def test_llava_conversations(tmp_path):
    src = tmp_path / "llava"
    src.mkdir()
    (src / "img.png").write_bytes(_png())
    good = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "a", "image": "img.png", "conversations": good + [{"from": "human", "value": "Sure?"},
                                                                  {"from": "gpt", "value": "yes"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "two-tags", "image": "img.png", "conversations": [
            {"from": "human", "value": "<image><image> x"}, {"from": "gpt", "value": "y"}]},
        {"id": "tag-no-image", "conversations": good},
        {"id": "image-no-tag", "image": "img.png", "conversations": [
            {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "gpt-first", "image": "img.png", "conversations": list(reversed(good))},
        {"id": "odd", "image": "img.png", "conversations": good[:1]},
        {"id": "gone", "image": "missing.png", "conversations": good},
        {"id": "a", "image": "img.png", "conversations": good},
        {"id": "latin1", "image": "img.png", "conversations": [good[0], {"from": "gpt", "value": "BAD"}]},
        "not a record",
    ]
    text = json.dumps(records).replace('"Hello"', '"Hell\\u00f6"')
    data = text.encode().replace(b'"BAD"', b'"caf\xe9"')  # latin-1 bytes in a UTF-8 file
    (src / "data.json").write_bytes(data)
    manifest, report = import_corpus(src / "data.json", tmp_path / "c", fmt="llava",
                                     min_valid_fraction=0.1, progress=False)
    assert report.total == 11 and report.valid == 2
    assert dict(report.skipped) == {"not_utf8": 1, "unbalanced_image_placeholders": 3,
                                    "malformed_conversation": 2, "missing_image": 1,
                                    "duplicate_id": 1, "malformed_record": 1}
    rows = {r["id"]: (r, img) for r, img in ShardReader(tmp_path / "c", "train", "und")}
    assert rows["a"][0]["conversation"][0]["user"] == "<image_placeholder>\nWhat colour?"
    assert len(rows["a"][0]["conversation"]) == 2 and rows["text-only"][1] is None
    assert manifest["counts"]["train"] == {"und": 2}


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    _tar(src / "shard-0.tar", [
        ("0001.png", _png()), ("0001.txt", b"a red square"),
        ("0002.jpg", _encode(Image.new("RGB", (30, 20)), "JPEG")), ("0002.json", b'{"caption": "dark"}'),
        ("0003.txt", b"no image here"),
        ("0004.png", _png()), ("0004.txt", b"\xff\xfe bad"),
        ("0005.png", b"\x89PNG broken"), ("0005.txt", b"corrupt"),
        ("0006.png", _png()), ("0006.txt", b""),
    ])
    _tar(src / "shard-1.tar", [("0001.png", _png()), ("0001.txt", b"same key again")])
    (src / "shard-2.tar").write_bytes(b"this is not a tar archive at all" * 20)
    _, report = import_corpus(src, tmp_path / "c", fmt="wds", min_valid_fraction=0.2, progress=False)
    assert report.total == 8 and report.valid == 2
    assert dict(report.skipped) == {"missing_image": 1, "not_utf8": 1, "not_an_image": 1,
                                    "empty_caption": 1, "duplicate_id": 1, "unreadable_shard": 1}
    prompts = sorted(r["prompt"] for r, _ in ShardReader(tmp_path / "c", "train", "gen"))
    assert prompts == ["a red square", "dark"]


def test_imported_corpus_feeds_the_training_stream(tmp_path, shapes_processor):
    src = _write_folder(tmp_path / "raw")
    import_corpus(src, tmp_path / "corpus", fmt="folder", max_pixels=100_000, min_valid_fraction=0.4,
                  progress=False)
    source = SequenceSource(tmp_path / "corpus", "train", shapes_processor, num_gen_tokens=64,
                            gen_image_size=64, cfg_dropout=0.0)
    gen = source.encode("gen", 0, 0)
    und = source.encode("und", 0, 0)
    assert gen.image.shape == (3, 64, 64) and gen.image_key is not None
    assert und.image.shape == (3, 64, 64) and und.roles.count(1) == 65
    assert read_manifest(tmp_path / "corpus")["source"]["import"] == "folder"


def test_unreadable_sources_fail_with_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        import_corpus(tmp_path / "nope", tmp_path / "c", fmt="folder", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no captions.jsonl"):
        import_corpus(tmp_path / "empty", tmp_path / "c", fmt="folder", progress=False)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not a JSON file"):
        import_corpus(tmp_path / "x.json", tmp_path / "c", fmt="llava", progress=False)
    with pytest.raises(DataError, match="unknown import format"):
        import_corpus(tmp_path / "x.json", tmp_path / "c", fmt="parquet", progress=False)
