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
import multiprocessing as mp
import resource
import signal
import statistics
import time
import traceback
from contextlib import nullcontext
from multiprocessing.connection import wait
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from .data import shapes
from .evaluation.run import shapes_eval
from .perf import (
    PeakMemory,
    Phases,
    device_name,
    peak_tflops,
    precision_of,
    release_host_memory,
    resolve_host_allocator,
)
from .recipe import Recipe, choices, load_recipe, pipeline_defaults
from .sampling import generate, is_flow, load_pipeline, usable_samplers, use_sampler
from .trainers.loop import train

NAIVE = ["data.cache_latents=false", "data.num_workers=0", "data.buckets.enabled=false", "train.channels_last=false",
         "train.compile=false", "train.optimizer_impl=torch", "train.ema.foreach=false", "train.host_allocator=system"]
PHASES = ["data", "autoencoder", "text_encoder", "forward", "backward", "optimizer", "ema"]
LABELS = {"data": "data wait", "autoencoder": "autoencoder", "text_encoder": "text encoder", "forward": "denoiser fwd",
          "backward": "denoiser bwd", "optimizer": "optimizer", "ema": "EMA", "other": "other"}


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
        self.faults = 0

    def phase(self, name: str):
        if self._last is None:
            self._last = time.perf_counter()
            if self.warmup == 0:  # no warm-up: the memory window opens with the first step
                self._open()
        return super().phase(name) if self.breakdown else nullcontext()

    def end_step(self, samples: int) -> None:
        super().end_step(samples)
        self._sync()
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now
        if len(self.steps) == self.warmup:
            self._open()
        if len(self.steps) == self.total:  # closed before anything the loop does after its last step
            self.memory.__exit__(None, None, None)
            self.faults = _minor_faults() - self.faults

    def _open(self) -> None:
        self.memory.__enter__()
        self.faults = _minor_faults()


def _minor_faults() -> int:
    """Minor page faults of this process so far (every fresh page the allocator hands out)."""

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """``recipe`` with dotted overrides, validated like a recipe file (bad keys: UserError)."""

    return load_recipe(None, overrides, data=recipe.model_dump(mode="json"), check_paths=False)


def bench_recipe(recipe: Recipe, steps: int, warmup: int, out: Path) -> Recipe:
    """The recipe as the benchmark runs it: ``warmup + steps`` steps, nothing but training."""
    return apply_overrides(recipe, [
        f"train.max_steps={steps + warmup}", "train.checkpoint_every=null", "train.resume=null", "validation.every=null",
        "eval.shapes=false", "logging.tracker=none", f"logging.log_every={steps + warmup + 1}", f"output.dir={out}"])


def run_training(recipe: Recipe, name: str, steps: int, warmup: int, out: Path, peak: float | None, log=print) -> dict:
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
        recipe.output.overwrite = True  # a timing row's scratch run: each round replaces the last
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
        "pipeline": name, "samples_per_s_rounds": [samples / sum(timed)], "device": device_name(),
        "batch_size": recipe.train.batch_size, "steps": steps, "samples_per_s": sps, "step_s": step_s,
        "phases_s": phases, "peak_memory_bytes": throughput.memory.peak, "peak_memory_kind": throughput.memory.kind,
        # host page faults per timed step; the warm-up's wall time (includes compilation)
        "page_faults_per_step": throughput.faults / len(timed), "warmup_s": sum(throughput.step_times[:warmup]),
        "step_s_p10_p90": _p10_p90(timed), "step_times_s": list(timed),
        "model_flops_per_sample": flops, "achieved_tflops": achieved, "peak_tflops": peak_tf, "peak_source": peak_src,
        "mfu": achieved / peak_tf if achieved and peak_tf else None, "precision": precision,
        "recipe": {"cache_latents": recipe.data.cache_latents, "num_workers": recipe.data.num_workers,
                   "channels_last": recipe.train.channels_last, "compile": recipe.train.compile,
                   "optimizer_impl": recipe.train.optimizer_impl, "attention": recipe.train.attention,
                   "mixed_precision": recipe.train.mixed_precision, "ema": recipe.train.ema.enabled,
                   "host_allocator": recipe.train.host_allocator, "frozen_dtype": recipe.train.frozen_dtype},
    }
    state.clear()
    del plugin
    gc.collect()
    return result


