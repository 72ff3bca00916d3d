"""DDPM (Ho et al. 2020) as an objective: the noise/timestep draws, the targets of each prediction
type, min-SNR-γ weights, offset noise and input perturbation, on diffusers' DDPMScheduler.

The small maths pieces are functions (tested against closed forms); ``DDPMObjective`` composes them
in the order training has always drawn them, so a run is bit-identical to the code before the
objective seam existed."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

from .objective import Draw, Objective, diffusion_loss
from .schedule import PREDICTION_TYPES, make_noise_scheduler
from .vlb import vlb_terms


def _prediction_type(scheduler: DDPMScheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {kind!r}.")
    return kind


def target_for(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model should predict: the noise, the velocity (Salimans & Ho 2022) or the clean latents.

    ``noise`` is the *target* noise (see :func:`sample_noise`).
    """
    kind = _prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), float32, shape of ``timesteps``.

    epsilon: min(SNR, g)/SNR; v_prediction: min(SNR, g)/(SNR + 1); sample: min(SNR, g).
    At SNR = 0 (t = T-1 under zero terminal SNR) the epsilon weight takes its limit 1 rather than
    NaN; the v and sample weights are 0 there, as their formulas give.
    """
    if not gamma > 0:
        raise ValueError(f"Min-SNR gamma must be positive, got {gamma!r}.")
    kind = _prediction_type(scheduler)
    snr = compute_snr(scheduler, timesteps)
    if kind == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)  # == min(SNR, g)/SNR; g/0 = inf -> 1
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if kind == "v_prediction" else clipped


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    rng=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the training noise; returns ``(noise_for_target, noise_for_input)``.

    noise_for_target = eps + noise_offset * randn(B, C, 1, ...)  (offset noise, Crosslabs 2023)
    noise_for_input  = noise_for_target + input_perturbation * randn_like(eps)  (Ning et al. 2023)

    Pass ``noise_for_input`` to ``scheduler.add_noise`` and ``noise_for_target`` to
    :func:`target_for`; they are the same tensor when ``input_perturbation == 0``.
    Draw order from ``generator``: eps, then the offset (if any), then the perturbation (if any).
    ``rng`` (a :class:`ldm_lab.trainers.randomness.BatchRNG`) replaces ``generator`` in training.
    """

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        if rng is not None:
            return rng.randn(shape, latents.dtype).to(latents.device)
        return randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)

    noise = randn(tuple(latents.shape))
    if noise_offset:
        noise = noise + noise_offset * randn(tuple(latents.shape[:2]) + (1,) * (latents.ndim - 2))
    noisy_input = noise + input_perturbation * randn(tuple(latents.shape)) if input_perturbation else noise
    return noise, noisy_input


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    rng=None,
) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), int64, shape (batch_size,)."""
    if rng is not None:
        return rng.randint(num_train_timesteps, batch_size).to(device)
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t


class DDPMObjective(Objective):
    """Discrete-time DDPM on the recipe's beta schedule: epsilon / v / x0 prediction, min-SNR-γ,
    offset noise, input perturbation and zero-terminal-SNR (``noise:`` in the recipe), and a learned
    variance (IDDPM's hybrid loss) for backbones that output one. The network
    gets integer timesteps; ``scheduler`` (the training DDPMScheduler) is what the samplers are
    built from, so they inherit the betas, prediction type and timestep spacing."""

    name = "ddpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012, prediction_type: str = "epsilon",
                 zero_terminal_snr: bool = False, min_snr_gamma: float | None = None, noise_offset: float = 0.0,
                 input_perturbation: float = 0.0, min_timestep: int = 0, max_timestep: int | None = None,
                 learned_variance: bool = False, vlb_weight: float = 0.001):
        self.learned_variance, self.vlb_weight = learned_variance, vlb_weight
        self.bounds = (min_timestep, num_train_timesteps if max_timestep is None else max_timestep)
        self.scheduler = make_noise_scheduler(num_train_timesteps, beta_schedule, beta_start, beta_end,
                                              prediction_type, zero_terminal_snr)
        self.min_snr_gamma, self.noise_offset, self.input_perturbation = min_snr_gamma, noise_offset, input_perturbation

    @classmethod
    def from_spec(cls, noise, patch_size: int = 1, learned_variance: bool = False) -> DDPMObjective:
        return cls(noise.num_train_timesteps, noise.beta_schedule, noise.beta_start, noise.beta_end,
                   noise.prediction_type, noise.zero_terminal_snr, noise.min_snr_gamma, noise.noise_offset,
                   noise.input_perturbation, noise.min_timestep, noise.max_timestep, learned_variance,
                   noise.vlb_weight)

    def draw(self, x0: torch.Tensor, rng) -> Draw:
        # draw order (fixed: checkpoints resume bit-exactly): noise, offset, perturbation, timesteps
        noise, noise_in = sample_noise(x0, None, self.noise_offset, self.input_perturbation, rng=rng)
        lo, hi = self.bounds  # timesteps in [lo, hi): lo + uniform [0, hi - lo), the same draw for the default
        t = lo + sample_timesteps(x0.shape[0], hi - lo, x0.device, rng=rng)
        x_t = self.scheduler.add_noise(x0, noise_in, t)
        target = target_for(self.scheduler, x0, noise, t)
        weight = min_snr_weights(self.scheduler, t, self.min_snr_gamma) if self.min_snr_gamma else None
        return Draw(x_t, t, target, weight, x0 if self.learned_variance else None)

    def loss(self, prediction: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The weighted MSE; with a learned variance (the network's output is 2×C channels: the
        prediction, then v ∈ [−1, 1]) IDDPM's hybrid L_simple + λ·L_vlb, λ·T per sample
        (``vlb.vlb_terms``: the bound trains the variance only)."""
        if not self.learned_variance:
            return super().loss(prediction, draw)
        mean_out, variance_values = prediction.chunk(2, dim=1)
        mse = diffusion_loss(mean_out, draw.target, draw.weight, reduction="none", mask=draw.mask,
                             mask_normalize=draw.mask_normalize)  # the variance's bound is not masked
        vb = vlb_terms(self.scheduler, draw.x0, draw.x_t, draw.t, mean_out, variance_values)
        return mse + self.vlb_weight * self.scheduler.config.num_train_timesteps * vb
