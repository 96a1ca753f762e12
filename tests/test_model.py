import pytest
import torch
from PIL import Image, ImageDraw

from models.config import preset
from models.janusflow import JanusFlow
from models.pipeline import JanusFlowPipeline
from models.processor import IGNORE_INDEX, chat_prompt

from conftest import randomize_


def scene(colour=(220, 30, 30), size=40):
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=colour)
    return image


def gen_batch(pipe, prompts, seed=0):
    cfg = pipe.config
    gen = torch.Generator().manual_seed(seed)
    batch = pipe.processor.encode_prompts(prompts)
    b = len(prompts)
    latents = torch.randn(b, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)
    pixels = torch.rand(b, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) * 2 - 1
    return batch, latents, pixels


def test_chat_template_matches_the_release():
    assert chat_prompt([("a red circle", "")]) == "<|User|>: a red circle\n\n<|Assistant|>:"
    assert chat_prompt([("q", "a"), ("q2", "")], system_prompt="S") == (
        "S\n\n<|User|>: q\n\n<|Assistant|>: a<｜end▁of▁sentence｜><|User|>: q2\n\n<|Assistant|>:")


def test_understanding_layout_and_labels(tiny_pipe):
    proc = tiny_pipe.processor
    batch = proc.encode_understanding([scene(), scene()], ["What colour?", "How many objects are there?"],
                                      answers=["red", "one"])
    n = tiny_pipe.config.num_und_tokens
    for row in range(2):
        ids = batch.input_ids[row].tolist()
        start = ids.index(proc.boi_id)
        assert ids[start + 1: start + 1 + n] == [proc.image_id] * n
        assert ids[start + 1 + n] == proc.eoi_id
        assert ids[0] == proc.bos_id
        # labels: exactly the answer tokens and the EOS
        labelled = [t for t in batch.labels[row].tolist() if t != IGNORE_INDEX]
        assert labelled[-1] == proc.eos_id
        assert proc.decode(labelled) == ["red", "one"][row]
    assert int(batch.image_mask.sum()) == 2 * (n + 1)
    assert batch.pixel_values.shape == (2, 3, 32, 32)
    assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1


def test_understanding_image_is_padded_to_square_with_mean_colour(tiny_pipe):
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    x = tiny_pipe.processor.preprocess_understanding(wide)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 0, 0], torch.full((3,), 127 / 127.5 - 1))  # padding
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))  # the image
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.allclose(tiny_pipe.processor.preprocess_understanding(rgba)[:, 16, 16], torch.ones(3))


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_shapes_of_every_path(name):
    pipe = JanusFlowPipeline.from_config(name, seed=0)
    model, cfg = pipe.model, pipe.config
    batch, latents, pixels = gen_batch(pipe, ["a red circle", "two blue squares left of a circle"])
    lat, grid = cfg.latent_size, cfg.gen_grid
    tokens, skip, t_emb = model.image_tokens(latents, torch.tensor([0.1, 0.9]))
    assert tokens.shape == (2, 1 + grid * grid, cfg.llm.hidden_size)
    assert skip.shape == (2, cfg.gen.channels, grid, grid) and t_emb.shape == (2, cfg.llm.hidden_size)
    v = model.velocity(latents, torch.tensor([0.1, 0.9]), prompt_mask=batch.attention_mask,
                       prompt_lengths=batch.lengths, prompt_embeds=model.embed_tokens(batch.input_ids))
    assert v.shape == latents.shape == (2, cfg.vae.latent_channels, lat, lat)
    assert model.encode_images(torch.zeros(1, 3, cfg.gen.image_size, cfg.gen.image_size)).shape == (1, 4, lat, lat)
    assert model.decode_latents(latents[:1]).shape == (1, 3, cfg.gen.image_size, cfg.gen.image_size)
    feats = model.understanding_features(pixels)
    assert feats.shape == (2, 1 + cfg.num_und_tokens, cfg.llm.hidden_size)
    und = pipe.processor.encode_understanding([scene(), scene()], ["q", "q"], answers=["a", "b"])
    losses = model.understanding_loss(input_ids=und.input_ids, attention_mask=und.attention_mask,
                                      labels=und.labels, image_mask=und.image_mask,
                                      pixel_values=und.pixel_values)
    assert set(losses) == {"loss", "ar", "ar_tokens"} and torch.isfinite(losses["loss"])
    gl = model.generation_loss(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask,
                               prompt_lengths=batch.lengths, latents=latents, repa_pixels=pixels)
    assert set(gl) == {"loss", "rf", "repa"} and -1 <= float(gl["repa"]) <= 1


