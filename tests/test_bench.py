"""The benchmark harness: it runs and writes its JSON, the naive pipeline it compares against
computes the same loss as ldm-lab's for the same batch and weights (so the ratio is fair), the
FLOP counter matches a hand count, and the step-phase timer adds up."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_t2i_overrides
from ldm_lab import perf
from ldm_lab.cli import main as cli_main

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def test_bench_runs_both_pipelines_and_writes_json(tiny_parts, tmp_path, capsys):
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
    out = tmp_path / "bench"
    assert cli_main(["bench", "--steps", "2", "--warmup", "1", "--compare", "naive", "--variant",
                     "no-ema:train.ema.enabled=false", "--out", str(out), str(RECIPE), *ov]) == 0
    table = capsys.readouterr().out
    assert "| naive |" in table and "| ldm-lab |" in table and "ldm-lab vs naive:" in table
    rep = json.loads((out / "training.json").read_text())
    by = {r["pipeline"]: r for r in rep["results"]}
    assert set(by) == {"naive", "ldm-lab", "no-ema"}
    naive, ours = by["naive"], by["ldm-lab"]
    # the naive pipeline encodes images and captions every step; ldm-lab reads them from the cache
    assert naive["phases_s"]["autoencoder"] > 0 and naive["phases_s"]["text_encoder"] > 0
    assert "autoencoder" not in ours["phases_s"] and "text_encoder" not in ours["phases_s"]
    assert naive["recipe"]["cache_latents"] is False and ours["recipe"]["cache_latents"] is True
    assert by["no-ema"]["phases_s"].get("ema", 0.0) == 0.0 < ours["phases_s"]["ema"]
    assert rep["speedup_vs_naive"] == pytest.approx(ours["samples_per_s"] / naive["samples_per_s"])
    assert ours["model_flops_per_sample"] == naive["model_flops_per_sample"] > 0
    assert ours["peak_memory_bytes"] > 0 and ours["samples_per_s"] > 0
    assert ours["page_faults_per_step"] >= 0 and ours["warmup_s"] > 0
    lo, hi = ours["step_s_p10_p90"]
    assert 0 < lo <= hi
    if not torch.cuda.is_available():  # hosts differ: the CPU's kernels' instruction set is named
        assert torch.backends.cpu.get_cpu_capability() in ours["device"] and "threads" in ours["device"]
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        assert ("AMX-BF16" in ours["device"]) == (" amx_bf16" in flags)
        assert f"device: {ours['device']};" in table


def test_naive_and_default_compute_the_same_loss(tiny_parts, tmp_path):
    from accelerate import Accelerator
    from torch.utils.data import default_collate

    from ldm_lab import bench
    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    recipe = load_recipe(RECIPE, tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data"))
    losses = []
    for r in (recipe, bench.apply_overrides(recipe, bench.NAIVE)):
        torch.manual_seed(0)  # the same UNet weights
        tr = TextToImageTrainer(r, Accelerator(cpu=True), tmp_path / "run")
        tr.setup()
        ds = tr.cached if tr.cached is not None else tr.rows
        batch = default_collate([ds[i] for i in range(4)])
        with torch.no_grad():
            losses.append(tr.loss(batch)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_flop_count_matches_a_hand_count():
    from ldm_lab.perf import model_flops

    B = 4
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 16))
    x = torch.randn(B, 3, 8, 8)

    def step():
        net(x).pow(2).sum().backward()

    conv = 2 * B * 8 * 8 * 8 * 3 * 9  # output elements x (in_channels x kernel) multiply-adds
    linear = 2 * B * 512 * 16
    # backward: the linear layer's input and weight gradients; the conv's weight gradient only
    # (its input needs no gradient)
    want = (conv + linear) + (2 * linear + conv)
    assert model_flops(step) == want


def test_unet_flops_counted_on_one_sample_equal_the_batch_count(tiny_parts):
    from conftest import TINY_UNET
    from ldm_lab.components import load_unet
    from ldm_lab.components.denoiser import denoiser_for
    from ldm_lab.components.record import Conditioning
    from ldm_lab.perf import denoiser_train_flops, model_flops
    from ldm_lab.recipe.schema import UNetSpec

    unet = load_unet(UNetSpec(**TINY_UNET))
    denoiser = denoiser_for(unet)
    f4 = denoiser_train_flops(unet, lambda x, t, c: denoiser(unet, x, t, Conditioning(c)), (4, 4, 8, 8), (4, 20, 32),
                              "cpu")  # counted on one sample, scaled
    assert all(p.grad is None for p in unet.parameters())
    x, c, t = torch.randn(4, 4, 8, 8), torch.randn(4, 20, 32), torch.tensor([1, 2, 3, 4])
    direct = model_flops(lambda: unet(x, t, encoder_hidden_states=c).sample.pow(2).mean().backward())
    assert f4 == direct > 0


def test_phases_nest_and_add_up():
    from ldm_lab.perf import Phases

    p = Phases()
    for _ in range(2):
        with p.phase("forward"):
            time.sleep(0.02)
            with p.phase("autoencoder"):
                time.sleep(0.05)
        p.end_step(8)
    s = p.summary()
    assert s["autoencoder"] == pytest.approx(0.05, abs=0.02)
    assert s["forward"] == pytest.approx(0.02, abs=0.015)  # its child's time is not counted twice
    off = Phases(enabled=False)
    with off.phase("x"):
        pass
    off.end_step(1)
    assert off.steps == []


def test_sampling_benchmark_reports_latency_and_adherence(tiny_pipeline, tmp_path):
    from ldm_lab import bench

    rep = bench.run_sampling(str(tiny_pipeline), n=2, batch=1, samplers=[("ddim", 2), ("dpm++", 2)],
                             out=tmp_path / "s")
    assert [r["sampler"] for r in rep["samplers"]] == ["ddim", "dpm++"]
    for r in rep["samplers"]:
        assert r["s_per_image"] > 0 and 0 <= r["adherence"]["all"] <= 1
    assert "| ddim | 2 |" in bench.format_sampling(rep)


def test_training_logs_throughput_and_utilisation(tiny_parts, tmp_path):
    run = tmp_path / "run"
    ov = [o for o in tiny_t2i_overrides(tiny_parts, run, tmp_path / "data") if not o.startswith("logging.log_every")]
    assert cli_main(["train", str(RECIPE), *ov, "logging.log_every=3", "train.max_steps=6", "eval.shapes=false",
                     "validation.every=null", "train.checkpoint_every=null", "train.peak_tflops=0.5"]) == 0
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [3, 6]
    for h in hist:
        assert h["tflops_per_device"] > 0
        assert h["mfu"] == pytest.approx(h["tflops_per_device"] / 0.5)
        assert h["tflops_per_device"] == pytest.approx(h["samples_per_s"] * hist[0]["tflops_per_device"]
                                                       / hist[0]["samples_per_s"], rel=1e-6)


def test_ddpm_at_the_full_step_count_samples(tiny_pipeline):
    """Stable Diffusion's steps_offset=1 would put the last of 1000 DDPM steps at t=1000, past the
    schedule; generate drops the offset for such step counts (and keeps it for others)."""
    from ldm_lab.sampling import generate, load_pipeline, make_sampler

    pipe = load_pipeline(str(tiny_pipeline))
    pipe.scheduler = make_sampler("ddpm", pipe.scheduler.config)
    T = pipe.scheduler.config.num_train_timesteps
    assert pipe.scheduler.config.steps_offset == 1
    images = generate(pipe, ["a red circle"], [0], T, 2.0)
    assert len(images) == 1 and pipe.scheduler.config.steps_offset == 1


_FAULTS = """
import resource, sys, torch
from ldm_lab.perf import host_allocator
for mode in sys.argv[1].split(","):
    print(host_allocator(mode))
