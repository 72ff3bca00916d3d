"""Typed ``plugin:`` sections of the trainer plugins, checked with the rest of the recipe
(so ``ldm-lab recipe check`` finds a misspelt LoRA option before any model is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .choices import SamplerName
from .schema import Strict

# UNet module-name suffixes (diffusers UNet2DConditionModel) each LoRA target preset adapts.
# The SD3 MMDiT: the attention projections of both streams (latent: to_*, text: add_*_proj / to_add_out),
# as diffusers' SD3 LoRA example targets; + both feed-forwards; no convolutions to add
_SD3_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_SD3_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SD3_TARGET_PRESETS: dict[str, list[str]] = {"attn": _SD3_ATTN, "attn_ff": _SD3_ATTN + _SD3_FF,
                                            "attn_ff_conv": _SD3_ATTN + _SD3_FF}
# The PixArt DiT: self- and cross-attention projections of every block (attn1 / attn2 share the
# suffixes), as PixArt's own LoRA recipe targets; + the feed-forward; no convolutions to add
_PIXART_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
PIXART_TARGET_PRESETS: dict[str, list[str]] = {"attn": _PIXART_ATTN, "attn_ff": _PIXART_ATTN + ["ff.net.0.proj", "ff.net.2"],
                                               "attn_ff_conv": _PIXART_ATTN + ["ff.net.0.proj", "ff.net.2"]}
UNET_TARGET_PRESETS: dict[str, list[str]] = {
    # attention projections of every transformer block (self- and cross-attention)
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    # + the feed-forward of each transformer block
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    # + resnet convolutions and the transformer in/out projections (LoCon-style)
    "attn_ff_conv": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                     "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"],
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoRAOptions(Strict):
    """``plugin:`` keys of ``trainer: lora``."""

    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0)  # default: equal to rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # a preset name (see UNET_/SD3_/PIXART_TARGET_PRESETS) or an explicit list of module-name suffixes / regex
    targets: Literal["attn", "attn_ff", "attn_ff_conv"] | list[str] = "attn"
    # peft init_lora_weights: "default" (Kaiming A, zero B), "gaussian", "pissa", "olora"
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    dora: bool = False  # weight-decomposed LoRA (peft use_dora); the same as adapter: dora
    # the adapter: LoRA, DoRA, or LyCORIS' Kronecker (LoKr) and Hadamard (LoHa) products (PEFT's
    # LoKrConfig / LoHaConfig), which diffusers' load_lora_weights does not read: their artifact is
    # LyCORIS/kohya keys (lycoris-lora, ComfyUI, A1111) plus a PEFT adapter dir per component
    adapter: Literal["lora", "dora", "lokr", "loha"] = "lora"
    factor: int = Field(-1, ge=-1)  # LoKr: Kronecker factor of each dimension (-1: as square as it divides)
    decompose_both: bool = False  # LoKr: the small factor w1 low-rank too (w1_a @ w1_b)
    conv_tucker: bool = False  # LoKr / LoHa on k x k convolutions: a Tucker core (PEFT use_effective_conv2d)
    rank_dropout: float = Field(0.0, ge=0, lt=1)  # LoKr / LoHa: drop output rows of the update
    module_dropout: float = Field(0.0, ge=0, lt=1)  # LoKr / LoHa: drop the whole update of a module
    train_text_encoder: bool = False
    text_encoder_rank: int | None = Field(None, ge=1)  # default: rank
    text_encoder_alpha: float | None = Field(None, gt=0)  # default: text_encoder_rank
    text_encoder_targets: list[str] = Field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    text_encoder_lr: float | None = Field(None, gt=0)  # default: train.learning_rate

    @model_validator(mode="after")
    def _targets_nonempty(self):
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets is an empty list; give module names or a preset (attn, attn_ff, attn_ff_conv)")
        if self.dora and self.adapter not in ("lora", "dora"):
            raise ValueError(f"dora: true with adapter: {self.adapter}; DoRA is a LoRA variant, set one of them")
        if self.adapter in ("lokr", "loha") and self.init != "default":
            raise ValueError(f"init {self.init} is a LoRA initialisation; {self.adapter} starts from its own "
                             "(update 0); leave init at default")
        if self.adapter in ("lokr", "loha") and self.dropout:
            raise ValueError(f"dropout is LoRA's input dropout; {self.adapter} has rank_dropout and module_dropout")
        if self.kind == "dora" and self.init in ("pissa", "olora"):
            raise ValueError(f"init {self.init} with dora is not supported (the artifact could not be written as a "
                             "LoRA of the original base); use one of them")
        return self

    @property
    def kind(self) -> str:
        """The adapter trained: lora, dora (``adapter: dora`` or ``dora: true``), lokr or loha."""
        return "dora" if self.dora else self.adapter

    def unet_targets(self, family: str = "unet") -> list[str]:
        """The backbone's target modules: the family's preset, or the list given."""
        presets = {"sd3": SD3_TARGET_PRESETS, "pixart": PIXART_TARGET_PRESETS}.get(family, UNET_TARGET_PRESETS)
        return list(presets[self.targets]) if isinstance(self.targets, str) else list(self.targets)


class DreamBoothOptions(LoRAOptions):
    """``plugin:`` keys of ``trainer: dreambooth`` (the LoRA keys apply in ``mode: lora``)."""

    mode: Literal["lora", "full"] = "lora"  # adapters (LoRA plugin formats) or the whole UNet (pipeline dir)
    instance_prompt: str = "a photo of {id}"  # caption of instance images without their own caption
    identifier: str = "auto"  # "auto": a rare single token of the tokenizer; or the token to use
    class_prompt: str | list[str] | None = None  # prompts of the class images (a list is cycled)
    class_prompt_file: str | None = None  # or a text file, one class prompt per line (# starts a comment)
    prior_preservation: bool = False
    num_class_images: int = Field(100, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)  # lambda: loss = instance + lambda * prior
    class_dir: str | None = None  # default: OUTPUT_DIR/class_images
    class_sampler: SamplerName = "dpm++"
    class_steps: int = Field(25, ge=1)
    class_guidance: float = Field(5.0, ge=0)
    class_seed: int = 0
    class_batch_size: int = Field(16, ge=1)  # images per sampling batch while generating class images
    # shapes-world measurement (eval.shapes): prompt templates with {id} / {color} {position} {background} {size}
    eval_subject_prompt: str | None = None
    eval_class_prompt: str | None = None
    eval_per_context: int = Field(4, ge=1)  # samples per (position, background) context

    @model_validator(mode="after")
    def _prompts(self):
        if "{id}" not in self.instance_prompt:
            raise ValueError(f"instance_prompt {self.instance_prompt!r} has no {{id}}; write where the identifier "
                             "goes, e.g. 'a photo of {id} dog'")
        if self.prior_preservation and not (self.class_prompt or self.class_prompt_file):
            raise ValueError("prior_preservation needs class_prompt (e.g. 'a photo of dog') or class_prompt_file")
        if self.class_prompt and self.class_prompt_file:
            raise ValueError("give class_prompt or class_prompt_file, not both")
        if isinstance(self.class_prompt, list) and not self.class_prompt:
            raise ValueError("class_prompt is an empty list; give one prompt or several")
        if self.eval_subject_prompt is not None and "{id}" not in self.eval_subject_prompt:
            raise ValueError("eval_subject_prompt needs {id}")
        for name in ("eval_subject_prompt", "eval_class_prompt"):
            t = getattr(self, name)
            try:
                if t is not None:
                    t.replace("{id}", "x").format(size="large", color="red", position="center", background="white")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{name} {t!r} has a field other than {{id}} {{size}} {{color}} {{position}} "
                                 f"{{background}} ({e})") from None
        return self

    def class_prompts(self) -> list[str]:
        if self.class_prompt_file:
            f = Path(self.class_prompt_file)
            if not f.is_file():
                raise ValueError(f"class_prompt_file '{f}' does not exist; give a text file with one prompt per line")
            lines = [ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            if not lines:
                raise ValueError(f"class_prompt_file '{f}' has no prompts")
            return lines
        p = self.class_prompt
        return [] if p is None else [p] if isinstance(p, str) else list(p)


class ControlNetOptions(Strict):
    """``plugin:`` keys of ``trainer: controlnet``."""

    # the control image: a dataset column, or computed from the target image by a preprocessor
    conditioning_column: str | None = "conditioning_image"
    preprocessor: Literal["canny"] | None = None  # canny: OpenCV Canny edges of the target image
    canny_low: int = Field(100, ge=0)
    canny_high: int = Field(200, ge=0)
    # continue from this ControlNet dir / hub id instead of ControlNetModel.from_unet / SD3ControlNetModel.from_transformer
    controlnet: str | None = None
    prompt_dropout: float = Field(0.5, ge=0, le=1)  # share of steps trained with the empty prompt (the paper: 50%)
    # channels of the control-image encoder, one stride-2 stage between entries; default: diffusers'
    # (16, 32, 96, 256) cut to as many stages as the autoencoder downsamples (3 for 8x)
    conditioning_embedding_out_channels: list[int] | None = None
    # SD3 base: the MMDiT blocks a new ControlNet copies (fewer than the base's); default half the base's, at most 12
    num_layers: int | None = Field(None, ge=1)
    validation_n: int = Field(4, ge=1)  # dataset rows (control + caption) sampled at each validation
    eval_n: int = Field(64, ge=1)  # shapes evaluation: fresh rows per prompt set

    @model_validator(mode="after")
    def _source(self):
        if self.preprocessor is None and not self.conditioning_column:
            raise ValueError("give conditioning_column (a dataset column of control images) or a preprocessor (canny)")
        return self


class TextToImageOptions(Strict):
    """``plugin:`` keys of ``trainer: text_to_image``: none (every option is a recipe key)."""


class AutoencoderOptions(Strict):
    """``plugin:`` keys of ``trainer: autoencoder`` (trainers/autoencoder.py says what each does)."""

    kl_weight: float = Field(1e-6, ge=0)  # weight of the per-pixel-element KL term
    mse_weight: float = Field(1.0, ge=0)  # weight of the MSE term added to the L1 reconstruction loss
    crop: int | None = Field(None, ge=1)  # random crops of this many pixels; default: the full resolution
    scale_batches: int = Field(8, ge=1)  # batches of 32 images that measure the latents' scaling factor
    init_logvar: float | None = -6.0  # initial posterior log-variance of a new autoencoder (None: diffusers' init)


def _clip_tower() -> dict[str, Any]:
    return {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}


class CLIPOptions(Strict):
    """``plugin:`` keys of ``trainer: clip``. ``text`` / ``vision`` are transformers CLIPTextConfig /
    CLIPVisionConfig keys; a given mapping replaces the default one as a whole."""

    max_length: int = Field(20, ge=2)  # tokens per caption, begin and end tokens included
    projection_dim: int = Field(64, ge=1)
    text: dict[str, Any] = Field(default_factory=_clip_tower)
    vision: dict[str, Any] = Field(default_factory=lambda: {**_clip_tower(), "patch_size": 8})


# every trainer name has an options model: the registry refuses a trainer that has none
PLUGIN_OPTIONS: dict[str, type[Strict]] = {
    "text_to_image": TextToImageOptions,
    "autoencoder": AutoencoderOptions,
    "clip": CLIPOptions,
    "lora": LoRAOptions,
    "dreambooth": DreamBoothOptions,
    "controlnet": ControlNetOptions,
}


def plugin_options(trainer: str, plugin: dict) -> Strict | None:
    """The typed options of ``trainer`` (None for a name that is not a trainer)."""
    cls = PLUGIN_OPTIONS.get(trainer)
    return cls.model_validate(plugin) if cls is not None else None
