"""A model card (``README.md``, huggingface_hub's ``ModelCard``) in every artifact dir a run
writes, as the diffusers training examples write one: metadata (library, pipeline tag, base
model, trigger word, tags) and a page with how to load it, the adapter type and rank, the
metrics, a sample grid and the recipe. ``output.push_to_hub`` then uploads the artifact with
huggingface_hub (``create_repo`` + ``upload_folder``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..errors import UserError
from ..lora_io import PEFT_WEIGHTS, read_metadata

CARD = "README.md"
GRID = "samples.png"
LORA_FILES = ("pytorch_lora_weights.safetensors", "lycoris_weights.safetensors")


def artifact_dirs(run_dir: Path) -> list[Path]:
    """The dirs a finished run's artifacts live in: the pipeline, ControlNet, CLIP or autoencoder
    dir, and the run dir itself for adapters (LoRA / LoKr / LoHa files)."""
    dirs = [run_dir / n for n in ("pipeline", "controlnet", "clip", "autoencoder") if (run_dir / n / "config.json").is_file()
            or (run_dir / n / "model_index.json").is_file()]
    if any((run_dir / f).is_file() for f in LORA_FILES) or (run_dir / "transformer" / "adapter_config.json").is_file():
        dirs.insert(0, run_dir)
    return dirs


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last_grid(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    return grids[-1] if grids else None


def _adapter_info(run_dir: Path) -> dict:
    files = [run_dir / n for n in LORA_FILES] + [run_dir / "transformer" / PEFT_WEIGHTS]
    return next((read_metadata(f)["ldm_lab"] for f in files if f.is_file()), {})


def _metrics_lines(metrics: dict) -> list[str]:
    lines = []
    ev = metrics.get("shapes_eval") or {}
    for split in ("seen", "heldout"):
        r = ev.get(split) or (ev if split == "seen" and "color" in ev else None)
        if r and all(k in r for k in ("color", "shape", "position")):
            lines.append(f"- shapes adherence, {split} prompts: colour {100 * r['color']:.1f} %, shape "
                         f"{100 * r['shape']:.1f} %, position {100 * r['position']:.1f} % (n = {r.get('n', '?')})")
    for k in ("fid", "kid", "cmmd", "clip_score"):
        if isinstance(metrics.get("image_metrics", {}).get(k), (int, float)):
            lines.append(f"- {k.upper()}: {metrics['image_metrics'][k]:.4g}")
    if isinstance(metrics.get("wall_s"), (int, float)):
        lines.append(f"- wall time: {metrics['wall_s'] / 60:.1f} min")
    return lines


def _how_to_load(kind: str, info: dict, rel: str) -> str:
    if kind == "pipeline":
        return f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{rel}")'
    if kind == "controlnet":
        return f'from diffusers import ControlNetModel\ncontrolnet = ControlNetModel.from_pretrained("{rel}")'
    if kind == "clip":
        return f'from transformers import CLIPModel\nclip = CLIPModel.from_pretrained("{rel}")'
    if kind == "autoencoder":
        return f'from diffusers import AutoencoderKL\nvae = AutoencoderKL.from_pretrained("{rel}")'
    base = info.get("base_model") or "BASE"
    if info.get("adapter") in ("lokr", "loha"):
        return (f'from diffusers import DiffusionPipeline\nfrom peft import PeftModel\npipe = DiffusionPipeline.from_pretrained("{base}")\n'
                f'PeftModel.from_pretrained(pipe.unet, "{rel}/unet")  # or lycoris_weights.safetensors in A1111 / ComfyUI')
    if (Path(rel) / "transformer" / "adapter_config.json").is_file():
        return (f'from diffusers import DiffusionPipeline\nfrom peft import PeftModel\npipe = DiffusionPipeline.from_pretrained("{base}")\n'
                f'PeftModel.from_pretrained(pipe.transformer, "{rel}/transformer")')
    return f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{rel}")'


def model_card(run_dir: Path, artifact: Path) -> ModelCard:
    """The card of ``artifact`` (one of :func:`artifact_dirs`) from the run dir's files."""
    recipe_text = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").is_file() else ""
    recipe = yaml.safe_load(recipe_text) or {}
    metrics, db = _json(run_dir / "metrics.json"), _json(run_dir / "dreambooth.json")
    kind = "adapter" if artifact == run_dir else artifact.name
    info = _adapter_info(run_dir) if kind == "adapter" else {}
    model = recipe.get("model") or {}
    base = info.get("base_model") or model.get("pipeline")
    trainer = recipe.get("trainer", "text_to_image")
    family = (model.get("denoiser") or {}).get("family", "unet")
    tags = ["ldm-lab", trainer.replace("_", "-"), family]
    if kind == "adapter":
        tags.append(info.get("adapter", "lora"))
    trigger = db.get("instance_prompt") or None
    data = ModelCardData(library_name="transformers" if kind == "clip" else "diffusers",
                         pipeline_tag=None if kind in ("clip", "autoencoder") else "text-to-image",
                         base_model=base or None, instance_prompt=trigger, tags=tags)
    rows = [("trainer", trainer), ("denoiser family", family),
            ("objective", (recipe.get("noise") or {}).get("objective", "ddpm")),
            ("steps", (recipe.get("train") or {}).get("max_steps")), ("batch size", (recipe.get("train") or {}).get("batch_size")),
            ("learning rate", (recipe.get("train") or {}).get("learning_rate"))]
    if kind == "adapter":
        rows += [("adapter", info.get("adapter", "lora")), ("rank", info.get("rank")), ("alpha", info.get("alpha")),
                 ("targets", ", ".join(info.get("targets") or [])), ("text encoder adapters", info.get("text_encoder"))]
    if db.get("identifier"):
        rows += [("identifier", db["identifier"]), ("instance prompt", trigger)]
    table = "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")])
    grid = _last_grid(run_dir)
    names = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}
    label = {"adapter": f"{names.get(info.get('adapter', 'lora'), 'LoRA')} adapter", "pipeline": "diffusers pipeline",
             "controlnet": "ControlNet", "clip": "CLIP model"}.get(kind, kind)
    parts = [f"# {run_dir.name}", "", f"This {label} was trained with ldm-lab"
             + (f" from `{base}`" if base else "") + (f"; trigger: `{trigger}`" if trigger else "") + ".", "", table, "",
             "## How to load", "", "```python", _how_to_load(kind, info, str(artifact)), "```", ""]
    lines = _metrics_lines(metrics)
    if lines:
        parts += ["## Metrics", "", *lines, ""]
    if grid is not None:
        parts += ["## Samples", "", f"![samples]({GRID})", "", f"The last validation grid ({grid.stem}).", ""]
    if recipe_text:
        parts += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def write_model_cards(run_dir: Path) -> list[Path]:
    """A card (and the last sample grid) in every artifact dir of the finished run."""
    written = []
    for d in artifact_dirs(run_dir):
        card = model_card(run_dir, d)
        grid = _last_grid(run_dir)
        if grid is not None:
            shutil.copyfile(grid, d / GRID)
        card.save(str(d / CARD))
        written.append(d / CARD)
    return written


def push_to_hub(run_dir: Path, repo_id: str, private: bool) -> str:
    """Upload the run's main artifact dir (with its card) to ``repo_id``; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    dirs = artifact_dirs(run_dir)
    if not dirs:
        raise UserError(f"{run_dir} holds no artifact to push; train it to the end first.")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        ignore = ["checkpoints/*", "eval*/*", "samples/*", ".lock", "*.tmp*"] if dirs[0] == run_dir else None
        api.upload_folder(folder_path=str(dirs[0]), repo_id=repo_id, ignore_patterns=ignore,
                          commit_message=f"ldm-lab: {run_dir.name}")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"could not push {dirs[0]} to the Hub repo {repo_id} ({str(e).splitlines()[0][:160]}); "
                        f"the run is complete on disk: log in (huggingface-cli login) and push with "
                        f"huggingface-cli upload {repo_id} {dirs[0]}.") from None
    return str(url)
