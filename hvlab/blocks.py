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

This file is the reference: plain torch, one line per step of the paper's block. The fast wing
(``hvlab.fast.accelerate``) swaps these classes for subclasses with the same parameters that write q, k, v
into preallocated buffers, run the MLPs in token chunks and use fused kernels; ``tests/test_fast.py``
keeps the two equal.

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
from .modulation import MLP, ModulateDiT, RMSNorm, apply_gate, chunk_modulation, modulate
from .rope import apply_rotary_emb


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    # no affine parameters: shift and scale come from the modulation instead
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


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

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, freqs_cis=None,
                txt_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # 1. modulation: (shift, scale, gate) for attention and for the MLP, per stream, each (B, D)
        img_mod1, img_mod2 = chunk_modulation(self.img_mod(vec), 2)
        txt_mod1, txt_mod2 = chunk_modulation(self.txt_mod(vec), 2)

        # 2. image q, k, v: LayerNorm -> modulate -> qkv; QK-norm; RoPE (B, L_img, nh, hd)
        img_x = modulate(self.img_norm1(img), shift=img_mod1.shift, scale=img_mod1.scale)
        img_q, img_k, img_v = rearrange(self.img_attn_qkv(img_x), "B L (K nh hd) -> K B L nh hd", K=3,
                                        nh=self.heads_num)
        img_q, img_k = self.img_attn_q_norm(img_q).to(img_v), self.img_attn_k_norm(img_k).to(img_v)
        if freqs_cis is not None:
            img_q, img_k = apply_rotary_emb(img_q, img_k, freqs_cis)

        # 3. text q, k, v: the same with the text weights, and no RoPE (B, L_txt, nh, hd)
        txt_x = modulate(self.txt_norm1(txt), shift=txt_mod1.shift, scale=txt_mod1.scale)
        txt_q, txt_k, txt_v = rearrange(self.txt_attn_qkv(txt_x), "B L (K nh hd) -> K B L nh hd", K=3,
                                        nh=self.heads_num)
        txt_q, txt_k = self.txt_attn_q_norm(txt_q).to(txt_v), self.txt_attn_k_norm(txt_k).to(txt_v)

        # 4. joint attention over [image | text]
        L_img = img.shape[1]
        q, k, v = torch.cat([img_q, txt_q], dim=1), torch.cat([img_k, txt_k], dim=1), torch.cat([img_v, txt_v], dim=1)
        attn = rearrange(self.attn_fn(q, k, v, img_len=L_img, txt_lens=txt_lens), "B L nh hd -> B L (nh hd)")
        img_attn, txt_attn = attn[:, :L_img], attn[:, L_img:]

        # 5. gated residuals: projection, then the MLP, per stream
        img = img + apply_gate(self.img_attn_proj(img_attn), gate=img_mod1.gate)
        img = img + apply_gate(self.img_mlp(modulate(self.img_norm2(img), shift=img_mod2.shift,
                                                     scale=img_mod2.scale)), gate=img_mod2.gate)
        txt = txt + apply_gate(self.txt_attn_proj(txt_attn), gate=txt_mod1.gate)
        txt = txt + apply_gate(self.txt_mlp(modulate(self.txt_norm2(txt), shift=txt_mod2.shift,
                                                     scale=txt_mod2.scale)), gate=txt_mod2.gate)
        return img, txt


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
        self.mlp_act = nn.GELU(approximate="tanh")

        self.attn_fn = _attention.attention

    def forward(self, x: torch.Tensor, vec: torch.Tensor, img_len: int, freqs_cis=None,
                txt_lens: torch.Tensor | None = None) -> torch.Tensor:
        # 1. one (shift, scale, gate) triple, each (B, D)
        (mod,) = chunk_modulation(self.modulation(vec), 1)

        # 2. LayerNorm -> modulate -> linear1, split into q, k, v (B, L, nh, hd) and the MLP input (B, L, mlp_hidden)
        x_mod = modulate(self.pre_norm(x), shift=mod.shift, scale=mod.scale)
        qkv, mlp_in = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)

        # 3. QK-norm, then RoPE on the image tokens only (text tokens carry no position)
        q, k = self.q_norm(q).to(v), self.k_norm(k).to(v)
        if freqs_cis is not None:
            img_q, img_k = apply_rotary_emb(q[:, :img_len], k[:, :img_len], freqs_cis)
            q, k = torch.cat([img_q, q[:, img_len:]], dim=1), torch.cat([img_k, k[:, img_len:]], dim=1)

        # 4. joint attention, in parallel with the MLP's first half
        attn = rearrange(self.attn_fn(q, k, v, img_len=img_len, txt_lens=txt_lens), "B L nh hd -> B L (nh hd)")

        # 5. linear2 over [attention | GELU(mlp_in)], then one gated residual
        out = self.linear2(torch.cat([attn, self.mlp_act(mlp_in)], dim=-1))
        return x + apply_gate(out, gate=mod.gate)


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
