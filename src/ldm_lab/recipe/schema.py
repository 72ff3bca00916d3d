"""The typed recipe: every key a YAML recipe may hold, with its type and default.

Models are strict (``extra="forbid"``) so a misspelt key is an error that names the key and
the closest valid one (see ``ldm_lab.recipe.load``), found before any model is loaded.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class PretrainedSpec(Strict):
    """Where a component comes from: a hub id or local dir (``pretrained``) or a config."""

    pretrained: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.pretrained is not None and self.config is not None:
            raise ValueError("give either 'pretrained' or 'config', not both")
        if self.pretrained is None and self.config is None and not getattr(self, "preset", None):
            raise ValueError("give 'pretrained' (a hub id or a local dir) or 'config'")
        return self


class TextEncoderSpec(PretrainedSpec):
    kind: Literal["clip", "t5", "openclip"] = "clip"
    tokenizer: str | None = None  # tokenizer dir or hub id when it differs from ``pretrained``
    max_length: int | None = None
    trainable: bool = False


class AutoencoderSpec(PretrainedSpec):
    trainable: bool = False


class UNetSpec(PretrainedSpec):
    preset: Literal["tiny", "sd15", "sd21"] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(Strict):
    # A diffusers pipeline (hub id or dir) to start from: text_encoder, autoencoder and unet not
    # given below come from its subfolders, and noise keys not given come from its scheduler.
    pipeline: str | None = None
    text_encoder: TextEncoderSpec | None = None
    autoencoder: AutoencoderSpec | None = None
    unet: UNetSpec | None = None
    # stage-one trainers: a CLIP vision tower (clip trainer) and loss options
    vision: dict[str, Any] | None = None


class NoiseSpec(Strict):
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    input_perturbation: float = Field(0.0, ge=0)


class ShapesSourceSpec(Strict):
    n: int = Field(20000, ge=1)
    seed: int = 0
    resolution: int = 64
    colors: list[str] | None = None  # default: the six base colours (pink is the extra one)
    shapes: list[str] | None = None  # default: circle, square, triangle, star (heart is extra)

    @model_validator(mode="after")
    def _known(self):
        from ..data.shapes import COLORS, SHAPES

        for name, vals, allowed in (("colors", self.colors, COLORS), ("shapes", self.shapes, SHAPES)):
            bad = [v for v in vals or [] if v not in allowed]
            if bad:
                raise ValueError(f"{name} has {bad[0]!r}; choose from {', '.join(allowed)}")
        return self


class DataSpec(Strict):
    source: Literal["shapes", "imagefolder", "hub"] = "shapes"
    path: str | None = None  # imagefolder dir or hub dataset id
    split: str = "train"
    shapes: ShapesSourceSpec = Field(default_factory=ShapesSourceSpec)
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = Field(64, ge=8)
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = Field(0.0, ge=0, le=1)
    cache_latents: bool = True
    cache_dir: str | None = None
    num_workers: int = Field(0, ge=0)
    max_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source in ("imagefolder", "hub") and not self.path:
            raise ValueError(f"data.source '{self.source}' needs data.path")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("cached latents are encoded from centre crops without flips; set data.random_flip=false "
                             "and data.center_crop=true, or data.cache_latents=false")
        return self


class EMASpec(Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    warmup: bool = True  # diffusers EMAModel's use_ema_warmup
    every: int = Field(1, ge=1)


class TrainSpec(Strict):
    batch_size: int = Field(32, ge=1)
    max_steps: int = Field(1000, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    ema: EMASpec = Field(default_factory=EMASpec)
    checkpoint_every: int | None = Field(None, ge=1)
    checkpoints_total_limit: int | None = Field(2, ge=1)
    resume: str | None = None  # "latest" or a checkpoint dir

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML reads a bare `no` (mixed_precision=no) as false


class SamplingSpec(Strict):
    sampler: Literal["ddpm", "ddim", "dpm++", "euler", "unipc"] = "dpm++"
    steps: int = Field(20, ge=1)
    guidance_scale: float = 4.0
    seed: int = 0


class ValidationSpec(SamplingSpec):
    every: int | None = Field(None, ge=1)
    prompts: list[str] = Field(default_factory=list)
    images_per_prompt: int = Field(1, ge=1)


class EvalSpec(SamplingSpec):
    """Final evaluation of a trained text-to-image model on the shapes world."""

    shapes: bool = False
    n: int = Field(240, ge=1)
    heldout_n: int = Field(120, ge=0)
    seed: int = 1234


class LoggingSpec(Strict):
    tracker: Literal["none", "tensorboard", "wandb"] = "tensorboard"
    project: str = "ldm-lab"
    log_every: int = Field(25, ge=1)


class OutputSpec(Strict):
    dir: str = "runs/run"
    export_to: str | None = None  # also copy the final artifact here (stage-one parts)


class Recipe(Strict):
    trainer: str = "text_to_image"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    noise: NoiseSpec = Field(default_factory=NoiseSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # free-form options owned by the trainer plugin (validated by the plugin itself)
    plugin: dict[str, Any] = Field(default_factory=dict)
