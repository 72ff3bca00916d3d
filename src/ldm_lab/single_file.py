"""A diffusers Stable Diffusion 1.x-class pipeline as one original-layout checkpoint file: the
format A1111, ComfyUI, Forge and kohya's scripts load (``model.diffusion_model.*`` for the
UNet, ``first_stage_model.*`` for the autoencoder, ``cond_stage_model.transformer.*`` for the
CLIP text encoder), and diffusers reads back with ``from_single_file``.

diffusers ships the reading direction (``diffusers.loaders.single_file_utils``); this module is
the writing direction. The key map is derived from each model's config (number of levels,
layers per level, where attention is), so it covers the SD 1.x UNet and VAE and smaller models
of the same family, not only the 4-level SD layout. Architectures whose original layout differs
(SD 2.x's OpenCLIP text tower, SDXL's two text encoders and UNet) are refused with a message.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

# (diffusers name, original name) inside a UNet resnet; checked in this order
_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class SingleFileError(ValueError):
    """The pipeline cannot be written in the original single-file layout (the reason says why)."""


def _unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> original prefix for every block of this UNet."""
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise SingleFileError("a UNet with a different number of layers per level has no original single-file layout")
    cross_down = ["CrossAttn" in t for t in config["down_block_types"]]
    cross_up = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, str] = {}
    for i in range(n):
        for j in range(per):
            k = (per + 1) * i + j + 1
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            if cross_down[i]:
                out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
        for j in range(per + 1):
            k = (per + 1) * i + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            if cross_up[i]:
                out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        if i < n - 1:
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per + 1) * i + per}.{2 if cross_up[i] else 1}."
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    return out


def _rename(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    """(original prefix, rest of the key) for the longest diffusers prefix ``key`` starts with."""
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    return None if best is None else (prefixes[best], key[len(best):])


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = value
            continue
        hit = _rename(key, prefixes)
        if hit is None:
            raise SingleFileError(f"the UNet weight '{key}' has no place in the original layout")
        new_prefix, rest = hit
        if ".resnets." in key:
            inner, _, p = rest.rpartition(".")
            inner = dict(_UNET_RESNET).get(inner, inner)
            rest = f"{inner}.{p}"
        out[new_prefix + rest] = value
    return out


def _vae_prefixes(config: dict) -> dict[str, str]:
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    out: dict[str, str] = {}
    for i in range(n):
        for j in range(per):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < n - 1:
            out[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(per + 1):  # decoder levels are numbered from the top in diffusers, the bottom originally
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        if i < n - 1:
            out[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        out[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        out[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        out[f"{part}.conv_norm_out."] = f"{part}.norm_out."
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefixes(config)
    out = {}
    for key, value in state.items():
        hit = _rename(key, prefixes)
        if hit is None:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            out[key] = value
            continue
        new_prefix, rest = hit
        if new_prefix.endswith("attn_1."):
            inner, _, p = rest.rpartition(".")
            if inner not in _VAE_ATTN:
                raise SingleFileError(f"the autoencoder weight '{key}' has no place in the original layout")
            rest = f"{_VAE_ATTN[inner]}.{p}"
            if p == "weight" and inner != "group_norm":
                value = value.reshape(*value.shape, 1, 1)  # linear -> the original's 1x1 convolution
        elif ".resnets." in key:
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out[new_prefix + rest] = value
    return out


def pipeline_state(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a local diffusers SD 1.x-class pipeline dir."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(pipeline_dir)
    index = root / "model_index.json"
    if not index.exists():
        raise SingleFileError(f"'{root}' is not a diffusers pipeline dir (no model_index.json)")
    import json

    parts = json.loads(index.read_text())
    if "text_encoder_2" in parts:
        raise SingleFileError("SDXL-class pipelines (two text encoders) are not written as one file here")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    if unet.config.get("use_linear_projection"):  # SD 2.x: OpenCLIP text tower, another original layout
        raise SingleFileError("SD 2.x-class pipelines (linear attention projections, OpenCLIP text encoder) are not "
                              "written as one file here")
    state = {UNET_PREFIX + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    state |= {VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()}
    # the original layout keeps transformers' ``text_model.`` level, which CLIPTextModel dropped in 5.6
    state |= {TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
              for k, v in te.state_dict().items()}
    return state


def write(pipeline_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipeline_dir`` as one ``.safetensors`` checkpoint at ``out`` (atomically)."""
    import os

    from safetensors.torch import save_file

    state = pipeline_state(pipeline_dir)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt", "writer": "ldm-lab"})
    os.replace(tmp, out)
    return out
