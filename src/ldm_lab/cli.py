"""`ldm-lab`: train, sample, evaluate, inspect recipes and make data.

User mistakes (a bad recipe, a missing path, a wrong flag value) print one sentence and exit
with code 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import TrainingDiverged, UserError

EXAMPLES = """\
examples:
  ldm-lab train recipes/shapes/t2i.yaml train.max_steps=200
  accelerate launch -m ldm_lab.train recipes/shapes/t2i.yaml
  ldm-lab recipe check recipes/shapes/t2i.yaml
  ldm-lab recipe show recipes/shapes/t2i.yaml data.resolution=64
  ldm-lab cache recipes/shapes/t2i.yaml                     # latents + caption embeddings, once, to disk
  ldm-lab bench --compare naive --rounds 5 recipes/shapes/t2i.yaml   # samples/s, breakdown, FLOPs, MFU vs naive
  ldm-lab bench --sampling data/pretrained/shapes-t2i       # latency and adherence per sampler
  torchrun --nproc_per_node 2 -m ldm_lab.cli train recipes/shapes/t2i.yaml   # 2 processes (see docs/scaling.md)
  ldm-lab data shapes --out data/shapes --n 2000 --seed 0
  ldm-lab data shapes --out data/hearts --n 500 --shapes circle,square,triangle,star,heart
  ldm-lab finetune lora --base data/pretrained/shapes-t2i --data data/hearts --out runs/lora --steps 300
  ldm-lab finetune dreambooth --base data/pretrained/shapes-t2i --instance-data data/subjects/purple-sparkle \\
      --instance-prompt "a large {id} star" --prior-preservation \\
      --class-prompt-file recipes/shapes/star-class-prompts.txt --lora --lr 1e-3 --steps 300 --out runs/db
  ldm-lab finetune controlnet --base data/pretrained/shapes-t2i --data data/shapes --out runs/cn --lr 3e-4 \\
      --batch-size 32 --steps 1200
  ldm-lab sample data/pretrained/shapes-t2i --controlnet runs/cn:1.0 --control-image mask.png --prompt "" --guess-mode
  ldm-lab sample runs/shapes-t2i --prompt "a large red circle at the center on a white background" --n 4
  ldm-lab eval shapes runs/shapes-t2i
