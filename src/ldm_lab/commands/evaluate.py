"""``ldm-lab eval``: score images (``shapes``), an autoencoder's reconstructions (``autoencoder``),
a pipeline's samples of the fixed shapes prompts (``pipeline``), how well a ControlNet places
the shape its control image shows (``controlnet``) and image-set metrics against real images
(``images``: FID, KID, CMMD, CLIP score)."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import shapes as sw
from ..errors import UserError
from ..evaluation import shapes as ev
from ..evaluation.control import control_eval, control_image, control_kind
from ..evaluation.run import shapes_eval
from ..recipe import load_recipe
from ..recipe.plugins import ControlNetOptions
from ..recipe.schema import AutoencoderSpec, EvalSpec
from .adapters import backbone_of, controlnet_pipeline, lora_args
from .data import restricted_world


def shapes(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; give a run dir, a samples dir or a shapes dataset dir.")
    if (path / "eval" / "samples.jsonl").exists():  # a run dir: its final evaluation samples
        path = path / "eval"
    if not path.is_dir() or not any((path / f).exists() for f in ("samples.jsonl", "metadata.jsonl")):
        raise UserError(f"'{path}' has no samples.jsonl or metadata.jsonl; give a run dir, a samples dir "
                        "(ldm-lab sample writes one) or a shapes dataset dir.")
    result = ev.evaluate_dir(path)
    ev.write_metrics(result, Path(args.out) if args.out else path / "metrics.json")
    print(json.dumps(result, indent=2))
    return 0


def autoencoder(args) -> int:
    # torch and diffusers load only for the eval actions that run a model
    from ..components import load_autoencoder
    from ..evaluation.autoencoder import reconstruction_adherence

    if not Path(args.path).is_dir():
        raise UserError(f"'{args.path}' is not a directory; give an AutoencoderKL dir.")
    vae = load_autoencoder(AutoencoderSpec(pretrained=args.path))
    print(json.dumps(reconstruction_adherence(vae, args.resolution, args.n), indent=2))
    return 0


def pipeline(args) -> int:
    # torch and diffusers load only for the eval actions that run a model
    from ..lora_io import apply_loras
    from ..sampling import generate, load_pipeline, use_sampler

    if args.world and not Path(args.world).is_dir():
        raise UserError(f"--world '{args.world}' is not a directory; give a shapes dataset dir (it has world.json).")
    world = restricted_world(args, sw.load_world(args.world) if args.world else sw.World())
    try:
        pipe = load_pipeline(args.source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a pipeline from '{args.source}' ({str(e).splitlines()[0]}); "
                        "give a run dir, a diffusers pipeline dir or a hub id.") from None
    loras = lora_args(args.lora)
    if loras:
        apply_loras(pipe, loras)

    def sample(prompts, seeds, sampler, steps, guidance):
        use_sampler(pipe, sampler)
        return generate(pipe, prompts, seeds, steps, guidance)

    result = shapes_eval(sample, world, Path(args.out), args.n, args.heldout_n, args.seed, args.sampler,
                         args.steps, args.guidance)
    if loras:
        result["loras"] = [{"path": p, "scale": s} for p, s in loras]
        ev.write_metrics(result, Path(args.out) / "metrics.json")
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_shape",)}, indent=2))
    return 0


def controlnet(args) -> int:
    """``control_eval`` (the ControlNet run's own final evaluation) for a saved ControlNet, with
    the stock diffusers ControlNet pipeline; settings from the run's recipe unless given."""
    # torch and diffusers load only for the eval actions that run a model
    from ..sampling import generate, load_pipeline, use_sampler

    src = Path(args.source)
    net_dir, recipe = src, None
    if (src / "controlnet" / "config.json").exists() and (src / "recipe.yaml").exists():  # a run dir
        net_dir, recipe = src / "controlnet", load_recipe(src / "recipe.yaml", check_paths=False)
    if not (net_dir / "config.json").exists():
        raise UserError(f"'{args.source}' is neither a ControlNet run dir nor a ControlNet dir (no config.json).")
    e = recipe.eval if recipe is not None else EvalSpec()
    opts = ControlNetOptions.model_validate(recipe.plugin) if recipe is not None else None
    kind = args.kind or (control_kind(opts) if opts is not None else None)
    if kind is None:
        raise UserError("give --kind (mask, edges or canny): the control this ControlNet reads is not known.")
    base = args.base or (recipe.model.pipeline if recipe is not None else None)
    if not base:
        raise UserError("give --base: the pipeline this ControlNet was trained for.")
    try:
        pipe = load_pipeline(base)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the base '{base}' ({str(err).splitlines()[0][:200]}).") from None
    sampler, steps = args.sampler or e.sampler, args.steps or e.steps
    guidance = args.guidance if args.guidance is not None else e.guidance_scale
    use_sampler(pipe, sampler)
    cpipe, family = controlnet_pipeline(pipe, [str(net_dir)])
    low, high = (opts.canny_low, opts.canny_high) if opts is not None else (100, 200)

    def control_for(image, mask):
        return control_image(kind, image, mask, low, high)

    def with_control(prompts, controls, seeds, guess_mode):
        kw = {"guess_mode": guess_mode} if family == "unet" else {}
        return generate(cpipe, prompts, seeds, steps, guidance, control=controls, **kw)

    def without(prompts, controls, seeds):
        return generate(pipe, prompts, seeds, steps, guidance)

    n = args.n or (opts.eval_n if opts is not None else 64)
    seed = args.seed if args.seed is not None else e.seed
    resolution = backbone_of(pipe).config.sample_size * pipe.vae_scale_factor
    result = control_eval(with_control, without, control_for, Path(args.out), n, seed, resolution,
                          guess_mode=family == "unet")
    result["settings"] = {"controlnet": str(net_dir), "base": str(base), "kind": kind, "sampler": sampler,
                          "steps": steps, "guidance": guidance}
    ev.write_metrics(result, Path(args.out) / "metrics.json")
    print(json.dumps(result, indent=2))
    return 0


def _image_rows(path: Path, what: str) -> tuple[list[dict], Path]:
    for name in ("samples.jsonl", "metadata.jsonl"):
        if (path / name).exists():
            rows = [r for r in ev._read_rows(path / name) if "file_name" in r]
            if rows:
                return rows, path / name
    raise UserError(f"{what} '{path}' has no samples.jsonl or metadata.jsonl with file_name rows; give a samples "
                    "dir (ldm-lab sample or a run's eval/ writes one) or an imagefolder.")


def images(args) -> int:
    from ..evaluation.image_metrics import image_metrics, load_clip

    path = Path(args.path)
    if (path / "eval" / "samples.jsonl").exists():
        path = path / "eval"
    if not path.is_dir():
        raise UserError(f"'{path}' is not a directory; give a run dir or a samples dir.")
    rows, listing = _image_rows(path, "the samples dir")
    fake = ev.open_images(path, rows, listing)
    captions = [r.get("text") or r.get("prompt") or "" for r in rows]
    if args.real:
        real_dir = Path(args.real)
        if not real_dir.is_dir():
            raise UserError(f"--real '{real_dir}' is not a directory; give a dir of real images.")
        real = ev.open_images(real_dir, *_image_rows(real_dir, "--real"))
    else:
        targets = [sw.parse_caption(c) for c in captions]
        if not all(targets):
            raise UserError(f"some captions in '{path}' are not shapes-world captions, so there is no ground truth "
                            "to draw; give --real DIR.")
        real = [sw.render(t, fake[i].size[0])[0] for i, t in enumerate(targets)]
    try:
        model, processor = load_clip(args.features)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a CLIP model and processor from '{args.features}' ({str(e).splitlines()[0]}); "
                        "give a CLIPModel dir with its processor files or a hub id.") from None
    result = {**image_metrics(fake, real, captions, model, processor), "n_fake": len(fake), "n_real": len(real),
              "features": args.features}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0
