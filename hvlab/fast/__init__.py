"""The speed wing: everything that makes the DiT faster or smaller, plugged in from outside.

The teaching units (``hvlab.blocks``, ``hvlab.modulation``, ``hvlab.rope``, ``hvlab.attention``, ...) hold
the reference maths and know nothing of this package. Each piece here swaps a module or a function for one
that keeps the same parameters and state-dict keys, and each has a parity test against what it replaces:

=====================  ==================================================================================
``blocks``             fast subclasses of the DiT blocks: joint q/k/v buffers, token chunking, fused kernels
``kernels``            Triton kernels: QK-norm + RoPE in one pass, GELU (+ FP8 quantiser) into a linear
``fp8``                ``FP8Linear`` / ``convert_to_fp8``, the official FP8 checkpoint pair
``memory``             the GPU memory plan and the check that runs before any weight is read
``offload``            ``on_device`` for whole models, ``BlockOffloader`` for the DiT's blocks
``parallel``           Ulysses sequence parallelism (``UlyssesDiT``)
``attention``          the blocks' ``attn_fn``: FlashAttention-3 on Hopper, cuDNN SDPA, or FP8 attention
``fp8_attention``      FP8 / INT8 attention with exact smoothing and fine scales (opt-in), its emulation
``cache``              ``StepCache``: First-Block Cache and TeaCache skip the blocks on quiet steps
=====================  ==================================================================================

One call turns them on, and one turns them off again::

    from hvlab.fast import accelerate, restore
    accelerate(dit, fused=True, chunk_tokens=16384, fp8="auto")   # what load_pipeline does on CUDA
    accelerate(dit, attention="fp8")                               # opt-in FP8 attention (an approximation)
    restore(dit)                                                   # the reference classes and attention again
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import MMDoubleStreamBlock, MMSingleStreamBlock
from ..modulation import MLP
from .attention import KINDS as ATTENTION_KINDS
from .attention import FastAttention, fa3_varlen_func, install, installed, uninstall
from .blocks import FAST_CLASSES, FastDoubleStreamBlock, FastMLP, FastSingleStreamBlock

KERNELS = {True: "auto", False: "eager", "auto": "auto", "eager": "eager", "kernel": "kernel"}
REFERENCE_CLASSES = {fast: ref for ref, fast in FAST_CLASSES.items()}


def _blocks(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (MMDoubleStreamBlock, MMSingleStreamBlock))]


def accelerate(model: nn.Module, *, fused: bool | str = True, chunk_tokens: int | None = None,
               fp8: bool | str | None = None, fp8_per_channel: bool = False, fp8_keep_bf16=(),
               attention: str | None = "auto", fp8_recipe=None) -> nn.Module:
    """Swap, in place, the DiT's blocks (and their GELU MLPs) for the fast subclasses; optionally FP8 linears.

    ``fused``: True / "auto" runs the Triton kernels where they can (CUDA, no autograd), False / "eager" their
    eager definitions, "kernel" forces the kernels (CPU tensors under ``TRITON_INTERPRET=1``: tests).
    ``chunk_tokens``: run the blocks' per-token parts that many tokens at a time (None: all at once).
    ``fp8``: None / False leaves the linears alone; True / "auto" / "scaled_mm" / "weight_only" converts the
    blocks' linears with ``fp8.convert_to_fp8`` in that mode (True means "auto").
    ``fp8_per_channel``: one weight scale per output channel; ``fp8_keep_bf16``: layer kinds left in bf16
    (``fp8.layer_kind`` names, e.g. ``fp8.MODULATION_KINDS``).
    ``attention``: every block's ``attn_fn`` becomes a ``FastAttention`` of that kind ("auto": FlashAttention-3
    for bf16 on sm90 GPUs when installed, else cuDNN SDPA / the CPU reference; "fa3"; "sdpa"; "fp8" with
    ``fp8_recipe``, default ``fp8_attention.DEFAULT_RECIPE``), installed under any Ulysses wrapper; None leaves
    ``attn_fn`` alone. Parameters and state-dict keys are unchanged (strict loading still works). Returns ``model``.
    """
    if fused not in KERNELS:
        raise ValueError(f"fused must be True, False, 'auto', 'eager' or 'kernel', got {fused!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int (e.g. 16384) or None, got {chunk_tokens!r}")
    if fp8 not in (None, False, True, "auto", "scaled_mm", "weight_only"):
        raise ValueError(f"fp8 must be None, True, 'auto', 'scaled_mm' or 'weight_only', got {fp8!r}")
    if fp8_keep_bf16 and not fp8:
        raise ValueError(f"fp8_keep_bf16 goes with fp8=..., got fp8={fp8!r} and fp8_keep_bf16={fp8_keep_bf16!r}")
    if attention is not None and attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS} or None, got {attention!r}")
    if attention == "fa3" and fa3_varlen_func() is None:
        from .attention import FA3_INSTALL

        raise ValueError(f"attention='fa3' needs FlashAttention-3: {FA3_INSTALL}")
    attn = None if attention is None else FastAttention(attention, fp8_recipe)  # validates the recipe
    if attn is None and fp8_recipe is not None:
        raise ValueError("fp8_recipe goes with attention='fp8', got attention=None")
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"accelerate found no DiT block in {type(model).__name__}: it expects a "
                         "HYVideoDiffusionTransformer (or a module holding MMDoubleStreamBlock / MMSingleStreamBlock)")
    if attn is not None:
        for m in blocks:  # refuse before changing anything
            install(m, attn, check_only=True)
        for m in blocks:  # one FastAttention shared by the blocks: one place for the setting
            install(m, attn)
    for m in blocks:
        m.__class__ = FAST_CLASSES.get(type(m), type(m))  # same object, same parameters: only the forward changes
        m.chunk_tokens = chunk_tokens
        m.kernels = KERNELS[fused]
        for mlp in m.children():
            if type(mlp) is MLP and _gelu_tanh(mlp):
                mlp.__class__ = FastMLP
    if fp8:
        from .fp8 import FP8Linear, convert_to_fp8, fp8_filter

        before = {id(m) for m in model.modules() if isinstance(m, FP8Linear)}
        convert_to_fp8(model, mode="auto" if fp8 is True else fp8, per_channel=fp8_per_channel,
                       include=fp8_filter(model, fp8_keep_bf16))
        for m in model.modules():
            if isinstance(m, FP8Linear) and id(m) not in before:
                m.converted_by_accelerate = True  # restore() turns these back into nn.Linear
    return model


def _gelu_tanh(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act", None)
    return isinstance(act, nn.GELU) and act.approximate == "tanh"


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: the reference classes again, and ``nn.Linear`` for the layers it converted to FP8
    (with the dequantised weights: the FP8 rounding itself cannot be undone). Returns ``model``."""
    for m in _blocks(model):
        uninstall(m)  # hvlab.attention.attention again, under any wrapper
    for m in model.modules():
        if type(m) in REFERENCE_CLASSES:
            m.__class__ = REFERENCE_CLASSES[type(m)]
            for attr in ("chunk_tokens", "kernels"):
                m.__dict__.pop(attr, None)
    from .fp8 import FP8Linear

    for name, m in list(model.named_modules()):
        if isinstance(m, FP8Linear) and getattr(m, "converted_by_accelerate", False):
            dtype = m.bias.dtype if m.bias is not None else torch.bfloat16
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                               dtype=dtype)
            linear.weight.data = m.dequantized_weight(dtype)
            if m.bias is not None:
                linear.bias.data = m.bias.data
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def acceleration(model: nn.Module) -> dict:
    """What ``accelerate`` set on ``model``: {"fast_blocks", "chunk_tokens", "kernels", "fp8_layers", "attention"}
    ("attention": the FastAttention kinds found under the blocks' attn_fn, e.g. ["fa3"], or [])."""
    from .fp8 import FP8Linear

    fast = [m for m in model.modules() if isinstance(m, (FastDoubleStreamBlock, FastSingleStreamBlock))]
    kinds = sorted({a.kind for a in map(installed, _blocks(model)) if a is not None})
    return {"fast_blocks": len(fast),
            "chunk_tokens": fast[0].chunk_tokens if fast else None,
            "kernels": fast[0].kernels if fast else None,
            "fp8_layers": sum(isinstance(m, FP8Linear) for m in model.modules()),
            "attention": kinds}


__all__ = ["accelerate", "restore", "acceleration", "FastDoubleStreamBlock", "FastSingleStreamBlock", "FastMLP",
           "FastAttention"]
