"""Latent-diffusion training maths on top of diffusers' DDPMScheduler and training utilities."""

from ldm_lab.diffusion.objective import diffusion_loss, min_snr_weights, sample_noise, sample_timesteps, target_for
from ldm_lab.diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, make_noise_scheduler

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "diffusion_loss",
    "make_noise_scheduler",
    "min_snr_weights",
    "sample_noise",
    "sample_timesteps",
    "target_for",
]
