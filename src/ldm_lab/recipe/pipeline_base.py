"""``model.pipeline``: a diffusers pipeline (dir or hub id) a recipe starts from.

The components a recipe does not give come from the pipeline's subfolders, by the pipeline's family
(its ``model_index.json``): Stable Diffusion (text_encoder, unet), PixArt (a T5 or CLIP text_encoder,
transformer), SD3 (text_encoder, text_encoder_2 with projection, text_encoder_3 when it has one,
transformer); and the noise keys the recipe does not set come from its scheduler (DDPM betas and
prediction type, or flow matching with its shift), at the backbone's native resolution.

A local dir is read when the recipe loads; a hub id is assumed to be Stable Diffusion then (no
network for ``recipe check``) and corrected when the run starts (``pipeline_defaults``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .schema import AutoencoderSpec, DenoiserSpec, Recipe, TextEncoderSpec, UNetSpec

FAMILY_OF_PIPELINE = {"StableDiffusionPipeline": "unet", "PixArtAlphaPipeline": "pixart",
                      "PixArtSigmaPipeline": "pixart", "StableDiffusion3Pipeline": "sd3"}


def looks_local(ref: str) -> bool:
    """True when ``ref`` names a local path rather than a hub id like ``org/name``."""
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).exists():
        return True
    return "/" in ref and Path(ref.split("/")[0]).is_dir()  # "data/x" where data/ is here


def _sd_parts(p: str) -> tuple[TextEncoderSpec, UNetSpec]:
    return TextEncoderSpec(kind="clip", pretrained=p, subfolder="text_encoder"), UNetSpec(pretrained=p, subfolder="unet")


def _fill(recipe: Recipe, index: dict | None) -> None:
    m, p = recipe.model, recipe.model.pipeline
    family = FAMILY_OF_PIPELINE.get((index or {}).get("_class_name"), "unet")
    if m.autoencoder is None:
        m.autoencoder = AutoencoderSpec(pretrained=p, subfolder="vae")
    no_text = m.text_encoder is None and m.text_encoders is None
    if family == "unet":
        te, unet = _sd_parts(p)
        if no_text:
            m.text_encoder = te
        if m.unet is None and m.denoiser is None:
            m.unet = unet
        return
    if no_text and family == "pixart":
        kind = "t5" if (index.get("text_encoder") or [None, ""])[1] == "T5EncoderModel" else "clip"
        m.text_encoder = TextEncoderSpec(kind=kind, pretrained=p, subfolder="text_encoder")
    if no_text and family == "sd3":
        encs = [TextEncoderSpec(kind="clip", pretrained=p, subfolder=s, projection=True, hidden_layer=-2)
                for s in ("text_encoder", "text_encoder_2")]
        if (index.get("text_encoder_3") or [None])[0] is not None:
            encs.append(TextEncoderSpec(kind="t5", pretrained=p, subfolder="text_encoder_3"))
        m.text_encoders = encs
    if m.unet is None and m.denoiser is None:
        m.denoiser = DenoiserSpec(family=family, pretrained=p, subfolder="transformer")


def _local_index(p: str) -> dict | None:
    f = Path(p).expanduser() / "model_index.json"
    return json.loads(f.read_text()) if looks_local(p) and f.exists() else None


def fill_from_pipeline(recipe: Recipe) -> Recipe:
    """``model.pipeline``: components the recipe does not give come from the pipeline's subfolders."""
    if recipe.model.pipeline is not None:
        _fill(recipe, _local_index(recipe.model.pipeline))
    return recipe


def pipeline_json(pipeline: str, subfolder: str, name: str) -> dict:
    p = Path(pipeline) / subfolder / name
    if not p.exists():
        if looks_local(pipeline):
            where = f"{subfolder}/{name}" if subfolder else name
            raise UserError(f"model.pipeline '{pipeline}' has no {where}; "
                            "give a diffusers pipeline dir (the one save_pretrained writes).")
        from huggingface_hub import hf_hub_download  # here: only a hub pipeline needs it (startup time)

        try:
            p = Path(hf_hub_download(pipeline, name, subfolder=subfolder or None))
        except Exception as e:  # noqa: BLE001 - network, auth or missing file: one sentence for all
            raise UserError(f"cannot read {subfolder}/{name} of model.pipeline '{pipeline}' "
                            f"({type(e).__name__}); check the hub id and your connection.") from None
    return json.loads(p.read_text())


DDPM_FROM_SCHEDULER = {"num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule",
                       "beta_start": "beta_start", "beta_end": "beta_end", "prediction_type": "prediction_type",
                       "zero_terminal_snr": "rescale_betas_zero_snr"}
FLOW_FROM_SCHEDULER = {"num_train_timesteps": "num_train_timesteps", "shift": "shift",
                       "dynamic_shift": "use_dynamic_shifting", "base_shift": "base_shift", "max_shift": "max_shift",
                       "base_image_seq_len": "base_image_seq_len", "max_image_seq_len": "max_image_seq_len"}


def pipeline_defaults(recipe: Recipe) -> Recipe:
    """Keys the recipe leaves unset take ``model.pipeline``'s values, so a fine-tune trains with
    the components, the objective and noise schedule its base was trained with, at its native
    resolution.

    Reads the pipeline's small config files (from the hub for a hub id); called when a run
    starts and by ``recipe show``, not by ``recipe check``.
    """
    m = recipe.model
    if m.pipeline is None:
        return recipe
    index = pipeline_json(m.pipeline, "", "model_index.json")
    family = FAMILY_OF_PIPELINE.get(index.get("_class_name"), "unet")
    te, unet = _sd_parts(m.pipeline)
    if family != "unet" and m.text_encoder == te and m.unet == unet:  # a hub id, filled as SD at load
        m.text_encoder, m.unet = None, None
        _fill(recipe, index)
    cfg = pipeline_json(m.pipeline, "scheduler", "scheduler_config.json")
    n = recipe.noise
    given = set(n.model_fields_set)
    flow = cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
    if "objective" not in given and flow:
        try:
            n.objective = "flow"
        except ValueError:  # pydantic's ValidationError: DDPM keys given for a flow-matching base
            raise UserError(f"model.pipeline '{m.pipeline}' was trained with flow matching, but the recipe sets "
                            "DDPM noise keys; remove them or set noise.objective: ddpm explicitly.") from None
    mapping = FLOW_FROM_SCHEDULER if n.objective == "flow" and flow else DDPM_FROM_SCHEDULER if not flow else {}
    for ours, theirs in mapping.items():
        if ours not in given and cfg.get(theirs) is not None:
            setattr(n, ours, cfg[theirs])
    if "resolution" not in recipe.data.model_fields_set:
        net = pipeline_json(m.pipeline, "unet" if family == "unet" else "transformer", "config.json")
        vae = pipeline_json(m.pipeline, "vae", "config.json")
        recipe.data.resolution = int(net["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    return recipe
