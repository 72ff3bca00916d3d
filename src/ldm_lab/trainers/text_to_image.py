"""Latent text-to-image: a denoiser on the latents of a frozen autoencoder, conditioned on frozen
text encoders, trained by an objective. The base plugin that LoRA, DreamBooth and ControlNet build
on, and the owner of THE diffusion loss path (``loss``) they change only through its hooks.

Its data side (rows, cache, buckets, batches) is ``text_image_data.TextImageData``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..components import latent_factor, load_autoencoder, load_text_encoder
from ..components.backbones import load_backbone
from ..components.denoiser import Residuals, denoiser_for
from ..components.record import Conditioning
from ..conditioning import Conditioner
from ..data import shapes
from ..data.masks import to_latent_grid
from ..data.shapes_source import materialize_shapes
from ..diffusion import Draw, make_objective
from ..errors import UserError
from ..evaluation.run import shapes_eval
from ..perf import denoiser_train_flops
from ..sampling import build_family_pipeline, generate, grid
from .base import eval_mode
from .quality import adherence_logs
from .randomness import BatchRNG
from .registry import register
from .text_image_data import TextImageData


@register
class TextToImageTrainer(TextImageData):
    name = "text_to_image"
    families = ("unet", "pixart", "sd3")  # the denoiser families this trainer (and its artifact) handles

    # -- models ------------------------------------------------------------------------
    def build_models(self) -> None:
        m = self.recipe.model
        specs = m.encoder_specs()
        if not specs or m.autoencoder is None:
            raise UserError("model.text_encoder (or model.text_encoders) and model.autoencoder are required for "
                            "this trainer")
        device = self.accelerator.device
        spec = m.denoiser_spec()
        if spec.family not in self.families:
            raise UserError(f"the {self.name} trainer runs on the {' / '.join(self.families)} denoiser family so far, "
                            f"not {spec.family}; train {spec.family} with trainer: text_to_image.")
        # built in this order (text encoders, autoencoder, backbone): a random init draws from the seed
        # whether the encoders run with their attention masks: as the family's stock pipeline does
        use_mask = {"sd3": False, "pixart": True}.get(spec.family)
        self.text_encoders = [load_text_encoder(s, use_mask=use_mask).to(device) for s in specs]
        self.text_encoder = self.text_encoders[0]
        self.vae = load_autoencoder(m.autoencoder).to(device)
        self.unet = load_backbone(spec)  # the backbone being trained, of any family (the name is historical)
        self.denoiser = denoiser_for(self.unet)
        self.denoiser.latent_factor = latent_factor(self.vae)
        check_backbone(spec.family, self.unet, self.text_encoders)
        self.conditioner = Conditioner(self.text_encoders, self.denoiser.combine, [s.dropout for s in specs])
        try:
            self.objective = make_objective(self.recipe.noise, self.denoiser.patch_size, self.denoiser.learned_variance)
        except ValueError as e:
            raise UserError(f"noise.objective {self.recipe.noise.objective}: {e}.") from None
        self.artifact_sampler = self.objective.artifact_sampler
        if self.objective.name == "flow":
            ok = self.denoiser.flow_samplers
            if self.artifact_sampler not in ok:
                self.artifact_sampler = ok[0]
            for key, sampler in (("validation.sampler", self.recipe.validation.sampler),
                                 ("eval.sampler", self.recipe.eval.sampler)):
                if sampler not in ok:
                    raise UserError(f"{key} is {sampler}, which the {spec.family} pipeline cannot run for a "
                                    f"flow-matching model; choose {' or '.join(ok)}.")
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        # Noise, timesteps, posterior samples and caption dropout: one stream for the global batch,
        # the same for any number of processes (see randomness.py); checkpointed by the loop.
        acc = self.accelerator
        self.rng = BatchRNG(self.recipe.seed + 7919, acc.device, acc.process_index, acc.num_processes)

    def setup(self) -> None:
        self.build_models()
        self.check_single_file(self.unet, self.vae, self.text_encoder.model)
        self.build_data()

    def trainable_modules(self):
        return {"unet": self.unet}

    def frozen_modules(self):
        return [self.vae, *self.text_encoders, self.unet]  # the UNet where a plugin trains beside it

    # -- loss --------------------------------------------------------------------------
    def latents_and_condition(self, batch) -> tuple[torch.Tensor, Conditioning]:
        """Scaled latents (B, C, h, w) and the conditioning record of a cached or raw batch, with
        caption dropout applied."""
        z = self.posterior_sample(batch)
        if "mean" in batch:
            index = self.caption_choice(batch)
            # only this batch's caption rows, read from the cache's files (data/embedding_store.py)
            parts = [e[index].to(self.accelerator.device) for e in self.cached.encodings]
        else:
            with torch.no_grad(), self.prof.phase("text_encoder"):
                parts = self.conditioner.encode_ids_parts(self.token_choices(batch))
        parts = self.conditioner.drop_parts(parts, self.recipe.data.caption_dropout, rng=self.rng)
        return z, self.conditioner.combine(parts)

    def posterior_sample(self, batch) -> torch.Tensor:
        """Scaled latents (B, C, h, w): a draw from the autoencoder's posterior, cached (mean, std)
        or encoded now."""
        if "mean" in batch:
            mean, std = batch["mean"], batch["std"]
        else:
            with torch.no_grad(), self.prof.phase("autoencoder"):
                dist = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        z = mean.float() + std.float() * self.rng.randn(tuple(mean.shape)).to(mean.device)
        return (z - self.shift_factor) * self.scaling_factor

    # The one loss path of every diffusion plugin: latents -> objective draw -> denoiser -> loss.
    # Plugins change it only through the three hooks below (ControlNet: ``condition`` and
    # ``residuals``; DreamBooth: ``reduce``); none of them calls a backbone or a scheduler itself.
    def loss(self, batch):
        z, cond = self.latents_and_condition(batch)
        cond = self.condition(batch, cond)
        self.latent_shape = tuple(z.shape)
        draw = self.objective.draw(z, self.rng)
        if (m := self.recipe.data.masked_loss) is not None:
            draw = replace(draw, mask=loss_mask(batch, z.shape[-2:], m.unmasked_weight), mask_normalize=m.normalize)
        pred = self.denoiser(self.unet, draw.x_t, draw.t, cond, self.residuals(batch, draw, cond))
        return self.reduce(self.objective.loss(pred, draw), batch)

    def condition(self, batch, cond: Conditioning) -> Conditioning:
        """Hook: the record the denoiser sees (after caption dropout)."""
        return cond

    def residuals(self, batch, draw: Draw, cond: Conditioning) -> Residuals | None:
        """Hook: extra inputs a side network adds to the backbone."""
        return None

    def reduce(self, per_sample: torch.Tensor, batch) -> tuple[torch.Tensor, dict]:
        """Hook: the batch loss (and extra logs) from the per-sample losses (B,)."""
        return per_sample.mean(), {}

    def train_flops_per_sample(self) -> float | None:
        shape = getattr(self, "latent_shape", None)
        if shape is None:
            return None
        null = self.conditioner.null()
        net = self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)
        dtype = next(net.parameters()).dtype
        pooled = None if null.pooled is None else null.pooled.to(self.accelerator.device, dtype)

        def forward(x, t, c):
            return self.denoiser(net, x, t, Conditioning(c, None, None if pooled is None else pooled.expand(len(c), -1)))

        with self.accelerator.autocast():  # frozen weights may be in the compute dtype (frozen.py)
            flops = denoiser_train_flops(net, forward, shape, (shape[0], *null.states.shape[1:]),
                                         self.accelerator.device, dtype)
        return flops / shape[0]

    # -- sampling, artifact, evaluation ------------------------------------------------
    def pipeline(self, sampler: str):
        """The family's stock pipeline around the modules in memory."""
        return build_family_pipeline(self.denoiser.family, self.vae, self.text_encoders, self.unwrap(self.unet),
                                     self.objective.scheduler, sampler)

    def guidance_rescale(self, spec) -> float:
        """The CFG rescale a validation / eval spec samples with (see ``SamplingSpec``); a non-zero
        one on a family whose pipeline has none is one sentence."""
        noise = self.recipe.noise
        unet = self.denoiser.family == "unet"
        if spec.guidance_rescale is None:
            return 0.7 if unet and noise.objective == "ddpm" and noise.zero_terminal_snr else 0.0
        if spec.guidance_rescale and not unet:
            raise UserError(f"guidance_rescale is StableDiffusionPipeline's; the {self.denoiser.family} pipeline has "
                            "none, so set it to 0 (or leave it out).")
        return float(spec.guidance_rescale)

    def sample(self, prompts: list[str], seeds: list[int], sampler: str, steps: int, guidance: float,
               rescale: float = 0.0):
        """Images from the stock pipeline around the modules in memory, conditioned through the
        conditioner (the null condition as the negative); ``rescale``: the CFG rescale (UNet only)."""
        with eval_mode(self.unwrap(self.unet)):
            pipe = self.pipeline(sampler)
            cond, null = self.conditioner.encode(prompts), self.conditioner.null()
            fam = self.denoiser.family
            extra = {"guidance_rescale": rescale} if rescale else {}
            return generate(pipe, prompts, seeds, steps, guidance, prompt_embeds=cond.states, negative_embeds=null.states,
                            pooled=cond.pooled if fam == "sd3" else None, negative_pooled=null.pooled,
                            mask=cond.mask if fam == "pixart" else None, negative_mask=null.mask, **extra)

    def validate(self, step: int) -> dict[str, float]:
        v = self.recipe.validation
        if not v.prompts or not self.accelerator.is_main_process:
            return {}
        prompts = [p for p in v.prompts for _ in range(v.images_per_prompt)]
        seeds = [v.seed + i for i in range(len(prompts))]
        images = self.sample(prompts, seeds, v.sampler, v.steps, v.guidance_scale, self.guidance_rescale(v))
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
        pipe = self.pipeline(self.artifact_sampler)
        pipe.save_pretrained(out_dir / "pipeline")
        self.export(out_dir / "pipeline")
        if self.denoiser.family == "unet":
            self.write_single_file(pipe, out_dir / "pipeline")

    def evaluate_during(self, step: int) -> dict[str, float]:
        """The held-out validation loss (``data.val_n``) and shapes adherence on the fixed
        ``eval.every_n`` / ``every_heldout_n`` prompts (samples and scores in RUN/eval-steps/step-NNNNNN)."""
        e = self.recipe.eval
        if not self.accelerator.is_main_process:
            return {}
        logs = self.validation_loss()
        if e.features and self.val_rows:
            logs.update(self.image_metrics())
        if e.shapes:
            world = shapes.load_world(_shapes_root(self.recipe))
            sample = functools.partial(self.sample, rescale=self.guidance_rescale(e))
            result = shapes_eval(sample, world, self.run_dir / "eval-steps" / f"step-{step:06d}", e.every_n,
                                 e.every_heldout_n, e.seed, e.sampler, e.steps, e.guidance_scale)
            logs.update(adherence_logs(result))
        return logs

    def image_metrics(self) -> dict[str, float]:
        """FID, KID, CMMD and CLIP score of samples for the held-out rows' captions (fixed seeds)
        against their images, in the space of the ``eval.features`` CLIP model."""
        from ..evaluation.image_metrics import image_metrics, load_clip  # torchmetrics: only when asked for

        e = self.recipe.eval
        if getattr(self, "feature_model", None) is None:
            self.feature_model = load_clip(e.features)
        real, captions = self.heldout_examples()
        seeds = [e.seed + i for i in range(len(captions))]
        fake = self.sample(captions, seeds, e.sampler, e.steps, e.guidance_scale, self.guidance_rescale(e))
        return {f"image/{k}": v for k, v in image_metrics(fake, real, captions, *self.feature_model).items()}

    def evaluate(self) -> dict:
        e = self.recipe.eval
        if not e.shapes or not self.accelerator.is_main_process:
            return {}
        return evaluate_shapes(self, self.run_dir / "eval", e)

    def build_cache(self, out: Path | None) -> None:
        """The models and the data, nothing else: the latent cache is built on the way (in ``out``
        when given, else where runs of the recipe look it up)."""
        self.build_models()
        self.build_data(cache_out=out)


