"""Latent text-to-image: a cross-attention UNet on the latents of a frozen autoencoder,
conditioned on a frozen text encoder. The base plugin that LoRA, DreamBooth and ControlNet
plugins build on.

A batch holds either cached latents + caption indices (``data.cache_latents``, the default) or
images + token ids (encoded on the fly); ``loss`` accepts both.
"""

from __future__ import annotations

import json
import os
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
from ..errors import UserError
from ..recipe.schema import TextEncoderSpec, UNetSpec
from .base import TrainerPlugin
from .randomness import BatchRNG
from .registry import register


@register
class TextToImageTrainer(TrainerPlugin):
    name = "text_to_image"
    stream = None  # this process's share of a streamed dataset (data.streaming)
    buckets = None  # aspect-ratio buckets (data.buckets.enabled)

    # -- models ------------------------------------------------------------------------
    def build_models(self) -> None:
        m = self.recipe.model
        if m.text_encoder is None or m.autoencoder is None:
            raise UserError("model.text_encoder and model.autoencoder are required for this trainer")
        device = self.accelerator.device
        self.text_encoder = load_text_encoder(m.text_encoder or TextEncoderSpec()).to(device)
        self.vae = load_autoencoder(m.autoencoder).to(device)
        self.unet = load_unet(m.unet or UNetSpec(preset="tiny"))
        cad = self.unet.config.cross_attention_dim
        if cad != self.text_encoder.hidden_size:
            raise UserError(
                f"model.unet cross_attention_dim is {cad} but the text encoder's hidden size is "
                f"{self.text_encoder.hidden_size}; set model.unet.overrides.cross_attention_dim={self.text_encoder.hidden_size}")
        if self.text_encoder.kind == "openclip":
            raise UserError("the text_to_image trainer exports a stock StableDiffusionPipeline, which cannot hold "
                              "an OpenCLIP text tower; use kind clip (SD 2.x's OpenCLIP weights load as CLIPTextModel "
                              "from the pipeline's text_encoder subfolder).")
        self.conditioner = Conditioner(self.text_encoder)
        n = self.recipe.noise
        self.noise_scheduler = make_noise_scheduler(n.num_train_timesteps, n.beta_schedule, n.beta_start, n.beta_end,
                                                    n.prediction_type, n.zero_terminal_snr)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        # Noise, timesteps, posterior samples and caption dropout: one stream for the global batch,
        # the same for any number of processes (see randomness.py); checkpointed by the loop.
        acc = self.accelerator
        self.rng = BatchRNG(self.recipe.seed + 7919, acc.device, acc.process_index, acc.num_processes)

    # -- data --------------------------------------------------------------------------
    def build_data(self, cache_out: Path | None = None) -> None:
        d = self.recipe.data
        rows = self.load_checked_rows()
        if self.stream is not None:
            return
        self.prepare_rows(rows, d.image_column, d.caption_column, cache_out=cache_out)

    def load_checked_rows(self):
        """The recipe's rows (this process's share when streaming), with unusable rows (corrupt or
        too small images, empty captions, duplicates) skipped and reported in RUN/data_report.json.
        A stream is checked lazily (``self.stream_skips`` counts) and its loader set up here."""
        from ..data.checks import check_rows
        from ..data.skip_report import summary
        from ..data.stream_checks import safe_rows

        d, acc = self.recipe.data, self.accelerator
        with acc.main_process_first():
            rows = load_rows(d, acc.process_index, acc.num_processes, seed=self.recipe.seed)
        self.stream = None
        if d.streaming:
            if d.buckets.enabled:
                raise UserError("aspect-ratio buckets need the image sizes up front, which a stream does not give; "
                                  "set data.buckets.enabled=false or data.streaming=false.")
            if d.check_rows:
                rows, self.stream_skips = safe_rows(rows, d.image_column, d.caption_column, d.min_image_size,
                                                    d.skip_empty_captions)
            self.stream = rows
            return rows
        if d.check_rows and d.source != "shapes":
            with acc.main_process_first():
                big = len(rows) > 20000  # datasets' map in several processes (cached on disk for the other ranks)
                rows, report = check_rows(rows, d.image_column, d.caption_column, d.min_image_size,
                                          d.skip_empty_captions, d.drop_duplicates,
                                          num_proc=min(8, os.cpu_count() or 1) if big else None)
            if acc.is_main_process:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "data_report.json").write_text(json.dumps(report, indent=1))
                acc.print(summary(report))
        return rows

    def prepare_rows(self, rows, image_column: str, caption_column: str, fingerprint: str | None = None,
                     cache_out: Path | None = None) -> None:
        """``rows`` -> ``self.cached`` (latents and caption embeddings, encoded once, split across
        processes) when ``data.cache_latents``, else ``self.rows`` with a transform that decodes and
        tokenizes. With ``data.buckets.enabled`` each row is cropped to its aspect-ratio bucket."""
        d = self.recipe.data
        self.rows, self.cached, self.bucket_of_row = rows, None, None
        self.buckets = self.bucket_list() if d.buckets.enabled else None
        dropped: dict[str, list] = {}
        if d.cache_latents:
            from ..data.buckets import assign

            bucket_of = (lambda hw: (lambda i: None if i is None else self.buckets[i])(
                assign(hw, self.buckets, d.buckets.max_upscale))) if self.buckets else None
            self.cached = latent_cache.build_or_load(
                rows, self.vae, self.conditioner, d, image_column, caption_column, self.accelerator,
                fingerprint=fingerprint, buckets=self.buckets, bucket_of=bucket_of, log=self.accelerator.print,
                out=cache_out)
            self.embeddings = self.cached.embeddings.to(self.accelerator.device)
            if self.buckets:
                index = {tuple(b): i for i, b in enumerate(self.buckets)}
                f = self.vae_factor
                self.bucket_of_row = [index[(s[1] * f, s[2] * f)] for s in self.cached.shapes]
                small = self.cached.manifest.get("too_small_rows", [])
                n_small = self.cached.manifest.get("skipped_reasons", {}).get("too small for its bucket", len(small))
                dropped = {"too small for its bucket": [f"row {x['row']} ({x['size'][0]}x{x['size'][1]})" for x in small]}
                dropped["too small for its bucket"] += [""] * (n_small - len(small))  # counted beyond the listed ones
        else:
            self.rows = self.raw_rows(rows, image_column, caption_column)
        if self.buckets:
            self.write_bucket_report(dropped)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def bucket_list(self) -> list[tuple[int, int]]:
        """The recipe's aspect-ratio buckets (pixels): sides a multiple of one latent cell of the
        UNet's deepest level unless ``data.buckets.step`` says otherwise."""
        from ..data.buckets import make_buckets, parse_buckets

        b, d = self.recipe.data.buckets, self.recipe.data
        step = b.step or self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if step % self.vae_factor:
            raise UserError(f"data.buckets.step is {step}, which is not a multiple of the autoencoder's downsampling "
                              f"factor {self.vae_factor}; choose a multiple of it.")
        if b.sizes:
            try:
                return parse_buckets(b.sizes, step)
            except ValueError as e:
                raise UserError(f"data.buckets.sizes: {e}") from None
        budget = b.pixel_budget or d.resolution ** 2
        if budget < step * step:
            raise UserError(f"data.buckets.pixel_budget {budget} is smaller than one {step}x{step} bucket; raise it.")
        return make_buckets(budget, step, b.max_aspect)

    def raw_rows(self, rows, image_column: str, caption_column: str):
        """On-the-fly rows: decoded, cropped (centre/random, or to the row's bucket), flipped, and
        every caption variant tokenized (one is picked per step, as in the cached path)."""
        from ..data.captions import caption_variants
        from ..data.checks import to_rgb

        d = self.recipe.data
        te = self.text_encoder
        caps = d.captions
        vmax = max((len(caption_variants(c, caps)) for c in rows.with_format(None)[caption_column]), default=1) \
            if (caps.shuffle_tags and caps.variants > 1) or _has_lists(rows, caption_column) else 1

        def tokens(captions) -> dict:
            if vmax == 1:
                return {"input_ids": list(te.tokenize([caption_variants(c, caps)[0] for c in captions]))}
            out, counts = [], []
            for c in captions:
                v = caption_variants(c, caps)
                ids = te.tokenize(v + [v[0]] * (vmax - len(v)))
                out.append(ids)
                counts.append(torch.tensor(len(v)))
            return {"variant_ids": out, "variant_count": counts}

        if not self.buckets:
            tf = image_transform(d.resolution, d.center_crop, d.random_flip)

            def transform(b):
                return {"pixel_values": [tf(to_rgb(im)) for im in b[image_column]], **tokens(b[caption_column])}

            rows.set_transform(transform)
            return rows
        from ..data.bucket_transforms import bucket_transform
        from ..data.buckets import assign
        from ..data.sizes import image_sizes

        with self.accelerator.main_process_first():  # the other ranks read datasets' cached result
            sizes = image_sizes(rows.with_format(None), image_column,
                                num_proc=min(8, os.cpu_count() or 1) if len(rows) > 20000 else None)
        self.bucket_of_row = [assign(hw, self.buckets, d.buckets.max_upscale) if hw else None for hw in sizes]
        tfs = [bucket_transform(b, d.random_flip, d.center_crop) for b in self.buckets]
        self._dropped_raw = [i for i, b in enumerate(self.bucket_of_row) if b is None]
        return _BucketRows(rows, self.bucket_of_row, tfs, image_column, caption_column, tokens)

    def end_of_training(self) -> None:
        """Called on every process after the last step: a stream's skipped rows, per process."""
        counter = getattr(self, "stream_skips", None)
        if counter is None:
            return
        from ..data.skip_report import summary

        report = counter.report()
        rank = self.accelerator.process_index
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / f"data_report-rank{rank}.json").write_text(json.dumps(report, indent=1))
        print(f"[process {rank}] {summary(report)}", flush=True)

    def stream_collate(self):
        """Collate streamed rows (decoded PIL images + captions) into an on-the-fly batch."""
        from ..data.captions import caption_variants
        from ..data.checks import to_rgb

        d = self.recipe.data
        tf = image_transform(d.resolution, d.center_crop, d.random_flip)
        te = self.text_encoder

        def collate(rows: list[dict]) -> dict:
            caps = [caption_variants(r[d.caption_column], d.captions) for r in rows]
            vmax = max(len(v) for v in caps)
            out = {"pixel_values": torch.stack([tf(to_rgb(r[d.image_column])) for r in rows])}
            if vmax == 1:
                out["input_ids"] = te.tokenize([v[0] for v in caps])
            else:
                out["variant_ids"] = torch.stack([te.tokenize(v + [v[0]] * (vmax - len(v))) for v in caps])
                out["variant_count"] = torch.tensor([len(v) for v in caps])
            return out

        return collate

    def write_bucket_report(self, dropped: dict) -> None:
        from ..data.bucket_report import bucket_report, format_report

        if not self.accelerator.is_main_process:
            return
        if self.cached is None:
            dropped = {"too small for its bucket": [f"row {i}" for i in getattr(self, "_dropped_raw", [])]}
        # batches are cut per process (accelerate deals them out: batch k to process k mod W)
        report = bucket_report([b if b is not None else -1 for b in self.bucket_of_row], self.buckets,
                               self.recipe.train.batch_size, dropped={k: v for k, v in dropped.items() if v})
        report["processes"] = self.accelerator.num_processes
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "buckets.json").write_text(json.dumps(report, indent=1))
        self.accelerator.print(format_report(report))

    def setup(self) -> None:
        self.build_models()
        self.check_single_file(self.unet, self.vae, self.text_encoder.model)
        self.build_data()

    def trainable_modules(self):
        return {"unet": self.unet}

    def train_dataloader(self):
        d = self.recipe.data
        workers = dict(collate_fn=default_collate, num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
        if self.stream is not None:  # already this process's share: the loop does not shard it again
            # (no persistent workers: each epoch's iterator passes the epoch and a seed to fresh workers)
            return DataLoader(self.stream, batch_size=self.recipe.train.batch_size, drop_last=True,
                              collate_fn=self.stream_collate(), num_workers=d.num_workers)
        ds = self.cached if self.cached is not None else self.rows
        if self.buckets:
            from ..data.bucket_sampler import BucketBatchSampler

            sampler = BucketBatchSampler(self.bucket_of_row, self.recipe.train.batch_size, seed=self.recipe.seed)
            return DataLoader(ds, batch_sampler=sampler, **workers)
        return DataLoader(ds, batch_size=self.recipe.train.batch_size, shuffle=True, drop_last=True, **workers)

    # -- loss --------------------------------------------------------------------------
    def latents_and_condition(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents (B, C, h, w) and token states (B, L, D) of a cached or raw batch."""
        z = self.posterior_sample(batch)
        if "mean" in batch:
            cond = self.embeddings[self.caption_choice(batch).to(self.embeddings.device)]
        else:
            with torch.no_grad(), self.prof.phase("text_encoder"):
                cond = self.conditioner.encode_ids(self.token_choice(batch))
        cond = self.conditioner.drop(cond, self.recipe.data.caption_dropout, rng=self.rng)
        return z, cond

    def caption_choice(self, batch) -> torch.Tensor:
        """Index (into the cache's captions) of the caption variant each cached row uses this step."""
        v = batch["variants"]
        if v.shape[1] == 1:
            return v[:, 0]
        k = (self.rng.rand(v.shape[0]).cpu() * batch["variant_count"].cpu()).long()
        return v.cpu()[torch.arange(v.shape[0]), k]

    def token_choice(self, batch) -> torch.Tensor:
        """Token ids (B, L) of the caption variant each on-the-fly row uses this step."""
        if "variant_ids" not in batch:
            return batch["input_ids"]
        v = batch["variant_ids"]
        k = (self.rng.rand(v.shape[0]).cpu() * batch["variant_count"].cpu()).long()
        return v[torch.arange(v.shape[0]), k.to(v.device)]

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

    def diffusion_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noisy latents, timesteps, target and per-sample weights for one batch of latents."""
        n = self.recipe.noise
        self.latent_shape = tuple(z.shape)
        noise, noise_in = sample_noise(z, None, n.noise_offset, n.input_perturbation, rng=self.rng)
        t = sample_timesteps(z.shape[0], self.noise_scheduler.config.num_train_timesteps, z.device, rng=self.rng)
        noisy = self.noise_scheduler.add_noise(z, noise_in, t)
        target = target_for(self.noise_scheduler, z, noise, t)
        weights = min_snr_weights(self.noise_scheduler, t, n.min_snr_gamma) if n.min_snr_gamma else None
        return noisy, t, target, weights

    def loss(self, batch):
        z, cond = self.latents_and_condition(batch)
        noisy, t, target, weights = self.diffusion_terms(z)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        return diffusion_loss(pred, target, weights), {}

    def train_flops_per_sample(self) -> float | None:
        from ..perf import unet_train_flops

        shape = getattr(self, "latent_shape", None)
        if shape is None:
            return None
        te = self.text_encoder
        unet = self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)
        flops = unet_train_flops(unet, shape, (shape[0], te.max_length, te.hidden_size), self.accelerator.device,
                                 next(unet.parameters()).dtype)
        return flops / shape[0]

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
        self.write_single_file(pipe, out_dir / "pipeline")

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


class _BucketRows(Dataset):
    """On-the-fly rows cropped to their aspect-ratio bucket (rows without one are never sampled)."""

    def __init__(self, rows, bucket_of_row, transforms, image_column, caption_column, tokens):
        self.rows, self.bucket_of_row, self.tfs = rows, bucket_of_row, transforms
        self.icol, self.ccol, self.tokens = image_column, caption_column, tokens

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from ..data.checks import to_rgb

        row = self.rows[i]
        tok = {k: v[0] for k, v in self.tokens([row[self.ccol]]).items()}
        return {"pixel_values": self.tfs[self.bucket_of_row[i]](to_rgb(row[self.icol])), **tok}


def _has_lists(rows, column: str) -> bool:
    import datasets

    f = rows.features.get(column)
    return isinstance(f, (datasets.Sequence, list)) or type(f).__name__ == "List"


def evaluate_shapes(trainer, out: Path, e) -> dict:
    """Sample fixed-seed prompts from the shapes world (seen and held-out colour-shape pairs),
    read attributes back with the analytic evaluator and return adherence per attribute."""
    from ..data import shapes
    from ..evaluation.run import shapes_eval

    world = shapes.load_world(_shapes_root(trainer.recipe))
    result = shapes_eval(trainer.sample, world, out, e.n, e.heldout_n, e.seed, e.sampler, e.steps, e.guidance_scale)
    return {"shapes_eval": result}


def _shapes_root(recipe) -> Path:
    from ..data.shapes_source import materialize_shapes

    d = recipe.data
    if d.source == "shapes":
        return materialize_shapes(d)
    return Path(d.path) if d.path else Path(".")
