"""``ldm-lab sample``: images from a run or a pipeline, with LoRAs and ControlNets applied, written
with samples.jsonl (prompt and seed of every image) and grid.png."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..lora_io import apply_loras
from ..sampling import default_steps, generate, grid, load_pipeline, use_sampler
from .adapters import backbone_of, controlnet_args, controlnet_pipeline, lora_args


def sample(args) -> int:
    prompts = args.prompt or [ln.strip() for ln in read_lines(args.prompts_file) if ln.strip()]
    out = sample_cli(args.source, prompts, n=args.n, steps=args.steps, guidance=args.guidance,
                     sampler=args.sampler, seed=args.seed, out=args.out, loras=lora_args(args.lora),
                     controlnets=controlnet_args(args.controlnet, args.control_image), guess_mode=args.guess_mode)
    print(f"wrote {len(prompts) * args.n} images and grid.png to {out}")
    return 0


def read_lines(path: str) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"--prompts-file '{path}' does not exist; give a text file with one prompt per line.")
    return Path(path).read_text().splitlines()


def sample_cli(source: str, prompts: list[str], n: int = 1, steps: int | None = None, guidance: float = 4.0,
               sampler: str = "dpm++", seed: int = 0, out: str | None = None,
               loras: list[tuple[str, float]] | None = None, controlnets: list[tuple[str, float, str]] | None = None,
               guess_mode: bool = False) -> Path:
    """``n`` images per prompt (seeds ``seed``, ``seed + 1``, ...) into ``out`` (default
    SOURCE/samples-cli for a dir, else ./samples), with samples.jsonl and grid.png."""
    if not prompts:
        raise UserError("no prompts given; pass --prompt TEXT or a non-empty --prompts-file.")
    try:
        pipe = load_pipeline(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a pipeline from '{source}' ({str(e).splitlines()[0]}); "
                        "give a run dir, a diffusers pipeline dir or a hub id.") from None
    use_sampler(pipe, sampler)
    if loras:
        try:
            apply_loras(pipe, loras)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"cannot apply LoRA to '{source}' ({str(e).splitlines()[0][:200]}); "
                            "was it trained for this base?") from None
    extra: dict = {}
    if controlnets:
        pipe, control, extra = with_controlnets(pipe, controlnets, guess_mode)
    out_dir = Path(out) if out else (Path(source) / "samples-cli" if Path(source).is_dir() else Path("samples"))
    out_dir.mkdir(parents=True, exist_ok=True)
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(all_prompts))]
    images = generate(pipe, all_prompts, seeds, steps or default_steps(sampler), guidance,
                      control=[control] * len(all_prompts) if controlnets else None, **extra)
    rows = []
    for i, (im, p, s) in enumerate(zip(images, all_prompts, seeds)):
        name = f"{i:04d}.png"
        im.save(out_dir / name)
        rows.append({"file_name": name, "prompt": p, "seed": s, **({"loras": loras} if loras else {}),
                     **({"controlnets": controlnets, "guess_mode": guess_mode} if controlnets else {})})
    (out_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid(images, all_prompts).save(out_dir / "grid.png")
    return out_dir


def with_controlnets(pipe, controlnets: list[tuple[str, float, str]], guess_mode: bool = False):
    """The family's stock ControlNet pipeline sharing ``pipe``'s modules, with one ControlNet or
    several (``adapters.controlnet_pipeline``); returns (pipeline, control image(s) for every prompt,
    extra call kwargs)."""
    cpipe, family = controlnet_pipeline(pipe, [d for d, _, _ in controlnets])
    if guess_mode and family != "unet":
        raise UserError("--guess-mode is a UNet ControlNet pipeline's; StableDiffusion3ControlNetPipeline has "
                        "none, so sample without it.")
    size = (backbone_of(pipe).config.sample_size * pipe.vae_scale_factor,) * 2
    images = []
    for _, _, img in controlnets:
        try:
            images.append(Image.open(img).convert("RGB").resize(size))
        except OSError:
            raise UserError(f"--control-image '{img}' is not an image file.") from None
    scales = [s for _, s, _ in controlnets]
    one = len(images) == 1
    extra = {"controlnet_conditioning_scale": scales[0] if one else scales}
    if family == "unet":
        extra["guess_mode"] = guess_mode
    return cpipe, (images[0] if one else images), extra
