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

EXAMPLES = """\
examples:
  ldm-lab train recipes/shapes/t2i.yaml train.max_steps=200
  accelerate launch -m ldm_lab.train recipes/shapes/t2i.yaml
  ldm-lab recipe check recipes/shapes/t2i.yaml
  ldm-lab recipe show recipes/shapes/t2i.yaml data.resolution=64
  ldm-lab data shapes --out data/shapes --n 2000 --seed 0
  ldm-lab sample runs/shapes-t2i --prompt "a large red circle at the center on a white background" --n 4
  ldm-lab eval shapes runs/shapes-t2i
"""


class UserError(Exception):
    """Bad input from the user: printed as one sentence, exit code 2."""


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

    e = sub.add_parser("eval", help="evaluate images")
    es = e.add_subparsers(dest="action", required=True, metavar="ACTION")
    esh = es.add_parser("shapes", help="read colour/shape/size/position/background back from images")
    esh.add_argument("path", help="a run dir, a samples dir (samples.jsonl) or a shapes dataset dir")
    esh.add_argument("--out", help="metrics.json to write (default: inside the path)")
    eae = es.add_parser("autoencoder", help="shapes adherence of an autoencoder's reconstructions")
    eae.add_argument("path", help="an AutoencoderKL dir (or a pipeline dir with vae/)")
    eae.add_argument("--n", type=int, default=256)
    eae.add_argument("--resolution", type=int, default=64)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .recipe import RecipeError

    try:
        return _dispatch(args)
    except (RecipeError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from .recipe import dump_recipe, load_recipe

    if args.command == "recipe":
        recipe = load_recipe(args.recipe, args.overrides)
        if args.action == "check":
            print(f"{args.recipe}: ok (trainer {recipe.trainer})")
        else:
            print(dump_recipe(recipe), end="")
        return 0
    if args.command == "train":
        recipe = load_recipe(args.recipe, args.overrides)
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
        shapes.generate(out, args.n, seed=args.seed, world=shapes.World(resolution=args.resolution), heldout=args.heldout)
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
    if args.command == "sample":
        from .sampling import sample_cli

        prompts = args.prompt or [ln.strip() for ln in _read_lines(args.prompts_file) if ln.strip()]
        out = sample_cli(args.source, prompts, n=args.n, steps=args.steps, guidance=args.guidance,
                         sampler=args.sampler, seed=args.seed, out=args.out)
        print(f"wrote {len(prompts) * args.n} images and grid.png to {out}")
        return 0
    raise UserError(f"unknown command {args.command}")


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file '{path}' does not exist; give a text file with one prompt per line.")
    return Path(path).read_text().splitlines()


if __name__ == "__main__":
    sys.exit(main())
