"""Attention kernels for the fast wing: FlashAttention-3 on Hopper, cuDNN SDPA elsewhere, FP8 on request.

``hvlab.attention`` holds the maths: in sample b the ``n_b = img_len + txt_lens[b]`` real tokens attend
among themselves and the padded text tokens form a segment of their own. Everything here computes the
same function (``"fp8"`` approximately) on faster kernels and plugs into a block as its ``attn_fn``::

    accelerate(dit, attention="auto")   # the default; "fa3", "sdpa", "fp8", or None to leave attn_fn alone

=========  ===========================================================================================
"auto"     FlashAttention-3 for bf16 on an sm90 GPU (H100 / H200) when it is installed; otherwise
           ``hvlab.attention.attention`` (cuDNN SDPA on CUDA, the reference path on the CPU). On an sm90
           GPU without FA3, one line says so.
"fa3"      FlashAttention-3, or a ValueError naming what is missing (package, GPU, dtype)
"sdpa"     ``hvlab.attention.attention``, always
"fp8"      ``hvlab.fast.fp8_attention``: smoothed, block-scaled low-precision attention (an approximation,
           with its measured error in docs/benchmarks.md): its Triton kernel on CUDA, its fp32 emulation on
           the CPU (and, with a one-line notice, on a GPU the kernel cannot serve)
=========  ===========================================================================================

The choice is made per call from the tensors (the model may move to a GPU after ``accelerate``).

**FA3's varlen call.** The kernel takes the batch as one (B*L, nh, hd) sequence cut at
``cu_seqlens = [0, n_0, L, L + n_1, 2L, ...]``: the official model's call, and hvlab's segments exactly
(real tokens one segment, padding the next). Empty segments (no padding, or no real token) are left out
of the list, which changes nothing: a segment of length 0 holds no query.

**Where FA3 comes from** (``pip install 'hvlab[fa3]'``): the ``fa3-fwd`` wheel, FlashAttention-3's forward
kernels prebuilt for sm90 (bf16 and FP8; it imports as ``fa3_fwd_interface``), or flash-attn's own
Hopper build (``flash_attn_interface``), tried in that order. Both expose
``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``; older
builds return ``(out, softmax_lse)``, newer ones ``out``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Sequence

import torch

from .. import attention as _attention
from ..attention import _check, segment_bounds, valid_lengths

KINDS = ("auto", "fa3", "sdpa", "fp8")
FA3_MODULES = ("fa3_fwd_interface", "flash_attn_interface")  # the fa3-fwd wheel, flash-attn's Hopper build
FA3_INSTALL = "pip install 'hvlab[fa3]' (the fa3-fwd wheel, sm90) or flash-attn's Hopper build"


class FA3FallbackWarning(UserWarning):
    """FlashAttention-3 would run here (bf16 on an sm90 GPU) but is not installed: cuDNN SDPA runs instead."""


class FP8AttentionFallbackWarning(UserWarning):
    """FP8 attention on a GPU where its Triton kernel cannot run: the (slow) fp32 emulation runs instead."""


# --------------------------------------------------------------------------------------- finding FA3
_UNSET = object()
_fa3_func = _UNSET  # flash_attn_varlen_func once looked up, or None; tests put a fake one here
_fa3_reason = ""


def fa3_varlen_func():
    """FA3's ``flash_attn_varlen_func``, or None when neither module imports (looked up once)."""
    global _fa3_func, _fa3_reason
    if _fa3_func is _UNSET:
        _fa3_func, reasons = None, []
        for name in FA3_MODULES:
            try:  # a CUDA extension can fail in many ways on a machine it was not built for
                _fa3_func = importlib.import_module(name).flash_attn_varlen_func
                _fa3_reason = f"{name}.flash_attn_varlen_func"
                break
            except Exception as e:  # noqa: BLE001
                reasons.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if _fa3_func is None:
            _fa3_reason = "; ".join(reasons)
    return _fa3_func


def _nvidia_capability(q: torch.Tensor) -> tuple[int, int] | None:
    """(major, minor) of the NVIDIA GPU holding ``q``, or None off NVIDIA GPUs (tests patch this)."""
    if not q.is_cuda or torch.version.hip:
        return None
    return torch.cuda.get_device_capability(q.device)


