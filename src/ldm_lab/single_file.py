"""A diffusers Stable Diffusion 1.x / 2.x-class pipeline as one original-layout checkpoint file: the
format A1111, ComfyUI, Forge and kohya's scripts load (``model.diffusion_model.*`` for the
UNet, ``first_stage_model.*`` for the autoencoder, ``cond_stage_model.transformer.*`` for the
CLIP text encoder), and diffusers reads back with ``from_single_file``.

diffusers ships the reading direction (``diffusers.loaders.single_file_utils``); this module is
the writing direction. The key map is derived from each model's config (number of levels,
layers per level, where attention is), so it covers the SD 1.x UNet and VAE and smaller models
of the same family, not only the 4-level SD layout. A1111 and ComfyUI build the models and the
noise schedule from their own SD 1.5 config, so they load only files of exactly that
architecture and schedule (:func:`sd15_differences` says where a pipeline departs from it);
diffusers loads any of these files with ``from_single_file(FILE, config=PIPELINE_DIR)``.
SD 2.x-class pipelines (linear attention projections) get their text tower in open_clip's names
(``cond_stage_model.model.*``, q/k/v fused), as SD 2.x checkpoints hold it. SDXL (two text
encoders) and non-CLIP text encoders are refused with a message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from .safetensors_file import save_file

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: the text tower in open_clip's own names

# (diffusers name, original name) inside a UNet resnet; checked in this order
_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_SAME = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# the file's precision by its name (``--dtype``, ``output.single_file``)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SingleFileError(ValueError):
    """The pipeline cannot be written in the original single-file layout (the reason says why)."""


def _unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> original prefix for every block of this UNet."""
    n = len(config["block_out_channels"])
    per = _layers_per_block(config["layers_per_block"], "UNet")
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


