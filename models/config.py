"""Typed configuration of a JanusFlow model and the presets, the one place their shapes live.

A config is plain data (dataclasses of ints, floats and strings) so that it round-trips through
config.json and can be checked before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

# The understanding system prompt of the official processor; the deepseek chat template puts it
# before the first user turn.
RELEASE_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


@dataclass
class LLMConfig:
    """A Llama decoder (DeepSeek-LLM is one). Field names follow transformers' LlamaConfig."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False


@dataclass
class VisionConfig:
    """The understanding encoder f_enc, a SigLIP vision tower without its pooling head."""

    image_size: int = 384
    patch_size: int = 16
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    # The release's timm tower uses exact GELU; Google's SigLIP checkpoints use the tanh form.
    hidden_act: str = "gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class VAEConfig:
    """A diffusers AutoencoderKL; the defaults are SDXL-VAE's."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class GenConfig:
    """The generation adapters g_enc / g_dec (ConvNeXt, time-conditioned) and their aligners."""

    image_size: int = 384
    channels: int = 768
    patch_size: int = 2
    blocks: int = 2
    time_channels: int = 768
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    dropout: float = 0.0
    # How a generation sample's image tokens attend to each other: "causal" as in JanusFlow (the
    # LLM's own mask), or "full" (each sees the whole noisy image, as a diffusion transformer does).
    image_attention: str = "causal"
    # g_dec reads g_enc's map (the skip) beside the LLM's output, as in JanusFlow; False gives it
    # zeros there, so all it knows of z_t comes through the LLM, which also carries the prompt.
    skip: bool = True
    # g_dec's ConvNeXt modulation reads, beside t_emb, the LLM's output at the t_emb slot (which has
    # read the whole prompt): a global path for the prompt into every position of the velocity.
    dec_prompt: bool = False

    @property
    def full_image_attention(self) -> bool:
        return self.image_attention == "full"


@dataclass
class RepaConfig:
    """REPA head h_phi: a 3-layer MLP from LLM width to f_enc width on block `layer`'s output."""

    layer: int = 6
    hidden_size: int = 2048


