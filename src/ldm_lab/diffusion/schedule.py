"""The training noise schedule: a configured ``diffusers.DDPMScheduler``, nothing hand-rolled."""

from __future__ import annotations

from diffusers import DDPMScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
) -> DDPMScheduler:
    """Build the DDPM training scheduler (defaults are Stable Diffusion's).

    ``zero_terminal_snr=True`` rescales the betas so that alphas_cumprod[-1] == 0 (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1) and, as that paper
    recommends, sets ``timestep_spacing="trailing"`` so sampling starts at t = T-1. The paper pairs
    it with ``v_prediction``: at SNR 0 an epsilon model cannot recover x0.

    ``beta_start``/``beta_end`` are ignored by ``squaredcos_cap_v2``. ``clip_sample`` is off because
    latents are not confined to [-1, 1].
    """
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}.")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}; got {beta_schedule!r}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}.")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"Betas must satisfy 0 < beta_start < beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}."
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
        rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="trailing" if zero_terminal_snr else "leading",
    )
