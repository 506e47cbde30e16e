"""Reading checkpoint files safely, and matching their keys against a model.

The official loader calls ``torch.load`` without ``weights_only``, which unpickles arbitrary
objects: a downloaded ``.pt`` file could run code. hvlab always loads pickles with
``weights_only=True`` and refuses, with an explanation, a file that needs more than tensors,
dicts, lists and numbers.
"""
from __future__ import annotations

import glob
import math
import os
import pickle
import zipfile
from typing import Iterable, Iterator, Mapping

import torch

# Top-level keys under which official and common checkpoints nest their weights, in the order
# the official loader looks for them ("module" for DeepSpeed-style files, "ema" for EMA weights).
WRAPPER_KEYS = ("module", "ema", "state_dict", "model")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely or does not fit the model."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_PICKLE_MAGIC = b"\x80"  # the legacy format starts with a protocol-2+ pickle


def _check_file(path: str, what: str) -> int:
    """The file's size; a missing path, a folder or an empty file is refused naming the path."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} not found: {path!r}")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} is a folder; expected a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes): the download or copy did not finish; "
                              f"fetch the file again")
    return size


def read_torch_file(path, what: str = "checkpoint") -> object:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the format allows), with the failures told
    apart and named with the path: not a torch file, truncated or damaged, or holding objects that unpickling
    could run code for (refused)."""
    path = os.fspath(path)
    size = _check_file(path, what)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):  # the archive's directory sits at its end
        raise CheckpointError(f"{what} {path!r} ({size:,} bytes) is truncated: it starts as a torch zip archive but its "
                              f"end (the archive's directory) is missing; the download or copy did not finish, fetch "
                              f"the file again")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(f"{what} {path!r} is not a torch file: it starts with the bytes {head!r}, not a torch "
                              f"zip archive ({_ZIP_MAGIC!r}) or a pickle ({_PICKLE_MAGIC!r}); is it another format "
                              f"(.safetensors, .bin) or a web page saved instead of the file?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head == _ZIP_MAGIC)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "was not an allowed global" in text:
            raise _refuse(path, e) from None
        raise CheckpointError(f"{what} {path!r} ({size:,} bytes) is damaged or not a torch checkpoint: its "
                              f"pickle cannot be read ({_torch_reason(text)}); fetch the file again") from None
    except (EOFError, RuntimeError, KeyError, ValueError, AttributeError, TypeError, OSError) as e:
        text = str(e) or type(e).__name__
        if "zip archive" in text or "central directory" in text or isinstance(e, EOFError):
            raise CheckpointError(f"{what} {path!r} ({size:,} bytes) is truncated or damaged (torch: "
                                  f"{_torch_reason(text)}): the download or copy did not finish; fetch the file "
                                  f"again") from None
        raise CheckpointError(f"{what} {path!r} cannot be read as a torch file ({type(e).__name__}: "
                              f"{_torch_reason(text)})") from None


def _refuse(path: str, err: Exception) -> CheckpointError:
    detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), str(err).splitlines()[0])
    return CheckpointError(
        f"refusing to load {path!r}: it holds objects other than tensors and plain containers, "
        f"and unpickling those could run code from the file (torch.load weights_only=True said: "
        f"{detail[:300]}). If you trust the file, convert it once to safetensors "
        f"yourself, e.g. safetensors.torch.save_file(torch.load(path, weights_only=False)['module'], "
        f"'model.safetensors'), then load that."
    )


