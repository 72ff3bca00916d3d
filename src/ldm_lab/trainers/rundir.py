"""A run dir belongs to one run: its id in ``RUN/run.json`` and a lock while it trains.

* ``claim`` (main process, before anything is written): the dir's lock is taken with ``flock``
  (released by the kernel when the process dies, so a killed run never leaves a stale lock); a
  dir locked by a live run, or holding another run while this one neither resumes it nor asks
  for ``output.overwrite``, is one sentence. ``output.overwrite`` removes the earlier run's
  checkpoints and outputs first; a resume keeps the dir's id.
* Each checkpoint's ``loop.json`` names its run, so checkpoints are found and pruned only among
  the run's own (checkpoints written before run ids existed count as the dir's).
* ``recipe_changes``: the keys that change the computation, compared between a checkpoint's
  stored recipe and the resumed one; the rest (``CHANGEABLE``) may change on a resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from ..errors import UserError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# what a run writes into its dir: removed by output.overwrite (anything else the user put there stays,
# and so do DreamBooth's class images, generated from the base and reused by later runs)
RUN_OUTPUTS = ("checkpoints", "pipeline", "pipeline.safetensors", "samples", "eval", "eval-base", "eval-steps",
               "logs", "history.jsonl", "metrics.json", "loss.png", "metrics.png", "report.html", "recipe.yaml", "data_report.json",
               "pytorch_lora_weights.safetensors", "transformer", "controlnet", RUN_FILE)
# keys a resume may change: how long to train and how often to save, log, validate and evaluate,
# where outputs go, and speed switches that leave the arithmetic alone
CHANGEABLE = ("train.max_steps", "train.checkpoint_every", "train.checkpoints_total_limit", "train.resume",
              "train.resume_allow_changes", "train.resume_trust_pickles", "train.max_nonfinite_steps", "train.host_allocator", "train.compile",
              "train.peak_tflops", "data.num_workers", "data.cache_dir", "logging", "validation", "eval", "output")


class RunDir:
    """The claimed dir: its run id and the lock held until ``release`` (or the process ends)."""

    def __init__(self, path: Path, run_id: str, lock_fd: int | None):
        self.path, self.run_id, self._fd = path, run_id, lock_fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def looks_like_a_run(d: Path) -> bool:
    """A run got going here (its recipe passed the resume check) or left outputs; a dir holding
    only ``run.json`` is one whose run stopped during set-up, which a new start may take over."""
    return any((d / n).exists() for n in ("recipe.yaml", "checkpoints", "history.jsonl", "pipeline", "metrics.json"))


def read_run_id(d: Path) -> str | None:
    try:
        return json.loads((d / RUN_FILE).read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(d: Path, resuming: bool, overwrite: bool, trainer: str) -> RunDir:
    """Lock ``d`` for this run and give it its id (see the module doc); one sentence where the
    dir belongs to another run."""
    if str(d).strip() in ("", "."):
        raise UserError("output.dir is empty or the current directory; name a dir for the run, e.g. output.dir=runs/my-run.")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"output dir '{d}' cannot be written ({e.strerror}); choose another output.dir.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise UserError(f"output dir '{d}' is in use by a run that is still training ({other or 'another process'}); "
                        "wait for it to end or choose another output.dir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    try:
        run_id = _own(d, resuming, overwrite, trainer)
    except BaseException:
        os.close(fd)
        raise
    return RunDir(d, run_id, fd)


def _own(d: Path, resuming: bool, overwrite: bool, trainer: str) -> str:
    existing = read_run_id(d)
    if looks_like_a_run(d) and not resuming:
        if not overwrite:
            raise UserError(f"output dir '{d}' holds another run{f' ({existing})' if existing else ''}; resume it with "
                            "train.resume=latest, replace it with output.overwrite=true, or choose another output.dir.")
        for name in RUN_OUTPUTS:
            p = d / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        existing = None
    if resuming and not existing:  # checkpoints placed in a new dir to resume from: the dir takes their run
        existing = _newest_checkpoint_run(d)
    run_id = existing if resuming and existing else uuid.uuid4().hex[:12]
    if existing != run_id or not (d / RUN_FILE).exists():
        (d / RUN_FILE).write_text(json.dumps({"id": run_id, "trainer": trainer,
                                              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return run_id


def _newest_checkpoint_run(d: Path) -> str | None:
    best = (-1, None)
    for loop in (d / "checkpoints").glob("checkpoint-*/loop.json"):
        try:
            info = json.loads(loop.read_text())
            best = max(best, (int(info["step"]), info.get("run")), key=lambda b: b[0])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return best[1]


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def covered(key: str, prefixes) -> bool:
    return any(p == "*" or key == p or key.startswith(p + ".") for p in prefixes)


def recipe_changes(saved: dict, now: dict, allowed: list[str]) -> list[str]:
    """``key (old -> new)`` for each key whose value differs between a checkpoint's recipe and the
    resumed one, leaving out CHANGEABLE and ``allowed`` (key paths or their prefixes; ``*``: all)."""
    a, b = _flatten(saved), _flatten(now)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k) and not covered(k, CHANGEABLE) and not covered(k, allowed):
            out.append(f"{k} ({_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))})")
    return out


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."
