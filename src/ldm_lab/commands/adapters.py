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
                            "ControlNetModel.from_pretrained reads, or a controlnet run dir.")
        if not Path(img).is_file():
            raise UserError(f"--control-image '{img}' does not exist.")
        out.append((str(p), scale, img))
    return out