def _torch_reason(text: str) -> str:
    """The informative part of torch's message: an "Unsupported ..." line, else its first sentence."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Unsupported") or "error: Unsupported" in ln:
            return ln[:200]
    return (lines[0].split(". ")[0][:200] if lines else "no detail").rstrip(".")


def read_safetensors_file(path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with an empty, truncated or foreign file refused naming the path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    size = _check_file(path, what)
    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{what} {path!r} ({size:,} bytes) is not a complete safetensors file ({e}): it is "
                              f"truncated, damaged or another format; fetch the file again") from None


def unwrap_state_dict(obj: object, path: str = "<object>", prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Find the flat ``{name: tensor}`` dict inside a loaded checkpoint object.

    Looks under ``WRAPPER_KEYS`` (``"module"`` first, as the official loader does), and strips
    ``prefix`` (e.g. ``"vae."``) from keys that carry it.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    sd = obj
    for _ in range(2):  # e.g. {"state_dict": {"module": ...}} is unwrapped twice at most
        if sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        for key in WRAPPER_KEYS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
        else:
            break
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: expected the weights as a flat dict of tensors (possibly under one of "
            f"{WRAPPER_KEYS}); found non-tensor entries such as {bad[:5]}"
        )
    out = dict(sd)
    if prefix:
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in out.items()}
    return out


def load_state_dict_file(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Load weights from a ``.safetensors`` file, a torch pickle, or a directory of either.

    A directory may hold ``*.safetensors`` files or ``pytorch_model_*.pt`` shards (the official
    layout); their dicts are merged. Pickles load with ``weights_only=True``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            files = sorted(glob.glob(os.path.join(path, "pytorch_model_*.pt")))
        if not files:
            files = sorted(glob.glob(os.path.join(path, "*.pt")) + glob.glob(os.path.join(path, "*.pth")))
        if not files:
            raise CheckpointError(
                f"{path}: no checkpoint found; expected *.safetensors, pytorch_model_*.pt or "
                f"mp_rank_00_model_states.pt in this folder"
            )
        merged: dict[str, torch.Tensor] = {}
        for f in files:
            merged.update(load_state_dict_file(f, prefix=prefix))
        return merged
    if path.endswith(".safetensors"):
        return unwrap_state_dict(read_safetensors_file(path), path, prefix)
    return unwrap_state_dict(read_torch_file(path), path, prefix)


def check_state_dict_keys(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str = "checkpoint", show: int = 5
) -> None:
    """Raise a `CheckpointError` naming the first missing/unexpected keys and shape mismatches."""
    exp, have = set(expected), set(got)
    missing = sorted(exp - have)
    unexpected = sorted(have - exp)
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}"
        for k in sorted(exp & have)
        if tuple(expected[k].shape) != tuple(got[k].shape)
    ]
    msgs = []
    if missing:
        msgs.append(f"{len(missing)} missing keys (first: {missing[:show]})")
    if unexpected:
        msgs.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:show]})")
    if shapes:
        msgs.append(f"{len(shapes)} shape mismatches (first: {shapes[:show]})")
    if msgs:
        raise CheckpointError(
            f"{what} does not match the model ({len(exp)} tensors expected, {len(have)} found): " + "; ".join(msgs)
        )


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint",
              strict: bool = True) -> torch.nn.Module:
    """``model.load_state_dict`` with hvlab's key check first, so errors name what was expected."""
    if strict:
        check_state_dict_keys(model.state_dict(), state_dict, what)
    model.load_state_dict(dict(state_dict), strict=strict, assign=any(p.is_meta for p in model.parameters()))
    return model


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Save contiguous copies of the tensors (safetensors refuses shared or strided storage)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata=metadata)