"""


def _adapter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, help="LoRA rank (plugin.rank; default 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (plugin.alpha; default: the rank)")
    p.add_argument("--targets", help="attn | attn_ff | attn_ff_conv, or comma-separated module names")
    p.add_argument("--dropout", type=float, help="LoRA dropout")
    p.add_argument("--init", choices=["default", "gaussian", "pissa", "olora"], help="adapter initialisation")
    p.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (DoRA)")


def _run_flags(p: argparse.ArgumentParser, lr: str, steps: int, batch: int, text: bool = True) -> None:
    """Training flags shared by the finetune commands (``text``: text-encoder lr and validation prompts)."""
    p.add_argument("--lr", type=float, help=f"learning rate (train.learning_rate; default {lr})")
    if text:
        p.add_argument("--text-encoder-lr", type=float, help="text-encoder learning rate (default: --lr)")
    p.add_argument("--steps", type=int, help=f"optimiser steps (train.max_steps; default {steps})")
    p.add_argument("--batch-size", type=int, help=f"train.batch_size (default {batch})")
    p.add_argument("--resolution", type=int, help="training resolution (default: the base's native one)")
    p.add_argument("--caption-column", help="data.caption_column (default text)")
    if text:
        p.add_argument("--validation-prompt", action="append", help="a validation prompt (repeatable)")
    p.add_argument("--resume", help="'latest' or a checkpoint dir")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", help="further dotted key=value recipe overrides")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-lab",
        description="Latent text-to-image training on the Hugging Face stack: one Accelerate loop, "
                    "plugin trainers, outputs that load in stock diffusers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train what a recipe describes (same as accelerate launch -m ldm_lab.train)")
    t.add_argument("recipe", help="a recipe .yaml (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")

    c = sub.add_parser("cache", help="encode a recipe's latents and caption embeddings once, to disk (split across "
                       "processes under torchrun / accelerate launch); training finds and uses the cache")
    c.add_argument("recipe", help="a recipe .yaml")
    c.add_argument("--out", help="write the cache to this dir (train with data.latent_cache=DIR); default: the "
                   "hash-named dir under data.cache_dir that training looks up by itself")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides (the same ones the training run will use)")

    b = sub.add_parser("bench", help="training throughput of a recipe (vs the naive per-step pipeline), or sampling "
                       "latency and adherence per sampler (--sampling)")
    b.add_argument("recipe", nargs="?", help="a recipe .yaml (training benchmark)")
    b.add_argument("--steps", type=int, default=20, help="timed steps per pipeline (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    b.add_argument("--compare", choices=["naive"], help="also run the naive pipeline (images decoded, autoencoder and "
                   "text encoder every step, no workers, no cache) in this process and print the ratio")
    b.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE ...",
                   help="also run the recipe with these overrides (repeatable), e.g. 'no-cl:train.channels_last=false'")
    b.add_argument("--rounds", type=int, default=1, help="run every row N times, each in a fresh process, the order "
                   "reversed every other round, and report medians (for machines whose speed drifts; default 1: "
                   "every row once, in this process)")
    b.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (GPUs: data-sheet table)")
    b.add_argument("--sampling", metavar="PIPELINE", help="benchmark the samplers on this pipeline / run dir instead")
    b.add_argument("--n", type=int, default=48, help="--sampling: prompts per sampler (default 48)")
    b.add_argument("--out", default="runs/bench", help="where runs and results.json go (default runs/bench)")
    b.add_argument("--json", help="results file (default OUT/training.json or OUT/sampling.json)")
    b.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")

    r = sub.add_parser("recipe", help="check or show a recipe")
    rs = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rc = rs.add_parser("check", help="validate a recipe without loading any model")
    rc.add_argument("recipe")
    rc.add_argument("overrides", nargs="*")
    rsh = rs.add_parser("show", help="print the fully resolved recipe")
    rsh.add_argument("recipe")
    rsh.add_argument("overrides", nargs="*")

    d = sub.add_parser("data", help="make datasets")
    ds = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsh = ds.add_parser("shapes", help="write the procedural shapes world as a 🤗 imagefolder dataset")
    dsh.add_argument("--out", required=True)
    dsh.add_argument("--n", type=int, default=2000)
    dsh.add_argument("--seed", type=int, default=0)
    dsh.add_argument("--resolution", type=int, default=64)
    dsh.add_argument("--heldout", action="store_true", help="write only the held-out colour-shape pairs")
    dsh.add_argument("--colors", help="comma-separated colours to draw from (default: the six base colours; "
                                      "pink is the extra one)")
    dsh.add_argument("--shapes", help="comma-separated shapes (default: circle,square,triangle,star; "
                     "heart and sparkle are extra)")
    dsh.add_argument("--sizes", help="comma-separated sizes (default: small,large)")
    dsh.add_argument("--positions", help="comma-separated positions, e.g. 'center,top left' (default: all nine)")
    dsh.add_argument("--backgrounds", help="comma-separated backgrounds (default: white,black,gray)")
    dsh.add_argument("--caption", help="caption template, e.g. 'a {size} {id} star at the {position} on a "
                     "{background} background' ({color} {shape} {size} {position} {background} are filled in, "
                     "anything else such as {id} is kept); default: the full shapes caption")

    e = sub.add_parser("eval", help="evaluate images")
    es = e.add_subparsers(dest="action", required=True, metavar="ACTION")
    esh = es.add_parser("shapes", help="read colour/shape/size/position/background back from images")
    esh.add_argument("path", help="a run dir, a samples dir (samples.jsonl) or a shapes dataset dir")
    esh.add_argument("--out", help="metrics.json to write (default: inside the path)")
    eae = es.add_parser("autoencoder", help="shapes adherence of an autoencoder's reconstructions")
    eae.add_argument("path", help="an AutoencoderKL dir (or a pipeline dir with vae/)")
    eae.add_argument("--n", type=int, default=256)
    eae.add_argument("--resolution", type=int, default=64)

    f = sub.add_parser("finetune", help="fine-tune a pipeline with a plugin trainer (flags override a built-in recipe)")
    fs = f.add_subparsers(dest="action", required=True, metavar="TRAINER")
    fl = fs.add_parser("lora", help="LoRA adapters (PEFT) on the UNet and optionally the text encoder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fl.add_argument("--base", required=True, help="the pipeline to adapt: a diffusers pipeline dir, a run dir or a hub id")
    fl.add_argument("--data", required=True, help="an imagefolder dir (images + metadata.jsonl) or a hub dataset id")
    fl.add_argument("--out", required=True, help="run dir (gets pytorch_lora_weights.safetensors)")
    _adapter_flags(fl)
    fl.add_argument("--train-text-encoder", action="store_true", help="also put adapters on the text encoder")
    _run_flags(fl, lr="1e-4", steps=1000, batch=8)

    fd = fs.add_parser("dreambooth", help="bind a rare identifier to a subject from a few images (DreamBooth), "
                       "with prior preservation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fd.add_argument("--base", required=True, help="the pipeline to fine-tune: a diffusers pipeline dir, a run dir or a hub id")
    fd.add_argument("--instance-data", required=True, help="dir of the subject's images (captions from metadata.jsonl "
                    "or NAME.txt sidecars when present, else --instance-prompt)")
    fd.add_argument("--instance-prompt", help="caption with {id} where the identifier goes, e.g. 'a photo of {id} dog'")
    fd.add_argument("--identifier", help="'auto' (a rare single token, printed and saved in OUT/dreambooth.json) "
                    "or the token to use (default auto)")
    fd.add_argument("--class-prompt", action="append", help="class prompt, e.g. 'a photo of dog' (repeatable: cycled "
                    "over the class images)")
    fd.add_argument("--class-prompt-file", help="a text file with one class prompt per line (instead of --class-prompt)")
    fd.add_argument("--prior-preservation", action="store_true", help="train on class images generated by the base "
                    "too: loss = instance + λ·prior")
    fd.add_argument("--num-class-images", type=int, help="class images to generate or reuse (default 100)")
    fd.add_argument("--prior-loss-weight", type=float, help="λ (default 1.0)")
    fd.add_argument("--class-dir", help="where class images and their manifest live (default OUT/class_images); "
                    "a dir of your own images without manifest.json is used as is")
    fd.add_argument("--out", required=True, help="run dir (gets pipeline/ in full mode, "
                    "pytorch_lora_weights.safetensors with --lora)")
    fd.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole UNet")
    _adapter_flags(fd)
    fd.add_argument("--train-text-encoder", action="store_true",
                    help="also train the text encoder (all weights; adapters with --lora)")
    _run_flags(fd, lr="5e-6, 1e-4 with --lora", steps=800, batch=1)

    fc = fs.add_parser("controlnet", help="a ControlNet (spatial control: masks, edges, ...) for a frozen base",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fc.add_argument("--base", required=True, help="the pipeline to control: a diffusers pipeline dir, a run dir or a hub id")
    fc.add_argument("--data", required=True, help="an imagefolder dir (images + metadata.jsonl) or a hub dataset id")
    fc.add_argument("--out", required=True, help="run dir (gets controlnet/)")
    g = fc.add_mutually_exclusive_group()
    g.add_argument("--conditioning-column", help="dataset column holding the control images (default conditioning_image)")
    g.add_argument("--preprocessor", choices=["canny"], help="compute the control image from the target instead")
    fc.add_argument("--controlnet", help="continue from this ControlNet (dir or hub id) instead of copying the UNet")
    fc.add_argument("--prompt-dropout", type=float, help="share of steps with the empty prompt (default 0.5)")
    _run_flags(fc, lr="1e-5", steps=5000, batch=4, text=False)

    x = sub.add_parser("export", help="convert LoRA files between layouts, fuse LoRAs into a pipeline, or write a "
                                      "pipeline as one A1111/ComfyUI checkpoint file")
    xs = x.add_subparsers(dest="action", required=True, metavar="ACTION")
    xl = xs.add_parser("lora", help="write a LoRA in the diffusers, PEFT or kohya (A1111/ComfyUI) layout")
    xl.add_argument("source", help="a LoRA .safetensors file or a run dir holding pytorch_lora_weights.safetensors")
    xl.add_argument("--format", required=True, choices=["diffusers", "peft", "kohya"])
    xl.add_argument("--out", required=True, help="output file (.safetensors; a dir for --format peft)")
    xm = xs.add_parser("merge", help="fuse LoRAs into a base pipeline and save the result")
    xm.add_argument("--base", required=True, help="a pipeline dir, run dir or hub id")
    xm.add_argument("--lora", required=True, action="append", help="FILE[:scale] (repeatable)")
    xm.add_argument("--scale", type=float, default=None, help="scale of every --lora given without its own")
    xm.add_argument("--out", required=True, help="new pipeline dir")
    xf = xs.add_parser("single-file", help="write an SD 1.x / 2.x-class pipeline as one original-layout .safetensors "
                                           "checkpoint (A1111, ComfyUI, Forge, kohya; diffusers' from_single_file)")
    xf.add_argument("source", help="a diffusers pipeline dir or a run dir holding pipeline/")
    xf.add_argument("--out", required=True, help="new .safetensors file")
    xf.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights' precision in the file")

    ep = es.add_parser("pipeline", help="sample the fixed shapes evaluation prompts from a pipeline and score them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ep.add_argument("source", help="a run dir, a diffusers pipeline dir or a hub id")
    ep.add_argument("--out", required=True, help="dir for samples/, samples.jsonl, grid.png and metrics.json")
    ep.add_argument("--world", help="a shapes dataset dir whose world.json gives the palettes and held-out pairs")
    ep.add_argument("--colors", help="ask only for these colours (comma-separated), e.g. pink")
    ep.add_argument("--shapes", help="ask only for these shapes (comma-separated)")
    ep.add_argument("--n", type=int, default=240, help="prompts from seen colour-shape pairs")
    ep.add_argument("--heldout-n", type=int, default=0, help="prompts from held-out pairs")
    ep.add_argument("--lora", action="append", default=[], help="FILE[:scale] LoRA to apply (repeatable)")
    ep.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++", "euler", "unipc"], default="dpm++")
    ep.add_argument("--steps", type=int, default=20)
    ep.add_argument("--guidance", type=float, default=4.0)
    ep.add_argument("--seed", type=int, default=1234)

    ec = es.add_parser("controlnet", help="how well a ControlNet places the shape its control image shows (IoU), "
                                          "with no prompt, the matching one and a conflicting one, against the base")
    ec.add_argument("source", help="a ControlNet run dir (its recipe gives the base and the control kind) or a "
                                   "ControlNet dir (then give --base and --kind)")
    ec.add_argument("--out", required=True, help="dir for the images of every prompt set and metrics.json")
    ec.add_argument("--base", help="the base pipeline (a pipeline dir, run dir or hub id; default: the run's)")
    ec.add_argument("--kind", choices=["mask", "edges", "canny"],
                    help="the control: the object's mask, the shapes edges, or Canny edges (default: the run's)")
    ec.add_argument("--n", type=int, help="fresh shapes rows per prompt set (default: the run's plugin.eval_n, else 64)")
    ec.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++", "euler", "unipc"])
    ec.add_argument("--steps", type=int)
    ec.add_argument("--guidance", type=float)
    ec.add_argument("--seed", type=int)

    s = sub.add_parser("sample", help="generate images from a run or a diffusers pipeline dir")
    s.add_argument("source", help="a run dir (uses RUN/pipeline) or a pipeline dir / hub id")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sampler's usual count)")
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++", "euler", "unipc"], default="dpm++")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="output dir (default: SOURCE/samples-cli)")
    s.add_argument("--lora", action="append", default=[], help="FILE[:scale] LoRA to apply (repeatable)")
    s.add_argument("--controlnet", action="append", default=[], help="DIR[:scale] ControlNet (repeatable: "
                   "several are composed by summing their scaled residuals)")
    s.add_argument("--control-image", action="append", default=[], help="control image, one per --controlnet, in order")
    s.add_argument("--guess-mode", action="store_true", help="ControlNet on the conditional branch only, residuals "
                   "weighted from 0.1 (coarse) to 1.0 (fine) across resolutions: the paper's CFG resolution "
                   "weighting, for prompt-less sampling")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _bench(args) -> int:
    from . import bench

    out = Path(args.out)
    if args.sampling:
        if not Path(args.sampling).exists() and "/" not in args.sampling:
            raise UserError(f"--sampling '{args.sampling}' is not a pipeline dir or run dir.")
        report = bench.run_sampling(args.sampling, n=args.n, out=out / "sampling")
        print(bench.format_sampling(report))
        bench.write_json(report, Path(args.json) if args.json else out / "sampling.json")
        return 0
    if not args.recipe:
        raise UserError("give a recipe to benchmark training, or --sampling PIPELINE.")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise UserError("--steps, --warmup and --rounds must be at least 1.")
    variants = {}
    for v in args.variant:
        name, _, ov = v.partition(":")
        name = name.strip()
        if not name or not ov.strip():
            raise UserError(f"--variant '{v}' is not NAME:KEY=VALUE [KEY=VALUE ...].")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise UserError(f"--variant name '{name}' is also the name of its output folder, so it cannot hold '/' "
                            "or '\\' or be '.' or '..': use letters, digits, '-' or '_'.")
        if name in ("naive", "ldm-lab") or name in variants:
            taken = "is already used by another --variant" if name in variants else "names a built-in row"
            raise UserError(f"--variant name '{name}' {taken}: give each variant its own name.")
        variants[name] = ov.split()
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    for ov in variants.values():  # a bad override is found before anything runs
        bench.apply_overrides(recipe, ov)
    report = bench.run(recipe, args.steps, args.warmup, args.compare, args.peak_tflops, out, variants,
                       rounds=args.rounds)
    report["command"] = "ldm-lab bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    table = bench.format_training(report)
    print(table)
    bench.write_json({**report, "table": table}, Path(args.json) if args.json else out / "training.json")
    return 0


def _cache(recipe, out: str | None) -> int:
    """``ldm-lab cache``: the trainer's own model and data set-up, stopped after the cache is built."""
    from accelerate import Accelerator

    from .recipe import pipeline_defaults
    from .trainers.engine import multi_process_without_accelerator as _multi_process_without_accelerator
    from .trainers.registry import get_trainer
    from .trainers.text_to_image import TextToImageTrainer

    recipe = pipeline_defaults(recipe)
    d = recipe.data
    if d.streaming:
        raise UserError("a streamed dataset is encoded on the fly; set data.streaming=false to cache it.")
    cls = get_trainer(recipe.trainer)
    if not issubclass(cls, TextToImageTrainer):
        raise UserError(f"the {recipe.trainer} trainer does not use cached latents.")
    if not d.cache_latents:
        d.cache_latents = True
    accelerator = Accelerator(cpu=_multi_process_without_accelerator())
    plugin = cls(recipe, accelerator, Path(recipe.output.dir))
    plain = recipe.trainer in ("text_to_image", "lora")  # models + data, nothing else to prepare
    if out is not None and not plain:
        raise UserError(f"--out is not supported for the {recipe.trainer} trainer; leave it out (its run finds the cache).")
    if plain:
        plugin.build_models()
        plugin.build_data(cache_out=Path(out) if out else None)
    else:
        plugin.setup()
    cache = plugin.cached
    if accelerator.is_main_process:
        m = cache.manifest
        hint = f"train with data.latent_cache={cache.root}" if out else "runs of this recipe use it"
        print(f"cache: {cache.root} ({m['rows']} rows, {len(cache.captions)} caption strings"
              + (f", {m['skipped']} rows skipped" if m.get("skipped") else "") + f"); {hint}")
    accelerator.wait_for_everyone()
    return 0


