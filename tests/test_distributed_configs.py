"""The accelerate configs docs/scaling.md ships for multi-GPU DDP, FSDP and DeepSpeed ZeRO-2:
parsed by accelerate's own launcher into the environment ``accelerate launch`` would set, and the
FSDP / DeepSpeed plugins constructed from it (they cannot run on a CPU-only machine). The FSDP
wrap classes must exist in our UNet, and recipe settings the engine cannot run are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import REPO, TINY_UNET

CONFIGS = REPO / "docs" / "accelerate"


def _launch_env(name: str) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "ldm_lab.train"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_every_shipped_config_parses_into_its_engine():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    want = {"fsdp.yaml": DistributedType.FSDP, "deepspeed-zero2.yaml": DistributedType.DEEPSPEED,
            "ddp-2nodes.yaml": DistributedType.MULTI_GPU, "multi-cpu.yaml": DistributedType.MULTI_CPU}
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(want)
    for name, kind in want.items():
        assert load_config_from_file(str(CONFIGS / name)).distributed_type == kind


def test_fsdp_plugin_is_constructed_and_wraps_unet_blocks(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    from ldm_lab.components import load_unet
    from ldm_lab.recipe.schema import UNetSpec

    for k, v in _launch_env("fsdp.yaml").items():
        monkeypatch.setenv(k, v)
    p = FullyShardedDataParallelPlugin()
    assert p.fsdp_version == 2 and p.reshard_after_forward is True
    assert p.state_dict_type == StateDictType.SHARDED_STATE_DICT
    names = {type(m).__name__ for m in load_unet(UNetSpec(**TINY_UNET)).modules()}
    assert set(p.transformer_cls_names_to_wrap) <= names, set(p.transformer_cls_names_to_wrap) - names


def test_deepspeed_zero2_plugin_is_constructed(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    env = _launch_env("deepspeed-zero2.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    d = DeepSpeedPlugin()
    assert d.zero_stage == 2
    cfg = d.deepspeed_config
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    # batch sizes are filled in by accelerate from the prepared dataloader
    assert cfg["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.parametrize("kind,stage,refused", [("FSDP", 1, True), ("FSDP", 2, False), ("DEEPSPEED", 3, True),
                                                ("DEEPSPEED", 2, False), ("MULTI_GPU", None, False)])
def test_ema_is_refused_where_parameters_are_sharded_whole(kind, stage, refused):
    """EMA keeps whole copies: refused under FSDP1 and ZeRO-3; FSDP2 averages each process's shards
    (tests/test_fsdp.py runs it)."""
    from accelerate.utils import DistributedType

    from ldm_lab.errors import UserError
    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.engine import check_distributed

    recipe = load_recipe(REPO / "recipes/shapes/t2i.yaml", ["train.ema.enabled=true"])
    engine = SimpleNamespace(distributed_type=DistributedType[kind],
                             state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage),
                                                   fsdp_plugin=SimpleNamespace(fsdp_version=stage)))
    if refused:
        with pytest.raises(UserError, match="train.ema"):
            check_distributed(engine, recipe)
    else:
        check_distributed(engine, recipe)
    recipe.train.ema.enabled = False
    check_distributed(engine, recipe)
