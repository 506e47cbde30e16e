"""The DiT blocks: dual-stream ``MMDoubleStreamBlock``, single-stream ``MMSingleStreamBlock``, ``FinalLayer``.

What differs from a vanilla DiT block:

- **Joint attention over [image, text].** Text tokens are not cross-attended; they join the sequence, so
  every image token sees every real text token and vice versa, in one softmax.
- **Dual stream first** (20 blocks): image and text keep separate weights (modulation, qkv, norms,
  projection, MLP) and meet only inside attention. **Single stream after** (40 blocks): one set of weights
  for the concatenated sequence, and attention and MLP run in parallel from one fused ``linear1`` and
  are merged by one fused ``linear2`` (as in Flux / ViT-22B).
- QK-norm (RMSNorm per head) before RoPE; RoPE on image tokens only.
- adaLN-Zero modulation from the per-sample vector ``vec`` (see ``modulation.py``).

**Token chunking** (inference only). At 720p (118,800 image tokens) the MLP's hidden activation is
2.9 GB in bf16 and the single block's fused ``linear1`` output 5.1 GB: more than any other tensor.
Every step outside attention is per token, so ``set_token_chunking(model, n)`` makes the blocks run
those parts ``n`` tokens at a time under ``torch.no_grad``, writing into preallocated outputs: the same
numbers (each token sees the same weights), a lower peak. Under autograd the blocks run unchunked.

Every block calls attention through the plain attribute ``self.attn_fn`` (default
``hvlab.attention.attention``), looked up at call time, so hooks can capture probabilities and a
sequence-parallel wrapper can swap in a distributed kernel without touching the block.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from . import attention as _attention
from .modulation import MLP, ModulateDiT, RMSNorm, chunk_modulation, gated_residual, modulate
from .fused import gelu_linear, norm_rope


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    # no affine parameters: shift and scale come from the modulation instead
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


def _chunks(L: int, chunk_tokens: int | None) -> list[slice] | None:
    """Token slices of at most ``chunk_tokens``, or None when chunking is off (or cannot help, or autograd is on)."""
    if chunk_tokens is None or chunk_tokens >= L or torch.is_grad_enabled():
        return None
    return [slice(s, min(s + chunk_tokens, L)) for s in range(0, L, chunk_tokens)]


def set_token_chunking(model: nn.Module, chunk_tokens: int | None) -> int:
    """Run the blocks' per-token parts (MLPs, fused linears) ``chunk_tokens`` tokens at a time; None turns it off.

    Results equal the unchunked ones (up to float summation order inside a GEMM); only inference
    (``torch.no_grad``) is chunked. Returns the number of blocks set.
    """
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int (e.g. 16384) or None, got {chunk_tokens!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, (MMDoubleStreamBlock, MMSingleStreamBlock)):
            m.chunk_tokens = chunk_tokens
            n += 1
    return n


def _rows(freqs_cis, rows: slice):
    """The RoPE tables' rows for a token slice (None stays None)."""
    return None if freqs_cis is None else (freqs_cis[0][rows], freqs_cis[1][rows])


class MMDoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined only in attention."""

    def __init__(self, hidden_size: int, heads_num: int, mlp_width_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        if hidden_size % heads_num:
            raise ValueError(f"hidden_size must be divisible by heads_num = {heads_num}, got {hidden_size}")
        self.heads_num = heads_num
        head_dim = hidden_size // heads_num
        mlp_hidden = int(hidden_size * mlp_width_ratio)

        self.img_mod = ModulateDiT(hidden_size, factor=6)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.img_attn_q_norm = RMSNorm(head_dim, eps=1e-6)
        self.img_attn_k_norm = RMSNorm(head_dim, eps=1e-6)
        self.img_attn_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = MLP(hidden_size, mlp_hidden)

        self.txt_mod = ModulateDiT(hidden_size, factor=6)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.txt_attn_q_norm = RMSNorm(head_dim, eps=1e-6)
        self.txt_attn_k_norm = RMSNorm(head_dim, eps=1e-6)
        self.txt_attn_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = MLP(hidden_size, mlp_hidden)

        self.attn_fn = _attention.attention
        self.chunk_tokens: int | None = None  # see set_token_chunking

    def _qkv(self, x, norm1, mod, qkv, q_norm, k_norm, freqs_cis=None, out=(None, None)):
        """norm1 -> modulate -> qkv -> per-head RMSNorm on q and k, then RoPE when ``freqs_cis`` is given
        (``fused.norm_rope``: one pass on the GPU; into ``out`` = (q buffer, k buffer) if given).
        Returns q, k, v (B, L, nh, hd)."""
        x_mod = modulate(norm1(x), shift=mod.shift, scale=mod.scale)
        q, k, v = rearrange(qkv(x_mod), "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
        return (norm_rope(q, q_norm, freqs_cis, dtype=v.dtype, out=out[0]),
                norm_rope(k, k_norm, freqs_cis, dtype=v.dtype, out=out[1]), v)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, freqs_cis=None,
                txt_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img_msa, img_mlp = chunk_modulation(self.img_mod(vec), 2)  # (shift, scale, gate) x 2, each (B, D)
        txt_msa, txt_mlp = chunk_modulation(self.txt_mod(vec), 2)

        L_img = img.shape[1]
        if torch.is_grad_enabled():  # autograd: plain tensors and a cat
            img_q, img_k, img_v = self._qkv(img, self.img_norm1, img_msa, self.img_attn_qkv, self.img_attn_q_norm,
                                            self.img_attn_k_norm, freqs_cis)  # (B, L_img, nh, hd)
            txt_q, txt_k, txt_v = self._qkv(txt, self.txt_norm1, txt_msa, self.txt_attn_qkv,
                                            self.txt_attn_q_norm, self.txt_attn_k_norm)  # (B, L_txt, nh, hd)
            q, k, v = torch.cat([img_q, txt_q], dim=1), torch.cat([img_k, txt_k], dim=1), torch.cat([img_v, txt_v], dim=1)
            del img_q, img_k, img_v, txt_q, txt_k, txt_v
        else:  # q, k, v of both streams written (chunk by chunk if set) into the joint buffers: no cat
            B, L_txt, D = txt.shape
            q, k, v = (img.new_empty(B, L_img + L_txt, self.heads_num, D // self.heads_num) for _ in range(3))
            self._qkv_into(img, self.img_norm1, img_msa, self.img_attn_qkv, self.img_attn_q_norm,
                           self.img_attn_k_norm, freqs_cis, (q, k, v), 0)
            self._qkv_into(txt, self.txt_norm1, txt_msa, self.txt_attn_qkv, self.txt_attn_q_norm,
                           self.txt_attn_k_norm, None, (q, k, v), L_img)
        attn = self.attn_fn(q, k, v, img_len=L_img, txt_lens=txt_lens)  # (B, L, nh, hd)
        del q, k, v
        attn = rearrange(attn, "B L nh hd -> B L (nh hd)")
        img_attn, txt_attn = attn[:, :L_img], attn[:, L_img:]

        img = gated_residual(img, self.img_attn_proj(img_attn), img_msa.gate)
        img = self._mlp_residual(img, self.img_norm2, self.img_mlp, img_mlp)
        txt = gated_residual(txt, self.txt_attn_proj(txt_attn), txt_msa.gate)
        txt = self._mlp_residual(txt, self.txt_norm2, self.txt_mlp, txt_mlp)
        return img, txt

    def _qkv_into(self, x, norm1, mod, qkv, q_norm, k_norm, freqs_cis, bufs, offset: int) -> None:
        """``_qkv`` (+ RoPE when ``freqs_cis``) over token chunks of x (or all of it when chunking is off),
        written into bufs at ``offset + token``: q and k directly by ``norm_rope``, v by a copy."""
        for s in _chunks(x.shape[1], self.chunk_tokens) or [slice(0, x.shape[1])]:
            dst = slice(offset + s.start, offset + s.stop)
            _, _, bufs[2][:, dst] = self._qkv(x[:, s], norm1, mod, qkv, q_norm, k_norm, _rows(freqs_cis, s),
                                              out=(bufs[0][:, dst], bufs[1][:, dst]))

    def _mlp_residual(self, x: torch.Tensor, norm2, mlp, mod) -> torch.Tensor:
        """x + gate * MLP(modulate(norm2(x))), over token chunks when ``chunk_tokens`` is set (no_grad)."""
        def f(xc):
            return gated_residual(xc, mlp(modulate(norm2(xc), mod.shift, mod.scale)), mod.gate)

        chunks = _chunks(x.shape[1], self.chunk_tokens)
        if chunks is None:
            return f(x)
        out = torch.empty_like(x)  # (B, L, D)
        for s in chunks:
            out[:, s] = f(x[:, s])
        return out


class MMSingleStreamBlock(nn.Module):
    """One set of weights for the joint sequence; attention and MLP in parallel from fused linears.

    ``linear1``: D -> [q | k | v | mlp_in] = 3D + mlp_hidden.
    ``linear2``: [attention output | GELU(mlp_in)] = D + mlp_hidden -> D.
    """

    def __init__(self, hidden_size: int, heads_num: int, mlp_width_ratio: float = 4.0):
        super().__init__()
        if hidden_size % heads_num:
            raise ValueError(f"hidden_size must be divisible by heads_num = {heads_num}, got {hidden_size}")
        self.hidden_size = hidden_size
        self.heads_num = heads_num
        head_dim = hidden_size // heads_num
        self.mlp_hidden_dim = int(hidden_size * mlp_width_ratio)

        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)
        self.pre_norm = _layer_norm(hidden_size)
        self.modulation = ModulateDiT(hidden_size, factor=3)

        self.attn_fn = _attention.attention
        self.chunk_tokens: int | None = None  # see set_token_chunking

    def forward(self, x: torch.Tensor, vec: torch.Tensor, img_len: int, freqs_cis=None,
                txt_lens: torch.Tensor | None = None) -> torch.Tensor:
        (mod,) = chunk_modulation(self.modulation(vec), 1)
        chunks = _chunks(x.shape[1], self.chunk_tokens)
        if chunks is None:
            x_mod = modulate(self.pre_norm(x), shift=mod.shift, scale=mod.scale)  # (B, L, D)
            qkv, mlp_in = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
            q, k, v = rearrange(qkv, "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
            # QK-norm, then RoPE on the image tokens only (text tokens carry no position)
            q = norm_rope(q, self.q_norm, freqs_cis, n_rope=img_len, dtype=v.dtype)
            k = norm_rope(k, self.k_norm, freqs_cis, n_rope=img_len, dtype=v.dtype)
        else:  # linear1, QK-norm and RoPE per chunk into q, k, v and mlp_in buffers
            B, L, D = x.shape
            q, k, v = (x.new_empty(B, L, self.heads_num, D // self.heads_num) for _ in range(3))
            mlp_in = x.new_empty(B, L, self.mlp_hidden_dim)
            for s in chunks:
                x_mod = modulate(self.pre_norm(x[:, s]), shift=mod.shift, scale=mod.scale)
                qkv_c, mlp_in[:, s] = torch.split(self.linear1(x_mod), [3 * D, self.mlp_hidden_dim], dim=-1)
                del x_mod
                q_c, k_c, v[:, s] = rearrange(qkv_c, "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
                n_img = max(0, min(s.stop, img_len) - s.start)  # image tokens of this chunk carry RoPE
                tables = _rows(freqs_cis, slice(s.start, s.start + n_img)) if n_img else None
                norm_rope(q_c, self.q_norm, tables, n_rope=n_img, dtype=v.dtype, out=q[:, s])
                norm_rope(k_c, self.k_norm, tables, n_rope=n_img, dtype=v.dtype, out=k[:, s])
                del qkv_c, q_c, k_c

        attn = self.attn_fn(q, k, v, img_len=img_len, txt_lens=txt_lens)  # (B, L, nh, hd)
        attn = rearrange(attn, "B L nh hd -> B L (nh hd)")
        # linear2([attn | GELU(mlp_in)]): GELU, the concatenation and (FP8) the quantiser in one pass
        if chunks is None:
            return gated_residual(x, gelu_linear(self.linear2, mlp_in, prefix=attn), mod.gate)
        del q, k, v  # free the attention inputs before the second half
        res = torch.empty_like(x)  # (B, L, D)
        for s in chunks:
            res[:, s] = gated_residual(x[:, s], gelu_linear(self.linear2, mlp_in[:, s], prefix=attn[:, s]), mod.gate)
        return res


class FinalLayer(nn.Module):
    """LayerNorm -> modulate(shift, scale) -> Linear to one patch of output channels per token.

    Note the chunk order (shift, scale); diffusers' ``norm_out`` reads (scale, shift), so converters swap it.
    """

    def __init__(self, hidden_size: int, patch_size: Sequence[int] | int, out_channels: int):
        super().__init__()
        patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, math.prod(patch) * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        for p in (self.linear.weight, self.linear.bias, self.adaLN_modulation[1].weight, self.adaLN_modulation[1].bias):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)  # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift=shift, scale=scale))  # (B, L_img, pt*ph*pw*C)
