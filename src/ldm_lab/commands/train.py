"""``ldm-lab train``: the one training loop on what a recipe describes."""

from __future__ import annotations

from accelerate import PartialState

from ..recipe import Recipe, load_recipe
from ..trainers.loop import train as train_loop


def train(args) -> int:
    return run(load_recipe(args.recipe, args.overrides))


def run(recipe: Recipe) -> int:
    """Train ``recipe`` and say where the run is (on the main process)."""
    run_dir = train_loop(recipe)
    if PartialState().is_main_process:
        print(f"done: {run_dir}")
    return 0
