"""LoRA fine-tuning: PEFT adapters on a frozen text-to-image base, trained on the one loop.

* Adapters on the UNet (target presets or an explicit module list), optionally on the text
  encoder; rank, alpha, dropout, init and DoRA from ``plugin:`` (see ``recipe/plugins.py``).
* Only adapter parameters are trainable, so the loop's optimiser, gradient clipping and EMA
  see exactly them.
* Checkpoints hold the adapter weights only (accelerate save/load hooks), and ``resume``
  loads them back before training continues.
* The artifact is ``pytorch_lora_weights.safetensors`` in the diffusers layout, written by
  diffusers' ``save_lora_weights`` with each adapter's PEFT config in the file's metadata, so
  ``pipe.load_lora_weights(run_dir)`` loads it; ``ldm-lab export lora`` converts it to the
  kohya layout A1111 / ComfyUI load. A family whose pipeline has no LoRA loader (PixArt) gets a
  PEFT adapter dir, ``RUN/transformer``, which ``PeftModel.from_pretrained(pipe.transformer, ...)``
  loads (PixArt's own documented way).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import diffusers
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..lora_io import PEFT_WEIGHTS, add_metadata, write_peft_adapter
from ..recipe.plugins import LoRAOptions
from ..sampling import generate
from .base import eval_mode
from .lycoris_artifact import write_lycoris_artifact
from .registry import register
from .text_to_image import TextToImageTrainer, evaluate_shapes

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CKPT_NAME = "lora_adapters.safetensors"


def adapter_config(o: LoRAOptions, rank: int, alpha: float | None, targets: list[str]):
    """The PEFT config of the adapter ``o`` asks for: LoRA / DoRA, LoKr or LoHa."""
    alpha = alpha if alpha is not None else rank
    if o.kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=o.factor,
                          decompose_both=o.decompose_both, use_effective_conv2d=o.conv_tucker,
                          rank_dropout=o.rank_dropout, module_dropout=o.module_dropout)
    if o.kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=o.conv_tucker,
                          rank_dropout=o.rank_dropout, module_dropout=o.module_dropout)
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=o.dropout,
                      init_lora_weights=True if o.init == "default" else o.init, use_dora=o.kind == "dora")


def add_adapter(module, config: LoraConfig) -> None:
    """PEFT adapters named "default" on ``module``: through its PEFT integration where it has one
    (diffusers / transformers models), else PEFT's own injection with the config kept where the
    integration keeps it (``peft_config``), so the state-dict helpers read both alike."""
    if hasattr(module, "add_adapter"):
        module.add_adapter(config)
        return
    inject_adapter_in_model(config, module)
    module.peft_config = {"default": config}


def set_adapters_enabled(module, enabled: bool) -> None:
    """Switch every PEFT layer of ``module`` on or off (what ``enable_adapters`` / ``disable_adapters``
    of the integrations do, for modules with or without one)."""
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def _adapter_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}


@register
class LoRATrainer(TextToImageTrainer):
    name = "lora"
    families = ("unet", "pixart", "sd3")

    def setup(self) -> None:
        self.opts = LoRAOptions.model_validate(self.recipe.plugin)
        self.refuse_single_file("a LoRA run writes adapters", adapters=True)
        self.build_models()
        self.build_data()  # caches come from the pure base (PiSSA/OLoRA inits change base weights)
        self.add_adapters()

    def add_adapters(self) -> None:
        """Freeze the UNet and add the adapters (and the text encoder's, when trained)."""
        o = self.opts
        self.unet.requires_grad_(False)
        self.unet_targets = o.unet_targets(self.denoiser.family)
        try:
            add_adapter(self.unet, adapter_config(o, o.rank, o.alpha, self.unet_targets))
        except ValueError as e:
            raise UserError(f"plugin.targets {self.unet_targets} do not match modules of this {self.denoiser.family} backbone "
                              f"({str(e).splitlines()[0][:160]}); use a preset (attn, attn_ff, attn_ff_conv) "
                              "or module names such as to_q, to_k, to_v, to_out.0.") from None
        # PiSSA / OLoRA move the adapters' initial product out of the base weights (W_res = W - s B0 A0);
        # the initial adapters are kept so the artifact can be written for the untouched base
        self.initial_adapters: dict[str, dict[str, torch.Tensor]] = {}
        if o.init in ("pissa", "olora"):
            self.initial_adapters["unet"] = {k: v.clone() for k, v in _adapter_state(self.unet).items()}
        self.te_model = None
        if o.train_text_encoder and self.denoiser.family != "unet":
            raise UserError(f"plugin.train_text_encoder is for the unet family so far; unset it for {self.denoiser.family}.")
        if o.train_text_encoder:
            te = self.text_encoder.model
            te.requires_grad_(False)
            rank = o.text_encoder_rank or o.rank
            add_adapter(te, adapter_config(o, rank, o.text_encoder_alpha or rank, o.text_encoder_targets))
            if o.init in ("pissa", "olora"):
                self.initial_adapters["text_encoder"] = {k: v.clone() for k, v in _adapter_state(te).items()}
            self.use_trained_text_encoder(te)

    def use_trained_text_encoder(self, te) -> None:
        """Condition through ``te`` (trained) instead of cached embeddings: each distinct caption
        is tokenized once here, not every step."""
        if self.text_encoder.kind != "clip":
            raise UserError("plugin.train_text_encoder needs a CLIP text encoder (model.text_encoder.kind clip).")
        self.te_model = te
        self.null_ids = self.text_encoder.tokenize([""])
        if self.cached is not None:
            self.caption_ids = self.text_encoder.tokenize(self.cached.captions)

    def trainable_modules(self):
        mods = {"unet": self.unet}
        if self.te_model is not None:
            mods["te_model"] = self.te_model
        return mods

    def param_groups(self):
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad]}]
        if self.te_model is not None:
            lr = self.opts.text_encoder_lr or self.recipe.train.learning_rate
            groups.append({"params": [p for p in self.te_model.parameters() if p.requires_grad], "lr": lr})
        return groups

    def ema_modules(self):
        return [self.unet] + ([self.te_model] if self.te_model is not None else [])  # their adapters

    # -- conditioning through a trained text encoder ------------------------------------
    def latents_and_condition(self, batch):
        if self.te_model is None:
            return super().latents_and_condition(batch)
        z = self.posterior_sample(batch)
        ids = self.caption_ids[self.caption_choice(batch)] if "mean" in batch else self.token_choice(batch)
        ids = ids.to(self.accelerator.device)
        p = self.recipe.data.caption_dropout
        if p > 0:  # dropped captions become the empty prompt, encoded by the adapted encoder
            drop = self.rng.rand(ids.shape[0]) < p
            ids = torch.where(drop[:, None].to(ids.device), self.null_ids.to(ids.device), ids)
        self.text_encoder.model = self.te_model  # the prepared (possibly wrapped) module
        with self.prof.phase("text_encoder"):
            cond = self.text_encoder.encode_ids(ids)
        return z, cond

    def sample(self, prompts, seeds, sampler, steps, guidance, rescale: float = 0.0):
        if self.te_model is None:
            return super().sample(prompts, seeds, sampler, steps, guidance, rescale)
        unet, te = self.unwrap(self.unet), self.unwrap(self.te_model)
        with eval_mode(unet, te):
            pipe = self.pipeline(sampler)
            pipe.text_encoder = te
            extra = {"guidance_rescale": rescale} if rescale else {}
            # the pipeline encodes through the adapters
            return generate(pipe, prompts, seeds, steps, guidance, **extra)

    # -- checkpoints: adapters only ------------------------------------------------------
    def checkpoint_hooks(self):
        acc = self.accelerator

        def owner(model):
            m = acc.unwrap_model(model)
            if m is acc.unwrap_model(self.unet):
                return "unet"
            if self.te_model is not None and m is acc.unwrap_model(self.te_model):
                return "text_encoder"
            return None

        def save_hook(models, weights, output_dir):
            state = {}
            for i in reversed(range(len(models))):
                name = owner(models[i])
                if name is None:
                    continue
                state.update({f"{name}.{k}": v for k, v in _adapter_state(acc.unwrap_model(models[i])).items()})
                if weights:
                    weights.pop(i)
            if acc.is_main_process:
                save_file(state, str(Path(output_dir) / CKPT_NAME))

        def load_hook(models, input_dir):
            state = load_file(str(Path(input_dir) / CKPT_NAME))
            for i in reversed(range(len(models))):
                name = owner(models[i])
                if name is None:
                    continue
                sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
                model = acc.unwrap_model(models.pop(i))
                # adapters this run has and the checkpoint lacks would stay at their initial values
                # (e.g. train_text_encoder switched on at resume): incompatible, not resumed silently
                absent = sorted(set(_adapter_state(model)) - set(sub))
                if absent:
                    raise RuntimeError(f"Missing keys: the checkpoint holds no {name} adapter weights for "
                                       f"{len(absent)} of this run's ({absent[0]}, ...)")
                result = set_peft_model_state_dict(model, sub)
                extra = [k for k in getattr(result, "unexpected_keys", []) or [] if re.search(r"lora|lokr|hada", k)]
                if extra:
                    raise RuntimeError(f"checkpoint adapter keys not in the model: {extra[:3]}")

        return save_hook, load_hook

    # -- artifact ------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        unet, comp = self.unwrap(self.unet), self.denoiser.component
        if self.opts.kind in ("lokr", "loha"):
            comps = {comp: (_adapter_state(unet), _peft_config_dict(unet))}
            if self.te_model is not None:
                te = self.unwrap(self.te_model)
                comps["text_encoder"] = (_adapter_state(te), _peft_config_dict(te))
            unet_config = dict(unet.config) if comp == "unet" else None
            self.export(write_lycoris_artifact(comps, self.opts.kind, self.lora_metadata(), out_dir, unet_config))
            return
        layers, cfg = self.plain_lora(unet, "unet")
        pipeline_cls = getattr(diffusers, self.denoiser.pipeline_class)
        if not hasattr(pipeline_cls, "save_lora_weights"):  # PixArt: a PEFT adapter dir for its transformer
            meta = self.lora_metadata()
            cfg["base_model_name_or_path"] = meta["base_model"]
            d = write_peft_adapter(layers, cfg, out_dir / comp)
            add_metadata(d / PEFT_WEIGHTS, meta)
            self.export(d)
            return
        if comp == "unet":
            layers = convert_state_dict_to_diffusers(layers)
        kw = {f"{comp}_lora_layers": layers, f"{comp}_lora_adapter_metadata": cfg}
        if self.te_model is not None:
            layers, cfg = self.plain_lora(self.unwrap(self.te_model), "text_encoder")
            kw.update(text_encoder_lora_layers=convert_state_dict_to_diffusers(layers),
                      text_encoder_lora_adapter_metadata=cfg)
        # the stock pipeline of the backbone's family writes the file its load_lora_weights reads
        pipeline_cls.save_lora_weights(out_dir, safe_serialization=True, **kw)
        add_metadata(out_dir / WEIGHT_NAME, self.lora_metadata())
        self.export(out_dir / WEIGHT_NAME)

    def plain_lora(self, module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Adapter weights and PEFT config of ``module`` as a LoRA for the *original* base.

        For PiSSA / OLoRA the trained base is W - s B0 A0, so the LoRA for W is the rank-2r
        pair A' = [A; A0], B' = [B, -B0] with alpha doubled (same scale s = alpha / r), which is
        PEFT's own conversion (``path_initial_model_for_weight_conversion``)."""
        state, cfg = _adapter_state(module), _peft_config_dict(module)
        init = self.initial_adapters.get(name)
        if not init:
            return state, cfg
        out = {}
        for k, v in state.items():
            if "lora_A" in k:
                out[k] = torch.cat([v, init[k]], dim=0)
            elif "lora_B" in k:
                out[k] = torch.cat([v, -init[k]], dim=1)
            else:
                out[k] = v
        cfg.update(r=2 * cfg["r"], lora_alpha=2 * cfg["lora_alpha"], init_lora_weights=True,
                   rank_pattern={}, alpha_pattern={})
        return out, cfg

    def lora_metadata(self) -> dict:
        """Our description of the adapters, stored in the file's ``ldm_lab`` metadata entry."""
        o, unet = self.opts, self.unwrap(self.unet)
        return {
            "base_model": self.recipe.model.pipeline or (self.recipe.model.denoiser_spec().pretrained or ""),
            "rank": o.rank, "alpha": o.alpha if o.alpha is not None else o.rank, "targets": self.unet_targets,
            "adapter": o.kind, "dora": o.kind == "dora", "text_encoder": o.train_text_encoder,
            "text_encoder_rank": (o.text_encoder_rank or o.rank) if o.train_text_encoder else None,
            "text_encoder_alpha": (o.text_encoder_alpha or o.text_encoder_rank or o.rank) if o.train_text_encoder else None,
            "trainable_parameters": sum(p.numel() for g in self.param_groups() for p in g["params"]),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
        }

    def evaluate(self) -> dict:
        """The shapes evaluation with the adapters on, and again with them off (the base), on the
        same prompts and seeds: ``by_color`` / ``by_shape`` show the taught concept and the old ones."""
        e = self.recipe.eval
        if not e.shapes or not self.accelerator.is_main_process:
            return {}

        after = evaluate_shapes(self, self.run_dir / "eval", e)
        mods = {"unet": self.unwrap(self.unet)}
        if self.te_model is not None:
            mods["text_encoder"] = self.unwrap(self.te_model)
        if self.initial_adapters:  # PiSSA / OLoRA: the base is W_res + the initial adapters, not W_res

            trained = {n: {k: v.clone() for k, v in _adapter_state(m).items()} for n, m in mods.items()}
            for n, m in mods.items():
                set_peft_model_state_dict(m, self.initial_adapters[n])
            try:
                before = evaluate_shapes(self, self.run_dir / "eval-base", e)
            finally:
                for n, m in mods.items():
                    set_peft_model_state_dict(m, trained[n])
        else:
            for m in mods.values():
                set_adapters_enabled(m, False)
            try:
                before = evaluate_shapes(self, self.run_dir / "eval-base", e)
            finally:
                for m in mods.values():
                    set_adapters_enabled(m, True)
        return {"shapes_eval": after["shapes_eval"], "shapes_eval_base": before["shapes_eval"]}


def _peft_config_dict(module) -> dict:
    cfg = module.peft_config["default"].to_dict()
    return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

