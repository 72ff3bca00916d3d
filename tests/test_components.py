"""Component builders: text encoders (CLIP / T5 / OpenCLIP), autoencoder, UNet presets."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_UNET
from ldm_lab.components import PRESETS, load_autoencoder, load_text_encoder, load_unet, unet_config
from ldm_lab.components.text_encoders import write_clip_bpe_vocab
from ldm_lab.recipe.schema import AutoencoderSpec, TextEncoderSpec, UNetSpec


def test_clip_bpe_vocab_matches_open_clip_tokenizer(tmp_path):
    """The written transformers CLIPTokenizer tokenizes exactly as open_clip's own tokenizer."""
    import open_clip
    from transformers import CLIPTokenizer

    write_clip_bpe_vocab(tmp_path, model_max_length=77)
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    ref = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a large red circle at the top left on a white background", "Photo of a sks dog, 4k!"]:
        a = ours(text, padding="max_length", max_length=77, truncation=True).input_ids
        b = ref([text])[0].tolist()
        n = b.index(49407) + 1
        assert a[:n] == b[:n]
    assert len(ours) == 49408


def test_clip_from_local_dir_and_pipeline_subfolder(tiny_parts):
    te = load_text_encoder(TextEncoderSpec(kind="clip", pretrained=str(tiny_parts["clip"]), subfolder="text_encoder"))
    out = te(["a red circle", ""])
    assert out.states.shape == (2, 20, 32) and te.max_length == 20
    assert not any(p.requires_grad for p in te.parameters())
    trainable = load_text_encoder(TextEncoderSpec(kind="clip", pretrained=str(tiny_parts["clip"]),
                                                  subfolder="text_encoder", trainable=True))
    assert all(p.requires_grad for p in trainable.parameters())


def test_t5_from_config_with_a_tokenizer(tiny_parts):
    te = load_text_encoder(TextEncoderSpec(
        kind="t5", tokenizer=str(tiny_parts["clip"] / "tokenizer"), max_length=16,
        config={"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16, "vocab_size": 49408}))
    out = te(["a red circle"])
    assert out.states.shape == (1, 16, 32) and te.hidden_size == 32


def test_openclip_text_tower_penultimate_states():
    te = load_text_encoder(TextEncoderSpec(kind="openclip", config=dict(
        context_length=77, vocab_size=49408, width=32, heads=2, layers=2, output_dim=32)))
    ids = te.tokenize(["a red circle"])
    out = te.encode_ids(ids)
    assert out.states.shape == (1, 77, 32)
    # penultimate: dropping the last block must not change the result, dropping another must
    m = te.model
    saved = m.transformer.resblocks
    m.transformer.resblocks = torch.nn.ModuleList(list(saved)[:1])
    with torch.no_grad():
        fewer = te.encode_ids(ids).states
    m.transformer.resblocks = saved
    assert not torch.allclose(fewer, out.states)


def test_autoencoder_from_dir_pipeline_dir_and_config(tiny_parts, tmp_path):
    import shutil

    vae = load_autoencoder(AutoencoderSpec(pretrained=str(tiny_parts["vae"])))
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(tiny_parts["vae"], pipe_dir / "vae")
    from_pipe = load_autoencoder(AutoencoderSpec(pretrained=str(pipe_dir)))
    for a, b in zip(vae.parameters(), from_pipe.parameters()):
        assert torch.equal(a, b)
    from_cfg = load_autoencoder(AutoencoderSpec(config=dict(vae.config)))
    assert from_cfg.config.latent_channels == 4 and not any(p.requires_grad for p in from_cfg.parameters())


def test_unet_presets():
    assert set(PRESETS) >= {"tiny", "sd15", "sd21"}
    sd15 = unet_config(UNetSpec(preset="sd15"))
    assert sd15["cross_attention_dim"] == 768 and tuple(sd15["block_out_channels"]) == (320, 640, 1280, 1280)
    assert unet_config(UNetSpec(preset="sd21"))["cross_attention_dim"] == 1024
    unet = load_unet(UNetSpec(**TINY_UNET))
    x = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 5, 32)).sample
    assert x.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="'tiny', 'sd15' or 'sd21'"):
        UNetSpec(preset="sd99")


def test_lerp_ema_matches_diffusers_ema_and_the_closed_form():
    """The loop's fused EMA update gives diffusers' EMAModel result (decay warm-up, a frozen
    parameter copied, a module passed) and, for one step, shadow - (1 - d)(shadow - param)."""
    from diffusers.training_utils import EMAModel

    from ldm_lab.trainers.ema import LerpEMA

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    params[1].requires_grad_(False)
    ours = LerpEMA(params, decay=0.99, use_ema_warmup=True, foreach=True)
    ref = EMAModel(params, decay=0.99, use_ema_warmup=True, foreach=True)
    for i in range(6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        before = [x.clone() for x in ours.shadow_params]
        ours.step(params)
        ref.step(params)
        d = ours.cur_decay_value
        assert d == ref.cur_decay_value and (d > 0) == (i > 0)  # diffusers' first update copies
        torch.testing.assert_close(ours.shadow_params[0], before[0] - (1 - d) * (before[0] - params[0]))
        torch.testing.assert_close(ours.shadow_params[1], params[1].detach())
    assert ours.optimization_step == ref.optimization_step == 6
    for a, b in zip(ours.shadow_params, ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours.shadow_params[0], params[0])  # averaged, not copied
    module = torch.nn.Linear(3, 2)
    ema = LerpEMA(module.parameters(), decay=0.5, use_ema_warmup=False, foreach=True)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.step(module)  # diffusers also accepts the module itself; its first update copies
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.step(module)
    d = ema.cur_decay_value  # diffusers' schedule: min(decay, (1 + step) / (10 + step)) = 2 / 11
    assert d == pytest.approx(2 / 11)
    torch.testing.assert_close(ema.shadow_params[0], module.weight.detach() - d)  # lagging by d of the +1


def test_offloaded_ema_readers_wait_for_the_copy_to_the_host():
    """An offloaded EMA is copied to pinned host memory without blocking (``ema_step`` records a
    CUDA event after the copy); every host-side reader (the checkpoint's state_dict, copy_to, a
    load, the next step) waits for that event first, once. The event here is a stand-in with the
    one method the EMA calls (this host has no CUDA)."""
    from ldm_lab.trainers.ema import LerpEMA

    class Event:
        waits = 0

        def synchronize(self):
            Event.waits += 1

    p = torch.nn.Parameter(torch.ones(3))
    ema = LerpEMA([p], decay=0.5)
    for read in (lambda: ema.state_dict(), lambda: ema.copy_to([p]), lambda: ema.step([p]),
                 lambda: ema.load_state_dict(ema.state_dict())):
        before = Event.waits
        ema._pending = Event()
        read()
        assert Event.waits == before + 1 and ema._pending is None
    ema.state_dict()  # nothing pending: nothing to wait for
    assert Event.waits == 4
