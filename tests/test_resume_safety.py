"""Resuming reads no pickle of ours: the EMA, the BatchRNG and stream positions are safetensors +
JSON; accelerate's own files go through torch's weights-only loader. A hostile pickle placed in a
checkpoint creates no file when resumed; a checkpoint with pickled custom state (older versions'
EMA) is refused in one sentence unless the user trusts it, and then it resumes exactly."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.trainers.state_files import load_state, save_state

RECIPE = REPO / "recipes/shapes/t2i.yaml"


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"): a file appears if any code ran
        return (open, (str(self.marker), "w"))


def _ov(parts, run: Path, data: Path, *extra: str) -> list[str]:
    keep = [o for o in tiny_t2i_overrides(parts, run, data) if not o.startswith(("train.max_steps", "validation.every",
                                                                                 "train.checkpoint_every"))]
    return [*keep, "train.max_steps=4", "train.checkpoint_every=2", "validation.every=4", "eval.shapes=false",
            "train.checkpoints_total_limit=1", *extra]


@pytest.fixture(scope="module")
def done(tiny_parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, root / "run", root / "data")]) == 0
    return root


def test_checkpoint_states_are_files_without_pickles(done):
    ck = done / "run" / "checkpoints" / "checkpoint-2"
    names = sorted(p.name for p in ck.iterdir())
    assert "ema.json" in names and "ema.safetensors" in names and not [n for n in names if n.startswith("custom_")]
    ema = load_state(ck / "ema")
    assert ema["optimization_step"] == 2 and all(torch.is_tensor(t) for t in ema["shadow_params"])


def test_state_files_round_trip(tmp_path):
    state = {"generator": torch.Generator().manual_seed(3).get_state(), "n": 2, "x": None, "f": 0.5,
             "nested": {"a": [torch.ones(2), 3, "s"]}}
    save_state(state, tmp_path / "s")
    back = load_state(tmp_path / "s")
    assert torch.equal(back["generator"], state["generator"]) and back["nested"]["a"][1:] == [3, "s"]
    assert torch.equal(back["nested"]["a"][0], torch.ones(2)) and back["n"] == 2 and back["x"] is None


@pytest.mark.parametrize("target", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "plugin_state_0_rank0.pt"])
def test_a_hostile_pickle_in_a_checkpoint_runs_no_code(tiny_parts, done, tmp_path, capsys, target):
    run = tmp_path / "run"
    shutil.copytree(done / "run", run)
    ck = run / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "pwned"
    if target.endswith("rank0.pt"):  # a checkpoint from before the JSON states: its .pt is read weights-only
        for f in ck.glob("plugin_state_0_rank0.*"):
            f.unlink()
    (ck / target).write_bytes(pickle.dumps(_Hostile(marker)))
    rc = cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, done / "data", "train.resume=latest",
                                               "train.max_steps=6")])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert rc == 2 and "Traceback" not in err, err[-600:]
    if target.startswith("custom_"):
        assert "holds pickled state (custom_checkpoint_0.pkl)" in err and "train.resume_trust_pickles=true" in err


def test_a_trusted_legacy_ema_pickle_resumes_exactly(tiny_parts, done, tmp_path):
    """A checkpoint as older versions wrote it (the EMA as accelerate's pickled custom state):
    trusted, it resumes to the same EMA weights as the checkpoint with the EMA as files."""
    runs = {}
    for name in ("files", "legacy"):
        run = tmp_path / name
        shutil.copytree(done / "run", run)
        ck = run / "checkpoints" / "checkpoint-2"
        extra = []
        if name == "legacy":
            torch.save(load_state(ck / "ema"), ck / "custom_checkpoint_0.pkl")
            for f in ck.glob("ema.*"):
                f.unlink()
            extra = ["train.resume_trust_pickles=true"]
        assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, done / "data", "train.resume=latest",
                                                   "train.max_steps=6", *extra)]) == 0
        runs[name] = load_state(run / "checkpoints" / "checkpoint-4" / "ema")
    a, b = runs["files"], runs["legacy"]
    assert a["optimization_step"] == b["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"]))
    assert not list((tmp_path / "legacy" / "checkpoints" / "checkpoint-4").glob("custom_checkpoint_*"))