def test_1_3b_paths_on_the_meta_device():
    # transformers' mask builder reads tensor values, so the LLM itself cannot run on meta; every
    # path around it (g_enc, aligners, g_dec, f_enc, REPA head) does, at the paper's shapes.
    with torch.device("meta"):
        model = JanusFlow(preset("janusflow-1.3b"))
        z = torch.randn(2, 4, 48, 48)
        tokens, skip, t_emb = model.image_tokens(z, torch.rand(2))
        v = model.velocity_from_hidden(torch.randn(2, 9 + 577, 2048), skip, t_emb)
        feats = model.understanding_features(torch.randn(1, 3, 384, 384))
        repa = model.repa_head(torch.randn(2, 576, 2048))
    assert tokens.shape == (2, 577, 2048) and skip.shape == (2, 768, 24, 24)
    assert v.shape == (2, 4, 48, 48)
    assert feats.shape == (1, 577, 2048)
    assert repa.shape == (2, 576, 1024)


def test_repa_reads_the_configured_block(tiny_copy):
    model = tiny_copy.model
    batch, latents, pixels = gen_batch(tiny_copy, ["a red circle"])
    kw = dict(prompt_mask=batch.attention_mask, prompt_lengths=batch.lengths,
              prompt_embeds=model.embed_tokens(batch.input_ids))
    t = torch.tensor([0.3])
    _, h1 = model.velocity(latents, t, hidden_layer=1, **kw)
    _, h0 = model.velocity(latents, t, hidden_layer=0, **kw)
    assert h1.shape == h0.shape and not torch.allclose(h0, h1)
    # block 1's output does not depend on block 2's weights
    with torch.no_grad():
        model.llm.model.layers[1].mlp.down_proj.weight.mul_(3)
    _, h1b = model.velocity(latents, t, hidden_layer=1, **kw)
    assert torch.allclose(h1, h1b)


def test_without_the_skip_only_the_llm_path_reaches_g_dec(tiny_copy):
    model = tiny_copy.model
    randomize_(model)
    batch, latents, _ = gen_batch(tiny_copy, ["a red circle"])
    kw = dict(prompt_mask=batch.attention_mask, prompt_lengths=batch.lengths,
              prompt_embeds=model.embed_tokens(batch.input_ids))
    t = torch.tensor([0.3])
    with_skip = model.velocity(latents, t, **kw)
    model.config.gen.skip = False
    without = model.velocity(latents, t, **kw)
    assert not torch.allclose(with_skip, without)
    # g_dec's skip half now sees zeros: scaling that half of its first block's input does nothing
    block = model.gen_decoder.blocks[0]
    with torch.no_grad():
        block.dwconv.weight[model.config.gen.channels:].mul_(5)
    torch.testing.assert_close(model.velocity(latents, t, **kw), without)


def test_losses_decrease_when_overfitting_one_batch(tiny_copy):
    torch.manual_seed(0)
    model = tiny_copy.model.train()
    proc = tiny_copy.processor
    und = proc.encode_understanding([scene(), scene((30, 30, 220))], ["What colour?", "What colour?"],
                                    answers=["red", "blue"])
    batch, latents, pixels = gen_batch(tiny_copy, ["a red circle", "a blue circle"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    t, noise = torch.tensor([0.3, 0.7]), torch.randn(latents.shape, generator=gen)
    history = []
    for _ in range(40):
        ul = model.understanding_loss(input_ids=und.input_ids, attention_mask=und.attention_mask,
                                      labels=und.labels, image_mask=und.image_mask,
                                      pixel_values=und.pixel_values)
        gl = model.generation_loss(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask,
                                   prompt_lengths=batch.lengths, latents=latents,
                                   repa_pixels=pixels, t=t, noise=noise)
        opt.zero_grad()
        (ul["loss"] + gl["loss"]).backward()
        if not history:
            # the begin-of-understanding embedding must train (the release detaches it)
            assert model.beg_of_und_embed.grad is not None and model.beg_of_und_embed.grad.abs().sum() > 0
            assert all(p.grad is None for p in model.vae.parameters())
        opt.step()
        history.append((float(ul["ar"]), float(gl["rf"]), float(gl["repa"])))
    first, last = history[0], history[-1]
    assert last[0] < 0.2 * first[0], history
    assert last[1] < 0.5 * first[1], history
    assert last[2] < first[2] - 0.3, history


def test_understanding_loss_counts_only_response_tokens(tiny_pipe):
    model = tiny_pipe.model
    proc = tiny_pipe.processor
    short = proc.encode_understanding([scene()], ["What colour?"], answers=["red"])
    long = proc.encode_understanding([scene()], ["What colour is the big object in this picture?"],
                                     answers=["red"])
    kw = lambda b: dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                        image_mask=b.image_mask, pixel_values=b.pixel_values)
    a, b = model.understanding_loss(**kw(short)), model.understanding_loss(**kw(long))
    assert int(a["ar_tokens"]) == int(b["ar_tokens"]) == len(proc.encode(" red", bos=False)) + 1
