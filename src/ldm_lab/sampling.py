"""Sampling with stock diffusers pipelines, built from in-memory modules or loaded from disk.

Samplers are the entries of the registry in ``recipe.choices`` (ddpm, ddim, dpm++ for
DPM-Solver++ multistep, euler, unipc): each is a diffusers scheduler made from the training noise
schedule's config, so the trained prediction type, betas and timestep spacing carry over.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError
from .progress import bar
from .recipe.choices import FLOW_SAMPLERS, SAMPLERS

SD3_PIPELINES = (StableDiffusion3Pipeline, StableDiffusion3ControlNetPipeline)


def is_flow(config) -> bool:
    """Whether a scheduler config is a flow-matching one (FlowMatchEuler, or a flow DPM-Solver)."""
    return config.get("prediction_type") == "flow_prediction" or ("shift" in config and "beta_schedule" not in config)


def make_sampler(name: str, noise_config) -> object:
    """The scheduler of sampler ``name`` (a ``recipe.choices.SAMPLERS`` key) from ``noise_config``
    (a flow-matching config: ``FLOW_SAMPLERS``)."""
    if is_flow(noise_config):
        return _flow_sampler(name, noise_config)
    entry = SAMPLERS.get(name)
    if entry is None:
        raise ValueError(f"unknown sampler '{name}'; choose from {', '.join(SAMPLERS)}")
    extra = dict(entry.kwargs)
    if noise_config.get("timestep_spacing", "leading") == "leading":
        extra["steps_offset"] = 1  # Stable Diffusion's convention for leading spacing
    return getattr(diffusers, entry.scheduler).from_config(noise_config, **extra)


def _flow_sampler(name: str, cfg) -> object:
    entry = FLOW_SAMPLERS.get(name)
    if entry is None:
        raise ValueError(f"sampler '{name}' does not sample a flow-matching model; choose from {', '.join(FLOW_SAMPLERS)}")
    shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    keys = ("num_train_timesteps", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
    if entry.scheduler == "FlowMatchEulerDiscreteScheduler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic,
                                                         **{k: cfg[k] for k in keys if k in cfg})
    if dynamic:
        raise ValueError(f"sampler '{name}' has no resolution-dependent shift; sample with euler")
    return getattr(diffusers, entry.scheduler)(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                               flow_shift=shift, **entry.kwargs)


def use_sampler(pipe, name: str) -> None:
    """Give a loaded pipeline the scheduler of sampler ``name`` for the model it holds; a sampler
    that model or that pipeline cannot run is one sentence (the pipelines other than SD3 call
    ``scheduler.scale_model_input``, which FlowMatchEuler lacks)."""
    try:
        scheduler = make_sampler(name, pipe.scheduler.config)
    except ValueError as e:
        raise UserError(f"{e}.") from None
    if not _drives(pipe, scheduler):
        raise UserError(f"sampler '{name}' cannot drive this {type(pipe).__name__}'s flow-matching model; "
                        f"choose {' or '.join(usable_samplers(pipe))}.")
    pipe.scheduler = scheduler


def _drives(pipe, scheduler) -> bool:
    return hasattr(scheduler, "scale_model_input") or isinstance(pipe, SD3_PIPELINES)


def usable_samplers(pipe) -> list[str]:
    """The samplers ``use_sampler`` accepts for a loaded pipeline: the flow-matching ones its
    pipeline class can call for a flow model (``FLOW_SAMPLERS``), every DDPM-family one otherwise."""
    cfg = pipe.scheduler.config
    if not is_flow(cfg):
        return list(SAMPLERS)
    return [name for name in FLOW_SAMPLERS if _drives(pipe, make_sampler(name, cfg))]


def default_steps(name: str) -> int:
    return SAMPLERS[name].default_steps


def build_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler, sampler: str = "dpm++") -> StableDiffusionPipeline:
    """A stock StableDiffusionPipeline around modules already in memory (no reload from disk).

    ``tokenizer.model_max_length`` must be the length training padded prompts to: the stock
    pipeline pads to it, so the exported pipeline conditions exactly as training did.
    """
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_sampler(sampler, noise_scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_family_pipeline(family: str, vae, text_encoders, backbone, noise_scheduler, sampler: str = "dpm++"):
    """The stock pipeline of the backbone's family around in-memory modules: StableDiffusionPipeline
    (unet), PixArtSigmaPipeline (pixart; PixArtAlphaPipeline for a backbone with the resolution
    condition) or StableDiffusion3Pipeline (sd3: CLIP, CLIP, T5 or none). Each tokenizer's
    ``model_max_length`` becomes its encoder's training length, so the pipeline pads as training did."""
    for te in text_encoders:
        te.tokenizer.model_max_length = te.max_length
    if family == "unet":
        te = text_encoders[0]
        return build_pipeline(vae, te.model, te.tokenizer, backbone, noise_scheduler, sampler)
    if family == "pixart":
        te = text_encoders[0]
        cls = PixArtAlphaPipeline if backbone.use_additional_conditions else PixArtSigmaPipeline
        pipe = cls(tokenizer=te.tokenizer, text_encoder=te.model, vae=vae, transformer=backbone,
                   scheduler=make_sampler(sampler, noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    t5 = text_encoders[2] if len(text_encoders) == 3 else None
    if getattr(vae.config, "shift_factor", None) is None:  # the SD3 pipeline adds it when decoding
        vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=backbone, scheduler=make_sampler(sampler, noise_scheduler.config), vae=vae,
        text_encoder=text_encoders[0].model, tokenizer=text_encoders[0].tokenizer,
        text_encoder_2=text_encoders[1].model, tokenizer_2=text_encoders[1].tokenizer,
        text_encoder_3=t5.model if t5 else None, tokenizer_3=t5.tokenizer if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             batch_size: int = 64, prompt_embeds: torch.Tensor | None = None,
             negative_embeds: torch.Tensor | None = None, control: list | None = None,
             pooled: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None,
             **pipe_kwargs) -> list[Image.Image]:
    """One image per (prompt, seed). Each image depends only on its own seed, not on batching.

    With ``prompt_embeds`` (one row per prompt) and ``negative_embeds`` (1 row) the pipeline
    skips its own text encoding: that is how in-training sampling uses the conditioner (with
    ``pooled`` / ``negative_pooled`` for families that read a pooled vector, SD3, and ``mask`` /
    ``negative_mask`` for those that read the token mask, PixArt).
    ``control`` (ControlNet pipelines): per prompt, a control image, or a list of them (one per
    ControlNet of a multi-ControlNet pipeline); ``pipe_kwargs`` go to the pipeline call
    (``controlnet_conditioning_scale``, ``guess_mode``). StableDiffusion3ControlNetPipeline draws
    the control image's latent from torch's global generator: it samples one image per call with
    that generator seeded by the image's seed (``torch.manual_seed(seed)``, the caller's RNG state
    restored after), so a stock call after ``torch.manual_seed(seed)`` reproduces the image.
    """
    images: list[Image.Image] = []
    device = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).device
    if isinstance(pipe, StableDiffusion3ControlNetPipeline):
        batch_size = 1
    if isinstance(pipe, SD3_PIPELINES) and prompt_embeds is None:
        # as many T5 tokens as training read (none without a T5)
        pipe_kwargs.setdefault("max_sequence_length", pipe.tokenizer_3.model_max_length if pipe.text_encoder_3 else 0)
    if isinstance(pipe, (PixArtAlphaPipeline, PixArtSigmaPipeline)):
        # the prompt as given, padded to the training length, at the model's own size (no size bins)
        pipe_kwargs.setdefault("clean_caption", False)
        pipe_kwargs.setdefault("use_resolution_binning", False)
        if prompt_embeds is None:
            pipe_kwargs.setdefault("max_sequence_length", pipe.tokenizer.model_max_length)
    with _offset_fits(pipe, steps), bar(len(prompts), "sampling", "image") as progress:
        for s in range(0, len(prompts), batch_size):
            with _global_seed(pipe, seeds[s], device):
                images += _generate_batch(pipe, prompts, seeds, steps, guidance, s, batch_size, device, prompt_embeds,
                                          negative_embeds, control, pipe_kwargs, pooled, negative_pooled, mask,
                                          negative_mask)
            progress.update(min(batch_size, len(prompts) - s))
    return images


