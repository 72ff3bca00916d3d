"""The artifact of a LoKr / LoHa run (diffusers' ``load_lora_weights`` reads neither):

* ``lycoris_weights.safetensors``: every component's adapters in LyCORIS / kohya keys
  (``lora_unet_*``, ``lora_te_*``, ``lycoris_*``), which lycoris-lora, kohya's scripts,
  A1111 / Forge and ComfyUI load;
* ``comfyui_weights.safetensors`` (UNet of the SD family): the same in ComfyUI's generic
  ``diffusion_model.*`` naming;
* a PEFT adapter dir per component (``unet`` / ``transformer``, ``text_encoder``), which
  ``PeftModel.from_pretrained(pipe.unet, "RUN/unet")`` loads and ``ldm-lab sample --lora RUN`` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import lycoris_io
from ..lora_io import PEFT_WEIGHTS, add_metadata, write_peft_adapter
from ..safetensors_file import save_file


def write_lycoris_artifact(components: dict[str, tuple[dict[str, torch.Tensor], dict]], kind: str, meta: dict,
                           out_dir: Path, unet_config: dict | None) -> Path:
    """Write the files above for ``{component: (PEFT state, PEFT config dict)}``; returns the
    LyCORIS file (what ``output.export_to`` copies)."""
    out_dir = Path(out_dir)
    for name, (state, cfg) in components.items():
        d = write_peft_adapter(state, dict(cfg, base_model_name_or_path=meta.get("base_model", "")), out_dir / name)
        add_metadata(d / PEFT_WEIGHTS, meta)
    file_meta = lycoris_io.file_metadata(kind, components, meta)
    path = out_dir / lycoris_io.WEIGHT_NAME
    save_file(lycoris_io.lycoris_state(components), str(path), metadata=file_meta)
    if unet_config is not None and "unet" in components:
        sd = lycoris_io.comfyui_state(*components["unet"], unet_config, components.get("text_encoder"))
        save_file(sd, str(out_dir / lycoris_io.COMFYUI_NAME), metadata=file_meta)
    return path
