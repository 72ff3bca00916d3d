"""The flow-matching objective against closed forms: the interpolation and its velocity, the
timestep densities (sample moments), the shift formulas, the bounds, the weightings, and the
sampler it names integrating its own target back to the data."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ldm_lab.diffusion import OBJECTIVES, make_objective
from ldm_lab.diffusion.ddpm import DDPMObjective
from ldm_lab.diffusion.flow import (
    FlowMatchingObjective,
    dynamic_shift_sigmas,
    interpolate,
    resolution_mu,
    shift_sigmas,
    velocity,
)
from ldm_lab.recipe.schema import NoiseSpec
from ldm_lab.trainers.randomness import BatchRNG

N = 40000  # draws for the moment checks: standard error of a mean ~ 0.005 of a std


def _sigmas(obj, n=N, shape=(4, 8, 8), seed=0):
    d = obj.draw(torch.zeros(n, *shape), BatchRNG(seed))
    return d.t / obj.T, d


def test_interpolation_and_velocity_target_by_hand():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    s = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x0, eps, s)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(velocity(x0, eps), eps - x0)
    # the velocity is the derivative of the path in sigma
    h = 1e-3
    torch.testing.assert_close((interpolate(x0, eps, s + h) - interpolate(x0, eps, s)) / h, eps - x0, atol=1e-3, rtol=0)


def test_the_draw_is_the_interpolation_of_its_own_noise():
    obj = FlowMatchingObjective()
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    d = obj.draw(x0, BatchRNG(3))
    eps = d.target + x0  # target = eps - x0
    torch.testing.assert_close(d.x_t, interpolate(x0, eps, d.t / 1000))
    assert d.weight is None and d.t.dtype == torch.float32 and ((d.t > 0) & (d.t < 1000)).all()


def test_logit_normal_density_moments():
    s, _ = _sigmas(FlowMatchingObjective(timestep_density="logit_normal", logit_mean=0.5, logit_std=0.8))
    z = torch.logit(s.double())
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.8) < 0.02


def test_uniform_density_moments():
    s, _ = _sigmas(FlowMatchingObjective(timestep_density="uniform"))
    assert abs(s.mean().item() - 0.5) < 0.01 and abs(s.var().item() - 1 / 12) < 0.003


@pytest.mark.parametrize("scale", [0.0, 1.29])
def test_mode_density_moments(scale):
    """u = 1 − v − s·(cos²(πv/2) − 1 + v), v ~ U(0, 1): E[u] = 1/2 for every s; E[u²] by quadrature."""
    s, _ = _sigmas(FlowMatchingObjective(timestep_density="mode", mode_scale=scale))
    v = (np.arange(200000) + 0.5) / 200000
    u = 1 - v - scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)
    assert abs(s.mean().item() - 0.5) < 0.01
    assert abs((s.double() ** 2).mean().item() - (u ** 2).mean()) < 0.01


def test_fixed_shift_formula_and_the_schedulers_own_sigmas():
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert torch.equal(shift_sigmas(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)  # its training sigmas: the shifted grid t/T
    torch.testing.assert_close(sch.sigmas, shift_sigmas(torch.arange(1000, 0, -1) / 1000, 3.0))


def test_fixed_shift_moves_the_density():
    """With u uniform, σ = s·u / (1 + (s−1)·u) has CDF P(σ ≤ x) = x / (s − (s−1)·x)."""
    s, _ = _sigmas(FlowMatchingObjective(timestep_density="uniform", shift=3.0))
    for x in (0.25, 0.5, 0.75):
        assert abs((s <= x).double().mean().item() - x / (3 - 2 * x)) < 0.01


def test_resolution_dependent_shift():
    assert resolution_mu(256) == pytest.approx(0.5) and resolution_mu(4096) == pytest.approx(1.15)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    u = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(dynamic_shift_sigmas(u, 0.8), sch.time_shift(0.8, 1.0, u))
    obj = FlowMatchingObjective(timestep_density="uniform", dynamic_shift=True, patch_size=2)
    # 64x64 latents with patch 2: 1024 tokens
    assert obj.image_seq_len(torch.zeros(1, 4, 64, 64)) == 1024
    s, _ = _sigmas(obj, shape=(4, 64, 64), n=4000)
    mu = resolution_mu(1024)
    x = 0.5
    assert abs((s <= x).double().mean().item() - x / (math.exp(mu) - (math.exp(mu) - 1) * x)) < 0.03


def test_timestep_bounds():
    s, d = _sigmas(FlowMatchingObjective(timestep_density="uniform", min_timestep=200, max_timestep=800))
    assert d.t.min() >= 200 and d.t.max() <= 800 and abs(s.mean().item() - 0.5) < 0.01
    ddpm = DDPMObjective(min_timestep=100, max_timestep=300)
    t = ddpm.draw(torch.zeros(5000, 4, 2, 2), BatchRNG(0)).t
    assert t.min() == 100 and t.max() == 299


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_loss_weightings(scheme):
    obj = FlowMatchingObjective(loss_weighting=scheme)
    s, d = _sigmas(obj, n=64)
    want = s ** -2 if scheme == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    torch.testing.assert_close(d.weight, want)
    pred = torch.zeros_like(d.target)
    per = obj.loss(pred, d)
    torch.testing.assert_close(per, want * d.target.pow(2).flatten(1).mean(1))


def test_same_draws_for_any_process_count():
    obj = FlowMatchingObjective(timestep_density="logit_normal")
    x0 = torch.zeros(8, 4, 2, 2)
    whole = obj.draw(x0, BatchRNG(5))
    for r in range(2):
        part = obj.draw(x0[:4], BatchRNG(5, rank=r, world_size=2))
        assert torch.equal(part.t, whole.t[4 * r:4 * r + 4]) and torch.equal(part.target, whole.target[4 * r:4 * r + 4])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_sampler_it_names_integrates_its_target_back_to_the_data(shift):
    """Along a straight flow the velocity is constant, so Euler steps with the exact target land on
    x0: the sign, the time convention (t = σ·T) and the shift of training and sampling agree."""
    obj = FlowMatchingObjective(shift=shift)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sch = FlowMatchEulerDiscreteScheduler.from_config(obj.scheduler.config)
    sch.set_timesteps(12)
    x = eps.clone()
    for t in sch.timesteps:
        sigma = t / obj.T
        torch.testing.assert_close(x, interpolate(x0, eps, sigma.expand(2)), atol=1e-5, rtol=0)
        x = sch.step(velocity(x0, eps), t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_recipe_keys_of_the_other_objective_are_refused():
    assert isinstance(make_objective(NoiseSpec(objective="flow", shift=3.0)), FlowMatchingObjective)
    assert set(OBJECTIVES) == {"ddpm", "flow"}
    with pytest.raises(ValueError, match="shift is a key of the flow objective"):
        NoiseSpec(shift=3.0)
    with pytest.raises(ValueError, match="min_snr_gamma is a key of the ddpm objective"):
        NoiseSpec(objective="flow", min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="timestep bounds"):
        NoiseSpec(objective="flow", min_timestep=900, max_timestep=100)


def test_a_unet_trains_with_flow_and_its_stock_pipeline_samples_it(tiny_parts, tmp_path, capsys):
    """Flow matching is a recipe choice for any backbone with a sampler: the UNet's
    StableDiffusionPipeline runs the flow DPM-Solver (FlowMatchEuler lacks scale_model_input)."""
    import json

    from conftest import REPO, run_without_ldm_lab, tiny_t2i_overrides
    from ldm_lab.cli import main as cli_main

    recipe = REPO / "recipes/shapes/t2i.yaml"
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data") + ["noise={objective: flow, shift: 2.0}"]
    rc = cli_main(["train", str(recipe), *ov, "validation.sampler=euler"])
    assert rc == 2 and "choose dpm++ or unipc" in capsys.readouterr().err
    assert cli_main(["train", str(recipe), *ov]) == 0
    sched = json.loads((tmp_path / "run/pipeline/scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["use_flow_sigmas"] and sched["flow_shift"] == 2.0
    code = f"""
import sys, numpy as np
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path / 'run/pipeline')!r})
out = pipe("a red circle", num_inference_steps=3, output_type="np").images
assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
"""
    run_without_ldm_lab(code)
    capsys.readouterr()
    for sampler, says in (("euler", "choose dpm++ or unipc"), ("ddim", "does not sample a flow-matching model")):
        rc = cli_main(["sample", str(tmp_path / "run"), "--prompt", "a red circle", "--sampler", sampler,
                       "--steps", "2", "--out", str(tmp_path / sampler)])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err, err[-500:]
    assert cli_main(["sample", str(tmp_path / "run"), "--prompt", "a red circle", "--sampler", "unipc",
                     "--steps", "2", "--out", str(tmp_path / "unipc")]) == 0
