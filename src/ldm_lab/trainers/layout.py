"""The run's layout (processes x per-process batch x accumulation) as each checkpoint records it,
and what a resume on another layout may do.

An optimiser step of a run consumes a *global batch* of processes x batch x accumulation rows of
the shared shuffle order, and the batch RNG draws the noise of the global batch
(``randomness.py``), so a run resumed on another number of processes with the same global batch
continues exactly in samples seen: the data position (steps x accumulation batches of the new
layout) lands on the same row, and the LR schedule is moved to the same optimiser step
(accelerate's prepared scheduler advances once per process per step, so the restored position,
saved as steps x the old process count, is put at steps x the new one). A resume that cannot be
exact is refused in one sentence that says what to set: another global batch, an epoch that holds
another number of rows (accelerate pads an epoch whose batch count does not divide by the
process count), or a stream on another process count (a stream is split by process count, so no
position in it holds on another). Listing ``train.batch_size`` in ``train.resume_allow_changes``
accepts another global batch on purpose; the schedule then continues by optimiser steps.

Checkpoints written before the layout was recorded count their processes from accelerate's
per-process RNG files and take batch and accumulation from their stored recipe.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..errors import UserError

# recipe keys a resume may change when the global batch stays the same
LAYOUT_KEYS = ("train.batch_size", "train.gradient_accumulation_steps")


@dataclass(frozen=True)
class Layout:
    processes: int
    batch_size: int
    accumulation: int
    stream: bool = False
    epoch_samples: int | None = None  # rows an epoch trains on (map-style data)

    @property
    def global_batch(self) -> int:
        return self.processes * self.batch_size * self.accumulation

    def words(self) -> str:
        return (f"{self.global_batch} ({self.processes} process{'es' if self.processes != 1 else ''} x batch "
                f"{self.batch_size} x accumulation {self.accumulation})")

    def to_json(self) -> dict:
        return asdict(self)


def current_layout(num_processes: int, batch_size: int, accumulation: int, dataloader, stream: bool) -> Layout:
    epoch = None if stream else len(dataloader) * batch_size * num_processes
    return Layout(num_processes, batch_size, accumulation, stream, epoch)


def saved_layout(ckpt: Path, saved_recipe: dict | None = None) -> Layout | None:
    """The layout ``ckpt`` was written with (``loop.json``; for older checkpoints, inferred from
    ``saved_recipe``, by default the checkpoint's ``recipe.yaml``)."""
    try:
        info = json.loads((ckpt / "loop.json").read_text())
    except (OSError, ValueError):
        return None  # the load itself says what is wrong with the checkpoint
    if isinstance(info, dict) and isinstance(info.get("layout"), dict):
        try:
            return Layout(**info["layout"])
        except TypeError:
            return None
    n = len(list(ckpt.glob("random_states_*.pkl")))
    if saved_recipe is None:
        try:
            saved_recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError):
            saved_recipe = None
        saved_recipe = saved_recipe if isinstance(saved_recipe, dict) else None
    train = (saved_recipe or {}).get("train") or {}
    if not n or "batch_size" not in train:
        return None
    stream = bool(((saved_recipe or {}).get("data") or {}).get("streaming"))
    return Layout(n, int(train["batch_size"]), int(train.get("gradient_accumulation_steps") or 1), stream)


def _suggestion(old: Layout, now: Layout) -> str:
    per = now.processes * now.accumulation
    if old.global_batch % per == 0:
        return f"set train.batch_size={old.global_batch // per}"
    per = now.processes * now.batch_size
    if old.global_batch % per == 0:
        return f"set train.gradient_accumulation_steps={old.global_batch // per}"
    return f"resume on {old.processes} process{'es' if old.processes != 1 else ''}"


def check_layout(ckpt: Path, old: Layout | None, now: Layout | None, allow_batch_change: bool) -> None:
    """One sentence when resuming ``ckpt`` on the layout ``now`` cannot continue exactly."""
    if old is None or now is None:
        return
    if old.stream and old.processes != now.processes:
        raise UserError(f"checkpoint {ckpt} reads a stream split over {old.processes} process(es) and this run has "
                        f"{now.processes}; a stream is split by process count, so no position in it holds on "
                        f"another: resume on {old.processes} process(es).")
    if old.global_batch != now.global_batch:
        if allow_batch_change:
            return
        raise UserError(f"checkpoint {ckpt} was trained with a global batch of {old.words()} and this run's is "
                        f"{now.words()}; {_suggestion(old, now)} to continue exactly, or list train.batch_size in "
                        "train.resume_allow_changes to change the global batch on purpose.")
    if old.epoch_samples is not None and now.epoch_samples is not None and old.epoch_samples != now.epoch_samples:
        raise UserError(f"checkpoint {ckpt} trained on {old.epoch_samples} rows an epoch and this layout trains on "
                        f"{now.epoch_samples} (the batch count of an epoch does not divide by the process count, "
                        f"so accelerate pads it); resume on {old.processes} process(es) with batch {old.batch_size}.")


def move_schedule(lr_scheduler, step: int, num_processes: int) -> None:
    """The prepared LR scheduler put at optimiser step ``step`` of a run on ``num_processes``
    processes (its saved position counts the old process count): its LambdaLR's position set one
    before and stepped once, which recomputes every group's LR from the schedule."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    inner.last_epoch = step * num_processes - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no optimiser step is taken
        inner.step()
