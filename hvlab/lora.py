"""LoRA for the DiT: low-rank adapters on its linears, fused or not, and the file layouts people share.

A LoRA adapter (Hu et al., 2021) keeps a weight W (out, in) frozen and learns a low-rank update of it:

    W' = W + s * (alpha / r) * B @ A          A (r, in) "down", B (out, r) "up", rank r << min(in, out)

``s`` is the user's scale (0 switches the adapter off, 1 applies it as trained); alpha / r is the file's own
scale (kohya stores alpha, diffusers / PEFT files assume alpha = r). B starts at zero, so a new adapter starts
as the identity, and a layer gains r * (in + out) parameters instead of in * out.

**Layers.** `LoRALinear` takes the place of an ``nn.Linear`` or `FP8Linear` (a module swapped in from outside,
like `convert_to_fp8`) and adds the update as a side branch: base(x) + s (alpha/r) B (A x). Its state dict is the
base layer's, under the same keys, so an adapted model still saves and loads the official checkpoint strictly;
adapters are written by `save_lora`. Several adapters can sit on one layer, each with its own scale.
`fuse_lora` folds adapters into the weight (no side branch left to run) and keeps the original weight tensor,
so `unfuse_lora` and `remove_lora` restore it bit for bit instead of subtracting.

**Fused linears.** The official DiT computes q, k, v with one linear (``img_attn_qkv`` / ``txt_attn_qkv``, rows
[q | k | v]) and the single blocks' ``linear1`` gives [q | k | v | mlp]. Tools that train on the official model
(kohya / musubi-tuner, diffusion-pipe) give the fused layer one adapter (one A, a B with all the rows); diffusers
trains separate ``to_q``, ``to_k``, ``to_v`` (and ``proj_mlp``) adapters. Both land on the fused layer here: an
adapter is a list of `LoRAPart`, each updating a block of rows (`fused_row_blocks`), with its own A and B.

**File layouts** (key names checked against each project's own code, 2026-12):

| layout | example keys | scale alpha / r |
|---|---|---|
| diffusers / PEFT | ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, ``...lora_B.weight`` (q/k/v split) | alpha = r, or the file's ``lora_adapter_metadata`` / ``adapter_config.json`` |
| kohya / musubi-tuner | ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``...lora_up.weight``, ``...alpha`` | from ``.alpha`` |
| official names (ComfyUI, diffusion-pipe) | ``diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight``, or ``transformer.`` + official names | from ``.alpha`` if present, else 1 |

`save_lora` writes the diffusers / PEFT layout with alpha / r folded into lora_B, so any reader that assumes
alpha = r gets the same W'. Names map through `hvlab.checkpoint.DIT_KEY_RULES`, the table the DiT loader uses.

**FP8: a bf16 side branch, measured.** On an `FP8Linear` the update runs beside the FP8 GEMM, in bf16, so the
model moves by exactly the update. Fusing would re-quantise W + update to e4m3, whose steps (6-12% of each
weight) are coarser than a typical update. ``benchmarks/lora_fp8.py`` (13B qkv shape, rank 16, update of 1% of
||W||): the side branch leaves the output error at the FP8 weights' own 2.65% and keeps the update to 0.4%;
fused into the FP8 weights the output error grows to 2.79% and the update comes through with an 86% error
(26% for an update of 10% of ||W||).
`fuse_lora` on FP8 layers is therefore allowed but lossy; `unfuse_lora` still restores the FP8 bytes exactly.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CheckpointError, diffusers_module_rule, fused_row_blocks, load_state_dict_file,
                         official_module_rule, save_safetensors)
from .fast.fp8 import FP8Linear, dequantize_weight, quantize_weight

# musubi-tuner's default for HunyuanVideo: every linear of the double and single blocks except the modulation.
DEFAULT_TARGETS = ("double_blocks.*_attn_qkv", "double_blocks.*_attn_proj", "double_blocks.*_mlp.fc*",
                   "single_blocks.*.linear1", "single_blocks.*.linear2")


class LoRAFactor(NamedTuple):
    """One low-rank update as stored in a file: rows[0]:rows[1] of the weight += (alpha / r) * B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (rows[1] - rows[0], r)
    alpha: float
    rows: tuple[int, int]


