"""The one training loop. Every trainer plugin runs through ``train``.

``train`` runs in phases: set-up (the Accelerate engine, the plugin's models and their options,
the optimiser, LR schedule and loader, all prepared, and EMA), resume (a checkpoint, the trackers,
the batches from the run's data position), the step loop (forward, backward, clipping and the
optimiser step, then the divergence check, EMA, logs, validation, checkpoints and a stop request),
and the end (the artifact with EMA weights, history, loss plot, evaluation). What the phases use
lives beside this file: engine.py, checkpoints.py, batches.py, ema.py, runlog.py and signals.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

from ..errors import TrainingDiverged, UserError
from ..perf import OFF, Phases, host_allocator, resolve_host_allocator
from ..recipe import Recipe, dump_recipe, pipeline_defaults
from .batches import StreamPosition, batch_size, endless_batches, set_up_loader
from .checkpoints import CKPT_PREFIX, checkpoints, load_checkpoint, load_rank_states, loop_state, save_checkpoint
from .ema import ema_home, ema_step, ema_weights, make_ema
from .engine import (
    check_distributed,
    clip_gradients,
    compile_report,
    is_deepspeed,
    main_decides,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    prepare,
    set_up_modules,
    step_values,
)
from .frozen import cast_frozen
from .layout import current_layout, move_schedule, saved_layout
from .quality import Clock, evaluate_during, is_eval_step, plot_metrics, time_to_quality
from .registry import get_trainer
from .report import report_at_end
from .rundir import RunDir, claim
from .runlog import (
    NonFinite,
    Progress,
    Throughput,
    flat,
    merge_metrics,
    plot_loss,
    read_history,
    wandb_offline_unless_configured,
    write_history,
)
from .sharding import is_fsdp, same_weights_everywhere, unsharded
from .signals import StopRequest


def train(recipe: Recipe, run_dir: str | Path | None = None, profile: Phases | None = None, finish: bool = True,
          state: dict | None = None) -> Path:
    """Run the recipe's trainer plugin to ``train.max_steps``; returns the run dir.

    ``profile`` (``ldm-lab bench``) times the phases of every step; ``finish=False`` skips the
    artifact, evaluation and history; ``state`` receives the plugin, accelerator and EMA."""
    profile = profile or OFF
    recipe = pipeline_defaults(recipe)
    run = _Run(recipe, Path(run_dir or recipe.output.dir), profile)
    try:
        run.set_up()
        if state is not None:
            state.update(plugin=run.plugin, accelerator=run.accelerator, ema=run.ema, frozen=run.frozen)
        run.resume()
        if not run.step_loop():  # stopped by a signal, with a checkpoint to resume from
            return run.run_dir
        run.end_of_steps()
        if finish:
            run.write_artifacts()
        run.accelerator.end_training()
    finally:
        if run.claimed is not None:
            run.claimed.release()
    return run.run_dir


class _Run:
    """One run's state, handed from each phase of ``train`` to the next."""

    def __init__(self, recipe: Recipe, run_dir: Path, profile: Phases):
        self.recipe, self.run_dir, self.profile = recipe, run_dir, profile
        self.t = recipe.train
        self.tracker = None if recipe.logging.tracker == "none" else recipe.logging.tracker
        self.claimed: RunDir | None = None  # the run dir's lock (main process)

    # -- set-up and resume ------------------------------------------------------------------------

    def set_up(self) -> None:
        """The engine, the plugin and its trained modules with their options, the optimiser, LR
        schedule and loader, all prepared; the per-process states and EMA."""
        recipe, t, run_dir = self.recipe, self.t, self.run_dir
        if self.tracker == "wandb":
            wandb_offline_unless_configured()
        accelerator = self.accelerator = make_accelerator(recipe, run_dir, self.tracker)
        accelerator.print(f"accelerate: {accelerator.distributed_type.value}, {accelerator.num_processes} process(es) on "
                          f"{accelerator.device.type}, mixed precision {accelerator.mixed_precision}")
        check_distributed(accelerator, recipe)
        self.run_id = self._claim()
        self.recipe_text = dump_recipe(recipe)  # RUN/recipe.yaml once resume has checked it (see resume)
        set_seed(recipe.seed, device_specific=True)

        plugin = self.plugin = get_trainer(recipe.trainer)(recipe, accelerator, run_dir)
        plugin.prof = self.profile
        plugin.setup()
        modules = self.modules = plugin.trainable_modules()
        self.frozen = cast_frozen(plugin, modules, accelerator.mixed_precision, t.frozen_dtype,
                                  accelerator.distributed_type == DistributedType.FSDP)
        set_up_modules(recipe, plugin, modules, accelerator)
        if is_fsdp(accelerator):
            same_weights_everywhere(modules.values())
        optimizer = make_optimizer(recipe, plugin.param_groups(), accelerator.device)
        lr_scheduler = make_lr_scheduler(recipe, optimizer, accelerator.num_processes)
        dataloader = plugin.train_dataloader()
        set_up_loader(recipe, dataloader, accelerator)
        self.stream = isinstance(dataloader.dataset, torch.utils.data.IterableDataset)
        self.wrapped, self.optimizer, self.dataloader, self.lr_scheduler = prepare(
            accelerator, modules, optimizer, dataloader, lr_scheduler, self.stream)
        self.layout = current_layout(accelerator.num_processes, t.batch_size, t.gradient_accumulation_steps,
                                     self.dataloader, self.stream)
        for name, w in zip(list(modules), self.wrapped):
            setattr(plugin, name, w)
        hooks = plugin.checkpoint_hooks()
        if hooks is not None and is_fsdp(accelerator):
            raise UserError(f"the {recipe.trainer} trainer checkpoints and saves adapters through PEFT's state-dict "
                            "helpers, which do not read FSDP shards; train it with DDP (plain `accelerate launch`, "
                            "or docs/accelerate/multi-cpu.yaml) instead of FSDP.")
        if hooks is not None:
            accelerator.register_save_state_pre_hook(hooks[0])
            accelerator.register_load_state_pre_hook(hooks[1])

        accelerator.print(host_allocator(resolve_host_allocator(t.host_allocator, accelerator.device.type)))
        self.rank_states = plugin.checkpoint_objects()  # saved per process by save_checkpoint
        self.position = StreamPosition(accelerator.num_processes, accelerator.process_index)
        if self.stream:
            self.rank_states = [*self.rank_states, self.position]  # last: the plugin's own states keep their file names
        self.ema = make_ema(t, plugin, accelerator) if t.ema.enabled else None

    def _claim(self) -> str:
        """The run dir locked and owned by this run (``rundir.claim``, on the main process); every
        process gets the run id, or the same one-sentence refusal."""
        accelerator, recipe = self.accelerator, self.recipe
        answer = (None, None)
        if accelerator.is_main_process:
            try:
                self.claimed = claim(self.run_dir, bool(self.t.resume), recipe.output.overwrite, recipe.trainer)
                answer = (self.claimed.run_id, None)
            except UserError as e:
                answer = (None, str(e))
        answer = main_decides(accelerator, answer)
        if answer[1] is not None:
            raise UserError(answer[1])
        return answer[0]

    def resume(self) -> None:
        """The checkpoint ``train.resume`` names (state, per-process states, EMA, step), the
        trackers, and the batches, progress line and history from that step on."""
        accelerator, t = self.accelerator, self.t
        self.step = 0
        self.ckpt = load_checkpoint(accelerator, self.run_dir, t.resume, self.recipe.model_dump(mode="json"),
                                    t.resume_allow_changes, self.run_id, self._shared_states(), t.resume_trust_pickles,
                                    self.layout)
        if self.ckpt is not None:
            load_rank_states(accelerator, self.ckpt, self.rank_states)
            if self.ema is not None:
                ema_home(self.ema, t, accelerator)  # accelerate reloads custom objects on the CPU
            self.step = loop_state(self.ckpt)["step"]
            then = saved_layout(self.ckpt)
            if then is not None and then.processes != accelerator.num_processes:
                move_schedule(self.lr_scheduler, self.step, accelerator.num_processes)
                accelerator.print(f"resumed on {accelerator.num_processes} process(es) from a checkpoint of "
                                  f"{then.processes}: global batch {self.layout.words()}, LR schedule at step "
                                  f"{self.step}")
            accelerator.print(f"resumed from {self.ckpt} at step {self.step}")
        if accelerator.is_main_process:
            (self.run_dir / "recipe.yaml").write_text(self.recipe_text)
        if self.tracker and accelerator.is_main_process:
            accelerator.init_trackers(self.recipe.logging.project, config=flat(self.recipe.model_dump(mode="json")))

        self.batches = endless_batches(self.recipe, accelerator, self.dataloader, self.step, self.stream, self.position)
        self.progress = Progress(t.max_steps, self.step, self.recipe.logging.log_every, accelerator.is_main_process)
        self.history: list[dict] = (
            [h for h in read_history(self.ckpt) if h["step"] <= self.step] if self.ckpt is not None else [])
        for m in self.modules.values():
            m.train()

    # -- the step loop ----------------------------------------------------------------------------

    def step_loop(self) -> bool:
        """Optimiser steps to ``train.max_steps``; False when a stop request ended the run early
        (a checkpoint saved). Raises TrainingDiverged after ``train.max_nonfinite_steps`` non-finite
        steps in a row."""
        accelerator = self.accelerator
        self.stop = StopRequest()
        self.nonfinite = NonFinite(loop_state(self.ckpt))
        self.window_bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a non-finite loss in this window
        self.scaled = accelerator.scaler is not None  # fp16 with a loss scaler
        self.deepspeed = is_deepspeed(accelerator)  # steps inside backward: cannot skip
        self.throughput = Throughput(self.plugin, self.recipe, accelerator)
        self.clock = Clock(self.history)
        while self.step < self.t.max_steps:
            batch, logs, step_loss, skip, stop_now = self._batch()
            if not accelerator.sync_gradients:
                continue
            self.step += 1
            if not self._after_step(batch, logs, step_loss, skip, stop_now):
                return False
        return True

    def _batch(self) -> tuple:
        """One batch through forward and backward; at the end of an accumulation window also the
        clipping, the step's one all-reduce and the optimiser step (none for a skipped step).
        Returns (batch, the plugin's logs, the step's loss, skip, stop_now)."""
        accelerator, profile, t, optimizer = self.accelerator, self.profile, self.t, self.optimizer
        with profile.phase("data"):
            batch = next(self.batches)
        step_loss = None  # set at the end of an accumulation window, the only time it is read
        with accelerator.accumulate(*self.wrapped), accelerator.autocast():
            # autocast also covers frozen modules the plugin runs outside ``prepare`` (ControlNet's UNet)
            with profile.phase("forward"):
                loss, logs = self.plugin.loss(batch)
                self.window_bad = self.window_bad | ~torch.isfinite(loss.detach()).all()
            with profile.phase("backward"):
                accelerator.backward(loss)  # on every rank, even a bad one: DDP's all-reduce needs all
            skip = stop_now = False
            optimizer_phase = profile.phase("optimizer")
            optimizer_phase.__enter__()
            if accelerator.sync_gradients:
                norm = clip_gradients(accelerator, optimizer, t.max_grad_norm) if t.max_grad_norm else None
                if norm is not None and not self.scaled:  # fp16: an inf gradient is the loss scaler's business
                    self.window_bad = self.window_bad | ~torch.isfinite(norm)
                # one reduction and one host sync per step: the mean loss, a bad step anywhere, a stop
                # signal anywhere, the gradient norm
                step_loss, skip, stop_now, norm = step_values(accelerator, loss.detach(), self.window_bad,
                                                              self.stop.signal_name is not None, norm)
                if norm is not None:  # DeepSpeed clips inside its engine and may not report a norm
                    logs["grad_norm"] = norm
                self.window_bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)
            if skip and not self.scaled and not self.deepspeed:  # no update, no schedule step
                optimizer.zero_grad(set_to_none=True)
            else:  # (the fp16 scaler skips an inf step itself and accelerate's scheduler then does not step)
                optimizer.step()
                self.lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            optimizer_phase.__exit__(None, None, None)
        return batch, logs, step_loss, skip, stop_now

    def _after_step(self, batch, logs: dict, step_loss, skip: bool, stop_now: bool) -> bool:
        """What follows optimiser step ``self.step``: the divergence check, then EMA, logs,
        validation and a checkpoint at their cadences, then a stop request; False when the run
        stops here."""
        accelerator, t, step = self.accelerator, self.t, self.step
        if self.nonfinite.update(skip, step, accelerator) >= t.max_nonfinite_steps:
            self._diverged()
        if self.ema is not None and not skip and step % t.ema.every == 0:
            with self.profile.phase("ema"):
                ema_step(self.ema, t, self.plugin, accelerator)
        self._log(batch, logs, step_loss, skip)
        v, e = self.recipe.validation, self.recipe.eval
        if v.every and (step % v.every == 0 or step == t.max_steps):
            with self.clock.paused(), ema_weights(self.ema, self.plugin, accelerator), self.frozen.as_loaded(), \
                    unsharded(accelerator, self.plugin, list(self.modules)):
                vlogs = self.plugin.validate(step)
            if vlogs and self.tracker:
                accelerator.log(vlogs, step=step)
        if is_eval_step(e.every, step, t.max_steps):
            with self.clock.paused(), ema_weights(self.ema, self.plugin, accelerator), self.frozen.as_loaded(), \
                    unsharded(accelerator, self.plugin, list(self.modules)):
                elogs = evaluate_during(self.plugin, step)
            if elogs:
                self.history.append({"step": step, **elogs, **self.clock.now()})
                if self.tracker:
                    accelerator.log(elogs, step=step)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
            with self.clock.paused():
                self._checkpoint()
        if stop_now and step < t.max_steps:
            path = self._checkpoint()
            accelerator.print(f"stopped by {self.stop.signal_name or 'a signal to another process'} at step {step}; "
                              f"checkpoint saved in {path}. "
                              "Resume with train.resume=latest.")
            self.stop.restore()
            accelerator.end_training()
            return False
        return True

    def _log(self, batch, logs: dict, step_loss, skip: bool) -> None:
        """The progress line every step; on a logging step, the logs on the host, in the history and
        to the tracker."""
        accelerator, t, step = self.accelerator, self.t, self.step
        logs = {"loss": step_loss if not skip else float("nan"), **logs,
                "lr": self.lr_scheduler.get_last_lr()[0]}
        if self.nonfinite.total:
            logs["nonfinite_steps"] = self.nonfinite.total
        bs = batch_size(batch) * accelerator.num_processes * t.gradient_accumulation_steps
        self.profile.end_step(bs)
        logs.update(self.progress.update(step, bs, {k: logs[k] for k in ("loss", "lr")}))
        if step % self.recipe.logging.log_every == 0 or step == t.max_steps:
            # a plugin's own logs stay on the device until a step that logs (no sync per step)
            logs = {k: v.item() if torch.is_tensor(v) else v for k, v in logs.items()}
            logs.update(self.throughput.logs(logs["samples_per_s"]))
            logs.update(self.clock.now())
            self.history.append({"step": step, **logs})
            if self.tracker:
                accelerator.log(logs, step=step)

    def _checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, self.step, self.t.checkpoints_total_limit,
                               self.history, self.nonfinite.total, self.rank_states, self.run_id, self.recipe_text,
                               self._shared_states(), self.layout)

    def _shared_states(self) -> dict:
        return {"ema": self.ema} if self.ema is not None else {}

    def _diverged(self) -> None:
        """Checkpoint and raise: the loss was non-finite for ``train.max_nonfinite_steps`` steps in a row."""
        t, step = self.t, self.step
        path = self._checkpoint()
        self.stop.restore()
        self.accelerator.end_training()
        raise TrainingDiverged(
            f"the loss was NaN/inf for {t.max_nonfinite_steps} steps in a row (steps {step - t.max_nonfinite_steps + 1}"
            f"-{step}; {self.nonfinite.total} non-finite steps in all); checkpoint {path} holds the weights "
            f"{'(DeepSpeed applied those steps)' if self.deepspeed else 'before them'}. "
            "Lower train.learning_rate, check the data (data_report.json) or use train.mixed_precision=no, then "
            "resume with train.resume=latest.")

    # -- the end ----------------------------------------------------------------------------------

    def _save_artifact(self) -> str | None:
        """The plugin's artifact, written into a temp dir and moved into the run dir only when
        complete; the reason when it could not be written (a full disk), and then no half-written
        artifact is left: ``write_artifacts`` writes a checkpoint of the last step if there is none
        (so nothing trained is lost) and ends in one sentence; ``train.resume=latest`` then writes it."""
        accelerator, run_dir = self.accelerator, self.run_dir
        tmp, failed = run_dir / ".tmp-artifact", None
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
                self.plugin.save(tmp)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                failed = e.strerror or type(e).__name__
        failed = main_decides(accelerator, failed)
        if failed is not None:
            return failed
        if accelerator.is_main_process:
            for entry in sorted(tmp.iterdir()):
                dst = run_dir / entry.name
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                entry.rename(dst)
            tmp.rmdir()
        accelerator.wait_for_everyone()
        return None

    def end_of_steps(self) -> None:
        """After the last step: the signal handlers back, the plugin's end of training, the compile report."""
        self.stop.restore()
        self.plugin.end_of_training()
        if self.t.compile:
            compile_report(self.accelerator)

    def write_artifacts(self) -> None:
        """The artifact (saved with EMA weights), history and loss plot, then evaluation and its metrics."""
        accelerator, plugin, run_dir = self.accelerator, self.plugin, self.run_dir
        accelerator.wait_for_everyone()
        with ema_weights(self.ema, plugin, accelerator), self.frozen.as_loaded(), \
                unsharded(accelerator, plugin, list(self.modules)):
            failed = self._save_artifact()
            if failed is None and accelerator.is_main_process:
                write_history(run_dir, self.history)
                plot_loss(run_dir, self.history)
                if plot_metrics(run_dir, self.history, self.recipe.eval.thresholds):
                    merge_metrics(run_dir, {"time_to_quality": time_to_quality(self.history,
                                                                               self.recipe.eval.thresholds)})
            accelerator.wait_for_everyone()
            metrics = plugin.evaluate() if failed is None else None
        if failed is not None:  # the trained weights back in place (not the EMA's) for the checkpoint
            ck = next((c for c in checkpoints(run_dir, self.run_id) if c.name == f"{CKPT_PREFIX}{self.step}"), None)
            ck = ck or self._checkpoint()  # a full disk here too is save_checkpoint's one sentence
            raise UserError(f"the trained model could not be written into {run_dir} ({failed}); {ck} holds step "
                            f"{self.step}: free space, then run again with train.resume=latest to write it.")
        if self.nonfinite.total:
            metrics = {**(metrics or {}), "nonfinite_steps_skipped": self.nonfinite.total}
        if accelerator.is_main_process and metrics:
            merge_metrics(run_dir, metrics)
        if accelerator.is_main_process:
            report_at_end(run_dir, accelerator.print, self.recipe.output)
