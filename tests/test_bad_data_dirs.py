"""Bad data dirs and model dirs are one sentence naming what is wrong, and ``ldm-lab cache``
never writes into a run dir: a malformed metadata.jsonl line (file and line named), an
image-less data dir, a model dir without a model, and the cache's data report beside the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def _folder(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _err(capsys, argv) -> str:
    rc = cli_main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == 2 and "Traceback" not in err and last.startswith("error: "), err[-800:]  # after progress bars
    return last


def test_a_malformed_metadata_line_is_named(tiny_parts, tmp_path, capsys):
    good = [json.dumps({"file_name": f"{i}.png", "text": "a red circle"}) for i in range(4)]
    data = _folder(tmp_path / "imgs", [*good[:2], "{bad json", *good[2:]])
    ov = [*tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "cache"), "data.source=imagefolder",
          f"data.path={data}"]
    err = _err(capsys, ["train", str(RECIPE), *ov])
    assert f"{data / 'metadata.jsonl'} line 3 is not valid JSON" in err


def test_an_image_less_dir_and_a_model_less_dir(tiny_parts, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    ov = [*tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "cache"), "data.source=imagefolder",
          f"data.path={empty}"]
    assert "holds no images or data files" in _err(capsys, ["train", str(RECIPE), *ov])
    assert not (tmp_path / "run" / "checkpoints").exists()
    err = _err(capsys, ["recipe", "check", str(RECIPE), f"model.autoencoder.pretrained={empty}"])
    assert "a directory without a model (no config.json)" in err


def test_cache_writes_its_report_beside_the_cache_not_into_a_run(tiny_parts, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("a finished run's\n")
    data = _folder(tmp_path / "imgs", [json.dumps({"file_name": f"{i}.png", "text": "a red circle"}) for i in range(4)])
    ov = [*tiny_t2i_overrides(tiny_parts, run, tmp_path / "cache"), "data.source=imagefolder", f"data.path={data}"]
    assert cli_main(["cache", str(RECIPE), *ov]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]
    assert list((tmp_path / "cache").glob("*/data_report.json"))


def test_a_cache_dir_that_cannot_be_written_is_one_sentence(tiny_parts, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")  # unwritable even for root
    ov = [*tiny_t2i_overrides(tiny_parts, tmp_path / "run", blocker / "cache")]
    err = _err(capsys, ["train", str(RECIPE), *ov])
    assert "cannot be written in" in err and "data.cache_dir" in err


def test_a_bad_samples_jsonl_is_one_sentence(tmp_path, capsys):
    d = tmp_path / "samples"
    d.mkdir()
    for text, words in (('{"file_name": "0.png"}\nnot json\n', "samples.jsonl line 2 is not a JSON object"),
                        ('{"x": 1}\n', "has no rows with a file_name"),
                        ('{"file_name": "0.png", "prompt": "a large red circle at the center on a white background"}\n',
                         "the image '0.png' cannot be read")):
        (d / "samples.jsonl").write_text(text)
        assert words in _err(capsys, ["eval", "shapes", str(d)])
        assert not (d / "metrics.json").exists()