class LoRAPart(nn.Module):
    """A trainable (or loaded) A, B pair for one block of rows of a linear's output."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float, rows: tuple[int, int]):
        super().__init__()
        self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)  # (r, in), (rows, r)
        self.alpha, self.rows = float(alpha), tuple(rows)

    @property
    def scaling(self) -> float:
        return self.alpha / self.lora_A.shape[0]

    def forward(self, x: torch.Tensor, scale: float, out_features: int) -> torch.Tensor:
        """s (alpha/r) B (A x) for x (..., in), zero-padded to (..., out_features) outside this part's rows."""
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * (scale * self.scaling)
        a, b = self.rows
        return F.pad(h, (a, out_features - b)) if (a, b) != (0, out_features) else h

    def delta_weight(self, out_features: int) -> torch.Tensor:
        """(alpha/r) B @ A in float32, placed in its rows of an (out, in) zero matrix."""
        d = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        a, b = self.rows
        return F.pad(d, (0, 0, a, out_features - b))

    def factor(self) -> LoRAFactor:
        return LoRAFactor(self.lora_A.detach(), self.lora_B.detach(), self.alpha, self.rows)

    def _load_from_state_dict(self, *args, **kwargs):
        pass  # adapters are not in the model's checkpoint (LoRALinear.state_dict is the base's): load_lora reads them


class LoRALinear(nn.Module):
    """``base(x) + sum over adapters of s * (alpha/r) * B @ A x``, for an nn.Linear or FP8Linear ``base``.

    State-dict keys are the base layer's own (``...img_attn_qkv.weight``, not ``...base.weight``).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, (nn.Linear, FP8Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or FP8Linear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()  # adapter name -> nn.ModuleList of LoRAPart
        self.scales: dict[str, float] = {}
        self.fused: list[str] = []  # adapters folded into base's weight, in the order they were fused
        self._original: dict | None = None  # base's own weight (and FP8 scale) while anything is fused
        self.register_load_state_dict_pre_hook(_base_keys_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, parts in self.adapters.items():
            if self.scales[name] != 0 and name not in self.fused:
                for part in parts:
                    y = y + part(x, self.scales[name], self.out_features).to(y.dtype)
        return y

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.base.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    # --- fusing: the weight is always recomputed from the kept original, never by subtraction ---------------
    def set_fused(self, names: list[str]) -> None:
        """Fold exactly the adapters ``names`` into the weight (in that order); [] restores the original."""
        if self._original is None and names:
            self._original = dict(module=self.base, weight=self.base.weight,
                                  scale=getattr(self.base, "weight_scale", None))
        if self._original is not None and self._original["module"] is not self.base:
            raise RuntimeError("the base layer was replaced (e.g. by convert_to_fp8) while adapters were fused "
                               "into it; unfuse before swapping the layer, then fuse again")
        self.fused = list(names)
        if not names:
            if self._original is not None:
                self.base.weight = self._original["weight"]  # the very tensor: bit-identical
                if isinstance(self.base, FP8Linear):
                    self.base.weight_scale = self._original["scale"]
            self._original = None
            return
        w0, s0 = self._original["weight"], self._original["scale"]
        w = dequantize_weight(w0, s0, torch.float32) if isinstance(self.base, FP8Linear) else w0.detach().float()
        for n in names:
            w = w + self.scales[n] * sum(p.delta_weight(self.out_features).to(w.device) for p in self.adapters[n])
        if isinstance(self.base, FP8Linear):  # re-quantised: lossy, see the module docstring
            w8, s = quantize_weight(w, per_channel=s0.dim() > 0)
            self.base.weight, self.base.weight_scale = nn.Parameter(w8, requires_grad=False), s.to(s0.device)
        else:
            self.base.weight = nn.Parameter(w.to(w0.dtype), requires_grad=w0.requires_grad)


def _base_keys_in(module, state_dict, prefix, *args):
    """Load hook: ``prefix + "weight"`` -> ``prefix + "base.weight"`` (the keys `LoRALinear.state_dict` writes)."""
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


# ----------------------------------------------------------------------------------------- the model side
def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear a LoRA can target, by official name: nn.Linear, FP8Linear or an existing LoRALinear."""
    out, inside = {}, set()
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue  # the base layer inside a LoRALinear
        if isinstance(m, LoRALinear):
            inside.add(name)
        if isinstance(m, (nn.Linear, FP8Linear, LoRALinear)):
            out[name] = m
    return out


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's `LoRALinear` layers by official name (the layers holding at least one adapter)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    m = model.get_submodule(name)
    if isinstance(m, LoRALinear):
        return m
    parent, _, child = name.rpartition(".")
    wrapped = LoRALinear(m)
    setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return wrapped


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be an identifier such as 'still' (it names submodules), got {name!r}")
    if any(name in m.adapters for m in lora_layers(model).values()):
        raise ValueError(f"the model already has an adapter named {name!r}; remove_lora(model, {name!r}) first "
                         f"or pick another name")


