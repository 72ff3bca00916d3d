"""Which keys of an adapter file ComfyUI would not load ("lora key not loaded"), by ComfyUI's
documented key rules (read from its LoRA loader; no code copied): a key is a module name followed
by one of the tensor suffixes its adapter loaders read, and the module name is one its key map
holds for the model:

* for every weight ``diffusion_model.X.weight`` of the UNet in the original SD layout:
  ``lora_unet_<X with . as _>`` and the generic ``diffusion_model.X``;
* for every diffusers UNet weight ``D.weight`` (mapped to the original layout):
  ``lora_unet_<D with . as _>``, and ``D`` / ``unet.D`` with ``.to_`` as ``.processor.to_`` and
  a trailing ``.to_out.0`` as ``.to_out``;
* for the CLIP text encoder's layer ``b`` and its ``self_attn.{q,k,v,out}_proj`` / ``mlp.fc{1,2}``:
  ``lora_te_text_model_encoder_layers_<b>_<module with . as _>``, the same with ``lora_te1_``,
  and ``text_encoder.text_model.encoder.layers.<b>.<module>``.

For an SD3-family MMDiT ComfyUI maps each diffusers transformer weight ``D.weight`` as
``transformer.D``, ``base_model.model.D``, ``lora_transformer_<D with . as _>`` and
``lycoris_<D with . as _>`` (:func:`key_map_mmdit`).

The original-layout names come from the caller (a single-file checkpoint's keys and diffusers'
own ldm -> diffusers conversion), not from the code that wrote the adapter file.
"""

from __future__ import annotations

SUFFIXES = (
    ".alpha", ".dora_scale", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight",
    "_lora.down.weight", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_A.weight",
    ".lora_B.weight", ".lora.up.weight", ".lora.down.weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".diff", ".diff_b", ".w_norm", ".b_norm",
)
CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def key_map(original_unet_keys, diffusers_to_original: dict[str, str], text_layers: int) -> set[str]:
    names: set[str] = set()
    for k in original_unet_keys:  # "diffusion_model.input_blocks.1.1.proj_in.weight"
        if k.endswith(".weight"):
            inner = k[len("diffusion_model."):-len(".weight")]
            names |= {f"lora_unet_{inner.replace('.', '_')}", k[:-len(".weight")]}
    for d in diffusers_to_original:
        if d.endswith(".weight"):
            m = d[:-len(".weight")]
            names.add(f"lora_unet_{m.replace('.', '_')}")
            for p in ("", "unet."):
                dk = p + m.replace(".to_", ".processor.to_")
                names.add(dk[:-2] if dk.endswith(".to_out.0") else dk)
    for b in range(text_layers):
        for c in CLIP_MODULES:
            c_ = c.replace(".", "_")
            names |= {f"lora_te_text_model_encoder_layers_{b}_{c_}", f"lora_te1_text_model_encoder_layers_{b}_{c_}",
                      f"text_encoder.text_model.encoder.layers.{b}.{c}"}
    return names


def key_map_mmdit(diffusers_keys) -> set[str]:
    names: set[str] = set()
    for d in diffusers_keys:
        if d.endswith(".weight"):
            m = d[:-len(".weight")]
            names |= {f"transformer.{m}", f"base_model.model.{m}", f"lora_transformer_{m.replace('.', '_')}",
                      f"lycoris_{m.replace('.', '_')}"}
    return names


def unmapped(keys, names: set[str]) -> list[str]:
    """The keys ComfyUI would report as not loaded."""
    return sorted(k for k in keys if not any(k.endswith(s) and k[:-len(s)] in names for s in SUFFIXES))
