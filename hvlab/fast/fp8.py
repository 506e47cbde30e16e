"""FP8 weights for the DiT: the official FP8 checkpoint pair, quantizing a bf16 one, and two forwards.

**The format** (what Tencent released as ``mp_rank_00_model_states_fp8.pt`` + ``..._fp8_map.pt``). Every
``nn.Linear`` inside ``double_blocks`` / ``single_blocks`` (modulation linears included: 320 layers, 97.2% of
the 12.8B parameters) stores its weight as ``float8_e4m3fn`` under the usual key ``<name>.weight``; the map
file holds one per-tensor scale per layer, keyed by module name (``"double_blocks.0.img_attn_qkv"``)::

    scale = amax(|w|) / 448            448 = the largest finite e4m3 value
    w_fp8 = round_to_e4m3(w / scale)   so w ~= w_fp8 * scale
    bias, norms and every other layer stay in bf16.

**Two forwards.** The official model casts the fp8 weight and its scale to bf16 on every call and runs a bf16
``F.linear``: it halves the weights' memory (~25.6 -> ~13 GB) but is no faster. hvlab's ``FP8Linear`` keeps
that as ``mode="weight_only"`` (the reference; any device) and adds ``mode="scaled_mm"``: the activation is
quantized on the fly with one scale per token, and FP8 tensor cores (``torch._scaled_mm``, compute capability
>= 8.9) compute ``y[m, n] = s_x[m] * s_w[n] * sum_k x_fp8[m, k] * w_fp8[n, k] + b[n]``. On CUDA the
activation is quantized by a small one-pass Triton kernel (eager PyTorch needs four passes and would eat the
gain). Only the linears get faster: at 720p they are 1.6 of 12.1 PFLOP a step, attention the other 87%.

**Error budget.** e4m3 keeps 3 mantissa bits, so rounding to nearest changes a (normal) value by at most
2^-4 = 6.25% of itself, and by ~2.66% RMS for bell-shaped data. One quantized operand (weight-only) thus
gives a layer output ~2.7% relative error; two independent ones (scaled_mm) ~sqrt(2) x 2.66% = 3.75%.
tests/test_fp8.py checks these numbers.

Differences from the official code, on purpose: scales are rounded to a bf16-representable value (the official
forward casts the scale to bf16 before using it, so both loaders then dequantize to the same weights);
``save_fp8_checkpoint(per_channel=True)`` writes one scale per output row, a 1-D tensor in the map (an hvlab
extension the official loader does not read).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_into, load_state_dict_file, unwrap_state_dict

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MODES = ("auto", "scaled_mm", "weight_only")
CKPT_NAME = "mp_rank_00_model_states_fp8.pt"
MAP_NAME = "mp_rank_00_model_states_fp8_map.pt"
FP8_BLOCKS = ("double_blocks", "single_blocks")

# What stays in bf16, and why. Together these hold 2.8% of the parameters and well under 1% of the FLOPs.
KEPT_IN_BF16 = {
    "img_in": "Conv3d patch embedding, K = 16*1*2*2 = 64: negligible FLOPs, and not an nn.Linear",
    "txt_in": "token refiner and its embedders: <= 256 text tokens (<0.3% of FLOPs); it conditions every block",
    "time_in / vector_in / guidance_in": "one vector per sample (M = B): no FLOPs to save, and their output "
    "drives every modulation (shift, scale, gate), where errors are multiplied into all tokens",
    "final_layer": "3072 -> 64 and its modulation: tiny, and it writes the predicted velocity directly",
    "norms": "LayerNorm / RMSNorm weights are vectors, not matmuls",
    "dims % 16 != 0": "torch._scaled_mm needs in_features and out_features divisible by 16",
}


# Fast accumulation (FP8Linear's default use_fast_accum=True) lets Hopper's FP8 tensor cores skip the periodic
# promotion of partial sums to full fp32. Measured on H100 (torch 2.11, M = 67,576): the rowwise GEMM runs at
# ~1,400 instead of ~1,000 TFLOP/s, and its distance to the exact fp32 emulation grows from 1.7e-3 to 3.3e-3
# at K = 15,360: noise beside the 3.7% that e4m3 rounding itself costs. convert_to_fp8(..., use_fast_accum=False)
# restores the exact accumulation.


class FP8FallbackWarning(UserWarning):
    """FP8 GEMMs were asked for (or "auto") but the device cannot run them: weights stay FP8, math goes bf16."""


# ----------------------------------------------------------------------------------------------- the numbers
def _as_scale(scale: torch.Tensor | float, out_features: int, what: str = "scale") -> torch.Tensor:
    """Normalise a scale to float32 of shape () (per tensor) or (out_features,) (per output row)."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() == out_features:
        return s.reshape(out_features)
    raise ValueError(
        f"{what}: expected one scale per tensor or one per output row ({out_features}), got shape {tuple(s.shape)}"
    )


