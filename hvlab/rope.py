"""3D rotary position embedding (RoPE) for the video tokens.

What differs from the 1D RoPE of a language model:

- Each video token has three integer coordinates (t, h, w) on the **post-patch** latent grid, and the
  head dimension is cut into three slices, one per axis: for the release model
  ``rope_dim_list = (16, 56, 56)`` (sum = head_dim 128), laid out ``[t 16 | h 56 | w 56]``.
- ``theta`` is 256, not 10000: the slowest temporal frequency then repeats after ~50 latent frames.
- The rotation pairs *adjacent* channels ``(x[2j], x[2j+1])`` (the "interleaved" convention), not the
  first half against the second half (the GPT-NeoX convention). Weights trained with one convention
  do not work with the other.
- Only image tokens are rotated; text tokens carry no position.

Because a rotation by angle ``m * f`` followed by one by ``-n * f`` is a rotation by ``(m - n) * f``,
the score ``q_m . k_n`` depends on positions only through ``m - n``, per axis (tested).
"""
from __future__ import annotations

from typing import Sequence

import torch


def get_1d_rotary_pos_embed(dim: int, pos: torch.Tensor, theta: float = 256.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for one axis: ``(len(pos), dim)`` each, every frequency repeated twice (one per pair member)."""
    if dim % 2:
        raise ValueError(f"each RoPE axis needs an even number of channels (they rotate in pairs), got {dim}")
    j = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device)  # 2j for j < dim / 2
    freqs = 1.0 / (theta ** (j / dim))  # (dim / 2,)
    angles = torch.outer(pos.to(torch.float32), freqs)  # (L, dim / 2)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def get_nd_rotary_pos_embed(
    rope_dim_list: Sequence[int],
    grid_size: Sequence[int],
    theta: float = 256.0,
    device: torch.device | str | None = None,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for a ``(T, H, W)`` grid of post-patch latent positions.

    Returns ``(cos, sin)``, each ``(T*H*W, sum(rope_dim_list))`` float32, with tokens in t-major order
    (the order of ``patchify``): token ``(t, h, w)`` is row ``(t * H + h) * W + w``.
    Pass ``head_dim`` to check that the three slices fill the attention head exactly.
    """
    rope_dim_list, grid_size = list(rope_dim_list), list(grid_size)
    if len(rope_dim_list) != len(grid_size):
        raise ValueError(
            f"rope_dim_list has {len(rope_dim_list)} axes {rope_dim_list} but grid_size has {len(grid_size)} "
            f"{grid_size}; give one RoPE slice per grid axis (t, h, w)"
        )
    if head_dim is not None and sum(rope_dim_list) != head_dim:
        raise ValueError(
            f"sum(rope_dim_list) must equal the head dim {head_dim} (RoPE rotates every channel of q and k), "
            f"got {rope_dim_list} with sum {sum(rope_dim_list)}"
        )
    odd = [d for d in rope_dim_list if d % 2]
    if odd:
        raise ValueError(f"every entry of rope_dim_list must be even (channels rotate in pairs), got {rope_dim_list}")
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid_size]
    grid = torch.meshgrid(*axes, indexing="ij")  # each (T, H, W)
    cos_sin = [get_1d_rotary_pos_embed(d, g.reshape(-1), theta) for d, g in zip(rope_dim_list, grid)]
    cos = torch.cat([c for c, _ in cos_sin], dim=1)  # (L, sum(rope_dim_list))
    sin = torch.cat([s for _, s in cos_sin], dim=1)
    return cos, sin


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) for each adjacent pair: multiplication by i, if (a, b) is the complex number a + ib."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (B, L, nh, hd) by the position angles ``freqs_cis = (cos, sin)``, each (L, hd).

    The maths runs in float32 and the result is cast back to the input dtype (as the official code does).
    """
    cos, sin = freqs_cis
    L, hd = q.shape[1], q.shape[-1]
    if cos.shape != (L, hd) or sin.shape != (L, hd):
        raise ValueError(
            f"RoPE tables must be (L, head_dim) = ({L}, {hd}) to match q of shape {tuple(q.shape)} (B, L, nh, hd); "
            f"got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}. Were they computed for another latent size?"
        )
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one tensor x (B, L, nh, hd) with tables (L, hd): float32 maths, cast back to x's dtype."""
    cos = cos.to(x.device, torch.float32)[None, :, None, :]  # (1, L, 1, hd)
    sin = sin.to(x.device, torch.float32)[None, :, None, :]
    xf = x.float()
    return (xf * cos + _rotate_pairs(xf) * sin).to(x.dtype)