def fa3_serves(q: torch.Tensor) -> tuple[bool, str]:
    """Can FA3 run attention on tensors like ``q`` (B, L, nh, hd)? Returns (ok, the reason in words).

    The hardware and dtype are checked before the package, so that a "not installed" reason means
    FA3 *would* run here.
    """
    cc = _nvidia_capability(q)
    if cc is None:
        return False, f"FlashAttention-3 needs an NVIDIA GPU, the tensors are on {q.device}"
    if cc[0] != 9:
        return False, f"FlashAttention-3 is built for sm90 (H100, H200), this GPU is sm{cc[0]}{cc[1]}"
    if q.dtype != torch.bfloat16:
        return False, f"FlashAttention-3 runs bf16 here (the fa3-fwd wheel has no fp16 kernels), got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return False, f"FlashAttention-3 takes head_dim a multiple of 8 up to 256, got {q.shape[-1]}"
    if fa3_varlen_func() is None:
        return False, f"FlashAttention-3 is not installed ({FA3_INSTALL}); tried {_fa3_reason}"
    return True, f"FlashAttention-3 ({_fa3_reason})"


# ------------------------------------------------------------------------------------- the varlen call
def cu_seqlens(lengths: Sequence[int], L: int) -> tuple[list[int], int]:
    """Segment bounds ``[0, n_0, L, L + n_1, 2L, ...]`` of a (B*L)-token batch, empty segments left out,
    and the longest segment. ``lengths[b] = n_b``, the real tokens of sample b, each in [0, L]."""
    if L < 1 or any(not 0 <= n <= L for n in lengths):
        raise ValueError(f"lengths must lie in [0, L = {L}], got {list(lengths)}")
    bounds = [0]
    for end in segment_bounds(list(lengths), L)[1:]:  # each sample's real segment, then its padding segment
        if end > bounds[-1]:
            bounds.append(end)
    return bounds, max(e - s for s, e in zip(bounds, bounds[1:]))


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, img_len: int,
                  txt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """``hvlab.attention.attention`` through FA3's varlen kernel: the same segments. Returns (B, L, nh, hd)."""
    _check(q, k, v, img_len, txt_lens)
    fn = fa3_varlen_func()
    if fn is None:
        raise ValueError(f"FlashAttention-3 is not installed: {FA3_INSTALL}")
    B, L, nh, hd = q.shape
    bounds, longest = cu_seqlens(valid_lengths(B, L, img_len, txt_lens), L)
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    out = fn(q.reshape(B * L, nh, hd), k.reshape(B * L, nh, hd), v.reshape(B * L, nh, hd), cu, cu, longest, longest)
    out = out[0] if isinstance(out, tuple) else out  # (out, softmax_lse) from older builds
    return out.reshape(B, L, nh, hd)


# ---------------------------------------------------------------------------------- a block's attn_fn
class FastAttention:
    """A block's ``attn_fn`` (same call as ``hvlab.attention.attention``) running the kernel ``kind`` asks for.

    ``kind``: one of ``KINDS`` (see the module docstring); ``recipe``: the FP8 recipe for ``kind="fp8"``
    (default ``fp8_attention.DEFAULT_RECIPE``). ``choose(q)`` says which kernel a call on ``q`` runs.
    """

    def __init__(self, kind: str = "auto", recipe=None):
        if kind not in KINDS:
            raise ValueError(f"attention must be one of {KINDS} (or None to leave attn_fn alone), got {kind!r}")
        if recipe is not None and kind != "fp8":
            raise ValueError(f"an FP8 attention recipe goes with attention='fp8', got attention={kind!r}")
        if kind == "fp8":
            from .fp8_attention import DEFAULT_RECIPE, FP8AttentionRecipe

            recipe = DEFAULT_RECIPE if recipe is None else recipe
            if not isinstance(recipe, FP8AttentionRecipe):
                raise TypeError(f"recipe must be an FP8AttentionRecipe, got {type(recipe).__name__}")
        self.kind, self.recipe = kind, recipe

    def choose(self, q: torch.Tensor) -> str:
        """"fa3", "sdpa" or "fp8" for a call on ``q``; raises where ``kind="fa3"`` cannot run.

        Under autograd (training) "auto" takes SDPA: the fa3-fwd wheel has no backward pass.
        """
        if self.kind in ("sdpa", "fp8"):
            return self.kind
        if torch.is_grad_enabled() and q.requires_grad:
            if self.kind == "fa3":
                raise ValueError("attention='fa3' runs forward only (inference); use attention='auto' or 'sdpa' "
                                 "to train")
            return "sdpa"
        ok, reason = fa3_serves(q)
        if ok:
            return "fa3"
        if self.kind == "fa3":
            raise ValueError(f"attention='fa3': {reason}")
        if "not installed" in reason:  # FA3 would have run here: say once why it did not
            warnings.warn(f"hvlab.fast.attention: {reason}; using cuDNN SDPA", FA3FallbackWarning, stacklevel=3)
        return "sdpa"

    def __call__(self, q, k, v, *, img_len: int, txt_lens: torch.Tensor | None = None) -> torch.Tensor:
        kernel = self.choose(q)
        if kernel == "fa3":
            return fa3_attention(q, k, v, img_len=img_len, txt_lens=txt_lens)
        if kernel == "fp8":
            from .fp8_attention import fp8_attention, fp8_attention_triton, triton_serves

            ok, reason = triton_serves(q, self.recipe)
            if ok and torch.is_grad_enabled() and q.requires_grad:
                ok, reason = False, "the Triton kernel has no backward pass; the emulation is differentiable"
            if ok:
                return fp8_attention_triton(q, k, v, img_len=img_len, txt_lens=txt_lens, recipe=self.recipe)
            if q.is_cuda:  # the emulation is exact to the recipe but builds fp32 score tiles: slow on a GPU
                warnings.warn(f"hvlab.fast.attention: FP8 attention runs its fp32 emulation ({reason})",
                              FP8AttentionFallbackWarning, stacklevel=2)
            return fp8_attention(q, k, v, img_len=img_len, txt_lens=txt_lens, recipe=self.recipe)
        return _attention.attention(q, k, v, img_len=img_len, txt_lens=txt_lens)  # looked up per call

    def __repr__(self) -> str:
        return f"FastAttention({self.kind!r}" + (f", {self.recipe}" if self.recipe is not None else "") + ")"


