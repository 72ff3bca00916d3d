"""The KL autoencoder (diffusers AutoencoderKL): hub id, local dir, a pipeline's ``vae``
subfolder, or a config. Its scaling factor comes from its config."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL

from ..recipe.schema import AutoencoderSpec


def load_autoencoder(spec: AutoencoderSpec) -> AutoencoderKL:
    if spec.config is not None:
        vae = AutoencoderKL(**spec.config)
    else:
        sub = spec.subfolder
        if sub is None and Path(spec.pretrained).is_dir() and (Path(spec.pretrained) / "vae").is_dir() \
                and not (Path(spec.pretrained) / "config.json").exists():
            sub = "vae"  # a pipeline dir given as the autoencoder
        kw = {k: v for k, v in (("subfolder", sub), ("revision", spec.revision)) if v}
        vae = AutoencoderKL.from_pretrained(spec.pretrained, **kw)
    if not spec.trainable:
        vae.requires_grad_(False)
        vae.eval()
    return vae


def latent_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along one side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
