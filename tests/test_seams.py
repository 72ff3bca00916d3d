"""The three seams of the diffusion core: the objective, the denoiser adapter and the conditioning
record (see docs/architecture.md)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_UNET
from ldm_lab.components import load_text_encoder, load_unet
from ldm_lab.components.denoiser import Residuals, denoiser_for
from ldm_lab.components.record import Conditioning
from ldm_lab.diffusion import OBJECTIVES, DDPMObjective, make_objective, min_snr_weights, target_for
from ldm_lab.errors import UserError
from ldm_lab.recipe.schema import NoiseSpec, TextEncoderSpec, UNetSpec
from ldm_lab.trainers.randomness import BatchRNG


def _unet():
    torch.manual_seed(0)
    return load_unet(UNetSpec(**TINY_UNET))


def test_unet_adapter_equals_the_direct_call_bit_for_bit():
    unet = _unet()
    d = denoiser_for(unet)
    x, t, c = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999]), torch.randn(3, 7, 32)
    cond = Conditioning(c, torch.ones(3, 7, dtype=torch.bool), torch.randn(3, 32))
    with torch.no_grad():
        direct = unet(x, t, encoder_hidden_states=c).sample
        assert torch.equal(d(unet, x, t, cond), direct)
        # with residuals: the kwargs a stock ControlNet pipeline passes
        down = [torch.randn_like(r) for r in _down_shapes(unet, x, t, c)]
        mid = torch.randn(3, 32, 4, 4)
        want = unet(x, t, encoder_hidden_states=c, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        assert torch.equal(d(unet, x, t, cond, Residuals(down, mid)), want)
        assert not torch.equal(want, direct)


def _down_shapes(unet, x, t, c):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    down, _ = net(x, t, encoder_hidden_states=c, controlnet_cond=torch.zeros(3, 3, 16, 16), return_dict=False)
    return down


def test_controlnet_residuals_through_the_adapter_equal_the_direct_call():
    from diffusers import ControlNetModel

    unet = _unet()
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.nn.init.normal_(net.controlnet_mid_block.weight)  # non-zero residuals
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    control = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=c, controlnet_cond=control, return_dict=False)
        r = denoiser_for(unet).control_residuals(net, x, t, Conditioning(c), control)
    assert all(torch.equal(a, b) for a, b in zip(r.down, down)) and torch.equal(r.mid, mid)
    assert mid.abs().max() > 0


def test_an_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="no denoiser adapter for Linear"):
        denoiser_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_objective_draws_the_closed_form_terms(prediction_type):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with the very eps, t and offset the run's RNG gives,
    the target of the prediction type and the min-SNR weight, in the fixed draw order."""
    spec = NoiseSpec(prediction_type=prediction_type, min_snr_gamma=5.0, noise_offset=0.1)
    obj = make_objective(spec)
    assert isinstance(obj, DDPMObjective) and OBJECTIVES["ddpm"] is DDPMObjective
    x0 = torch.randn(4, 4, 8, 8)
    d = obj.draw(x0, BatchRNG(3, torch.device("cpu"), 0, 1))
    rng = BatchRNG(3, torch.device("cpu"), 0, 1)  # the same stream, drawn by hand
    eps = rng.randn(tuple(x0.shape)) + 0.1 * rng.randn((4, 4, 1, 1))
    t = rng.randint(1000, 4)
    assert torch.equal(d.t, t)
    abar = obj.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=1e-6, atol=1e-6)
    want = {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(d.target, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(d.target, target_for(obj.scheduler, x0, eps, t))
    assert torch.equal(d.weight, min_snr_weights(obj.scheduler, t, 5.0))
    # the per-sample loss is the weighted MSE
    pred = torch.randn_like(x0)
    torch.testing.assert_close(obj.loss(pred, d), d.weight * (pred - d.target).pow(2).flatten(1).mean(1))


def test_every_objective_the_schema_names_is_registered():
    from ldm_lab.recipe.choices import OBJECTIVE_NAMES

    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)
    assert all(OBJECTIVES[n].name == n for n in OBJECTIVES)


def test_objective_names_the_scheduler_samplers_are_built_from():
    obj = make_objective(NoiseSpec(prediction_type="v_prediction", zero_terminal_snr=True))
    cfg = obj.scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr and cfg.timestep_spacing == "trailing"


def test_record_rows_move_select_and_drop_together():
    states, mask, pooled = torch.randn(4, 3, 2), torch.rand(4, 3) > 0.3, torch.randn(4, 5)
    r = Conditioning(states, mask, pooled)
    sub = r[torch.tensor([2, 0])]
    assert torch.equal(sub.states, states[[2, 0]]) and torch.equal(sub.mask, mask[[2, 0]])
    assert torch.equal(sub.pooled, pooled[[2, 0]]) and len(sub) == 2
    null = Conditioning(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 5))
    keep = torch.tensor([True, False, True, False])
    w = r.where(keep, null)
    for k in range(4):
        src = r[k] if keep[k] else null
        assert torch.equal(w.states[k], src.states[0]) and torch.equal(w.mask[k], src.mask[0])
        assert torch.equal(w.pooled[k], src.pooled[0])
    assert w.mask.dtype == torch.bool and r.to(dtype=torch.float64).mask.dtype == torch.bool
    both = Conditioning.cat([r, null])
    assert len(both) == 5 and torch.equal(both.pooled[4], null.pooled[0])
    with pytest.raises(ValueError):
        r.where(keep, Conditioning(torch.zeros(1, 3, 2)))


