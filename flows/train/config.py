"""Typed training config: a YAML file, checked field by field before any work starts.

Defaults per stage follow the paper's table 1 as the reference doc recalls it (LR 1e-4 / 1e-4 /
2e-5, warm-up 2000 / 2000 / 1000); every value is configurable and the shapes configs under
configs/ scale them down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from models.config import dataclass_from_dict
from models.precision import DTYPES

STAGES = ("bootstrap", "1", "2", "3")
STAGE_LR = {"bootstrap": 1e-3, "1": 1e-4, "2": 1e-4, "3": 2e-5}   # bootstrap: per part, below
STAGE_WARMUP = {"bootstrap": 20, "1": 2000, "2": 2000, "3": 1000}
PARALLEL = ("ddp", "fsdp")
ATTENTION = ("sdpa", "flex", "segments")
QUERY_KINDS = ("shape", "colour", "count")  # the bootstrap's SigLIP object queries (flows/train/bootstrap.py)


def lr_schedule(step: int, steps: int, warmup: int, *, final: float = 1.0,
                decay_steps: int | None = None) -> float:
    """LR multiplier of step `step` (0-based) of `steps`: a linear warm-up over `warmup` steps, then
    constant (final 1.0) or a linear decay reaching `final` at the last step, spread over every step
    after the warm-up or only the last `decay_steps` (warm-up, stable, cool-down)."""
    if step < warmup:
        return (step + 1) / warmup
    start = max(0, warmup - 1)  # the step at full lr, from which the decay starts
    if decay_steps is not None:
        start = max(start, steps - 1 - decay_steps)
    span = max(1, steps - 1 - start)
    return 1.0 - (1.0 - final) * min(1.0, max(0, step - start) / span)


class ConfigError(ValueError):
    """A config a run cannot start from; the message names the field."""


@dataclass
class BootstrapConfig:
    """Stage `bootstrap` (embedded world only): train small stand-ins for the parts production loads
    pretrained (SDXL-VAE, SigLIP, DeepSeek-LLM) on the corpus itself. Steps, LR and batch per part."""

    preset: str = "shapes"
    model: dict = field(default_factory=dict)  # overrides of the preset, e.g. {llm: {num_hidden_layers: 6}}
    vae_steps: int = 400
    vae_lr: float = 2e-3
    vae_batch: int = 32
    kl_weight: float = 1e-6
    vae_crop: int = 0          # side of the random square crops the first vae_crop_steps train on (0: whole images);
    vae_crop_steps: int = 0    # the VAE is convolutional, so crops teach it the same at a fraction of the work
    siglip_steps: int = 300
    siglip_lr: float = 4e-4  # 1e-3 never leaves the plateau on the shapes world
    siglip_batch: int = 64
    siglip_text_layers: int = 2
    siglip_text_len: int = 32  # text-tower positions; captions are cut to fit (the shapes world's: <= 29 tokens)
    siglip_negatives: int = 0  # counterfactual captions per image and step (a shape or colour changed)
    siglip_queries: float = 0.0  # weight of the object-query loss: a small head reads, from the patch
                                 # features, the shape of the object of a colour named in the query
                                 # (scenes of the shapes world; the head is dropped afterwards)
    siglip_query_kinds: tuple[str, ...] = ("shape",)  # what it asks: shape (of the <colour> object),
                                 # colour (of the <shape>), count (how many objects)
    llm_steps: int = 300
    llm_lr: float = 2e-3
    llm_batch: int = 16
    llm_seq_len: int = 128
    warmup: int = 20
    cooldown: float = 0.0      # the last fraction of each part's steps decays its LR linearly to 0 (0: constant)

    def lr_factor(self, i: int, steps: int) -> float:
        """LR multiplier of a part's step i (0-based) of `steps`: warm-up, constant, cool-down to 0."""
        span = round(self.cooldown * steps)
        return lr_schedule(i, steps, self.warmup, final=0.0 if span else 1.0, decay_steps=span or None)

    def model_config(self):
        """The preset's JanusFlowConfig with `model` merged in."""
        from models.config import preset, with_overrides

        return with_overrides(preset(self.preset), self.model, where="bootstrap.model")

    def validate(self) -> None:
        from models.config import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError(f"bootstrap.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        try:
            conf = self.model_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("vae", "siglip", "llm"):
            steps, lr, batch = (getattr(self, f"{name}_{k}") for k in ("steps", "lr", "batch"))
            if steps < 0 or batch < 2 or lr <= 0:
                raise ConfigError(f"bootstrap.{name}_steps must be >= 0, {name}_batch >= 2 and "
                                  f"{name}_lr positive, got {steps}, {batch}, {lr}")
        size, down = conf.gen.image_size, conf.vae.downsample
        if self.vae_crop and not (down <= self.vae_crop <= size and self.vae_crop % down == 0):
            raise ConfigError(f"bootstrap.vae_crop must be 0 or a multiple of the VAE's downsampling ({down}) "
                              f"up to the image size ({size}), got {self.vae_crop}")
        if not 0 <= self.vae_crop_steps <= self.vae_steps:
            raise ConfigError(f"bootstrap.vae_crop_steps must be in [0, vae_steps={self.vae_steps}], "
                              f"got {self.vae_crop_steps}")
        if not self.siglip_query_kinds or set(self.siglip_query_kinds) - set(QUERY_KINDS):
            raise ConfigError(f"bootstrap.siglip_query_kinds must be a non-empty list of "
                              f"{', '.join(QUERY_KINDS)}, got {list(self.siglip_query_kinds)}")
        if not 0.0 <= self.cooldown <= 1.0:
            raise ConfigError(f"bootstrap.cooldown must be in [0, 1] (a fraction of each part's steps), "
                              f"got {self.cooldown}")
        if (self.kl_weight < 0 or self.siglip_text_layers < 1 or self.siglip_negatives < 0
                or self.siglip_queries < 0 or self.llm_seq_len < 8 or self.warmup < 0
                or self.siglip_text_len < 8):
            raise ConfigError("bootstrap.kl_weight must be >= 0, siglip_text_layers >= 1, siglip_text_len >= 8, "
                              "siglip_negatives >= 0, siglip_queries >= 0, llm_seq_len >= 8, warmup >= 0")


@dataclass
class TrainConfig:
    stage: str = "1"
    init: str = ""                 # model directory (save_pretrained) the stage starts from
    corpus: str = ""               # corpus directory (janusflow data shapes / import)
    out: str = "runs/train"
    steps: int = 100
    lr: float | None = None        # None: the stage's default
    warmup: int | None = None
    final_lr: float = 1.0          # LR at the last step as a fraction of lr, reached linearly after
                                   # the warm-up (1.0: constant, the paper's schedule)
    decay_steps: int | None = None  # the decay to final_lr spans only the last N steps (constant before:
                                   # warm-up, stable, cool-down); None: all the steps after the warm-up
    vision_lr: float | None = None  # SigLIP's own LR where the stage trains it (stage 3); None: lr.
                                   # Same warm-up and schedule as lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    rows: int = 2                  # packed sequences per micro-batch
    max_len: int = 1024
    grad_accum: int = 1
    prefetch: int = 2              # batches built ahead on a background thread (0: in the loop)
    latent_cache: str | None = None  # directory of the frozen encoders' outputs (VAE latents, and
                                   # REPA targets while SigLIP is frozen) for the generation images:
                                   # filled at the start of the stage, read instead of encoding
    latent_cache_fill: bool = True  # False: read what `janusflow data encode` put there, encode the rest live
    ema: float = 0.99              # EMA decay; step n uses min(ema, (1 + n) / (10 + n)), a warm-up
                                   # so a short stage's EMA is not mostly its initial weights
    t_mean: float = 0.0            # RF times: sigmoid(N(t_mean, t_std)), SD3's logit-normal; t = 0 is
    t_std: float = 1.0             # noise, so t_mean < 0 trains more on the noisy end
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"            # autocast: fp32, bf16, or auto (bf16 on a GPU or a CPU with AMX or AVX512-BF16,
                                   # where it is faster; fp32 elsewhere); the weights stay fp32
    repa_weight: float = 1.0
    rf_weight: float = 1.0         # the RF term's weight in the loss (AR's is 1): the paper adds them
                                   # unweighted; a small LLM's AR gradients can dwarf RF's
    parallel: str = "fsdp"         # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard per block)
    procs: int = 1                 # started without torchrun, `janusflow train` runs the stage in this
                                   # many local processes (torchrun --standalone, one thread each on a
                                   # 2-core CPU); the global batch is rows x grad_accum x procs.
                                   # Bootstrap: 2 trains the VAE and the LLM in a second process
    attention: str = "sdpa"        # the LLM's attention over packed rows: "sdpa" with the dense
                                   # (B, 1, T, T) mask; "flex" (FlexAttention with a block mask
                                   # that skips the blocks between samples; CUDA only); or
                                   # "segments" (SDPA once per block of whole samples: the same
                                   # result without the work between samples; for the CPU)
    activation_checkpointing: bool = False
    compile: bool = False          # torch.compile each transformer block
    eval_every: int = 0            # sample grid + held-out answers every N steps (0: at the end only)
    sample_prompts: int = 8
    sample_questions: int = 16
    sample_steps: int = 20
    sample_guidance: float = 3.0
    data: dict = field(default_factory=dict)      # overrides of data/stages.py for this stage
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)  # stage bootstrap only
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "janusflow"

    @property
    def learning_rate(self) -> float:
        return STAGE_LR[self.stage] if self.lr is None else self.lr

    @property
    def warmup_steps(self) -> int:
        return STAGE_WARMUP[self.stage] if self.warmup is None else self.warmup

    def ema_decay(self, step: int) -> float:
        """The EMA decay applied after optimizer step `step` (0-based), i.e. update n = step + 1."""
        n = step + 1
        return min(self.ema, (1 + n) / (10 + n))

    def lr_factor(self, step: int) -> float:
        """The LR multiplier of optimizer step `step` (0-based): see `lr_schedule`."""
        return lr_schedule(step, self.steps, self.warmup_steps, final=self.final_lr, decay_steps=self.decay_steps)

    def validate(self, *, check_paths: bool = True) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("steps", "rows", "max_len", "grad_accum", "save_every", "log_every",
                     "keep_checkpoints", "sample_steps", "procs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "sample_prompts", "sample_questions", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"lr must be positive, got {self.learning_rate}")
        if self.vision_lr is not None and self.vision_lr <= 0:
            raise ConfigError(f"vision_lr must be positive, got {self.vision_lr}")
        if not 0.0 <= self.final_lr <= 1.0:
            raise ConfigError(f"final_lr must be in [0, 1] (a fraction of lr), got {self.final_lr}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"decay_steps must be >= 1 (or unset: decay over every step), got {self.decay_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not self.t_std > 0:
            raise ConfigError(f"t_std must be positive, got {self.t_std}")
        if not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive, got {self.grad_clip}")
        for name in ("weight_decay", "repa_weight", "rf_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.attention == "flex" and not self.device.startswith("cuda"):
            raise ConfigError(f"attention: flex needs a CUDA device (FlexAttention has no backward on "
                              f"{self.device}); use attention: sdpa")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from data.stages import stage_data

        if self.stage == "bootstrap":
            if self.procs > 2:
                raise ConfigError(f"procs must be 1 or 2 for stage bootstrap (2: the VAE and the LLM "
                                  f"train in a second process), got {self.procs}")
            self.bootstrap.validate()
        else:
            try:
                stage_data(self.stage, **self.data)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"data: {e}") from None
        if check_paths:
            if self.stage != "bootstrap" and not (Path(self.init) / "config.json").is_file():
                raise ConfigError(f"init: no model directory at {self.init!r} (a stage starts "
                                  "from the previous stage's model/ or a converted checkpoint)")
            if not (Path(self.corpus) / "manifest.json").is_file():
                raise ConfigError(f"corpus: no corpus at {self.corpus!r} (build it with "
                                  "`janusflow data shapes` or `dvc repro data`)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        if isinstance(data.get("stage"), int) and not isinstance(data["stage"], bool):
            data["stage"] = str(data["stage"])  # YAML reads `stage: 2` as a number
        try:
            return dataclass_from_dict(cls, data, unknown="unknown training config key(s)")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def load_config(path: str | Path | None, *, sets: list[str] = (), **overrides) -> TrainConfig:
    """A config from YAML (or defaults) with CLI overrides applied, validated. `sets` are
    `KEY=VALUE` strings (`--set`), applied last: a dotted key reaches into a section
    (`data.mix.gen=70`, `bootstrap.siglip_steps=1800`) and the value is read as YAML."""
    import yaml

    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training config is a mapping of keys to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    for item in sets:
        apply_set(data, item)
    return TrainConfig.from_dict(data).validate()


def apply_set(data: dict, item: str) -> None:
    """Apply one `--set KEY=VALUE` to a config mapping in place (see `load_config`)."""
    import yaml

    key, eq, text = item.partition("=")
    *parents, last = key.strip().split(".")
    if not eq or not all(parents + [last]):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=5e-4 or --set data.mix.gen=70")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not YAML ({str(exc).splitlines()[0]})") from None
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parents[:i + 1])} is a value, not a section")
    node[last] = value
