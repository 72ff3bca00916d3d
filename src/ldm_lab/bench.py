"""``ldm-lab bench``: training throughput of a recipe (and of the naive per-step pipeline on the
same model, data and batch size, in the same process), and sampling latency per sampler with the
shapes adherence each reaches.

A training benchmark is the real loop (``trainers.loop.train``) for ``warmup + steps`` steps
with its step-phase timer on; validation, checkpoints, evaluation and the artifact are off.
The naive pipeline is what diffusers' example scripts do: images decoded and transformed every
step, the autoencoder and text encoder run every step, no dataloader workers, no cached latents,
torch's default AdamW, no channels_last, no compilation. It runs first, so whatever memory it
leaves behind counts against ldm-lab's figure, not for it.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .perf import PeakMemory, Phases, peak_tflops, precision_of, release_host_memory
from .recipe import Recipe, pipeline_defaults

NAIVE = ["data.cache_latents=false", "data.num_workers=0", "data.buckets.enabled=false", "train.channels_last=false",
         "train.compile=false", "train.optimizer_impl=torch", "train.ema.foreach=false", "train.host_allocator=system"]
PHASES = ["data", "autoencoder", "text_encoder", "forward", "backward", "optimizer", "ema"]
LABELS = {"data": "data wait", "autoencoder": "autoencoder", "text_encoder": "text encoder", "forward": "UNet fwd",
          "backward": "UNet bwd", "optimizer": "optimizer", "ema": "EMA", "other": "other"}


class _WindowPhases(Phases):
    """Phases that also time each whole step and measure peak memory over the timed steps only.
    ``breakdown=False`` times whole steps only (no synchronisation inside a step: on a GPU the
    throughput pass keeps the overlap of host and device work)."""

    def __init__(self, device, warmup: int, total: int, breakdown: bool = True):
        super().__init__(True, device)
        self.breakdown = breakdown
        self.warmup, self.total = warmup, total
        self.memory = PeakMemory(device)
        self._last: float | None = None
        self.step_times: list[float] = []

    def phase(self, name: str):
        if self._last is None:
            self._last = time.perf_counter()
            if self.warmup == 0:  # no warm-up: the memory window opens with the first step
                self.memory.__enter__()
        return super().phase(name) if self.breakdown else nullcontext()

    def end_step(self, samples: int) -> None:
        super().end_step(samples)
        self._sync()
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now
        if len(self.steps) == self.warmup:
            self.memory.__enter__()
        if len(self.steps) == self.total:  # closed before anything the loop does after its last step
            self.memory.__exit__(None, None, None)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """``recipe`` with dotted overrides, validated like a recipe file (bad keys: RecipeError)."""
    from .recipe import load_recipe

    return load_recipe(None, overrides, data=recipe.model_dump(mode="json"), check_paths=False)


def bench_recipe(recipe: Recipe, steps: int, warmup: int, out: Path) -> Recipe:
    """The recipe as the benchmark runs it: ``warmup + steps`` steps, nothing but training."""
    return apply_overrides(recipe, [
        f"train.max_steps={steps + warmup}", "train.checkpoint_every=null", "train.resume=null", "validation.every=null",
        "eval.shapes=false", "logging.tracker=none", f"logging.log_every={steps + warmup + 1}", f"output.dir={out}"])


def run_training(recipe: Recipe, name: str, steps: int, warmup: int, out: Path, peak: float | None, log=print) -> dict:
    from accelerate.state import AcceleratorState

    from .trainers.loop import train

    recipe = bench_recipe(recipe, steps, warmup, out / name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    passes = [False, True] if device == "cuda" else [True]  # GPU: throughput unsynchronised, then the breakdown
    for breakdown in passes:
        release_host_memory()  # every row starts from a trimmed heap: peak memory compares fairly
        AcceleratorState._reset_state(True)  # each run sets up accelerate afresh (compile, precision)
        prof = _WindowPhases(device, warmup, warmup + steps, breakdown)
        state: dict = {}
        log(f"[{name}] {warmup} warm-up + {steps} timed steps, batch {recipe.train.batch_size}"
            + ("" if breakdown else " (throughput pass)"))
        train(recipe, out / name, profile=prof, finish=False, state=state)
        if not breakdown:
            throughput = prof
    throughput = throughput if len(passes) > 1 else prof
    timed = throughput.step_times[warmup:]
    samples = sum(s["samples"] for s in throughput.steps[warmup:])
    phases = prof.summary(skip=warmup)
    step_s = sum(timed) / len(timed)
    phases["other"] = max(step_s - sum(phases.get(k, 0.0) for k in PHASES), 0.0)
    plugin = state["plugin"]
    flops = plugin.train_flops_per_sample()
    sps = samples / sum(timed)
    precision = precision_of(recipe.train.mixed_precision, recipe.train.allow_tf32)
    peak_tf, peak_src = peak_tflops(device, precision, peak)
    achieved = sps * flops / 1e12 if flops else None
    result = {
        "pipeline": name, "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": recipe.train.batch_size, "steps": steps, "samples_per_s": sps, "step_s": step_s,
        "phases_s": phases, "peak_memory_bytes": throughput.memory.peak, "peak_memory_kind": throughput.memory.kind,
        "model_flops_per_sample": flops, "achieved_tflops": achieved, "peak_tflops": peak_tf, "peak_source": peak_src,
        "mfu": achieved / peak_tf if achieved and peak_tf else None, "precision": precision,
        "recipe": {"cache_latents": recipe.data.cache_latents, "num_workers": recipe.data.num_workers,
                   "channels_last": recipe.train.channels_last, "compile": recipe.train.compile,
                   "optimizer_impl": recipe.train.optimizer_impl, "attention": recipe.train.attention,
                   "mixed_precision": recipe.train.mixed_precision, "ema": recipe.train.ema.enabled,
                   "host_allocator": recipe.train.host_allocator},
    }
    state.clear()
    del plugin
    gc.collect()
    return result


def run(recipe: Recipe, steps: int = 20, warmup: int = 3, compare: str | None = None, peak: float | None = None,
        out: Path = Path("runs/bench"), variants: dict[str, list[str]] | None = None, log=print) -> dict:
    """Benchmark ``recipe`` (and the naive pipeline, and any named override sets) in this process."""
    recipe = pipeline_defaults(recipe)
    plan: list[tuple[str, Recipe]] = []
    if compare == "naive":
        plan.append(("naive", apply_overrides(recipe, NAIVE)))
    plan.append(("ldm-lab", recipe))
    for name, ov in (variants or {}).items():
        plan.append((name, apply_overrides(recipe, ov)))
    # rows on glibc's own allocator policy run before any row that changes it: once changed, glibc's
    # dynamic mmap threshold cannot be restored in this process (perf.host_allocator)
    plan.sort(key=lambda row: (row[0] != "naive", row[1].train.host_allocator != "system"))
    results = [run_training(r, name, steps, warmup, Path(out), peak, log) for name, r in plan]
    report = {"results": results}
    base = next((r for r in results if r["pipeline"] == "naive"), None)
    ours = next(r for r in results if r["pipeline"] == "ldm-lab")
    if base is not None:
        report["speedup_vs_naive"] = ours["samples_per_s"] / base["samples_per_s"]
        report["memory_vs_naive"] = ours["peak_memory_bytes"] / base["peak_memory_bytes"]
    return report


def format_training(report: dict) -> str:
    results = report["results"]
    cols = ["samples/s", "step ms"] + [LABELS[k] + " ms" for k in [*PHASES, "other"]] + \
        ["peak mem MiB", "GFLOP/sample", "TFLOP/s", "MFU"]
    lines = ["| pipeline | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        p = r["phases_s"]
        cells = [f"{r['samples_per_s']:.1f}", f"{1000 * r['step_s']:.0f}"]
        cells += [f"{1000 * p.get(k, 0.0):.0f}" for k in [*PHASES, "other"]]
        cells += [f"{r['peak_memory_bytes'] / 2**20:.0f}",
                  f"{r['model_flops_per_sample'] / 1e9:.2f}" if r["model_flops_per_sample"] else "-",
                  f"{r['achieved_tflops']:.3f}" if r["achieved_tflops"] else "-",
                  f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"]
        lines.append(f"| {r['pipeline']} | " + " | ".join(cells) + " |")
    r0 = results[0]
    lines.append(f"device: {r0['device']}; batch {r0['batch_size']}; {r0['steps']} timed steps; peak memory = "
                 f"{r0['peak_memory_kind']} over the timed steps; MFU against {r0['peak_source']}")
    if "speedup_vs_naive" in report:
        lines.append(f"ldm-lab vs naive: {report['speedup_vs_naive']:.2f}x samples/s, "
                     f"{report['memory_vs_naive']:.2f}x peak memory")
    return "\n".join(lines)


# -- sampling ---------------------------------------------------------------------------------
SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("dpm++", 20), ("euler", 30), ("unipc", 15)]


def run_sampling(source: str, n: int = 48, heldout_n: int = 0, guidance: float = 2.5, batch: int = 16,
                 samplers=SAMPLERS, out: Path = Path("runs/bench/sampling"), seed: int = 1234, log=print) -> dict:
    """Latency per image of each (sampler, steps) at ``batch`` images per call, and the shapes
    adherence its ``n`` images reach (fixed prompts and seeds, the same for every sampler)."""
    from .data import shapes
    from .evaluation.run import shapes_eval
    from .sampling import generate, load_pipeline, make_sampler

    pipe = load_pipeline(source)
    world = shapes.World()
    rows = []
    for name, steps in samplers:
        timing = {"s": 0.0, "images": 0}

        def sample(prompts, seeds, sampler, steps_, guidance_, name=name, timing=timing):
            pipe.scheduler = make_sampler(name, pipe.scheduler.config)
            images = []
            for i in range(0, len(prompts), batch):
                t0 = time.perf_counter()
                images += generate(pipe, prompts[i:i + batch], seeds[i:i + batch], steps_, guidance_)
                if i or len(prompts) <= batch:  # the first call warms up (allocations, kernels) when there are more
                    timing["s"] += time.perf_counter() - t0
                    timing["images"] += len(prompts[i:i + batch])
            return images

        log(f"[sampling] {name} {steps} steps")
        result = shapes_eval(sample, world, Path(out) / f"{name}-{steps}", n, heldout_n, seed, name, steps, guidance)
        rows.append({"sampler": name, "steps": steps, "s_per_image": timing["s"] / max(timing["images"], 1),
                     "adherence": {k: result.get("seen", result)[k] for k in ("color", "shape", "size", "position", "background", "all")}})
    return {"source": str(source), "n": n, "batch": batch, "guidance": guidance, "samplers": rows,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}


def format_sampling(report: dict) -> str:
    lines = ["| sampler | steps | s/image | colour | shape | size | position | background | all five |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["samplers"]:
        a = r["adherence"]
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['s_per_image']:.3f} | " +
                     " | ".join(f"{100 * a[k]:.1f}%" for k in ("color", "shape", "size", "position", "background", "all")) + " |")
    lines.append(f"device: {report['device']}; {report['n']} prompts (fixed seeds), batches of {report['batch']}, "
                 f"guidance {report['guidance']}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
