"""FP8 attention, opt-in: low-precision QK^T and PV, designed for accuracy first.

At 720p attention is ~86% of a DiT step, and FP8 tensor cores run it ~1.4x faster than bf16 (FA3's
FP8 mode: 930 vs 677 TFLOP/s on an H200). Plain FP8 attention costs accuracy, though: e4m3 keeps 3
mantissa bits, and a score error of a few tenths in a peaky softmax moves most of a row's weight
(issue 17: 5.5% output error on Gaussian q, k, v, 18% when the keys share an offset). Each of these
steps removes part of that error, and every one is measured (``benchmarks/fp8_attention_error.py``):

1. **K smoothing** (exact in real arithmetic). Subtracting one vector ``m_k`` from every key changes the
   scores of query i by the constant ``-q_i . m_k``, which softmax cancels. With ``m_k`` = the mean of the
   sample's real keys (per head), the shared offset leaves the keys and their scales fit what varies.
2. **V smoothing** (exact in real arithmetic). A row of softmax weights sums to 1 in every segment, so
   ``P (V - m_v) + m_v = P V``: quantise ``V - m_v`` (per channel) and add ``m_v`` back to the output.
3. **Finer scales.** One scale per ``block`` tokens and head (or per token) for Q and K instead of one
   per head: ``s_q[i] s_k[j]`` factors out of the head-dim sum, so a kernel applies them to the score
   tile. V gets one scale per channel (it factors out of the token sum) or per block and channel.
4. **INT8 QK^T** (SageAttention): Q and K as int8 with those scales; 7 bits of uniform precision beat
   e4m3's 3 mantissa bits for values that are not heavy-tailed once the keys are smoothed.

P = exp(s - rowmax) <= 1 is always stored as e4m3 with the static scale 1/448 for the PV product, the
row sums come from the unrounded P, and the accumulation is fp32.

**The emulation** (``fp8_attention`` on any device): the quantisers are torch's own casts
(``float8_e4m3fn``, int8 rounding), the maths fp32, the segments those of ``hvlab.attention``. It
normalises P with the row's final maximum, where a flash kernel uses the running maximum of the key
blocks seen so far; that flushes at least as many tiny weights to zero, so the emulation's error is an
upper bound of the kernel's on that account.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import _check, _segments_sdpa, attention_scores, valid_lengths

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
INT8_MAX = 127.0
QK_FORMATS = ("fp8", "int8")
QK_SCALES = ("head", "block", "token")
V_SCALES = ("head", "channel", "block")
PV_FORMATS = ("fp8", "bf16")


@dataclass(frozen=True)
class FP8AttentionRecipe:
    """How FP8 attention quantises. Validated on construction; ``str()`` is its short name in tables."""

    qk: str = "int8"  # Q and K for QK^T: "fp8" (e4m3) or "int8" (SageAttention)
    qk_scales: str = "block"  # "head": one per (segment, head), what FA3's descale takes; "block"; "token"
    block: int = 64  # tokens per scale block, counted from each segment's start (a kernel's tile)
    v_scales: str = "channel"  # "head"; "channel": per (segment, head, channel); "block": per block and channel
    smooth_k: bool = True  # subtract the mean key of the sample's real tokens (exact: softmax-invariant)
    smooth_v: bool = True  # subtract V's per-channel mean and add it back to the output (exact)
    pv: str = "fp8"  # P and V for PV: "fp8" (e4m3, V with v_scales) or "bf16" (SageAttention 1: no scales)

    def __post_init__(self):
        if self.qk not in QK_FORMATS:
            raise ValueError(f"qk must be one of {QK_FORMATS}, got {self.qk!r}")
        if self.qk_scales not in QK_SCALES:
            raise ValueError(f"qk_scales must be one of {QK_SCALES}, got {self.qk_scales!r}")
        if self.pv not in PV_FORMATS:
            raise ValueError(f"pv must be one of {PV_FORMATS}, got {self.pv!r}")
        if self.v_scales not in V_SCALES:
            raise ValueError(f"v_scales must be one of {V_SCALES}, got {self.v_scales!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive int (tokens per scale), got {self.block!r}")

    def __str__(self) -> str:
        qk = f"{self.qk} QK per {self.qk_scales}" + (f" ({self.block})" if self.qk_scales == "block" else "")
        smooth = "+".join(n for n, on in (("K", self.smooth_k), ("V", self.smooth_v)) if on) or "no"
        pv = f"fp8 PV (V per {self.v_scales})" if self.pv == "fp8" else "bf16 PV"
        return f"{qk}, {pv}, {smooth} smoothing"


# Named recipes, in the order of the measurement tables (docs/benchmarks.md): each adds one step.
RECIPES = {
    "fp8-head": FP8AttentionRecipe("fp8", "head", v_scales="head", smooth_k=False, smooth_v=False),
    "fp8-head+K": FP8AttentionRecipe("fp8", "head", v_scales="head", smooth_k=True, smooth_v=False),
    "fp8-head+KV": FP8AttentionRecipe("fp8", "head", v_scales="channel", smooth_k=True, smooth_v=True),
    "fp8-block+KV": FP8AttentionRecipe("fp8", "block", v_scales="channel"),
    "int8qk-block+KV": FP8AttentionRecipe("int8", "block", v_scales="channel"),
    "int8qk-token+KV": FP8AttentionRecipe("int8", "token", v_scales="channel"),
    "int8qk-block+K-bf16pv": FP8AttentionRecipe("int8", "block", smooth_v=False, pv="bf16"),
}
DEFAULT_RECIPE = RECIPES["int8qk-block+KV"]


# ------------------------------------------------------------------------------------------ quantisers
GROUPS = ("head", "token", "channel", "block", "block-channel")


def _amax(x: torch.Tensor, group: str, block: int) -> torch.Tensor:
    """max |x| over each scale group of x (b, n, nh, hd), broadcastable back to x's shape.

    "head": all tokens and channels of a head; "token": one token's channels; "channel": one channel over
    the tokens; "block": ``block`` tokens' channels (blocks counted from the segment's start, the last one
    shorter); "block-channel": one channel over ``block`` tokens.
    """
    b, n, nh, hd = x.shape
    a = x.abs()
    if group == "head":
        return a.amax(dim=(1, 3), keepdim=True)  # (b, 1, nh, 1)
    if group == "token":
        return a.amax(dim=3, keepdim=True)  # (b, n, nh, 1)
    if group == "channel":
        return a.amax(dim=1, keepdim=True)  # (b, 1, nh, hd)
    if group not in ("block", "block-channel"):
        raise ValueError(f"scale group must be one of {GROUPS}, got {group!r}")
    nb = -(-n // block)
    blocks = torch.nn.functional.pad(a, (0, 0, 0, 0, 0, nb * block - n)).view(b, nb, block, nh, hd)
    m = blocks.amax(dim=(2, 4) if group == "block" else 2, keepdim=True)  # (b, nb, 1, nh, 1 or hd)
    return m.expand(b, nb, block, nh, hd).reshape(b, nb * block, nh, hd)[:, :n]


def quantize(x: torch.Tensor, fmt: str, group: str, block: int = 64) -> torch.Tensor:
    """What a kernel computes with: x (b, n, nh, hd) rounded to e4m3 (``fmt="fp8"``) or int8 with one scale
    ``amax / 448`` (or ``/ 127``) per group (see `_amax`), returned dequantised in fp32."""
    if fmt not in QK_FORMATS:
        raise ValueError(f"fmt must be one of {QK_FORMATS}, got {fmt!r}")
    x = x.float()
    scale = _amax(x, group, block).clamp(min=1e-30) / (INT8_MAX if fmt == "int8" else E4M3_MAX)
    if fmt == "int8":
        return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX) * scale
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale


def quantize_p(p: torch.Tensor) -> torch.Tensor:
    """P = exp(s - rowmax) in [0, 1] as e4m3 with the static scale 1/448 (dequantised, fp32)."""
    return (p * E4M3_MAX).to(E4M3).float() / E4M3_MAX


def _bf16(p: torch.Tensor) -> torch.Tensor:
    return p.bfloat16().float()


# --------------------------------------------------------------------------------------- the emulation
def real_mean(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, L, nh, hd) -> (B, 1, nh, hd): the mean over each sample's n_b real tokens (zeros if n_b = 0)."""
    L = x.shape[1]
    real = (torch.arange(L, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None])
    w = real.to(x.dtype)[:, :, None, None]  # (B, L, 1, 1)
    return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)


