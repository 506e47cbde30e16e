"""Parity with an independent implementation: diffusers' HunyuanVideoTransformer3DModel.

Same random weights (all of them, including the zero-initialised modulation and final layers, so no block
is the identity) go through ``official_to_diffusers``; both models run in float32 on the same inputs.

Tolerance: relative error (Frobenius) <= 1e-6. Both compute the same maths in float32 with different
op orders (fused vs split qkv, SDPA vs masked SDPA): measured 3.1e-7 (the main test) and 2.5e-7 (temporal
patch) on the CPU, so the bound is ~3x that, while a single swapped chunk or a wrong RoPE convention gives
errors of order 1.

What is compared, and why only that. diffusers builds a key mask (B, 1, 1, L): every query, padded text
rows included, attends to the real tokens. The official model (and hvlab) put the padded text tokens in a
segment of their own that attends only to itself. Padded text tokens are never keys for real tokens in
either, so the **video output** is identical; the hidden states of padded text positions differ (diffusers:
a mix of real tokens; hvlab: a mix of padding) and are never compared. The token refiner rule (valid_i AND
valid_j, key 0 always visible) is the same in both.
"""
import pytest
import torch

from hvlab.checkpoint import diffusers_to_official, official_to_diffusers
from hvlab.model import HYVideoConfig, HYVideoDiffusionTransformer, randomize_weights_

diffusers = pytest.importorskip("diffusers")

CFG = HYVideoConfig(hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=2,
                    mm_single_blocks_depth=2, refiner_depth=2, text_states_dim=32, text_states_dim_2=16)


def diffusers_model(patch_size_t=1):
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=patch_size_t,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_theta=256.0,
        rope_axes_dim=(8, 12, 12),
    ).eval()


@pytest.fixture(scope="module")
def pair():
    ours = randomize_weights_(HYVideoDiffusionTransformer(CFG), seed=7).eval()
    ref = diffusers_model()
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("lens", [[7], [1], [4], [7, 3], [2, 5]])
@torch.no_grad()
def test_video_output_matches_diffusers(pair, lens):
    ours, ref = pair
    B, L_txt = len(lens), 7
    g = torch.Generator().manual_seed(sum(lens))
    x = torch.randn(B, 16, 3, 4, 6, generator=g)
    t = torch.tensor([937.5, 125.0][:B])
    text = torch.randn(B, L_txt, 32, generator=g)
    mask = (torch.arange(L_txt)[None] < torch.tensor(lens)[:, None]).long()
    pooled = torch.randn(B, 16, generator=g)
    guidance = torch.tensor([6016.0, 3008.0][:B])
    a = ours(x, t, text, mask, pooled, guidance)
    b = ref(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
            pooled_projections=pooled, guidance=guidance, return_dict=False)[0]
    assert b.abs().mean() > 0.1  # the reference output is not trivially small
    assert rel_err(a, b) <= 1e-6  # measured 3.1e-7 / 2.5e-7 (module docstring)


@torch.no_grad()
def test_temporal_patch_matches_diffusers():
    cfg = HYVideoConfig(**{**CFG.__dict__, "patch_size": (2, 2, 2)})
    ours = randomize_weights_(HYVideoDiffusionTransformer(cfg), seed=8).eval()
    ref = diffusers_model(patch_size_t=2)
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    x, text, pooled = torch.randn(1, 16, 4, 4, 2, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 16)
    mask, t, guid = torch.tensor([[1, 1, 1, 0, 0]]), torch.tensor([500.0]), torch.tensor([1000.0])
    a = ours(x, t, text, mask, pooled, guid)
    b = ref(x, t, text, mask, pooled, guid, return_dict=False)[0]
    assert rel_err(a, b) <= 1e-6  # measured 3.1e-7 / 2.5e-7 (module docstring)


def test_diffusers_keys_are_exactly_the_converted_keys(pair):
    ours, ref = pair
    assert set(official_to_diffusers(ours.state_dict())) == set(ref.state_dict())
    back = diffusers_to_official(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
