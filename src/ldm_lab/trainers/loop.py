"""The one training loop. Every trainer plugin runs through ``train``.

The loop owns: Accelerate set-up (devices, processes, mixed precision, accumulation), the
optimiser and LR schedule, gradient clipping of exactly the trainable parameters, EMA,
validation cadence, checkpoints with a total limit, resume, logging and the progress line.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..errors import TrainingDiverged, UserError
from ..perf import OFF, Phases, host_allocator
from ..recipe import Recipe, dump_recipe, pipeline_defaults
from .registry import get_trainer

CKPT_PREFIX = "checkpoint-"


def make_optimizer(recipe: Recipe, param_groups: list[dict], device: torch.device | None = None) -> torch.optim.Optimizer:
    t = recipe.train
    kw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    impl = t.optimizer_impl
    if impl == "auto":  # fused where the training device has the fused kernel
        impl = "fused" if (device.type if device is not None else "cpu") in ("cpu", "cuda") else "foreach"
    impl_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}, "torch": {}}[impl]
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer is adamw8bit but bitsandbytes is not installed; "
                              "pip install 'ldm-lab[bnb]' or use train.optimizer=adamw.") from None
        return bnb.optim.AdamW8bit(param_groups, **kw)
    return torch.optim.AdamW(param_groups, **kw, **impl_kw)


def clip_gradients(accelerator: Accelerator, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of exactly the parameters the optimiser trains (every param group:
    adapters of a LoRA run, both the UNet's and the text encoder's); returns the norm before, as a
    0-dim tensor on the device (no host sync), or None under DeepSpeed before its engine has one
    (it clips with its own gradient_clipping)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = accelerator.clip_grad_norm_(params, max_norm)
    return None if norm is None else torch.as_tensor(norm, device=accelerator.device).float().reshape(())


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


def _cycle(accelerator: Accelerator, dataloader, start: int, batches_per_epoch: int, seed: int = 0):
    """Batches forever from batch ``start`` on: a resumed run starts in the epoch it stopped in,
    with that epoch's shuffle order, and skips the batches of it already seen. The epoch is set
    explicitly because a new (or skipping) dataloader counts its epochs from 0 and would replay
    epoch 0's order."""
    epoch, skip = divmod(start, batches_per_epoch)
    while True:
        if getattr(dataloader, "generator", None) is not None:
            # the workers' seeds of this epoch, the same whether the run resumed or not (the shuffle
            # order has its own seed, set by the seedable sampler)
            dataloader.generator.manual_seed(seed + epoch)
        # on the prepared loader, which reaches the shared sampler even when it is sharded across
        # processes (a skipping loader's own set_epoch does not)
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        dl = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        if dl is not dataloader and hasattr(dl, "set_epoch"):
            dl.set_epoch(epoch)
        skip = 0
        yield from dl
        epoch += 1


class StreamPosition:
    """Where this process is in its stream: the epoch and the batches of it trained on. Saved per
    process with each checkpoint, so a resumed run replays only the current epoch's batches, not
    every epoch before it (a stream has no index to jump to, and datasets' own resume state drops
    its shuffle buffer, which would change the order)."""

    checkpoint_name = "stream_position"  # its own file per process (not numbered among the plugin's states)
    per_process = True  # never another process's file: each process has its own part of the stream

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.epoch, self.batch, self.world_size, self.rank = 0, 0, world_size, rank
        self.valid, self.mismatch = False, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        # a resumed run on another number of processes splits the stream otherwise: no position in it holds
        if state.get("world_size") != self.world_size:
            self.mismatch = f"it was saved on {state.get('world_size')} processes, this run has {self.world_size}"
        elif state.get("rank") != self.rank:
            self.mismatch = f"process {self.rank} found process {state.get('rank')}'s position"
        else:
            self.epoch, self.batch, self.valid = int(state["epoch"]), int(state["batch"]), True


