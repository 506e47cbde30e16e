"""The token refiner (``txt_in``): a small bidirectional transformer over the LLM's text states.

Why it exists: the text encoder is a *decoder-only* LLM, so its hidden states were produced with causal
attention (token i saw only tokens <= i). The refiner lets every text token see the whole prompt before
the DiT uses it, and conditions it on the timestep and on the prompt's mean.

    t_emb   = t_embedder(t)                                   # (B, D)
    context = c_embedder(masked mean of the raw LLM states)   # (B, D)
    c       = t_emb + context
    x       = input_embedder(text_states)                     # (B, L_txt, D)
    2 x:  x += gate_msa * proj(attn(qkv(norm1(x))))           # gates from adaLN_modulation(c)
          x += gate_mlp * mlp(norm2(x))

What differs from the DiT blocks: affine LayerNorms without shift/scale modulation (only gates), SiLU MLP,
no QK-norm, no RoPE, and the attention mask rule ``valid_i AND valid_j`` with key 0 always visible.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from . import attention as _attention
from .modulation import MLP, TimestepEmbedder, apply_gate


class TextProjection(nn.Module):
    """``c_embedder``: Linear -> SiLU -> Linear from the pooled LLM state to the hidden size."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size, bias=True)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class IndividualTokenRefinerBlock(nn.Module):
    """One refiner block: gated self-attention and gated SiLU MLP, gates (gate_msa, gate_mlp) from c."""

    def __init__(self, hidden_size: int, heads_num: int, mlp_width_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.heads_num = heads_num
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_width_ratio), act=nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)
        # (q, k, v (B, L, nh, hd), mask (B, L) | None) -> (B, L, nh, hd); hooks may swap in the explicit path.
        self.attn_fn = _attention.refiner_attention

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)  # each (B, D)
        q, k, v = rearrange(self.self_attn_qkv(self.norm1(x)), "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
        attn = rearrange(self.attn_fn(q, k, v, mask), "B L nh hd -> B L (nh hd)")
        x = x + apply_gate(self.self_attn_proj(attn), gate_msa)
        x = x + apply_gate(self.mlp(self.norm2(x)), gate_mlp)
        return x


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size: int, heads_num: int, depth: int, mlp_width_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            [IndividualTokenRefinerBlock(hidden_size, heads_num, mlp_width_ratio, qkv_bias) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c, mask)
        return x


class SingleTokenRefiner(nn.Module):
    """``txt_in``: LLM text states (B, L_txt, in_channels) -> refined text tokens (B, L_txt, hidden_size)."""

    def __init__(self, in_channels: int, hidden_size: int, heads_num: int, depth: int = 2,
                 mlp_width_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        if hidden_size % heads_num:
            raise ValueError(f"hidden_size must be divisible by heads_num = {heads_num}, got {hidden_size}")
        self.in_channels = in_channels
        self.input_embedder = nn.Linear(in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = TextProjection(in_channels, hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(hidden_size, heads_num, depth, mlp_width_ratio,
                                                               qkv_bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"text states must be (B, L_txt, {self.in_channels}), got {tuple(x.shape)}")
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"text mask must be (B, L_txt) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            m = mask.to(torch.float32).unsqueeze(-1)  # (B, L_txt, 1)
            count = m.sum(dim=1)
            if (count == 0).any():
                raise ValueError("every text mask row needs at least one valid token (the context is their mean)")
            pooled = ((x.float() * m).sum(dim=1) / count).to(x.dtype)  # (B, in_channels)
        c = self.t_embedder(t) + self.c_embedder(pooled)  # (B, D)
        return self.individual_token_refiner(self.input_embedder(x), c, mask)