def _adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for m in lora_layers(model).values() for n in m.adapters))


def _layers_of(model: nn.Module, name: str | None) -> list[LoRALinear]:
    """The layers holding adapter ``name`` (any adapter when None), refusing a name the model does not have."""
    names = _adapter_names(model)
    if name is not None and name not in names:
        raise KeyError(f"no adapter named {name!r} on this model; it has {names or 'none'}")
    return [m for m in lora_layers(model).values() if name is None or name in m.adapters]


def _check_factors(module: str, factors: list[LoRAFactor], linears: Mapping, what: str) -> None:
    if module not in linears:
        raise KeyError(f"{what}: {module!r} is not a linear layer of this model; official names look like "
                       f"{list(linears)[:3]}")
    layer = linears[module]
    for f in factors:
        r, (a, b) = f.A.shape[0], f.rows
        if (f.A.dim() != 2 or f.A.shape[1] != layer.in_features or tuple(f.B.shape) != (b - a, r)
                or not 0 <= a < b <= layer.out_features):
            raise ValueError(f"{what}: {module} ({layer.in_features} -> {layer.out_features}) needs A (r, "
                             f"{layer.in_features}) and B (rows, r) on rows inside 0:{layer.out_features}; got A "
                             f"{tuple(f.A.shape)}, B {tuple(f.B.shape)}, rows {a}:{b}")


def attach_lora(model: nn.Module, name: str, factors: Mapping[str, list[LoRAFactor]], scale: float = 1.0,
                dtype: torch.dtype | None = None) -> str:
    """Put ``factors`` ({official module name: [LoRAFactor]}, as `read_lora` returns) on the model as adapter
    ``name``. Parameters take ``dtype``, by default the layer's compute dtype (bf16 beside an FP8 weight)."""
    _check_new_name(model, name)
    linears = _linears(model)
    for module, fs in factors.items():
        _check_factors(module, fs, linears, "factors")
    for module, fs in factors.items():
        layer = _wrap(model, module)
        base = layer.base
        dt = dtype or (base.weight.dtype if isinstance(base, nn.Linear) else
                       base.bias.dtype if base.bias is not None else torch.bfloat16)
        dev = base.weight.device
        layer.adapters[name] = nn.ModuleList(
            [LoRAPart(f.A.detach().to(dev, dt).clone(), f.B.detach().to(dev, dt).clone(), f.alpha, f.rows) for f in fs])
        layer.scales[name] = float(scale)
    return name