def _segment_kernel(recipe: FP8AttentionRecipe, max_elements: int):
    """The attention of one segment slice (b, n, nh, hd), fp32 in and out, as the recipe quantises it."""
    qk_group = recipe.qk_scales
    v_group = {"head": "head", "channel": "channel", "block": "block-channel"}[recipe.v_scales]

    def kernel(q, k, v):
        qh = quantize(q, recipe.qk, qk_group, recipe.block).transpose(1, 2)  # (b, nh, n, hd)
        kh = quantize(k, recipe.qk, qk_group, recipe.block).transpose(1, 2)
        if recipe.pv == "fp8":
            vh, round_p = quantize(v, "fp8", v_group, recipe.block).transpose(1, 2), quantize_p
        else:
            vh, round_p = _bf16(v).transpose(1, 2), _bf16

        n = q.shape[1]
        out = torch.empty_like(qh)
        rows = max(1, max_elements // max(1, n * q.shape[0] * q.shape[2]))  # query rows per chunk
        for r0 in range(0, n, rows):
            s = attention_scores(qh[:, :, r0:r0 + rows], kh)  # (b, nh, c, n) fp32
            p = (s - s.amax(dim=-1, keepdim=True)).exp()
            out[:, :, r0:r0 + rows] = (round_p(p) @ vh) / p.sum(dim=-1, keepdim=True)
        return out.transpose(1, 2)  # (b, n, nh, hd)

    return kernel


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, img_len: int,
                  txt_lens: torch.Tensor | None = None, recipe: FP8AttentionRecipe = DEFAULT_RECIPE,
                  max_elements: int = 2**25) -> torch.Tensor:
    """``hvlab.attention.attention``'s segments with the recipe's quantisation, emulated in fp32.

    q, k, v: (B, L, nh, hd). Returns (B, L, nh, hd) in q's dtype. ``max_elements`` bounds the scores held
    at once (query rows are chunked), so long sequences fit in memory.
    """
    _check(q, k, v, img_len, txt_lens)
    if not isinstance(recipe, FP8AttentionRecipe):
        raise TypeError(f"recipe must be an FP8AttentionRecipe, got {type(recipe).__name__}")
    B, L = q.shape[:2]
    lengths = valid_lengths(B, L, img_len, txt_lens)
    q32, k32, v32 = q.float(), k.float(), v.float()
    if recipe.smooth_k:
        k32 = k32 - real_mean(k32, lengths)  # one vector per sample and head: every segment's scores shift
    m_v = real_mean(v32, lengths) if recipe.smooth_v else None
    if m_v is not None:
        v32 = v32 - m_v
    out = _segments_sdpa(q32, k32, v32, lengths, kernel=_segment_kernel(recipe, max_elements))
    if m_v is not None:
        out = out + m_v  # every segment's weights sum to 1, so the mean comes back exactly
    return out.to(q.dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor, lengths: list[int] | None = None) -> float:
    """||out - ref|| / ||ref|| over the real tokens (padding outputs are never read), in fp64."""
    if lengths is not None:
        keep = torch.arange(ref.shape[1], device=ref.device)[None, :] < torch.tensor(lengths, device=ref.device)[:, None]
        out, ref = out[keep], ref[keep]
    d = (out.double() - ref.double()).norm()
    return float(d / ref.double().norm().clamp(min=1e-300))
