"""Latent-diffusion training objectives on top of diffusers' schedulers and training utilities.

``OBJECTIVES`` is the one place an objective plugs in; ``make_objective(recipe.noise)`` builds the
run's objective.
"""

from .ddpm import DDPMObjective, min_snr_weights, sample_noise, sample_timesteps, target_for
from .flow import FlowMatchingObjective
from .objective import Draw, Objective, diffusion_loss
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES, make_noise_scheduler

OBJECTIVES: dict[str, type[Objective]] = {DDPMObjective.name: DDPMObjective,
                                          FlowMatchingObjective.name: FlowMatchingObjective}


def make_objective(noise, patch_size: int = 1, learned_variance: bool = False) -> Objective:
    """The objective a recipe's ``noise:`` section describes, for a denoiser with ``patch_size``
    whose output does (or not) carry a learned variance."""
    return OBJECTIVES[noise.objective].from_spec(noise, patch_size=patch_size, learned_variance=learned_variance)


__all__ = [
    "BETA_SCHEDULES",
    "DDPMObjective",
    "FlowMatchingObjective",
    "Draw",
    "OBJECTIVES",
    "Objective",
    "PREDICTION_TYPES",
    "diffusion_loss",
    "make_noise_scheduler",
    "make_objective",
    "min_snr_weights",
    "sample_noise",
    "sample_timesteps",
    "target_for",
]
