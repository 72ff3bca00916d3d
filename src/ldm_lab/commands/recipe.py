"""``ldm-lab recipe check`` / ``recipe show``: a recipe validated, or printed fully resolved."""

from __future__ import annotations

from ..recipe import dump_recipe, load_recipe, pipeline_defaults


def check(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok (trainer {recipe.trainer})")
    return 0


def show(args) -> int:
    print(dump_recipe(pipeline_defaults(load_recipe(args.recipe, args.overrides))), end="")
    return 0