def _dispatch(args) -> int:
    from .recipe import dump_recipe, load_recipe

    if args.command == "recipe":
        recipe = load_recipe(args.recipe, args.overrides)
        if args.action == "check":
            print(f"{args.recipe}: ok (trainer {recipe.trainer})")
        else:
            from .recipe import pipeline_defaults

            print(dump_recipe(pipeline_defaults(recipe)), end="")
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "cache":
        return _cache(load_recipe(args.recipe, args.overrides), args.out)
    if args.command == "train":
        recipe = load_recipe(args.recipe, args.overrides)
        from .trainers.loop import train

        run = train(recipe)
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"done: {run}")
        return 0
    if args.command == "finetune":
        recipe = load_recipe(BUILTIN / f"{args.action}.yaml", finetune_overrides(args))
        if args.print_recipe:
            from .recipe import pipeline_defaults

            print(dump_recipe(pipeline_defaults(recipe)), end="")
            return 0
        from .trainers.loop import train

        run = train(recipe)
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"done: {run}")
        return 0
    if args.command == "data":
        from .data import shapes

        if args.n < 1:
            raise UserError("--n must be at least 1.")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out '{out}' exists and is not empty; choose a new dir so nothing is overwritten.")
        shapes.generate(out, args.n, seed=args.seed, world=_world(args, shapes.World(resolution=args.resolution)),
                        heldout=args.heldout, caption=args.caption)
        print(f"wrote {args.n} rows to {out}")
        return 0
    if args.command == "eval" and args.action == "autoencoder":
        from .components import load_autoencoder
        from .evaluation.autoencoder import reconstruction_adherence
        from .recipe.schema import AutoencoderSpec

        if not Path(args.path).is_dir():
            raise UserError(f"'{args.path}' is not a directory; give an AutoencoderKL dir.")
        vae = load_autoencoder(AutoencoderSpec(pretrained=args.path))
        print(json.dumps(reconstruction_adherence(vae, args.resolution, args.n), indent=2))
        return 0
    if args.command == "eval" and args.action == "pipeline":
        return _eval_pipeline(args)
    if args.command == "eval" and args.action == "controlnet":
        return _eval_controlnet(args)
    if args.command == "eval":
        from .evaluation import shapes as ev

        path = Path(args.path)
        if not path.exists():
            raise UserError(f"'{path}' does not exist; give a run dir, a samples dir or a shapes dataset dir.")
        if (path / "eval" / "samples.jsonl").exists():  # a run dir: its final evaluation samples
            path = path / "eval"
        if not path.is_dir() or not any((path / f).exists() for f in ("samples.jsonl", "metadata.jsonl")):
            raise UserError(f"'{path}' has no samples.jsonl or metadata.jsonl; give a run dir, a samples dir "
                            "(ldm-lab sample writes one) or a shapes dataset dir.")
        result = ev.evaluate_dir(path)
        out = Path(args.out) if args.out else path / "metrics.json"
        if out is not None:
            ev.write_metrics(result, out)
        print(json.dumps(result, indent=2))
        return 0
    if args.command == "export":
        return _export(args)
    if args.command == "sample":
        from .sampling import sample_cli

        prompts = args.prompt or [ln.strip() for ln in _read_lines(args.prompts_file) if ln.strip()]
        out = sample_cli(args.source, prompts, n=args.n, steps=args.steps, guidance=args.guidance,
                         sampler=args.sampler, seed=args.seed, out=args.out, loras=_lora_args(args.lora),
                         controlnets=_controlnet_args(args.controlnet, args.control_image), guess_mode=args.guess_mode)
        print(f"wrote {len(prompts) * args.n} images and grid.png to {out}")
        return 0
    raise UserError(f"unknown command {args.command}")


