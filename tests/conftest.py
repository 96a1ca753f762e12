import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from models.pipeline import JanusFlowPipeline

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pipe() -> JanusFlowPipeline:
    """A randomly initialised tiny model; tests must not modify it (copy it if they train)."""
    return JanusFlowPipeline.from_config("tiny", seed=0)


@pytest.fixture
def tiny_copy() -> JanusFlowPipeline:
    return JanusFlowPipeline.from_config("tiny", seed=0)


# The release's generation path and each `gen` option that departs from it (models/config.py).
GEN_VARIANTS = {"release": {}, "full_attention": {"image_attention": "full"},
                "no_skip": {"skip": False}, "dec_prompt": {"dec_prompt": True}}


def tiny_variant(name: str) -> JanusFlowPipeline:
    """A fresh tiny pipeline whose `gen` config has the options of GEN_VARIANTS[name]."""
    from models.config import preset

    config = preset("tiny")
    for key, value in GEN_VARIANTS[name].items():
        setattr(config.gen, key, value)
    return JanusFlowPipeline.from_config(config, seed=0)


def randomize_(model, seed: int = 1) -> None:
    """Give every zero-initialised parameter (GRN gamma/beta, ...) random values so tests see
    every tensor's effect, not the identity they start as."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vae."):
                continue
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


SMALL_SHAPES = dict(seed=0, image_size=64, train_gen=60, train_und=60, train_text=30, heldout_gen=12,
                    heldout_und=12, unseen_gen=8, unseen_und=8, eval_per_category=2,
                    vocab_size=600, shard_size=25)


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory):
    """A small shapes corpus (several shards per kind), built once per session."""
    from data.shapes.corpus import ShapesParams, build_shapes_corpus

    root = tmp_path_factory.mktemp("corpus") / "shapes"
    build_shapes_corpus(root, ShapesParams.from_dict(SMALL_SHAPES), progress=False)
    return root


@pytest.fixture(scope="session")
def shapes_processor(shapes_corpus):
    from models.config import preset
    from models.processor import JanusFlowProcessor

    return JanusFlowProcessor.from_pretrained(shapes_corpus / "tokenizer", preset("shapes"))


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
    """A tiny corpus (32 px, vocab 400) and a tiny init model for the training tests."""
    from transformers import AutoTokenizer

    from data.shapes.corpus import ShapesParams, build_shapes_corpus

    root = tmp_path_factory.mktemp("train")
    build_shapes_corpus(root / "corpus", ShapesParams(
        image_size=32, train_gen=40, train_und=40, train_text=20, heldout_gen=2, heldout_und=2,
        unseen_gen=2, unseen_und=2, eval_per_category=1, vocab_size=400), progress=False)
    tok = AutoTokenizer.from_pretrained(str(root / "corpus" / "tokenizer"))
    JanusFlowPipeline.from_config("tiny", tokenizer=tok, seed=0).save_pretrained(root / "init")
    return root
