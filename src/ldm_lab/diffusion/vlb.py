"""Learned variance (Nichol & Dhariwal 2021, IDDPM; used by DiT and PixArt): the network's second
half of output channels v ∈ [−1, 1] interpolates the log variance of p(x_{t−1} | x_t) between the
posterior's β̃_t and β_t, and is trained by the variational bound alone (the mean's term is
detached), added to the usual MSE as L_simple + λ·L_vlb with λ = 0.001 (L_vlb sums the T terms,
so the per-sample term is weighted λ·T).

Each term is KL(q(x_{t−1} | x_t, x₀) ‖ p(x_{t−1} | x_t)) in bits per dimension, and at t = 0 the
negative log-likelihood of x₀ under p(x₀ | x₁). Latents are continuous, so that last term is the
Gaussian density (IDDPM's discretised likelihood is for 8-bit pixels).
"""

from __future__ import annotations

import math

import torch

LAMBDA_VLB = 0.001  # IDDPM / DiT


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x, mean, logvar) -> torch.Tensor:
    """−log N(x; mean, e^logvar), elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t].float().reshape(-1, *([1] * (like.ndim - 1)))


def posterior_tables(scheduler) -> dict[str, torch.Tensor]:
    """Per timestep (float64): the two coefficients of q(x_{t−1} | x_t, x₀)'s mean, its clipped log
    variance (β̃_0 = 0 is clipped to β̃_1, as IDDPM does) and log β_t."""
    a_bar = scheduler.alphas_cumprod.double()
    a_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
    betas = scheduler.betas.double()
    var = betas * (1 - a_prev) / (1 - a_bar)
    return {"c0": betas * a_prev.sqrt() / (1 - a_bar), "ct": (1 - a_prev) * (1 - betas).sqrt() / (1 - a_bar),
            "logvar": torch.log(torch.cat([var[1:2], var[1:]])), "log_beta": torch.log(betas)}


def posterior(scheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, tables: dict | None = None):
    """Mean and clipped log variance of q(x_{t−1} | x_t, x₀) on ``scheduler``'s betas, and log β_t."""
    tab = tables or posterior_tables(scheduler)
    mean = _at(tab["c0"], t, x0) * x0 + _at(tab["ct"], t, x0) * x_t
    return mean, _at(tab["logvar"], t, x0), _at(tab["log_beta"], t, x0)


def predicted_x0(scheduler, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x₀ implied by the network's mean output for the scheduler's prediction type."""
    a = _at(scheduler.alphas_cumprod.double(), t, x_t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction
    return prediction


def vlb_terms(scheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, mean_output: torch.Tensor,
              variance_values: torch.Tensor) -> torch.Tensor:
    """Per-sample VLB terms (B,) in bits per dimension; ``mean_output`` is detached (the bound
    trains the variance only)."""
    tab = posterior_tables(scheduler)  # once for both means
    q_mean, q_logvar, log_beta = posterior(scheduler, x0.float(), x_t.float(), t, tab)
    frac = (variance_values.float() + 1) / 2
    p_logvar = frac * log_beta + (1 - frac) * q_logvar
    x0_hat = predicted_x0(scheduler, mean_output.detach().float(), x_t.float(), t)
    p_mean, _, _ = posterior(scheduler, x0_hat, x_t.float(), t, tab)
    kl = normal_kl(q_mean, q_logvar, p_mean, p_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = gaussian_nll(x0.float(), p_mean, p_logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)