# ------------------------------------------------------------------------------ installing into blocks
def _innermost(fn):
    """Follow a chain of wrappers down to the kernel: ``UlyssesAttention`` keeps its inner one as
    ``.attn_fn``, a recorder's wrapper as ``__wrapped__``. Returns (holder or None, innermost)."""
    holder = None
    while True:
        if isinstance(fn, FastAttention) or fn is _attention.attention:
            return holder, fn
        if hasattr(fn, "attn_fn"):  # re-pointable: set holder.attn_fn
            holder, fn = fn, fn.attn_fn
        elif hasattr(fn, "__wrapped__"):  # a closure: cannot be re-pointed
            holder, fn = None, fn.__wrapped__
        else:
            return holder, fn


def install(block, fn: FastAttention, check_only: bool = False) -> None:
    """Make ``fn`` the kernel under ``block.attn_fn``, keeping the wrappers above it (Ulysses, recorders).

    A recorder's wrapper holds its kernel in a closure; then the FastAttention already inside it takes
    ``fn``'s settings. Anything else (a custom attn_fn) is refused rather than silently replaced.
    ``check_only``: raise if it would be refused, change nothing (accelerate checks every block first).
    """
    top = block.attn_fn
    if isinstance(top, FastAttention) or top is _attention.attention:
        if not check_only:
            block.attn_fn = fn
        return
    holder, inner = _innermost(top)
    if isinstance(inner, FastAttention) and holder is None:
        if not check_only:
            inner.kind, inner.recipe = fn.kind, fn.recipe
    elif holder is not None and (isinstance(inner, FastAttention) or inner is _attention.attention):
        if not check_only:
            holder.attn_fn = fn
    else:
        raise ValueError(f"{type(block).__name__}.attn_fn is {top!r}, which accelerate does not know how to "
                         "reach into (attach recorders after accelerate, or pass attention=None to leave it)")


def uninstall(block) -> None:
    """Undo `install`: the reference ``hvlab.attention.attention`` where a FastAttention was."""
    top = block.attn_fn
    if isinstance(top, FastAttention):
        block.attn_fn = _attention.attention
        return
    holder, inner = _innermost(top)
    if isinstance(inner, FastAttention):
        if holder is not None:
            holder.attn_fn = _attention.attention
        else:  # inside a recorder's closure: the same maths as the reference
            inner.kind, inner.recipe = "sdpa", None


def installed(block) -> FastAttention | None:
    """The FastAttention under ``block.attn_fn``, or None."""
    inner = _innermost(block.attn_fn)[1]
    return inner if isinstance(inner, FastAttention) else None


__all__ = ["FastAttention", "FA3FallbackWarning", "FP8AttentionFallbackWarning", "fa3_attention", "fa3_serves",
           "fa3_varlen_func", "cu_seqlens", "install", "uninstall", "installed", "KINDS"]