def _layers_per_block(value, what: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise SingleFileError(f"a {what} with a different number of layers per level has no original single-file layout")
    return int(value[0])


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


def unet_original_module(module: str, config: dict) -> str:
    """The original-layout name of the diffusers UNet module ``module`` (an adapted layer, say)."""
    (key,) = unet_to_original({f"{module}.weight": torch.empty(0)}, config)
    return key[: -len(".weight")]


def _vae_prefixes(config: dict) -> dict[str, str]:
    n = len(config["block_out_channels"])
    per = _layers_per_block(config["layers_per_block"], "autoencoder")
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
        if hit is None:
            if key.rpartition(".")[0] not in _VAE_SAME:
                raise SingleFileError(f"the autoencoder weight '{key}' has no place in the original layout")
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


def _pipeline_parts(root: Path):
    index = root / "model_index.json"
    if not index.exists():
        raise SingleFileError(f"'{root}' is not a diffusers pipeline dir (no model_index.json)")
    parts = json.loads(index.read_text())
    if "text_encoder_2" in parts:  # SDXL
        raise SingleFileError("SDXL-class pipelines (two text encoders) are not written as one file here")
    te_class = (parts.get("text_encoder") or [None, None])[1]
    if te_class not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise SingleFileError(f"its text encoder is {te_class}, and the SD 1.x layout holds a CLIP text encoder")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")

    te, info = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", output_loading_info=True)
    if info.get("missing_keys"):
        raise SingleFileError(f"its text encoder lacks weights a CLIP text model has ({info['missing_keys'][0]}, ...)")
    return unet, vae, te


def check_models(unet, vae, text_encoder) -> None:
    """Raise :class:`SingleFileError` unless these models fit the SD 1.x / 2.x single-file layout: the
    architectures, and every weight's place in it (renames only; training checks this before its
    first step, so a run does not fail at its end)."""
    models_state(unet, vae, text_encoder)


def models_state(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The original-layout state dict of in-memory SD 1.x / 2.x-class models (the tensors
    themselves, renamed; q/k/v fused for an SD 2.x text tower)."""

    unet_config = unet.config
    if not isinstance(text_encoder, CLIPTextModel):
        raise SingleFileError(f"its text encoder is a {type(text_encoder).__name__}, and the SD 1.x layout holds a "
                              "CLIP text model")
    if text_encoder.config.hidden_size != unet_config["cross_attention_dim"]:
        raise SingleFileError(f"its text encoder is {text_encoder.config.hidden_size} wide and the UNet attends to "
                              f"{unet_config['cross_attention_dim']}")
    state = {UNET_PREFIX + k: v for k, v in unet_to_original(unet.state_dict(), unet_config).items()}
    state |= {VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()}
    te_state = text_encoder.state_dict()
    if is_sd2(unet_config):
        state |= {OPENCLIP_PREFIX + k: v for k, v in text_to_openclip(te_state).items()}
    else:  # the original layout keeps transformers' ``text_model.`` level, which CLIPTextModel dropped in 5.6
        state |= {TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te_state.items()}
    return state


def is_sd2(unet_config) -> bool:
    """SD 2.x-class: linear attention projections in the UNet, an OpenCLIP text tower, which the
    original layout stores in open_clip's names (``cond_stage_model.model.*``); loaders tell
    SD 1.x from 2.x files by those names."""
    return bool(unet_config.get("use_linear_projection"))


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def text_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights in open_clip's names: q, k and v projections fused
    into one ``in_proj`` per layer, as SD 2.x checkpoints hold them. (SD 2.x's text encoder in
    diffusers stops one layer short of OpenCLIP-H's 24, the penultimate layer SD 2.x conditions on;
    loaders leave the absent last layer unused.)"""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.rpartition(".")[2]] = value
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            module, _, param = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, param), {})[module[-6]] = value
            elif module in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{i}.{_OPENCLIP_LAYER[module]}.{param}"] = value
            else:
                raise SingleFileError(f"the text encoder weight '{key}' has no place in the OpenCLIP layout")
        elif k != "embeddings.position_ids":
            raise SingleFileError(f"the text encoder weight '{key}' has no place in the OpenCLIP layout")
    for (i, param), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_state(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a local diffusers SD 1.x / 2.x-class pipeline dir."""
    unet, vae, te = _pipeline_parts(Path(pipeline_dir))
    return models_state(unet, vae, te)


# what A1111 and ComfyUI assume of every SD 1.x file: they build the models and the schedule from
# their own SD 1.5 config, not from the file
SD15 = {"unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
                 "in_channels": 4, "attention_head_dim": 8, "transformer_layers_per_block": 1,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "layers_per_block": 2,
                "norm_num_groups": 32, "scaling_factor": 0.18215},
        "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "max_position_embeddings": 77},
        "scheduler": {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "num_train_timesteps": 1000}}


# SD 2.x (2.0/2.1, 512 base and 768-v): A1111 and ComfyUI pick it by the OpenCLIP names and probe
# for v-prediction, so both prediction types load
SD2 = {"unet": {**SD15["unet"], "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": True},
       "vae": SD15["vae"],
       "text_encoder": {"hidden_size": 1024, "num_hidden_layers": 23, "max_position_embeddings": 77, "hidden_act": "gelu"},
       "scheduler": {**SD15["scheduler"], "prediction_type": ("epsilon", "v_prediction")}}


def sd15_differences(pipeline_dir: str | Path) -> list[str]:
    """Where a pipeline differs from what A1111 / ComfyUI assume of an SD 1.x file, or of an SD
    2.x one for an SD 2.x-class pipeline (empty: it loads there as it is); such a file still loads
    in diffusers with ``from_single_file(config=the pipeline dir)``, which reads the models' and
    scheduler's configs from that dir."""

    root = Path(pipeline_dir)
    unet_cfg = root / "unet" / "config.json"
    sd2 = unet_cfg.exists() and is_sd2(json.loads(unet_cfg.read_text()))
    name, reference = ("SD 2.x", SD2) if sd2 else ("SD 1.5", SD15)
    out = []
    for part, want in reference.items():
        f = root / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        have = json.loads(f.read_text()) if f.exists() else {}
        if part == "scheduler" and have.get("rescale_betas_zero_snr"):
            out.append("scheduler rescale_betas_zero_snr is on")
        for k, v in want.items():
            got = have.get(k, 1 if k == "transformer_layers_per_block" else None)  # diffusers' default
            if isinstance(got, list) and isinstance(v, int | float) and len(set(got)) == 1:
                got = got[0]
            if isinstance(v, tuple):
                if got not in v:
                    out.append(f"{part} {k} is {got}, {name}'s {' or '.join(map(str, v))}")
            elif got != v and not (isinstance(v, float) and isinstance(got, float) and abs(got - v) < 1e-9):
                out.append(f"{part} {k} is {got}, {name}'s {v}")
    return out


def not_sd15_note(differences: list[str], pipeline_dir) -> str:
    shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    return (f"note: not the SD 1.5 / 2.x architecture and schedule ({shown}): A1111 and ComfyUI assume those and will not "
            f"load this file as it is; diffusers loads it with from_single_file(FILE, config='{pipeline_dir}')")


def save(state: dict[str, torch.Tensor], out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """``state`` as one ``.safetensors`` checkpoint at ``out`` (atomically), every floating-point
    weight in ``dtype``."""

    state = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "writer": "ldm-lab"})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
