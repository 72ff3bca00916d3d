"""LoKr and LoHa adapters (PEFT's ``LoKrConfig`` / ``LoHaConfig``) in the keys other tools read.

PEFT trains them; diffusers' ``load_lora_weights`` reads neither, so a LoKr / LoHa run writes
them in LyCORIS' own naming, which lycoris-lora (``create_lycoris_from_weights``), kohya's
scripts, A1111 / Forge and ComfyUI read: ``<prefix>_<module path, dots as _>.<tensor>`` with
``lora_unet_`` for a UNet, ``lora_te_`` for the CLIP text encoder and ``lycoris_`` for a
transformer backbone, tensors ``lokr_w1``, ``lokr_w1_a/_b``, ``lokr_w2``, ``lokr_w2_a/_b``,
``lokr_t2`` or ``hada_w1_a`` ... ``hada_t2``, and a scalar ``alpha`` per module. For a UNet of the
SD family the same tensors are also written in ComfyUI's generic naming,
``diffusion_model.<original SD module name>.<tensor>`` (:func:`comfyui_state`).

Scales: PEFT multiplies every update by ``alpha / r``. LyCORIS and ComfyUI multiply a LoHa update,
and a LoKr update with a low-rank factor, by ``alpha / dim`` where ``dim`` is that factor's inner
size, which is ``r``: the same, so alpha is written as trained. A LoKr whose two factors are both
full matrices has no ``dim``; both readers then use scale 1 (LyCORIS' "full matrix" mode), so
PEFT's ``alpha / r`` is folded into ``w1`` and the file's alpha is 1.
"""

from __future__ import annotations

import json
import re

import torch

from .single_file import unet_original_module

LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
TENSORS = {"lokr": LOKR_TENSORS, "loha": LOHA_TENSORS}
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "transformer": "lycoris"}
WEIGHT_NAME = "lycoris_weights.safetensors"  # LyCORIS / kohya keys (lycoris-lora, kohya, A1111, ComfyUI)
COMFYUI_NAME = "comfyui_weights.safetensors"  # ComfyUI's generic diffusion_model.* keys (SD UNets)


def kind_of(state: dict[str, torch.Tensor]) -> str | None:
    """``lokr`` or ``loha`` when ``state`` (PEFT naming) holds those adapters, else None."""
    for kind, names in TENSORS.items():
        if any(k.rsplit(".", 1)[-1] in names for k in state):
            return kind
    return None


def _by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        module, _, name = k.rpartition(".")
        out.setdefault(module, {})[name] = v
    return out


def _pattern_value(patterns: dict, module: str, default):
    """A PEFT rank / alpha pattern's value for ``module`` (its keys are suffixes or regexes)."""
    for pat, v in (patterns or {}).items():
        if re.search(rf"(^|\.){re.escape(pat)}$", module) or re.fullmatch(pat, module):
            return v
    return default


def lycoris_modules(state: dict[str, torch.Tensor], config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per adapted module (PEFT module path), its LyCORIS tensors with the scale conventions above
    applied and its ``alpha`` as a float32 scalar."""
    out = {}
    for module, tensors in _by_module(state).items():
        r = _pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["alpha"]))
        t = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if "lokr_w1" in t and "lokr_w2" in t:  # both factors full: readers use scale 1
            t["lokr_w1"] = (t["lokr_w1"].float() * (alpha / r)).to(t["lokr_w1"].dtype)
            alpha = 1.0
        t["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        out[module] = t
    return out


def lycoris_state(components: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> dict[str, torch.Tensor]:
    """LyCORIS / kohya keys for ``{component: (PEFT state, PEFT config dict)}``."""
    sd = {}
    for comp, (state, config) in components.items():
        prefix = PREFIXES[comp]
        for module, tensors in lycoris_modules(state, config).items():
            if comp == "text_encoder" and not module.startswith("text_model."):
                module = "text_model." + module  # CLIPTextModel's layout in every file in the wild
            name = f"{prefix}_{module.replace('.', '_')}"
            sd.update({f"{name}.{k}": v for k, v in tensors.items()})
    return sd


def comfyui_state(state: dict[str, torch.Tensor], config: dict, unet_config: dict,
                  text_encoder: tuple[dict[str, torch.Tensor], dict] | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's generic naming for a UNet adapter of the SD family: each module under its
    original-layout name (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``),
    derived from the UNet's config as the single-file export derives it; a text encoder's
    adapters keep their ``lora_te_`` names, which ComfyUI maps for its CLIP."""
    sd = {}
    for module, tensors in lycoris_modules(state, config).items():
        name = unet_original_module(module, unet_config)
        sd.update({f"diffusion_model.{name}.{k}": v for k, v in tensors.items()})
    if text_encoder is not None:
        sd.update(lycoris_state({"text_encoder": text_encoder}))
    return sd


def file_metadata(kind: str, components: dict[str, tuple[dict, dict]], ours: dict | None = None) -> dict[str, str]:
    """kohya-style ``ss_*`` entries that tell A1111 / kohya's loaders which network wrote the file."""
    first = next(iter(components.values()))[1]
    algo = {"lokr": "lokr", "loha": "loha"}[kind]
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(first["r"]),
            "ss_network_alpha": str(first["alpha"]),
            "ss_network_args": json.dumps({"algo": algo, "factor": str(first.get("decompose_factor", -1)),
                                           "use_tucker": str(bool(first.get("use_effective_conv2d"))).lower()}),
            "format": "pt"}
    if ours:
        meta["ldm_lab"] = json.dumps(ours)
    return meta
