"""The pipeline's own arithmetic on stub models, so that each rule fails its own test in well under a second:
the true-CFG batch order (negative half first, as the official ``torch.cat([negative, positive])`` and
``noise_pred.chunk(2)``), the guidance formula, the VAE's ``latents / scaling_factor`` before decoding, and the
noise generators' device recorded in the settings.

The stubs make every quantity traceable: the stub DiT's velocity is a number that identifies the text it was
given, and the stub VAE's decoder returns its input's first three channels unchanged.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hvlab.pipeline import GenerationSettings, HunyuanVideoPipeline
from hvlab.scheduler import cfg_combine, initial_noise
from hvlab.text_encoder import TextEncoderOutput

C, T, H, W = 16, 1, 2, 2  # latent of a 16 x 16 x 1 video


class StubText(nn.Module):
    """Per-token states that encode the prompt: every entry is len(prompt) + 100 * (prompt is the negative)."""

    def __init__(self, negative: str, pooled: bool):
        super().__init__()
        self.negative, self.pooled = negative, pooled

    def encode(self, prompts, device=None):
        code = torch.tensor([len(p) + 100.0 * (p == self.negative) for p in prompts])
        if self.pooled:
            return TextEncoderOutput(code[:, None].repeat(1, 4), torch.ones(len(prompts), 1))
        return TextEncoderOutput(code[:, None, None].repeat(1, 3, 4), torch.ones(len(prompts), 3, dtype=torch.long))


class StubDiT(nn.Module):
    """v = x + (the text code of its row): a velocity that says which prompt produced it."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(guidance_embed=False, in_channels=C)
        self.seen_text = []

    def grid_size(self, shape):
        return tuple(shape[2:])

    def forward(self, x, t, text, mask, pooled, guidance=None):
        self.seen_text.append(text[:, 0, 0].clone())
        return x + text[:, 0, 0].reshape(-1, 1, 1, 1, 1)


class StubVAE(nn.Module):
    """decode(z) = the first 3 channels of z, in pixel space [-1, 1]."""

    def __init__(self, scaling_factor: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(scaling_factor=scaling_factor, spatial_compression_ratio=8,
                                      temporal_compression_ratio=4)

    def decode(self, z):
        return z[:, :3]


NEG, POS = "a blurry mess", "a red circle moving right"


def stub_pipeline(scaling_factor: float = 0.5) -> HunyuanVideoPipeline:
    return HunyuanVideoPipeline(StubDiT(), StubVAE(scaling_factor), StubText(NEG, pooled=False),
                                StubText(NEG, pooled=True),
                                defaults=dict(height=16, width=16, video_length=1, num_inference_steps=1,
                                              negative_prompt=NEG, flow_shift=1.0))


def test_cfg_combines_negative_first_and_guides_towards_the_positive():
    pipe = stub_pipeline()
    x = torch.zeros(1, C, T, H, W)
    text = torch.cat([StubText(NEG, False).encode([NEG]).hidden_state, StubText(NEG, False).encode([POS]).hidden_state])
    mask = torch.ones(2, 3, dtype=torch.long)
    v = pipe.predict_velocity(x, 500.0, text, mask, torch.zeros(2, 4), guidance_scale=4.0, embedded_scale=None)
    # independent reference: the stub's velocities for each prompt alone, combined by the CFG formula
    v_neg, v_pos = len(NEG) + 100.0, float(len(POS))
    assert torch.equal(v, torch.full_like(x, v_neg + 4.0 * (v_pos - v_neg)))
    a, b = cfg_combine(torch.arange(4.0))
    assert a.tolist() == [0.0, 1.0] and b.tolist() == [2.0, 3.0]  # the first half is the negative one


def test_generate_hands_the_dit_the_negative_half_first():
    pipe = stub_pipeline()
    pipe(POS, seed=0, guidance_scale=3.0)
    seen = pipe.transformer.seen_text[0]  # (2,) text codes of the batch the DiT got
    assert seen.tolist() == [len(NEG) + 100.0, float(len(POS))]


def test_decode_divides_the_latents_by_the_vae_scaling_factor():
    pipe = stub_pipeline(scaling_factor=0.5)
    z = torch.linspace(-0.4, 0.4, C * T * H * W).reshape(1, C, T, H, W)
    video = pipe.decode(z)
    # the release rule: pixels = (vae.decode(z / scaling_factor) / 2 + 0.5).clamp(0, 1); the stub decoder is z[:, :3]
    expected = ((z[:, :3] / 0.5) / 2 + 0.5).clamp(0, 1)
    assert float((video - expected).abs().max()) < 1e-7  # fp32: one division, one multiply-add
    assert float(video.max()) < 1 and float(video.min()) > 0  # nothing clipped: a missing division would show


def test_seed_device_is_recorded_and_old_settings_default_to_the_cpu(tmp_path):
    pipe = stub_pipeline()
    out = pipe(POS, seed=5, save_path=tmp_path)
    assert out.settings.seed_device == "cpu"
    assert json.loads((tmp_path / "settings.json").read_text())["seed_device"] == "cpu"
    old = {k: v for k, v in out.settings.to_dict().items() if k != "seed_device"}  # a settings.json from before
    assert GenerationSettings.from_dict(old).seed_device == "cpu"
    with pytest.raises(ValueError, match="seed_device.*'gpu0'"):
        pipe(POS, seed=5, seed_device="gpu0")


def test_initial_noise_draws_one_generator_per_seed_on_the_seed_device():
    shape = (C, T, H, W)
    z = initial_noise(shape, [3, 4])
    # independent reference: each video's noise is what a fresh generator with its seed gives on its own
    assert torch.equal(z[1], torch.randn(shape, generator=torch.Generator("cpu").manual_seed(4)))
    assert torch.equal(initial_noise(shape, [4])[0], z[1]) and not torch.equal(z[0], z[1])
    if torch.cuda.is_available():  # the official way: generators on the GPU give other numbers for the same seed
        assert not torch.equal(initial_noise(shape, [3], seed_device="cuda")[0].cpu(), z[0])