def check_backbone(family: str, net, encoders) -> None:
    """One sentence for a backbone that cannot read what the text encoders give."""
    if family == "unet":
        cad = net.config.cross_attention_dim
        if len(encoders) == 1 and cad != encoders[0].hidden_size:
            raise UserError(
                f"model.unet cross_attention_dim is {cad} but the text encoder's hidden size is "
                f"{encoders[0].hidden_size}; set model.unet.overrides.cross_attention_dim={encoders[0].hidden_size}")
        if encoders[0].kind == "openclip":
            raise UserError("the text_to_image trainer exports a stock StableDiffusionPipeline, which cannot hold "
                            "an OpenCLIP text tower; use kind clip (SD 2.x's OpenCLIP weights load as CLIPTextModel "
                            "from the pipeline's text_encoder subfolder).")
    if family == "pixart":
        if len(encoders) != 1:
            raise UserError("the pixart backbone reads one text encoder (T5 as published, or a CLIP); give "
                            "model.text_encoder.")
        if net.config.caption_channels != encoders[0].hidden_size:
            raise UserError(f"model.denoiser caption_channels is {net.config.caption_channels} but the text encoder's "
                            f"hidden size is {encoders[0].hidden_size}; set model.denoiser.overrides.caption_channels="
                            f"{encoders[0].hidden_size}")
    if family == "sd3":
        clips = encoders[:2]
        if len(encoders) not in (2, 3) or any(te.kind != "clip" or te.hidden_layer != -2 or
                                              not hasattr(te.model, "text_projection") for te in clips) \
                or (len(encoders) == 3 and encoders[2].kind != "t5"):
            raise UserError("the sd3 backbone reads what StableDiffusion3Pipeline encodes: model.text_encoders "
                            "lists two CLIPs with projection: true and hidden_layer: -2, then optionally a t5.")
        width = sum(te.hidden_size for te in clips)
        cfg = net.config
        t5 = encoders[2].hidden_size if len(encoders) == 3 else cfg.joint_attention_dim
        pooled = sum(int(te.model.config.projection_dim) for te in clips)
        if width > cfg.joint_attention_dim or t5 != cfg.joint_attention_dim or pooled != cfg.pooled_projection_dim:
            raise UserError(f"the sd3 backbone has joint_attention_dim {cfg.joint_attention_dim} and "
                            f"pooled_projection_dim {cfg.pooled_projection_dim}, but its text encoders give states "
                            f"{width} wide (T5: {t5}) and a pooled vector of {pooled}; set "
                            f"model.denoiser.overrides to match.")


