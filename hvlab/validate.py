"""hvlab's input rules, in one place: what every public boundary checks before it allocates anything.

The ``hvlab`` command, `HunyuanVideoPipeline` (`settings_for`, `generate`, resume files), the loaders and the
DiT's and the VAE's forwards call these functions, so a bad value fails at once, and the same way everywhere,
with a message naming the value received, what is expected and the nearest valid value where there is one::

    num_inference_steps must be an int >= 1 (official default 50), got 0; nearest valid: 1 (CLI: --infer-steps)

Two habits hold throughout. ``None`` means "the model's default" and nothing else: 0, -1 or NaN is refused like
any other invalid value, never replaced by a default (no ``value or default``). And a message names the API
argument and ends with the ``hvlab generate`` flag that sets it (`FLAGS`), so one rule serves both.

This module imports no torch at import time (the CLI validates its flags before the model loads), and nothing
of hvlab's at module level: `hvlab.runs` checks the settings files it reads with it, and passes the release's
defaults (``official=RELEASE_DEFAULTS``) that the messages name.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings

# API argument -> the `hvlab generate` flag that sets it (a message names both)
FLAGS = {
    "prompt": "PROMPT", "negative_prompt": "--neg-prompt", "height": "--video-size H", "width": "--video-size W",
    "video_length": "--video-length", "num_inference_steps": "--infer-steps", "seed": "--seed",
    "guidance_scale": "--cfg-scale", "embedded_guidance_scale": "--embedded-cfg-scale", "flow_shift": "--flow-shift",
    "flow_reverse": "--flow-reverse", "num_videos_per_prompt": "--num-videos", "seed_device": "--seed-device",
    "device": "--device", "threads": "--threads", "preview_every": "--preview-every",
    "memory_limit_gib": "--memory-limit-gib", "attention_step": "--attention-step",
    "ulysses_degree": "--ulysses-degree", "vae_tile_size": "--vae-tile-size",
}
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range is 0 .. 2**64 - 1 (a negative seed wraps around to it)


def cli(name: str) -> str:
    """`` (CLI: --infer-steps)``: the ``hvlab generate`` flag that sets ``name``, as messages end."""
    flag = FLAGS.get(name)
    return f" (CLI: {flag})" if flag else ""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})" if not _is_real(value) else repr(value)


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None, note: str = "") -> int:
    """``value`` if it is an int in [minimum, maximum], else a ValueError naming the nearest valid value."""
    rng = (f" in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else
           f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else "")
    note = f" ({note})" if note else ""
    if not _is_int(value):
        hint = ""
        if _is_real(value) and math.isfinite(value):
            nearest = round(value)
            nearest = max(nearest, minimum) if minimum is not None else nearest
            nearest = min(nearest, maximum) if maximum is not None else nearest
            hint = f"; nearest valid: {nearest}"
        raise ValueError(f"{name} must be an int{rng}{note}, got {value!r} ({type(value).__name__}){hint}{cli(name)}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        nearest = minimum if minimum is not None and value < minimum else maximum
        raise ValueError(f"{name} must be an int{rng}{note}, got {value}; nearest valid: {nearest}{cli(name)}")
    return int(value)


def check_number(value, name: str, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None, note: str = "", example: float | None = None) -> float:
    """``value`` as a float if it is a finite number >= ``minimum`` (or > ``above``) and <= ``maximum``."""
    parts = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
             f"<= {maximum}" if maximum is not None else ""]
    rng = " and ".join(p for p in parts if p)
    expected = f"a finite number{' ' + rng if rng else ''}{f' ({note})' if note else ''}"
    if not _is_real(value):
        raise ValueError(f"{name} must be {expected}, got {_got(value)}{cli(name)}")
    value = float(value)
    example_hint = f"; e.g. {example}" if example is not None else ""
    if not math.isfinite(value):
        hint = example_hint
    elif minimum is not None and value < minimum:
        hint = f"; nearest valid: {minimum}"
    elif above is not None and value <= above:
        hint = example_hint
    elif maximum is not None and value > maximum:
        hint = f"; nearest valid: {maximum}"
    else:
        return value
    raise ValueError(f"{name} must be {expected}, got {value!r}{hint}{cli(name)}")


# ---- generation settings ---------------------------------------------------------------------------------------

def check_steps(n, name: str = "num_inference_steps", default: int | None = None) -> int:
    """A step count >= 1 (``default``, named in the message: the release's 50, or 1000 training timesteps)."""
    return check_int(n, name, minimum=1, note=f"official default {default}" if default is not None else "")


def check_seed(seed, count: int = 1, name: str = "seed") -> int:
    """A seed in [0, 2**64 - count]: video i of ``count`` uses seed + i, and each must be a valid torch seed."""
    top = SEED_MAX - (count - 1)
    return check_int(seed, name, minimum=0, maximum=top,
                     note="torch.Generator.manual_seed's range" + (f"; video i uses seed + i for {count} videos"
                                                                    if count > 1 else ""))


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """True CFG: 1.0 is off (the release's: its DiT is guidance-distilled), above 1 mixes in the negative prompt."""
    return check_number(value, name, minimum=1.0, example=1.0,
                        note="1.0 = true CFG off, as the release; > 1 uses the negative prompt")


def check_embedded_guidance_scale(value, has_embedding: bool | None = None, name: str = "embedded_guidance_scale",
                                  default: float | None = None):
    """None, or a finite number > 0 for a DiT with a guidance embedding (``config.guidance_embed``)."""
    if value is None:
        return None
    if has_embedding is False:
        raise ValueError(f"{name} was given ({value!r}), but this DiT has no guidance embedding "
                         f"(config.guidance_embed=False, like the toy, which samples with true CFG): it would be "
                         f"ignored. Drop it, or use guidance_scale (--cfg-scale) for true CFG{cli(name)}")
    return check_number(value, name, above=0.0, example=default,
                        note="the guidance a distilled DiT embeds" + (f"; the release uses {default}" if default else ""))


def check_flow_shift(value, name: str = "flow_shift", default: float | None = None) -> float:
    """The sigma grid's shift: a finite number > 0 (``default``, named in the message: the release's 7.0)."""
    return check_number(value, name, above=0.0, example=default,
                        note=f"official default {default}" if default is not None else "")


def check_bool(value, name: str) -> bool:
    """A real bool (a JSON "yes" or 1 is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_got(value)}{cli(name)}")
    return value


def check_prompt_text(text, name: str = "prompt", allow_empty: bool = False) -> str:
    """A str that is valid text: UTF-8 encodable (a non-UTF-8 terminal or file gives lone surrogates), and for
    the prompt itself (not a negative prompt) not empty or only whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{name} is not valid UTF-8 text: the bytes {raw!r} at character {e.start} could "
                         f"not be decoded (the terminal or file is not UTF-8); retype the prompt or save the file "
                         f"as UTF-8{cli(name)}") from None
    if not allow_empty and not text.strip():
        raise ValueError(f"{name} is empty{' (only whitespace)' if text else ''}, got {text!r}: describe "
                         f"the video, e.g. 'a red circle moving right'{cli(name)}")
    return text