size = int(sys.argv[2]) << 20
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.empty(size, dtype=torch.uint8)
        x.fill_(1)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults()
print(faults())
"""


def _faults(modes: str, mib: int) -> tuple[str, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS, modes, str(mib)], capture_output=True, text=True, check=True)
    line, n = out.stdout.strip().splitlines()[-2:]
    return line, int(n)


@pytest.mark.skipif(perf._glibc() is None, reason="the host allocator policy is glibc's")
def test_reused_host_memory_is_not_faulted_in_again():
    """A step that frees and re-allocates large buffers page-faults them in every time under
    glibc's defaults; with ``train.host_allocator=reuse`` the second round faults nothing."""
    line, reuse = _faults("reuse", 48)
    assert line.startswith("host allocator: glibc keeps freed memory")
    if "threshold 32 MiB" in line:
        pytest.skip("this glibc caps the mmap threshold at 32 MiB (before 2.36): 48 MiB buffers are mapped per step")
    line, system = _faults("system", 48)  # 48 MiB: above glibc's largest dynamic mmap threshold
    assert line == "host allocator: glibc defaults"
    assert system > 10 * (48 << 20) // 4096 * 0.9  # every page of every round faulted
    assert reuse < system / 100


@pytest.mark.skipif(perf._glibc() is None, reason="the host allocator policy is glibc's")
def test_system_after_reuse_keeps_mid_sized_buffers():
    """Switching back to ``system`` in a process that ``reuse`` changed sets fixed thresholds that
    keep a 4 MiB buffer on the heap, as glibc's dynamic policy would, instead of 128 KiB ones that
    map and fault it in every time."""
    line, n = _faults("reuse,system", 4)
    assert line.startswith("host allocator: glibc with fixed thresholds")
    assert n < 10 * (4 << 20) // 4096 * 0.1


