"""3D RoPE: parity with an independent complex-number formulation, and the relative-position property."""
import math

import pytest
import torch

from hvlab.rope import apply_rotary_emb, get_nd_rotary_pos_embed

ROPE = (8, 12, 12)
GRID = (3, 4, 5)


def complex_rope_reference(x, rope_dim_list, grid, theta):
    """Independent RoPE: pairs (x[2j], x[2j+1]) as complex numbers times exp(i * pos_axis * freq_j)."""
    T, H, W = grid
    coords = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"), -1)
    coords = coords.reshape(-1, 3).double()  # (L, 3), t-major
    angles = []
    for axis, d in enumerate(rope_dim_list):
        freqs = torch.tensor([theta ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
        angles.append(coords[:, axis, None] * freqs[None])
    angles = torch.cat(angles, dim=1)  # (L, hd / 2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # (B, L, nh, hd / 2)
    rotated = xc * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2)


def test_tables_shape_and_dtype():
    cos, sin = get_nd_rotary_pos_embed(ROPE, GRID, theta=256.0)
    assert cos.shape == sin.shape == (math.prod(GRID), sum(ROPE))
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))


def test_matches_complex_reference():
    torch.manual_seed(0)
    L = math.prod(GRID)
    q, k = torch.randn(2, 2, L, 3, sum(ROPE)).unbind(0)
    freqs = get_nd_rotary_pos_embed(ROPE, GRID, theta=256.0)
    q_rot, k_rot = apply_rotary_emb(q, k, freqs)
    # float32 tables vs float64 reference: angles up to ~5 rad, so ~1e-6 absolute error is float32 rounding
    torch.testing.assert_close(q_rot.double(), complex_rope_reference(q, ROPE, GRID, 256.0), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(k_rot.double(), complex_rope_reference(k, ROPE, GRID, 256.0), atol=2e-6, rtol=1e-5)


def test_scores_depend_only_on_relative_offset_per_axis():
    torch.manual_seed(1)
    T, H, W = 4, 5, 6
    hd = sum(ROPE)
    freqs = get_nd_rotary_pos_embed(ROPE, (T, H, W))
    L = T * H * W
    q0, k0 = torch.randn(hd), torch.randn(hd)  # the same content vector at every position
    q, k = apply_rotary_emb(q0.expand(1, L, 1, hd), k0.expand(1, L, 1, hd), freqs)
    scores = (q[0, :, 0] @ k[0, :, 0].T).reshape(T, H, W, T, H, W)
    # shifting both query and key by one step along any axis leaves the score unchanged
    torch.testing.assert_close(scores[1:, :, :, 1:], scores[:-1, :, :, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[:, 1:, :, :, 1:], scores[:, :-1, :, :, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[:, :, 1:, :, :, 1:], scores[:, :, :-1, :, :, :-1], atol=1e-5, rtol=1e-5)
    # ...but does depend on the offset itself (the property is not vacuous)
    assert (scores[0, 0, 0, 0, 0, 0] - scores[0, 0, 0, 1, 0, 0]).abs() > 1e-3


def test_rotation_preserves_norm_and_casts_back():
    torch.manual_seed(2)
    L = math.prod(GRID)
    q = torch.randn(1, L, 2, sum(ROPE), dtype=torch.bfloat16)
    q_rot, k_rot = apply_rotary_emb(q, q, get_nd_rotary_pos_embed(ROPE, GRID))
    assert q_rot.dtype == torch.bfloat16
    torch.testing.assert_close(q_rot.float().norm(dim=-1), q.float().norm(dim=-1), rtol=2e-2, atol=2e-2)
    ref = complex_rope_reference(q.float(), ROPE, GRID, 256.0).float()
    torch.testing.assert_close(q_rot.float(), ref, rtol=2e-2, atol=2e-2)  # bf16 has 8 mantissa bits


def test_errors_teach():
    with pytest.raises(ValueError, match="head dim 32.*sum 30"):
        get_nd_rotary_pos_embed((8, 10, 12), GRID, head_dim=32)
    with pytest.raises(ValueError, match="even"):
        get_nd_rotary_pos_embed((7, 13, 12), GRID)
    with pytest.raises(ValueError, match="one RoPE slice per grid axis"):
        get_nd_rotary_pos_embed((16, 16), GRID)
    q = torch.randn(1, 10, 2, 32)
    with pytest.raises(ValueError, match=r"\(10, 32\)"):
        apply_rotary_emb(q, q, get_nd_rotary_pos_embed(ROPE, GRID))
