"""Caption embeddings read per row from memory maps (data/embedding_store.py): the rows a batch
asks for, exactly, across cache parts; and a training process whose memory does not grow with the
number of distinct captions in its cache (``ldm-lab bench --caption-counts`` writes such caches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.components.record import Conditioning
from ldm_lab.data.embedding_store import StoredRecords, write_records

REPO = Path(__file__).resolve().parents[1]


def test_rows_come_back_exactly_across_parts_and_encoders(tmp_path):
    g = torch.Generator().manual_seed(0)
    parts, whole = [], [[], []]
    for k, n in enumerate((5, 0, 7)):  # a part without captions (more processes than rows) in between
        p = tmp_path / f"part-{k}"
        p.mkdir()
        recs = [Conditioning(torch.randn(n, 6, 4, generator=g), None, torch.randn(n, 3, generator=g)),
                Conditioning(torch.randn(n, 9, 2, generator=g), torch.rand(n, 9, generator=g) > 0.5, None)]
        write_records(p, recs)
        parts.append(p)
        for e in range(2):
            whole[e].append(recs[e])
    for e in range(2):
        store, ref = StoredRecords(parts, e, 2), Conditioning.cat(whole[e])
        assert len(store) == 12
        index = torch.tensor([11, 0, 4, 5, 4, -1])
        got = store[index]
        for name, t in ref[index].tensors().items():
            assert torch.equal(got.tensors()[name], t), name
        assert set(got.tensors()) == set(ref.tensors())
        assert torch.equal(store[3].states, ref[3].states) and torch.equal(store.all().states, ref.states)
        with pytest.raises(IndexError):
            store[torch.tensor([12])]


PEAK = """import sys
from ldm_lab.cli import main
rc = main(sys.argv[1:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
print("peak-rss-kib", hwm)
sys.exit(rc)
"""


def _peak_rss_of(args: list[str], env: dict) -> int:
    """Peak RSS (bytes) of ``ldm-lab ARGS`` in a fresh process: its own high-water mark, read
    by itself (the rusage of a forked child also counts the parent's pages before exec)."""
    r = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split("peak-rss-kib")[-1].split()[0]) * 1024


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_caption_count(tiny_parts, tmp_path):
    """The same rows with 2,000 and with 200,000 distinct captions (cache copies with random
    embeddings, as the bench writes them): the second cache holds ~0.5 GB more embeddings, the
    training process's peak RSS may not grow by a fifth of that (all in memory, it grows by all)."""
    from ldm_lab.bench_captions import write_caption_cache
    from ldm_lab.data.cache import LatentCache

    ov = [o for o in tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
          if not o.startswith(("train.max_steps", "validation.every", "train.checkpoint_every"))]
    assert cli_main(["cache", "--out", str(tmp_path / "cache"), str(REPO / "recipes/shapes/t2i.yaml"), *ov]) == 0
    cache = LatentCache(tmp_path / "cache")
    sizes = {}
    for n in (2000, 200000):
        out = write_caption_cache(cache, tmp_path / f"c{n}", n)
        sizes[n] = sum(f.stat().st_size for f in out.glob("part-*/*.npy"))
        assert len(LatentCache(out).conditioning) == n
        assert json.loads((out / "manifest.json").read_text())["inputs"] == cache.manifest["inputs"]
    grown = sizes[200000] - sizes[2000]
    assert grown > 400 * 2**20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    peaks = []
    for n in (2000, 200000):
        peaks.append(_peak_rss_of(["train", str(REPO / "recipes/shapes/t2i.yaml"),
                                   *ov, f"data.latent_cache={tmp_path / f'c{n}'}", "train.max_steps=3",
                                   "validation.every=null", "train.checkpoint_every=null", "eval.shapes=false",
                                   f"output.dir={tmp_path / f'run{n}'}"], env))
    assert peaks[1] - peaks[0] < grown / 5, (peaks, grown)
