"""Flow matching (rectified flow, Liu et al. 2022; Esser et al. 2024, the SD3 objective).

x_t = (1 − σ)·x₀ + σ·ε, and the network predicts the velocity ε − x₀. σ is drawn from a timestep
density (diffusers' ``compute_density_for_timestep_sampling``: ``logit_normal`` with mean / std,
``mode`` with its scale, ``uniform``), then shifted towards noise, by a fixed ``shift``
(σ' = s·σ / (1 + (s − 1)·σ), SD3) or by one computed from the latent's token count (the
exponential time shift with μ linear in the token count, as ``FlowMatchEulerDiscreteScheduler``
does with ``use_dynamic_shifting``), then mapped into the recipe's timestep bounds. The loss
weighting is diffusers' ``compute_loss_weighting_for_sd3`` (``none``, ``sigma_sqrt``, ``cosmap``).
The network is told t = σ·T (T = ``num_train_timesteps``), as SD3's transformer expects, and
sampling uses ``FlowMatchEulerDiscreteScheduler`` with the same shift.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .objective import Draw, Objective

TIMESTEP_DENSITIES = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The flow's point at noise level ``sigmas`` (B,): (1 − σ)·x₀ + σ·ε."""
    s = sigmas.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity target d x_t / dσ = ε − x₀."""
    return noise - x0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift: s·σ / (1 + (s − 1)·σ) (s > 1 moves σ towards noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ of the resolution-dependent shift: linear in the token count, ``base_shift`` at
    ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (the pipelines' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def dynamic_shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The exponential time shift e^μ / (e^μ + (1/σ − 1)): the fixed shift with s = e^μ."""
    return shift_sigmas(sigmas, math.exp(mu))


class FlowMatchingObjective(Objective):
    """Flow matching with the recipe's timestep density, shift, bounds and loss weighting
    (``noise:`` keys ``timestep_density``, ``logit_mean``, ``logit_std``, ``mode_scale``, ``shift``,
    ``dynamic_shift`` (+ ``base_shift``, ``max_shift``, ``base_image_seq_len``,
    ``max_image_seq_len``), ``min_timestep``, ``max_timestep``, ``loss_weighting``)."""

    name = "flow"
    artifact_sampler = "euler"  # FlowMatchEulerDiscreteScheduler, as SD3 pipelines ship

    def __init__(self, num_train_timesteps: int = 1000, timestep_density: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 loss_weighting: str = "none", shift: float = 1.0, dynamic_shift: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, min_timestep: int = 0, max_timestep: int | None = None,
                 patch_size: int = 1):
        if timestep_density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density must be one of {', '.join(TIMESTEP_DENSITIES)}; got {timestep_density!r}.")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}; got {loss_weighting!r}.")
        self.T = num_train_timesteps
        self.density, self.logit_mean, self.logit_std, self.mode_scale = timestep_density, logit_mean, logit_std, mode_scale
        self.weighting, self.shift, self.dynamic = loss_weighting, shift, dynamic_shift
        self.seq = dict(base_seq_len=base_image_seq_len, max_seq_len=max_image_seq_len, base_shift=base_shift,
                        max_shift=max_shift)
        hi = num_train_timesteps if max_timestep is None else max_timestep
        self.bounds = (min_timestep / num_train_timesteps, hi / num_train_timesteps)
        self.patch_size = patch_size  # the denoiser's patch: the token count of the dynamic shift
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=dynamic_shift,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len)

    @classmethod
    def from_spec(cls, noise, patch_size: int = 1, learned_variance: bool = False) -> FlowMatchingObjective:
        if learned_variance:
            raise ValueError("a learned variance is trained by the DDPM variational bound; flow matching has "
                             "none: use a backbone without the extra output channels, or noise.objective ddpm")
        return cls(noise.num_train_timesteps, noise.timestep_density, noise.logit_mean, noise.logit_std,
                   noise.mode_scale, noise.loss_weighting, noise.shift, noise.dynamic_shift, noise.base_shift,
                   noise.max_shift, noise.base_image_seq_len, noise.max_image_seq_len, noise.min_timestep,
                   noise.max_timestep, patch_size)

    def image_seq_len(self, x0: torch.Tensor) -> int:
        return (x0.shape[-2] // self.patch_size) * (x0.shape[-1] // self.patch_size)

    def sigmas(self, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """Noise levels from density draws ``u`` in [0, 1]: shifted, then mapped into the bounds."""
        s = dynamic_shift_sigmas(u, resolution_mu(image_seq_len, **self.seq)) if self.dynamic \
            else shift_sigmas(u, self.shift)
        lo, hi = self.bounds
        return lo + (hi - lo) * s

    def draw(self, x0: torch.Tensor, rng) -> Draw:
        # draw order (fixed: checkpoints resume bit-exactly): noise, then the density's numbers
        noise = rng.randn(tuple(x0.shape), x0.dtype).to(x0.device)
        u = rng.draw(lambda n, generator: compute_density_for_timestep_sampling(
            self.density, n, self.logit_mean, self.logit_std, self.mode_scale, generator.device, generator),
            x0.shape[0]).to(x0.device)
        sig = self.sigmas(u.float(), self.image_seq_len(x0))
        weight = None if self.weighting == "none" else compute_loss_weighting_for_sd3(self.weighting, sig)
        return Draw(interpolate(x0, noise, sig), sig * self.T, velocity(x0, noise), weight)