def _cycle_stream(accelerator: Accelerator, dataloader, start: int, position: StreamPosition | None = None,
                  seed: int = 0):
    """Batches of a stream forever, on this process's device, from batch ``start`` on. Each epoch
    reshuffles (datasets' ``set_epoch``); a resumed run replays the stream up to where it stopped
    (read, not trained on), so it sees the batches the uninterrupted run would have: from the
    start of the checkpoint's epoch when ``position`` was restored from it, else from the start.
    The loader's generator is seeded with ``seed + epoch`` before each epoch's iterator is made
    (the workers' seeds, and so their random crops and flips, come from it), so an epoch's batches
    do not depend on how many iterators were made before it."""
    from accelerate.utils import send_to_device

    position = position or StreamPosition(accelerator.num_processes)
    if position.valid:  # resume inside the saved epoch
        epoch, replay = position.epoch, position.batch
        accelerator.print(f"stream: resuming in epoch {epoch} after its first {replay} batches (read again, not "
                          "trained on)")
    else:
        epoch, replay = 0, start
        if start:
            why = position.mismatch or "the checkpoint holds no stream position"
            accelerator.print(f"stream: replaying the first {start} batches from the first epoch ({why})")
    if dataloader.generator is None:
        dataloader.generator = torch.Generator()
    while True:
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(epoch)
        dataloader.generator.manual_seed(seed + epoch)
        position.epoch, position.batch = epoch, 0
        n = 0
        it = iter(dataloader)
        while True:
            if replay > 0:  # replayed: read, not trained on, and augmentations must not draw from the RNG
                with torch.random.fork_rng(devices=[]):
                    batch = next(it, None)
            else:
                batch = next(it, None)
            if batch is None:
                break
            n += 1
            position.batch = n
            if replay > 0:
                replay -= 1
                continue
            yield send_to_device(batch, accelerator.device)
        if n == 0:
            raise UserError(f"process {accelerator.process_index} got no full batch from the stream; lower "
                              "train.batch_size, add data, or use fewer processes than the stream has shards.")
        epoch += 1


