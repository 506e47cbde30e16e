"""adaLN modulation and the small layers around it (timestep/vector embedders, RMSNorm, MLP).

What differs from a vanilla transformer: there is no per-token conditioning input. One vector per sample,
``vec = time_in(t) + vector_in(clip_pooled) + guidance_in(guidance)``, is turned by ``ModulateDiT`` into
per-channel (shift, scale, gate) triples that steer every block:

    x_mod = LayerNorm(x) * (1 + scale) + shift        # modulate
    x     = x + gate * f(x_mod)                        # apply_gate

``ModulateDiT`` is zero-initialised ("adaLN-Zero", as in DiT): at initialisation every gate is 0, so each
block starts as the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModulationOut:
    """One (shift, scale, gate) triple, each (B, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def chunk_modulation(params: torch.Tensor, n: int) -> list[ModulationOut]:
    """Split ``ModulateDiT`` output (B, 3n * D) into n triples, in the official order (shift, scale, gate)."""
    chunks = params.chunk(3 * n, dim=-1)
    return [ModulationOut(*chunks[3 * i: 3 * i + 3]) for i in range(n)]


def modulate(x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, L, D) * (1 + scale) + shift, with shift/scale (B, D) broadcast over the tokens."""
    if scale is not None:
        x = x * (1 + scale.unsqueeze(1))
    if shift is not None:
        x = x + shift.unsqueeze(1)
    return x


def apply_gate(x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, L, D) * gate (B, D), broadcast over the tokens."""
    return x if gate is None else x * gate.unsqueeze(1)


class ModulateDiT(nn.Module):
    """vec (B, D) -> Linear(SiLU(vec)) (B, factor * D): the modulation parameters of one block, zero-initialised."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, factor * hidden_size, bias=True)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(vec))  # (B, factor * D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a float timestep t (B,) in [0, 1000]: (B, dim), **cos first, then sin**.

    Frequencies exp(-ln(max_period) * i / half) for i < half = dim // 2 (the DiT/GLIDE recipe).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoidal features (B, 256) -> Linear -> SiLU -> Linear -> (B, hidden). Also used for guidance."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)  # (B, hidden)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; ``vector_in`` maps CLIP's pooled 768-d text vector into the conditioning vector."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim; normalised in float32 and cast back before the weight.

    Used on q and k per head (dim = head_dim) so attention logits stay bounded ("QK-norm").
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class MLP(nn.Module):
    """fc1 -> act -> fc2 (keys ``fc1``, ``fc2``). GELU(tanh) in the DiT blocks, SiLU in the token refiner."""

    def __init__(self, in_features: int, hidden_features: int, act: nn.Module | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = act if act is not None else nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