def test_bench_runs_system_allocator_rows_before_the_policy_changes(tiny_parts, tmp_path):
    from ldm_lab import bench
    from ldm_lab.recipe import load_recipe

    recipe = load_recipe(RECIPE, tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data"))
    seen = []
    report = bench.run(recipe, steps=1, warmup=0, compare="naive", out=tmp_path,
                       variants={"reuse-again": ["train.max_grad_norm=0.5"],
                                 "system": ["train.host_allocator=system"]}, log=seen.append)
    order = [r["pipeline"] for r in report["results"]]
    assert order == ["naive", "system", "ldm-lab", "reuse-again"]
    assert [r["recipe"]["host_allocator"] for r in report["results"]] == ["system", "system", "reuse", "reuse"]


def test_bench_rounds_run_each_row_in_fresh_processes_and_report_medians(tiny_parts, tmp_path, capsys):
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
    out = tmp_path / "bench"
    assert cli_main(["bench", "--steps", "2", "--warmup", "1", "--rounds", "2", "--compare", "naive",
                     "--out", str(out), str(RECIPE), *ov]) == 0
    text = capsys.readouterr().out
    rep = json.loads((out / "training.json").read_text())
    assert rep["rounds"] == 2
    by = {r["pipeline"]: r for r in rep["results"]}
    for r in by.values():
        assert len(r["samples_per_s_rounds"]) == 2
        assert r["samples_per_s"] == pytest.approx(sum(r["samples_per_s_rounds"]) / 2)  # median of two
        lo, hi = r["step_s_p10_p90"]
        assert 0 < lo <= hi
    ratios = [o / b for o, b in zip(by["ldm-lab"]["samples_per_s_rounds"], by["naive"]["samples_per_s_rounds"])]
    assert rep["speedup_per_round"] == pytest.approx(ratios)
    assert rep["speedup_vs_naive"] == pytest.approx(sum(ratios) / 2)
    assert "2 rounds, every row in a fresh process" in text and "median of rounds" in text
    # a fresh process starts on glibc's own policy: the naive row's faults are its own, not a neighbour's
    assert by["naive"]["recipe"]["host_allocator"] == "system"


def test_bench_rejects_zero_rounds(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own error exit: usage and one error line
        cli_main(["bench", "--rounds", "0", str(RECIPE)])
    assert e.value.code == 2 and "--rounds" in capsys.readouterr().err


@pytest.mark.parametrize("names", [["naive"], ["ldm-lab"], ["a", "a"], [" naive"], ["a/b"], [".."]])
def test_bench_rejects_variant_names_that_clash(names, capsys):
    args = [a for n in names for a in ("--variant", f"{n}:train.channels_last=false")]
    assert cli_main(["bench", *args, str(RECIPE)]) == 2
    err = capsys.readouterr().err
    assert "--variant name" in err and "Traceback" not in err


def test_rounds_pool_step_spread_and_take_medians():
    """p10/p90 over every timed step of every round (a slow round shows), medians of the rates,
    the largest peak memory."""
    from ldm_lab.bench import _median_row

    def row(times, sps, peak):
        return {"samples_per_s": sps, "step_s": sum(times) / len(times), "phases_s": {"forward": times[0]},
                "peak_memory_bytes": peak, "page_faults_per_step": 1.0, "warmup_s": 1.0, "step_times_s": times,
                "step_s_p10_p90": [min(times), max(times)], "model_flops_per_sample": 0, "peak_tflops": None}

    fast = [0.1] * 9 + [0.11]
    slow = [0.3] * 10
    r = _median_row([row(fast, 100.0, 5), row(fast, 90.0, 7), row(slow, 30.0, 6)])
    assert r["samples_per_s"] == 90.0 and r["samples_per_s_rounds"] == [100.0, 90.0, 30.0]
    assert r["peak_memory_bytes"] == 7 and r["phases_s"]["forward"] == 0.1
    assert len(r["step_times_s"]) == 30
    lo, hi = r["step_s_p10_p90"]
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.3)  # the slow round's steps are the top third


SD15_BENCH = REPO / "recipes/sd15/bench-random.yaml"


def test_sd15_random_bench_recipe_is_the_sd15_architecture_and_offline():
    """The GPU throughput recipe builds the SD 1.5 UNet, SD VAE and CLIP ViT-L text tower from
    configs (nothing downloaded) and their shapes agree: 8x downsampling, 4 latent channels,
    768-wide text states of 77 tokens for the UNet's cross-attention."""
    from diffusers import UNet2DConditionModel

    from ldm_lab.components import load_autoencoder, load_text_encoder, unet_config
    from ldm_lab.recipe import load_recipe

    r = load_recipe(SD15_BENCH, [])
    with torch.device("meta"):  # the 860 M-parameter UNet without allocating it
        unet = UNet2DConditionModel(**unet_config(r.model.unet))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # stable-diffusion-v1-5's UNet
    te = load_text_encoder(r.model.text_encoder)
    assert te.hidden_size == unet.config.cross_attention_dim == 768 and te.max_length == 77
    ids = te.tokenize(["a large red circle at the center on a white background"])
    assert ids.shape == (1, 77) and len(te.tokenizer.get_vocab()) == 49408
    vae = load_autoencoder(r.model.autoencoder)
    assert vae.config.latent_channels == unet.config.in_channels == 4
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)  # 512 px -> 64x64 latents, as SD 1.5


