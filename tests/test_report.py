"""RUN/report.html (trainers/report.py): written at the end of a run, self-contained (every image
inlined, nothing fetched), rebuilt identically by ``ldm-lab report RUN``; rendered by a real
browser (headless Chromium, slow test) into a page that is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main

RECIPE = REPO / "recipes/shapes/t2i.yaml"


@pytest.fixture(scope="module")
def run(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    ov = tiny_t2i_overrides(tiny_parts, root / "run", root / "data")
    assert cli_main(["train", str(RECIPE), *ov, "eval.every=6", "eval.every_n=4", "eval.every_heldout_n=2",
                     "data.val_n=8"]) == 0
    return root / "run"


def test_the_report_is_self_contained_and_holds_the_runs_parts(run):
    page = (run / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing from the network
    images = re.findall(r'src="data:image/png;base64,', page)
    grids = sorted((run / "samples").glob("step-*.png"))
    assert len(grids) == 2 and len(images) == 2 + len(grids) + 1  # loss, metrics, grids, evaluation grid
    for part in ("Timings", "Final evaluation", "During training", "Recipe", "adherence/seen/shape", "val_loss",
                 "step-000006", "step-000012"):
        assert part in page, part
    assert "max_steps: 12" in page  # the resolved recipe


def test_ldm_lab_report_rebuilds_the_same_page(run, capsys):
    before = (run / "report.html").read_bytes()
    (run / "report.html").unlink()
    assert cli_main(["report", str(run)]) == 0
    assert (run / "report.html").read_bytes() == before
    capsys.readouterr()
    assert cli_main(["report", str(run / "samples")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is not a run dir" in err[0]


@pytest.mark.slow
def test_headless_chromium_renders_the_report(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "this test renders report.html in a real browser: install Chromium (apt-get install chromium)"
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2400", f"--screenshot={shot}", (run / "report.html").as_uri()],
                   check=True, timeout=180, capture_output=True)
    with Image.open(shot) as im:
        gray = im.convert("L")
        colours = len(set(im.convert("RGB").getdata()))
        dark = sum(1 for v in gray.getdata() if v < 128) / (gray.size[0] * gray.size[1])
    assert gray.size == (1200, 2400)
    assert colours > 200 and 0.005 < dark < 0.9  # text, curves and sample grids drawn, not a blank page
