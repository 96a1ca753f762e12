import pytest
import torch

from flows.cli import main
from models.checkpoint import CheckpointError
from models.official import load_official
from models.pipeline import JanusFlowPipeline

from conftest import randomize_
from official_layout import reference_convnext, reference_siglip, write_official

PROMPTS = ["a red circle", "two blue squares left of a triangle"]


@pytest.fixture
def release(tmp_path, tiny_copy):
    randomize_(tiny_copy.model)
    src = tmp_path / "JanusFlow-tiny"
    state = write_official(src, tiny_copy.model, tiny_copy.processor.tokenizer)
    tiny_copy.model.vae.save_pretrained(tmp_path / "vae")
    return tiny_copy, src, tmp_path / "vae", state


@pytest.mark.parametrize("as_bin", [False, True])
def test_import_gives_identical_outputs(release, as_bin, tmp_path):
    pipe, src, vae, _ = release
    if as_bin:
        src = tmp_path / "bin"
        write_official(src, pipe.model, pipe.processor.tokenizer, as_bin=True)
    model, processor, dropped = load_official(src, vae_dir=vae)
    assert len(dropped) == 13 and all(".attn_pool." in k for k in dropped)
    imported = JanusFlowPipeline(model, processor)
    kw = dict(num_inference_steps=3, guidance_scale=2.0, seed=0, output_type="latent")
    assert torch.equal(pipe(PROMPTS, **kw), imported(PROMPTS, **kw))
    ours = {k: v for k, v in pipe.model.state_dict().items() if not k.startswith("repa_head.")}
    theirs = imported.model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_imported_siglip_matches_a_timm_style_forward_of_the_release_tensors(release):
    _, src, vae, state = release
    model, _, _ = load_official(src, vae_dir=vae)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    ours = model.vision(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, reference_siglip(state, pixels), atol=1e-5, rtol=1e-5)


def test_imported_g_enc_matches_the_release_block_semantics(release):
    _, src, vae, state = release
    model, _, _ = load_official(src, vae_dir=vae)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100.0, 700.0])
    _, t_emb, _ = model.gen_encoder(z, t)
    e = "vision_gen_enc_model."
    x = torch.nn.functional.conv2d(z, state[e + "in_conv.weight"], state[e + "in_conv.bias"], stride=2)
    for i in range(2):
        x = reference_convnext(state, f"{e}mid_block.res_blocks.{i}.", x, t_emb)
    ours, _, _ = model.gen_encoder(z, t)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_cli_convert_then_load(release, tmp_path, capsys):
    pipe, src, vae, _ = release
    out = tmp_path / "converted"
    assert main(["convert", "--from-official", str(src), "--vae", str(vae), "--out", str(out)]) == 0
    assert "dropped 13" in capsys.readouterr().out
    loaded = JanusFlowPipeline.from_pretrained(out)
    kw = dict(num_inference_steps=2, seed=1, output_type="latent")
    assert torch.equal(pipe(PROMPTS, **kw), loaded(PROMPTS, **kw))


def test_unknown_and_missing_official_tensors(release, tmp_path):
    pipe, _, vae, _ = release
    from safetensors.torch import load_file, save_file

    src = tmp_path / "odd"
    write_official(src, pipe.model, pipe.processor.tokenizer)
    state = load_file(str(src / "model.safetensors"))
    state["vision_gen_enc_model.something_new.weight"] = torch.zeros(1)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="something_new"):
        load_official(src, vae_dir=vae)
    del state["vision_gen_enc_model.something_new.weight"]
    del state["vision_gen_dec_model.input_norm.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: gen_decoder\.input_norm\.weight"):
        load_official(src, vae_dir=vae)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", "--from-official", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("janusflow: error: no config.json")
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