def add_lora(model: nn.Module, name: str, rank: int = 4, alpha: float | None = None,
             targets=DEFAULT_TARGETS, split_fused: bool = False, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> list[str]:
    """A new trainable adapter on every linear whose official name matches a pattern of ``targets``
    (fnmatch, e.g. "single_blocks.*.linear1"). A ~ U(+-1/sqrt(in)) (nn.Linear's default init), B = 0, so the
    model is unchanged until trained. ``split_fused`` gives fused qkv / linear1 one part per q, k, v (and mlp)
    block, as diffusers trains them, instead of one adapter over all rows. Returns the adapted module names."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int (e.g. 4), got {rank!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    chosen = [n for n in _linears(model) if any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not chosen:
        raise ValueError(f"no linear layer matches targets {targets}; official names look like "
                         f"{list(_linears(model))[:4]}")
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n in chosen:
        m = model.get_submodule(n)
        rule = official_module_rule(n)
        blocks = fused_row_blocks(rule[1] if rule and split_fused else "same", m.out_features, m.in_features)
        bound = 1 / math.sqrt(m.in_features)
        factors[n] = [LoRAFactor((torch.rand(rank, m.in_features, generator=g) * 2 - 1) * bound,
                                 torch.zeros(b - a, rank), alpha if alpha is not None else rank, (a, b))
                      for a, b in blocks]
    attach_lora(model, name, factors, dtype=dtype)
    return chosen


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The A and B tensors of adapter ``name``: what an optimizer trains (the base weights stay frozen)."""
    return [p for m in _layers_of(model, name) for p in m.adapters[name].parameters()]


def lora_factors(model: nn.Module, name: str) -> dict[str, list[LoRAFactor]]:
    """Adapter ``name`` as {official module name: [LoRAFactor]} (what `save_lora` writes)."""
    return {n: [p.factor() for p in m.adapters[name]] for n, m in lora_layers(model).items() if name in m.adapters}


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Scale adapter ``name`` (0 = off, 1 = as trained); a fused adapter's weight is recomputed."""
    for m in _layers_of(model, name):
        m.scales[name] = float(scale)
        if name in m.fused:
            m.set_fused(m.fused)


def fuse_lora(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (every adapter when None) into the weights; the originals are kept for unfusing."""
    for m in _layers_of(model, name):
        m.set_fused(m.fused + [n for n in m.adapters if (name is None or n == name) and n not in m.fused])


def unfuse_lora(model: nn.Module, name: str | None = None) -> None:
    """Undo `fuse_lora`: the weight is rebuilt from the kept original (bit-identical once nothing is fused)."""
    for m in _layers_of(model, name):
        m.set_fused([n for n in m.fused if name is not None and n != name])


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Delete adapter ``name`` (all when None). A layer left without adapters is replaced by its original module."""
    _layers_of(model, name)  # refuses an unknown name
    for layer_name, m in list(lora_layers(model).items()):
        if name is not None and name not in m.adapters:
            continue
        m.set_fused([n for n in m.fused if name is not None and n != name])
        for n in [n for n in m.adapters if name is None or n == name]:
            del m.adapters[n], m.scales[n]
        if not m.adapters:
            parent, _, child = layer_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base)


# ------------------------------------------------------------------------------------------------ files
# <module>.lora_A.weight / lora_B.weight (PEFT), <module>.lora_down[.i].weight / lora_up[.i].weight (kohya; .i
# numbers musubi-tuner's split-q/k/v variant), <module>.alpha (kohya; optional with official names).
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<i>\d+))?\.weight|(?P<alpha>alpha))$")
_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")  # diffusers, ComfyUI / musubi, a PEFT folder
_KOHYA = "lora_unet_"
PEFT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # PEFT folder, diffusers folder


def _peft_alpha(config: Mapping | None, what: str):
    """A PEFT / diffusers LoraConfig (a folder's adapter_config.json, or a file's "lora_adapter_metadata")
    -> a function (diffusers module name, rank) -> alpha; None without a config (then alpha = r)."""
    if not config:
        return None
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("use_dora"):
        raise CheckpointError(f"{what}: a DoRA adapter (use_dora=True); hvlab applies plain LoRA only")
    alpha, patterns, rs = config.get("lora_alpha"), config.get("alpha_pattern") or {}, config.get("use_rslora")

    def module_alpha(module: str, rank: int) -> float:
        a = next((v for k, v in patterns.items() if module == k or module.endswith("." + k)), alpha)
        a = float(rank if a is None else a)
        return a * math.sqrt(rank) if rs else a  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r

    return module_alpha


