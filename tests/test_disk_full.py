"""A full disk loses nothing: the free space is checked before each checkpoint, a checkpoint that
cannot be written leaves the last good one, and a final save that fails leaves no half-written
artifact but a checkpoint of the last step, from which ``resume=latest`` writes the artifact the
uninterrupted run writes, bit for bit. The disk is the only thing faked: the OS's answers
(``ENOSPC`` from a write, ``disk_usage``)."""

from __future__ import annotations

import errno
import hashlib
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.trainers import checkpoints as checkpoints_module
from ldm_lab.trainers import state_files
from ldm_lab.trainers.text_to_image import TextToImageTrainer

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def _ov(parts, run: Path, data: Path, *extra: str) -> list[str]:
    keep = [o for o in tiny_t2i_overrides(parts, run, data) if not o.startswith(("train.max_steps", "validation.every",
                                                                                 "train.checkpoint_every"))]
    return [*keep, "train.max_steps=4", "train.checkpoint_every=2", "validation.every=4", "eval.shapes=false", *extra]


def _unet_sha(run: Path) -> str:
    return hashlib.sha256(next((run / "pipeline" / "unet").glob("*.safetensors")).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def whole(tiny_parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disk")
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, root / "run", root / "data")]) == 0
    return root


def _no_space(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_final_save_keeps_the_last_step(tiny_parts, whole, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = TextToImageTrainer.save

    def half_then_full(self, out_dir):  # the pipeline dir is begun, then the disk fills
        (out_dir / "pipeline" / "unet").mkdir(parents=True)
        (out_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
        _no_space()

    monkeypatch.setattr(TextToImageTrainer, "save", half_then_full)
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, whole / "data")]) == 2
    err = capsys.readouterr().err
    assert "could not be written" in err and "No space left on device" in err and "checkpoint-4 holds step 4" in err
    assert "Traceback" not in err
    assert not (run / "pipeline").exists() and not (run / ".tmp-artifact").exists()
    assert (run / "checkpoints" / "checkpoint-4" / "loop.json").exists()
    monkeypatch.setattr(TextToImageTrainer, "save", real_save)  # space freed
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, whole / "data", "train.resume=latest")]) == 0
    assert _unet_sha(run) == _unet_sha(whole / "run")


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_good_one(tiny_parts, whole, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = state_files.save_state
    calls = {"n": 0}

    def fill_on_the_second_checkpoint(state, stem):
        if stem.parent.name == ".tmp-checkpoint-4":
            calls["n"] += 1
            _no_space()
        real(state, stem)

    monkeypatch.setattr(state_files, "save_state", fill_on_the_second_checkpoint)
    ov = _ov(tiny_parts, run, whole / "data", "train.max_steps=6", "validation.every=6")
    assert cli_main(["train", str(RECIPE), *ov]) == 2
    err = capsys.readouterr().err
    assert calls["n"] == 1 and "checkpoint 4 could not be written" in err and "checkpoint-2; free space" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_too_little_free_space_stops_before_the_checkpoint(tiny_parts, whole, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def small(path):
        u = real(path)
        return usage(u.total, u.used, 1024 if Path(path) == run else u.free)

    monkeypatch.setattr(checkpoints_module.shutil, "disk_usage", small)
    ov = _ov(tiny_parts, run, whole / "data", "train.max_steps=6", "validation.every=6")
    assert cli_main(["train", str(RECIPE), *ov]) == 2
    err = capsys.readouterr().err
    assert "only 0 MiB are free on the disk of" in err and "checkpoint 4 needs about" in err and "checkpoint-2" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
