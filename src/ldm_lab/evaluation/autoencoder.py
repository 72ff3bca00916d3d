"""How well an autoencoder keeps what the shapes evaluator reads: adherence of reconstructions.

It bounds what a diffusion model decoding through this autoencoder can reach.
"""

from __future__ import annotations

import torch

from ..data import shapes
from ..data.transforms import image_transform, to_pil
from .shapes import score


@torch.no_grad()
def reconstruction_adherence(vae, resolution: int = 64, n: int = 256, seed: int = 777) -> dict:
    """The shapes evaluator on reconstructions (posterior mode) of ``n`` fresh shapes rows."""

    world = shapes.World(resolution=resolution)
    rows = [shapes.row(world, seed, i) for i in range(n)]
    tf = image_transform(resolution)
    device = next(vae.parameters()).device
    x = torch.stack([tf(r[1]) for r in rows]).to(device, vae.dtype)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mode()).sample for i in range(0, n, 64)])
    return score([to_pil(r) for r in rec], [r[0] for r in rows], world)