def _read_source(source, what: str) -> tuple[dict[str, torch.Tensor], Mapping | None]:
    """A file, a PEFT / diffusers folder or an in-memory dict -> (tensors, LoraConfig dict or None)."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = os.fspath(source)
    config_path = os.path.join(path, "adapter_config.json")
    if os.path.isdir(path):
        names = [n for n in PEFT_FILES if os.path.exists(os.path.join(path, n))]
        if not names:
            raise CheckpointError(f"{path}: a LoRA folder must hold one of {PEFT_FILES}")
        path = os.path.join(path, names[0])
    config = json.load(open(config_path)) if os.path.exists(config_path) else None  # a PEFT folder's
    if config is None and path.endswith(".safetensors"):
        raw = lora_metadata(path).get("lora_adapter_metadata")  # written by diffusers' save_lora_* since 0.35
        config = json.loads(raw) if raw else None
    return load_state_dict_file(path), config


def read_lora(source, model: nn.Module) -> tuple[dict[str, list[LoRAFactor]], str]:
    """Read a LoRA file (any layout of the module docstring), folder or state dict against ``model``.

    Returns ({official module name: [LoRAFactor]}, layout); split q/k/v (and proj_mlp) adapters become factors
    on their rows of the fused official linear. Unknown keys, layers the model does not have and shapes that do
    not fit are refused with the keys named.
    """
    what = "state dict" if isinstance(source, Mapping) else os.fspath(source)
    sd, config = _read_source(source, what)
    module_alpha = _peft_alpha(config, what)
    raw: dict[str, dict] = {}
    bad = []
    for key, t in sd.items():
        m = _KEY.match(key)
        if not m:
            bad.append(key)
            continue
        g = raw.setdefault(m["module"], {"A": {}, "B": {}, "alpha": None})
        if m["alpha"]:
            g["alpha"] = float(t)
        else:
            g["A" if m["ab"] in ("lora_A", "lora_down") else "B"][int(m["i"] or 0)] = t
    if bad:
        raise CheckpointError(
            f"{what}: {len(bad)} keys are not LoRA weights (first: {bad[:5]}). Expected <module>.lora_A.weight / "
            f".lora_B.weight (diffusers, PEFT), or <module>.lora_down.weight / .lora_up.weight / .alpha (kohya); "
            f"DoRA, LoHa, LoKr and bias adapters are not supported")
    linears = _linears(model)
    kohya_names = {n.replace(".", "_"): n for n in linears}
    factors: dict[str, list[LoRAFactor]] = {}
    layouts, unplaced = set(), []
    for module, g in raw.items():
        placed = _place(module, linears, kohya_names)
        if placed is None:
            unplaced.append(module)
            continue
        official, layout, rule = placed
        layouts.add(layout)
        layer = linears[official]
        if not g["A"] or sorted(g["A"]) != sorted(g["B"]):
            raise CheckpointError(f"{what}: {module} needs both its down (lora_A) and up (lora_B) weights, found "
                                  f"down {sorted(g['A'])} and up {sorted(g['B'])}")
        part, how = (rule[1], rule[3]) if rule else (0, "same")
        lo, hi = fused_row_blocks(how, layer.out_features, layer.in_features)[part]
        start = lo
        for i in sorted(g["A"]):  # kohya's split variant: consecutive row blocks
            A, B = g["A"][i], g["B"][i]
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or B.shape[1] != A.shape[0]:
                raise CheckpointError(
                    f"{what}: {module}: expected down (r, {layer.in_features}) and up (rows, r) for {official} "
                    f"({layer.in_features} -> {layer.out_features}), got down {tuple(A.shape)}, up {tuple(B.shape)}")
            r = A.shape[0]
            alpha = g["alpha"] if g["alpha"] is not None else (
                module_alpha(module.removeprefix("base_model.model."), r) if module_alpha else r)
            if how == "swap":  # diffusers' norm_out reads (scale, shift), the official final layer (shift, scale)
                B = torch.cat(B.chunk(2, dim=0)[::-1])
            factors.setdefault(official, []).append(LoRAFactor(A, B, alpha, (start, start + B.shape[0])))
            start += B.shape[0]
        if start != hi:
            raise CheckpointError(f"{what}: {module}: its up weights have {start - lo} rows; {official} rows "
                                  f"{lo}:{hi} ({hi - lo} rows) are what {module} maps to")
    if unplaced:
        raise CheckpointError(
            f"{what}: {len(unplaced)} adapted layers are not linear layers of this model (first: {unplaced[:5]}). "
            f"Official names look like {list(linears)[:3]}, diffusers names like 'transformer_blocks.0.attn.to_q' "
            f"(prefixes {_PREFIXES} or kohya's {_KOHYA!r} are stripped)")
    if not factors:
        raise CheckpointError(f"{what}: no LoRA weights found")
    return factors, "+".join(sorted(layouts))


def _place(module: str, linears: Mapping, kohya_names: Mapping):
    """A file's module name -> (official linear, layout, diffusers rule or None), or None if the model lacks it."""
    if module.startswith(_KOHYA):
        name = kohya_names.get(module[len(_KOHYA):])
        return (name, "kohya", None) if name else None
    body = next((module[len(p):] for p in _PREFIXES if module.startswith(p)), module)
    if body in linears:
        return body, "official", None
    rule = diffusers_module_rule(body)
    if rule is not None and rule[0] in linears:
        return rule[0], "diffusers", rule
    return None


