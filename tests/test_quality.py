"""Quality during training (trainers/quality.py): adherence at ``eval.every`` steps in the history,
the tracker's logs and metrics.png; time-to-quality bookkeeping; the clocks across a resume; and a
run with evaluation steps trains the same weights as one without."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.trainers.quality import Clock, adherence_logs, time_to_quality

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def test_time_to_quality_is_the_first_evaluation_at_or_above_each_threshold():
    history = [
        {"step": 10, "loss": 0.5, "wall_s": 1.0, "train_s": 1.0},
        {"step": 10, "adherence/seen/shape": 0.50, "adherence/seen/color": 0.91, "wall_s": 2.0, "train_s": 1.0},
        {"step": 20, "adherence/seen/shape": 0.85, "adherence/seen/color": 0.89, "wall_s": 4.0, "train_s": 2.5},
        {"step": 30, "adherence/seen/shape": 0.95, "adherence/seen/color": 0.97, "wall_s": 6.0, "train_s": 4.0},
    ]
    ttq = time_to_quality(history, [0.8, 0.9, 0.95, 0.99])
    assert ttq["seen/shape"]["0.8"] == {"step": 20, "wall_s": 4.0, "train_s": 2.5}
    assert ttq["seen/shape"]["0.9"]["step"] == 30 and ttq["seen/shape"]["0.95"]["step"] == 30
    assert ttq["seen/shape"]["0.99"] is None
    # colour crossed 0.9 at step 10, fell below, crossed again: the first crossing counts
    assert ttq["seen/color"]["0.9"]["step"] == 10 and ttq["seen/color"]["0.95"]["step"] == 30


def test_adherence_logs_flatten_the_split_scores():
    result = {"all": 0.1, "seen": {"color": 0.5, "shape": 0.25, "n": 48}, "heldout": {"color": 1.0, "n": 24}}
    assert adherence_logs(result) == {"adherence/seen/color": 0.5, "adherence/seen/shape": 0.25,
                                      "adherence/heldout/color": 1.0}


def test_the_clocks_continue_from_a_resumed_history_and_pause_for_evaluation():
    clock = Clock([{"step": 5, "loss": 1.0, "wall_s": 100.0, "train_s": 70.0}])
    with clock.paused():
        time.sleep(0.2)
    now = clock.now()
    assert 100.2 <= now["wall_s"] < 101.0
    assert 70.0 <= now["train_s"] < 70.15  # the paused 0.2 s is wall time, not training time
    fresh = Clock([]).now()
    assert fresh["wall_s"] < 0.1 and fresh["train_s"] <= fresh["wall_s"]


def _overrides(parts, run: Path, data: Path, steps: int, extra=()) -> list[str]:
    ov = [o for o in tiny_t2i_overrides(parts, run, data)
          if not o.startswith(("train.max_steps", "validation.every", "train.checkpoint_every"))]
    return [*ov, f"train.max_steps={steps}", "train.checkpoint_every=4", "validation.every=100",
            "eval.shapes=true", "eval.n=4", "eval.heldout_n=2", *extra]


def _unet_sha(run: Path) -> str:
    return hashlib.sha256(next((run / "pipeline" / "unet").glob("*.safetensors")).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    extra = ["eval.every=4", "eval.every_n=6", "eval.every_heldout_n=3"]
    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, root / "run", root / "data", 12, extra)]) == 0
    return root


def test_adherence_is_logged_at_every_eval_step_and_drawn(evaluated):
    run = evaluated / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    evals = [h for h in history if "adherence/seen/shape" in h]
    assert [h["step"] for h in evals] == [4, 8, 12]
    for h in evals:
        assert {"adherence/seen/color", "adherence/seen/position", "adherence/heldout/shape"} <= set(h)
        assert all(0.0 <= h[k] <= 1.0 for k in h if k.startswith("adherence/"))
        assert 0 < h["train_s"] <= h["wall_s"]
    # each eval step's samples and scores are kept, and the logged numbers are theirs
    for h in evals:
        d = run / "eval-steps" / f"step-{h['step']:06d}"
        scored = json.loads((d / "metrics.json").read_text())
        assert scored["seen"]["n"] == 6 and scored["heldout"]["n"] == 3
        assert h["adherence/seen/shape"] == pytest.approx(scored["seen"]["shape"])
    walls = [h["wall_s"] for h in history if "wall_s" in h]
    assert walls == sorted(walls)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["time_to_quality"]["seen/shape"]) == {"0.8", "0.9", "0.95"}
    assert "shapes_eval" in metrics  # the final evaluation is still there
    with Image.open(run / "metrics.png") as im:
        assert im.size[0] > 300 and len(set(im.convert("L").getdata())) > 10  # a drawn plot, not a blank page


def test_a_run_with_evaluation_steps_trains_the_same_weights(evaluated, tiny_parts):
    plain = evaluated / "plain"
    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, plain, evaluated / "data", 12)]) == 0
    assert _unet_sha(plain) == _unet_sha(evaluated / "run")
    assert not (plain / "metrics.png").exists()
    assert "time_to_quality" not in json.loads((plain / "metrics.json").read_text())


def test_resume_keeps_the_evaluations_before_the_checkpoint_and_continues_the_clocks(evaluated, tiny_parts, tmp_path):
    run = tmp_path / "run"
    extra = ["eval.every=4", "eval.every_n=6", "eval.every_heldout_n=3"]
    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, run, evaluated / "data", 6, extra)]) == 0
    # checkpoint-4 is the newest; go on from it to step 12
    assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, run, evaluated / "data", 12, extra),
                     "train.resume=latest"]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "adherence/seen/shape" in h] == [4, 8, 12]
    walls = [h["wall_s"] for h in history if "wall_s" in h]
    assert walls == sorted(walls)
    assert _unet_sha(run) == _unet_sha(evaluated / "run")  # and the resumed run is the uninterrupted one


# -- the held-out split and its deterministic validation loss (trainers/heldout.py) ----------------

def test_split_rows_holds_out_a_fixed_disjoint_set():
    from ldm_lab.errors import UserError
    from ldm_lab.trainers.heldout import split_rows

    train, val = split_rows(100, 10, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert sorted(train + val) == list(range(100))
    assert split_rows(100, 10, seed=3)[1] == val and split_rows(100, 10, seed=4)[1] != val
    with pytest.raises(UserError, match="data.val_n=100 holds out every row"):
        split_rows(100, 100, seed=0)
    evens = list(range(0, 100, 2))  # e.g. the rows that have a bucket
    assert set(split_rows(100, 10, seed=3, candidates=evens)[1]) <= set(evens)


@pytest.mark.parametrize("cached", [True, False])
def test_the_validation_loss_is_deterministic_and_held_out_rows_are_never_trained_on(tiny_parts, tmp_path, cached):
    import torch

    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.loop import train

    extra = ["data.val_n=8", "eval.shapes=false", f"data.cache_latents={str(cached).lower()}", f"data.random_flip={str(not cached).lower()}"]
    recipe = load_recipe(RECIPE, _overrides(tiny_parts, tmp_path / "run", tmp_path / "data", 2, extra))
    state: dict = {}
    train(recipe, finish=False, state=state)
    plugin = state["plugin"]
    loader = plugin.train_dataloader()
    trained_rows = set(loader.dataset.indices)
    assert len(plugin.val_rows) == 8 and not trained_rows & set(plugin.val_rows)
    assert len(trained_rows) == 64 - 8
    rng_before = plugin.rng.generator.get_state()
    a, b = plugin.validation_loss()["val_loss"], plugin.validation_loss()["val_loss"]
    assert a == b and a > 0  # fixed rows, noise and timesteps: the same number for the same weights
    assert torch.equal(plugin.rng.generator.get_state(), rng_before)  # the training stream is untouched
    images, captions = plugin.heldout_examples()  # the real images and captions of those rows
    assert len(images) == len(captions) == 8 and images[0].size == (32, 32) and all(isinstance(c, str) for c in captions)
    assert plugin.unwrap(plugin.unet).training  # the modes are back
    with torch.no_grad():
        for p in plugin.unwrap(plugin.unet).parameters():
            p.mul_(0.9)
    assert plugin.validation_loss()["val_loss"] != a  # and it moves with the weights


def test_validation_loss_is_logged_at_eval_steps_without_changing_the_weights(tiny_parts, tmp_path):
    runs = {}
    for name, every in (("logged", 4), ("silent", 0)):
        run = tmp_path / name
        assert cli_main(["train", str(RECIPE), *_overrides(tiny_parts, run, tmp_path / "data", 8,
                        ["data.val_n=8", "eval.shapes=false", f"eval.every={every}"])]) == 0
        runs[name] = run
    history = [json.loads(line) for line in (runs["logged"] / "history.jsonl").read_text().splitlines()]
    vals = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    assert [s for s, _ in vals] == [4, 8] and all(v > 0 for _, v in vals)
    assert _unet_sha(runs["logged"]) == _unet_sha(runs["silent"])


def test_holding_out_every_row_is_one_sentence(tiny_parts, tmp_path, capsys):
    rc = cli_main(["train", str(RECIPE), *_overrides(tiny_parts, tmp_path / "run", tmp_path / "data", 2,
                                                     ["data.val_n=64", "eval.shapes=false"])])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "data.val_n=64 holds out every row" in err[0]