BUILTIN = Path(__file__).parent / "builtin"


def _world(args, world):
    """``world`` restricted to --colors / --shapes / --sizes / --positions / --backgrounds (held-out
    pairs kept where both their colour and shape remain)."""
    import dataclasses

    from .data import shapes

    def pick(text, allowed, name):
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise UserError(f"--{name} has {bad[0]!r}, which is not one of {', '.join(allowed)}." if bad
                            else f"--{name} is empty; give comma-separated values.")
        return tuple(vals)

    kw = {}
    for name, allowed in (("colors", shapes.COLORS), ("shapes", shapes.SHAPES), ("sizes", shapes.SIZES),
                          ("positions", shapes.POSITIONS), ("backgrounds", shapes.BACKGROUNDS)):
        if getattr(args, name, None):
            kw[name] = pick(getattr(args, name), allowed, name)
    if not kw:
        return world
    w = dataclasses.replace(world, **kw)
    w.holdout = tuple(p for p in w.holdout if p[0] in w.colors and p[1] in w.shapes)
    if all(w.is_heldout(shapes.Shape(c, s, "small", "center", "white")) for c in w.colors for s in w.shapes):
        raise UserError("every colour-shape pair left by --colors/--shapes is held out; widen the choice.")
    return w


def _eval_pipeline(args) -> int:
    from .data import shapes
    from .evaluation.run import shapes_eval
    from .sampling import generate, load_pipeline, make_sampler

    if args.world and not Path(args.world).is_dir():
        raise UserError(f"--world '{args.world}' is not a directory; give a shapes dataset dir (it has world.json).")
    world = _world(args, shapes.load_world(args.world) if args.world else shapes.World())
    try:
        pipe = load_pipeline(args.source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a pipeline from '{args.source}' ({str(e).splitlines()[0]}); "
                        "give a run dir, a diffusers pipeline dir or a hub id.") from None
    loras = _lora_args(args.lora)
    if loras:
        from .lora_io import apply_loras

        apply_loras(pipe, loras)

    def sample(prompts, seeds, sampler, steps, guidance):
        pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
        return generate(pipe, prompts, seeds, steps, guidance)

    result = shapes_eval(sample, world, Path(args.out), args.n, args.heldout_n, args.seed, args.sampler,
                         args.steps, args.guidance)
    if loras:
        result["loras"] = [{"path": p, "scale": s} for p, s in loras]
        from .evaluation.shapes import write_metrics

        write_metrics(result, Path(args.out) / "metrics.json")
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_shape",)}, indent=2))
    return 0