def load_lora(model: nn.Module, source, name: str | None = None, scale: float = 1.0,
              dtype: torch.dtype | None = None) -> str:
    """Read ``source`` (`read_lora`) and attach it to ``model`` as adapter ``name`` (default: the file's stem,
    else "default") at ``scale``. Returns the adapter name."""
    factors, _ = read_lora(source, model)
    if name is None:
        stem = "default" if isinstance(source, Mapping) else os.path.basename(os.fspath(source).rstrip("/"))
        name = re.sub(r"\W", "_", stem.split(".")[0]) or "default"
        name = name if name.isidentifier() else "lora_" + name
    return attach_lora(model, name, factors, scale, dtype)


def lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` in the diffusers / PEFT layout: ``transformer.<diffusers module>.lora_A.weight`` and
    ``.lora_B.weight``, with alpha / r folded into lora_B (PEFT reads a file without metadata as alpha = r).

    A factor over a fused official weight is cut into the row blocks of its diffusers modules (A shared);
    factors that land on the same diffusers module are joined along the rank ([B1 B2] @ [A1; A2] = B1 A1 + B2 A2).
    """
    linears = _linears(model)
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, fs in lora_factors(model, name).items():
        rule = official_module_rule(module)
        if rule is None:
            raise ValueError(f"{module} has no diffusers name in hvlab.checkpoint.DIT_KEY_RULES; save_lora writes "
                             f"the diffusers layout of the HunyuanVideo DiT only")
        names, how = rule
        layer = linears[module]
        blocks = fused_row_blocks(how, layer.out_features, layer.in_features)
        for f in fs:
            B = torch.zeros(layer.out_features, f.A.shape[0])  # (out, r) in official row order, fp32
            B[f.rows[0]:f.rows[1]] = f.B.float() * (f.alpha / f.A.shape[0])
            if how == "swap":
                B = torch.cat(B.chunk(2, dim=0)[::-1])
            for dm, (a, b) in zip(names, blocks):
                if how == "swap" or (f.rows[0] < b and a < f.rows[1]):  # the factor reaches these rows
                    pairs.setdefault(dm, []).append((f.A, B[a:b].to(f.A.dtype)))
    return {f"transformer.{dm}.lora_{ab}.weight": torch.cat(t, dim=int(ab == "B")).clone()
            for dm, ps in pairs.items() for ab, t in zip("AB", zip(*ps))}


def save_lora(model: nn.Module, path: str | os.PathLike, name: str, dtype: torch.dtype | None = None,
              metadata: Mapping[str, str] | None = None) -> str:
    """Write adapter ``name`` as a diffusers / PEFT ``.safetensors`` file (`lora_state_dict`), atomically.
    ``dtype`` casts the tensors (e.g. torch.float16 to halve the file); ``metadata`` adds string entries."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_lora writes safetensors; give a path ending in .safetensors, got {path!r}")
    sd = lora_state_dict(model, name)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    meta = {"format": "pt", "hvlab_adapter": name, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    tmp = path + ".tmp"
    save_safetensors(sd, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a LoRA safetensors file (what `save_lora` wrote, or another tool)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})
