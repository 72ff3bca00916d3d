"""LoRA files in and out: diffusers, PEFT and kohya (A1111 / ComfyUI) layouts, and merging.

Reading goes through diffusers' own ``lora_state_dict`` (which already understands kohya and
older diffusers layouts) and its key converters; writing kohya uses diffusers'
``convert_state_dict_to_kohya`` with the real alpha of every module (that helper writes
``alpha = rank``, which is wrong for any adapter trained with another alpha).

Every file we write carries our own description of the adapters (base model, rank, alpha,
targets) as JSON under the ``ldm_lab`` key of its safetensors metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import LoraConfig
from safetensors import safe_open

from .errors import UserError
from .safetensors_file import save_file
from .sampling import load_pipeline

COMPONENTS = ("unet", "text_encoder")
META_KEY = "ldm_lab"  # our own safetensors metadata entry (base model, rank, alpha, targets)
PEFT_WEIGHTS = "adapter_model.safetensors"  # a PEFT adapter dir's weights (PeftModel.save_pretrained)


@dataclass
class LoRAWeights:
    """Adapter tensors in PEFT naming with a component prefix (``unet.<module>.lora_A.weight``),
    the alpha of every adapted module (``unet.<module>``) and the file's metadata."""

    tensors: dict[str, torch.Tensor]
    alphas: dict[str, float]
    meta: dict = field(default_factory=dict)

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors if ".lora_" in k})

    def rank(self, module: str) -> int:
        return int(self.tensors[f"{module}.lora_A.weight"].shape[0])

    def component(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of one component without its prefix (what peft's state-dict helpers take)."""
        return {k[len(name) + 1:]: v for k, v in self.tensors.items() if k.startswith(name + ".")}


def _to_peft(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any diffusers-readable naming (new, old, kohya after diffusers' conversion) -> PEFT naming."""
    out: dict[str, torch.Tensor] = {}
    unet = {k.replace(".processor.", "."): v for k, v in sd.items() if not k.startswith("text_encoder")}
    te = {k: v for k, v in sd.items() if k.startswith("text_encoder")}
    out.update(convert_unet_state_dict_to_peft(unet))
    if te:
        done = all(".lora_A." in k or ".lora_B." in k or "lora_magnitude_vector" in k for k in te)
        out.update(te if done else convert_state_dict_to_peft(te))
    return out


def _module_of_alpha(key: str) -> str:
    k = key[: -len(".alpha")]
    return next(iter(_to_peft({k: torch.zeros(1)}))).rsplit(".lora_", 1)[0]


def read_lora(path: str | Path) -> LoRAWeights:
    """Any LoRA file diffusers can load (ours, a diffusers training script's, kohya's)."""
    path = Path(path)
    src = path.parent if path.is_file() else path
    kw = {"weight_name": path.name} if path.is_file() else {}
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(src), return_lora_metadata=True, **kw)
    tensors = _to_peft(sd)
    meta_by_comp: dict[str, dict] = {}
    for k, v in (meta or {}).items():  # diffusers flattens it: {"unet.r": 4, "unet.lora_alpha": 2, ...}
        comp, _, key = k.partition(".")
        meta_by_comp.setdefault(comp, {})[key] = v
    meta = meta_by_comp
    out_alphas: dict[str, float] = {}
    for k, a in (alphas or {}).items():
        out_alphas[_module_of_alpha(k)] = float(a)
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    ours = read_metadata(path if path.is_file() else path / "pytorch_lora_weights.safetensors") \
        if (path.is_file() or (path / "pytorch_lora_weights.safetensors").exists()) else {"ldm_lab": {}}
    for m in mods:
        if m in out_alphas:
            continue
        comp = m.split(".", 1)[0]
        cfg = meta.get(comp) or {}
        rank = int(tensors[f"{m}.lora_A.weight"].shape[0])
        out_alphas[m] = float(_alpha_from_config(cfg, m[len(comp) + 1:], rank))
    return LoRAWeights(tensors, out_alphas, {"adapters": meta, "ldm_lab": ours.get("ldm_lab", {})})


def _alpha_from_config(cfg: dict, module: str, rank: int) -> float:
    """Alpha of ``module`` from a PEFT LoraConfig dict (alpha_pattern first), else the rank."""
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pat)}$", module) or re.fullmatch(pat, module):
            return a
    return cfg.get("lora_alpha", rank) if cfg else rank


def write_diffusers(w: LoRAWeights, out: Path) -> Path:
    """``pytorch_lora_weights.safetensors`` (diffusers layout) with PEFT configs in its metadata."""
    out = Path(out)
    directory, name = (out.parent, out.name) if out.suffix == ".safetensors" else (out, "pytorch_lora_weights.safetensors")
    kw = {}
    for comp in COMPONENTS:
        sd = w.component(comp)
        if sd:
            kw[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(sd)
            kw[f"{comp}_lora_adapter_metadata"] = peft_config(w, comp)
    StableDiffusionPipeline.save_lora_weights(str(directory), weight_name=name, safe_serialization=True, **kw)
    if w.meta.get("ldm_lab"):
        add_metadata(directory / name, w.meta["ldm_lab"])
    return directory / name


def peft_config(w: LoRAWeights, comp: str) -> dict:
    """A PEFT LoraConfig dict for one component: the common rank/alpha plus per-module patterns."""
    mods = [m[len(comp) + 1:] for m in w.modules() if m.startswith(comp + ".")]
    ranks = {m: w.rank(f"{comp}.{m}") for m in mods}
    alphas = {m: w.alphas[f"{comp}.{m}"] for m in mods}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    a = max(set(alphas.values()), key=list(alphas.values()).count)
    use_dora = any(k.startswith(comp + ".") and "lora_magnitude_vector" in k for k in w.tensors)
    cfg = LoraConfig(r=r, lora_alpha=a, target_modules=mods, use_dora=use_dora,
                     rank_pattern={m: v for m, v in ranks.items() if v != r},
                     alpha_pattern={m: v for m, v in alphas.items() if v != a})
    return json.loads(json.dumps(cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def write_kohya(w: LoRAWeights, out: Path) -> Path:
    """One safetensors file in kohya's layout (``lora_unet_*`` / ``lora_te1_*`` keys with
    ``lora_down`` / ``lora_up`` / ``alpha``), as A1111, ComfyUI and kohya's scripts load it."""
    if any("lora_magnitude_vector" in k for k in w.tensors):
        raise ValueError("DoRA adapters have no kohya layout that A1111/ComfyUI read the same way; "
                         "export them with --format diffusers or peft.")
    kohya = convert_state_dict_to_kohya(dict(w.tensors))
    # the helper writes alpha = rank; put each module's real alpha
    kohya_of = {}
    for m in w.modules():
        one = convert_state_dict_to_kohya({f"{m}.lora_A.weight": w.tensors[f"{m}.lora_A.weight"]})
        kohya_of[next(k for k in one if k.endswith(".alpha"))] = m
    for k in list(kohya):
        if k.endswith(".alpha"):
            kohya[k] = torch.tensor(float(w.alphas[kohya_of[k]]), dtype=torch.float32)
    # CLIP's modules under its classic text_model. root, as A1111 / ComfyUI / kohya name them
    # (transformers 5 flattened it away, so the converter leaves it out)
    kohya = {re.sub(r"^(lora_te\d?)_(?!text_model_)", r"\1_text_model_", k): v for k, v in kohya.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = w.modules()[0] if w.modules() else None
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(w.rank(first)) if first else "0",
            "ss_network_alpha": str(w.alphas[first]) if first else "0"}
    if w.meta.get("ldm_lab"):
        meta["ldm_lab"] = json.dumps(w.meta["ldm_lab"])
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata=meta)
    return out


def write_peft(w: LoRAWeights, out: Path) -> Path:
    """A PEFT adapter dir per component (``OUT/unet``, ``OUT/text_encoder``): adapter_config.json
    and adapter_model.safetensors, as ``PeftModel.save_pretrained`` writes them."""
    out = Path(out)
    for comp in COMPONENTS:
        sd = w.component(comp)
        if not sd:
            continue
        cfg = peft_config(w, comp)
        if w.meta.get("ldm_lab", {}).get("base_model"):
            cfg["base_model_name_or_path"] = w.meta["ldm_lab"]["base_model"]
        write_peft_adapter(sd, cfg, out / comp)
    return out


def write_peft_adapter(sd: dict[str, torch.Tensor], cfg: dict, d: Path) -> Path:
    """One PEFT adapter dir, as ``PeftModel.save_pretrained`` writes it (``PeftModel.from_pretrained``
    and ``load_adapter`` read it): the config as JSON and the weights under the wrapper's prefix."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in sd.items()}, str(d / PEFT_WEIGHTS),
              metadata={"format": "pt"})
    return d


def peft_adapter_dir(path: str | Path, component: str | None = None) -> Path | None:
    """The PEFT adapter dir ``path`` names: itself, or its ``transformer`` / ``unet`` subdir (a
    LoRA run on a backbone whose pipeline has no ``load_lora_weights``, such as PixArt, or a LoKr /
    LoHa run); with ``component``, only that subdir. None when there is none."""
    p = Path(path)
    for d in ((p / component,) if component else (p, p / "transformer", p / "unet")):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def apply_loras(pipe, loras: list[tuple[str, float]]) -> list:
    """Load each LoRA as its own adapter and activate them all with their scales. Diffusers files
    go through the pipeline's ``load_lora_weights`` (SD, SD3); PEFT adapter dirs (a PixArt LoRA
    run's, a LoKr / LoHa run's, with its text encoder's beside it) are read with ``PeftModel``
    onto the denoiser (and text encoder), and those PeftModels are returned (empty otherwise)."""
    dirs = [peft_adapter_dir(p) for p, _ in loras]
    if loras and (all(dirs) or not hasattr(pipe, "load_lora_weights")):
        net = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        models = [_apply_peft_adapters(net, loras)]
        te = [(str(Path(d).parent), s) for d, (_, s) in zip(dirs, loras)
              if d is not None and peft_adapter_dir(Path(d).parent, "text_encoder")]
        if te:
            models.append(_apply_peft_adapters(pipe.text_encoder, te, "text_encoder"))
        return models
    if any(dirs):
        raise UserError("these adapters mix diffusers LoRA files with PEFT adapter dirs (LoKr / LoHa runs); "
                        "give one kind per command, or export merge them one kind at a time.")
    names = []
    for i, (path, _) in enumerate(loras):
        p = Path(path)
        kw = {"weight_name": p.name} if p.is_file() else {}
        name = f"lora{i}"
        pipe.load_lora_weights(str(p.parent if p.is_file() else p), adapter_name=name, **kw)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return []


def _apply_peft_adapters(net, loras: list[tuple[str, float]], component: str | None = None):
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, names = None, []
    for i, (path, _) in enumerate(loras):
        d = peft_adapter_dir(path, component)
        if d is None:
            raise UserError(f"{path} holds no PEFT adapter (adapter_config.json); this pipeline reads LoRAs as "
                            "PEFT adapter dirs, e.g. a LoRA run dir on this family.")
        name = f"lora{i}"
        if model is None:  # injects into net in place; the pipeline keeps using net
            model = PeftModel.from_pretrained(net, str(d), adapter_name=name)
        else:
            model.load_adapter(str(d), adapter_name=name)
        names.append(name)
    for m in net.modules():
        if isinstance(m, BaseTunerLayer) and hasattr(m, "scaling"):
            for name, (_, scale) in zip(names, loras):
                if name in m.scaling:
                    m.set_scale(name, scale)
    model.base_model.set_adapter(names)
    return model


def merge(base: str, loras: list[tuple[str, float]], out: Path) -> Path:
    """A pipeline with the LoRAs fused into its weights (no adapters left), saved with save_pretrained."""
    pipe = load_pipeline(base)
    if peft_models := apply_loras(pipe, loras):
        for m in peft_models:
            m.merge_and_unload()  # merged into the pipeline's denoiser / text encoder in place
        pipe.save_pretrained(str(out))
        return Path(out)
    pipe.fuse_lora(adapter_names=[f"lora{i}" for i in range(len(loras))], lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(out))
    return Path(out)


def add_metadata(path: Path, info: dict) -> None:
    """Add our description (``ldm_lab`` key, JSON) to a safetensors file's metadata, keeping the rest."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta[META_KEY] = json.dumps(info)
    meta.setdefault("format", "pt")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict:
    """Our description and diffusers' adapter metadata of a LoRA file (empty dicts when absent)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    flat = json.loads(meta.get(LORA_ADAPTER_METADATA_KEY, "{}"))  # {"unet.r": 4, "unet.lora_alpha": ...}
    adapters: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, key = k.partition(".")
        adapters.setdefault(comp, {})[key] = v
    return {"ldm_lab": json.loads(meta.get(META_KEY, "{}")), "adapters": adapters}
