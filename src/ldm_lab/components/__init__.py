"""Builders for the frozen text encoders, the autoencoder and the UNet."""

from .autoencoder import latent_factor, load_autoencoder
from .text_encoders import TextEncoder, load_text_encoder, write_clip_bpe_vocab
from .unet import PRESETS, load_unet, unet_config

__all__ = ["PRESETS", "TextEncoder", "latent_factor", "load_autoencoder", "load_text_encoder", "load_unet",
           "unet_config", "write_clip_bpe_vocab"]
