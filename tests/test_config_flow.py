import math

import pytest
import torch

from flows.cli import model_summary
from models import flow
from models.config import JanusFlowConfig, preset


@pytest.mark.parametrize("name, gen_tokens, latent", [
    ("tiny", 16, 8), ("shapes", 64, 16), ("janusflow-1.3b", 576, 48)])
def test_preset_shapes(name, gen_tokens, latent):
    cfg = preset(name)
    assert cfg.num_gen_tokens == gen_tokens == cfg.num_und_tokens
    assert cfg.latent_size == latent


def test_1_3b_preset_matches_the_paper():
    cfg = preset("janusflow-1.3b")
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.num_attention_heads) == (2048, 24, 16)
    assert (cfg.llm.intermediate_size, cfg.llm.vocab_size) == (5504, 102400)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.hidden_size) == (384, 16, 1024)
    assert cfg.vae.scaling_factor == 0.13025 and cfg.vae.latent_channels == 4
    summary = model_summary("janusflow-1.3b")["parameters"]
    assert 65e6 < summary["g_enc"] + summary["g_dec"] < 75e6
    assert 290e6 < summary["f_enc"] < 310e6
    # 1.2B non-embedding + input and output embeddings of 102400 x 2048
    assert abs(summary["llm"] - 2 * 102400 * 2048 - 1.21e9) < 0.03e9
    assert summary["repa_head"] > 0 and summary["vae"] > 80e6


def test_tiny_is_tiny():
    total = model_summary("tiny")["total"]
    assert total < 10e6


def test_config_round_trip_and_errors():
    cfg = preset("tiny")
    assert JanusFlowConfig.from_dict(cfg.to_dict()) == cfg
    data = cfg.to_dict()
    data["llm"]["hidden_sise"] = 3
    with pytest.raises(ValueError, match="hidden_sise"):
        JanusFlowConfig.from_dict(data)
    data = cfg.to_dict()
    data["gen"]["image_size"] = 64  # 4x4 f_enc grid vs 8x8 generation grid
    with pytest.raises(ValueError, match="REPA"):
        JanusFlowConfig.from_dict(data)
    data = cfg.to_dict()
    data["repa"]["layer"] = 9
    with pytest.raises(ValueError, match="repa.layer"):
        JanusFlowConfig.from_dict(data)
    data = cfg.to_dict()
    data["llm"]["hidden_size"] = "wide"
    with pytest.raises(ValueError, match="llm.hidden_size"):
        JanusFlowConfig.from_dict(data)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_time_convention_noise_at_zero_data_at_one():
    x, z0 = torch.full((2, 3), 5.0), torch.zeros(2, 3)
    assert torch.equal(flow.interpolate(x, z0, torch.tensor([0.0, 0.0])), z0)
    assert torch.equal(flow.interpolate(x, z0, torch.tensor([1.0, 1.0])), x)
    assert torch.allclose(flow.interpolate(x, z0, torch.tensor([0.25, 0.5]))[:, 0], torch.tensor([1.25, 2.5]))
    assert torch.equal(flow.velocity_target(x, z0), x - z0)
    assert torch.equal(flow.model_time(torch.tensor([0.5])), torch.tensor([500.0]))


def test_euler_with_the_true_velocity_reaches_the_data():
    x, z = torch.randn(4, 2), torch.randn(4, 2)
    z0 = z.clone()
    steps = flow.timesteps(7)
    assert steps[0] == 0.0 and math.isclose(steps[-1], 6 / 7)
    for _ in steps:
        z = flow.euler_step(z, flow.velocity_target(x, z0), 1 / 7)
    assert torch.allclose(z, x, atol=1e-5)


def test_rf_loss_zero_at_target_and_per_sample():
    x, z0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.allclose(flow.rf_loss(x - z0, x, z0), torch.zeros(3))
    assert flow.rf_loss(torch.zeros_like(x), x, z0).shape == (3,)


def test_cfg_combination():
    c, u = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(flow.cfg_combine(c, u, 1.0), c)
    assert torch.equal(flow.cfg_combine(c, u, 2.0), 2 * c)
    per_row = flow.cfg_combine(c, u, torch.tensor([1.0, 3.0]))
    assert torch.equal(per_row[:, 0], torch.tensor([1.0, 3.0]))


def test_logit_normal_times():
    t = flow.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(float(t.mean()) - 0.5) < 0.01
    assert abs(float(torch.logit(t).std()) - 1.0) < 0.03


def test_initial_noise_is_per_row():
    a = flow.initial_noise((2, 4, 3, 3), [7, 8])
    b = flow.initial_noise((1, 4, 3, 3), [8])
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="one seed per row"):
        flow.initial_noise((2, 4, 3, 3), [1])


def test_yaml_exponent_without_a_dot_is_taken_as_a_number():
    """YAML 1.1 reads `lr: 1e-3` as the string '1e-3'; configs take it as the number it spells."""
    from flows.train.config import TrainConfig

    cfg = TrainConfig.from_dict({"stage": "1", "init": "x", "corpus": "y", "out": "z", "lr": "1e-3"})
    assert cfg.lr == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.from_dict({"stage": "1", "init": "x", "corpus": "y", "out": "z", "lr": "fast"})