def quantize_weight(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (w_fp8, scale) with scale = amax / 448 per tensor (shape ()) or per row (shape (out,)).

    ``w ~= w_fp8.float() * scale``. An all-zero tensor or row (a freshly zero-initialised modulation layer)
    gets scale 1 instead of 0. The scale is rounded to a bf16-representable value (<= 2^-8 relative), which may
    put the largest element a hair above 448 before the clamp: it then saturates by < 0.4%, well inside its
    own rounding error (the step between e4m3 values near 448 is 32).
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_weight expects a (out_features, in_features) weight, got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    amax = w32.abs().flatten(1).amax(dim=1) if per_channel else w32.abs().amax()  # (out,) or ()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(torch.bfloat16).float()
    col = scale.reshape(-1, *([1] * (w.dim() - 1))) if per_channel else scale
    w_fp8 = (w32 / col).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return w_fp8, scale


def dequantize_weight(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w_fp8 * scale in fp32, rounded once to ``dtype``. ``scale`` is () or (out,), as `quantize_weight` makes."""
    if w_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"dequantize_weight expects a {FP8_DTYPE} weight, got {w_fp8.dtype}")
    s = _as_scale(scale.to(w_fp8.device), w_fp8.shape[0])
    col = s.reshape(-1, *([1] * (w_fp8.dim() - 1))) if s.dim() else s
    return (w_fp8.float() * col).to(dtype)


def quantize_activation(x2: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activation -> (x_fp8 (M, K), scale (M, 1) per token or () per tensor), x ~= x_fp8 * scale.

    The maths, in fp32: amax = max |x| (over the row or the tensor), inv = 448 / amax, x_fp8 = RNE(x * inv),
    scale = 1 / inv. Every step is one IEEE-rounded fp32 operation, so the one-pass CUDA kernel below gives
    the same bytes. amax is floored at 1e-30 so that a token of zeros quantizes to zeros, never 0 * inf.
    """
    if per_token and _use_triton(x2):
        return _quantize_triton(x2, None)  # amax, inv and scale computed inside, row by row
    if per_token:
        amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=-1, keepdim=True).float()  # (M, 1)
    else:
        amax = torch.linalg.vector_norm(x2, ord=float("inf")).float()  # ()
    # tensor / tensor: one IEEE division. (448 / tensor would be reciprocal-then-multiply: two roundings.)
    inv = torch.full_like(amax, E4M3_MAX) / amax.clamp(min=_AMAX_FLOOR)
    if _use_triton(x2):
        return _quantize_triton(x2, inv)
    return (x2.float() * inv).to(FP8_DTYPE), inv.reciprocal()


# Eager, the quantizer is four passes over the activation (amax, upcast, multiply, cast) and costs as much as
# the FP8 GEMM saves: on H100, 3.8 ms to quantize a (67576, 12288) bf16 activation, 3.7 ms for the FP8 GEMM
# that follows. This kernel reads each row once, keeping it in registers: 0.74 ms (H200), near the bandwidth.
_AMAX_FLOOR = 1e-30
_TRITON_MAX_K = 32768  # a whole row lives in one program's registers
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without triton: the eager path is used
    triton = None

if triton is not None:

    @triton.jit
    def _gelu_tanh(x):
        """GELU, tanh form, in float32 with the constants and operation order of torch's CUDA kernel."""
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # sqrt(2 / pi) (x + 0.044715 x^3)
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh(inner), saturating cleanly at +-1
        return 0.5 * x * (1.0 + t)

    @triton.jit
    def _quantize_rows_kernel(a_ptr, b_ptr, y_ptr, scale_ptr, inv_ptr, KA, KB, sa, sb, PER_TOKEN: tl.constexpr,
                              GELU_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        # One row of y = [a | act(b)] (K = KA + KB columns): a and b are read once each, y written once.
        # BLOCK_A = 0 means no a (plain quantisation of b); GELU_B applies GELU to b, rounded to b's dtype
        # as the eager GELU's output would be, before the row's amax.
        row = tl.program_id(0).to(tl.int64)
        cb = tl.arange(0, BLOCK_B)
        xb = tl.load(b_ptr + row * sb + cb, mask=cb < KB, other=0.0).to(tl.float32)
        if GELU_B:
            xb = _gelu_tanh(xb).to(b_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.max(tl.abs(xb), axis=0)
        if BLOCK_A > 0:
            ca = tl.arange(0, BLOCK_A)
            xa = tl.load(a_ptr + row * sa + ca, mask=ca < KA, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xa), axis=0))
        if PER_TOKEN:
            amax = tl.maximum(amax, 1e-30)  # = _AMAX_FLOOR
            inv = tl.math.div_rn(448.0, amax)
            tl.store(scale_ptr + row, tl.math.div_rn(1.0, inv))
        else:
            inv = tl.load(inv_ptr)
        K = KA + KB
        if BLOCK_A > 0:
            tl.store(y_ptr + row * K + ca, (xa * inv).to(tl.float8e4nv), mask=ca < KA)
        tl.store(y_ptr + row * K + KA + cb, (xb * inv).to(tl.float8e4nv), mask=cb < KB)


def _use_triton(x2: torch.Tensor) -> bool:
    return (triton is not None and x2.is_cuda and x2.is_contiguous() and x2.shape[0] > 0
            and x2.shape[-1] <= _TRITON_MAX_K)


def _launch_quantize(a2, b2, y, scale, inv, gelu: bool) -> None:
    M, KB = b2.shape
    KA = 0 if a2 is None else a2.shape[1]
    block_a = 0 if a2 is None else triton.next_power_of_2(KA)
    block_b = triton.next_power_of_2(KB)
    _quantize_rows_kernel[(M,)](b2 if a2 is None else a2, b2, y, scale, scale if inv is None else inv, KA, KB,
                                0 if a2 is None else a2.stride(0), b2.stride(0), PER_TOKEN=inv is None,
                                GELU_B=gelu, BLOCK_A=block_a, BLOCK_B=block_b,
                                num_warps=min(32, max(4, (block_a + block_b) // 512)))


def _quantize_triton(x2: torch.Tensor, inv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x2.shape
    y = torch.empty(M, K, dtype=FP8_DTYPE, device=x2.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x2.device) if inv is None else inv.reciprocal()
    _launch_quantize(None, x2, y, scale, inv, gelu=False)
    return y, scale


def quantize_gelu_rows(h2: torch.Tensor, prefix2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 of the row ``[prefix | GELU_tanh(h)]`` in one pass: (M, Kp + Kh) fp8 and (M, 1) scales.

    The same numbers as ``quantize_activation(torch.cat([prefix, F.gelu(h, approximate="tanh")], -1))``
    (GELU rounded to h's dtype first, as eager), without writing the GELU output or the concatenation:
    for the single block's ``linear2`` input that is 3 of the 4 passes over a (L, 15360) activation.
    CUDA + triton only (`fused.gelu_linear` decides); h2 and prefix2 are (M, K) with unit column stride.
    """
    if triton is None or not (h2.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("quantize_gelu_rows needs a CUDA tensor and triton (or TRITON_INTERPRET=1); "
                           "use fused.gelu_linear, which falls back")
    M, KB = h2.shape
    KA = 0 if prefix2 is None else prefix2.shape[1]
    if prefix2 is not None and prefix2.shape[0] != M:
        raise ValueError(f"prefix must have the same rows as h ({M}), got {tuple(prefix2.shape)}")
    if KA + KB > _TRITON_MAX_K or h2.stride(1) != 1 or (prefix2 is not None and prefix2.stride(1) != 1):
        raise ValueError(f"rows must have unit column stride and at most {_TRITON_MAX_K} columns, got {KA + KB}")
    y = torch.empty(M, KA + KB, dtype=FP8_DTYPE, device=h2.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=h2.device)
    _launch_quantize(prefix2, h2, y, scale, None, gelu=True)
    return y, scale


def emulate_scaled_mm(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
    per_token: bool = True,
) -> torch.Tensor:
    """The scaled_mm forward in plain fp32 (any device, no FP8 hardware): the maths the kernel must match.

    Quantizes ``x`` exactly as `FP8Linear` does, then multiplies the dequantized operands in fp32.
    Returns fp32 of shape (..., out_features).
    """
    K = x.shape[-1]
    x_fp8, s_x = quantize_activation(x.reshape(-1, K), per_token)
    y = (x_fp8.float() * s_x) @ dequantize_weight(w_fp8, w_scale, torch.float32).t()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------- the layer
class FP8Linear(nn.Module):
    """``nn.Linear`` whose weight is stored as float8_e4m3fn with a float32 scale.

    State dict: ``weight`` (fp8, the official key) and ``bias`` (bf16). ``weight_scale`` is a *non-persistent*
    buffer, shape () or (out,): the official release keeps the scales in a separate map file, so hvlab's state
    dict has the same 856 keys as the official fp8 file; `load_fp8_checkpoint` fills the scales from the map.

    ``mode="weight_only"``: dequantize to the input's dtype, then ``F.linear`` (the official behaviour).
    ``mode="scaled_mm"``: FP8 GEMM via ``torch._scaled_mm``; layers whose dims are not multiples of 16 use the
    weight-only path. This class does what it is told; the device check lives in `convert_to_fp8` / `set_fp8_mode`.
    ``model.to(dtype)`` moves an FP8Linear between devices but never casts its weight or scale: they are the format.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "weight_only",
                 per_token: bool = True, use_fast_accum: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode = mode
        self.per_token = per_token  # activation scales: one per token (True) or one per call (False)
        self.use_fast_accum = use_fast_accum  # Hopper's fast FP8 accumulation (see the note at the top)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.bfloat16, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("scaled_mm", "weight_only"):
            raise ValueError(f"FP8Linear.mode must be 'scaled_mm' or 'weight_only', got {value!r}")
        self._mode = value

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = False, mode: str = "weight_only",
                    **kwargs) -> "FP8Linear":
        """Quantize an ``nn.Linear`` (bias copied as is, in its own dtype)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode,
                    device=w.device, dtype=linear.bias.dtype if linear.bias is not None else w.dtype, **kwargs)
        w_fp8, scale = quantize_weight(w, per_channel)
        layer.weight = nn.Parameter(w_fp8, requires_grad=False)
        layer.weight_scale = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    @property
    def scaled_mm_shapes_ok(self) -> bool:
        return self.in_features % 16 == 0 and self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        if self._mode == "scaled_mm" and self.scaled_mm_shapes_ok:
            return self._forward_scaled_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], self.in_features
        x2 = x.reshape(-1, K).contiguous()  # (M, K), row-major as _scaled_mm requires
        x_fp8, s_x = quantize_activation(x2, self.per_token)
        return self.forward_fp8(x_fp8, s_x, x.dtype).reshape(*lead, self.out_features)

    def forward_fp8(self, x_fp8: torch.Tensor, s_x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The FP8 GEMM on an already quantized (M, K) input with its scale ((M, 1) or ()); returns (M, N)
        in ``dtype``. `_forward_scaled_mm` quantizes and calls it; `fused.gelu_linear` quantizes in its own pass."""
        N = self.out_features
        s_w = self.weight_scale
        rowwise = s_x.dim() > 0 or s_w.dim() > 0
        if rowwise:  # scale_a (M, 1), scale_b (1, N), float32 and contiguous; the output must be bf16
            s_x = s_x.reshape(-1, 1).expand(x_fp8.shape[0], 1).contiguous()
            s_w = s_w.reshape(1, -1).expand(1, N).contiguous()
            out_dtype = torch.bfloat16
        else:  # one scale each: 0-d float32 tensors, any float output dtype
            out_dtype = dtype
        fuse_bias = self.bias is not None and self.bias.dtype == out_dtype and out_dtype != torch.float32
        y = torch._scaled_mm(
            x_fp8, self.weight.t(),  # (M, K) @ (K, N): weight.t() is the column-major operand it wants
            scale_a=s_x, scale_b=s_w, bias=self.bias if fuse_bias else None,
            out_dtype=out_dtype, use_fast_accum=self.use_fast_accum,
        )
        y = y.to(dtype)
        if self.bias is not None and not fuse_bias:
            y = y + self.bias.to(dtype)
        return y

    def _apply(self, fn, recurse=True):
        w, s = self.weight.detach(), self.weight_scale.detach()  # aliases survive a tensor swap
        super()._apply(fn, recurse)
        if self.weight.dtype != w.dtype:  # a dtype cast (model.to(bf16)): keep the fp8 payload, follow the device
            self.weight = nn.Parameter(w.to(self.weight.device), requires_grad=False)
        if self.weight_scale.dtype != s.dtype:
            self.weight_scale = s.to(self.weight_scale.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != FP8_DTYPE:
            raise CheckpointError(
                f"{prefix}weight: FP8Linear expects a {FP8_DTYPE} weight (with its scale from the _map file), "
                f"got {w.dtype}; quantize a bf16 checkpoint with hvlab.fast.fp8.save_fp8_checkpoint or convert_to_fp8"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "per_tensor" if self.weight_scale.dim() == 0 else "per_channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self._mode}, weight_scale={kind}, activation={'per_token' if self.per_token else 'per_tensor'}")


# ------------------------------------------------------------------------------------------ whole models
def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Can ``torch._scaled_mm`` run FP8 GEMMs on this device? Returns (ok, reason in words)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type != "cuda":
        return False, f"FP8 GEMMs need a CUDA GPU, the model is on {device.type}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if torch.version.hip:
        return False, "ROCm GPUs use float8_e4m3fnuz, not the release's float8_e4m3fn"
    cc = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if cc < (8, 9):
        return False, f"FP8 tensor cores need compute capability >= 8.9 (Ada, Hopper), {name} has {cc[0]}.{cc[1]}"
    return True, f"{name} (compute capability {cc[0]}.{cc[1]}) has FP8 tensor cores"


def _resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"FP8 mode must be one of {MODES}, got {mode!r}")
    if mode == "weight_only":
        return mode
    ok, reason = fp8_supported(device)
    if ok:
        return "scaled_mm"
    warnings.warn(f"hvlab.fast.fp8: {reason}; using weight_only FP8 (bf16 math, half the weight memory, no speed-up)",
                  FP8FallbackWarning, stacklevel=3)
    return "weight_only"


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """The official rule: every nn.Linear inside double_blocks / single_blocks (320 layers for the 13B model),
    less any whose dims are not multiples of 16 (`KEPT_IN_BF16` says why the rest stays bf16)."""
    return (isinstance(module, nn.Linear) and any(p in FP8_BLOCKS for p in name.split("."))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def convert_to_fp8(model: nn.Module, mode: str = "auto", per_channel: bool = False,
                   include: Callable[[str, nn.Module], bool] = default_fp8_filter, **layer_kwargs) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` that ``include(name, module)`` selects with an `FP8Linear`
    quantized from its current weight. ``mode="auto"`` picks "scaled_mm" where `fp8_supported` says yes,
    else "weight_only" with a one-line `FP8FallbackWarning`; an explicit "scaled_mm" falls back the same way.
    ``layer_kwargs`` go to FP8Linear (``per_token``, ``use_fast_accum``). Returns ``model``.
    """
    names = [n for n, m in model.named_modules() if not isinstance(m, FP8Linear) and include(n, m)]
    if not names and not any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("convert_to_fp8 found no nn.Linear to convert: the default filter takes those inside "
                         f"{FP8_BLOCKS} with dims divisible by 16; pass include=... for other models")
    resolved = _resolve_mode(mode, _model_device(model))
    for n in names:
        _replace(model, n, FP8Linear.from_linear(model.get_submodule(n), per_channel, resolved, **layer_kwargs))
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.mode = resolved
    return model


def set_fp8_mode(model: nn.Module, mode: str = "auto", device: torch.device | str | None = None) -> str:
    """Choose the forward of every FP8Linear (e.g. after moving the model to a GPU). Returns the mode used."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers:
        raise ValueError("set_fp8_mode: the model has no FP8Linear layers; call convert_to_fp8 or load_fp8_checkpoint")
    resolved = _resolve_mode(mode, torch.device(device) if device is not None else _model_device(model))
    for m in layers:
        m.mode = resolved
    return resolved


def layer_kind(name: str) -> str:
    """A block linear's kind, its name without the block index: "double_blocks.3.img_mlp.fc1" ->
    "double.img_mlp.fc1", "single_blocks.0.linear2" -> "single.linear2" (other names are returned as they are)."""
    return re.sub(r"^(double|single)_blocks\.\d+\.", r"\1.", name)


# The adaLN modulation linears: one row per sample (no GEMM time for FP8 to save), and an error in their
# shift / scale / gate moves every token at once. 26% of the 13B model's weights.
MODULATION_KINDS = ("double.img_mod.linear", "double.txt_mod.linear", "single.modulation.linear")


def fp8_filter(model: nn.Module, keep_bf16=()) -> Callable[[str, nn.Module], bool]:
    """`default_fp8_filter` less the layer kinds in ``keep_bf16`` (see `layer_kind`; e.g. `MODULATION_KINDS`,
    or the most sensitive kinds of ``benchmarks/fp8_depth_error.py --sweep``). Unknown kinds are refused."""
    keep = set(keep_bf16)
    kinds = {layer_kind(n) for n, m in model.named_modules() if default_fp8_filter(n, m)}
    if keep - kinds:
        raise ValueError(f"keep_bf16 names layer kinds this model does not have: {sorted(keep - kinds)}; "
                         f"its FP8 layer kinds are {sorted(kinds)}")
    return lambda name, module: default_fp8_filter(name, module) and layer_kind(name) not in keep


def fp8_state_dict_filter(key: str, tensor: torch.Tensor) -> bool:
    """The state-dict twin of `default_fp8_filter`: 2-D ``.weight`` tensors inside the blocks, dims % 16 == 0."""
    return (key.endswith(".weight") and tensor.dim() == 2 and any(p in FP8_BLOCKS for p in key.split("."))
            and tensor.shape[0] % 16 == 0 and tensor.shape[1] % 16 == 0)


def save_fp8_checkpoint(state_dict_bf16: Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                        per_channel: bool = False,
                        include: Callable[[str, torch.Tensor], bool] = fp8_state_dict_filter) -> tuple[str, str]:
    """Write the official FP8 pair into ``out_dir``: ``mp_rank_00_model_states_fp8.pt`` = {"module": state dict
    with the selected weights in fp8, everything else unchanged} and ``mp_rank_00_model_states_fp8_map.pt`` =
    {module name: float32 scale}. Per-tensor scales are 0-d (the official layout); with ``per_channel`` each is
    a 1-D (out_features,) tensor, an hvlab extension. Returns (checkpoint path, map path)."""
    sd = unwrap_state_dict(dict(state_dict_bf16), "state_dict_bf16")
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.dtype == FP8_DTYPE:
            raise ValueError(f"{k} is already {FP8_DTYPE}; save_fp8_checkpoint expects a bf16/fp32 state dict")
        if include(k, v):
            out[k], scales[k[: -len(".weight")]] = quantize_weight(v, per_channel)
        else:
            out[k] = v
    if not scales:
        raise ValueError(f"save_fp8_checkpoint: no weight matched (default: 2-D .weight inside {FP8_BLOCKS})")
    os.makedirs(out_dir, exist_ok=True)
    ckpt, smap = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, MAP_NAME)
    torch.save({"module": out}, ckpt)
    torch.save(scales, smap)
    return ckpt, smap


def default_map_path(ckpt_path: str | os.PathLike) -> str:
    """The official convention: ``x_fp8.pt`` -> ``x_fp8_map.pt`` beside it."""
    root, ext = os.path.splitext(os.fspath(ckpt_path))
    return root + "_map" + ext


def make_fp8_layers(model: nn.Module, names, what: str = "checkpoint") -> nn.Module:
    """Replace each ``nn.Linear`` named in ``names`` by an empty `FP8Linear` of the same shape (scale 1), on the
    Linear's device (meta included), ready to receive a file's fp8 weight. Raises naming a name that is not a
    Linear of the model."""
    for n in sorted(names):
        try:
            m = model.get_submodule(n)
        except AttributeError as e:
            raise CheckpointError(f"{what}: the model has no module {n!r} for the fp8 weight {n}.weight") from e
        if isinstance(m, nn.Linear):
            dtype = m.bias.dtype if m.bias is not None else torch.bfloat16
            _replace(model, n, FP8Linear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device,
                                         dtype=dtype))
        elif not isinstance(m, FP8Linear):
            raise CheckpointError(f"{n}.weight is fp8 in {what} but {n} is a {type(m).__name__}, not nn.Linear")
    return model


def load_fp8_checkpoint(model: nn.Module, ckpt_path: str | os.PathLike, map_path: str | os.PathLike | None = None,
                        mode: str = "auto", device: torch.device | str | None = None) -> nn.Module:
    """Load the official FP8 pair into ``model`` (which may live on "meta": tensors are then assigned, so the
    13B model never exists in bf16). Layers whose weight is fp8 in the file become `FP8Linear`, with scales
    from the map; keys and shapes are checked strictly. Optionally moves to ``device``, then picks the mode."""
    map_path = default_map_path(ckpt_path) if map_path is None else map_path
    sd = load_state_dict_file(ckpt_path)
    fp8_map = load_state_dict_file(map_path)
    fp8_names = {k[: -len(".weight")] for k, v in sd.items() if v.dtype == FP8_DTYPE and k.endswith(".weight")}
    stray = sorted(k for k, v in sd.items() if v.dtype == FP8_DTYPE and not k.endswith(".weight"))
    if stray:
        raise CheckpointError(f"{ckpt_path}: only Linear weights may be fp8, found {stray[:5]}")
    if fp8_names != set(fp8_map):
        raise CheckpointError(
            f"{ckpt_path} and {map_path} disagree: fp8 weights without a scale "
            f"{sorted(fp8_names - set(fp8_map))[:5]}, "
            f"scales without an fp8 weight {sorted(set(fp8_map) - fp8_names)[:5]}"
        )
    make_fp8_layers(model, fp8_names, what=os.fspath(ckpt_path))
    # assign=True (meta models) keeps the file's dtypes: cast the bf16/fp32 tensors to the model's, as a copy would
    expected = model.state_dict()
    sd = {k: v.to(expected[k].dtype) if k in expected and v.dtype not in (FP8_DTYPE, expected[k].dtype) else v
          for k, v in sd.items()}
    load_into(model, sd, what=os.fspath(ckpt_path))
    for n in fp8_names:
        m = model.get_submodule(n)
        m.weight_scale = _as_scale(fp8_map[n], m.out_features, f"{map_path}[{n!r}]").to(m.weight.device)
    if device is not None:
        model.to(device)
    set_fp8_mode(model, mode)
    return model


def fp8_param_share(model: nn.Module) -> float:
    """Fraction of the parameters stored in fp8 (0.972 for the released 13B model)."""
    n8 = sum(p.numel() for p in model.parameters() if p.dtype == FP8_DTYPE)
    return n8 / max(1, sum(p.numel() for p in model.parameters()))