def evaluate_shapes(trainer, out: Path, e) -> dict:
    """Sample fixed-seed prompts from the shapes world (seen and held-out colour-shape pairs),
    read attributes back with the analytic evaluator and return adherence per attribute."""
    world = shapes.load_world(_shapes_root(trainer.recipe))
    sample = functools.partial(trainer.sample, rescale=trainer.guidance_rescale(e))
    result = shapes_eval(sample, world, out, e.n, e.heldout_n, e.seed, e.sampler, e.steps, e.guidance_scale)
    return {"shapes_eval": result}


def _shapes_root(recipe) -> Path:
    d = recipe.data
    if d.source == "shapes":
        return materialize_shapes(d)
    return Path(d.path) if d.path else Path(".")


def loss_mask(batch, latent_hw, unmasked_weight: float) -> torch.Tensor:
    """The masked loss's weights on the latent grid (B, 1, h, w): the batch's mask (cached: already
    on the latent grid; raw: per pixel, area-averaged down), 1 inside, ``unmasked_weight`` outside."""
    if "loss_mask" not in batch:
        raise UserError("data.masked_loss is set but this trainer's batches carry no mask; the text_to_image and "
                        "lora trainers read masks, remove data.masked_loss for this one.")
    m = batch["loss_mask"].float()
    if tuple(m.shape[-2:]) != tuple(latent_hw):
        m = to_latent_grid(m, latent_hw)
    return unmasked_weight + (1 - unmasked_weight) * m
