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
from accelerate.utils import extract_model_from_parallel
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from ..errors import UserError
from .record import Conditioning


@dataclass
class Residuals:
    """Extra inputs a side network adds to the backbone: a UNet ControlNet's one tensor per skip
    connection of the encoder (``down``) and one for the mid block (``mid``); an SD3 ControlNet's
    hidden states, one per ControlNet block, added after the transformer's blocks (``blocks``)."""

    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    blocks: list[torch.Tensor] | None = None


class Denoiser:
    """The adapter interface (see the module docstring)."""

    family = ""
    pipeline_class = ""  # the stock diffusers pipeline that holds this backbone
    controlnet_pipeline_class = ""
    component = "unet"  # the backbone's subfolder in that pipeline
    patch_size = 1  # latent pixels per token side (the token count of resolution-dependent shifts)
    learned_variance = False  # the output holds a variance beside the prediction (2×C channels)
    reads_mask = False  # the text encoders' attention masks matter to this backbone (its pipeline passes them)
    # the flow-matching samplers its stock pipeline can run (it calls scheduler.scale_model_input,
    # which FlowMatchEuler lacks; the flow DPM-Solver / UniPC have it)
    flow_samplers: tuple[str, ...] = ("dpm++", "unipc")
    # the ControlNet reads the control image's autoencoder latents (SD3's pipeline encodes it), not its pixels
    control_latents = False
    no_controlnet = ""  # why this family has no ControlNet path (one sentence), where it has none
    max_latent_side: int | None = None  # the largest latent side the backbone takes (None: any)

    def __init__(self, net: torch.nn.Module | None = None):
        """``net``: the bare backbone the adapter serves (its config sets sizes the adapter needs)."""

    @property
    def latent_multiple(self) -> int:
        """What every latent side must be a multiple of for this backbone (a transformer: its patch
        size; the UNet: its total downsampling); a bucket side steps by it × the autoencoder factor."""
        return self.patch_size

    def combine(self, parts: list[Conditioning]) -> Conditioning:
        """The record this backbone reads from the records of the text encoders, in recipe order
        (one encoder: its record)."""
        if len(parts) != 1:
            raise UserError(f"the {self.family} backbone reads one text encoder; give model.text_encoder, "
                            f"not {len(parts)} text_encoders.")
        return parts[0]

    def __call__(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 residuals: Residuals | None = None) -> torch.Tensor:
        raise NotImplementedError

    def control_residuals(self, controlnet, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                          control: torch.Tensor) -> Residuals:
        """The side network's residuals for ``x_t``, called as the family's stock ControlNet
        pipeline calls it (``control``: what that pipeline feeds the net, see ``control_latents``)."""
        raise UserError(self.no_controlnet or f"the {self.family} backbone has no ControlNet path; train a "
                        "ControlNet on a UNet or SD3 base.")


class UNetDenoiser(Denoiser):
    """diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x class): cross-attention to the
    token states. The record's mask is not passed: the stock StableDiffusionPipeline cannot pass
    one, so a mask in training would condition differently from the exported pipeline (an encoder
    that uses a mask, T5, already applies it inside)."""

    family = "unet"
    pipeline_class = "StableDiffusionPipeline"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"

    def __init__(self, net=None):
        # one latent cell of the deepest level: each down block but the last halves the sides
        self.downsampling = 2 ** (len(net.config.block_out_channels) - 1) if net is not None else 1

    @property
    def latent_multiple(self) -> int:
        return self.downsampling

    def __call__(self, net, x_t, t, cond, residuals=None):
        if residuals is None:
            return net(x_t, t, encoder_hidden_states=cond.states).sample
        return net(x_t, t, encoder_hidden_states=cond.states, down_block_additional_residuals=residuals.down,
                   mid_block_additional_residual=residuals.mid).sample

    def control_residuals(self, controlnet, x_t, t, cond, control):
        down, mid = controlnet(x_t, t, encoder_hidden_states=cond.states, controlnet_cond=control, return_dict=False)
        return Residuals(list(down), mid)


