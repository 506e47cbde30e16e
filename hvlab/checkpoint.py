"""Reading checkpoint files safely, and matching their keys against a model.

The official loader calls ``torch.load`` without ``weights_only``, which unpickles arbitrary
objects: a downloaded ``.pt`` file could run code. hvlab always loads pickles with
``weights_only=True`` and refuses, with an explanation, a file that needs more than tensors,
dicts, lists and numbers.
"""
from __future__ import annotations

import glob
import os
import pickle
from typing import Iterable, Mapping

import torch

# Top-level keys under which official and common checkpoints nest their weights, in the order
# the official loader looks for them ("module" for DeepSpeed-style files, "ema" for EMA weights).
WRAPPER_KEYS = ("module", "ema", "state_dict", "model")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely or does not fit the model."""


def _load_pickle(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # mmap needs the zipfile format; old pickles are read plainly
        if "mmap" not in str(e):
            raise _refuse(path, e) from e
    except (pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise _refuse(path, e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise _refuse(path, e) from e


def _refuse(path: str, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path!r}: it holds objects other than tensors and plain containers, "
        f"and unpickling those could run code from the file (torch.load weights_only=True said: "
        f"{str(err).splitlines()[0]}). If you trust the file, convert it once to safetensors "
        f"yourself, e.g. safetensors.torch.save_file(torch.load(path, weights_only=False)['module'], "
        f"'model.safetensors'), then load that."
    )


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
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(path), path, prefix)
    return unwrap_state_dict(_load_pickle(path), path, prefix)


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


def iter_prefixed(keys: Iterable[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]
