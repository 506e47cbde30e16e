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
On an H100 at 720p, one q: eager 15.5 ms, kernel 0.55 ms (2.7 TB/s of traffic). Its first version
loaded even and odd channels with stride-2 accesses and took 5.3 ms: for a memory-bound kernel, how
the bytes are touched matters as much as how many (docs/benchmarks.md).

``gelu_linear`` (the end of this file) does the same for the MLP's second half: GELU, the single
block's concatenation [attention | GELU] and the FP8 activation quantiser in one pass.
"""
from __future__ import annotations

import warnings

import torch

from .fp8 import _TRITON_MAX_K, FP8Linear, quantize_gelu_rows
from ..rope import rotate

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


def _use_kernel(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    hd = x.shape[-1]
    return (triton is not None and not _kernel_failed and x.is_cuda and not grad and x.stride(-1) == 1
            and hd % 2 == 0 and hd == triton.next_power_of_2(hd) and x.numel() > 0
            and (out is None or (out.stride(-1) == 1 and out.stride(-2) == hd)))


def _switch_off(why: str) -> None:
    """Stop using the kernel in this process and say why, once; callers then run the eager definition."""
    global _kernel_failed
    _kernel_failed = True
    warnings.warn(f"hvlab.fast.kernels: the norm_rope kernel {why}; using the eager path from now on")


def norm_rope(x: torch.Tensor, norm, freqs_cis=None, n_rope: int | None = None,
              dtype: torch.dtype | None = None, backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm per head then RoPE on the first ``n_rope`` tokens, in one pass where a kernel can run.

    Same arguments and result as ``norm_rope_reference``. ``backend``: "auto" (the kernel where it can
    run), "eager" (the reference), or "kernel" (the Triton kernel, also on CPU tensors under
    ``TRITON_INTERPRET=1``: how the tests check its logic without a GPU). ``out``: a (B, L, nh, hd) tensor
    (typically a token slice of the joint q / k buffer of a block) to write the result into, and return,
    instead of a new one; the kernel writes there directly, which saves the copy a ``torch.cat`` would make.
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
    if out is not None and (out.shape != x.shape or out.dtype != (dtype or x.dtype)):
        raise ValueError(f"out must be a {dtype or x.dtype} tensor of shape {tuple(x.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if backend == "eager" or (backend == "auto" and not _use_kernel(x, norm.weight, out)):
        ref = norm_rope_reference(x, norm, freqs_cis, n_rope, dtype)
        return ref if out is None else out.copy_(ref)
    # the output dtype of the eager code: promote(x, weight) from RMSNorm, then .to(dtype)
    mid = torch.promote_types(x.dtype, norm.weight.dtype)
    if out is None:
        out = torch.empty(B, L, nh, hd, dtype=dtype or x.dtype, device=x.device)
    elif out.stride(3) != 1 or out.stride(2) != hd:
        raise ValueError(f"out must have contiguous heads (strides (..., {hd}, 1)), got strides {out.stride()}")
    if freqs_cis is None:
        cos = sin = x.new_empty(0, dtype=torch.float32)
        n = 0
    else:
        cos = cos.to(x.device, torch.float32).contiguous()
        sin = sin.to(x.device, torch.float32).contiguous()
    try:
        _launch(x, norm, cos, sin, out, n, mid)
    except Exception as e:  # a triton that cannot build it: say so once, then run the eager definition
        if backend == "kernel":
            raise
        _switch_off(f"failed ({type(e).__name__}: {str(e)[:200]})")
        return out.copy_(norm_rope_reference(x, norm, freqs_cis, n_rope, dtype))
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
            return out.copy_(norm_rope_reference(x, norm, freqs_cis, n_rope, dtype))
        _kernel_verified = True
    return out


# How the kernel finds a channel's rotation partner (2j <-> 2j+1): "split" regroups the loaded row into
# pairs in registers (tl.reshape + tl.split / tl.join); "gather" loads the partner a second time from the
# cache at address c ^ 1. Both read and write the row contiguously. scripts/gpu/bench_kernels.py times them.
PAIR_MODES = ("split", "gather")
pair_mode = "split"
num_warps = 8


def _launch(x, norm, cos, sin, out, n, mid) -> None:
    B, L, nh, hd = x.shape
    _norm_rope_kernel[(B * L,)](
        x, norm.weight, cos, sin, out, L, nh, n, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
        out.stride(1), float(norm.eps), HD=hd, NH_P=triton.next_power_of_2(nh), X_BF16=x.dtype == torch.bfloat16,
        X_F16=x.dtype == torch.float16, MID_BF16=mid == torch.bfloat16, MID_F16=mid == torch.float16,
        SPLIT=pair_mode == "split", num_warps=num_warps)


def agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """How far the kernel's output is from the eager one, in units that do not depend on cancellation.

    Both round to bf16/fp16 several times; where a float32 last bit of the rms tips one rounding, an
    output channel moves by about one ulp of its rotation pair's length (RoPE mixes the pair), which
    can be large *relative* to a channel that happens to be near zero. So errors are measured against
    the pair's length |(y_2j, y_2j+1)|: ``max_pair_ulps`` (in ulps of the dtype), the share of elements
    that differ at all, and the whole tensor's relative error. ``ok`` for bf16 / fp16: <= 4 (units of
    2^-8 of the pair's length for bf16: two ulps of a channel at the top of its binade), < 2 % differing,
    rel < 2e-3. In float32 nearly every element differs in its last bits (summation order, sqrt), so
    there: <= 64 pair ulps (4e-6 of the pair's length) and rel < 1e-6, whatever share differs.
    """
    o, r = out.float(), ref.float()
    pair = r.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*r.shape[:-1], -1, 2).flatten(-2)
    ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(ref.dtype, 2.0 ** -24)
    d = (o - r).abs()
    stats = dict(max_pair_ulps=round((d / (pair * ulp).clamp(min=1e-30)).max().item(), 3),
                 differ=round((out != ref).float().mean().item(), 5),
                 rel=float(f"{(d.norm() / r.norm().clamp(min=1e-30)).item():.3g}"))
    if ref.dtype in (torch.bfloat16, torch.float16):
        stats["ok"] = stats["max_pair_ulps"] <= 4 and stats["differ"] < 0.02 and stats["rel"] < 2e-3
    else:
        stats["ok"] = stats["max_pair_ulps"] <= 64 and stats["rel"] < 1e-6
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
    def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, nh, n_rope, sxb, sxl, sxh, sob, sol, eps,
                          HD: tl.constexpr, NH_P: tl.constexpr, X_BF16: tl.constexpr, X_F16: tl.constexpr,
                          MID_BF16: tl.constexpr, MID_F16: tl.constexpr, SPLIT: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        b = tok // L
        l = tok % L
        h = tl.arange(0, NH_P)[:, None]  # (NH_P, 1)
        c = tl.arange(0, HD)[None, :]  # (1, HD) channels, read and written contiguously
        mask = (h < nh) & (c < HD)
        src = x_ptr + b * sxb + l * sxl + h * sxh
        x = tl.load(src + c, mask=mask, other=0.0).to(tl.float32)  # (NH_P, HD)
        ms = tl.sum(x * x, axis=1) / HD  # (NH_P,) mean of squares per head
        r = (1.0 / tl.sqrt_rn(ms + eps))[:, None]
        # RMSNorm: normalised in float32, cast back to x's dtype, times the weight (in the promoted dtype);
        # then .to(dtype) = the out pointer's dtype: RoPE reads that rounded value, as the eager code does
        w = tl.load(w_ptr + c).to(tl.float32)
        y = _round_to(_round_to(x * r, X_BF16, X_F16) * w, MID_BF16, MID_F16)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        if l < n_rope:
            cs = tl.load(cos_ptr + l * HD + c)
            sn = tl.load(sin_ptr + l * HD + c)
            # partner p[2j] = -y[2j+1], p[2j+1] = y[2j]: out = y cos + p sin (products rounded apart, as eager)
            if SPLIT:
                ye, yo = tl.split(tl.reshape(y, (NH_P, HD // 2, 2)))
                p = tl.reshape(tl.join(-yo, ye), (NH_P, HD))
            else:
                xp = tl.load(src + (c ^ 1), mask=mask, other=0.0).to(tl.float32)
                wp = tl.load(w_ptr + (c ^ 1)).to(tl.float32)
                yp = _round_to(_round_to(xp * r, X_BF16, X_F16) * wp, MID_BF16, MID_F16)
                yp = yp.to(out_ptr.dtype.element_ty).to(tl.float32)
                p = tl.where((c % 2) == 0, -yp, yp)
            y = tl.fma(y, cs, 0.0) + tl.fma(p, sn, 0.0)
        dst = out_ptr + b * sob + l * sol + h * HD + c
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------- GELU into a linear layer
def gelu_linear(linear: torch.nn.Module, h: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(cat([prefix, GELU_tanh(h)], -1))``: the MLP's second half, and the single block's ``linear2``
    (prefix = the attention output, h = the MLP half of ``linear1``'s output).

    Written out, that is GELU (a pass over h), the concatenation (a second copy of both), then, for an FP8
    layer, the activation quantiser (a third pass). Here:

    - an `FP8Linear` running FP8 GEMMs on CUDA (no autograd): one Triton pass reads prefix and h, applies
      GELU, and writes the FP8 row with its per-token scale (`fp8.quantize_gelu_rows`), then the GEMM;
    - otherwise without autograd: GELU is written straight into its columns of the joint input (no
      concatenation copy of it);
    - with autograd: the plain composition.

    h (..., Kh), prefix (..., Kp) or None, ``linear.in_features == Kp + Kh``. Returns (..., out_features).
    """
    Kp = 0 if prefix is None else prefix.shape[-1]
    Kh = h.shape[-1]
    if Kp + Kh != linear.in_features:
        raise ValueError(f"gelu_linear: prefix ({Kp}) + h ({Kh}) columns must equal linear.in_features = "
                         f"{linear.in_features}")
    if prefix is not None and prefix.shape[:-1] != h.shape[:-1]:
        raise ValueError(f"gelu_linear: prefix {tuple(prefix.shape)} and h {tuple(h.shape)} must share leading dims")
    lead = h.shape[:-1]
    grad = torch.is_grad_enabled() and (h.requires_grad or (prefix is not None and prefix.requires_grad)
                                        or any(p.requires_grad for p in linear.parameters()))
    if (not grad and isinstance(linear, FP8Linear) and linear.mode == "scaled_mm" and linear.scaled_mm_shapes_ok
            and linear.per_token and triton is not None and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16)
            and (prefix is None or prefix.dtype == h.dtype) and Kp + Kh <= _TRITON_MAX_K):
        h2 = h.reshape(-1, Kh)
        p2 = None if prefix is None else prefix.reshape(-1, Kp)
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        if p2 is not None and p2.stride(-1) != 1:
            p2 = p2.contiguous()
        x_fp8, s_x = quantize_gelu_rows(h2, p2)
        return linear.forward_fp8(x_fp8, s_x, h.dtype).reshape(*lead, linear.out_features)
    if grad or prefix is None:
        act = torch.nn.functional.gelu(h, approximate="tanh")
        return linear(act if prefix is None else torch.cat([prefix, act], dim=-1))
    x = h.new_empty(*lead, Kp + Kh)  # the joint input, filled in place
    x[..., :Kp] = prefix
    torch.ops.aten.gelu.out(h, approximate="tanh", out=x[..., Kp:])
    return linear(x)
