"""Data at scale, end to end through the trainer: the on-disk latent cache (``ldm-lab cache``,
reuse, refusal, split across processes, caption variants), aspect-ratio buckets, broken images,
streaming webdataset shards with exact resume, and NaN/inf loss handling."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, make_shards, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.trainers.state_files import load_state

RECIPE = REPO / "recipes/shapes/t2i.yaml"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _ov(parts, run: Path, data: Path, steps: int = 2, extra=()) -> list[str]:
    keep = [o for o in tiny_t2i_overrides(parts, run, data)
            if not o.startswith(("train.max_steps", "validation.", "train.checkpoint_every", "train.batch_size"))]
    return keep + [f"train.max_steps={steps}", "train.batch_size=4", "eval.shapes=false", "train.checkpoint_every=1000",
                   *extra]


def _folder(root: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None) -> Path:
    """An imagefolder of solid-colour images of the given (width, height)."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    rows = []
    for i, (w, h) in enumerate(sizes):
        c = names[i % len(names)]
        im = Image.new("RGB", (w, h), COLORS[c])
        im.putpixel((i % w, 0), (i, 255 - i, 0))  # no two files alike (duplicates are dropped)
        im.save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": captions[i] if captions else f"a {c} square, item {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _folder_ov(path: Path) -> list[str]:
    return ["data.source=imagefolder", f"data.path={path}"]


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))


# -- the latent cache ---------------------------------------------------------------------
def test_cache_cli_builds_then_training_uses_it_and_other_inputs_are_refused(tiny_parts, tmp_path, capsys):
    data = _folder(tmp_path / "imgs", [(32, 32)] * 12)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", extra=_folder_ov(data))
    out = tmp_path / "latents"
    assert cli_main(["cache", "--out", str(out), str(RECIPE), *ov]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows"] == 12 and m["inputs"]["resolution"] == 32
    assert cli_main(["train", str(RECIPE), *ov, f"data.latent_cache={out}"]) == 0
    assert "using the latent cache" in capsys.readouterr().out
    # another resolution, another caption set: refused with what differs, nothing trained
    for bad, word in (("data.resolution=16", "resolution"), ("data.captions.shuffle_tags=true", "caption set")):
        capsys.readouterr()
        assert cli_main(["train", str(RECIPE), *ov, f"data.latent_cache={out}", bad,
                         f"output.dir={tmp_path / 'refused'}"]) == 2
        err = capsys.readouterr().err
        assert word in err and "ldm-lab cache" in err and "Traceback" not in err
        assert not (tmp_path / "refused" / "pipeline").exists()


def test_cache_split_across_two_processes_equals_one(tiny_parts, tmp_path):
    data = _folder(tmp_path / "imgs", [(32, 32)] * 10)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", extra=_folder_ov(data))
    assert cli_main(["cache", "--out", str(tmp_path / "one"), str(RECIPE), *ov]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ldm_lab.cli",
                        "cache", "--out", str(tmp_path / "two"), str(RECIPE), *ov], capture_output=True, text=True,
                       timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    from ldm_lab.data.cache import LatentCache

    one, two = LatentCache(tmp_path / "one"), LatentCache(tmp_path / "two")
    assert len(two.manifest["parts"]) == 2 and len(one) == len(two) == 10
    assert one.source_rows == two.source_rows == list(range(10))
    for i in range(10):
        a, b = one[i], two[i]
        assert torch.allclose(a["mean"], b["mean"], atol=1e-5) and torch.allclose(a["std"], b["std"], atol=1e-5)
        assert one.captions[int(a["caption_index"])] == two.captions[int(b["caption_index"])] == f"a {list(COLORS)[i % 4]} square, item {i}"
        assert torch.allclose(one.conditioning[a["caption_index"]].states, two.conditioning[b["caption_index"]].states, atol=1e-5)


def test_caption_variants_are_cached_and_picked_like_on_the_fly(tiny_parts, tmp_path):
    from accelerate import Accelerator

    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    caps = ["photo, red, square, small, outdoors", "photo, blue, square"]
    data = _folder(tmp_path / "imgs", [(32, 32)] * 2, caps)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", extra=[
        *_folder_ov(data), "data.captions.shuffle_tags=true", "data.captions.keep_tags=1", "data.captions.variants=4"])
    tr = TextToImageTrainer(load_recipe(RECIPE, ov), Accelerator(cpu=True), tmp_path / "run")
    tr.build_models()
    tr.build_data()
    row = tr.cached[0]
    strings = [tr.cached.captions[int(v)] for v in row["variants"][:int(row["variant_count"])]]
    assert strings[0] == caps[0] and len(strings) == 4 and len(set(strings)) == 4
    for s in strings:
        tags = [t.strip() for t in s.split(",")]
        assert tags[0] == "photo" and sorted(tags) == sorted(t.strip() for t in caps[0].split(","))
    # the cached embedding of each variant is the text encoder's encoding of that string
    enc = tr.conditioner.encode(strings)
    idx = row["variants"][:4]
    cached = tr.cached.conditioning[idx]
    assert torch.allclose(cached.states, enc.states, atol=1e-5)
    # the cache holds the whole record: the pooled vector too (CLIP reads the states whole: no mask)
    assert torch.allclose(cached.pooled, enc.pooled, atol=1e-5)
    assert cached.mask is None and enc.mask is None
    # a step picks among the variants of each row, all of them over many steps
    from torch.utils.data import default_collate

    batch = default_collate([tr.cached[0], tr.cached[1]])
    picks = [tr.caption_choice(batch) for _ in range(200)]
    assert {int(p[0]) for p in picks} == set(idx.tolist())
    assert {tr.cached.captions[int(p[1])] for p in picks} == {caps[1], "photo, square, blue"}
    # the on-the-fly path tokenizes the same variants
    tr2 = TextToImageTrainer(load_recipe(RECIPE, [*ov, "data.cache_latents=false"]), Accelerator(cpu=True), tmp_path / "r2")
    tr2.build_models()
    tr2.build_data()
    item = tr2.rows[0]
    ids = tr2.text_encoder.tokenize(strings)
    assert torch.equal(torch.as_tensor(item["variant_ids"])[:4], ids) and int(item["variant_count"]) == 4


