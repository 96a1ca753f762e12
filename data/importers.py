"""`janusflow data import`: real data into the corpus format, bad samples skipped and counted.

Sources:
- folder: an image folder plus a captions file, JSONL ({"image": path, "caption": text, "id"?})
  or CSV with the same columns; paths are relative to the folder;
- llava:  a LLaVA-style JSON list of {"id", "image"?, "conversations": [{"from", "value"}]};
- wds:    WebDataset tar shards (a .tar file or a folder of them) with an image member and a
          caption in .txt or in .json ("caption", "text" or "prompt").
Captioned images become generation samples (prompt = caption) and caption-style understanding
samples; LLaVA conversations become understanding samples. Nothing a sample holds can stop the
import: it is skipped and counted by reason. Only a valid fraction below the threshold fails it.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data.shapes.text import CAPTION_QUESTION
from data.shards import IMAGE_EXTS, AtomicDir, DataError, ShardWriter, iter_tar, write_manifest
from data.validate import DEFAULT_MAX_PIXELS, Skip, check_image, check_text, decode_utf8
from models.tokenizer import IMAGE

FORMATS = ("folder", "llava", "wds")
LLAVA_IMAGE = "<image>"


@dataclass
class ImportReport:
    source: str
    format: str
    total: int = 0
    valid: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)       # converted/re-encoded images
    examples: dict[str, list[str]] = field(default_factory=dict)  # first few ids per reason
    written: dict[str, int] = field(default_factory=dict)

    @property
    def valid_fraction(self) -> float:
        return self.valid / self.total if self.total else 0.0

    def skip(self, sample_id: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(sample_id)

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "total": self.total,
                "valid": self.valid, "valid_fraction": round(self.valid_fraction, 6),
                "skipped": dict(sorted(self.skipped.items())), "notes": dict(sorted(self.notes.items())),
                "examples": dict(sorted(self.examples.items())), "written": self.written}


@dataclass
class Raw:
    """A sample as read from the source, before validation."""

    id: str | None
    image: bytes | None = None
    caption: object = None
    turns: list[tuple[str, str]] | None = None
    needs_image: bool = True
    error: str | None = None     # a reason found while reading (bad UTF-8, bad JSON, ...)


# -- readers ----------------------------------------------------------------------------------------
def _lines_jsonl(path: Path) -> Iterator[tuple[int, dict | str]]:
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield n, "not_utf8"
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            yield n, "malformed_record"
            continue
        yield n, row if isinstance(row, dict) else "malformed_record"


def _rows_csv(path: Path) -> Iterator[tuple[int, dict | str]]:
    # surrogateescape keeps bad bytes as lone surrogates, so one bad row cannot spoil the rest
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "image" not in reader.fieldnames:
        raise DataError(f"{path}: a captions CSV needs a header with 'image' and 'caption' columns")
    for n, row in enumerate(reader, 2):
        yield n, row


def read_folder(src: Path, captions: Path | None) -> Iterator[Raw]:
    if captions is None:
        found = [p for p in (src / "captions.jsonl", src / "captions.csv") if p.is_file()]
        if not found:
            raise DataError(f"{src}: no captions.jsonl or captions.csv; pass --captions FILE")
        captions = found[0]
    if not captions.is_file():
        raise DataError(f"captions file {captions} does not exist")
    rows = _rows_csv(captions) if captions.suffix.lower() == ".csv" else _lines_jsonl(captions)
    for n, row in rows:
        if isinstance(row, str):
            yield Raw(id=f"line{n}", error=row)
            continue
        rel = row.get("image")
        if not isinstance(rel, str) or not rel:
            yield Raw(id=str(row.get("id") or f"line{n}"), error="missing_image")
            continue
        sample_id = str(row.get("id") or Path(rel).with_suffix("").as_posix())
        image, error = _read_inside(src, rel)
        yield Raw(id=sample_id, image=image, caption=row.get("caption"), error=error)


def _read_inside(root: Path, rel: str) -> tuple[bytes | None, str | None]:
    """(bytes or None when missing, 'bad_path' for a path that leaves root)."""
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        return None, "bad_path"
    return (path.read_bytes() if path.is_file() else None), None


def read_llava(path: Path) -> Iterator[Raw]:
    image_root = path.parent
    try:
        records = json.loads(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: a LLaVA file is a JSON list of records")
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            yield Raw(id=f"record{n}", error="malformed_record")
            continue
        sample_id = str(rec.get("id", f"record{n}"))
        turns, error = _llava_turns(rec.get("conversations"))
        if error:
            yield Raw(id=sample_id, error=error)
            continue
        rel = rec.get("image")
        expected = 1 if rel else 0
        if sum(u.count(IMAGE) + a.count(IMAGE) for u, a in turns) != expected or \
                (expected and IMAGE not in turns[0][0]):
            yield Raw(id=sample_id, error="unbalanced_image_placeholders")
            continue
        image, error = _read_inside(image_root, str(rel)) if rel else (None, None)
        yield Raw(id=sample_id, image=image, turns=turns, needs_image=bool(rel), error=error)


def _llava_turns(conv) -> tuple[list[tuple[str, str]], str | None]:
    """[(human, gpt), ...] with <image> renamed to our placeholder, or an error reason."""
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return [], "malformed_conversation"
    turns = []
    for k in range(0, len(conv), 2):
        q, a = conv[k], conv[k + 1]
        if not (isinstance(q, dict) and isinstance(a, dict) and q.get("from") == "human"
                and a.get("from") == "gpt"):
            return [], "malformed_conversation"
        try:
            user = check_text(q.get("value"), field="text").replace(LLAVA_IMAGE, IMAGE)
            answer = check_text(a.get("value"), field="text")
        except Skip as s:
            return [], s.reason
        if LLAVA_IMAGE in answer or IMAGE in answer:
            return [], "unbalanced_image_placeholders"
        turns.append((user, answer))
    return turns, None


def read_wds(src: Path) -> Iterator[Raw]:
    shards = sorted(src.glob("*.tar")) if src.is_dir() else [src]
    if not shards:
        raise DataError(f"{src}: no .tar shards found")
    for shard in shards:
        try:
            for key, files in iter_tar(shard):
                yield _wds_sample(f"{shard.stem}/{key}", key, files)
        except (DataError, tarfile.TarError, OSError, EOFError):
            yield Raw(id=shard.name, error="unreadable_shard")


def _wds_sample(where: str, key: str, files: dict[str, bytes]) -> Raw:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    try:
        if "txt" in files:
            caption = decode_utf8(files["txt"], field="caption")
        elif "json" in files:
            meta = json.loads(decode_utf8(files["json"], field="caption"))
            caption = next((meta[k] for k in ("caption", "text", "prompt") if k in meta), None) \
                if isinstance(meta, dict) else None
        else:
            caption = None
    except Skip as s:
        return Raw(id=where, error=s.reason)
    except json.JSONDecodeError:
        return Raw(id=where, error="malformed_record")
    return Raw(id=key, image=image, caption=caption)


# -- import -----------------------------------------------------------------------------------------
def import_corpus(src: str | Path, out: str | Path, *, fmt: str, captions: str | Path | None = None,
                  kinds: tuple[str, ...] = ("gen", "und"), min_valid_fraction: float = 0.5,
                  max_pixels: int = DEFAULT_MAX_PIXELS, non_rgb: str = "convert",
                  shard_size: int = 1000, name: str | None = None,
                  progress: bool = True) -> tuple[dict, ImportReport]:
    """Import `src` into the corpus directory `out` (split 'train'); returns (manifest, report).

    Raises DataError when the source cannot be read at all or when fewer than
    min_valid_fraction of its samples are valid; the report is then written next to `out`.
    """
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise DataError(f"unknown import format {fmt!r}: choose from {', '.join(FORMATS)}")
    if not src.exists():
        raise DataError(f"import source {src} does not exist")
    if not 0.0 <= min_valid_fraction <= 1.0:
        raise DataError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}")
    bad_kinds = sorted(set(kinds) - {"gen", "und"})
    if bad_kinds or not kinds:
        raise DataError(f"kinds must be a non-empty subset of gen,und, got {','.join(kinds)}")
    reader = {"folder": lambda: read_folder(src, Path(captions) if captions else None),
              "llava": lambda: read_llava(src), "wds": lambda: read_wds(src)}[fmt]()
    report = ImportReport(source=str(src), format=fmt)
    seen: set[str] = set()
    with AtomicDir(out) as root:
        writers = {k: ShardWriter(root, "train", k, shard_size=shard_size)
                   for k in (("und",) if fmt == "llava" else kinds)}
        for raw in tqdm(reader, desc=f"import {src.name}", unit="sample", disable=not progress):
            report.total += 1
            try:
                _write(raw, writers, seen, report, max_pixels=max_pixels, non_rgb=non_rgb)
                report.valid += 1
            except Skip as s:
                report.skip(raw.id or "?", s.reason)
        for w in writers.values():
            w.close()
        report.written = {k: w.count for k, w in writers.items()}
        if report.total == 0 or report.valid_fraction < min_valid_fraction:
            failed = out.with_name(out.name + ".import_report.json")
            failed.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            reasons = ", ".join(f"{k} {v}" for k, v in report.skipped.most_common(4))
            raise DataError(f"import of {src}: {report.valid} of {report.total} samples valid "
                            f"({report.valid_fraction:.0%} < threshold {min_valid_fraction:.0%})"
                            f"{'; skipped: ' + reasons if reasons else ''}; report in {failed}")
        (root / "import_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        manifest = write_manifest(root, name=name or out.name, counts={"train": report.written},
                                  source={"import": fmt, "path": str(src)})
    return manifest, report


def _write(raw: Raw, writers: dict, seen: set[str], report: ImportReport, *, max_pixels: int,
           non_rgb: str) -> None:
    if raw.error:
        raise Skip(raw.error)
    sample_id = check_text(raw.id, field="id")
    if sample_id in seen:
        raise Skip("duplicate_id")
    key = f"s{len(seen):08d}"
    image = ext = note = None
    if raw.needs_image:
        image, ext, note = check_image(raw.image, max_pixels=max_pixels, non_rgb=non_rgb)
    if raw.turns is not None:
        record = {"id": sample_id, "task": "conversation",
                  "conversation": [{"user": u, "assistant": a} for u, a in raw.turns]}
        writers["und"].write(key, record, image, ext or "png")
    else:
        caption = check_text(raw.caption, field="caption")
        if "gen" in writers:
            writers["gen"].write(key, {"id": sample_id, "prompt": caption}, image, ext)
        if "und" in writers:
            turn = {"user": f"{IMAGE}\n{CAPTION_QUESTION}", "assistant": caption}
            writers["und"].write(key, {"id": sample_id, "task": "caption", "conversation": [turn]},
                                 image, ext)
    seen.add(sample_id)
    if note:
        report.notes[note] += 1