def check_device(value, name: str = "device") -> str:
    """A torch device that exists on this machine ("cpu", "cuda", "cuda:1", "mps"); returns its canonical name."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must name a torch device such as 'cpu', 'cuda' or 'cuda:0', "
                         f"got {value!r}{cli(name)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA card")
            raise ValueError(f"{name} is {value!r} but CUDA is not available here ({why}); nearest valid: "
                             f"'cpu'{cli(name)}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{name} is {value!r} but this machine has {n} CUDA card(s) (cuda:0 .. "
                             f"cuda:{n - 1}); nearest valid: 'cuda:{n - 1}'{cli(name)}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{name} is {value!r} but MPS is not available here; nearest valid: 'cpu'{cli(name)}")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'mps', got {value!r}{cli(name)}")
    return str(dev)


def check_dtype(value, name: str = "dtype"):
    """A torch floating-point dtype the models can hold their weights in (not float8: `hvlab.fast.fp8` converts
    to it); returns it."""
    import torch

    if isinstance(value, torch.dtype) and value.is_floating_point and value.itemsize >= 2:
        return value
    hint = ""
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        hint = f"; pass torch.{value.removeprefix('torch.')}, not the string"
    elif isinstance(value, torch.dtype) and value.is_floating_point:
        hint = "; for FP8 weights load in bfloat16 with fp8=True (or pipe.enable_fp8())"
    raise ValueError(f"{name} must be a torch floating-point dtype such as torch.float32, torch.bfloat16 or "
                     f"torch.float16, got {_got(value)}{hint}")


def check_callback(value, name: str = "callback"):
    """None, or a function called with each step's `hvlab.pipeline.StepState`."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function taking the step's state (state.i, state.latents, ...) or None, "
                        f"got {value!r} ({type(value).__name__})")
    return value