# -- aspect-ratio buckets -----------------------------------------------------------------
@pytest.mark.parametrize("cached", [True, False])
def test_bucketed_training_batches_one_bucket_and_reports(tiny_parts, tmp_path, cached):
    from accelerate import Accelerator

    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    # landscape 2:1, portrait 1:2, square, and two images too small for any bucket
    sizes = [(64, 32)] * 8 + [(32, 64)] * 8 + [(40, 40)] * 5 + [(12, 12)] * 2
    data = _folder(tmp_path / "imgs", sizes)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", steps=3, extra=[
        *_folder_ov(data), "data.buckets.enabled=true", "data.buckets.pixel_budget=1024", "data.buckets.step=8",
        f"data.cache_latents={cached}"])
    assert cli_main(["train", str(RECIPE), *ov]) == 0
    rep = json.loads((tmp_path / "run" / "buckets.json").read_text())
    counts = {k: v["rows"] for k, v in rep["buckets"].items() if v["rows"]}
    # budget 32x32, sides multiples of 8, aspect <= 2: the maximal buckets are 24x40, 32x32, 40x24
    # (16x32 lies inside 24x40), so 2:1 images go to 24x40 (1.67:1, the nearest aspect)
    assert counts == {"24x40": 8, "40x24": 8, "32x32": 5}
    assert rep["dropped_total"] == 2
    tr = TextToImageTrainer(load_recipe(RECIPE, ov), Accelerator(cpu=True), tmp_path / "run2")
    tr.build_models()
    tr.build_data()
    shapes = set()
    for batch in tr.train_dataloader():
        x = batch["mean"] if cached else batch["pixel_values"]
        shapes.add(tuple(x.shape[-2:]))
        assert x.shape[0] == 4
    f = 1 if not cached else tr.vae_factor
    assert shapes == {(24 // f, 40 // f), (40 // f, 24 // f), (32 // f, 32 // f)}


# -- bad input ------------------------------------------------------------------------------
def test_broken_images_are_skipped_counted_and_reported(tiny_parts, tmp_path, capsys):
    data = _folder(tmp_path / "imgs", [(32, 32)] * 8)
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, "JPEG")
    (data / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (data / "empty.png").write_bytes(b"")
    (data / "notes.jpg").write_text("not an image")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(data / "clear.png")  # usable: composited on white
    rows += [{"file_name": n, "text": f"broken {n}"} for n in ("truncated.jpg", "empty.png", "notes.jpg", "clear.png")]
    rows.append({"file_name": "copy.png", "text": "a duplicate"})
    (data / "copy.png").write_bytes((data / "000.png").read_bytes())
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, tmp_path / "cache", extra=_folder_ov(data))]) == 0
    rep = json.loads((run / "data_report.json").read_text())
    assert rep["rows"] == 13 and rep["kept"] == 9
    assert rep["skipped"]["unreadable"] == 3 and rep["skipped"]["duplicate"] == 1
    named = {Path(e["path"]).name for e in rep["examples"]["unreadable"]}
    assert named == {"truncated.jpg", "empty.png", "notes.jpg"}
    assert "skipped 3 unreadable" in capsys.readouterr().out


