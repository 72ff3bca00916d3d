"""Stage one: a KL-regularised autoencoder (diffusers AutoencoderKL), as in LDM's first stage.

Loss = L1 + ``mse_weight`` * MSE reconstruction + ``kl_weight`` * KL(q(z|x) || N(0, I)) per pixel element. Random
crops (``plugin.crop``) are cheaper, but an autoencoder with a mid-block attention and
GroupNorm trained on crops reconstructs whole images poorly (measured here: shapes moved and
smeared at 64 px after 32 px crops), so the shapes recipe trains on whole images. The saved config carries ``scaling_factor`` = 1 / std of the latents, measured on
training images, so the latents a UNet sees have about unit variance.

Plugin options (``plugin:`` in the recipe): ``kl_weight`` (default 1e-6), ``crop`` (pixels,
default: the full resolution), ``scale_batches`` (batches used to measure the scaling factor),
``init_logvar`` (initial posterior log-variance of a new autoencoder, default -6: with the
default init the posterior std starts near 1, the latents are mostly noise, and with a tiny KL
weight the decoder first learns to ignore them; measured here as reconstructions unrelated to
their inputs after 250 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..components import load_autoencoder
from ..data.checks import to_rgb
from ..data.loader import make_loader
from ..data.sources import load_rows
from ..data.transforms import image_transform, to_pil
from ..errors import UserError
from ..evaluation.autoencoder import reconstruction_adherence
from ..recipe.plugins import AutoencoderOptions
from .base import TrainerPlugin
from .registry import register


class Reconstruct(torch.nn.Module):
    """encode -> sample -> decode in one ``forward``, so DDP/FSDP hooks and accelerate's
    autocast (both attached to ``forward``) see the whole autoencoder step."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


@register
class AutoencoderTrainer(TrainerPlugin):
    name = "autoencoder"

    def setup(self) -> None:
        self.opts = AutoencoderOptions.model_validate(self.recipe.plugin)
        self.refuse_single_file("an autoencoder run writes an autoencoder")
        spec = self.recipe.model.autoencoder
        if spec is None:
            raise UserError("the autoencoder trainer needs model.autoencoder (a 'config' for a new one, or "
                              "'pretrained' to continue training one).")
        self.vae = load_autoencoder(spec.model_copy(update={"trainable": True}))
        if spec.pretrained is None and self.opts.init_logvar is not None:
            conv = self.vae.quant_conv if self.vae.quant_conv is not None else self.vae.encoder.conv_out
            c = self.vae.config.latent_channels
            with torch.no_grad():
                conv.bias[c:] = self.opts.init_logvar
        d = self.recipe.data
        with self.accelerator.main_process_first():
            self.rows = load_rows(d)
        tf = image_transform(d.resolution, d.center_crop, d.random_flip, crop=self.opts.crop)
        col = d.image_column
        self.rows.set_transform(lambda b: {"pixel_values": [tf(to_rgb(im)) for im in b[col]]})
        self.full_tf = image_transform(d.resolution, True, False)

    def trainable_modules(self):
        if not hasattr(self, "model"):
            self.model = Reconstruct(self.vae)
        return {"model": self.model}

    def train_dataloader(self):
        return make_loader(self.rows, self.recipe.data, self.recipe.train.batch_size)

    def loss(self, batch):
        x = batch["pixel_values"]
        rec, kl_sum = self.model(x)
        err = rec.float() - x.float()
        l1 = err.abs().mean()
        rec_loss = l1 + self.opts.mse_weight * err.pow(2).mean()
        # KL per pixel element, so kl_weight means what LDM's does against a per-pixel-summed loss
        kl = kl_sum.mean() / x[0].numel()
        return rec_loss + self.opts.kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def _full_images(self, n: int) -> torch.Tensor:
        col = self.recipe.data.image_column
        rows = self.rows.with_format(None)
        idx = range(min(n, len(rows)))
        return torch.stack([self.full_tf(to_rgb(rows[i][col])) for i in idx]).to(self.accelerator.device)

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        vae = self.unwrap(self.vae)
        vae.eval()
        x = self._full_images(8)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        vae.train()
        if self.accelerator.is_main_process:

            out = self.run_dir / "samples"
            out.mkdir(parents=True, exist_ok=True)
            w = x.shape[-1]
            grid = Image.new("RGB", (w * len(x), w * 2))
            for i in range(len(x)):
                grid.paste(to_pil(x[i]), (i * w, 0))
                grid.paste(to_pil(rec[i]), (i * w, w))
            grid.save(out / f"reconstructions-{step:06d}.png")
        return {"val_l1": (rec - x).abs().mean().item()}

    @torch.no_grad()
    def save(self, out_dir: Path) -> None:
        vae = self.unwrap(self.vae)
        vae.eval()
        zs, errs = [], []
        for i in range(self.opts.scale_batches):
            x = self._full_images(32 * (i + 1))[32 * i:]
            if len(x) == 0:
                break
            post = vae.encode(x).latent_dist
            zs.append(post.sample())
            errs.append((vae.decode(post.mode()).sample - x).abs().mean().item())
        z = torch.cat(zs)
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        vae.save_pretrained(out_dir / "autoencoder")
        self.metrics = {"scaling_factor": scale, "reconstruction_l1": sum(errs) / len(errs)}
        if self.recipe.data.source == "shapes":

            self.metrics["reconstruction_adherence"] = reconstruction_adherence(vae, self.recipe.data.resolution)
        (out_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
        self.export(out_dir / "autoencoder")
