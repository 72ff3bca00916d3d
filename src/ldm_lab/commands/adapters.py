"""``--lora FILE[:scale]`` and ``--controlnet DIR[:scale]`` arguments, checked before anything loads."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..lora_io import peft_adapter_dir


def parse_scaled(text: str) -> tuple[str, float]:
    """``PATH[:scale]`` -> (path, scale); a path that exists as given keeps its colon."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def lora_args(items: list[str], default_scale: float | None = None) -> list[tuple[str, float]]:
    """(file, scale) per ``FILE[:scale]``; ``default_scale`` for those given without their own."""
    out = []
    for item in items:
        path, scale = parse_scaled(item)
        if default_scale is not None and ":" not in item[len(path):]:
            scale = default_scale
        p = Path(path)
        if not (p.is_file() or (p / "pytorch_lora_weights.safetensors").is_file() or peft_adapter_dir(p)):
            raise UserError(f"LoRA '{path}' is neither a .safetensors file, nor a dir with "
                            "pytorch_lora_weights.safetensors, nor a PEFT adapter dir (adapter_config.json, or a "
                            "LoRA run's transformer/); give FILE[:scale] or DIR[:scale].")
        out.append((path, scale))
    return out


def controlnet_args(items: list[str], images: list[str]) -> list[tuple[str, float, str]]:
    """(dir, scale, control image) per --controlnet DIR[:scale], paired with --control-image in order."""
    if len(items) != len(images):
        raise UserError(f"{len(items)} --controlnet but {len(images)} --control-image; give one control image per "
                        "ControlNet, in the same order.")
    out = []
    for item, img in zip(items, images):
        path, scale = parse_scaled(item)
        p = Path(path)
        if (p / "controlnet" / "config.json").exists():
            p = p / "controlnet"  # a run dir
        if not (p / "config.json").exists():
            raise UserError(f"ControlNet '{path}' is not a ControlNet dir (no config.json); give a dir "
                            "ControlNetModel (or SD3ControlNetModel).from_pretrained reads, or a controlnet run dir.")
        if not Path(img).is_file():
            raise UserError(f"--control-image '{img}' does not exist.")
        out.append((str(p), scale, img))
    return out


def backbone_of(pipe):
    """The denoiser a loaded pipeline holds (its UNet, or its transformer)."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def controlnet_pipeline(pipe, dirs: list[str]):
    """The stock ControlNet pipeline of ``pipe``'s family sharing its modules, with the ControlNet in
    each of ``dirs`` (several: diffusers' multi-ControlNet, which sums each net's residuals times its
    scale): StableDiffusionControlNetPipeline + ControlNetModel, or StableDiffusion3ControlNetPipeline +
    SD3ControlNetModel for an SD3 base. Returns (pipeline, family)."""
    from diffusers import (
        ControlNetModel,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        StableDiffusion3ControlNetPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionControlNetPipeline,
    )

    from ..components.controlnets import load_controlnet
    from ..components.denoiser import PixArtDenoiser

    if isinstance(pipe, (PixArtAlphaPipeline, PixArtSigmaPipeline)):
        raise UserError(PixArtDenoiser.no_controlnet)
    if isinstance(pipe, StableDiffusion3Pipeline):
        family, cls = "sd3", StableDiffusion3ControlNetPipeline
        nets = [load_controlnet("sd3", d, pipe.transformer, what="ControlNet") for d in dirs]
    else:
        family, cls, nets = "unet", StableDiffusionControlNetPipeline, []
        for d in dirs:
            try:
                nets.append(ControlNetModel.from_pretrained(d))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load a ControlNet from '{d}' ({str(e).splitlines()[0][:160]}).") from None
            if nets[-1].config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
                raise UserError(f"ControlNet '{d}' was made for another base (cross_attention_dim "
                                f"{nets[-1].config.cross_attention_dim}, the base has "
                                f"{pipe.unet.config.cross_attention_dim}).")
    cpipe = cls.from_pipe(pipe, controlnet=nets if len(nets) > 1 else nets[0])
    cpipe.set_progress_bar_config(disable=True)
    return cpipe, family