# --- lazy reading: headers first, tensors memory-mapped, assigned into a model built on the meta device -----------
#
# A .safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the raw
# bytes. safetensors' safe_open memory-maps the file: get_tensor returns a tensor whose storage *is* the file's
# pages (nothing is read until it is touched), and the mapping lives until the last such tensor is gone. So a
# tensor assigned as it is costs no copy, and one that is converted (dtype, device, fused) is read once and let go.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
WINDOW_BYTES = 256 << 20  # tensors read per mapping: windows whose tensors were copied are released one by one


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]],
                                                              dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` of a .safetensors file, reading only its header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            tensors = {}
            for k in f.keys():
                s = f.get_slice(k)
                tensors[k] = (SAFETENSORS_DTYPES[s.get_dtype()], tuple(s.get_shape()))
            return tensors, dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable .safetensors file ({e})") from e


def iter_safetensors(files: Iterable[str | os.PathLike], window_bytes: int = WINDOW_BYTES
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each file in turn, memory-mapped, ~``window_bytes`` per mapping (see the note above)."""
    from safetensors import safe_open

    for path in files:
        header, _ = read_safetensors_header(path)
        windows, size = [[]], 0
        for name, (dtype, shape) in header.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if windows[-1] and size + nbytes > window_bytes:
                windows.append([])
                size = 0
            windows[-1].append(name)
            size += nbytes
        for names in windows:
            with safe_open(os.fspath(path), framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)


def meta_tensors(header: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Stand-ins on the meta device with a header's dtypes and shapes: conversions run on them for free."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in header.items()}


def assign_tensors(model: torch.nn.Module, items: Iterable[tuple[str, torch.Tensor]], what: str = "checkpoint",
                   device=None, dtype: torch.dtype | None = None, copy: bool = False) -> torch.nn.Module:
    """Put each (name, tensor) into ``model`` (typically built on the meta device) as it arrives, strictly.

    Floating tensors are cast to ``dtype`` (None: kept as stored, FP8 outside an FP8 layer upcast to bf16) and
    moved to ``device``; a tensor already right is assigned as it is (a memory-mapped one stays mapped, no copy)
    unless ``copy``: then every tensor is copied, so no file stays mapped (worth it when part of the tensors is
    copied anyway, as when diffusers' q, k, v are fused: else those windows' pages would stay counted too).
    FP8 entries (`hvlab.fast.fp8.FP8Linear` weights) must arrive in FP8. Missing, unexpected and misshapen
    entries raise a `CheckpointError` naming them; call `check_state_dict_keys` on meta stand-ins first to
    fail before reading anything.
    """
    expected = model.state_dict(keep_vars=True)
    got: dict[str, torch.Tensor] = {}
    for name, t in items:
        e = expected.get(name)
        got[name] = torch.empty(t.shape, device="meta")
        if e is None or tuple(e.shape) != tuple(t.shape):
            continue  # reported below, with every other mismatch
        if e.dtype.is_floating_point and e.dtype.itemsize == 1:
            if t.dtype != e.dtype:
                raise CheckpointError(f"{what}: {name} belongs to an FP8 layer and must be {e.dtype}, got {t.dtype}")
            target = e.dtype
        elif t.dtype.is_floating_point:  # an fp8 tensor outside an FP8 layer is upcast (exactly) to compute in
            target = dtype or (torch.bfloat16 if t.dtype.itemsize == 1 else t.dtype)
        else:
            target = t.dtype
        t = t.to(device=device if device is not None else (t.device if e.is_meta else e.device), dtype=target,
                 copy=copy)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[leaf] = t
    check_state_dict_keys(expected, got, what)
    return model


# --- the HunyuanVideo DiT: official <-> diffusers key layouts ----------------------------------------------
#
# diffusers' HunyuanVideoTransformer3DModel stores the same numbers under other names, and unfuses three
# kinds of fused linear: qkv -> to_q/to_k/to_v (refiner and double blocks; the text stream's become
# add_q_proj/add_k_proj/add_v_proj), and the single blocks' linear1 -> to_q/to_k/to_v/proj_mlp. Its final
# norm_out reads the modulation as (scale, shift) where the official final layer reads (shift, scale).
# The table was derived by listing the state-dict keys of both models at a tiny config.

_RB = "context_embedder.token_refiner.refiner_blocks.{i}."
_DB = "transformer_blocks.{i}."
_SB = "single_transformer_blocks.{i}."

# (official module, diffusers module(s), how): "same" = rename, "qkv" = split in 3 equal parts along the
# output dim, "qkv_mlp" = split into [D, D, D, mlp_hidden], "swap" = exchange the two halves of the output dim.
DIT_KEY_RULES: list[tuple[str, list[str], str]] = [
    ("img_in.proj", ["x_embedder.proj"], "same"),
    ("txt_in.input_embedder", ["context_embedder.proj_in"], "same"),
    ("txt_in.t_embedder.mlp.0", ["context_embedder.time_text_embed.timestep_embedder.linear_1"], "same"),
    ("txt_in.t_embedder.mlp.2", ["context_embedder.time_text_embed.timestep_embedder.linear_2"], "same"),
    ("txt_in.c_embedder.linear_1", ["context_embedder.time_text_embed.text_embedder.linear_1"], "same"),
    ("txt_in.c_embedder.linear_2", ["context_embedder.time_text_embed.text_embedder.linear_2"], "same"),
    ("txt_in.individual_token_refiner.blocks.{i}.norm1", [_RB + "norm1"], "same"),
    ("txt_in.individual_token_refiner.blocks.{i}.norm2", [_RB + "norm2"], "same"),
    ("txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv",
     [_RB + "attn.to_q", _RB + "attn.to_k", _RB + "attn.to_v"], "qkv"),
    ("txt_in.individual_token_refiner.blocks.{i}.self_attn_proj", [_RB + "attn.to_out.0"], "same"),
    ("txt_in.individual_token_refiner.blocks.{i}.mlp.fc1", [_RB + "ff.net.0.proj"], "same"),
    ("txt_in.individual_token_refiner.blocks.{i}.mlp.fc2", [_RB + "ff.net.2"], "same"),
    ("txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1", [_RB + "norm_out.linear"], "same"),
    ("time_in.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], "same"),
    ("time_in.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], "same"),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], "same"),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], "same"),
    ("guidance_in.mlp.0", ["time_text_embed.guidance_embedder.linear_1"], "same"),
    ("guidance_in.mlp.2", ["time_text_embed.guidance_embedder.linear_2"], "same"),
    ("double_blocks.{i}.img_mod.linear", [_DB + "norm1.linear"], "same"),
    ("double_blocks.{i}.img_attn_qkv", [_DB + "attn.to_q", _DB + "attn.to_k", _DB + "attn.to_v"], "qkv"),
    ("double_blocks.{i}.img_attn_q_norm", [_DB + "attn.norm_q"], "same"),
    ("double_blocks.{i}.img_attn_k_norm", [_DB + "attn.norm_k"], "same"),
    ("double_blocks.{i}.img_attn_proj", [_DB + "attn.to_out.0"], "same"),
    ("double_blocks.{i}.img_mlp.fc1", [_DB + "ff.net.0.proj"], "same"),
    ("double_blocks.{i}.img_mlp.fc2", [_DB + "ff.net.2"], "same"),
    ("double_blocks.{i}.txt_mod.linear", [_DB + "norm1_context.linear"], "same"),
    ("double_blocks.{i}.txt_attn_qkv",
     [_DB + "attn.add_q_proj", _DB + "attn.add_k_proj", _DB + "attn.add_v_proj"], "qkv"),
    ("double_blocks.{i}.txt_attn_q_norm", [_DB + "attn.norm_added_q"], "same"),
    ("double_blocks.{i}.txt_attn_k_norm", [_DB + "attn.norm_added_k"], "same"),
    ("double_blocks.{i}.txt_attn_proj", [_DB + "attn.to_add_out"], "same"),
    ("double_blocks.{i}.txt_mlp.fc1", [_DB + "ff_context.net.0.proj"], "same"),
    ("double_blocks.{i}.txt_mlp.fc2", [_DB + "ff_context.net.2"], "same"),
    ("single_blocks.{i}.linear1",
     [_SB + "attn.to_q", _SB + "attn.to_k", _SB + "attn.to_v", _SB + "proj_mlp"], "qkv_mlp"),
    ("single_blocks.{i}.linear2", [_SB + "proj_out"], "same"),
    ("single_blocks.{i}.q_norm", [_SB + "attn.norm_q"], "same"),
    ("single_blocks.{i}.k_norm", [_SB + "attn.norm_k"], "same"),
    ("single_blocks.{i}.modulation.linear", [_SB + "norm.linear"], "same"),
    ("final_layer.linear", ["proj_out"], "same"),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
]


def _pattern(module: str) -> "re.Pattern[str]":
    import re

    return re.compile(re.escape(module).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<param>weight|bias)$")


_OFFICIAL_RE = [(_pattern(o), o, d, how) for o, d, how in DIT_KEY_RULES]
_DIFFUSERS_RE = [(_pattern(dm), part, o, d, how) for o, d, how in DIT_KEY_RULES for part, dm in enumerate(d)]


def fused_row_blocks(how: str, out_features: int, hidden_size: int) -> list[tuple[int, int]]:
    """The row ranges of a fused official weight's diffusers parts: "qkv" = 3 equal blocks [q | k | v],
    "qkv_mlp" = [D | D | D | mlp_hidden] with D = ``hidden_size`` (linear1's input width), else all rows."""
    if how == "qkv":
        sizes = [out_features // 3] * 3
    elif how == "qkv_mlp":
        sizes = [hidden_size] * 3 + [out_features - 3 * hidden_size]
    else:
        sizes = [out_features]
    edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return list(zip(edges[:-1], edges[1:]))


def official_module_rule(module: str) -> tuple[list[str], str] | None:
    """An official linear's diffusers name(s) and how its rows map (a `DIT_KEY_RULES` entry), or None:
    "double_blocks.3.img_attn_qkv" -> (["transformer_blocks.3.attn.to_q", "...to_k", "...to_v"], "qkv")."""
    for regex, o, d, how in _OFFICIAL_RE:
        m = regex.match(module + ".weight")
        if m:
            return [dm.replace("{i}", m.groupdict().get("i") or "") for dm in d], how
    return None


def diffusers_module_rule(module: str) -> tuple[str, int, int, str] | None:
    """A diffusers linear's official module, its part index and count, and how, or None:
    "transformer_blocks.3.attn.to_k" -> ("double_blocks.3.img_attn_qkv", 1, 3, "qkv")."""
    for regex, part, o, d, how in _DIFFUSERS_RE:
        m = regex.match(module + ".weight")
        if m:
            return o.replace("{i}", m.groupdict().get("i") or ""), part, len(d), how
    return None


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def is_diffusers_dit_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys look like diffusers' HunyuanVideoTransformer3DModel (x_embedder, transformer_blocks...)."""
    return any(k.startswith(("x_embedder.", "transformer_blocks.", "single_transformer_blocks.", "context_embedder."))
               for k in sd)


def iter_official_to_diffusers(items: Iterable[tuple[str, torch.Tensor]], hidden_size: int | None = None
                               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Official (name, tensor) pairs -> diffusers pairs, one input at a time (splits are views: nothing is copied).

    ``hidden_size`` (D) splits the single blocks' ``linear1.bias``; without it D is read off ``linear1.weight``,
    which must then come first (it does in the state dict's order)."""
    unknown = []
    for key, value in items:
        for regex, o, d, how in _OFFICIAL_RE:
            m = regex.match(key)
            if m:
                break
        else:
            unknown.append(key)
            continue
        names = [dm.replace("{i}", m.groupdict().get("i") or "") + "." + m["param"] for dm in d]
        if how == "same":
            yield names[0], value
        elif how == "swap":
            yield names[0], _swap_halves(value)
        else:  # qkv / qkv_mlp: row blocks (views); qkv_mlp's D is linear1's input width
            if m["param"] == "weight":
                hidden_size = value.shape[1]
            if how == "qkv_mlp" and hidden_size is None:
                raise CheckpointError(f"{key}: splitting linear1 needs the hidden size; pass hidden_size")
            yield from ((n, value[i:j]) for n, (i, j) in zip(names, fused_row_blocks(how, value.shape[0], hidden_size)))
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not official HunyuanVideo DiT keys (first: {unknown[:5]})")


def official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official HunyuanVideo DiT state dict -> diffusers HunyuanVideoTransformer3DModel state dict."""
    hidden = next((v.shape[1] for k, v in sd.items() if k.endswith(".linear1.weight")), None)
    return dict(iter_official_to_diffusers(sd.items(), hidden_size=hidden))


def iter_diffusers_to_official(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """diffusers (name, tensor) pairs -> official pairs, one input at a time: a fused tensor is yielded as soon
    as its last part arrives (so shards can be read one after another), a renamed one at once."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in items:
        for regex, part, o, d, how in _DIFFUSERS_RE:
            m = regex.match(key)
            if m:
                break
        else:
            unknown.append(key)
            continue
        okey = o.replace("{i}", m.groupdict().get("i") or "") + "." + m["param"]
        if len(d) == 1:
            yield okey, _swap_halves(value) if how == "swap" else value
            continue
        got = parts.setdefault(okey, {})
        got[part] = value
        if len(got) == len(d):
            del parts[okey]
            yield okey, torch.cat([got[i] for i in range(len(d))], dim=0)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not diffusers HunyuanVideo keys (first: {unknown[:5]})")
    for okey, got in parts.items():
        n = next(len(d) for o, d, how in DIT_KEY_RULES if _pattern(o).match(okey))
        raise CheckpointError(f"{okey} is fused from {n} diffusers tensors but only parts {sorted(got)} were found")


def diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers HunyuanVideoTransformer3DModel state dict -> official HunyuanVideo DiT state dict."""
    return dict(iter_diffusers_to_official(sd.items()))


def load_dit_checkpoint(model: torch.nn.Module, path_or_state_dict, strict: bool = True) -> torch.nn.Module:
    """Load DiT weights into ``model`` from an official ``mp_rank_00_model_states.pt`` (weights under
    "module" or "ema"), a folder of ``pytorch_model_*.pt`` / ``*.safetensors`` files, a single safetensors
    file, or an in-memory state dict. diffusers-layout keys are detected and converted."""
    if isinstance(path_or_state_dict, Mapping):
        sd, what = unwrap_state_dict(path_or_state_dict, "state dict"), "state dict"
    else:
        what = os.fspath(path_or_state_dict)
        sd = load_state_dict_file(what)
    if is_diffusers_dit_layout(sd):
        sd = diffusers_to_official(sd)
        what += " (converted from the diffusers layout)"
    return load_into(model, sd, what=what, strict=strict)
