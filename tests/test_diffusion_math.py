"""Closed-form checks of ldm_lab.diffusion: expected values are computed here from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ldm_lab.diffusion import (
    diffusion_loss,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    target_for,
)

T = 1000
B0, B1 = 0.00085, 0.012
GAMMA = 5.0
# Under the SD scaled_linear schedule SNR crosses 5 between t=140 and t=150.
TIMESTEPS = torch.tensor([0, 10, 50, 100, 149, 200, 500, 999])


def _hand_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    out, running = [], 1.0
    for b in betas.double().tolist():
        running *= 1.0 - b
        out.append(running)
    return torch.tensor(out, dtype=torch.float64)


def _hand_snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.double()[t]
    return a / (1.0 - a)


def _bcast(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


# --- schedule ---------------------------------------------------------------------------------


def test_scaled_linear_betas_and_alphas_cumprod():
    s = make_noise_scheduler(T, "scaled_linear", B0, B1)
    expected = torch.tensor([(math.sqrt(B0) + i * (math.sqrt(B1) - math.sqrt(B0)) / (T - 1)) ** 2 for i in range(T)])
    torch.testing.assert_close(s.betas.double(), expected.double(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s.alphas_cumprod.double(), _hand_alphas_cumprod(expected), rtol=1e-4, atol=1e-7)


def test_linear_betas():
    s = make_noise_scheduler(T, "linear", 1e-4, 0.02)
    expected = torch.tensor([1e-4 + i * (0.02 - 1e-4) / (T - 1) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(s.betas.double(), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s.alphas_cumprod.double(), _hand_alphas_cumprod(expected), rtol=1e-4, atol=1e-7)


def test_squaredcos_cap_v2_betas():
    def abar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    s = make_noise_scheduler(T, "squaredcos_cap_v2")
    expected = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(s.betas.double(), expected, rtol=1e-4, atol=1e-7)


def test_zero_terminal_snr():
    plain = make_noise_scheduler(T)
    z = make_noise_scheduler(T, zero_terminal_snr=True, prediction_type="v_prediction")
    assert abs(z.alphas_cumprod[-1].item()) < 1e-12
    assert plain.alphas_cumprod[-1].item() > 1e-3  # the unrescaled SD schedule keeps some signal
    assert math.isclose(z.alphas_cumprod[0].item(), plain.alphas_cumprod[0].item(), rel_tol=1e-6)
    snr = _hand_snr(z, torch.arange(T))
    assert snr[-1].item() == 0.0
    assert bool((snr[1:] < snr[:-1]).all())
    assert z.config.timestep_spacing == "trailing"
    assert plain.config.timestep_spacing == "leading"


# --- targets and forward process ----------------------------------------------------------------


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return x0, eps


def test_epsilon_and_sample_targets(batch):
    x0, eps = batch
    assert torch.equal(target_for(make_noise_scheduler(prediction_type="epsilon"), x0, eps, TIMESTEPS), eps)
    assert torch.equal(target_for(make_noise_scheduler(prediction_type="sample"), x0, eps, TIMESTEPS), x0)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_target_by_hand(batch, zero_snr):
    x0, eps = batch
    s = make_noise_scheduler(prediction_type="v_prediction", zero_terminal_snr=zero_snr)
    a = _bcast(s.alphas_cumprod.double()[TIMESTEPS], x0.ndim)
    expected = a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
    torch.testing.assert_close(target_for(s, x0, eps, TIMESTEPS).double(), expected, rtol=1e-5, atol=1e-6)


def test_add_noise_by_hand(batch):
    x0, eps = batch
    s = make_noise_scheduler()
    a = _bcast(s.alphas_cumprod.double()[TIMESTEPS], x0.ndim)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(s.add_noise(x0, eps, TIMESTEPS).double(), expected, rtol=1e-5, atol=1e-6)


# --- min-SNR weights ----------------------------------------------------------------------------


def test_min_snr_weights_epsilon_v_sample():
    snr = _hand_snr(make_noise_scheduler(), TIMESTEPS)
    assert bool((snr > GAMMA).any()) and bool((snr < GAMMA).any())
    clipped = torch.minimum(snr, torch.full_like(snr, GAMMA))
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    for kind, want in expected.items():
        got = min_snr_weights(make_noise_scheduler(prediction_type=kind), TIMESTEPS, GAMMA)
        assert got.dtype == torch.float32 and got.shape == TIMESTEPS.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # High-SNR (low t) epsilon weights are gamma/SNR < 1; low-SNR ones are exactly 1.
    eps_w = min_snr_weights(make_noise_scheduler(), TIMESTEPS, GAMMA)
    assert bool((eps_w[snr > GAMMA] < 1).all()) and bool((eps_w[snr < GAMMA] == 1).all())


def test_min_snr_weights_zero_terminal_snr_are_finite():
    t = torch.tensor([0, 500, T - 1])
    for kind, at_T in {"epsilon": 1.0, "v_prediction": 0.0, "sample": 0.0}.items():
        s = make_noise_scheduler(prediction_type=kind, zero_terminal_snr=True)
        w = min_snr_weights(s, t, GAMMA)
        assert bool(torch.isfinite(w).all()), kind
        assert w[-1].item() == at_T, kind


# --- noise --------------------------------------------------------------------------------------


def test_noise_offset_is_constant_per_channel():
    latents = torch.zeros(3, 4, 8, 8)
    k = 0.1
    target, inp = sample_noise(latents, torch.Generator().manual_seed(7), noise_offset=k)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(latents.shape, generator=g)
    offset = torch.randn(3, 4, 1, 1, generator=g)
    torch.testing.assert_close(target - base, (k * offset).expand_as(base))
    diff = target - base
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))
    assert inp is target or torch.equal(inp, target)


def test_input_perturbation_only_changes_input_noise():
    latents = torch.zeros(3, 4, 8, 8)
    plain, _ = sample_noise(latents, torch.Generator().manual_seed(3))
    target, inp = sample_noise(latents, torch.Generator().manual_seed(3), input_perturbation=0.1)
    assert torch.equal(target, plain)
    assert not torch.allclose(inp, target)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(inp, base + 0.1 * torch.randn(latents.shape, generator=g))


def test_sample_noise_keeps_dtype_and_device():
    latents = torch.zeros(2, 4, 4, 4, dtype=torch.bfloat16)
    target, inp = sample_noise(latents, noise_offset=0.05, input_perturbation=0.1)
    assert target.dtype == inp.dtype == torch.bfloat16 and target.shape == latents.shape


def test_sample_timesteps_uniform_range():
    t = sample_timesteps(4096, T, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (4096,)
    assert int(t.min()) >= 0 and int(t.max()) < T
    assert abs(t.double().mean().item() - (T - 1) / 2) < 20  # uniform mean (T-1)/2, std err ~4.5


# --- loss ---------------------------------------------------------------------------------------


def test_loss_unweighted_equals_mse():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 4, 6, 6, generator=g)
    torch.testing.assert_close(diffusion_loss(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(diffusion_loss(pred, target, torch.ones(5)), F.mse_loss(pred, target))


def test_loss_weighted_by_hand_and_float32():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    w = torch.tensor([0.5, 1.0, 2.0])
    per = [((pred[b] - target[b]) ** 2).sum().item() / pred[b].numel() for b in range(3)]
    expected = sum(wb * pb for wb, pb in zip(w.tolist(), per)) / 3
    assert math.isclose(diffusion_loss(pred, target, w).item(), expected, rel_tol=1e-5)
    torch.testing.assert_close(
        diffusion_loss(pred, target, w, reduction="none"), torch.tensor(per) * w, rtol=1e-5, atol=1e-7
    )
    half = diffusion_loss(pred.bfloat16(), target.bfloat16(), w.bfloat16())
    assert half.dtype == torch.float32


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prediction_type": "noise"}, "prediction_type must be one of"),
        ({"beta_schedule": "cosine"}, "beta_schedule must be one of"),
        ({"num_train_timesteps": 0}, "num_train_timesteps must be"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start < beta_end"),
    ],
)
def test_bad_arguments_raise_readable_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_noise_scheduler(**kwargs)


def test_bad_prediction_type_on_scheduler_raises(batch):
    x0, eps = batch
    s = DDPMScheduler(prediction_type="noise")  # diffusers itself does not validate at construction
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        target_for(s, x0, eps, TIMESTEPS)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        min_snr_weights(s, TIMESTEPS, GAMMA)
    with pytest.raises(ValueError, match="gamma must be positive"):
        min_snr_weights(make_noise_scheduler(), TIMESTEPS, 0.0)