def run(recipe: Recipe, steps: int = 20, warmup: int = 3, compare: str | None = None, peak: float | None = None,
        out: Path = Path("runs/bench"), variants: dict[str, list[str]] | None = None, log=print,
        rounds: int = 1) -> dict:
    """Benchmark ``recipe`` (and the naive pipeline, and any named override sets).

    ``rounds=1``: every row once, one after the other, in this process. ``rounds=N``: every row N
    times, each time in a fresh process (the same start for every row: no heap, allocator policy
    or page cache state left by the row before), the order reversed every other round so a slow
    drift of the machine's speed falls on every row alike; each row reports its medians and the
    ratio is the median of the per-round ratios."""
    recipe = pipeline_defaults(recipe)
    plan: list[tuple[str, Recipe]] = []
    if compare == "naive":
        plan.append(("naive", apply_overrides(recipe, NAIVE)))
    plan.append(("ldm-lab", recipe))
    for name, ov in (variants or {}).items():
        plan.append((name, apply_overrides(recipe, ov)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for _, r in plan:  # each row's allocator policy as training will resolve it, so rows sort and report it
        r.train.host_allocator = resolve_host_allocator(r.train.host_allocator, device)
    if rounds == 1:
        # rows on glibc's own allocator policy run before any row that changes it: once changed, glibc's
        # dynamic mmap threshold cannot be restored in this process (perf.host_allocator)
        plan.sort(key=lambda row: (row[0] != "naive", row[1].train.host_allocator != "system"))
        results = [run_training(r, name, steps, warmup, Path(out), peak, log) for name, r in plan]
        report: dict = {"results": results, "rounds": 1}
    else:
        per_row: dict[str, list[dict]] = {name: [] for name, _ in plan}
        for i in range(rounds):
            for name, r in (plan if i % 2 == 0 else plan[::-1]):
                log(f"[round {i + 1}/{rounds}] {name} in a fresh process")
                per_row[name].append(_in_fresh_process(r, name, steps, warmup, Path(out), peak))
        results = [_median_row(per_row[name]) for name, _ in plan]
        report = {"results": results, "rounds": rounds}
    base = next((r for r in results if r["pipeline"] == "naive"), None)
    ours = next(r for r in results if r["pipeline"] == "ldm-lab")
    if base is not None:
        per_round = [o / b for o, b in zip(ours["samples_per_s_rounds"], base["samples_per_s_rounds"])]
        report["speedup_vs_naive"] = statistics.median(per_round)
        report["speedup_per_round"] = per_round
        report["memory_vs_naive"] = ours["peak_memory_bytes"] / base["peak_memory_bytes"]
    return report


def _row_child(conn, recipe_data: dict, name: str, steps: int, warmup: int, out: str, peak: float | None) -> None:
    """Entry point of a fresh benchmark process: one row, its result sent back through ``conn``."""

    try:

        recipe = load_recipe(None, [], data=recipe_data, check_paths=False)
        conn.send(("ok", run_training(recipe, name, steps, warmup, Path(out), peak)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _in_fresh_process(recipe: Recipe, name: str, steps: int, warmup: int, out: Path, peak: float | None) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_row_child, args=(child, recipe.model_dump(mode="json"), name, steps, warmup, str(out), peak))
    p.start()
    child.close()

    status, payload = "error", "the process ended without a result"
    # a result, or the process's end (killed, out of memory) without one: either wakes this wait
    if parent in wait([parent, p.sentinel]):
        try:
            status, payload = parent.recv()
        except EOFError:
            pass
    p.join(timeout=60)
    if p.is_alive():  # sent its result but hangs in shutdown (a worker that does not exit)
        print(f"[{name}] the row's process did not exit 60 s after its result; terminating it")
        p.terminate()
        p.join()
    if status != "ok":
        how = f"exit code {p.exitcode}"
        if p.exitcode is not None and p.exitcode < 0:

            sig = signal.Signals(-p.exitcode).name
            how = f"killed by {sig}" + (" (the kernel's out-of-memory killer sends it: lower train.batch_size)"
                                        if sig == "SIGKILL" else "")
        raise RuntimeError(f"benchmark row {name!r} failed in its process ({how}): {payload}")
    return payload


def _p10_p90(times: list[float]) -> list[float]:
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.1, 0.9], dtype=torch.float64))
    return [float(v) for v in q]


def _median_row(rows: list[dict]) -> dict:
    """One row's rounds as one result: medians of the timings, the largest peak memory."""
    med = statistics.median
    r = dict(rows[0])
    r["samples_per_s_rounds"] = [x["samples_per_s"] for x in rows]
    r["samples_per_s"] = med(r["samples_per_s_rounds"])
    r["step_s"] = med(x["step_s"] for x in rows)
    r["phases_s"] = {k: med(x["phases_s"].get(k, 0.0) for x in rows) for k in rows[0]["phases_s"]}
    r["peak_memory_bytes"] = max(x["peak_memory_bytes"] for x in rows)
    for k in ("page_faults_per_step", "warmup_s"):
        r[k] = med(x[k] for x in rows)
    # the spread of every timed step of every round together: a slow round shows in p90
    r["step_times_s"] = [v for x in rows for v in x["step_times_s"]]
    r["step_s_p10_p90"] = _p10_p90(r["step_times_s"])
    r["achieved_tflops"] = r["samples_per_s"] * r["model_flops_per_sample"] / 1e12 if r["model_flops_per_sample"] else None
    r["mfu"] = r["achieved_tflops"] / r["peak_tflops"] if r["achieved_tflops"] and r["peak_tflops"] else None
    return r