def _eval_controlnet(args) -> int:
    """``control_eval`` (the ControlNet run's own final evaluation) for a saved ControlNet, with
    the stock diffusers ControlNet pipeline; settings from the run's recipe unless given."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from .evaluation.control import control_eval, control_image, control_kind
    from .recipe import load_recipe
    from .recipe.plugins import ControlNetOptions
    from .recipe.schema import EvalSpec
    from .sampling import generate, load_pipeline, make_sampler

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
        net = ControlNetModel.from_pretrained(net_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the base '{base}' or the ControlNet '{net_dir}' "
                        f"({str(err).splitlines()[0][:200]}).") from None
    if net.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
        raise UserError(f"ControlNet '{net_dir}' was made for another base (cross_attention_dim "
                        f"{net.config.cross_attention_dim}, '{base}' has {pipe.unet.config.cross_attention_dim}).")
    sampler, steps = args.sampler or e.sampler, args.steps or e.steps
    guidance = args.guidance if args.guidance is not None else e.guidance_scale
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    cpipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=net)
    cpipe.set_progress_bar_config(disable=True)
    low, high = (opts.canny_low, opts.canny_high) if opts is not None else (100, 200)

    def control_for(image, mask):
        return control_image(kind, image, mask, low, high)

    def with_control(prompts, controls, seeds, guess_mode):
        return generate(cpipe, prompts, seeds, steps, guidance, control=controls, guess_mode=guess_mode)

    def without(prompts, controls, seeds):
        return generate(pipe, prompts, seeds, steps, guidance)

    n = args.n or (opts.eval_n if opts is not None else 64)
    seed = args.seed if args.seed is not None else e.seed
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    result = control_eval(with_control, without, control_for, Path(args.out), n, seed, resolution)
    result["settings"] = {"controlnet": str(net_dir), "base": str(base), "kind": kind, "sampler": sampler,
                          "steps": steps, "guidance": guidance}
    from .evaluation.shapes import write_metrics

    write_metrics(result, Path(args.out) / "metrics.json")
    print(json.dumps(result, indent=2))
    return 0


def _lora_args(items: list[str], default_scale: float | None = None) -> list[tuple[str, float]]:
    from .lora_io import parse_lora_arg

    out = []
    for item in items:
        path, scale = parse_lora_arg(item)
        if default_scale is not None and ":" not in item[len(path):]:
            scale = default_scale
        p = Path(path)
        if not (p.is_file() or (p / "pytorch_lora_weights.safetensors").is_file()):
            raise UserError(f"LoRA '{path}' is neither a .safetensors file nor a dir with "
                            "pytorch_lora_weights.safetensors; give FILE[:scale].")
        out.append((path, scale))
    return out


def _controlnet_args(items: list[str], images: list[str]) -> list[tuple[str, float, str]]:
    """(dir, scale, control image) per --controlnet DIR[:scale], paired with --control-image in order."""
    from .lora_io import parse_lora_arg

    if len(items) != len(images):
        raise UserError(f"{len(items)} --controlnet but {len(images)} --control-image; give one control image per "
                        "ControlNet, in the same order.")
    out = []
    for item, img in zip(items, images):
        path, scale = parse_lora_arg(item)
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


def _export(args) -> int:
    from . import lora_io

    if args.action == "single-file":
        return _export_single_file(args)
    if args.action == "merge":
        loras = _lora_args(args.lora, args.scale)
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out '{out}' exists and is not empty; choose a new dir so nothing is overwritten.")
        try:
            lora_io.merge(args.base, loras, out)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot merge into '{args.base}' ({str(e).splitlines()[0][:200]}); give a pipeline "
                            "dir, run dir or hub id and LoRAs trained for it.") from None
        print(f"wrote fused pipeline to {out}")
        return 0
    (src, _), = _lora_args([args.source])
    try:
        w = lora_io.read_lora(src)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read LoRA weights from '{src}' ({str(e).splitlines()[0][:200]}).") from None
    writer = {"diffusers": lora_io.write_diffusers, "peft": lora_io.write_peft, "kohya": lora_io.write_kohya}
    try:
        out = writer[args.format](w, Path(args.out))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.format} LoRA ({len(w.modules())} adapted modules) to {out}")
    return 0


def _export_single_file(args) -> int:
    from . import single_file

    src, out = Path(args.source), Path(args.out)
    if (src / "pipeline" / "model_index.json").exists():
        src = src / "pipeline"  # a run dir
    if out.suffix != ".safetensors":
        raise UserError(f"--out '{out}' must end in .safetensors.")
    if out.exists():
        raise UserError(f"--out '{out}' exists; choose a new file name so nothing is overwritten.")
    dtype = single_file.DTYPES[args.dtype]
    try:
        state = single_file.pipeline_state(src)
    except single_file.SingleFileError as e:
        raise UserError(f"cannot write '{args.source}' as one checkpoint: {e}.") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read a pipeline from '{args.source}' ({str(e).splitlines()[0][:200]}); give a "
                        "diffusers pipeline dir (saved without a weight variant) or a run dir holding pipeline/.") from None
    try:
        single_file.save(state, out, dtype)
    except OSError as e:
        raise UserError(f"cannot write '{out}' ({e.strerror or e}); free space or choose another path.") from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype}; original SD layout)")
    differences = single_file.sd15_differences(src)
    if differences:
        print(single_file.not_sd15_note(differences, src))
    return 0


def finetune_overrides(args) -> list[str]:
    """``ldm-lab finetune`` flags as dotted overrides of the built-in recipe (same code path as
    ``trainer: lora`` / ``trainer: dreambooth`` in a recipe file)."""
    import json as _json

    base = args.base
    if (Path(base) / "pipeline" / "model_index.json").exists():
        base = str(Path(base) / "pipeline")  # a run dir
    data = getattr(args, "data", None) or args.instance_data
    local = Path(data).exists()
    ov = [f"model.pipeline={_json.dumps(base)}", f"data.path={_json.dumps(data)}", f"output.dir={_json.dumps(args.out)}"]
    if args.action in ("lora", "controlnet"):
        ov.append(f"data.source={'imagefolder' if local else 'hub'}")
    elif not Path(data).is_dir():
        raise UserError(f"--instance-data '{data}' is not a directory; give a dir of the subject's images.")
    flag_keys = {"rank": "plugin.rank", "alpha": "plugin.alpha", "dropout": "plugin.dropout", "init": "plugin.init",
                 "lr": "train.learning_rate", "text_encoder_lr": "plugin.text_encoder_lr", "steps": "train.max_steps",
                 "batch_size": "train.batch_size", "resolution": "data.resolution",
                 "caption_column": "data.caption_column", "resume": "train.resume",
                 "instance_prompt": "plugin.instance_prompt", "identifier": "plugin.identifier",
                 "num_class_images": "plugin.num_class_images", "prior_loss_weight": "plugin.prior_loss_weight",
                 "class_dir": "plugin.class_dir", "class_prompt_file": "plugin.class_prompt_file",
                 "conditioning_column": "plugin.conditioning_column", "controlnet": "plugin.controlnet",
                 "prompt_dropout": "plugin.prompt_dropout"}
    for flag, key in flag_keys.items():
        v = getattr(args, flag, None)
        if v is not None:
            ov.append(f"{key}={_json.dumps(v)}")
    if getattr(args, "targets", None):
        t = args.targets
        ov.append(f"plugin.targets={t if ',' not in t and t in ('attn', 'attn_ff', 'attn_ff_conv') else _json.dumps([x.strip() for x in t.split(',') if x.strip()])}")
    for flag, key in (("dora", "plugin.dora"), ("train_text_encoder", "plugin.train_text_encoder"),
                      ("prior_preservation", "plugin.prior_preservation")):
        if getattr(args, flag, False):
            ov.append(f"{key}=true")
    if getattr(args, "class_prompt", None):
        cp = args.class_prompt
        ov.append(f"plugin.class_prompt={_json.dumps(cp[0] if len(cp) == 1 else cp)}")
    if getattr(args, "preprocessor", None):
        ov += [f"plugin.preprocessor={args.preprocessor}", "plugin.conditioning_column=null"]
    if getattr(args, "lora", False):
        ov.append("plugin.mode=lora")
        if args.lr is None:
            ov.append("train.learning_rate=1.0e-4")
    if getattr(args, "validation_prompt", None):
        ov.append(f"validation.prompts={_json.dumps(args.validation_prompt)}")
    return ov + list(args.overrides)


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file '{path}' does not exist; give a text file with one prompt per line.")
    return Path(path).read_text().splitlines()


if __name__ == "__main__":
    sys.exit(main())
