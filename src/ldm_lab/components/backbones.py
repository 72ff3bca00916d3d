"""The network being trained, by family: the cross-attention UNet (``unet.py``), the PixArt text DiT
(diffusers ``PixArtTransformer2DModel``) or the SD3 MMDiT (``SD3Transformer2DModel``), from pretrained weights or from an architecture preset plus
overrides. A new family is one builder and its presets here, and one adapter in ``denoiser.py``.

The transformer presets are the published sizes (random weights: for GPU benchmarks and
from-scratch runs) and ``tiny``, which trains on the shapes world on a laptop CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

from ..recipe.schema import DenoiserSpec, UNetSpec
from .unet import load_unet

SD3_PRESETS: dict[str, dict[str, Any]] = {
    # the shapes world: 8x8 latents of 4 channels, one token per latent pixel; two 64-wide shapes
    # CLIPs side by side (128) and their two 512-wide projections (1024) as the pooled vector
    "tiny": dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                 num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                 pooled_projection_dim=1024, pos_embed_max_size=16),
    # Stable Diffusion 3 medium (2B) and 3.5 large (8B), as published
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd35-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                       attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                       caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
}

PIXART_PRESETS: dict[str, dict[str, Any]] = {
    # the shapes world: 8x8 latents of 4 channels, one token per latent pixel, cross-attention to the
    # 64-wide shapes CLIP; out_channels 8 = a learned variance beside the prediction (4 without one)
    "tiny": dict(sample_size=8, patch_size=1, in_channels=4, out_channels=8, num_layers=4, attention_head_dim=32,
                 num_attention_heads=4, cross_attention_dim=128, caption_channels=64,
                 use_additional_conditions=False),
    # PixArt-α XL/2 (512 px, 600M) and PixArt-Σ XL/2 (1024 px), as published: T5-XXL states (4096)
    "pixart-alpha-512": dict(sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
                             attention_head_dim=72, num_attention_heads=16, cross_attention_dim=1152,
                             caption_channels=4096, use_additional_conditions=False),
    "pixart-sigma-1024": dict(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
                              attention_head_dim=72, num_attention_heads=16, cross_attention_dim=1152,
                              caption_channels=4096, use_additional_conditions=False, interpolation_scale=2),
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"pixart": PIXART_PRESETS, "sd3": SD3_PRESETS}
CLASSES: dict[str, type] = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel}


def backbone_config(spec: DenoiserSpec) -> dict[str, Any]:
    if spec.config is not None:
        return {**spec.config, **spec.overrides}
    presets = PRESETS[spec.family]
    if spec.preset not in presets:
        raise ValueError(f"unknown {spec.family} preset {spec.preset!r}; choose from {', '.join(presets)}")
    return {**presets[spec.preset], **spec.overrides}


def load_backbone(spec: DenoiserSpec) -> torch.nn.Module:
    """The backbone a recipe's ``model.denoiser`` (or ``model.unet``) names."""
    if spec.family == "unet":
        return load_unet(UNetSpec(pretrained=spec.pretrained, subfolder=spec.subfolder, revision=spec.revision,
                                  config=spec.config, preset=spec.preset if spec.pretrained is None and spec.config
                                  is None else None, overrides=spec.overrides))
    cls = CLASSES[spec.family]
    if spec.pretrained is not None:
        kw = {k: v for k, v in (("subfolder", spec.subfolder), ("revision", spec.revision)) if v}
        return cls.from_pretrained(spec.pretrained, **kw, **spec.overrides)
    net = cls(**backbone_config(spec))
    if spec.init == "dit":  # the schema allows it for pixart only
        dit_init(net)
    return net


@torch.no_grad()
def dit_init(net: PixArtTransformer2DModel) -> None:
    """PixArt's (and DiT's) initialisation for training from scratch: xavier-uniform linears and
    patch embedding with zero biases, N(0, 0.02) timestep and caption embedders, and every block's
    cross-attention output and the final projection zeroed, so each block starts as the identity
    on the text path and the network's first prediction is 0. Draws from the global RNG (the seed)."""
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    w = net.pos_embed.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    torch.nn.init.zeros_(net.pos_embed.proj.bias)
    emb = net.adaln_single.emb.timestep_embedder
    for lin in (emb.linear_1, emb.linear_2, net.adaln_single.linear, net.caption_projection.linear_1,
                net.caption_projection.linear_2):
        torch.nn.init.normal_(lin.weight, std=0.02)
    for block in net.transformer_blocks:
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    torch.nn.init.zeros_(net.proj_out.weight)
    torch.nn.init.zeros_(net.proj_out.bias)
