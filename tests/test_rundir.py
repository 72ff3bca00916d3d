"""A run dir belongs to one run: a second run into it refuses (and a dir a live run holds locked
refuses), ``output.overwrite`` replaces the earlier run, checkpoints are found and pruned only
among the run's own, and a resume with a recipe that computes differently refuses naming the keys
(unless the user allows them), calling an incompatible checkpoint incompatible, not damaged."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.trainers.rundir import recipe_changes

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def _ov(parts, run: Path, data: Path, *extra: str) -> list[str]:
    keep = [o for o in tiny_t2i_overrides(parts, run, data) if not o.startswith(("train.max_steps", "validation.every",
                                                                                 "train.checkpoint_every"))]
    return [*keep, "train.max_steps=4", "train.checkpoint_every=2", "validation.every=4", "eval.shapes=false",
            "train.checkpoints_total_limit=1", *extra]


def _hashes(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def done(tiny_parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rundir")
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, root / "run", root / "data")]) == 0
    return root


def _copy(done: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    return run


def test_a_second_run_into_the_dir_refuses_and_changes_nothing(tiny_parts, done, tmp_path, capsys):
    run = _copy(done, tmp_path)
    before = _hashes(run)
    rc = cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, done / "data", "train.learning_rate=1e-3")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another run" in err and "output.overwrite=true" in err and "Traceback" not in err
    assert _hashes(run) == before
    run_id = json.loads((run / "run.json").read_text())["id"]
    assert run_id in err


def test_a_dir_a_live_run_holds_refuses(tiny_parts, done, tmp_path, capsys):
    run = tmp_path / "busy"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a training process holds while it runs
    os.pwrite(fd, b"pid 4242", 0)
    try:
        rc = cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, done / "data")])
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert rc == 2 and "in use by a run that is still training (pid 4242)" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_overwrite_replaces_the_earlier_run(tiny_parts, done, tmp_path):
    run = _copy(done, tmp_path)
    (run / "notes.txt").write_text("mine")
    old_id = json.loads((run / "run.json").read_text())["id"]
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, done / "data", "output.overwrite=true",
                                                "train.max_steps=2", "validation.every=2")]) == 0
    new_id = json.loads((run / "run.json").read_text())["id"]
    assert new_id != old_id and (run / "notes.txt").read_text() == "mine"
    assert [json.loads(x)["step"] for x in (run / "history.jsonl").read_text().splitlines()][-1] == 2
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())


@pytest.mark.parametrize("value", ['""', "."])
def test_an_empty_output_dir_is_refused_by_recipe_check(value, capsys):
    rc = cli_main(["recipe", "check", str(RECIPE), f"output.dir={value}"])
    err = capsys.readouterr().err
    assert rc == 2 and "output.dir is empty or the current directory" in err


def test_resume_with_a_changed_batch_size_refuses_naming_it(tiny_parts, done, tmp_path, capsys):
    run = _copy(done, tmp_path)
    before = _hashes(run)
    ov = _ov(tiny_parts, run, done / "data", "train.resume=latest", "train.max_steps=6", "train.batch_size=4")
    rc = cli_main(["train", str(RECIPE), *ov])
    err = capsys.readouterr().err
    assert rc == 2 and "global batch of 8" in err and "set train.batch_size=8" in err, err[-400:]
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert "damaged" not in err and _hashes(run) == before
    # meant: the user lists the key, and the run goes on from the checkpoint
    assert cli_main(["train", str(RECIPE), *ov, "train.resume_allow_changes=[train.batch_size]"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_resume_with_ema_switched_off_is_incompatible_not_damaged(tiny_parts, done, tmp_path, capsys):
    run = _copy(done, tmp_path)
    ov = _ov(tiny_parts, run, done / "data", "train.resume=latest", "train.max_steps=6", "train.ema.enabled=false")
    assert cli_main(["train", str(RECIPE), *ov]) == 2
    err = capsys.readouterr().err
    assert "train.ema.enabled (true -> false)" in err and "damaged" not in err
    # allowed on purpose: the weights resume and the checkpoint's EMA is left behind
    assert cli_main(["train", str(RECIPE), *ov, "train.resume_allow_changes=[train.ema]"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_checkpoint_without_the_ema_this_recipe_trains_is_incompatible(tiny_parts, done, tmp_path, capsys):
    run = _copy(done, tmp_path)
    for f in (run / "checkpoints" / "checkpoint-2").glob("ema.*"):  # as a run without EMA writes it
        f.unlink()
    ov = _ov(tiny_parts, run, done / "data", "train.resume=latest", "train.max_steps=6")
    assert cli_main(["train", str(RECIPE), *ov]) == 2
    err = capsys.readouterr().err
    assert "is incompatible with this recipe: it holds no ema state" in err and "damaged" not in err, err[-400:]


def test_checkpoints_of_another_run_are_neither_resumed_nor_pruned(tiny_parts, done, tmp_path, capsys):
    run = _copy(done, tmp_path)
    ours = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ours] == ["checkpoint-2"]
    foreign = run / "checkpoints" / "checkpoint-99"  # a higher step, written by another run
    shutil.copytree(ours[0], foreign)
    loop = json.loads((foreign / "loop.json").read_text())
    (foreign / "loop.json").write_text(json.dumps({**loop, "step": 99, "run": "someone-else"}))
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, done / "data", "train.resume=latest",
                                                "train.max_steps=8", "train.checkpoint_every=6")]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-2 at step 2" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-99"]


def test_recipe_changes_compares_what_changes_the_training():
    saved = {"seed": 0, "train": {"batch_size": 8, "max_steps": 10, "learning_rate": 1e-4, "ema": {"enabled": True}},
             "logging": {"log_every": 5}, "validation": {"every": 5}}
    now = {"seed": 1, "train": {"batch_size": 8, "max_steps": 20, "learning_rate": 2e-4, "ema": {"enabled": True}},
           "logging": {"log_every": 1}, "validation": {"every": 2}}
    assert recipe_changes(saved, now, []) == ["seed (0 -> 1)", "train.learning_rate (0.0001 -> 0.0002)"]
    assert recipe_changes(saved, now, ["train"]) == ["seed (0 -> 1)"]
    assert recipe_changes(saved, now, ["*"]) == []
    assert recipe_changes(saved, {**now, "train": {**now["train"], "ema": {}}}, ["seed", "train.learning_rate"]) \
        == ["train.ema (<unset> -> {})", "train.ema.enabled (true -> <unset>)"]