def train(recipe: Recipe, run_dir: str | Path | None = None, profile: Phases | None = None, finish: bool = True,
          state: dict | None = None) -> Path:
    """Run the recipe's trainer plugin to ``train.max_steps``; returns the run dir.

    ``profile`` (``ldm-lab bench``) times the phases of every step; ``finish=False`` skips the
    artifact, evaluation and history; ``state`` receives the plugin and accelerator."""
    profile = profile or OFF
    recipe = pipeline_defaults(recipe)
    run_dir = Path(run_dir or recipe.output.dir)
    t = recipe.train
    tracker = None if recipe.logging.tracker == "none" else recipe.logging.tracker
    if tracker == "wandb":
        _wandb_offline_unless_configured()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32
    accelerator = Accelerator(
        cpu=_multi_process_without_accelerator(),
        dynamo_backend="inductor" if t.compile else "no",
        # every optimiser step is exactly gradient_accumulation_steps batches, also across epoch ends, so a
        # resumed run's data position (step x accumulation) is exact
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        mixed_precision=t.mixed_precision,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # the shuffle order of every epoch comes from (seed, epoch), so a resumed run sees the
        # batches the uninterrupted one would have seen
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
    )
    accelerator.print(f"accelerate: {accelerator.distributed_type.value}, {accelerator.num_processes} process(es) on "
                      f"{accelerator.device.type}, mixed precision {accelerator.mixed_precision}")
    _check_distributed(accelerator, recipe)
    if accelerator.is_main_process:
        _check_writable(run_dir)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    set_seed(recipe.seed, device_specific=True)

    plugin = get_trainer(recipe.trainer)(recipe, accelerator, run_dir)
    plugin.prof = profile
    plugin.setup()
    modules = plugin.trainable_modules()
    if t.attention == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        for m in {*modules.values(), getattr(plugin, "unet", None)} - {None}:
            if hasattr(m, "set_attn_processor"):
                m.set_attn_processor(AttnProcessor())
    if t.compile:
        _compile_fallback(accelerator)
    if t.channels_last:
        for m in modules.values():
            m.to(memory_format=torch.channels_last)
    if t.gradient_checkpointing:
        for m in modules.values():
            if hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
    optimizer = make_optimizer(recipe, plugin.param_groups(), accelerator.device)
    # Each process steps the scheduler once per optimiser step, and accelerate's prepared
    # scheduler advances num_processes steps per call: scale so the schedule spans max_steps.
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * n,
                                 num_training_steps=t.max_steps * n)
    dataloader = plugin.train_dataloader()
    pin = recipe.data.pin_memory if recipe.data.pin_memory is not None else accelerator.device.type == "cuda"
    dataloader.pin_memory = pin
    if dataloader.generator is None:
        # a new DataLoader iterator draws its base seed from this generator, not from the global
        # RNG that noise and dropout use (a resumed run starts a new iterator mid-epoch)
        dataloader.generator = torch.Generator().manual_seed(recipe.seed)
    names = list(modules)
    # a stream (IterableDataset) is already split across processes (datasets' split_dataset_by_node);
    # accelerate would dispatch or shard it again, so it stays unprepared and batches move here
    stream = isinstance(dataloader.dataset, torch.utils.data.IterableDataset)
    if stream:
        prepared = accelerator.prepare(*modules.values(), optimizer, lr_scheduler)
        wrapped, (optimizer, lr_scheduler) = prepared[: len(names)], prepared[len(names):]
    else:
        prepared = accelerator.prepare(*modules.values(), optimizer, dataloader, lr_scheduler)
        wrapped, (optimizer, dataloader, lr_scheduler) = prepared[: len(names)], prepared[len(names):]
    for name, w in zip(names, wrapped):
        setattr(plugin, name, w)
    hooks = plugin.checkpoint_hooks()
    if hooks is not None:
        accelerator.register_save_state_pre_hook(hooks[0])
        accelerator.register_load_state_pre_hook(hooks[1])

    accelerator.print(host_allocator(t.host_allocator))
    rank_states = plugin.checkpoint_objects()  # saved per process by save_checkpoint
    position = StreamPosition(accelerator.num_processes, accelerator.process_index)
    if stream:
        rank_states = [*rank_states, position]  # last: the plugin's own states keep their file names
    ema = None
    if t.ema.enabled:
        ema = LerpEMA(_ema_params(plugin, accelerator), decay=t.ema.decay, use_ema_warmup=t.ema.warmup,
                       foreach=t.ema.foreach)
        _ema_home(ema, t, accelerator)
        accelerator.register_for_checkpointing(ema)
    if state is not None:
        state.update(plugin=plugin, accelerator=accelerator)

    step = 0
    ckpt = _load_checkpoint(accelerator, run_dir, t.resume)
    if ckpt is not None:
        _load_rank_states(accelerator, ckpt, rank_states)
        if ema is not None:
            _ema_home(ema, t, accelerator)  # accelerate reloads custom objects on the CPU
        step = json.loads((ckpt / "loop.json").read_text())["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")
    if tracker and accelerator.is_main_process:
        accelerator.init_trackers(recipe.logging.project, config=_flat(recipe.model_dump(mode="json")))

    seen_batches = step * t.gradient_accumulation_steps
    if stream:
        batches = _cycle_stream(accelerator, dataloader, seen_batches, position, recipe.seed)
    else:
        batches_per_epoch = len(dataloader)
        if batches_per_epoch == 0:
            raise UserError(f"the dataset has fewer rows than one batch (train.batch_size={t.batch_size} x "
                              f"{accelerator.num_processes} processes); lower train.batch_size or add data.")
        batches = _cycle(accelerator, dataloader, seen_batches, batches_per_epoch, recipe.seed)
    progress = Progress(t.max_steps, step, recipe.logging.log_every, accelerator.is_main_process)
    history: list[dict] = [h for h in _read_history(ckpt) if h["step"] <= step] if ckpt is not None else []
    for m in modules.values():
        m.train()

    stop = _StopRequest()
    nonfinite = _NonFinite(json.loads((ckpt / "loop.json").read_text()) if ckpt is not None else {})
    window_bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a non-finite loss in this window
    scaled = accelerator.scaler is not None  # fp16 with a loss scaler
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # steps inside backward: cannot skip
    throughput = _Throughput(plugin, recipe, accelerator)
    while step < t.max_steps:
        with profile.phase("data"):
            batch = next(batches)
        with accelerator.accumulate(*wrapped), accelerator.autocast():
            # autocast also covers frozen modules the plugin runs outside ``prepare`` (ControlNet's UNet)
            with profile.phase("forward"):
                loss, logs = plugin.loss(batch)
                window_bad = window_bad | ~torch.isfinite(loss.detach()).all()
            with profile.phase("backward"):
                accelerator.backward(loss)  # on every rank, even a bad one: DDP's all-reduce needs all
            skip = stop_now = False
            optimizer_phase = profile.phase("optimizer")
            optimizer_phase.__enter__()
            if accelerator.sync_gradients:
                norm = clip_gradients(accelerator, optimizer, t.max_grad_norm) if t.max_grad_norm else None
                if norm is not None and not scaled:  # fp16: an inf gradient is the loss scaler's business
                    window_bad = window_bad | ~torch.isfinite(norm)
                # one reduction and one host sync per step: the mean loss, a bad step anywhere, a stop
                # signal anywhere, the gradient norm
                step_loss, skip, stop_now, norm = _step_values(accelerator, loss.detach(), window_bad,
                                                               stop.signal_name is not None, norm)
                if norm is not None:  # DeepSpeed clips inside its engine and may not report a norm
                    logs["grad_norm"] = norm
                window_bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)
            if skip and not scaled and not deepspeed:  # no update, no schedule step
                optimizer.zero_grad(set_to_none=True)
            else:  # (the fp16 scaler skips an inf step itself and accelerate's scheduler then does not step)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            optimizer_phase.__exit__(None, None, None)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if nonfinite.update(skip, step, accelerator) >= t.max_nonfinite_steps:
            path = save_checkpoint(accelerator, run_dir, step, t.checkpoints_total_limit, history, nonfinite.total, rank_states)
            stop.restore()
            accelerator.end_training()
            raise TrainingDiverged(
                f"the loss was NaN/inf for {t.max_nonfinite_steps} steps in a row (steps {step - t.max_nonfinite_steps + 1}"
                f"-{step}; {nonfinite.total} non-finite steps in all); checkpoint {path} holds the weights "
                f"{'(DeepSpeed applied those steps)' if deepspeed else 'before them'}. "
                "Lower train.learning_rate, check the data (data_report.json) or use train.mixed_precision=no, then "
                "resume with train.resume=latest.")
        if ema is not None and not skip and step % t.ema.every == 0:
            with profile.phase("ema"):
                _ema_step(ema, t, plugin, accelerator)
        logs = {"loss": step_loss if not skip else float("nan"), **logs,
                "lr": lr_scheduler.get_last_lr()[0]}
        if nonfinite.total:
            logs["nonfinite_steps"] = nonfinite.total
        bs = _batch_size(batch) * accelerator.num_processes * t.gradient_accumulation_steps
        profile.end_step(bs)
        logs.update(progress.update(step, bs, {k: logs[k] for k in ("loss", "lr")}))
        if step % recipe.logging.log_every == 0 or step == t.max_steps:
            # a plugin's own logs stay on the device until a step that logs (no sync per step)
            logs = {k: v.item() if torch.is_tensor(v) else v for k, v in logs.items()}
            logs.update(throughput.logs(logs["samples_per_s"]))
            history.append({"step": step, **logs})
            if tracker:
                accelerator.log(logs, step=step)
        v = recipe.validation
        if v.every and (step % v.every == 0 or step == t.max_steps):
            with _ema_weights(ema, plugin, accelerator):
                vlogs = plugin.validate(step)
            if vlogs and tracker:
                accelerator.log(vlogs, step=step)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
            save_checkpoint(accelerator, run_dir, step, t.checkpoints_total_limit, history, nonfinite.total, rank_states)
        if stop_now and step < t.max_steps:
            path = save_checkpoint(accelerator, run_dir, step, t.checkpoints_total_limit, history, nonfinite.total, rank_states)
            accelerator.print(f"stopped by {stop.signal_name or 'a signal to another process'} at step {step}; "
                              f"checkpoint saved in {path}. "
                              "Resume with train.resume=latest.")
            stop.restore()
            accelerator.end_training()
            return run_dir
    stop.restore()
    plugin.end_of_training()
    if t.compile:
        _compile_report(accelerator)
    if not finish:
        accelerator.end_training()
        return run_dir

    accelerator.wait_for_everyone()
    with _ema_weights(ema, plugin, accelerator):
        if accelerator.is_main_process:
            plugin.save(run_dir)
            _write_history(run_dir, history)
            _plot_loss(run_dir, history)
        accelerator.wait_for_everyone()
        metrics = plugin.evaluate()
    if nonfinite.total:
        metrics = {**(metrics or {}), "nonfinite_steps_skipped": nonfinite.total}
    if accelerator.is_main_process and metrics:
        _merge_metrics(run_dir, metrics)
    accelerator.end_training()
    return run_dir