def test_t5_runs_with_its_attention_mask(tiny_parts):
    """Padding does not change a T5 prompt's token states (the mask keeps it out of attention),
    the record carries the mask, and the pooled vector is the mean over real tokens."""
    cfg = {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16, "vocab_size": 49408,
           "pad_token_id": 49407}
    torch.manual_seed(0)
    short = load_text_encoder(TextEncoderSpec(kind="t5", tokenizer=str(tiny_parts["clip"] / "tokenizer"),
                                              max_length=10, config=cfg))
    long = load_text_encoder(TextEncoderSpec(kind="t5", tokenizer=str(tiny_parts["clip"] / "tokenizer"),
                                             max_length=16, config=cfg))
    long.model.load_state_dict(short.model.state_dict())
    assert long.model.config.use_attention_mask  # a stock pipeline then passes the mask too
    a, b = short(["a red circle"]), long(["a red circle"])
    n = int(a.mask.sum())
    assert a.mask.shape == (1, 10) and b.mask.shape == (1, 16) and 0 < n == int(b.mask.sum()) < 10
    torch.testing.assert_close(a.states[:, :n], b.states[:, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.pooled, a.states[:, :n].mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-5, atol=1e-5)


def test_clip_record_has_no_mask_and_the_pooled_output(tiny_parts):
    te = load_text_encoder(TextEncoderSpec(kind="clip", pretrained=str(tiny_parts["clip"]), subfolder="text_encoder"))
    r = te(["a red circle", ""])
    out = te.model(te.tokenize(["a red circle", ""]))
    assert r.mask is None and torch.equal(r.states, out.last_hidden_state) and torch.equal(r.pooled, out.pooler_output)


def test_zero_terminal_snr_needs_v_prediction_and_samples_with_cfg_rescale(tiny_parts, tmp_path, capsys):
    """Lin et al.: zero terminal SNR with epsilon prediction is refused in one sentence (sampling
    would divide by alpha_bar = 0); with v-prediction, validation and evaluation rescale CFG by the
    paper's 0.7 unless the recipe says otherwise, and the rescale reaches the stock pipeline."""
    import numpy as np
    from accelerate import Accelerator

    from conftest import REPO, tiny_t2i_overrides
    from ldm_lab.cli import main as cli_main
    from ldm_lab.recipe import load_recipe
    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    recipe = REPO / "recipes/shapes/t2i.yaml"
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
    assert cli_main(["train", str(recipe), *ov, "noise.zero_terminal_snr=true"]) == 2
    err = capsys.readouterr().err
    assert "zero_terminal_snr needs prediction_type v_prediction" in err and "Traceback" not in err
    zsnr = [*ov, "noise.zero_terminal_snr=true", "noise.prediction_type=v_prediction", "validation.sampler=ddim"]
    tr = TextToImageTrainer(load_recipe(recipe, zsnr), Accelerator(cpu=True), tmp_path / "probe")
    tr.build_models()
    assert tr.guidance_rescale(tr.recipe.validation) == 0.7 and tr.guidance_rescale(tr.recipe.eval) == 0.7
    plain = load_recipe(recipe, [*ov, "validation.guidance_rescale=0.3"])
    assert TextToImageTrainer(plain, Accelerator(cpu=True), tmp_path / "p2").recipe.validation.guidance_rescale == 0.3
    with torch.no_grad():
        torch.nn.init.normal_(tr.unet.conv_out.weight, std=0.5)  # a prediction that depends on the prompt
        imgs = [np.asarray(tr.sample(["a red circle"], [3], "ddim", 4, 7.5, r)[0], dtype=int) for r in (0.0, 0.7)]
    assert np.abs(imgs[0] - imgs[1]).max() > 0  # the rescale reached StableDiffusionPipeline
