"""`ldm-lab`: train, sample, evaluate, inspect recipes and make data.

User mistakes (a bad recipe, a missing path, a wrong flag value) print one sentence and exit
with code 2; nothing already written is removed.

This module parses the command line (``cli_args``) and calls the command's function in
``ldm_lab.commands``; errors become exit codes here and only here.
"""

from __future__ import annotations

import sys

from .cli_args import build_parser
from .commands import finetune, recipe
from .errors import TrainingDiverged, UserError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


def _dispatch(args) -> int:
    # The modules of the other commands load torch, diffusers or accelerate: each is imported
    # only when its command runs, so `--help` and `recipe check` start fast.
    command, action = args.command, getattr(args, "action", None)
    if command == "recipe":
        return recipe.check(args) if action == "check" else recipe.show(args)
    if command == "finetune":
        return finetune.finetune(args)
    if command == "train":
        from .commands import train

        return train.train(args)
    if command == "cache":
        from .commands import cache

        return cache.cache(args)
    if command == "bench":
        from .commands import bench

        return bench.bench(args)
    if command == "data":
        from .commands import data

        return data.shapes(args)
    if command == "eval":
        from .commands import evaluate

        return {"shapes": evaluate.shapes, "autoencoder": evaluate.autoencoder, "pipeline": evaluate.pipeline,
                "controlnet": evaluate.controlnet, "images": evaluate.images}[action](args)
    if command == "export":
        from .commands import export

        return {"lora": export.lora, "merge": export.merge, "single-file": export.single_file_checkpoint}[action](args)
    if command == "report":
        from .commands import report

        return report.report(args)
    if command == "sample":
        from .commands import sample

        return sample.sample(args)
    raise UserError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
