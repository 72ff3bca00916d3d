"""The objective seam: what a diffusion training step draws and how its loss is weighed.

Every training step is: clean latents -> ``objective.draw`` -> (x_t, t, target, weight) ->
``denoiser(x_t, t, conditioning)`` -> ``objective.loss``. An objective owns its noise process (the
forward process, which timesteps or noise levels are drawn and how, what the network should
predict, the per-sample weights) and names the diffusers scheduler whose config the samplers are
built from (``scheduler``), so sampling matches training. DDPM is ``ddpm.DDPMObjective``; a new
objective (flow matching, EDM) is a second subclass registered in ``diffusion.OBJECTIVES``, never a
branch in the plugins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draw:
    """One step's draw for a batch of clean latents."""

    x_t: torch.Tensor  # the network's noisy input
    t: torch.Tensor  # what the network is told about the noise level (timesteps or scaled sigmas)
    target: torch.Tensor  # what the network should predict
    weight: torch.Tensor | None = None  # per-sample loss weights (B,), None for 1
    x0: torch.Tensor | None = None  # the clean latents, for losses that need them (the VLB term)
    # per-element loss weights on the latent grid (B, 1, h, w) (a masked loss), None for 1; each
    # sample's weighted MSE is divided by its mean mask weight when ``mask_normalize``
    mask: torch.Tensor | None = None
    mask_normalize: bool = True


class Objective:
    """The interface every objective implements (see the module docstring)."""

    name = ""
    scheduler = None  # a diffusers scheduler: its config is what sampling builds samplers from
    artifact_sampler = "dpm++"  # the sampler a saved pipeline ships with

    @classmethod
    def from_spec(cls, noise, patch_size: int = 1, learned_variance: bool = False) -> Objective:
        """The objective a recipe's ``noise:`` section describes, for a denoiser with ``patch_size``
        (objectives that depend on the latent's token count) that does or does not output a
        learned variance beside its prediction."""
        raise NotImplementedError

    def draw(self, x0: torch.Tensor, rng) -> Draw:
        """Noisy input, network timestep, target and weight for ``x0`` (B, C, h, w), drawing every
        random number from ``rng`` (the run's BatchRNG: the same for any process count)."""
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Per-sample losses (B,): the weighted MSE to the target."""
        return diffusion_loss(prediction, draw.target, draw.weight, reduction="none", mask=draw.mask,
                              mask_normalize=draw.mask_normalize)


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
    mask_normalize: bool = True,
) -> torch.Tensor:
    """MSE in float32: averaged over each sample's non-batch dims, then times ``weights`` (B,).

    ``mask`` (broadcast to the prediction, e.g. (B, 1, h, w)) weights every element first; with
    ``mask_normalize`` each sample's mean is divided by its mask's mean, so a sample's loss is the
    mask-weighted average of its squared errors.

    ``reduction="mean"`` returns mean_b(w_b * mse_b) (the diffusers / Min-SNR convention, not
    normalised by the weight sum); ``"none"`` returns the (B,) weighted per-sample losses.
    """
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred and target shapes differ: {tuple(model_pred.shape)} vs {tuple(target.shape)}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    sq = (model_pred.float() - target.float()).pow(2)
    if mask is None:
        per_sample = sq.flatten(1).mean(dim=1)
    else:
        m = mask.float().to(sq.device).expand_as(sq)
        per_sample = (sq * m).flatten(1).mean(dim=1)
        if mask_normalize:
            per_sample = per_sample / m.flatten(1).mean(dim=1).clamp_min(1e-8)
    if weights is not None:
        per_sample = per_sample * weights.float().reshape(-1).to(per_sample.device)
    return per_sample.mean() if reduction == "mean" else per_sample
