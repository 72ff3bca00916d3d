"""The denoiser seam: one call signature for every backbone.

``denoiser(net, x_t, t, cond, residuals=None) -> prediction`` maps a conditioning record
(``record.Conditioning``: token states, mask, pooled vector) and extra residuals (a ControlNet's)
onto the backbone's own keyword arguments. ``net`` is passed at call time because the trained
module the loop hands back from ``accelerator.prepare`` (a DDP / FSDP wrapper, a compiled module)
is the one that must be called; the adapter is chosen once from the bare module's class.

A new backbone is one adapter class here and one entry in ``ADAPTERS``; the loss path, the plugins
and the FLOP counter call only this interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from ..errors import UserError
from .record import Conditioning


@dataclass
class Residuals:
    """Extra inputs a side network adds to the backbone (ControlNet: one tensor per skip
    connection of the encoder, and one for the mid block)."""

    down: list[torch.Tensor]
    mid: torch.Tensor


class Denoiser:
    """The adapter interface (see the module docstring)."""

    family = ""
    pipeline_class = ""  # the stock diffusers pipeline that holds this backbone
    controlnet_pipeline_class = ""

    def __call__(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 residuals: Residuals | None = None) -> torch.Tensor:
        raise NotImplementedError

    def control_residuals(self, controlnet, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                          control: torch.Tensor) -> Residuals:
        raise UserError(f"the {self.family} backbone has no ControlNet path; train a ControlNet on a UNet base.")


class UNetDenoiser(Denoiser):
    """diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x class): cross-attention to the
    token states. The record's mask is not passed: the stock StableDiffusionPipeline cannot pass
    one, so a mask in training would condition differently from the exported pipeline (an encoder
    that uses a mask, T5, already applies it inside)."""

    family = "unet"
    pipeline_class = "StableDiffusionPipeline"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"

    def __call__(self, net, x_t, t, cond, residuals=None):
        if residuals is None:
            return net(x_t, t, encoder_hidden_states=cond.states).sample
        return net(x_t, t, encoder_hidden_states=cond.states, down_block_additional_residuals=residuals.down,
                   mid_block_additional_residual=residuals.mid).sample

    def control_residuals(self, controlnet, x_t, t, cond, control):
        down, mid = controlnet(x_t, t, encoder_hidden_states=cond.states, controlnet_cond=control, return_dict=False)
        return Residuals(list(down), mid)


ADAPTERS: dict[type, type[Denoiser]] = {UNet2DConditionModel: UNetDenoiser}


def denoiser_for(module: torch.nn.Module) -> Denoiser:
    """The adapter for ``module`` (a bare backbone, before ``accelerator.prepare``)."""
    for cls, adapter in ADAPTERS.items():
        if isinstance(module, cls):
            return adapter()
    raise UserError(f"no denoiser adapter for {type(module).__name__}; the backbones this version trains are "
                    f"{', '.join(c.__name__ for c in ADAPTERS)}.")
