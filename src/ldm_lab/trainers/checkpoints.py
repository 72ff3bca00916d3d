"""A run's checkpoints on disk: finding, saving and loading them.

A checkpoint is ``RUN/checkpoints/checkpoint-N``: accelerate's ``save_state`` (models, optimiser,
scheduler, RNG, registered objects such as the EMA), one file per process for each per-process
state (the plugin's BatchRNG, a stream position), ``loop.json`` (the step and the non-finite
count) and the history so far. It is written into a temp dir renamed into place, so one that
looks complete is complete; resume picks the newest that loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from ..errors import UserError
from .runlog import write_history

CKPT_PREFIX = "checkpoint-"


def checkpoints(run_dir: Path) -> list[Path]:
    ck = [p for p in (run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*") if p.is_dir() and (p / "loop.json").exists()]
    return sorted(ck, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        ck = checkpoints(run_dir)
        return ck[-1] if ck else None
    p = Path(resume)
    if not (p / "loop.json").exists():
        raise UserError(f"train.resume is '{resume}', which is not a checkpoint dir (no loop.json); "
                          "give a checkpoints/checkpoint-N dir or 'latest'.")
    return p


def loop_state(ckpt: Path | None) -> dict:
    """The checkpoint's ``loop.json`` (step, non-finite steps); empty without a checkpoint."""
    return json.loads((ckpt / "loop.json").read_text()) if ckpt is not None else {}


def load_checkpoint(accelerator: Accelerator, run_dir: Path, resume: str | None) -> Path | None:
    """Load the checkpoint ``resume`` names. For ``latest``, a checkpoint that fails to load is
    named and the next older one is tried; an explicit checkpoint that fails is a clear error."""
    if resume == "latest":
        tried = []
        for ck in reversed(checkpoints(run_dir)):
            try:
                accelerator.load_state(str(ck))
                json.loads((ck / "loop.json").read_text())["step"]
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means it is damaged
                accelerator.print(f"warning: checkpoint {ck} is damaged ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''}); trying the one before it")
                tried.append(ck.name)
                continue
            return ck
        if tried:
            raise UserError(f"no checkpoint in {run_dir / 'checkpoints'} can be loaded ({', '.join(tried)} are "
                              "damaged); remove them or start without train.resume.")
        return None
    ck = resolve_resume(run_dir, resume)
    if ck is None:
        return None
    try:
        accelerator.load_state(str(ck))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"checkpoint {ck} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                          "give another checkpoint or train.resume=latest.") from None
    return ck


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, limit: int | None, history: list,
                    nonfinite_steps: int = 0, rank_states: list | None = None) -> Path:
    """accelerate ``save_state`` into a temp dir renamed into place, so a kill mid-save never
    leaves a checkpoint that looks complete; then prune to ``limit``."""
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for k, obj in enumerate(rank_states or []):  # per-process state: the plugin's BatchRNG, a stream position
        name = getattr(obj, "checkpoint_name", f"plugin_state_{k}")
        torch.save(obj.state_dict(), tmp / f"{name}_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "loop.json").write_text(json.dumps({"step": step, "nonfinite_steps": nonfinite_steps}))
        write_history(tmp, history)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if limit:
            for old in checkpoints(run_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_rank_states(accelerator: Accelerator, ckpt: Path, rank_states: list) -> None:
    """Each per-process state from this process's file in ``ckpt``."""
    for k, obj in enumerate(rank_states):
        name = getattr(obj, "checkpoint_name", f"plugin_state_{k}")
        own = ckpt / f"{name}_rank{accelerator.process_index}.pt"
        # resumed on more processes: a shared state (the plugin's BatchRNG) is the same in every file
        path = own if own.exists() or getattr(obj, "per_process", False) else ckpt / f"{name}_rank0.pt"
        if path.exists():
            obj.load_state_dict(torch.load(path, weights_only=False))
