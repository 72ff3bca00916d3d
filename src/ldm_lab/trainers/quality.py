"""Quality during training: evaluation at ``eval.every`` steps, the run's clocks, time-to-quality
and ``metrics.png``.

Every history entry carries two clocks: ``wall_s`` (seconds of the step loop, everything
included) and ``train_s`` (the same less validation, evaluation and checkpoints), both continued
across a resume from the checkpoint's history. An evaluation step adds one history entry of the
plugin's metrics (``plugin.evaluate_during``; the shapes trainers: ``adherence/seen/shape`` ...).
At the end, ``time_to_quality`` in metrics.json gives, for each adherence and each threshold of
``eval.thresholds``, the first evaluation step that reached it and its two clocks (null: never).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ADHERENCE = "adherence/"
IMAGE = "image/"  # FID, KID, CMMD, CLIP score (evaluation/image_metrics.py)


class Clock:
    """``wall_s`` and ``train_s`` of the step loop, continued from a resumed history."""

    def __init__(self, history: list[dict]):
        last = next((h for h in reversed(history) if "wall_s" in h), {})
        self.wall0, self.paused0 = float(last.get("wall_s", 0.0)), float(last.get("wall_s", 0.0) - last.get("train_s", 0.0))
        self.t0 = time.perf_counter()
        self.paused_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is wall time, not training time (validation, evaluation, checkpoints)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def now(self) -> dict[str, float]:
        wall = self.wall0 + time.perf_counter() - self.t0
        return {"wall_s": round(wall, 3), "train_s": round(wall - self.paused0 - self.paused_s, 3)}


def is_eval_step(every: int, step: int, max_steps: int) -> bool:
    return bool(every) and (step % every == 0 or step == max_steps)


def evaluate_during(plugin, step: int) -> dict[str, float]:
    """The plugin's metrics at ``step``, drawn without touching the training's random streams:
    a run with evaluation steps trains the same weights as one without."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return plugin.evaluate_during(step)


def adherence_logs(result: dict) -> dict[str, float]:
    """Flat ``adherence/<split>/<attribute>`` numbers of a shapes evaluation result."""
    out = {}
    for split in ("seen", "heldout"):
        for attr, v in result.get(split, {}).items():
            if attr not in ("n", "background_noise") and isinstance(v, (int, float)):
                out[f"{ADHERENCE}{split}/{attr}"] = float(v)
    return out


def time_to_quality(history: list[dict], thresholds: list[float]) -> dict:
    """For each adherence series of the history and each threshold: the first evaluation entry at
    or above it (``step``, ``wall_s``, ``train_s``), or None when none reached it."""
    evals = [h for h in history if any(k.startswith(ADHERENCE) for k in h)]
    names = sorted({k for h in evals for k in h if k.startswith(ADHERENCE)})
    out: dict = {}
    for name in names:
        per = {}
        for thr in thresholds:
            hit = next((h for h in evals if name in h and h[name] >= thr), None)
            per[f"{thr:g}"] = None if hit is None else {k: hit.get(k) for k in ("step", "wall_s", "train_s")}
        out[name[len(ADHERENCE):]] = per
    return out


def plot_metrics(run_dir: Path, history: list[dict], thresholds: list[float]) -> bool:
    """``metrics.png``: every adherence series against the step (seen solid, held-out dashed) with
    the thresholds as dotted lines; False (nothing drawn) when the history has no evaluation."""
    evals = [h for h in history if any(k.startswith(ADHERENCE) for k in h)]
    images = [h for h in history if any(k.startswith(IMAGE) for k in h)]
    if not evals and not images:
        return False
    import matplotlib  # at the end of a run only (seconds of import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(evals)) + int(bool(images))
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    if images:
        _plot_image_metrics(axes[0, -1], images)
    if not evals:
        fig.tight_layout()
        fig.savefig(run_dir / "metrics.png", dpi=100)
        plt.close(fig)
        return True
    ax = axes[0, 0]
    attrs = ("color", "shape", "size", "position", "background", "all")
    for i, attr in enumerate(attrs):
        for split, style in (("seen", "-"), ("heldout", "--")):
            key = f"{ADHERENCE}{split}/{attr}"
            pts = [(h["step"], h[key]) for h in evals if key in h]
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", marker="o", ms=3, lw=1.5,
                        label=f"{attr} ({split})")
    for thr in thresholds:
        ax.axhline(thr, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("adherence")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(run_dir / "metrics.png", dpi=100)
    plt.close(fig)
    return True


def _plot_image_metrics(ax, entries: list[dict]) -> None:
    """FID, KID × 100 and CMMD against the step (log scale, lower is better), CLIP score on a twin axis."""
    for i, (key, scale, label) in enumerate(((f"{IMAGE}fid", 1, "FID"), (f"{IMAGE}kid", 100, "KID x 100"),
                                             (f"{IMAGE}cmmd", 1, "CMMD"))):
        pts = [(h["step"], max(h[key] * scale, 1e-6)) for h in entries if key in h]
        if pts:
            ax.plot(*zip(*pts), "-o", color=f"C{i}", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distance to the held-out images (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    pts = [(h["step"], h[f"{IMAGE}clip_score"]) for h in entries if f"{IMAGE}clip_score" in h]
    if pts:
        twin = ax.twinx()
        twin.plot(*zip(*pts), "--s", color="C3", ms=3, label="CLIP score")
        twin.set_ylabel("CLIP score")
        twin.legend(fontsize=7, loc="lower right")
