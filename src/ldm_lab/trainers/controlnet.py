"""ControlNet: spatial control (masks, edges, ...) for a frozen text-to-image model through a
trainable copy of its UNet encoder joined by zero convolutions.

* ``ControlNetModel.from_unet`` (encoder weights copied, every output conv zero) or an existing
  ControlNet (``plugin.controlnet``); UNet, autoencoder and text encoder are frozen.
* The control image is a dataset column (``plugin.conditioning_column``) or computed from the
  target by a preprocessor (``canny``: OpenCV's Canny). Image and control go through one
  torchvision v2 transform call, so random crops and flips hit both alike; with cached latents
  both are centre-cropped the same way.
* Prompt dropout (``plugin.prompt_dropout``, default 0.5 as the paper trains) replaces the caption
  by the empty prompt, so the net learns to read the control without text.
* Control images are in [0, 1] (what diffusers' ControlNet pipelines feed); the ControlNet's
  residuals are added to the frozen UNet's skip connections and mid block.
* The artifact is ``RUN/controlnet`` (``ControlNetModel.from_pretrained``), used by a stock
  ``StableDiffusionControlNetPipeline``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from ..components.autoencoder import latent_factor
from ..data.checks import to_rgb
from ..diffusion import diffusion_loss
from ..errors import UserError
from ..recipe.plugins import ControlNetOptions
from .registry import register
from .text_to_image import TextToImageTrainer


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV Canny edges of ``image`` as a 3-channel image."""
    import cv2

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return Image.fromarray(cv2.Canny(gray, low, high)).convert("RGB")


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

    def setup(self) -> None:
        from diffusers import ControlNetModel

        self.opts = o = ControlNetOptions.model_validate(self.recipe.plugin)
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
        if o.controlnet:
            try:
                self.controlnet = ControlNetModel.from_pretrained(o.controlnet)
            except (OSError, ValueError) as e:
                raise UserError(f"plugin.controlnet '{o.controlnet}' cannot be loaded ({str(e).splitlines()[0][:160]}); "
                                  "give a ControlNet dir (config.json + weights) or a hub id.") from None
            mine, base = self.controlnet.config, self.unet.config
            for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
                if tuple(np.atleast_1d(mine[key])) != tuple(np.atleast_1d(base[key])):
                    raise UserError(f"plugin.controlnet '{o.controlnet}' was made for another UNet ({key} "
                                      f"{mine[key]} vs the base's {base[key]}); give a ControlNet of this base.")
        else:
            factor = latent_factor(self.vae)
            chans = o.conditioning_embedding_out_channels or [16, 32, 96, 256, 512][:int(math.log2(factor)) + 1]
            if 2 ** (len(chans) - 1) != factor:
                raise UserError(f"plugin.conditioning_embedding_out_channels has {len(chans)} entries, which "
                                  f"downsample the control image {2 ** (len(chans) - 1)}x, but the autoencoder's "
                                  f"latents are {factor}x smaller; give {int(math.log2(factor)) + 1} entries.")
            self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=tuple(chans))
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
        self.raw_rows = rows
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
        rows = self.raw_rows
        if self.cached is not None and self.opts.preprocessor is None:
            rows = rows.select_columns([self.cond_col])  # latents are cached: decode only the control image
        ds = ControlRows(rows, self.control_of, self.tf, self.cached, self.text_encoder.tokenize,
                         d.image_column, d.caption_column)
        return DataLoader(ds, batch_size=t.batch_size, shuffle=True, drop_last=True, collate_fn=default_collate,
                          num_workers=d.num_workers, persistent_workers=d.num_workers > 0)

    def residuals(self, noisy, t, cond, control):
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=cond, controlnet_cond=control, return_dict=False)
        return list(down), mid

    def loss(self, batch):
        z, cond = self.latents_and_condition(batch)
        cond = self.conditioner.drop(cond, self.opts.prompt_dropout, rng=self.rng)
        noisy, t, target, weights = self.diffusion_terms(z)
        control = batch["control"].to(noisy.device, noisy.dtype)
        down, mid = self.residuals(noisy, t, cond, control)
        pred = self.unet(noisy, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        return diffusion_loss(pred, target, weights), {}

    def ema_module(self):
        return self.controlnet

    def train_flops_per_sample(self) -> float | None:
        return None  # the ControlNet and the frozen UNet it feeds: not counted yet

    # -- sampling, artifact, evaluation --------------------------------------------------
    def control_pipeline(self, sampler: str):
        from ..sampling import build_controlnet_pipeline

        te = self.text_encoder
        te.tokenizer.model_max_length = te.max_length
        return build_controlnet_pipeline(self.vae, te.model, te.tokenizer, self.unet, self.unwrap(self.controlnet),
                                         self.noise_scheduler, sampler)

    def sample_control(self, prompts, controls, seeds, sampler, steps, guidance, guess_mode: bool = False):
        from ..sampling import generate

        net = self.unwrap(self.controlnet)
        was = net.training
        net.eval()
        images = generate(self.control_pipeline(sampler), prompts, seeds, steps, guidance,
                          prompt_embeds=self.conditioner.encode(prompts), negative_embeds=self.conditioner.null(),
                          control=controls, guess_mode=guess_mode)
        net.train(was)
        return images

    def validate(self, step: int) -> dict[str, float]:
        v = self.recipe.validation
        if not v.every or not self.accelerator.is_main_process:
            return {}
        from ..sampling import grid

        n = min(self.opts.validation_n, len(self.raw_rows))
        rows = [self.raw_rows[i] for i in range(n)]
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
        from ..evaluation.control import control_eval, control_image, control_kind

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
                                             self.opts.eval_n, e.seed, self.recipe.data.resolution)}

    def build_cache(self, out: Path | None) -> None:
        """The whole set-up (ControlNet, control columns, then the cache), where runs of the recipe
        find the cache (no ``out``)."""
        if out is not None:
            raise UserError(f"--out is not supported for the {self.name} trainer; leave it out (its run finds the cache).")
        self.setup()