def test_sd15_random_bench_recipe_runs_scaled_down(tmp_path, capsys):
    """The same recipe through `ldm-lab bench --compare naive`, with the three models shrunk (same
    kinds: a config-built CLIP with the 77-token tokenizer, an 8x KL autoencoder) at 32 px so it
    runs on a CPU in seconds: the wiring a GPU run uses."""
    out = tmp_path / "bench"
    small_vae = ("model.autoencoder.config={in_channels: 3, out_channels: 3, latent_channels: 4, layers_per_block: 1, "
                 "norm_num_groups: 8, block_out_channels: [16, 16, 16, 16], down_block_types: [DownEncoderBlock2D, "
                 "DownEncoderBlock2D, DownEncoderBlock2D, DownEncoderBlock2D], up_block_types: [UpDecoderBlock2D, "
                 "UpDecoderBlock2D, UpDecoderBlock2D, UpDecoderBlock2D], scaling_factor: 0.18215}")
    small_te = ("model.text_encoder.config={vocab_size: 49408, hidden_size: 64, intermediate_size: 128, "
                "num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 77, hidden_act: quick_gelu}")
    ov = [small_vae, small_te, "model.unet.preset=tiny", "data.shapes.n=16",
          "data.shapes.resolution=32", "data.resolution=32", f"data.cache_dir={tmp_path / 'data'}",
          "data.num_workers=0", "train.batch_size=4", "train.mixed_precision=no", f"output.dir={tmp_path / 'run'}"]
    assert cli_main(["bench", "--steps", "2", "--warmup", "1", "--compare", "naive", "--out", str(out),
                     str(SD15_BENCH), *ov]) == 0
    rep = json.loads((out / "training.json").read_text())
    by = {r["pipeline"]: r for r in rep["results"]}
    assert by["naive"]["phases_s"]["autoencoder"] > 0 and by["ldm-lab"]["recipe"]["cache_latents"] is True
    assert by["ldm-lab"]["model_flops_per_sample"] == by["naive"]["model_flops_per_sample"] > 0


def test_host_allocator_auto_changes_glibc_only_when_training_on_the_cpu():
    """The default leaves glibc's process-wide policy alone on an accelerator host (issue: it used
    to change it on every host); explicit choices stand."""
    from ldm_lab.perf import resolve_host_allocator
    from ldm_lab.recipe.schema import TrainSpec

    assert TrainSpec().host_allocator == "auto"
    assert [resolve_host_allocator("auto", d) for d in ("cpu", "cuda", "xpu", "mps")] == ["reuse", "system", "system",
                                                                                            "system"]
    assert resolve_host_allocator("reuse", "cuda") == "reuse" and resolve_host_allocator("system", "cpu") == "system"
