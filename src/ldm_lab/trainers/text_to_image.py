"""Latent text-to-image: a cross-attention UNet on the latents of a frozen autoencoder,
conditioned on a frozen text encoder. The base plugin that LoRA, DreamBooth and ControlNet
plugins build on.

A batch holds either cached latents + caption indices (``data.cache_latents``, the default) or
images + token ids (encoded on the fly); ``loss`` accepts both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..components import load_autoencoder, load_text_encoder, load_unet
from ..conditioning import Conditioner
from ..data import cache as latent_cache
from ..data.sources import load_rows
from ..data.transforms import image_transform
from ..diffusion import (
    diffusion_loss,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    target_for,
)
from ..recipe import RecipeError
from ..recipe.schema import TextEncoderSpec, UNetSpec
from .base import TrainerPlugin
from .registry import register


class CachedRows(Dataset):
    def __init__(self, cache: latent_cache.LatentCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        c = self.cache
        return {"mean": c.mean[i], "std": c.std[i], "caption_index": c.caption_index[i]}


@register
class TextToImageTrainer(TrainerPlugin):
    name = "text_to_image"

    # -- models ------------------------------------------------------------------------
    def build_models(self) -> None:
        m = self.recipe.model
        if m.text_encoder is None or m.autoencoder is None:
            raise RecipeError("model.text_encoder and model.autoencoder are required for this trainer")
        device = self.accelerator.device
        self.text_encoder = load_text_encoder(m.text_encoder or TextEncoderSpec()).to(device)
        self.vae = load_autoencoder(m.autoencoder).to(device)
        self.unet = load_unet(m.unet or UNetSpec(preset="tiny"))
        cad = self.unet.config.cross_attention_dim
        if cad != self.text_encoder.hidden_size:
            raise RecipeError(
                f"model.unet cross_attention_dim is {cad} but the text encoder's hidden size is "
                f"{self.text_encoder.hidden_size}; set model.unet.overrides.cross_attention_dim={self.text_encoder.hidden_size}")
        if self.text_encoder.kind == "openclip":
            raise RecipeError("the text_to_image trainer exports a stock StableDiffusionPipeline, which cannot hold "
                              "an OpenCLIP text tower; use kind clip (SD 2.x's OpenCLIP weights load as CLIPTextModel "
                              "from the pipeline's text_encoder subfolder).")
        self.conditioner = Conditioner(self.text_encoder)
        n = self.recipe.noise
        self.noise_scheduler = make_noise_scheduler(n.num_train_timesteps, n.beta_schedule, n.beta_start, n.beta_end,
                                                    n.prediction_type, n.zero_terminal_snr)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        # Noise, timesteps and caption dropout draw from the global RNG, which the loop seeds per
        # process and accelerate's save_state/load_state restores per process.
        self.generator = None

    # -- data --------------------------------------------------------------------------
    def build_data(self) -> None:
        d = self.recipe.data
        with self.accelerator.main_process_first():
            rows = load_rows(d)
        self.prepare_rows(rows, d.image_column, d.caption_column)

    def prepare_rows(self, rows, image_column: str, caption_column: str, fingerprint: str | None = None) -> None:
        """``rows`` -> ``self.cached`` (latents and caption embeddings, encoded once) when
        ``data.cache_latents``, else ``self.rows`` with a transform that decodes and tokenizes."""
        d = self.recipe.data
        self.rows = rows
        self.cached = None
        if d.cache_latents:
            cache_dir = Path(d.cache_dir) if d.cache_dir else Path("data/cache")
            with self.accelerator.main_process_first():
                self.cached = latent_cache.build_or_load(
                    rows, self.vae, self.conditioner, d.resolution, image_column, caption_column, cache_dir,
                    log=self.accelerator.print, fingerprint=fingerprint)
            self.embeddings = self.cached.embeddings.to(self.accelerator.device)
        else:
            tf = image_transform(d.resolution, d.center_crop, d.random_flip)
            te = self.text_encoder

            def transform(b):
                ids = te.tokenize([c or "" for c in b[caption_column]])
                return {"pixel_values": [tf(im.convert("RGB")) for im in b[image_column]], "input_ids": list(ids)}

            self.rows.set_transform(transform)

    def setup(self) -> None:
        self.build_models()
        self.build_data()

    def trainable_modules(self):
        return {"unet": self.unet}

    def train_dataloader(self):
        ds = CachedRows(self.cached) if self.cached is not None else self.rows

        d = self.recipe.data
        return DataLoader(ds, batch_size=self.recipe.train.batch_size, shuffle=True, drop_last=True,
                          collate_fn=default_collate, num_workers=d.num_workers, persistent_workers=d.num_workers > 0)

    # -- loss --------------------------------------------------------------------------
    def latents_and_condition(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents (B, C, h, w) and token states (B, L, D) of a cached or raw batch."""
        if "mean" in batch:
            eps = torch.randn_like(batch["mean"])
            z = batch["mean"] + batch["std"] * eps
            cond = self.embeddings[batch["caption_index"]]
        else:
            with torch.no_grad():
                z = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist.sample(self.generator)
                cond = self.conditioner.encode_ids(batch["input_ids"])
        z = (z.float() - self.shift_factor) * self.scaling_factor
        cond = self.conditioner.drop(cond, self.recipe.data.caption_dropout, self.generator)
        return z, cond

    def diffusion_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noisy latents, timesteps, target and per-sample weights for one batch of latents."""
        n = self.recipe.noise
        noise, noise_in = sample_noise(z, self.generator, n.noise_offset, n.input_perturbation)
        t = sample_timesteps(z.shape[0], self.noise_scheduler.config.num_train_timesteps, z.device, self.generator)
        noisy = self.noise_scheduler.add_noise(z, noise_in, t)
        target = target_for(self.noise_scheduler, z, noise, t)
        weights = min_snr_weights(self.noise_scheduler, t, n.min_snr_gamma) if n.min_snr_gamma else None
        return noisy, t, target, weights

    def loss(self, batch):
        z, cond = self.latents_and_condition(batch)
        noisy, t, target, weights = self.diffusion_terms(z)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        return diffusion_loss(pred, target, weights), {}

    # -- sampling, artifact, evaluation ------------------------------------------------
    def pipeline(self, sampler: str):
        from ..sampling import build_pipeline

        te = self.text_encoder
        te.tokenizer.model_max_length = te.max_length  # the stock pipeline pads to this length
        return build_pipeline(self.vae, te.model, te.tokenizer, self.unwrap(self.unet), self.noise_scheduler, sampler)

    def sample(self, prompts: list[str], seeds: list[int], sampler: str, steps: int, guidance: float):
        from ..sampling import generate

        unet = self.unwrap(self.unet)
        was_training = unet.training
        unet.eval()
        pipe = self.pipeline(sampler)
        embeds = self.conditioner.encode(prompts)
        images = generate(pipe, prompts, seeds, steps, guidance, prompt_embeds=embeds,
                          negative_embeds=self.conditioner.null())
        unet.train(was_training)
        return images

    def validate(self, step: int) -> dict[str, float]:
        v = self.recipe.validation
        if not v.prompts or not self.accelerator.is_main_process:
            return {}
        from ..sampling import grid

        prompts = [p for p in v.prompts for _ in range(v.images_per_prompt)]
        seeds = [v.seed + i for i in range(len(prompts))]
        images = self.sample(prompts, seeds, v.sampler, v.steps, v.guidance_scale)
        out = self.run_dir / "samples"
        (out / f"step-{step:06d}").mkdir(parents=True, exist_ok=True)
        grid(images, prompts, cols=min(8, len(prompts))).save(out / f"step-{step:06d}.png")
        for i, im in enumerate(images):
            im.save(out / f"step-{step:06d}" / f"{i:02d}.png")
        (out / f"step-{step:06d}" / "samples.jsonl").write_text("".join(
            json.dumps({"file_name": f"{i:02d}.png", "prompt": p, "seed": sd}) + "\n"
            for i, (p, sd) in enumerate(zip(prompts, seeds))))
        return {}

    def save(self, out_dir: Path) -> None:
        pipe = self.pipeline("dpm++")
        pipe.save_pretrained(out_dir / "pipeline")
        self.export(out_dir / "pipeline")

    def evaluate(self) -> dict:
        e = self.recipe.eval
        if not e.shapes or not self.accelerator.is_main_process:
            return {}
        return evaluate_shapes(self, self.run_dir / "eval", e)


def evaluate_shapes(trainer, out: Path, e) -> dict:
    """Sample fixed-seed prompts from the shapes world (seen and held-out colour-shape pairs),
    read attributes back with the analytic evaluator and return adherence per attribute."""
    from ..data import shapes
    from ..evaluation.run import shapes_eval

    world = shapes.load_world(_shapes_root(trainer.recipe))
    result = shapes_eval(trainer.sample, world, out, e.n, e.heldout_n, e.seed, e.sampler, e.steps, e.guidance_scale)
    return {"shapes_eval": result}


def _shapes_root(recipe) -> Path:
    from ..data.sources import materialize_shapes

    d = recipe.data
    if d.source == "shapes":
        return materialize_shapes(d)
    return Path(d.path) if d.path else Path(".")
