"""Sampling with stock diffusers pipelines, built from in-memory modules or loaded from disk.

Samplers: ddpm, ddim, dpm++ (DPM-Solver++ multistep), euler, unipc — each a diffusers
scheduler made from the training noise schedule's config, so the trained prediction type,
betas and timestep spacing carry over.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image, ImageDraw, ImageFont

SAMPLERS = {
    "ddpm": (DDPMScheduler, {}, 1000),
    "ddim": (DDIMScheduler, {}, 50),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, 20),
    "euler": (EulerDiscreteScheduler, {}, 30),
    "unipc": (UniPCMultistepScheduler, {}, 20),
}


def make_sampler(name: str, noise_config) -> object:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose from {', '.join(SAMPLERS)}")
    cls, extra, _ = SAMPLERS[name]
    if noise_config.get("timestep_spacing", "leading") == "leading":
        extra = {**extra, "steps_offset": 1}  # Stable Diffusion's convention for leading spacing
    return cls.from_config(noise_config, **extra)


def default_steps(name: str) -> int:
    return SAMPLERS[name][2]


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


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             batch_size: int = 64, prompt_embeds: torch.Tensor | None = None,
             negative_embeds: torch.Tensor | None = None, control: list | None = None, **pipe_kwargs) -> list[Image.Image]:
    """One image per (prompt, seed). Each image depends only on its own seed, not on batching.

    With ``prompt_embeds`` (one row per prompt) and ``negative_embeds`` (1 row) the pipeline
    skips its own text encoding: that is how in-training sampling uses the conditioner.
    ``control`` (ControlNet pipelines): per prompt, a control image, or a list of them (one per
    ControlNet of a multi-ControlNet pipeline); ``pipe_kwargs`` go to the pipeline call
    (``controlnet_conditioning_scale``, ``guess_mode``).
    """
    images: list[Image.Image] = []
    device = pipe.unet.device
    with _offset_fits(pipe, steps):
        for s in range(0, len(prompts), batch_size):
            images += _generate_batch(pipe, prompts, seeds, steps, guidance, s, batch_size, device, prompt_embeds,
                                      negative_embeds, control, pipe_kwargs)
    return images


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
                    control, pipe_kwargs) -> list[Image.Image]:
    gens = [torch.Generator(device="cpu").manual_seed(int(x)) for x in seeds[s:s + batch_size]]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil", **pipe_kwargs)
    if prompt_embeds is not None:
        pe = prompt_embeds[s:s + batch_size].to(device)
        kw.update(prompt_embeds=pe, negative_prompt_embeds=negative_embeds.to(device).expand(len(pe), -1, -1))
    else:
        kw.update(prompt=prompts[s:s + batch_size], negative_prompt=[""] * len(prompts[s:s + batch_size]))
    if control is not None:
        kw["image"] = control[s:s + batch_size]  # multi-ControlNet: per prompt, a list with one per net
    return pipe(**kw).images


def build_controlnet_pipeline(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler, sampler: str = "dpm++"):
    """A stock StableDiffusionControlNetPipeline around in-memory modules (``controlnet``: one
    ControlNetModel or a list, which diffusers composes by summing scaled residuals)."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=make_sampler(sampler, noise_scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
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


def with_controlnets(pipe: StableDiffusionPipeline, controlnets: list[tuple[str, float, str]], guess_mode: bool = False):
    """A StableDiffusionControlNetPipeline sharing ``pipe``'s modules, with one ControlNet or
    several (diffusers' MultiControlNetModel sums their residuals, each times its scale); returns
    (pipeline, control image(s) for every prompt, extra call kwargs)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from .errors import UserError

    size = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    nets, images = [], []
    for d, _, img in controlnets:
        try:
            nets.append(ControlNetModel.from_pretrained(d))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a ControlNet from '{d}' ({str(e).splitlines()[0][:160]}).") from None
        if nets[-1].config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
            raise UserError(f"ControlNet '{d}' was made for another base (cross_attention_dim "
                            f"{nets[-1].config.cross_attention_dim}, the base has {pipe.unet.config.cross_attention_dim}).")
        try:
            images.append(Image.open(img).convert("RGB").resize(size))
        except OSError:
            raise UserError(f"--control-image '{img}' is not an image file.") from None
    scales = [s for _, s, _ in controlnets]
    cpipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=nets if len(nets) > 1 else nets[0])
    cpipe.set_progress_bar_config(disable=True)
    one = len(nets) == 1
    return cpipe, (images[0] if one else images), {"controlnet_conditioning_scale": scales[0] if one else scales,
                                                   "guess_mode": guess_mode}


def load_pipeline(source: str | Path) -> StableDiffusionPipeline:
    """A run dir (uses RUN/pipeline), a pipeline dir, or a hub id."""
    p = Path(source)
    if (p / "pipeline" / "model_index.json").exists():
        p = p / "pipeline"
    if p.exists() and not (p / "model_index.json").exists():
        raise ValueError(f"'{source}' is neither a run dir with a pipeline nor a diffusers pipeline dir.")
    pipe = StableDiffusionPipeline.from_pretrained(str(p) if p.exists() else str(source), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_cli(source: str, prompts: list[str], n: int = 1, steps: int | None = None, guidance: float = 4.0,
               sampler: str = "dpm++", seed: int = 0, out: str | None = None,
               loras: list[tuple[str, float]] | None = None, controlnets: list[tuple[str, float, str]] | None = None,
               guess_mode: bool = False) -> Path:
    from .errors import UserError

    if not prompts:
        raise UserError("no prompts given; pass --prompt TEXT or a non-empty --prompts-file.")
    try:
        pipe = load_pipeline(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a pipeline from '{source}' ({str(e).splitlines()[0]}); "
                        "give a run dir, a diffusers pipeline dir or a hub id.") from None
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    if loras:
        from .lora_io import apply_loras

        try:
            apply_loras(pipe, loras)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"cannot apply LoRA to '{source}' ({str(e).splitlines()[0][:200]}); "
                            "was it trained for this base?") from None
    extra: dict = {}
    if controlnets:
        pipe, control, extra = with_controlnets(pipe, controlnets, guess_mode)
    out_dir = Path(out) if out else (Path(source) / "samples-cli" if Path(source).is_dir() else Path("samples"))
    out_dir.mkdir(parents=True, exist_ok=True)
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(all_prompts))]
    images = generate(pipe, all_prompts, seeds, steps or default_steps(sampler), guidance,
                      control=[control] * len(all_prompts) if controlnets else None, **extra)
    rows = []
    for i, (im, p, s) in enumerate(zip(images, all_prompts, seeds)):
        name = f"{i:04d}.png"
        im.save(out_dir / name)
        rows.append({"file_name": name, "prompt": p, "seed": s, **({"loras": loras} if loras else {}),
                     **({"controlnets": controlnets, "guess_mode": guess_mode} if controlnets else {})})
    (out_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid(images, all_prompts).save(out_dir / "grid.png")
    return out_dir
