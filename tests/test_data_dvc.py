"""The DVC data stage from the repository's own dvc.yaml, .dvc/config and params: repro,
determinism, and push/pull through the default local remote, offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_SHAPES
from data.shards import read_manifest, verify

REPO = Path(__file__).resolve().parents[1]


def _run(cwd, *args):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def project(tmp_path):
    if shutil.which("git") is None or not (Path(sys.executable).parent / "dvc").exists():
        pytest.fail("git and the venv's dvc are needed for the DVC stage test")
    root = tmp_path / "project"
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["data"]
    for dep in stage["deps"]:
        src = REPO / dep
        if src.is_dir():
            shutil.copytree(src, root / dep, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / dep)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = dict(SMALL_SHAPES)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _run(root, "git", "init", "-q")
    return root


def test_repro_is_deterministic_and_push_pull_work_offline(project):
    corpus = project / "data" / "corpora" / "shapes"
    _run(project, "dvc", "repro", "data")
    first = read_manifest(corpus)["hash"]
    metrics = json.loads((project / "data" / "metrics" / "shapes.json").read_text())
    assert metrics["data_version"] == first and metrics["train_gen"] == SMALL_SHAPES["train_gen"]
    assert metrics["packing_efficiency"] >= 0.95
    assert "up to date" in _run(project, "dvc", "status", "data")

    _run(project, "dvc", "push", "data")
    assert any((project / ".dvc-remote").rglob("*"))  # the default local remote
    shutil.rmtree(corpus)
    shutil.rmtree(project / ".dvc" / "cache")
    _run(project, "dvc", "pull", "data")
    assert verify(corpus) == [] and read_manifest(corpus)["hash"] == first

    _run(project, "dvc", "repro", "--force", "data")
    assert read_manifest(corpus)["hash"] == first  # the same bytes again
    assert "up to date" in _run(project, "dvc", "status", "data")
