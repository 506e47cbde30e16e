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


def _rope_image_part(q: torch.Tensor, k: torch.Tensor, img_len: int, freqs_cis) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``img_len`` tokens of q, k (B, L, nh, hd); text tokens carry no position."""
    if freqs_cis is None:
        return q, k
    q_img, k_img = apply_rotary_emb(q[:, :img_len], k[:, :img_len], freqs_cis)
    return torch.cat([q_img, q[:, img_len:]], dim=1), torch.cat([k_img, k[:, img_len:]], dim=1)


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

    def _qkv(self, x, norm1, mod, qkv, q_norm, k_norm):
        """norm1 -> modulate -> qkv -> per-head RMSNorm on q and k. Returns q, k, v (B, L, nh, hd)."""
        x_mod = modulate(norm1(x), shift=mod.shift, scale=mod.scale)
        q, k, v = rearrange(qkv(x_mod), "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
        return q_norm(q).to(v), k_norm(k).to(v), v

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, freqs_cis=None,
                txt_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img_msa, img_mlp = chunk_modulation(self.img_mod(vec), 2)  # (shift, scale, gate) x 2, each (B, D)
        txt_msa, txt_mlp = chunk_modulation(self.txt_mod(vec), 2)

        img_q, img_k, img_v = self._qkv(img, self.img_norm1, img_msa, self.img_attn_qkv,
                                        self.img_attn_q_norm, self.img_attn_k_norm)  # (B, L_img, nh, hd)
        if freqs_cis is not None:
            img_q, img_k = apply_rotary_emb(img_q, img_k, freqs_cis)
        txt_q, txt_k, txt_v = self._qkv(txt, self.txt_norm1, txt_msa, self.txt_attn_qkv,
                                        self.txt_attn_q_norm, self.txt_attn_k_norm)  # (B, L_txt, nh, hd)

        L_img = img.shape[1]
        attn = self.attn_fn(
            torch.cat([img_q, txt_q], dim=1), torch.cat([img_k, txt_k], dim=1), torch.cat([img_v, txt_v], dim=1),
            img_len=L_img, txt_lens=txt_lens,
        )  # (B, L, nh, hd)
        attn = rearrange(attn, "B L nh hd -> B L (nh hd)")
        img_attn, txt_attn = attn[:, :L_img], attn[:, L_img:]

        img = img + apply_gate(self.img_attn_proj(img_attn), img_msa.gate)
        img = img + apply_gate(self.img_mlp(modulate(self.img_norm2(img), img_mlp.shift, img_mlp.scale)), img_mlp.gate)
        txt = txt + apply_gate(self.txt_attn_proj(txt_attn), txt_msa.gate)
        txt = txt + apply_gate(self.txt_mlp(modulate(self.txt_norm2(txt), txt_mlp.shift, txt_mlp.scale)), txt_mlp.gate)
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
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = ModulateDiT(hidden_size, factor=3)

        self.attn_fn = _attention.attention

    def forward(self, x: torch.Tensor, vec: torch.Tensor, img_len: int, freqs_cis=None,
                txt_lens: torch.Tensor | None = None) -> torch.Tensor:
        (mod,) = chunk_modulation(self.modulation(vec), 1)
        x_mod = modulate(self.pre_norm(x), shift=mod.shift, scale=mod.scale)  # (B, L, D)
        qkv, mlp_in = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
        q, k = self.q_norm(q).to(v), self.k_norm(k).to(v)
        q, k = _rope_image_part(q, k, img_len, freqs_cis)

        attn = self.attn_fn(q, k, v, img_len=img_len, txt_lens=txt_lens)  # (B, L, nh, hd)
        attn = rearrange(attn, "B L nh hd -> B L (nh hd)")
        out = self.linear2(torch.cat([attn, self.mlp_act(mlp_in)], dim=-1))
        return x + apply_gate(out, mod.gate)


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