class LerpEMA(EMAModel):
    """diffusers' EMAModel (decay schedule, warm-up, state dict, ``copy_to``/``store``/``restore``)
    with its multi-tensor update as one fused kernel: ``shadow.lerp_(param, 1 - decay)`` is
    diffusers' ``shadow - (1 - decay) * (shadow - param)`` in one pass over memory, without the
    temporary copy of every parameter its ``_foreach_sub`` makes (the bench's EMA phase, shapes
    UNet on the AVX-512 host: 5 -> 3 ms). ``foreach=False`` keeps diffusers' per-tensor loop."""

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
        if not self.foreach:
            return super().step(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if trained:  # (a parameter in another precision than its average is cast, as diffusers' arithmetic promotes)
            torch._foreach_lerp_([s for s, _ in trained], [p if p.dtype == s.dtype else p.to(s.dtype) for s, p in trained],
                                 1 - decay)


def _ema_home(ema: EMAModel, t, accelerator: Accelerator) -> None:
    """EMA weights on the training device, or in pinned CPU memory with ``train.ema.offload``."""
    if t.ema.offload and accelerator.device.type == "cuda":
        ema.to("cpu")
        ema.pin_memory()
    else:
        ema.to(accelerator.device)


def _ema_step(ema: EMAModel, t, plugin, accelerator: Accelerator) -> None:
    offload = t.ema.offload and accelerator.device.type == "cuda"
    if offload:
        ema.to(accelerator.device, non_blocking=True)
    ema.step(_ema_params(plugin, accelerator))
    if offload:
        ema.to("cpu", non_blocking=True)


def _compile_fallback(accelerator: Accelerator) -> None:
    """A module that fails to compile runs eagerly instead of ending the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    accelerator.print("train.compile: compiling the trained modules with inductor (the first steps are slow; "
                      "a module that fails to compile runs eagerly)")


def _compile_report(accelerator: Accelerator) -> None:
    from torch._dynamo.utils import counters

    if not counters["stats"].get("unique_graphs"):
        accelerator.print("warning: train.compile was on but nothing was compiled (see the dynamo errors above); "
                          "the run went eagerly. Set train.compile=false to silence this.")


class _Throughput:
    """Samples/s, achieved TFLOP/s per device and model-FLOPs utilisation for the logs: the
    trained model's FLOPs per sample are counted once (``plugin.train_flops_per_sample``)."""

    def __init__(self, plugin, recipe: Recipe, accelerator: Accelerator):
        from ..perf import peak_tflops, precision_of

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


class _NonFinite:
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


def _step_values(accelerator: Accelerator, loss: torch.Tensor, bad, stop: bool, norm) -> tuple:
    """(loss averaged over processes, a bad step on any process, a stop signal on any process,
    gradient norm or None) from one all-reduce and one host sync: every rank takes the same path,
    and a GPU run waits for its device once per step, not once per logged value."""
    dev = accelerator.device

    def scalar(x) -> torch.Tensor:  # python numbers become fill kernels on the device, not host copies
        if isinstance(x, torch.Tensor):
            return x.to(dev).float().reshape(())
        return torch.full((), float(x), dtype=torch.float32, device=dev)

    v = torch.stack([scalar(loss.float().mean()), scalar(bad), scalar(stop), scalar(0.0 if norm is None else norm)])
    n = accelerator.num_processes
    if n > 1:
        v = accelerator.reduce(v, reduction="sum")
    loss_v, bad_v, stop_v, norm_v = v.tolist()
    return loss_v / n, bad_v > 0, stop_v > 0, None if norm is None else norm_v / n


def _check_distributed(accelerator: Accelerator, recipe: Recipe) -> None:
    """Recipe settings the engine accelerate was configured with cannot run, found before any
    model loads: EMA keeps a full copy of parameters that FSDP / ZeRO-3 shard."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    zero3 = kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    if recipe.train.ema.enabled and (kind == DistributedType.FSDP or zero3):
        engine = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise UserError(f"train.ema cannot average parameters that {engine} shards across processes; set "
                          "train.ema.enabled=false, or use DDP / DeepSpeed ZeRO-2 (docs/scaling.md).")


def _multi_process_without_accelerator() -> bool:
    """True when torchrun / mpirun started several processes on a machine with no GPU: accelerate
    makes them one gloo group only when told the run is on CPU (``accelerate launch --cpu`` tells
    it through the environment; torchrun does not), and would otherwise run N unsynchronised
    single-process copies that all write the same files."""
    import os

    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    if os.environ.get("LOCAL_RANK") is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())


def _ema_params(plugin, accelerator) -> list[torch.nn.Parameter]:
    """What EMA averages: the trained parameters of the plugin's EMA module (adapters only when
    the base is frozen)."""
    return [p for p in accelerator.unwrap_model(plugin.ema_module()).parameters() if p.requires_grad]


class _ema_weights:
    """Context: EMA weights in the tracked module while inside, the trained ones after."""

    def __init__(self, ema, plugin, accelerator):
        self.ema, self.plugin, self.accelerator = ema, plugin, accelerator

    def __enter__(self):
        if self.ema is not None:
            params = _ema_params(self.plugin, self.accelerator)
            self.ema.store(params)
            self.ema.copy_to(params)
            self.params = params

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        return False


class _StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop checks it after each optimiser
    step, saves a checkpoint and returns (a second signal stops at once). With several processes the flag is max-reduced, so every
    rank stops at the same step even if only one got the signal."""

    def __init__(self):
        import signal

        self.signal_name: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay with their current handlers
                pass

    def _handler(self, signum, frame):
        import signal

        if self.signal_name is not None:  # a second signal: stop now, without the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _load_checkpoint(accelerator: Accelerator, run_dir: Path, resume: str | None) -> Path | None:
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
        _write_history(tmp, history)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if limit:
            for old in checkpoints(run_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_rank_states(accelerator: Accelerator, ckpt: Path, rank_states: list) -> None:
    for k, obj in enumerate(rank_states):
        name = getattr(obj, "checkpoint_name", f"plugin_state_{k}")
        own = ckpt / f"{name}_rank{accelerator.process_index}.pt"
        # resumed on more processes: a shared state (the plugin's BatchRNG) is the same in every file
        path = own if own.exists() or getattr(obj, "per_process", False) else ckpt / f"{name}_rank0.pt"
        if path.exists():
            obj.load_state_dict(torch.load(path, weights_only=False))


def _wandb_offline_unless_configured() -> None:
    """wandb logs offline (to RUN/logs/wandb) unless the user has set it up: WANDB_MODE,
    WANDB_API_KEY or a stored login."""
    import os

    if "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ:
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, list):
                return len(v)
    return len(batch)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output dir '{run_dir}' cannot be written ({e.strerror}); choose another output.dir.") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v if v is not None else "none"
        else:
            out[key] = str(v)
    return out


def _read_history(run_dir: Path) -> list[dict]:
    p = run_dir / "history.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _write_history(d: Path, history: list[dict]) -> None:
    with open(d / "history.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")


def _plot_loss(run_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1)
    if len(loss) > 8:
        k = max(len(loss) // 20, 2)
        smooth = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, lw=2, label="moving average")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if min(loss) > 0 and max(loss) / max(min(loss), 1e-12) > 20 else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)


def _merge_metrics(run_dir: Path, metrics: dict) -> None:
    p = run_dir / "metrics.json"
    old = json.loads(p.read_text()) if p.exists() else {}
    old.update(metrics)
    p.write_text(json.dumps(old, indent=2))