@contextlib.contextmanager
def _global_seed(pipe, seed: int, device: torch.device):
    """torch's global generators seeded with ``seed`` for an SD3 ControlNet pipeline call (it
    samples the control latent from them), the caller's state restored after; nothing otherwise."""
    if not isinstance(pipe, StableDiffusion3ControlNetPipeline):
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


class _offset_fits:
    """Stable Diffusion's ``steps_offset=1`` with leading spacing puts the last timestep of a
    full-length schedule (e.g. DDPM with 1000 steps of 1000) at index T, past the end of the
    noise schedule; for such step counts the offset is dropped while sampling."""

    def __init__(self, pipe, steps: int):
        self.pipe, self.old = pipe, None
        cfg = pipe.scheduler.config
        offset, T = cfg.get("steps_offset", 0), cfg.get("num_train_timesteps", 1000)
        if cfg.get("timestep_spacing", "leading") == "leading" and offset and (steps - 1) * (T // steps) + offset >= T:
            self.old = pipe.scheduler
            pipe.scheduler = type(pipe.scheduler).from_config(cfg, steps_offset=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.pipe.scheduler = self.old
        return False


def _generate_batch(pipe, prompts, seeds, steps, guidance, s, batch_size, device, prompt_embeds, negative_embeds,
                    control, pipe_kwargs, pooled=None, negative_pooled=None, mask=None,
                    negative_mask=None) -> list[Image.Image]:
    gens = [torch.Generator(device="cpu").manual_seed(int(x)) for x in seeds[s:s + batch_size]]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil", **pipe_kwargs)
    if prompt_embeds is not None:
        pe = prompt_embeds[s:s + batch_size].to(device)
        kw.update(prompt_embeds=pe, negative_prompt_embeds=negative_embeds.to(device).expand(len(pe), -1, -1),
                  negative_prompt=None)  # PixArt's default negative prompt is "", refused beside the embeds
        if pooled is not None:
            kw.update(pooled_prompt_embeds=pooled[s:s + batch_size].to(device),
                      negative_pooled_prompt_embeds=negative_pooled.to(device).expand(len(pe), -1))
        if mask is not None:
            kw.update(prompt_attention_mask=mask[s:s + batch_size].to(device).long(),
                      negative_prompt_attention_mask=negative_mask.to(device).long().expand(len(pe), -1))
    else:
        kw.update(prompt=prompts[s:s + batch_size], negative_prompt=[""] * len(prompts[s:s + batch_size]))
    if isinstance(pipe, StableDiffusion3ControlNetPipeline):  # one image per call; several nets: a list, one per net
        kw["control_image"] = control[s] if isinstance(control[s], list) else [control[s]]
    elif control is not None:
        kw["image"] = control[s:s + batch_size]  # multi-ControlNet: per prompt, a list with one per net
    return pipe(**kw).images


def build_controlnet_pipeline(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler, sampler: str = "dpm++"):
    """A stock StableDiffusionControlNetPipeline around in-memory modules (``controlnet``: one
    ControlNetModel or a list, which diffusers composes by summing scaled residuals)."""
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=make_sampler(sampler, noise_scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_family_controlnet_pipeline(family: str, vae, text_encoders, backbone, controlnet, noise_scheduler,
                                     sampler: str = "dpm++"):
    """The stock ControlNet pipeline of the backbone's family around in-memory modules:
    StableDiffusionControlNetPipeline (unet) or StableDiffusion3ControlNetPipeline (sd3: the
    components of ``build_family_pipeline``'s StableDiffusion3Pipeline, plus the ControlNet)."""
    if family == "unet":
        for te in text_encoders:
            te.tokenizer.model_max_length = te.max_length
        te = text_encoders[0]
        return build_controlnet_pipeline(vae, te.model, te.tokenizer, backbone, controlnet, noise_scheduler, sampler)
    base = build_family_pipeline(family, vae, text_encoders, backbone, noise_scheduler, sampler)
    pipe = StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 8, cell: int = 128) -> Image.Image:
    """A grid with each image upscaled to ``cell`` px and its prompt written under it."""
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    font = ImageFont.load_default()
    text_h = 52 if captions else 0
    g = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    d = ImageDraw.Draw(g)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        g.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], width=max(8, cell // 6))[:4]
            for k, line in enumerate(lines):
                d.text((x + 2, y + cell + 1 + 12 * k), line, fill="black", font=font)
    return g


def load_pipeline(source: str | Path) -> DiffusionPipeline:
    """A run dir (uses RUN/pipeline), a pipeline dir, or a hub id, as the pipeline class its
    model_index.json names (no safety checker where that class has one)."""
    p = Path(source)
    if (p / "pipeline" / "model_index.json").exists():
        p = p / "pipeline"
    if p.exists() and not (p / "model_index.json").exists():
        raise ValueError(f"'{source}' is neither a run dir with a pipeline nor a diffusers pipeline dir.")
    where = str(p) if p.exists() else str(source)
    index = DiffusionPipeline.load_config(where)
    cls = getattr(diffusers, index.get("_class_name", ""), None)
    takes = inspect.signature(cls.__init__).parameters if isinstance(cls, type) else {}
    no_checker = {k: v for k, v in (("safety_checker", None), ("requires_safety_checker", False)) if k in takes}
    # components saved as absent (an SD3 pipeline without its T5) are passed as None, as diffusers asks
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None] and k in takes}
    pipe = DiffusionPipeline.from_pretrained(where, **{**absent, **no_checker})
    pipe.set_progress_bar_config(disable=True)
    return pipe
