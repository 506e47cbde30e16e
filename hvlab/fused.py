"""QK-norm and RoPE in one pass: the per-head RMSNorm of q (or k) followed by the rotary embedding.

Every block does, for q and for k, ``RMSNorm(head_dim)`` and then RoPE on the image tokens. Written
with plain torch ops (``RMSNorm.forward`` and ``rope.apply_rotary_emb``), that is about a dozen passes
over a (B, L, 24, 128) tensor, most of them in float32: at 720p (118,800 tokens) ~32 GB of memory
traffic for q alone, ~1.5 s of every 22 s DiT step on an H100. None of it is arithmetic: each element
needs only its own head's sum of squares and its own rotation pair.

``norm_rope`` computes the same function in one read and one write per element:

    y   = to_dtype(x / sqrt(mean_head(x^2) + eps)) * weight          (RMSNorm, as ``modulation.RMSNorm``)
    out = y * cos + rotate_pairs(y) * sin   for tokens < n_rope        (RoPE, as ``rope.apply_rotary_emb``)
    out = y                                 for the others (text tokens)

On CUDA with triton, and when no gradient is needed, a Triton kernel runs it (one program per token,
all heads, everything in registers, float32 maths and the same roundings to the output dtype as the
eager code). Otherwise the eager reference below runs: the exact code the blocks used before, so CPU
results, training and autograd are unchanged. ``tests/test_fused.py`` checks kernel == reference.
"""
from __future__ import annotations

import warnings

import torch

from .rope import rotate

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton: the eager path is used
    triton = None