def format_training(report: dict) -> str:
    results = report["results"]
    cols = ["samples/s", "step ms"] + [LABELS[k] + " ms" for k in [*PHASES, "other"]] + \
        ["peak mem MiB", "faults/step", "warm-up s", "GFLOP/sample", "TFLOP/s", "MFU"]
    lines = ["| pipeline | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        p = r["phases_s"]
        cells = [f"{r['samples_per_s']:.1f}", f"{1000 * r['step_s']:.0f}"]
        cells += [f"{1000 * p.get(k, 0.0):.0f}" for k in [*PHASES, "other"]]
        cells += [f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['page_faults_per_step']:.0f}", f"{r['warmup_s']:.1f}",
                  f"{r['model_flops_per_sample'] / 1e9:.2f}" if r["model_flops_per_sample"] else "-",
                  f"{r['achieved_tflops']:.3f}" if r["achieved_tflops"] else "-",
                  f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"]
        lines.append(f"| {r['pipeline']} | " + " | ".join(cells) + " |")
    r0 = results[0]
    lines.append(f"device: {r0['device']}; batch {r0['batch_size']}; {r0['steps']} timed steps; peak memory = "
                 f"{r0['peak_memory_kind']} over the timed steps; MFU against {r0['peak_source']}")
    n = report.get("rounds", 1)
    if n > 1:
        lines.append(f"{n} rounds, every row in a fresh process each round, order reversed every other round; "
                     "timings are medians over rounds, peak memory the largest")
    if "speedup_vs_naive" in report:
        spread = report["speedup_per_round"]
        lines.append(f"ldm-lab vs naive: {report['speedup_vs_naive']:.2f}x samples/s"
                     + (f" (median of rounds {', '.join(f'{x:.2f}' for x in spread)})" if n > 1 else "")
                     + f", {report['memory_vs_naive']:.2f}x peak memory")
    return "\n".join(lines)


# -- sampling ---------------------------------------------------------------------------------
STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "euler": 30, "unipc": 15}  # per sampler; others: its usual count


def default_samplers(pipe) -> list[tuple[str, int]]:
    """(sampler, steps) for every sampler the loaded pipeline can run: each DDPM-family one for a
    UNet or a DDPM PixArt, the flow-matching ones its pipeline can call for a flow model (SD3: euler,
    dpm++, unipc; a flow PixArt: dpm++, unipc)."""
    flow = is_flow(pipe.scheduler.config)
    table = choices.FLOW_SAMPLERS if flow else choices.SAMPLERS
    return [(name, STEPS.get(name, table[name].default_steps)) for name in usable_samplers(pipe)]


def run_sampling(source: str, n: int = 48, heldout_n: int = 0, guidance: float = 2.5, batch: int = 16,
                 samplers=None, out: Path = Path("runs/bench/sampling"), seed: int = 1234, log=print) -> dict:
    """Latency per image of each (sampler, steps) at ``batch`` images per call (default: every
    sampler the pipeline's family and objective can run), and the shapes adherence its ``n`` images
    reach (fixed prompts and seeds, the same for every sampler). Any family's pipeline: UNet,
    PixArt, SD3."""

    pipe = load_pipeline(source)
    samplers = default_samplers(pipe) if samplers is None else samplers
    world = shapes.World()
    rows = []
    for name, steps in samplers:
        timing = {"s": 0.0, "images": 0}

        def sample(prompts, seeds, sampler, steps_, guidance_, name=name, timing=timing):
            use_sampler(pipe, name)
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
    return {"source": str(source), "pipeline": type(pipe).__name__, "n": n, "batch": batch, "guidance": guidance,
            "samplers": rows, "device": device_name()}


def format_sampling(report: dict) -> str:
    lines = ["| sampler | steps | s/image | colour | shape | size | position | background | all five |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["samplers"]:
        a = r["adherence"]
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['s_per_image']:.3f} | " +
                     " | ".join(f"{100 * a[k]:.1f}%" for k in ("color", "shape", "size", "position", "background", "all")) + " |")
    lines.append(f"{report.get('pipeline', 'pipeline')}; device: {report['device']}; {report['n']} prompts (fixed seeds), batches of {report['batch']}, "
                 f"guidance {report['guidance']}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