def test_a_dataset_with_no_usable_rows_stops_before_training(tiny_parts, tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "a.png").write_bytes(b"")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    run = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, tmp_path / "cache", extra=_folder_ov(data))]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def _poison(cache_dir: Path, rows: list[int]) -> None:
    """Write NaN into the cached latent means of ``rows`` (a broken fp16 encode looks like this)."""
    from ldm_lab.data.cache import LatentCache

    c = LatentCache(cache_dir)
    for i in rows:
        part, off, shape = c.rows[i][:3]
        mm = np.memmap(c.parts[part] / "mean.bin", dtype=np.float32, mode="r+")
        mm[off:off + int(np.prod(shape))] = np.nan
        mm.flush()


def test_nonfinite_loss_steps_are_skipped_and_counted(tiny_parts, tmp_path):
    data = _folder(tmp_path / "imgs", [(32, 32)] * 12)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", steps=6, extra=_folder_ov(data))
    assert cli_main(["cache", "--out", str(tmp_path / "lat"), str(RECIPE), *ov]) == 0
    _poison(tmp_path / "lat", [5])  # in one of the 3 batches of every epoch
    assert cli_main(["train", str(RECIPE), *ov, f"data.latent_cache={tmp_path / 'lat'}"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["nonfinite_steps_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in _unet(tmp_path / "run").values())


def test_nonfinite_loss_in_a_row_stops_with_a_checkpoint(tiny_parts, tmp_path, capsys):
    data = _folder(tmp_path / "imgs", [(32, 32)] * 8)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", steps=10, extra=_folder_ov(data))
    assert cli_main(["cache", "--out", str(tmp_path / "lat"), str(RECIPE), *ov]) == 0
    _poison(tmp_path / "lat", list(range(8)))
    code = cli_main(["train", str(RECIPE), *ov, f"data.latent_cache={tmp_path / 'lat'}", "train.max_nonfinite_steps=3"])
    err = capsys.readouterr().err
    assert code == 3 and "NaN/inf for 3 steps in a row" in err and "Traceback" not in err
    ck = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    loop = json.loads((ck / "loop.json").read_text())
    assert {k: loop[k] for k in ("step", "nonfinite_steps")} == {"step": 3, "nonfinite_steps": 3}
    assert not (tmp_path / "run" / "pipeline").exists()


# -- streaming webdataset shards --------------------------------------------------------------
def test_streamed_webdataset_trains_and_resumes_exactly(tiny_parts, tmp_path, capsys):
    """16 rows in batches of 4: 4 batches an epoch. A run resumed at step 6 (epoch 1, after its
    2nd batch) replays those 2 batches only, not epoch 0 too, and ends with the weights of the
    uninterrupted run; a checkpoint without the position replays all 6 and ends the same."""
    import shutil

    shards = make_shards(tmp_path / "wds", [8, 8])
    extra = ["data.source=webdataset", f"data.path={shards}", "data.streaming=true", "data.cache_latents=false",
             "data.shuffle_buffer=8", "train.checkpoint_every=3"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, a, tmp_path / "cache", steps=9, extra=extra),
                     "train.checkpoint_every=3"]) == 0
    ck = a / "checkpoints" / "checkpoint-6"
    position = ck / "stream_position_rank0.json"
    assert load_state(position) == {"epoch": 1, "batch": 2, "world_size": 1, "rank": 0}
    ua = _unet(a)
    for run, drop_position in ((b, False), (c, True)):
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(ck, run / "checkpoints" / "checkpoint-6")
        if drop_position:  # as written before the stream position existed
            for f in (run / "checkpoints" / "checkpoint-6").glob("stream_position_rank0.*"):
                f.unlink()
        capsys.readouterr()
        assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, tmp_path / "cache", steps=9, extra=extra),
                         "train.checkpoint_every=3", "train.resume=latest"]) == 0
        out = capsys.readouterr().out
        assert ("replaying the first 6 batches from the first epoch (the checkpoint holds no stream position)"
                if drop_position else "resuming in epoch 1 after its first 2 batches") in out
        ub = _unet(run)
        assert all(torch.equal(ua[k], ub[k]) for k in ua)