@dataclass
class JanusFlowConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    system_prompt: str = RELEASE_SYSTEM_PROMPT
    preset: str = "custom"

    # -- derived shapes ---------------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.gen.image_size // self.vae.downsample

    @property
    def gen_grid(self) -> int:
        return self.latent_size // self.gen.patch_size

    @property
    def num_gen_tokens(self) -> int:
        return self.gen_grid**2

    @property
    def num_und_tokens(self) -> int:
        return self.vision.grid**2

    def validate(self) -> "JanusFlowConfig":
        """Raise ValueError naming the field when the shapes cannot fit together."""
        checks = [
            (self.vision.image_size % self.vision.patch_size == 0,
             f"vision.image_size ({self.vision.image_size}) must be a multiple of vision.patch_size "
             f"({self.vision.patch_size})"),
            (self.gen.image_size % (self.vae.downsample * self.gen.patch_size) == 0,
             f"gen.image_size ({self.gen.image_size}) must be a multiple of the VAE downsample "
             f"({self.vae.downsample}) x gen.patch_size ({self.gen.patch_size})"),
            (self.gen_grid == self.vision.grid,
             f"the generation grid ({self.gen_grid}x{self.gen_grid}) must equal the f_enc grid "
             f"({self.vision.grid}x{self.vision.grid}) for REPA: change gen.image_size, "
             f"gen.patch_size or vision.image_size"),
            (1 <= self.repa.layer <= self.llm.num_hidden_layers,
             f"repa.layer ({self.repa.layer}) must be in [1, llm.num_hidden_layers="
             f"{self.llm.num_hidden_layers}]"),
            (self.llm.hidden_size % self.llm.num_attention_heads == 0,
             "llm.hidden_size must be divisible by llm.num_attention_heads"),
            (self.llm.num_attention_heads % self.llm.num_key_value_heads == 0,
             f"llm.num_attention_heads ({self.llm.num_attention_heads}) must be a multiple of "
             f"llm.num_key_value_heads ({self.llm.num_key_value_heads})"),
            (self.vision.hidden_size % self.vision.num_attention_heads == 0,
             "vision.hidden_size must be divisible by vision.num_attention_heads"),
            (all(c % self.vae.norm_num_groups == 0 for c in self.vae.block_out_channels),
             "vae.block_out_channels must all be multiples of vae.norm_num_groups"),
            (self.gen.image_attention in ("causal", "full"),
             f"gen.image_attention must be 'causal' or 'full', got {self.gen.image_attention!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JanusFlowConfig":
        """Build from a dict, refusing unknown keys so a typo never passes silently."""
        sections = {"llm": LLMConfig, "vision": VisionConfig, "vae": VAEConfig, "gen": GenConfig,
                    "repa": RepaConfig}
        top_fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - top_fields)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in sections:
                kwargs[name] = _section(sections[name], name, value)
            else:
                kwargs[name] = value
        return cls(**kwargs).validate()


def _section(section_cls, name: str, value: dict[str, Any]):
    if not isinstance(value, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {type(value).__name__}")
    return dataclass_from_dict(section_cls, value, prefix=f"{name}.",
                               unknown=f"unknown config key(s) in '{name}'")


def dataclass_from_dict(cls, data: dict[str, Any], *, prefix: str = "",
                        unknown: str = "unknown config key(s)"):
    """Build dataclass `cls` from a mapping (YAML/JSON), checking each value against the field's
    annotated type. Unknown keys and wrong types raise ValueError naming `prefix + key`.

    Understands bool, int (whole floats accepted), float (ints accepted), str, X | None,
    tuple[...], dict and nested dataclasses (built from a mapping): the types our configs use.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra = sorted(set(data) - set(names))
    if extra:
        raise ValueError(f"{unknown}: {', '.join(extra)}")
    return cls(**{key: _coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()})


def _coerce(value, tp, field_name: str):
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    origin = typing.get_origin(tp) or tp
    if origin in (int, float) and isinstance(value, str):
        try:  # YAML reads 1e-3 (no dot) as a string; take it as the number it spells
            value = float(value)
        except ValueError:
            pass
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is bool and isinstance(value, bool):
        return value
    if origin is int and numeric and float(value).is_integer():
        return int(value)
    if origin is float and numeric:
        return float(value)
    if origin is str and isinstance(value, str):
        return value
    if origin is dict and isinstance(value, dict):
        return value
    if dataclasses.is_dataclass(origin) and isinstance(value, dict):
        return dataclass_from_dict(origin, value, prefix=f"{field_name}.",
                                   unknown=f"unknown key(s) in '{field_name}'")
    if origin is tuple and isinstance(value, (list, tuple)):
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ValueError(f"{field_name} must have {len(args)} items, got {value!r}")
        inner = args[:1] * len(value) if args and args[-1] is Ellipsis else args
        return tuple(_coerce(v, t, field_name) for v, t in zip(value, inner)) if args else tuple(value)
    expected = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                dict: "a mapping", tuple: "a list"}.get(origin, "a mapping" if dataclasses.is_dataclass(origin)
                                                       else getattr(origin, "__name__", str(origin)))
    raise ValueError(f"{field_name} must be {expected}, got {value!r}")


def _tiny() -> JanusFlowConfig:
    # Under 1M parameters: 32 px images, a 4x4 token grid on both paths, 2 LLM blocks.
    return JanusFlowConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2),
        vae=VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                      scaling_factor=1.0),
        gen=GenConfig(image_size=32, channels=32, blocks=2, time_channels=32),
        repa=RepaConfig(layer=1, hidden_size=64),
        system_prompt="",
        preset="tiny",
    )


def _shapes() -> JanusFlowConfig:
    # The embedded demo: 64 px scenes, an 8x8 grid (64 image tokens), a 4-block LLM of width 256.
    # Small enough that bootstrap + three stages train on 2 CPU cores in minutes.
    return JanusFlowConfig(
        llm=LLMConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=0, eos_token_id=1),
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                            num_hidden_layers=4, num_attention_heads=4),
        vae=VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                      scaling_factor=1.0),
        gen=GenConfig(image_size=64, channels=128, blocks=2, time_channels=128),
        repa=RepaConfig(layer=2, hidden_size=256),
        system_prompt="",
        preset="shapes",
    )


def _janusflow_1_3b() -> JanusFlowConfig:
    return JanusFlowConfig(preset="janusflow-1.3b")


PRESETS = {"tiny": _tiny, "shapes": _shapes, "janusflow-1.3b": _janusflow_1_3b}


def with_overrides(config: JanusFlowConfig, overrides: dict[str, Any], *, where: str) -> JanusFlowConfig:
    """`config` with `overrides` merged in ({section: {key: value}} or a top-level key), validated.
    A bad key, type or combination raises ValueError starting with `where` (the config field)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping of config sections, got {type(overrides).__name__}")
    merged = config.to_dict()
    for name, value in overrides.items():
        if isinstance(merged.get(name), dict) and isinstance(value, dict):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    try:
        return JanusFlowConfig.from_dict(merged)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def preset(name: str) -> JanusFlowConfig:
    """A fresh config for a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return PRESETS[name]().validate()