def check_generation_values(*, height=None, width=None, video_length=None, num_inference_steps=None, seed=None,
                            guidance_scale=None, embedded_guidance_scale=None, flow_shift=None, flow_reverse=None,
                            num_videos_per_prompt=None, seed_device=None, has_guidance_embedding=None,
                            n_prompts: int = 1, official: dict | None = None) -> None:
    """Check the generation arguments that were given (None = the model's default, not checked here).

    Called by `HunyuanVideoPipeline.settings_for` and, before the model loads, by ``hvlab generate``;
    ``official`` (`hvlab.runs.RELEASE_DEFAULTS`) gives the release defaults the messages name.
    """
    from .video import check_video_length, check_video_size

    official = {} if official is None else official
    if height is not None or width is not None:
        h = check_int(height, "height") if height is not None else 16
        w = check_int(width, "width") if width is not None else 16
        check_video_size(h, w)
    if video_length is not None:
        check_video_length(check_int(video_length, "video_length"))
    if num_inference_steps is not None:
        check_steps(num_inference_steps, default=official.get("num_inference_steps"))
    if num_videos_per_prompt is not None:
        check_int(num_videos_per_prompt, "num_videos_per_prompt", minimum=1)
    if seed is not None:
        if isinstance(seed, (list, tuple)):
            for s in seed:
                check_seed(s, name="seed")
        else:
            check_seed(seed, count=n_prompts * (1 if num_videos_per_prompt is None else num_videos_per_prompt))
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    check_embedded_guidance_scale(embedded_guidance_scale, has_guidance_embedding,
                                  default=official.get("embedded_guidance_scale"))
    if flow_shift is not None:
        check_flow_shift(flow_shift, default=official.get("flow_shift"))
    if flow_reverse is not None:
        check_bool(flow_reverse, "flow_reverse")
    if seed_device is not None:
        check_device(seed_device, "seed_device")


def check_settings(s, source: str | None = None, has_guidance_embedding: bool | None = None,
                   official: dict | None = None) -> None:
    """Every field of a `hvlab.runs.GenerationSettings` (e.g. read from a settings.json or a resume file):
    types, ranges and the relations between fields. ``source`` (a file) starts the message."""
    from .prompts import validate_prompts

    where = f"{source}: " if source else ""
    try:
        prompts = validate_prompts(s.prompt, name="prompt")
        for p in prompts:
            check_prompt_text(p, "prompt")
        if s.negative_prompt is not None:
            for p in validate_prompts(s.negative_prompt, len(prompts), name="negative_prompt"):
                check_prompt_text(p, "negative_prompt", allow_empty=True)
        if not isinstance(s.seeds, (list, tuple)) or len(s.seeds) != len(prompts):
            raise ValueError(f"seeds must be a list of one seed per prompt ({len(prompts)}), got {s.seeds!r}")
        for x in s.seeds:
            check_seed(x, name="seeds[i]")
        for name in ("height", "width", "video_length", "num_inference_steps", "guidance_scale", "flow_shift",
                     "flow_reverse", "num_videos_per_prompt"):
            if getattr(s, name) is None:
                raise ValueError(f"{name} must be given, got None")
        if has_guidance_embedding is False and s.embedded_guidance_scale is not None:  # not a flag: the file's
            raise ValueError(f"these settings have embedded_guidance_scale = {s.embedded_guidance_scale!r}, for a DiT "
                             f"with a guidance embedding, but this DiT has none (config.guidance_embed=False, like "
                             f"the toy's): they were made with another model. Run them with the model that made "
                             f"them (hvlab generate: its --model / --model-base)")
        check_generation_values(height=s.height, width=s.width, video_length=s.video_length,
                                num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                embedded_guidance_scale=s.embedded_guidance_scale, flow_shift=s.flow_shift,
                                flow_reverse=s.flow_reverse, num_videos_per_prompt=s.num_videos_per_prompt,
                                has_guidance_embedding=has_guidance_embedding, official=official)
        if not isinstance(s.seed_device, str):
            raise ValueError(f"seed_device must be a device name such as 'cpu', got {_got(s.seed_device)}")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}{e}") from None