def norm_rope_reference(x: torch.Tensor, norm, freqs_cis=None, n_rope: int | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The eager definition: ``norm(x).to(dtype)``, then RoPE on tokens ``[0, n_rope)`` (default: all).

    x: (B, L, nh, hd); norm: an ``RMSNorm(hd)``; freqs_cis: (cos, sin), each (n_rope, hd) float32, or None.
    """
    y = norm(x).to(dtype or x.dtype)
    if freqs_cis is None:
        return y
    L = x.shape[1]
    n = L if n_rope is None else n_rope
    if n == L:
        return rotate(y, *freqs_cis)
    return torch.cat([rotate(y[:, :n], *freqs_cis), y[:, n:]], dim=1)


_kernel_failed = False  # set when the kernel could not be built or run here (then eager is used)
_kernel_verified = False  # set after the first kernel call of the process agreed with the eager path


def _use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (triton is not None and not _kernel_failed and x.is_cuda and not grad and x.stride(-1) == 1
            and x.shape[-1] % 2 == 0 and x.numel() > 0)


def _switch_off(why: str) -> None:
    """Stop using the kernel in this process and say why, once; callers then run the eager definition."""
    global _kernel_failed
    _kernel_failed = True
    warnings.warn(f"hvlab.fused: the norm_rope kernel {why}; using the eager path from now on")


def norm_rope(x: torch.Tensor, norm, freqs_cis=None, n_rope: int | None = None,
              dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """RMSNorm per head then RoPE on the first ``n_rope`` tokens, in one pass where a kernel can run.

    Same arguments and result as ``norm_rope_reference``. ``backend``: "auto" (the kernel where it can
    run), "eager" (the reference), or "kernel" (the Triton kernel, also on CPU tensors under
    ``TRITON_INTERPRET=1``: how the tests check its logic without a GPU).
    """
    if backend not in ("auto", "eager", "kernel"):
        raise ValueError(f"backend must be 'auto', 'eager' or 'kernel', got {backend!r}")
    if backend == "kernel" and triton is None:
        raise RuntimeError("backend='kernel' needs triton (pip install triton; on CPU with TRITON_INTERPRET=1)")
    B, L, nh, hd = x.shape
    n = L if n_rope is None else n_rope
    if freqs_cis is not None:
        cos, sin = freqs_cis
        if cos.shape != (n, hd) or sin.shape != (n, hd):
            raise ValueError(f"RoPE tables must be (n_rope, head_dim) = ({n}, {hd}) for q of shape {tuple(x.shape)}; "
                             f"got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}")
    if backend == "eager" or (backend == "auto" and not _use_kernel(x, norm.weight)):
        return norm_rope_reference(x, norm, freqs_cis, n_rope, dtype)
    # the output dtype of the eager code: promote(x, weight) from RMSNorm, then .to(dtype)
    mid = torch.promote_types(x.dtype, norm.weight.dtype)
    out = torch.empty(B, L, nh, hd, dtype=dtype or x.dtype, device=x.device)
    if freqs_cis is None:
        cos = sin = x.new_empty(0, dtype=torch.float32)
        n = 0
    else:
        cos = cos.to(x.device, torch.float32).contiguous()
        sin = sin.to(x.device, torch.float32).contiguous()
    try:
        _norm_rope_kernel[(B * L,)](
            x, norm.weight, cos, sin, out, L, nh, n, x.stride(0), x.stride(1), x.stride(2), float(norm.eps),
            HD=hd, HALF=hd // 2, NH_P=triton.next_power_of_2(nh), X_BF16=x.dtype == torch.bfloat16,
            X_F16=x.dtype == torch.float16, MID_BF16=mid == torch.bfloat16, MID_F16=mid == torch.float16,
            num_warps=4)
    except Exception as e:  # a triton that cannot build it: say so once, then run the eager definition
        if backend == "kernel":
            raise
        _switch_off(f"failed ({type(e).__name__}: {str(e)[:200]})")
        return norm_rope_reference(x, norm, freqs_cis, n_rope, dtype)
    global _kernel_verified
    if backend == "auto" and not _kernel_verified:
        # First use in this process: check the kernel against the eager definition on this very input's
        # first 4096 tokens (cheap, and no float32 temporaries of the whole sequence on a full card).
        # A mismatch disables the kernel, says so with the numbers, and returns the eager result.
        m = min(L, 4096)
        tables = None if freqs_cis is None or n == 0 else (cos[:m], sin[:m])
        ref = norm_rope_reference(x[:, :m], norm, tables, min(n, m) if tables else None, dtype)
        stats = agreement(out[:, :m], ref)
        if not stats["ok"]:
            _switch_off(f"disagrees with the eager path here ({stats})")
            return norm_rope_reference(x, norm, freqs_cis, n_rope, dtype)
        _kernel_verified = True
    return out


def agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """How far the kernel's output is from the eager one, in units that do not depend on cancellation.

    Both round to bf16/fp16 several times; where a float32 last bit of the rms tips one rounding, an
    output channel moves by about one ulp of its rotation pair's length (RoPE mixes the pair), which
    can be large *relative* to a channel that happens to be near zero. So errors are measured against
    the pair's length |(y_2j, y_2j+1)|: ``max_pair_ulps`` (in ulps of the dtype), the share of elements
    that differ at all, and the whole tensor's relative error. ``ok``: <= 4 (units of 2^-8 of the pair's
    length for bf16: two ulps of a channel at the top of its binade), < 2 % differing, < 2e-3.
    """
    o, r = out.float(), ref.float()
    pair = r.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*r.shape[:-1], -1, 2).flatten(-2)
    ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(ref.dtype, 2.0 ** -24)
    d = (o - r).abs()
    stats = dict(max_pair_ulps=round((d / (pair * ulp).clamp(min=1e-30)).max().item(), 3),
                 differ=round((out != ref).float().mean().item(), 5),
                 rel=float(f"{(d.norm() / r.norm().clamp(min=1e-30)).item():.3g}"))
    stats["ok"] = stats["max_pair_ulps"] <= 4 and stats["differ"] < 0.02 and stats["rel"] < 2e-3
    return stats


if triton is not None:

    @triton.jit
    def _round_to(v, BF16: tl.constexpr, F16: tl.constexpr):
        """Round a float32 value to bf16 / fp16 (and back to float32), as a dtype cast in eager code would."""
        if BF16:
            v = v.to(tl.bfloat16).to(tl.float32)
        if F16:
            v = v.to(tl.float16).to(tl.float32)
        return v

    @triton.jit
    def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, nh, n_rope, sxb, sxl, sxh, eps,
                          HD: tl.constexpr, HALF: tl.constexpr, NH_P: tl.constexpr, X_BF16: tl.constexpr,
                          X_F16: tl.constexpr, MID_BF16: tl.constexpr, MID_F16: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        b = tok // L
        l = tok % L
        h = tl.arange(0, NH_P)[:, None]  # (NH_P, 1)
        j = tl.arange(0, HALF)[None, :]  # (1, HALF): rotation pair j = channels (2j, 2j+1)
        mask = (h < nh) & (j < HALF)
        src = x_ptr + b * sxb + l * sxl + h * sxh + 2 * j
        xe = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        ms = tl.sum(xe * xe + xo * xo, axis=1) / HD  # (NH_P,) mean of squares per head
        r = (1.0 / tl.sqrt_rn(ms + eps))[:, None]
        # RMSNorm: normalised in float32, cast back to x's dtype, times the weight (in the promoted dtype)
        we = tl.load(w_ptr + 2 * j).to(tl.float32)
        wo = tl.load(w_ptr + 2 * j + 1).to(tl.float32)
        ye = _round_to(_round_to(xe * r, X_BF16, X_F16) * we, MID_BF16, MID_F16)
        yo = _round_to(_round_to(xo * r, X_BF16, X_F16) * wo, MID_BF16, MID_F16)
        # .to(dtype): the out pointer's dtype; RoPE reads that rounded value, as the eager code does
        ye = ye.to(out_ptr.dtype.element_ty).to(tl.float32)
        yo = yo.to(out_ptr.dtype.element_ty).to(tl.float32)
        if l < n_rope:
            ce = tl.load(cos_ptr + l * HD + 2 * j)
            co = tl.load(cos_ptr + l * HD + 2 * j + 1)
            se = tl.load(sin_ptr + l * HD + 2 * j)
            so = tl.load(sin_ptr + l * HD + 2 * j + 1)
            # (a, b) -> (a cos - b sin, b cos + a sin); products rounded apart, as in xf*cos + rot(xf)*sin
            re = tl.fma(ye, ce, 0.0) + tl.fma(-yo, se, 0.0)
            ro = tl.fma(yo, co, 0.0) + tl.fma(ye, so, 0.0)
            ye = re
            yo = ro
        dst = out_ptr + tok * (nh * HD) + h * HD + 2 * j
        tl.store(dst, ye.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 1, yo.to(out_ptr.dtype.element_ty), mask=mask)
