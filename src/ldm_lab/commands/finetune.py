"""``ldm-lab finetune TRAINER``: a built-in recipe (``ldm_lab/builtin/TRAINER.yaml``) with the
command's flags as dotted overrides, then the same training loop as ``ldm-lab train``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..recipe import dump_recipe, load_recipe, pipeline_defaults

BUILTIN = Path(__file__).parent.parent / "builtin"


def builtin_recipe(trainer: str) -> Path:
    """The built-in recipe ``ldm-lab finetune TRAINER`` starts from."""
    return BUILTIN / f"{trainer}.yaml"


def finetune(args) -> int:
    recipe = load_recipe(builtin_recipe(args.action), finetune_overrides(args))
    if args.print_recipe:
        print(dump_recipe(pipeline_defaults(recipe)), end="")
        return 0
    from .train import run  # the training loop loads torch and diffusers, which --print-recipe never needs

    return run(recipe)


def finetune_overrides(args) -> list[str]:
    """``ldm-lab finetune`` flags as dotted overrides of the built-in recipe (same code path as
    ``trainer: lora`` / ``trainer: dreambooth`` in a recipe file)."""
    base = args.base
    if (Path(base) / "pipeline" / "model_index.json").exists():
        base = str(Path(base) / "pipeline")  # a run dir
    data = getattr(args, "data", None) or args.instance_data
    local = Path(data).exists()
    ov = [f"model.pipeline={json.dumps(base)}", f"data.path={json.dumps(data)}", f"output.dir={json.dumps(args.out)}"]
    if args.action in ("lora", "controlnet"):
        ov.append(f"data.source={'imagefolder' if local else 'hub'}")
    elif not Path(data).is_dir():
        raise UserError(f"--instance-data '{data}' is not a directory; give a dir of the subject's images.")
    flag_keys = {"rank": "plugin.rank", "adapter": "plugin.adapter", "factor": "plugin.factor", "alpha": "plugin.alpha", "dropout": "plugin.dropout", "init": "plugin.init",
                 "lr": "train.learning_rate", "text_encoder_lr": "plugin.text_encoder_lr", "steps": "train.max_steps",
                 "batch_size": "train.batch_size", "resolution": "data.resolution",
                 "caption_column": "data.caption_column", "resume": "train.resume",
                 "instance_prompt": "plugin.instance_prompt", "identifier": "plugin.identifier",
                 "num_class_images": "plugin.num_class_images", "prior_loss_weight": "plugin.prior_loss_weight",
                 "class_dir": "plugin.class_dir", "class_prompt_file": "plugin.class_prompt_file",
                 "conditioning_column": "plugin.conditioning_column", "controlnet": "plugin.controlnet",
                 "prompt_dropout": "plugin.prompt_dropout"}
    for flag, key in flag_keys.items():
        v = getattr(args, flag, None)
        if v is not None:
            ov.append(f"{key}={json.dumps(v)}")
    if getattr(args, "targets", None):
        t = args.targets
        ov.append(f"plugin.targets={t if ',' not in t and t in ('attn', 'attn_ff', 'attn_ff_conv') else json.dumps([x.strip() for x in t.split(',') if x.strip()])}")
    for flag, key in (("dora", "plugin.dora"), ("train_text_encoder", "plugin.train_text_encoder"),
                      ("prior_preservation", "plugin.prior_preservation")):
        if getattr(args, flag, False):
            ov.append(f"{key}=true")
    if getattr(args, "class_prompt", None):
        cp = args.class_prompt
        ov.append(f"plugin.class_prompt={json.dumps(cp[0] if len(cp) == 1 else cp)}")
    if getattr(args, "preprocessor", None):
        ov += [f"plugin.preprocessor={args.preprocessor}", "plugin.conditioning_column=null"]
    if getattr(args, "lora", False):
        ov.append("plugin.mode=lora")
        if args.lr is None:
            ov.append("train.learning_rate=1.0e-4")
    if getattr(args, "validation_prompt", None):
        ov.append(f"validation.prompts={json.dumps(args.validation_prompt)}")
    return ov + list(args.overrides)
