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


def randomize_(model, seed: int = 1) -> None:
    """Give every zero-initialised parameter (GRN gamma/beta, ...) random values so tests see
    every tensor's effect, not the identity they start as."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vae."):
                continue
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
