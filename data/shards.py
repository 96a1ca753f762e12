"""The on-disk corpus format: WebDataset-style tar shards, a manifest and random access.

A corpus is a directory `<root>/<split>/<kind>-NNNNNN.tar` plus `manifest.json`. Each sample is a
group of tar members sharing a key: `<key>.json` (always) and `<key>.png|jpg|webp` (when the
sample has an image). Kinds are `und` (a conversation about an image), `gen` (a prompt and its
image) and `text` (a document). Tars are written byte-deterministically (sorted keys, zeroed
owner and times), so a corpus is a pure function of its inputs and DVC sees identical hashes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KINDS = ("und", "gen", "text")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
FORMAT = "janusflow-corpus"
FORMAT_VERSION = 1


class DataError(ValueError):
    """A corpus or a data source that cannot be used; the message says what to change."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class ShardWriter:
    """Writes samples of one split and kind into numbered tar shards of `shard_size` samples."""

    def __init__(self, root: str | Path, split: str, kind: str, *, shard_size: int = 1000):
        if kind not in KINDS:
            raise DataError(f"unknown sample kind {kind!r}: choose from {', '.join(KINDS)}")
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(root) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kind, self.shard_size = kind, shard_size
        self.count = 0
        self.files: list[Path] = []
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, record: dict, image: bytes | None = None, image_ext: str = "png") -> None:
        """Add one sample; `record` is its JSON metadata, `image` its encoded image bytes."""
        if "." in key or "/" in key:
            raise DataError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self.count % self.shard_size == 0:
            self._open_next()
        body = json.dumps({"kind": self.kind, **record}, sort_keys=True, ensure_ascii=False)
        self._tar.addfile(*_member(f"{key}.json", body.encode("utf-8")))
        if image is not None:
            self._tar.addfile(*_member(f"{key}.{image_ext}", image))
        self.count += 1

    def _open_next(self) -> None:
        self.close()
        path = self.dir / f"{self.kind}-{len(self.files):06d}.tar"
        self.files.append(path)
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member: the key ends at the first '.' of the base name,
    as WebDataset reads it ('dir/0001.seg.png' -> ('dir/0001', 'seg.png'))."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def iter_tar(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar, members grouped by key.

    The key is everything before the first '.' of the member's base name, as WebDataset does.
    Unreadable tars raise DataError; members that are not regular files are ignored.
    """
    try:
        tar = tarfile.open(path, "r")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar file ({e})") from e
    key, files = None, {}
    with tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = member_key(m.name)
            if k != key and key is not None:
                yield key, files
                files = {}
            key = k
            files[ext.lower()] = tar.extractfile(m).read()
    if key is not None:
        yield key, files


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    json: tuple[int, int]             # (offset, size) of the JSON member's data
    image: tuple[int, int] | None     # the same for the image member


class ShardReader:
    """Random access to the samples of one split and kind (an index of tar member offsets)."""

    def __init__(self, root: str | Path, split: str, kind: str):
        self.paths = sorted((Path(root) / split).glob(f"{kind}-*.tar"))
        self.refs: list[SampleRef] = []
        for path in self.paths:
            self.refs += _index(path)

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, i: int) -> tuple[dict, bytes | None]:
        """(record, image bytes or None) of sample i."""
        ref = self.refs[i]
        with open(ref.shard, "rb") as f:
            f.seek(ref.json[0])
            record = json.loads(f.read(ref.json[1]).decode("utf-8"))
            image = None
            if ref.image is not None:
                f.seek(ref.image[0])
                image = f.read(ref.image[1])
        return record, image

    def __iter__(self) -> Iterator[tuple[dict, bytes | None]]:
        for i in range(len(self)):
            yield self.read(i)


def _index(path: Path) -> list[SampleRef]:
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if m.isfile():
                key, ext = member_key(m.name)
                groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
    refs = []
    for key, members in groups.items():
        if "json" not in members:
            raise DataError(f"{path}: sample {key!r} has no .json member")
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        refs.append(SampleRef(path, members["json"], image))
    return refs


# -- manifest ---------------------------------------------------------------------------------------
def write_manifest(root: str | Path, *, name: str, source: dict, counts: dict) -> dict:
    """Hash every file under root and write manifest.json; returns it.

    `hash` (sha256 over the sorted file list and file hashes) is the corpus' data version, the
    value training records. The manifest itself and stats files are not part of it.
    """
    root = Path(root)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in ("manifest.json", "stats.json", "stats.md"):
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    digest = hashlib.sha256("".join(f"{k}:{v['sha256']}\n" for k, v in files.items()).encode())
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "source": source,
                "counts": counts, "hash": digest.hexdigest(), "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{root}: no manifest.json; build the corpus with `janusflow data shapes` "
                        "or `janusflow data import`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a janusflow corpus manifest")
    return manifest


def verify(root: str | Path) -> list[str]:
    """Files whose bytes no longer match the manifest (empty when the corpus is intact)."""
    root = Path(root)
    bad = []
    for rel, info in read_manifest(root)["files"].items():
        path = root / rel
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            bad.append(rel)
    return bad


class AtomicDir:
    """Build a directory under a temporary name and move it into place only on success."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.tmp = self.target.with_name(f".{self.target.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            shutil.rmtree(self.target)
        self.tmp.rename(self.target)