class PixArtDenoiser(Denoiser):
    """diffusers ``PixArtTransformer2DModel`` (PixArt-α / Σ, DiT with adaLN-single): patches of the
    latent, cross-attention to the token states *with their mask* (as the stock PixArt pipelines
    pass it). With ``out_channels`` = 2 × ``in_channels`` the output is the prediction and a learned
    variance (IDDPM), which the DDPM objective trains with its hybrid loss and the pipeline discards."""

    family = "pixart"
    component = "transformer"
    reads_mask = True
    no_controlnet = ("the controlnet trainer has no pixart path: diffusers 0.42 has no PixArt ControlNet model or "
                     "pipeline (its ControlNets are for SD / SDXL UNets, SD3, Flux, HunyuanDiT, Sana, Qwen-Image, "
                     "Z-Image and Cosmos), so nothing stock could load one; train a ControlNet on a UNet or SD3 base.")

    def __init__(self, net):
        cfg = net.config
        self.patch_size = int(cfg.patch_size)
        self.learned_variance = cfg.out_channels == 2 * cfg.in_channels
        self.extra = bool(net.use_additional_conditions)  # PixArt-α 1024: resolution and aspect ratio
        self.pipeline_class = "PixArtAlphaPipeline" if self.extra else "PixArtSigmaPipeline"
        self.latent_factor = 8  # pixels per latent pixel (for the resolution condition); set by the trainer

    def __call__(self, net, x_t, t, cond, residuals=None):
        if residuals is not None:
            raise UserError(self.no_controlnet)
        extra = {"resolution": None, "aspect_ratio": None}
        if self.extra:
            h, w = x_t.shape[-2] * self.latent_factor, x_t.shape[-1] * self.latent_factor
            extra = {"resolution": x_t.new_tensor([[h, w]]).expand(len(x_t), 2),
                     "aspect_ratio": x_t.new_tensor([[h / w]]).expand(len(x_t), 1)}
        mask = None if cond.mask is None else cond.mask.to(x_t.dtype)
        return net(x_t, encoder_hidden_states=cond.states, encoder_attention_mask=mask,
                   timestep=t.expand(len(x_t)) if t.ndim == 0 else t, added_cond_kwargs=extra, return_dict=False)[0]


class SD3Denoiser(Denoiser):
    """diffusers ``SD3Transformer2DModel`` (the MMDiT of Stable Diffusion 3 / 3.5): joint attention
    over the latent patches and the token states, the pooled vector through adaLN. ``combine`` is
    ``StableDiffusion3Pipeline.encode_prompt``'s rule, so training conditions as the stock pipeline
    does: the two CLIPs' states side by side, zero-padded to the T5 width, then the T5 tokens
    after them; the pooled vector is the two CLIP projections side by side. Without a T5 there are
    no T5 tokens (the stock pipeline matches with ``max_sequence_length=0``); the CLIP states are
    padded to ``joint_attention_dim`` either way, as the pipeline pads them."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    controlnet_pipeline_class = "StableDiffusion3ControlNetPipeline"
    component = "transformer"
    flow_samplers = ("euler", "dpm++", "unipc")
    control_latents = True

    def __init__(self, net):
        self.patch_size = int(net.config.patch_size)
        # the position embedding is cropped from a pos_embed_max_size² grid of patches: no latent side past it
        self.max_latent_side = int(net.config.pos_embed_max_size or net.config.sample_size // self.patch_size) \
            * self.patch_size
        self.width = int(net.config.joint_attention_dim)  # the token-state width the states are padded to

    def combine(self, parts):
        if len(parts) not in (2, 3) or any(p.pooled is None for p in parts[:2]):
            raise UserError("the sd3 backbone reads two CLIP text encoders with projection (model.text_encoders: "
                            "clip with projection: true and hidden_layer: -2, twice), then optionally a T5.")
        clip = torch.cat([parts[0].states, parts[1].states], dim=-1)
        pooled = torch.cat([parts[0].pooled, parts[1].pooled], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        if len(parts) == 2:
            return Conditioning(clip, None, pooled)
        return Conditioning(torch.cat([clip, parts[2].states.to(clip.dtype)], dim=-2), None, pooled)

    def __call__(self, net, x_t, t, cond, residuals=None):
        blocks = None if residuals is None else residuals.blocks
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.states, pooled_projections=cond.pooled,
                   block_controlnet_hidden_states=blocks, return_dict=False)[0]

    def control_residuals(self, controlnet, x_t, t, cond, control):
        """An ``SD3ControlNetModel``'s block states, called as ``StableDiffusion3ControlNetPipeline``
        calls it: ``control`` is the control image's latents; the pooled vector is zeros for a
        ControlNet with ``force_zeros_for_pooled_projection`` (InstantX's), and a ControlNet without
        a context embedder (``joint_attention_dim`` None, SD3.5's) reads no token states."""
        cfg = extract_model_from_parallel(controlnet).config
        pooled = torch.zeros_like(cond.pooled) if cfg.force_zeros_for_pooled_projection else cond.pooled
        states = cond.states if cfg.joint_attention_dim is not None else None
        blocks = controlnet(hidden_states=x_t, timestep=t, encoder_hidden_states=states, pooled_projections=pooled,
                            controlnet_cond=control, return_dict=False)[0]
        return Residuals(blocks=list(blocks))


ADAPTERS: dict[type, type[Denoiser]] = {UNet2DConditionModel: UNetDenoiser, PixArtTransformer2DModel: PixArtDenoiser,
                                        SD3Transformer2DModel: SD3Denoiser}


def denoiser_for(module: torch.nn.Module) -> Denoiser:
    """The adapter for ``module`` (a bare backbone, before ``accelerator.prepare``)."""
    for cls, adapter in ADAPTERS.items():
        if isinstance(module, cls):
            return adapter(module)
    raise UserError(f"no denoiser adapter for {type(module).__name__}; the backbones this version trains are "
                    f"{', '.join(c.__name__ for c in ADAPTERS)}.")
