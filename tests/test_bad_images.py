"""Bad input never kills a long run: broken, tiny, uncaptioned and duplicate rows are skipped and
counted (ldm_lab.data.checks), and every image mode becomes correct RGB."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ldm_lab.data.checks import check_rows, to_rgb
from ldm_lab.data.sizes import image_sizes
from ldm_lab.data.skip_report import REASONS, require_rows, summary
from ldm_lab.data.stream_checks import SkipCounter, safe_rows
from ldm_lab.errors import UserError

# file name -> caption; the image each file holds is written by _write_folder
ROWS = [
    ("good.jpg", "a good photo"),
    ("truncated.jpg", "cut in half"),
    ("zero.png", "zero bytes"),
    ("text.jpg", "a text file"),
    ("rgba.png", "red square on transparent"),
    ("palette.png", "green square on transparent palette"),
    ("cmyk.jpg", "cmyk red"),
    ("grey16.png", "16-bit gradient"),
    ("grey8.png", "8-bit grey"),
    ("tiny.png", "four by four"),
    ("blank_caption.png", "   "),
    ("no_caption.png", None),
    ("copy_of_good.jpg", "the same bytes again"),
]
UNREADABLE = {"truncated.jpg", "zero.png", "text.jpg"}
KEPT = ["good.jpg", "rgba.png", "palette.png", "cmyk.jpg", "grey16.png", "grey8.png"]
MIN_SIZE = 8


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _write_folder(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (root / "good.jpg").write_bytes(_jpeg(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))))
    whole = _jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # valid header, no end
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a JPEG\n")
    rgba = np.zeros((16, 16, 4), np.uint8)  # transparent black around an opaque red square
    rgba[4:12, 4:12] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    pal.paste(1, (4, 4, 12, 12))
    pal.save(root / "palette.png", transparency=0)
    (root / "cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.repeat(ramp[None, :], 16, axis=0)).save(root / "grey16.png")
    Image.new("L", (16, 16), 128).save(root / "grey8.png")
    Image.new("RGB", (4, 4), (10, 20, 30)).save(root / "tiny.png")
    Image.new("RGB", (16, 16), (7, 7, 7)).save(root / "blank_caption.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "no_caption.png")
    (root / "copy_of_good.jpg").write_bytes((root / "good.jpg").read_bytes())
    with open(root / "metadata.jsonl", "w") as f:
        for name, text in ROWS:
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")


def _names(rows) -> list[str]:
    return [os.path.basename(p) if p else None for p in rows]


def _cache_arrows(ds: datasets.Dataset) -> set[str]:
    folder = Path(ds.cache_files[0]["filename"]).parent
    return {p.name for p in folder.glob("cache-*.arrow")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_images")
    _write_folder(tmp / "images")
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp / "images"), split="train", cache_dir=str(tmp / "hf"))
    before = _cache_arrows(ds)
    kept, report = check_rows(ds, "image", "text", min_size=MIN_SIZE)
    return {"root": tmp / "images", "ds": ds, "kept": kept, "report": report, "cache_before": before,
            "cache_after": _cache_arrows(ds)}


def _raw_paths(ds: datasets.Dataset) -> list[str]:
    return [c["path"] for c in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def test_imagefolder_loads_broken_files_lazily(folder):
    """datasets' imagefolder loader lists every file without decoding it: the broken files are
    ordinary rows and only raise when a row is read, i.e. in the middle of training."""
    ds = folder["ds"]
    assert len(ds) == len(ROWS)
    assert _names(_raw_paths(ds)) == [name for name, _ in ROWS]
    assert ds[0]["image"].size == (32, 32)
    for i, (name, _) in enumerate(ROWS):
        if name in UNREADABLE:
            with pytest.raises(Exception):  # noqa: B017 - OSError / UnidentifiedImageError
                ds[i]["image"]
    assert ds[11]["text"] is None and ds[10]["text"] == "   "


def test_check_rows_keeps_exactly_the_usable_rows(folder):
    kept, report = folder["kept"], folder["report"]
    assert _names(_raw_paths(kept)) == KEPT
    assert kept.features == folder["ds"].features  # image column decoded again as Image()
    assert report["rows"] == 13 and report["kept"] == 6
    assert report["skipped"] == {"unreadable": 3, "too_small": 1, "empty_caption": 2, "duplicate": 1}
    ex = {r: _names(e["path"] for e in report["examples"][r]) for r in REASONS}
    assert ex == {"unreadable": ["truncated.jpg", "zero.png", "text.jpg"], "too_small": ["tiny.png"],
                  "empty_caption": ["blank_caption.png", "no_caption.png"], "duplicate": ["copy_of_good.jpg"]}
    errors = {os.path.basename(e["path"]): e["error"] for r in REASONS for e in report["examples"][r]}
    assert "truncated" in errors["truncated.jpg"]
    assert "0 bytes" in errors["zero.png"]
    assert "4x4" in errors["tiny.png"]
    assert "row 0 (good.jpg)" in errors["copy_of_good.jpg"]
    assert [e["row"] for e in report["examples"]["unreadable"]] == [1, 2, 3]
    assert json.loads(json.dumps(report)) == report
    line = summary(report)
    assert line.startswith("checked 13 rows: kept 6; skipped 3 unreadable (truncated.jpg, zero.png, text.jpg)")
    assert "1 too small (tiny.png)" in line and "2 empty captions" in line and "1 duplicate (copy_of_good.jpg)" in line
    for row in kept:  # every kept row decodes and converts
        rgb = to_rgb(row["image"])
        assert rgb.mode == "RGB" and rgb.size == row["image"].size


def test_check_rows_options_turn_checks_off(folder):
    kept, report = check_rows(folder["ds"], "image", "text", min_size=0, skip_empty_captions=False,
                              drop_duplicates=False)
    assert report["skipped"] == {"unreadable": 3, "too_small": 0, "empty_caption": 0, "duplicate": 0}
    assert _names(_raw_paths(kept)) == [n for n, _ in ROWS if n not in UNREADABLE]
    assert summary(report).startswith("checked 13 rows: kept 10; skipped 3 unreadable")


def test_check_is_cached_by_datasets_and_runs_in_processes(folder):
    assert len(folder["cache_after"] - folder["cache_before"]) == 1  # the check wrote one cache file
    before = _cache_arrows(folder["ds"])
    again = check_rows(folder["ds"], "image", "text", min_size=MIN_SIZE)[1]
    assert _cache_arrows(folder["ds"]) == before  # and the same check again reused it
    assert again == folder["report"]
    # in memory (nothing cached), two processes
    mem = datasets.Dataset.from_dict({"image": _raw_paths(folder["ds"]), "text": [t for _, t in ROWS]})
    mem = mem.cast_column("image", datasets.Image())
    kept, report = check_rows(mem, "image", "text", min_size=MIN_SIZE, num_proc=2)
    assert report == folder["report"] and len(kept) == 6


def test_truncated_files_are_found_even_when_pillow_would_load_them(folder, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    mem = datasets.Dataset.from_dict({"image": _raw_paths(folder["ds"])[:2], "text": ["a", "b"]})
    mem = mem.cast_column("image", datasets.Image())  # in memory: the check really runs
    assert mem[1]["image"].size == (64, 64)  # Pillow itself now accepts the cut file
    kept, report = check_rows(mem, "image", "text")
    assert report["skipped"]["unreadable"] == 1 and len(kept) == 1
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_bytes_backed_rows_and_caption_lists():
    good, red, blue = (_jpeg(Image.new("RGB", (16, 16), c)) for c in ((1, 2, 3), (200, 2, 3), (2, 3, 200)))
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": b, "path": None} for b in (good, b"\x89PNG junk", red, good, red, blue)],
        "caps": [["", "a cat"], ["x"], ["", "  "], ["dup"], ["red"], []],
    }).cast_column("image", datasets.Image())
    kept, report = check_rows(ds, "image", "caps")
    assert report["skipped"] == {"unreadable": 1, "too_small": 0, "empty_caption": 2, "duplicate": 1}
    # a list counts as empty only when every caption is; row 4 is kept although row 2 holds the same
    # bytes, because row 2 was not usable (the first usable copy is the one kept)
    assert kept["caps"][:] == [["", "a cat"], ["red"]]
    assert report["examples"]["duplicate"] == [{"row": 3, "path": None, "error": "same image bytes as row 0 (row 0)"}]
    assert [e["row"] for e in report["examples"]["empty_caption"]] == [2, 5]
    assert "1 unreadable (row 1)" in summary(report)


def test_nothing_usable_is_a_recipe_error(folder):
    broken = folder["ds"].select([1, 2, 3, 9, 10, 11])
    with pytest.raises(UserError) as err:
        check_rows(broken, "image", "text", min_size=MIN_SIZE)
    msg = str(err.value)
    for part in ("no usable training rows", "3 unreadable", "1 too small", "2 empty captions", "truncated.jpg",
                 "data.min_image_size (now 8)", "data.skip_empty_captions=false"):
        assert part in msg, part
    _, report = check_rows(broken, "image", "text", min_size=MIN_SIZE, require=False)
    assert report["kept"] == 0
    with pytest.raises(UserError, match="3 unreadable"):
        require_rows(report)
    require_rows(folder["report"])  # rows left: no error


def test_to_rgb_composites_transparency_on_white(folder):
    root = folder["root"]
    rgba = to_rgb(Image.open(root / "rgba.png"))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255) and rgba.getpixel((8, 8)) == (255, 0, 0)
    pal = Image.open(root / "palette.png")
    assert pal.mode == "P" and "transparency" in pal.info
    pal = to_rgb(pal)
    assert pal.getpixel((0, 0)) == (255, 255, 255) and pal.getpixel((8, 8)) == (0, 255, 0)
    la = to_rgb(Image.merge("LA", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0))))
    assert la.getpixel((1, 1)) == (255, 255, 255)
    half = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert abs(half.getpixel((0, 0))[0] - 127) <= 1


def test_to_rgb_scales_wide_greyscale_to_the_full_range(folder):
    im = Image.open(folder["root"] / "grey16.png")
    assert im.mode == "I;16"
    row = np.asarray(to_rgb(im))[0]
    assert (row[:, 0] == row[:, 1]).all() and (row[:, 1] == row[:, 2]).all()
    grey = row[:, 0].astype(int)
    assert grey[0] == 0 and grey[-1] == 255 and (np.diff(grey) >= 0).all()
    assert len(np.unique(grey)) > 200 and (grey == 255).sum() <= 2  # not saturated at 255
    assert abs(int(grey[128]) - 128) <= 1
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None, :]
    big = to_rgb(Image.frombytes("I;16B", (64, 1), ramp.astype(">u2").tobytes()))
    assert np.asarray(big)[0, -1, 0] == 255 and np.asarray(big)[0, 32, 0] in range(125, 135)
    as_i = to_rgb(Image.fromarray(ramp.astype(np.int32), "I"))
    assert np.array_equal(np.asarray(as_i), np.asarray(to_rgb(Image.fromarray(ramp))))
    f = to_rgb(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32)[None, :], "F"))
    assert np.asarray(f)[0, 0, 0] == 0 and np.asarray(f)[0, -1, 0] == 255
    odd = to_rgb(Image.fromarray(np.array([[-5.0, 0.0, 5.0, np.nan]], np.float32), "F"))
    assert list(np.asarray(odd)[0, :3, 0]) == [0, 128, 255]


def test_to_rgb_colour_modes(folder):
    cmyk = Image.open(folder["root"] / "cmyk.jpg")
    assert cmyk.mode == "CMYK"
    r, g, b = to_rgb(cmyk).getpixel((8, 8))
    assert r >= 245 and g <= 10 and b <= 10
    grey = to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 128))).getpixel((0, 0))
    assert all(abs(c - 127) <= 2 for c in grey)
    assert to_rgb(Image.open(folder["root"] / "grey8.png")).getpixel((3, 3)) == (128, 128, 128)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    ycc = to_rgb(Image.new("RGB", (2, 2), (200, 30, 60)).convert("YCbCr")).getpixel((0, 0))
    assert all(abs(a - b) <= 3 for a, b in zip(ycc, (200, 30, 60)))
    rgb = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(rgb) is rgb  # already right: no copy


def test_to_rgb_applies_exif_orientation_once(tmp_path):
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 2, 10))  # blue stripe on the left
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    upright = to_rgb(Image.open(path))
    assert upright.size == (10, 20)
    assert upright.getpixel((5, 0))[2] > 200 and upright.getpixel((5, 19))[0] > 200  # stripe now on top
    decoded = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())[0]["image"]
    assert decoded.size == (10, 20) and to_rgb(decoded).size == (10, 20)  # datasets turned it: not twice


def test_streaming_filter_skips_and_counts(folder):
    ids = folder["ds"].to_iterable_dataset()
    stream, counter = safe_rows(ids, "image", "text", min_size=MIN_SIZE)
    assert isinstance(stream, datasets.IterableDataset) and isinstance(counter, SkipCounter)
    assert counter.report()["rows"] == 0  # lazy: nothing read yet
    rows = list(stream)
    caption = dict(ROWS)
    assert [r["text"] for r in rows] == [caption[n] for n in KEPT + ["copy_of_good.jpg"]]  # no duplicate check by default
    assert all(isinstance(r["image"], Image.Image) and to_rgb(r["image"]).mode == "RGB" for r in rows)
    assert stream.features == ids.features
    rep = counter.report()
    assert rep["rows"] == 13 and rep["kept"] == 7
    assert rep["skipped"] == {"unreadable": 3, "too_small": 1, "empty_caption": 2, "duplicate": 0}
    assert _names(e["path"] for e in rep["examples"]["unreadable"]) == ["truncated.jpg", "zero.png", "text.jpg"]
    assert summary(rep).startswith("checked 13 rows: kept 7; skipped 3 unreadable (truncated.jpg")
    # duplicates among the last N kept images
    stream, counter = safe_rows(ids, "image", "text", min_size=MIN_SIZE, recent_duplicates=8)
    assert len(list(stream)) == 6 and counter.report()["skipped"]["duplicate"] == 1


def test_streaming_counts_rows_checked_in_dataloader_workers(folder):
    ids = folder["ds"].to_iterable_dataset(num_shards=2)
    stream, counter = safe_rows(ids, "image", "text", min_size=MIN_SIZE)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda r: r["text"])
    assert sorted(loader) == sorted(t for n, t in ROWS if n in KEPT or n == "copy_of_good.jpg")
    rep = counter.report()  # counted in the workers, read here
    assert rep["rows"] == 13 and rep["skipped"]["unreadable"] == 3 and rep["skipped"]["empty_caption"] == 2


def test_streaming_with_nothing_usable_gives_up(folder):
    broken = folder["ds"].select([1, 2, 3, 9, 10, 11]).to_iterable_dataset()
    stream, _ = safe_rows(broken, "image", "text", min_size=MIN_SIZE, give_up_after=4)
    with pytest.raises(UserError, match="no usable training rows: all 4 rows were skipped"):
        list(stream)


def test_image_sizes_from_headers_in_processes(folder, tmp_path):
    """Bucket assignment reads every size from the file header through a datasets map: the
    decoded size of each readable image (EXIF turns included), None where no header can be read
    (a truncated JPEG still has one), the same in two processes."""
    im = Image.new("RGB", (20, 10))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    paths = _raw_paths(folder["ds"]) + [str(tmp_path / "rot.jpg")]
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    expect = []
    for p in paths:
        try:
            with Image.open(p) as f:
                w, h = f.size
            expect.append((h, w))
        except Exception:  # noqa: BLE001
            expect.append(None)
    expect[-1] = (20, 10)  # shown upright: 10 wide, 20 high
    assert image_sizes(ds, "image") == expect
    assert image_sizes(ds, "image", num_proc=2) == expect
    assert expect[_names(paths).index("zero.png")] is None and expect[_names(paths).index("text.jpg")] is None
