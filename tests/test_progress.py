"""Progress bars (progress.py) on the long steps that print nothing else: shown on a terminal of
the main process, silent when stderr is not a terminal or on another rank; the cache encoder and
the sampler draw them."""

from __future__ import annotations

import io

from conftest import REPO, tiny_t2i_overrides
from ldm_lab import progress
from ldm_lab.cli import main as cli_main


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_shows_on_a_terminal_only_and_only_on_the_main_rank(monkeypatch):
    tty, log = _Terminal(), io.StringIO()
    with progress.bar(10, "encoding", stream=tty) as b:
        b.update(10)
    with progress.bar(10, "encoding", stream=log) as b:
        b.update(10)
    assert "encoding" in tty.getvalue() and "0/10" in tty.getvalue()
    assert log.getvalue() == ""
    monkeypatch.setenv("RANK", "1")
    other = _Terminal()
    with progress.bar(10, "encoding", stream=other) as b:
        b.update(10)
    assert other.getvalue() == ""


def test_cache_encoding_and_sampling_draw_bars_on_a_terminal(tiny_parts, tmp_path, monkeypatch, capsys):
    tty = _Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
    assert cli_main(["train", str(REPO / "recipes/shapes/t2i.yaml"), *ov, "train.max_steps=2",
                     "validation.every=2", "eval.shapes=false"]) == 0
    out = tty.getvalue()
    assert "encoding the latent cache" in out and "sampling" in out
