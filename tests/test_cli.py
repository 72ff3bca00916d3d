"""The ldm-lab command line: data generation, evaluation, help, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO
from ldm_lab.cli import main as cli_main


def test_data_shapes_then_eval_reads_it_back(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert cli_main(["data", "shapes", "--out", str(out), "--n", "60", "--seed", "3"]) == 0
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 60
    assert cli_main(["eval", "shapes", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 60 and min(m[a] for a in ("color", "shape", "size", "position", "background")) >= 0.99
    # a second write into the same dir is refused, and nothing is lost
    before = (out / "metadata.jsonl").read_text()
    assert cli_main(["data", "shapes", "--out", str(out), "--n", "5"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "metadata.jsonl").read_text() == before


def test_eval_on_a_dir_without_labels_is_exit_2(tmp_path, capsys):
    assert cli_main(["eval", "shapes", str(tmp_path)]) == 2
    assert "samples.jsonl" in capsys.readouterr().err


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "ldm_lab.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    for cmd in ("train", "recipe", "data", "eval", "sample"):
        assert cmd in r.stdout


def test_data_shapes_colors_and_eval_pipeline(tmp_path, tiny_pipeline, capsys):
    import json as _json

    out = tmp_path / "pink"
    assert cli_main(["data", "shapes", "--out", str(out), "--n", "6", "--resolution", "32", "--colors", "pink,red",
                     "--shapes", "heart"]) == 0
    rows = [_json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert {r["shape"] for r in rows} == {"heart"} and {r["color"] for r in rows} <= {"pink", "red"}
    assert cli_main(["data", "shapes", "--out", str(tmp_path / "bad"), "--colors", "mauve"]) == 2
    assert "mauve" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    ev = tmp_path / "ev"
    assert cli_main(["eval", "pipeline", str(tiny_pipeline), "--world", str(out), "--colors", "pink", "--n", "3",
                     "--steps", "2", "--out", str(ev)]) == 0
    m = _json.loads((ev / "metrics.json").read_text())
    assert m["n"] == 3 and set(m["by_color"]) == {"pink"} and set(m["by_shape"]) == {"heart"}
    assert len(list((ev / "samples").glob("*.png"))) == 3 and (ev / "world.json").exists()
