"""The typed recipe: every key a YAML recipe may hold, with its type and default.

Models are strict (``extra="forbid"``) so a misspelt key is an error that names the key and
the closest valid one (see ``ldm_lab.recipe.load``), found before any model is loaded.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .choices import ObjectiveName, SamplerName
from .data_spec import SOURCES, BucketSpec, CaptionSpec, DataSpec, ShapesSourceSpec, SourceSpec  # noqa: F401
from .strict import Strict  # noqa: F401  (re-exported: plugin specs derive from it)


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
    # clip: CLIPTextModelWithProjection, its projected end-of-text state as the pooled vector (SD3)
    projection: bool = False
    # the hidden state read as token states: -1 the last (after the final norm), -2 the penultimate
    # (SDXL / SD3 CLIPs), ...
    hidden_layer: int = Field(-1, le=-1)
    # caption dropout of this encoder alone (several encoders: each drops on its own); None: data.caption_dropout
    dropout: float | None = Field(None, ge=0, le=1)


class AutoencoderSpec(PretrainedSpec):
    trainable: bool = False


class UNetSpec(PretrainedSpec):
    preset: Literal["tiny", "sd15", "sd21"] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class DenoiserSpec(PretrainedSpec):
    """The network being trained, by family: ``unet`` (UNet2DConditionModel), ``pixart`` (the text
    DiT, PixArtTransformer2DModel), ``sd3`` (the MMDiT, SD3Transformer2DModel). ``preset`` names an architecture of the family (``components.backbones``)."""

    family: Literal["unet", "pixart", "sd3"] = "unet"
    preset: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    # weights of a backbone built from a preset / config: the library's init, or PixArt's from-scratch
    # init (xavier linears, N(0, 0.02) embedders, zeroed cross-attention outputs and final layer)
    init: Literal["library", "dit"] = "library"

    @model_validator(mode="after")
    def _init_applies(self):
        if self.init == "dit" and (self.family != "pixart" or self.pretrained is not None):
            raise ValueError("init dit initialises a pixart backbone built from a preset or config; "
                             "remove it here")
        return self


class ModelSpec(Strict):
    # A diffusers pipeline (hub id or dir) to start from: text_encoder, autoencoder and unet not
    # given below come from its subfolders, and noise keys not given come from its scheduler.
    pipeline: str | None = None
    text_encoder: TextEncoderSpec | None = None
    # several frozen text encoders, in the order the denoiser family combines them (SD3: CLIP-L,
    # CLIP-G, then T5 if any); instead of text_encoder
    text_encoders: list[TextEncoderSpec] | None = None
    autoencoder: AutoencoderSpec | None = None
    unet: UNetSpec | None = None
    denoiser: DenoiserSpec | None = None  # instead of unet: any family
    # stage-one trainers: a CLIP vision tower (clip trainer) and loss options
    vision: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_of_each(self):
        if self.text_encoder is not None and self.text_encoders is not None:
            raise ValueError("give either text_encoder or text_encoders, not both")
        if self.text_encoders is not None and not self.text_encoders:
            raise ValueError("text_encoders is empty; list at least one text encoder")
        if self.unet is not None and self.denoiser is not None:
            raise ValueError("give either unet or denoiser, not both (denoiser: {family: unet, ...} is the same)")
        return self

    def encoder_specs(self) -> list[TextEncoderSpec]:
        """The text encoders, in order (one for ``text_encoder``)."""
        return list(self.text_encoders) if self.text_encoders is not None else \
            [self.text_encoder] if self.text_encoder is not None else []

    def denoiser_spec(self) -> DenoiserSpec:
        """The network being trained: ``denoiser``, else ``unet`` as the unet family (tiny preset by default)."""
        if self.denoiser is not None:
            return self.denoiser
        u = self.unet or UNetSpec(preset="tiny")
        return DenoiserSpec(family="unet", pretrained=u.pretrained, subfolder=u.subfolder, revision=u.revision,
                            config=u.config, preset=u.preset, overrides=u.overrides)


class NoiseSpec(Strict):
    """The training objective and its keys: ``ddpm`` (the DDPM keys) or ``flow`` (flow matching: the
    flow keys). Keys of the other objective are refused, so a recipe never sets one that does
    nothing."""

    objective: ObjectiveName = "ddpm"  # the training objective (diffusion.OBJECTIVES)
    num_train_timesteps: int = Field(1000, ge=2)
    min_timestep: int = Field(0, ge=0)  # training timesteps (σ·T for flow) lie in [min, max)
    max_timestep: int | None = Field(None, ge=1)
    # ddpm
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    input_perturbation: float = Field(0.0, ge=0)
    vlb_weight: float = Field(0.001, ge=0)  # λ of L_simple + λ·L_vlb for a backbone with a learned variance
    # flow
    timestep_density: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    shift: float = Field(1.0, gt=0)
    dynamic_shift: bool = False  # shift from the latent's token count instead of ``shift``
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = Field(256, ge=1)
    max_image_seq_len: int = Field(4096, ge=2)

    @model_validator(mode="after")
    def _keys_of_the_objective(self):
        other = FLOW_KEYS if self.objective == "ddpm" else DDPM_KEYS
        # a dumped recipe (RUN/recipe.yaml) holds every key at its default: only a changed one is stray
        stray = sorted(k for k in set(self.model_fields_set) & other
                       if getattr(self, k) != type(self).model_fields[k].default)
        if stray:
            raise ValueError(f"{stray[0]} is a key of the {'flow' if self.objective == 'ddpm' else 'ddpm'} objective, "
                             f"not of {self.objective!r}; remove it or set noise.objective")
        hi = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        if not self.min_timestep < hi <= self.num_train_timesteps:
            raise ValueError(f"timestep bounds need 0 <= min_timestep < max_timestep <= num_train_timesteps; got "
                             f"{self.min_timestep}, {hi}, {self.num_train_timesteps}")
        if self.dynamic_shift and self.shift != 1.0:
            raise ValueError("give either shift or dynamic_shift, not both")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end}): noise grows "
                             "over the timesteps")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            # at the last timestep alpha_bar is 0: x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides by 0
            raise ValueError("zero_terminal_snr needs prediction_type v_prediction (Lin et al.): with epsilon the "
                             "last timestep has no signal to recover, and sampling divides by zero (NaN images)")
        return self


DDPM_KEYS = {"beta_schedule", "beta_start", "beta_end", "prediction_type", "zero_terminal_snr", "min_snr_gamma",
             "noise_offset", "input_perturbation", "vlb_weight"}
FLOW_KEYS = {"timestep_density", "logit_mean", "logit_std", "mode_scale", "loss_weighting", "shift", "dynamic_shift",
             "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"}


class EMASpec(Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    warmup: bool = True  # diffusers EMAModel's use_ema_warmup
    every: int = Field(1, ge=1)  # update every K optimiser steps
    foreach: bool = True  # diffusers EMAModel's multi-tensor update
    offload: bool = False  # keep the EMA weights in (pinned) CPU memory between updates (GPU runs)


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
    # under fp16/bf16, the frozen weights (autoencoder, text encoders, a LoRA / ControlNet base) are held
    # in that dtype during training (about half their memory); fp32 keeps them as loaded
    frozen_dtype: Literal["compute", "fp32"] = "compute"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    # speed stack (docs/performance.md has each one's measured effect)
    attention: Literal["sdpa", "classic"] = "sdpa"  # torch scaled_dot_product_attention, or diffusers' AttnProcessor
    compile: bool = False  # torch.compile (inductor) the trained modules; falls back to eager if it fails
    allow_tf32: bool = True  # TF32 matmuls and convolutions on Ampere+ GPUs
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop", "torch"] = "auto"  # AdamW kernel (torch: its default)
    # reuse: glibc keeps freed host memory for the next step instead of unmapping and faulting it in again;
    # auto: reuse when training on the CPU (where it was measured), glibc's own policy on an accelerator
    host_allocator: Literal["auto", "reuse", "system"] = "auto"
    peak_tflops: float | None = Field(None, gt=0)  # device peak for the logged utilisation (GPU default: data sheet)
    ema: EMASpec = Field(default_factory=EMASpec)
    checkpoint_every: int | None = Field(None, ge=1)
    # a step whose loss (or gradient norm) is NaN/inf makes no update and is counted; this many in a
    # row stop the run with a checkpoint
    max_nonfinite_steps: int = Field(5, ge=1)
    checkpoints_total_limit: int | None = Field(2, ge=1)
    resume: str | None = None  # "latest" or a checkpoint dir
    # recipe keys (or their prefixes; "*": any) a resume may change although they change the training,
    # e.g. [train.learning_rate]; without them a checkpoint written with other values refuses to resume
    resume_allow_changes: list[str] = Field(default_factory=list)
    # resume a checkpoint that holds pickled custom state (older versions' EMA): only for your own files
    resume_trust_pickles: bool = False

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML reads a bare `no` (mixed_precision=no) as false


class SamplingSpec(Strict):
    sampler: SamplerName = "dpm++"
    steps: int = Field(20, ge=1)
    guidance_scale: float = 4.0
    # StableDiffusionPipeline's CFG rescale (Lin et al. §3.4, φ); default: 0.7 with noise.zero_terminal_snr
    # on a UNet (the paper's value), else 0 (the transformer pipelines have none)
    guidance_rescale: float | None = Field(None, ge=0, le=1)
    seed: int = 0


class ValidationSpec(SamplingSpec):
    every: int | None = Field(None, ge=1)
    prompts: list[str] = Field(default_factory=list)
    images_per_prompt: int = Field(1, ge=1)


class EvalSpec(SamplingSpec):
    """Evaluation of a text-to-image model on the shapes world: at the end of training (``n`` seen
    and ``heldout_n`` held-out prompts) and, every ``every`` steps, on a smaller fixed set."""

    shapes: bool = False
    n: int = Field(240, ge=1)
    heldout_n: int = Field(120, ge=0)
    seed: int = 1234
    # adherence during training: every `every` steps and at the last one (0: the final evaluation
    # only), `every_n` seen + `every_heldout_n` held-out prompts with fixed seeds, logged to the
    # tracker and history.jsonl and drawn in metrics.png
    every: int = Field(0, ge=0)
    every_n: int = Field(32, ge=1)
    every_heldout_n: int = Field(16, ge=0)
    # time-to-quality in metrics.json: the first step and seconds at which each adherence reached these
    thresholds: list[float] = Field(default_factory=lambda: [0.8, 0.9, 0.95])
    # FID, KID, CMMD and CLIP score at every `every` step, of samples for the data.val_n held-out
    # rows' captions against those rows' images, in this CLIP model's space (a CLIPModel +
    # CLIPProcessor dir or hub id; offline: data/pretrained/shapes-clip/clip)
    features: str | None = None


class LoggingSpec(Strict):
    tracker: Literal["none", "tensorboard", "wandb"] = "tensorboard"
    project: str = "ldm-lab"
    log_every: int = Field(25, ge=1)


class OutputSpec(Strict):
    dir: str = "runs/run"
    # start this run in a dir that holds another run, removing that run's checkpoints and outputs
    # (without it, such a dir is refused unless the run resumes with train.resume)
    overwrite: bool = False
    export_to: str | None = None  # also copy the final artifact here (a dir; a LoRA file also to a .safetensors path)
    # also write a full pipeline as RUN/pipeline.safetensors in the original SD layout (A1111, ComfyUI);
    # export_to copies the pipeline dir, not this file
    single_file: Literal["fp32", "fp16", "bf16"] | None = None
    # upload the finished artifact dir (with its README.md model card) to this Hub repo id
    # (huggingface_hub create_repo + upload_folder; needs a login), private when hub_private
    push_to_hub: str | None = None
    hub_private: bool = False

    @field_validator("dir")
    @classmethod
    def _named_dir(cls, v: str) -> str:
        if v.strip() in ("", "."):
            raise ValueError("output.dir is empty or the current directory; name a dir for the run, e.g. runs/my-run")
        return v


class Recipe(Strict):
    trainer: str = "text_to_image"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range, which set_seed also seeds
    model: ModelSpec = Field(default_factory=ModelSpec)
    noise: NoiseSpec = Field(default_factory=NoiseSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # options of the trainer plugin, checked against its options model (recipe/plugins.py) by load_recipe
    plugin: dict[str, Any] = Field(default_factory=dict)
