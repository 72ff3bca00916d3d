"""What a run reports and records about its training, besides the weights.

The progress line (loss, samples/s, ETA), the throughput and MFU figures in the logs, the count
of steps skipped for a non-finite loss, the tracker's flattened config and wandb's offline
default, and the run dir's own files: the write check, ``history.jsonl``, ``loss.png`` and
``metrics.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from ..perf import peak_tflops, precision_of
from ..recipe import Recipe


class Progress:
    """A progress line with loss, samples/s and ETA: a live bar on a terminal, plain lines in a log."""

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.t0 = time.time()
        self.samples = 0
        self.tty = sys.stdout.isatty()

    def update(self, step: int, samples: int, logs: dict[str, float]) -> dict[str, float]:
        self.samples += samples
        dt = max(time.time() - self.t0, 1e-9)
        sps = self.samples / dt
        done = step - self.start
        eta = (self.total - step) * dt / max(done, 1)
        stats = {"samples_per_s": sps}
        if self.enabled and (step % self.every == 0 or step == self.total or self.tty):
            parts = " | ".join(f"{k} {v:.4g}" for k, v in logs.items())
            line = f"step {step}/{self.total} | {parts} | {sps:.1f} samples/s | eta {_hms(eta)}"
            if self.tty:
                print("\r" + line.ljust(110), end="\n" if step % self.every == 0 or step == self.total else "", flush=True)
            else:
                print(line, flush=True)
        return stats


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Throughput:
    """Samples/s, achieved TFLOP/s per device and model-FLOPs utilisation for the logs: the
    trained model's FLOPs per sample are counted once (``plugin.train_flops_per_sample``)."""

    def __init__(self, plugin, recipe: Recipe, accelerator: Accelerator):
        self.plugin, self.accelerator = plugin, accelerator
        self.flops: float | None = None
        self.counted = False
        precision = precision_of(accelerator.mixed_precision, recipe.train.allow_tf32)
        self.peak, _ = peak_tflops(accelerator.device, precision, recipe.train.peak_tflops)

    def logs(self, samples_per_s: float) -> dict[str, float]:
        if not self.counted:
            self.counted = True
            try:
                self.flops = self.plugin.train_flops_per_sample()
            except Exception as e:  # noqa: BLE001 - a counting failure must not stop training
                self.accelerator.print(f"warning: could not count model FLOPs ({type(e).__name__}: {e}); no MFU logged")
        if not self.flops:
            return {}
        per_device = samples_per_s / self.accelerator.num_processes * self.flops / 1e12
        out = {"tflops_per_device": per_device}
        if self.peak:
            out["mfu"] = per_device / self.peak
        return out


class NonFinite:
    """Counts steps skipped for a NaN/inf loss or gradient norm (in all, and in a row); resumes
    its total from the run's history."""

    def __init__(self, loop_state: dict):
        self.total = loop_state.get("nonfinite_steps", 0)
        self.in_a_row = 0

    def update(self, skipped: bool, step: int, accelerator: Accelerator) -> int:
        if not skipped:
            self.in_a_row = 0
            return 0
        self.total += 1
        self.in_a_row += 1
        if self.total <= 10 or self.in_a_row > 1:
            accelerator.print(f"warning: step {step}: the loss or gradient is NaN/inf; the step was skipped "
                              f"({self.in_a_row} in a row, {self.total} in all)")
        return self.in_a_row


def flat(d: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys with scalar values, for a tracker."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v if v is not None else "none"
        else:
            out[key] = str(v)
    return out


def wandb_offline_unless_configured() -> None:
    """wandb logs offline (to RUN/logs/wandb) unless the user has set it up: WANDB_MODE,
    WANDB_API_KEY or a stored login."""
    if "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ:
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def read_history(run_dir: Path) -> list[dict]:
    p = run_dir / "history.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def write_history(d: Path, history: list[dict]) -> None:
    with open(d / "history.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")


def plot_loss(run_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    # matplotlib is imported here, at the end of a run, not with the loop: it adds seconds to start-up
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]  # held-out rows (heldout.py)
    history = [h for h in history if "loss" in h]  # not the evaluation entries (quality.py)
    if not history:
        return
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1)
    if len(loss) > 8:
        k = max(len(loss) // 20, 2)
        smooth = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, lw=2, label="moving average")
    if val:
        ax.plot(*zip(*val), "o-", color="C3", lw=1.5, ms=3, label="validation (held-out rows, fixed noise)")
    if len(loss) > 8 or val:
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    every = loss + [v for _, v in val]
    ax.set_yscale("log" if min(every) > 0 and max(every) / max(min(every), 1e-12) > 20 else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)


def merge_metrics(run_dir: Path, metrics: dict) -> None:
    p = run_dir / "metrics.json"
    old = json.loads(p.read_text()) if p.exists() else {}
    old.update(metrics)
    p.write_text(json.dumps(old, indent=2))
