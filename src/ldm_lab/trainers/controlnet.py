"""ControlNet: spatial control (masks, edges, ...) for a frozen text-to-image model through a
trainable copy of part of its backbone joined by zero-initialised layers (``components.controlnets``).

* UNet base: ``ControlNetModel.from_unet`` (encoder weights copied, every output conv zero); SD3
  base: ``SD3ControlNetModel.from_transformer`` (the first blocks copied, zero output projections
  and a zero patch embedding of the control latents); or an existing ControlNet
  (``plugin.controlnet``). The backbone, autoencoder and text encoders are frozen. A PixArt base is
  refused: diffusers has no PixArt ControlNet.
* The control image is a dataset column (``plugin.conditioning_column``) or computed from the
  target by a preprocessor (``canny``: OpenCV's Canny). Image and control go through one
  torchvision v2 transform call, so random crops and flips hit both alike; with cached latents
  both are centre-cropped the same way.
* Prompt dropout (``plugin.prompt_dropout``, default 0.5 as the paper trains) replaces the caption
  by the empty prompt, so the net learns to read the control without text.
* Control images are in [0, 1] (what diffusers' ControlNet pipelines take). The UNet's ControlNet
  reads them as pixels and its residuals are added to the frozen UNet's skip connections and mid
  block; SD3's reads their autoencoder latents, made as ``StableDiffusion3ControlNetPipeline`` makes
  them (a posterior sample, shifted and scaled), and its block states are added after the MMDiT's
  blocks.
* The artifact is ``RUN/controlnet`` (``ControlNetModel`` / ``SD3ControlNetModel.from_pretrained``),
  used by a stock ``StableDiffusionControlNetPipeline`` / ``StableDiffusion3ControlNetPipeline``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..components.controlnets import control_latents, load_controlnet, new_controlnet
from ..components.denoiser import ADAPTERS
from ..data.checks import to_rgb
from ..data.control import canny
from ..data.loader import make_loader
from ..errors import UserError
from ..evaluation.control import control_eval, control_image, control_kind
from ..recipe.plugins import ControlNetOptions
from ..sampling import build_family_controlnet_pipeline, generate, grid
from .base import eval_mode
from .registry import register
from .text_to_image import TextToImageTrainer


def paired_transform(resolution: int, center_crop: bool = True, random_flip: bool = False) -> v2.Compose:
    """Resize + crop (+ flip) applied by one call to (image, control): the same random crop and
    flip for both. Returns uint8 tensors; ``finish`` scales them."""
    ops = [v2.ToImage(), v2.Resize(resolution, antialias=True),
           v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)]
    if random_flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


def finish(image: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 tensors -> the image in [-1, 1] and the control in [0, 1]."""
    return image.float() / 127.5 - 1, control.float() / 255


class ControlRows(Dataset):
    """Rows of the dataset with their control image: cached latents + caption index, or the
    image + token ids (encoded per step)."""

    def __init__(self, rows, control_of, tf, cached=None, tokenize=None, image_column="image",
                 caption_column="text"):
        self.rows, self.control_of, self.tf, self.cached = rows, control_of, tf, cached
        self.tokenize, self.icol, self.ccol = tokenize, image_column, caption_column

    def __len__(self) -> int:
        return len(self.cached) if self.cached is not None else len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[self.cached.source_rows[i] if self.cached is not None else i]
        image = to_rgb(row[self.icol]) if self.icol in row else None  # not read when not needed
        control = self.control_of(row, image)
        if self.cached is not None:  # centre crop: the geometry the cached latents were encoded with
            return {**self.cached[i], "control": self.tf(control).float() / 255}
        img, ctl = finish(*self.tf(image, control))
        return {"pixel_values": img, "input_ids": self.tokenize([row[self.ccol] or ""])[0], "control": ctl}


