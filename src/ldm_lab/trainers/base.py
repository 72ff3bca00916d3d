"""What a trainer plugin declares. The loop (``loop.py``) owns everything else."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from .. import single_file
from ..errors import UserError
from ..perf import OFF
from ..recipe.schema import Recipe


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Modules in eval mode while inside (sampling during training), each back in the mode it had."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(modules, modes):
            m.train(was)


class TrainerPlugin:
    """Base class of trainer plugins, registered by name in ``registry.py``.

    A plugin builds its modules and data in ``setup``, names the trainable modules, computes
    the loss of one batch, and saves (and evaluates) its artifact. Optimiser, schedule,
    accumulation, clipping, EMA, checkpoints, resume, validation cadence and logging belong
    to the loop.
    """

    name: str = ""
    prof = OFF  # the loop's step-phase timer (on under ``ldm-lab bench``)

    def __init__(self, recipe: Recipe, accelerator: Accelerator, run_dir: Path):
        self.recipe, self.accelerator, self.run_dir = recipe, accelerator, Path(run_dir)

    # -- declared by every plugin ------------------------------------------------------
    def setup(self) -> None:
        """Load models and data (called once, before ``accelerator.prepare``)."""
        raise NotImplementedError

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules the optimiser trains, by attribute name on the plugin."""
        raise NotImplementedError

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The training loss and extra values to log (0-dim tensors stay on the device; the loop
        reads them only on steps that log)."""
        raise NotImplementedError

    def save(self, out_dir: Path) -> None:
        """Write the final artifact (with EMA weights in place when EMA is on)."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups; default: all trainable params at the recipe's lr."""
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        return [{"params": params}]

    def ema_modules(self) -> list[nn.Module]:
        """The modules whose trained weights EMA tracks: every trainable module by default (a
        trained text encoder is averaged with the UNet, so the artifact holds one EMA model)."""
        return list(self.trainable_modules().values())

    def frozen_modules(self) -> list[nn.Module]:
        """The modules the plugin runs but does not train (held in the compute dtype under mixed
        precision; see ``frozen.py``); the frozen parts of trained modules are found on their own."""
        return []

    def checkpoint_hooks(self):
        """Optional (save_hook, load_hook) for accelerate's save_state/load_state, when a plugin
        checkpoints less than its modules' full state (LoRA: adapters only)."""
        return None

    def checkpoint_objects(self) -> list:
        """Objects with state_dict/load_state_dict saved in every checkpoint (the plugin's
        BatchRNG by default)."""
        rng = getattr(self, "rng", None)
        return [rng] if rng is not None else []

    def train_flops_per_sample(self) -> float | None:
        """FLOPs of the trained model's forward + backward per sample (for utilisation logs)."""
        return None

    def end_of_training(self) -> None:
        """Called on every process after the last step, before the artifact is saved."""

    def validate(self, step: int) -> dict[str, float]:
        return {}

    def evaluate_during(self, step: int) -> dict[str, float]:
        """Metrics at an ``eval.every`` step, with the weights the artifact would hold (EMA): flat
        names to numbers, logged to the tracker and kept in the history (``trainers/quality.py``)."""
        return {}

    def evaluate(self) -> dict[str, Any]:
        """Final evaluation after ``save``; returned dict goes to metrics.json."""
        return {}

    # -- helpers for plugins -----------------------------------------------------------
    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def write_single_file(self, pipe, pipeline_dir: Path) -> None:
        """``output.single_file``: the pipeline just saved to ``pipeline_dir`` also as
        ``pipeline.safetensors`` beside it, in the original SD layout, from the models in memory
        (``ldm-lab export single-file`` on a finished run writes the same file from disk)."""
        precision = self.recipe.output.single_file
        if precision is None:
            return

        state = single_file.models_state(pipe.unet, pipe.vae, pipe.text_encoder)
        out = single_file.save(state, pipeline_dir.with_suffix(".safetensors"), single_file.DTYPES[precision])
        self.accelerator.print(f"single-file checkpoint ({precision}, original SD layout): {out}")
        differences = single_file.sd15_differences(pipeline_dir)
        if differences:
            self.accelerator.print(single_file.not_sd15_note(differences, pipeline_dir))

    def check_single_file(self, unet, vae, text_encoder_model) -> None:
        """``output.single_file``: refuse models the SD 1.x / 2.x layout cannot hold before the first
        step (where the file departs from SD 1.5 for A1111 / ComfyUI is said when it is written)."""
        if self.recipe.output.single_file is None:
            return

        try:
            single_file.check_models(unet, vae, text_encoder_model)
        except single_file.SingleFileError as e:
            raise UserError(f"output.single_file cannot be written for this model: {e}; unset it.") from None

    def refuse_single_file(self, what: str, adapters: bool = False) -> None:
        """``output.single_file`` is for trainers that write a whole pipeline: refused up front elsewhere."""
        if self.recipe.output.single_file is not None:

            hint = (" (after training, ldm-lab export merge and then ldm-lab export single-file make one file of the "
                    "base with the adapters fused)") if adapters else ""
            raise UserError(f"output.single_file writes a whole pipeline, and {what}; unset it{hint}.")

    def export(self, artifact: Path) -> None:
        """Copy the finished ``artifact`` (a dir, or one file such as a LoRA) to
        ``output.export_to`` (when set): copied next to the target first and swapped in, so an
        interrupted export leaves the old copy intact. A file goes into the ``export_to`` dir
        under its own name, or to ``export_to`` itself when that ends with the file's suffix."""

        if not self.recipe.output.export_to:
            return
        dst = Path(self.recipe.output.export_to)
        if artifact.is_file():
            target = dst if dst.suffix == artifact.suffix else dst / artifact.name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp-export")
            shutil.copyfile(artifact, tmp)
            os.replace(tmp, target)
            return
        tmp, old = dst.with_name(dst.name + ".tmp-export"), dst.with_name(dst.name + ".old-export")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(artifact, tmp)
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)

    def build_cache(self, out: Path | None) -> None:
        """``ldm-lab cache``: the set-up that builds this trainer's latent cache (``self.cached``),
        written to ``out`` when given (else where runs of the recipe look it up), and no training."""
        raise UserError(f"the {self.name} trainer does not use cached latents.")