def test_streamed_resume_is_exact_with_workers_and_random_flips(tiny_parts, tmp_path):
    """Two dataloader workers crop and flip half-coloured images: their seeds come from the
    loader's generator, seeded per epoch, so a run resumed at a saved position (epoch 1, batch 2)
    ends with the uninterrupted run's weights."""
    import shutil

    shards = make_shards(tmp_path / "wds", [8, 8], half=True)
    extra = ["data.source=webdataset", f"data.path={shards}", "data.streaming=true", "data.cache_latents=false",
             "data.shuffle_buffer=8", "data.random_flip=true", "data.num_workers=2", "train.checkpoint_every=3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, a, tmp_path / "cache", steps=9, extra=extra)]) == 0
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "checkpoint-6", b / "checkpoints" / "checkpoint-6")
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, b, tmp_path / "cache", steps=9, extra=extra),
                     "train.resume=latest"]) == 0
    ua, ub = _unet(a), _unet(b)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


def test_an_explicit_bucket_list_is_used_and_checked(tiny_parts, tmp_path, capsys):
    data = _folder(tmp_path / "imgs", [(64, 32)] * 4 + [(32, 32)] * 4)
    ov = _ov(tiny_parts, tmp_path / "run", tmp_path / "cache", extra=[
        *_folder_ov(data), "data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[16x32, 32x32]"])
    assert cli_main(["train", str(RECIPE), *ov]) == 0
    rep = json.loads((tmp_path / "run" / "buckets.json").read_text())
    assert {k: v["rows"] for k, v in rep["buckets"].items()} == {"16x32": 4, "32x32": 4}
    capsys.readouterr()
    assert cli_main(["train", str(RECIPE), *ov[:-1], "data.buckets.sizes=[20x32]", f"output.dir={tmp_path / 'r2'}"]) == 2
    assert "data.buckets.sizes" in capsys.readouterr().err


def test_transformer_buckets_step_by_patch_times_autoencoder_factor(tiny_parts, tmp_path, capsys):
    """A transformer's buckets step by its patch size × the autoencoder factor (not the UNet's
    depth): a PixArt with 2x2 patches trains on 2:1 and 1:2 buckets, cached, each batch one bucket;
    a step that is not a multiple of it, and an SD3 bucket past its position embedding, are one
    sentence each, exit 2."""
    from accelerate import Accelerator

    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    data = _folder(tmp_path / "imgs", [(64, 32)] * 8 + [(32, 64)] * 8)
    pixart = REPO / "recipes/shapes/pixart.yaml"
    ov = [f"model.text_encoder.pretrained={tiny_parts['clip']}", f"model.autoencoder.pretrained={tiny_parts['vae']}",
          "model.denoiser.overrides={num_layers: 1, caption_channels: 32, patch_size: 2, sample_size: 8}",
          *_folder_ov(data), f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32", "data.buckets.enabled=true",
          "data.buckets.pixel_budget=1024", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=null",
          "validation.every=null", "eval.shapes=false", "logging.tracker=none", f"output.dir={tmp_path / 'run'}"]
    tr = TextToImageTrainer(load_recipe(pixart, ov), Accelerator(cpu=True), tmp_path / "probe")
    tr.build_models()
    unit = tr.vae_factor * 2
    buckets = tr.bucket_list()
    assert all(h % unit == 0 and w % unit == 0 for h, w in buckets) and any(h != w for h, w in buckets)
    assert cli_main(["train", str(pixart), *ov]) == 0
    rep = json.loads((tmp_path / "run" / "buckets.json").read_text())
    used = [k for k, v in rep["buckets"].items() if v["rows"]]
    assert len(used) == 2 and all(int(k.split("x")[0]) != int(k.split("x")[1]) for k in used)
    capsys.readouterr()
    assert cli_main(["train", str(pixart), *ov, f"data.buckets.step={unit + tr.vae_factor}",
                     f"output.dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert f"not a multiple of {unit} px (a 2x2 latent patch of the pixart transformer" in err and "Traceback" not in err
    te = f"{{kind: clip, pretrained: {tiny_parts['clip']}, subfolder: text_encoder, projection: true, hidden_layer: -2}}"
    sd3 = [f"model.text_encoders=[{te}, {te}]", f"model.autoencoder.pretrained={tiny_parts['vae']}",
           "model.denoiser.overrides={num_layers: 1, pos_embed_max_size: 4}", *_folder_ov(data),
           f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32", "data.buckets.enabled=true",
           "data.buckets.pixel_budget=2048", f"output.dir={tmp_path / 'sd3'}"]
    assert cli_main(["train", str(REPO / "recipes/shapes/sd3.yaml"), *sd3]) == 2
    err = capsys.readouterr().err
    assert "the largest the sd3 transformer's position embedding covers" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
