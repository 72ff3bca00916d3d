"""ControlNets per denoiser family: a new one made from the frozen base by diffusers
(``ControlNetModel.from_unet``, ``SD3ControlNetModel.from_transformer``), an existing one loaded
and checked against the base (training's ``plugin.controlnet``, sampling's ``--controlnet``), and
the control image as the family's stock ControlNet pipeline feeds it to the net."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import ControlNetModel, SD3ControlNetModel
from diffusers.configuration_utils import FrozenDict

from ..errors import UserError
from .autoencoder import latent_factor

CLASSES = {"unet": ControlNetModel, "sd3": SD3ControlNetModel}


def new_controlnet(family: str, backbone, vae, opts):
    """A ControlNet made from the base by diffusers: the UNet's encoder copied with zero convolutions
    (the conditioning embedding downsampling the control image as much as the autoencoder does), or
    the first ``plugin.num_layers`` MMDiT blocks copied with zero output projections and a zero
    patch embedding of the control latents."""
    if family == "sd3":
        return _new_sd3(backbone, opts)
    if opts.num_layers is not None:
        raise UserError("plugin.num_layers sets the blocks of an SD3 ControlNet; leave it out for a UNet base "
                        "(the UNet ControlNet copies the whole encoder).")
    factor = latent_factor(vae)
    chans = opts.conditioning_embedding_out_channels or [16, 32, 96, 256, 512][:int(math.log2(factor)) + 1]
    if 2 ** (len(chans) - 1) != factor:
        raise UserError(f"plugin.conditioning_embedding_out_channels has {len(chans)} entries, which "
                        f"downsample the control image {2 ** (len(chans) - 1)}x, but the autoencoder's "
                        f"latents are {factor}x smaller; give {int(math.log2(factor)) + 1} entries.")
    return ControlNetModel.from_unet(backbone, conditioning_embedding_out_channels=tuple(chans))


def _new_sd3(transformer, opts):
    if opts.conditioning_embedding_out_channels is not None:
        raise UserError("plugin.conditioning_embedding_out_channels is for a UNet ControlNet; an SD3 ControlNet "
                        "reads the control image's latents through a patch embedding; leave it out.")
    n = int(transformer.config.num_layers)
    layers = opts.num_layers or min(12, max(1, n // 2))
    if not 1 <= layers < n:
        raise UserError(f"an SD3 ControlNet copies fewer blocks than the base's {n} (the last one reads no text); "
                        f"set plugin.num_layers between 1 and {n - 1}" if n > 1 else
                        "an SD3 ControlNet copies fewer blocks than the base has, and this base has one; "
                        "give a base with at least two transformer blocks.")
    # from_transformer writes num_layers into the config it is given: give it a copy, not the base's own
    view = SimpleNamespace(config=FrozenDict(transformer.config), pos_embed=transformer.pos_embed,
                           time_text_embed=transformer.time_text_embed, context_embedder=transformer.context_embedder,
                           transformer_blocks=transformer.transformer_blocks)
    net = SD3ControlNetModel.from_transformer(view, num_layers=layers, num_extra_conditioning_channels=0)
    # the copied timestep + pooled-text embedding reads the pooled prompt as the base's does, and the
    # control latents get the autoencoder's shift as the image latents do (both follow from this key
    # in StableDiffusion3ControlNetPipeline; diffusers' default, True, is InstantX's zero pooled vector)
    net.register_to_config(force_zeros_for_pooled_projection=False)
    return net


def load_controlnet(family: str, source: str, backbone, what: str = "plugin.controlnet"):
    """An existing ControlNet of the family's class (``what``: how the message names it), refused
    in one sentence when it cannot feed this base."""
    cls = CLASSES[family]
    try:
        named = cls.load_config(source).get("_class_name", cls.__name__)
        if named != cls.__name__:
            raise UserError(f"{what} '{source}' is a {named}, but a {family} base takes a {cls.__name__}; "
                            "give a ControlNet of this base.")
        net = cls.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} '{source}' cannot be loaded ({str(e).splitlines()[0][:160]}); "
                        "give a ControlNet dir (config.json + weights) or a hub id.") from None
    why = mismatch(family, net.config, backbone.config)
    if why:
        raise UserError(f"{what} '{source}' {why}; give a ControlNet of this base.")
    return net


def mismatch(family: str, mine, base) -> str:
    """Why a ControlNet config cannot feed a base backbone config ("" when it can)."""
    if family == "unet":
        for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
            if tuple(np.atleast_1d(mine[key])) != tuple(np.atleast_1d(base[key])):
                return f"was made for another UNet ({key} {mine[key]} vs the base's {base[key]})"
        return ""
    if not mine.get("use_pos_embed", True):
        return ("borrows the transformer's position embedding (SD3.5's ControlNets), which this trainer does not "
                "train yet")
    if mine.get("extra_conditioning_channels", 0):
        return "reads extra conditioning channels (an inpainting ControlNet), which the control pipeline does not give"
    width = lambda c: int(c["num_attention_heads"]) * int(c["attention_head_dim"])  # noqa: E731
    pairs = [("in_channels", mine["in_channels"], base["in_channels"]),
             ("patch_size", mine["patch_size"], base["patch_size"]),
             ("pooled_projection_dim", mine["pooled_projection_dim"], base["pooled_projection_dim"]),
             ("width (heads x head dim)", width(mine), width(base))]
    if mine.get("joint_attention_dim") is not None:
        pairs.append(("joint_attention_dim", mine["joint_attention_dim"], base["joint_attention_dim"]))
    for key, a, b in pairs:
        if a != b:
            return f"was made for another transformer ({key} {a} vs the base's {b})"
    return ""


@torch.no_grad()
def control_latents(vae, controlnet, control01: torch.Tensor, noise: torch.Tensor, shift_factor: float) -> torch.Tensor:
    """What ``StableDiffusion3ControlNetPipeline`` feeds its ControlNet for control images in [0, 1]:
    the autoencoder's posterior sample of the image in [-1, 1] (``noise``: the standard-normal draw),
    minus the autoencoder's shift (none for a ControlNet with ``force_zeros_for_pooled_projection``,
    as the pipeline does), times its scaling factor."""
    dist = vae.encode((2 * control01 - 1).to(vae.dtype)).latent_dist
    z = dist.mean.float() + dist.std.float() * noise.to(dist.mean.device)
    shift = 0.0 if controlnet.config.force_zeros_for_pooled_projection else shift_factor
    return (z - shift) * float(vae.config.scaling_factor)