@register
class ControlNetTrainer(TextToImageTrainer):
    name = "controlnet"
    families = ("unet", "sd3")

    def setup(self) -> None:
        self.opts = o = ControlNetOptions.model_validate(self.recipe.plugin)
        family = self.recipe.model.denoiser_spec().family
        for adapter in ADAPTERS.values():
            if adapter.family == family and adapter.no_controlnet:
                raise UserError(adapter.no_controlnet)
        self.refuse_single_file("a ControlNet run writes a ControlNet, which loads beside a base")
        if self.recipe.data.streaming or self.recipe.data.buckets.enabled:
            raise UserError("the controlnet trainer reads a map-style dataset with centre crops; set "
                              "data.streaming=false and data.buckets.enabled=false.")
        if self.recipe.data.caption_dropout > 0:
            raise UserError("the controlnet trainer drops prompts with plugin.prompt_dropout; set "
                              "data.caption_dropout to 0 (both would apply).")
        self.build_models()
        self.unet.requires_grad_(False)
        self.unet.to(self.accelerator.device)
        self.unet.eval()
        if self.recipe.train.gradient_checkpointing:  # the backward pass runs through the frozen UNet too
            self.unet.enable_gradient_checkpointing()
        family = self.denoiser.family
        if o.controlnet:
            self.controlnet = load_controlnet(family, o.controlnet, self.unet)
        else:
            self.controlnet = new_controlnet(family, self.unet, self.vae, o)
        self.controlnet.train()

        d = self.recipe.data
        rows = self.load_checked_rows()
        self.cond_col = o.conditioning_column
        if o.preprocessor is None and self.cond_col not in rows.column_names:
            if f"{self.cond_col}_file_name" in rows.column_names:  # an imagefolder's metadata.jsonl path column
                self.cond_col = f"{self.cond_col}_file_name"
            else:
                raise UserError(f"dataset has no column '{o.conditioning_column}' for control images (columns: "
                                  f"{', '.join(rows.column_names)}); set plugin.conditioning_column or plugin.preprocessor canny.")
        if d.cache_latents:
            self.prepare_rows(rows, d.image_column, d.caption_column)
        else:
            self.cached = None
        self.control_rows = rows
        self.tf = paired_transform(d.resolution, d.center_crop or d.cache_latents, d.random_flip and not d.cache_latents)

    def control_of(self, row: dict, image: Image.Image) -> Image.Image:
        o = self.opts
        if o.preprocessor == "canny":
            return canny(image, o.canny_low, o.canny_high)
        value = row[self.cond_col]
        if isinstance(value, str):  # a path, relative to the imagefolder
            with Image.open(Path(self.recipe.data.path or ".") / value) as im:
                return im.convert("RGB")
        return value.convert("RGB")

    def trainable_modules(self):
        return {"controlnet": self.controlnet}

    def train_dataloader(self):
        d, t = self.recipe.data, self.recipe.train
        rows = self.control_rows
        if self.cached is not None and self.opts.preprocessor is None:
            rows = rows.select_columns([self.cond_col])  # latents are cached: decode only the control image
        ds = ControlRows(rows, self.control_of, self.tf, self.cached, self.text_encoder.tokenize,
                         d.image_column, d.caption_column)
        if self.recipe.eval.features:
            raise UserError("eval.features samples the held-out captions without their control images, which would "
                            "score the base, not the ControlNet; leave eval.features out (data.val_n alone gives "
                            "the ControlNet's validation loss).")
        ds, _ = self.hold_out(ds)
        return make_loader(ds, d, t.batch_size)

    def evaluate_during(self, step: int) -> dict[str, float]:
        """The held-out validation loss only: the text-to-image adherence and image metrics would
        sample the base without the ControlNet (its own evaluation, with control images, is the final one)."""
        return self.validation_loss() if self.accelerator.is_main_process else {}

    def condition(self, batch, cond):
        """The loss-path hook: prompt dropout (the paper's 50%), the empty prompt's record."""
        return self.conditioner.drop(cond, self.opts.prompt_dropout, rng=self.rng)

    def residuals(self, batch, draw, cond):
        """The loss-path hook: the ControlNet's residuals for the frozen backbone (SD3: from the
        control image's latents, the posterior sample drawn from the run's BatchRNG)."""
        control = batch["control"].to(draw.x_t.device, draw.x_t.dtype)
        if self.denoiser.control_latents:
            factor = self.denoiser.latent_factor
            noise = self.rng.randn((len(control), self.vae.config.latent_channels, control.shape[-2] // factor,
                                    control.shape[-1] // factor))
            control = control_latents(self.vae, self.unwrap(self.controlnet), control, noise,
                                      self.shift_factor).to(draw.x_t.dtype)
        return self.denoiser.control_residuals(self.controlnet, draw.x_t, draw.t, cond, control)

    def ema_modules(self):
        return [self.controlnet]

    def train_flops_per_sample(self) -> float | None:
        return None  # the ControlNet and the frozen UNet it feeds: not counted yet

    # -- sampling, artifact, evaluation --------------------------------------------------
    def control_pipeline(self, sampler: str):
        return build_family_controlnet_pipeline(self.denoiser.family, self.vae, self.text_encoders, self.unet,
                                                self.unwrap(self.controlnet), self.objective.scheduler, sampler)

    def sample_control(self, prompts, controls, seeds, sampler, steps, guidance, guess_mode: bool = False):
        sd3 = self.denoiser.family == "sd3"
        if sd3 and guess_mode:
            raise UserError("StableDiffusion3ControlNetPipeline has no guess mode; sample without it.")
        with eval_mode(self.unwrap(self.controlnet)):
            cond, null = self.conditioner.encode(prompts), self.conditioner.null()
            extra = {"pooled": cond.pooled, "negative_pooled": null.pooled} if sd3 else {"guess_mode": guess_mode}
            return generate(self.control_pipeline(sampler), prompts, seeds, steps, guidance, prompt_embeds=cond.states,
                            negative_embeds=null.states, control=controls, **extra)

    def validate(self, step: int) -> dict[str, float]:
        v = self.recipe.validation
        if not v.every or not self.accelerator.is_main_process:
            return {}
        n = min(self.opts.validation_n, len(self.control_rows))
        rows = [self.control_rows[i] for i in range(n)]
        prompts = [r[self.recipe.data.caption_column] or "" for r in rows]
        controls = [self._eval_control(r) for r in rows]
        seeds = [v.seed + i for i in range(n)]
        images = self.sample_control(prompts, controls, seeds, v.sampler, v.steps, v.guidance_scale)
        out = self.run_dir / "samples"
        (out / f"step-{step:06d}").mkdir(parents=True, exist_ok=True)
        for i, (c, im) in enumerate(zip(controls, images)):
            c.save(out / f"step-{step:06d}" / f"control-{i:02d}.png")
            im.save(out / f"step-{step:06d}" / f"{i:02d}.png")
        (out / f"step-{step:06d}" / "samples.jsonl").write_text("".join(
            json.dumps({"file_name": f"{i:02d}.png", "control": f"control-{i:02d}.png", "prompt": p, "seed": sd}) + "\n"
            for i, (p, sd) in enumerate(zip(prompts, seeds))))
        pairs = [im for c, g in zip(controls, images) for im in (c, g)]
        captions = [x for p in prompts for x in ("control", p)]
        grid(pairs, captions, cols=min(8, 2 * n)).save(out / f"step-{step:06d}.png")
        return {}

    def _eval_control(self, row) -> Image.Image:
        d = self.recipe.data
        image = row[d.image_column].convert("RGB")
        return v2.functional.to_pil_image(self.tf(image, self.control_of(row, image))[1])

    def save(self, out_dir: Path) -> None:
        net = self.unwrap(self.controlnet)
        net.save_pretrained(out_dir / "controlnet")
        (out_dir / "controlnet" / "ldm_lab.json").write_text(json.dumps({
            "base_model": self.recipe.model.pipeline or "", "conditioning_column": self.opts.conditioning_column,
            "preprocessor": self.opts.preprocessor, "resolution": self.recipe.data.resolution}, indent=2))
        self.export(out_dir / "controlnet")

    def evaluate(self) -> dict:
        e = self.recipe.eval
        if not e.shapes or not self.accelerator.is_main_process:
            return {}

        kind = control_kind(self.opts)
        if kind is None:
            return {}

        def with_control(prompts, controls, seeds, guess_mode):
            return self.sample_control(prompts, controls, seeds, e.sampler, e.steps, e.guidance_scale, guess_mode)

        def without(prompts, controls, seeds):
            return self.sample(prompts, seeds, e.sampler, e.steps, e.guidance_scale)

        def control_for(image, mask):
            return control_image(kind, image, mask, self.opts.canny_low, self.opts.canny_high)

        return {"control_eval": control_eval(with_control, without, control_for, self.run_dir / "eval",
                                             self.opts.eval_n, e.seed, self.recipe.data.resolution,
                                             guess_mode=self.denoiser.family != "sd3")}

    def build_cache(self, out: Path | None) -> None:
        """The whole set-up (ControlNet, control columns, then the cache), where runs of the recipe
        find the cache (no ``out``)."""
        if out is not None:
            raise UserError(f"--out is not supported for the {self.name} trainer; leave it out (its run finds the cache).")
        self.setup()
