"""Runs that survive: SIGTERM saves a checkpoint and exits cleanly (and the resumed run ends with
the weights of an uninterrupted one), and a damaged newest checkpoint falls back to the one before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def _overrides(parts, run: Path, data: Path, steps: int) -> list[str]:
    ov = [o for o in tiny_t2i_overrides(parts, run, data)
          if not o.startswith(("train.max_steps", "validation.", "train.checkpoint_every", "logging.log_every"))]
    return ov + [f"train.max_steps={steps}", "logging.log_every=1", "eval.shapes=false", "train.checkpoint_every=1000"]


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))


@pytest.fixture(scope="module")
def whole(tiny_parts, tmp_path_factory):
    """An uninterrupted 30-step run, and the shared data dir."""
    root = tmp_path_factory.mktemp("whole")
    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, root / "run", root / "data", 30)]) == 0
    return root


def _start_and_signal(parts, run: Path, data: Path, at_step: int, sig, extra=()) -> tuple[int, str]:
    """Run 30 steps in a child process; send ``sig`` once it logs step ``at_step``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm_lab.cli", "train", str(RECIPE),
                             *_overrides(parts, run, data, 30), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step}/"):
            proc.send_signal(sig)
            break
    out = "".join(lines) + proc.stdout.read()
    return proc.wait(timeout=300), out


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tiny_parts, whole, tmp_path):
    data = whole / "data"
    run = tmp_path / "run"
    code, out = _start_and_signal(tiny_parts, run, data, 4, signal.SIGTERM)
    assert code == 0, out[-2000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    ck = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert len(ck) == 1
    stopped = json.loads((ck[0] / "loop.json").read_text())["step"]
    assert 4 <= stopped < 30 and not (run / "pipeline").exists()

    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, run, data, 30), "train.resume=latest"]) == 0
    a, b = _unet(whole / "run"), _unet(run)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    hist = [json.loads(x)["step"] for x in (run / "history.jsonl").read_text().splitlines()]
    assert hist == list(range(1, 31))


def test_kill_9_then_resume_latest_matches_an_uninterrupted_run(tiny_parts, whole, tmp_path):
    data, run = whole / "data", tmp_path / "run"
    code, out = _start_and_signal(tiny_parts, run, data, 13, signal.SIGKILL,
                                  extra=("train.checkpoint_every=5", "train.checkpoints_total_limit=2"))
    assert code == -signal.SIGKILL
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert steps == [5, 10] and not (run / "pipeline").exists()
    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, run, data, 30), "train.checkpoint_every=5",
                     "train.checkpoints_total_limit=2", "train.resume=latest"]) == 0
    a, b = _unet(whole / "run"), _unet(run)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tiny_parts, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    ov = [o for o in _overrides(tiny_parts, run, data, 9) if not o.startswith("train.checkpoint_every")]
    ov.append("train.checkpoints_total_limit=2")
    assert cli_main(["train", str(RECIPE), *ov, "train.checkpoint_every=3"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    for f in (run / "checkpoints" / "checkpoint-6").glob("model*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # truncated, as by a full disk
    capsys.readouterr()
    assert cli_main(["train", str(RECIPE), *ov, "train.checkpoint_every=3", "train.resume=latest"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-6 is damaged" in out and "resumed from" in out and "checkpoint-3 at step 3" in out
    for f in (run / "checkpoints" / "checkpoint-3").glob("model*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    for f in (run / "checkpoints" / "checkpoint-6").glob("model*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    assert cli_main(["train", str(RECIPE), *ov, "train.checkpoint_every=3", "train.resume=latest"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "damaged" in err and "Traceback" not in err


class _KilledWhileSaving(BaseException):
    """Stands for the process dying in the middle of accelerate's save_state."""


def test_a_kill_while_saving_never_leaves_a_checkpoint_that_looks_complete(tiny_parts, whole, tmp_path, monkeypatch):
    """Fault injection: the save at step 10 writes part of its files, then the process "dies".
    The half-written checkpoint stays a hidden temp dir, ``latest`` is checkpoint-5, and the
    resumed run ends with the weights of the uninterrupted one."""
    from accelerate import Accelerator

    data, run = whole / "data", tmp_path / "run"
    real = Accelerator.save_state
    calls = []

    def dying_save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise _KilledWhileSaving
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", dying_save_state)
    ov = [*_overrides(tiny_parts, run, data, 30), "train.checkpoint_every=5"]
    with pytest.raises(_KilledWhileSaving):
        cli_main(["train", str(RECIPE), *ov])
    monkeypatch.setattr(Accelerator, "save_state", real)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".tmp-checkpoint-10", "checkpoint-5"]
    assert cli_main(["train", str(RECIPE), *ov, "train.resume=latest"]) == 0
    a, b = _unet(whole / "run"), _unet(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
