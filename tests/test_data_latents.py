"""The latent cache: keyed by image + crop under the frozen encoders' version."""

import copy

import torch

from data.latent_cache import LatentCache, encode_batch, encoder_version, fill
from data.shapes.corpus import ShapesParams, build_shapes_corpus
from data.stream import SequenceSource


def test_fill_then_read_through_the_training_keys(tmp_path, tiny_pipe):
    model, proc = tiny_pipe.model, tiny_pipe.processor
    corpus = tmp_path / "c"
    build_shapes_corpus(corpus, ShapesParams(image_size=32, train_gen=10, train_und=2, train_text=2,
                                             heldout_gen=1, heldout_und=1, unseen_gen=1, unseen_und=1,
                                             eval_per_category=1, vocab_size=300), progress=False)
    cache = LatentCache(tmp_path / "cache", encoder_version(model))
    assert fill(cache, model, corpus, batch_size=4, progress=False) == {"encoded": 10, "cached": 0, "lazy": 0}
    assert fill(cache, model, corpus, progress=False)["cached"] == 10

    source = SequenceSource(corpus, "train", proc, num_gen_tokens=model.config.num_gen_tokens,
                            gen_image_size=32)
    enc = source.encode("gen", 3, draw=17)
    hit = cache.get(enc.image_key)
    fresh = encode_batch(model, enc.image[None])[0]
    assert cache.hits == 1 and set(hit) == {"latent", "repa"}
    assert hit["latent"].shape == (model.config.vae.latent_channels, model.config.latent_size,
                                   model.config.latent_size)
    # fill encoded in batches of 4, this one alone: the CPU's convolution kernels round by batch
    # size (1.04e-6 seen on 2026-12-01), so equal means equal to fp32 rounding here
    assert torch.allclose(hit["latent"], fresh["latent"], atol=1e-5)
    assert torch.allclose(hit["repa"], fresh["repa"], atol=1e-5)


def test_a_changed_encoder_is_a_new_version(tiny_pipe):
    model = tiny_pipe.model
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.vae.parameters()).add_(1e-3)
    assert encoder_version(model) == encoder_version(copy.deepcopy(model))
    assert encoder_version(other) != encoder_version(model)