def check_resume_step(step, num_inference_steps: int, source: str = "the resume file") -> int:
    """The step a resume file continues from: 0 .. n (n = denoising finished, only the decode is left)."""
    if not _is_int(step):
        raise ValueError(f"{source}: step must be an int, got {_got(step)}")
    if not 0 <= step <= num_inference_steps:
        raise ValueError(f"{source} says step {step}, but its settings run {num_inference_steps} steps "
                         f"(a resume step lies in 0 .. {num_inference_steps}; {num_inference_steps} = only the decode "
                         f"is left): the file does not belong to these settings")
    return int(step)


# ---- words a tokenizer cannot read -----------------------------------------------------------------------------

class UnknownWordsWarning(UserWarning):
    """Words of a prompt that the model's tokenizer maps to its unknown token (the toy's word-level vocabulary)."""


def unknown_words(tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` turns into its unknown token (none for byte-level BPE, which has
    no unknown token: Llama-3's and CLIP's tokenizers read any text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not getattr(tokenizer, "is_fast", False):
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]


def warn_unknown_words(tokenizer, prompts, max_vocabulary_shown: int = 400) -> list[str]:
    """Warn (`UnknownWordsWarning`) naming the words of ``prompts`` the tokenizer cannot read, and list its
    vocabulary when it is small enough to read (the toy's). Returns the unknown words."""
    unknown = list(dict.fromkeys(w for p in prompts for w in unknown_words(tokenizer, p)))
    if not unknown:
        return []
    vocab = sorted(w for w in tokenizer.get_vocab() if not (w.startswith("<") and w.endswith(">")))
    every = all(_only_unknown(tokenizer, p) for p in prompts)
    msg = (f"the model's tokenizer does not know {unknown} and reads each as {tokenizer.unk_token}"
           + (": it sees no word of the prompt at all, so the video follows no text" if every else ""))
    if len(vocab) <= max_vocabulary_shown:
        msg += f". Its vocabulary ({len(vocab)} words): {' '.join(vocab)}"
    warnings.warn(msg, UnknownWordsWarning, stacklevel=3)
    return unknown


def _only_unknown(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(i == tokenizer.unk_token_id for i in ids)


# ---- command-line options -----------------------------------------------------------------------------------

def check_run_options(args) -> None:
    """The ``hvlab generate`` options that are not generation settings (threads, previews, tiles, memory cap)."""
    if args.threads is not None:
        check_int(args.threads, "threads", minimum=1, maximum=max(os.cpu_count() or 1, 1) * 4,
                  note=f"this machine has {os.cpu_count()} cores")
    if args.preview_every is not None:
        check_int(args.preview_every, "preview_every", minimum=0, note="0 turns previews off")
    if args.memory_limit_gib is not None:
        check_number(args.memory_limit_gib, "memory_limit_gib", above=0.0, example=24.0)
    if args.attention_step is not None:
        check_int(args.attention_step, "attention_step", minimum=0)
    check_int(args.ulysses_degree, "ulysses_degree", minimum=1)
    if args.vae_tile_size is not None:
        px, frames = args.vae_tile_size
        check_int(px, "vae_tile_size", minimum=32, note="the tile edge in pixels, e.g. 256 (release) or 128")
        check_int(frames, "vae_tile_size", minimum=4, note="the tile length in frames, e.g. 64 (release) or 32")
        if getattr(args, "vae_tiling", None) is False:
            raise ValueError("--vae-tile-size sets the tiles of VAE tiling, which --no-vae-tiling turns off: drop one "
                             "of them (--vae-tile-size alone turns tiling on)")
