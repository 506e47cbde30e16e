"""The ``hvlab`` command: generate a video, describe a model, train or evaluate the toy model.

    hvlab generate "a red circle moving right"                 # the shipped toy model, CPU, a few seconds
    hvlab generate "a cat walks on the grass" --model-base ckpts --video-size 720 1280 --video-length 129 --fp8
    hvlab generate --from-settings outputs/2025-01-01_12-00-00/settings.json   # the same video again
    hvlab generate --resume outputs/.../interrupted.pt                          # finish a run stopped with Ctrl-C
    hvlab info --model 13b
    hvlab convert ckpts hv-diffusers --to diffusers                             # or official / single
    hvlab train-toy --out runs/toy        /  hvlab eval-toy --n 21

Arguments keep the official sample_video.py names (--video-size, --infer-steps, --embedded-cfg-scale, ...).
Imports are lazy so that ``hvlab --help`` is instant and the toy generation stays within seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .runs import RELEASE_DEFAULTS  # torch-free: --help stays instant

MODELS = ("toy", "toy-random", "tiny-random")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
STOPWORDS = {"a", "an", "the", "of", "and", "in", "on", "with", "to", "is", "are", "at", "by"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> video (default: the shipped toy model)",
                       epilog=_toy_vocabulary_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", nargs="?", help="the prompt (omit with --from-settings / --resume)")
    g.add_argument("--model", default=None,
                   help=f"'toy' (shipped weights), a folder of toy-format weights, or a random-weight model for "
                        f"smoke tests: {MODELS[1:]} (default toy)")
    g.add_argument("--model-base", default=None, metavar="PATH",
                   help="the release model in any layout hvlab reads (hvlab.layouts): the official ckpts/ folder, a "
                        "diffusers HunyuanVideo folder (model_index.json), or a folder of single .safetensors files "
                        "(ComfyUI's DiT in bf16 or fp8, VAE, llava_llama3, clip_l); the layout found is printed; "
                        "overrides --model")
    g.add_argument("--video-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    g.add_argument("--video-length", type=int, default=None, help=f"frames, 4k + 1 (release {RELEASE_DEFAULTS['video_length']})")
    g.add_argument("--infer-steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="video i uses seed + i (default: random, recorded)")
    g.add_argument("--cfg-scale", type=float, default=None, help="true CFG scale (1.0 = off)")
    g.add_argument("--embedded-cfg-scale", type=float, default=None, help=f"guidance for distilled models (release {RELEASE_DEFAULTS['embedded_guidance_scale']})")
    g.add_argument("--flow-shift", type=float, default=None)
    g.add_argument("--flow-reverse", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--neg-prompt", default=None, help="negative prompt (used with --cfg-scale > 1)")
    g.add_argument("--num-videos", type=int, default=None, help="videos per prompt")
    g.add_argument("--seed-device", default=None,
                   help="where the noise generators live: cpu (default: a seed gives the same video anywhere) or "
                        "cuda (as the official sampler, whose generators are on the run's device); recorded in "
                        "settings.json")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="DiT dtype (default: bf16 for the release model on a GPU, else fp32)")
    g.add_argument("--fp8", action="store_true", help="FP8 weights for the DiT blocks")
    g.add_argument("--cache", default=None, choices=("off", "fbcache", "teacache"),
                   help="skip the DiT's blocks on steps whose input barely changed (hvlab.fast.cache; default off)")
    g.add_argument("--cache-threshold", type=float, default=None,
                   help="skip while the cache's signal stays below this (0: never skip; default: the published "
                        "HunyuanVideo value, fbcache 0.06, teacache 0.1)")
    g.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                   help="decode in overlapping tiles (default: on for the release model, whose 720p decode needs it)")
    g.add_argument("--vae-tile-size", type=int, nargs=2, metavar=("PX", "FRAMES"), default=None,
                   help="VAE tile edge in pixels and length in frames (release 256 64; 128 32 needs less memory); "
                        "turns --vae-tiling on")
    g.add_argument("--cpu-offload", action="store_true", help="keep text encoders and VAE on the CPU between uses")
    g.add_argument("--memory-limit-gib", type=float, default=None,
                   help="plan against this many GiB instead of the card's free memory (the CPU's available RAM): "
                        "the release's load plan and every model's size guard")
    g.add_argument("--no-memory-check", action="store_true",
                   help="skip the memory checks (the release's load plan, every model's size guard) and run "
                        "even when the estimate says the video will not fit")
    g.add_argument("--record-attention", default=None, metavar="WORDS",
                   help="comma-separated prompt words, or 'auto' (every word but articles): saves attention.png "
                        "(maps of the first video, text token as key, mean over heads; a word the prompt repeats, "
                        "like 'moving' in a two-object prompt, gets one row per occurrence)")
    g.add_argument("--attention-kind", default="cross", choices=("cross", "concept"),
                   help="maps for --record-attention: cross (video queries on the prompt's text keys) or concept "
                        "(ConceptAttention-style output-space maps; the words need not be in the prompt)")
    g.add_argument("--attention-block", default="double:-1", help="block for --record-attention, e.g. double:1, single:0")
    g.add_argument("--attention-step", type=int, default=None, help="step for --record-attention (default: the middle)")
    g.add_argument("--preview-every", type=int, default=None, help="x0 preview every K steps (default: ~8 in all; 0: off)")
    g.add_argument("--save-path", default=None, help="output folder (default outputs/<timestamp>/)")
    g.add_argument("--gif", action=argparse.BooleanOptionalAction, default=None,
                   help="also write video.gif (default: on for videos up to 256 x 256)")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from an interrupted.pt / nan_step*.pt")
    g.add_argument("--from-settings", default=None, metavar="JSON", help="regenerate the video of a settings.json")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for the toy/tiny models on a CPU, where thread "
                        "synchronisation costs more than it gains on their small matrices; else torch's default)")

    g.add_argument("--ulysses-degree", type=int, default=1, metavar="N",
                   help="sequence parallelism over N processes (GPUs): launch with torchrun --nproc_per_node N "
                        "-m hvlab.cli generate ... --ulysses-degree N; every rank denoises, rank 0 alone decodes "
                        "and writes the files (hvlab.fast.parallel)")

    i = sub.add_parser("info", help="model structure (torchinfo) and parameter counts")
    i.add_argument("--model", default="toy",
                   help="a DiT preset of hvlab.model.PRESETS (HYVideo-T/2-cfgdistill, toy, tiny) or an alias of "
                        "PRESET_ALIASES (13b)")
    i.add_argument("--depth", type=int, default=2, help="torchinfo depth")

    c = sub.add_parser("convert", help="write a checkpoint in another layout (official, diffusers, single files)",
                       description="Read SRC in any layout hvlab reads and write it to the new folder DST in the "
                                   "layout --to: only names and containers change, never a number (a round trip "
                                   "gives the same tensors, bit for bit). See docs/checkpoints.md.")
    c.add_argument("src", nargs="?", default=None, metavar="SRC",
                   help="checkpoint folder (official ckpts/, diffusers, or single files); may be omitted when "
                        "every component is given with --dit/--vae/--text-encoder/--text-encoder-2")
    c.add_argument("dst", metavar="DST", help="output folder (must not exist, or be empty)")
    c.add_argument("--to", required=True, choices=("official", "diffusers", "single"), help="the layout to write")
    for flag, role in (("--dit", "DiT"), ("--vae", "VAE"), ("--text-encoder", "LLM text encoder"),
                       ("--text-encoder-2", "CLIP text encoder")):
        c.add_argument(flag, default=None, metavar="PATH", help=f"the {role} as a file or folder (replaces SRC's)")
    c.add_argument("--dit-config", default=None, metavar="PRESET|JSON",
                   help="DiT config when the files do not give it: a preset of hvlab.model.PRESETS (13b, toy, "
                        "tiny) or a JSON file of HYVideoConfig fields (default: from the layout or the shapes)")
    c.add_argument("--vae-config", default=None, metavar="PRESET|JSON",
                   help="VAE config likewise: a preset of hvlab.vae.VAE_PRESETS or a JSON file of VAEConfig fields")

    for name, target in (("train-toy", "hvlab.toy.train"), ("eval-toy", "hvlab.toy.evaluate")):
        t = sub.add_parser(name, help=f"forwards its arguments to python -m {target}", add_help=False)
        t.add_argument("args", nargs=argparse.REMAINDER)
    _show_defaults(g)
    return p


def _model_defaults(key: str, fmt=str) -> str:
    """"toy 30, tiny-random 4, release 50": a generation default of each model (the toy files, torch-free)."""
    from .toy.facts import TINY_DEFAULTS, TOY_DEFAULTS

    return ", ".join(f"{name} {fmt(d[key])}" for name, d in (("toy", TOY_DEFAULTS), ("tiny-random", TINY_DEFAULTS),
                                                          ("release", RELEASE_DEFAULTS)))


def _show_defaults(g: argparse.ArgumentParser) -> None:
    """End each ``hvlab generate`` flag's help with its default (the model's own where it depends on the model)."""
    size = lambda d: f"{d['height']} {d['width']}"  # noqa: E731
    from .toy.facts import TINY_DEFAULTS, TOY_DEFAULTS

    per_model = {
        "video_size": ", ".join(f"{n} {size(d)}" for n, d in (("toy", TOY_DEFAULTS), ("tiny-random", TINY_DEFAULTS),
                                                              ("release", RELEASE_DEFAULTS))),
        "video_length": _model_defaults("video_length"), "infer_steps": _model_defaults("num_inference_steps"),
        "cfg_scale": _model_defaults("guidance_scale"), "flow_shift": _model_defaults("flow_shift"),
        "embedded_cfg_scale": "the model's: release and tiny-random 6.0; none for the toy (no guidance embedding)",
        "flow_reverse": "on (noise to data, as every official command)", "num_videos": "1",
        "seed_device": "cpu", "neg_prompt": "the model's: the official negative prompt; '' for the toy",
        "seed": "random, recorded in settings.json", "threads": "1 for toy/tiny on a CPU, else torch's",
        "preview_every": "about 8 previews in all", "save_path": "outputs/<timestamp>/",
        "attention_step": "the middle step", "device": "cuda if available, else cpu",
    }
    for action in g._actions:
        if action.default == argparse.SUPPRESS:  # --help
            continue
        text = per_model.get(action.dest)
        if action.help and "default" not in action.help and text is None and action.default not in (None, False):
            text = str(action.default)
        if text and action.help and "default" not in action.help:
            action.help += f" (default: {text})"
        elif text and not action.help:
            action.help = f"default: {text}"


def _toy_vocabulary_epilog() -> str:
    import textwrap

    from .toy.facts import vocabulary_words

    words = vocabulary_words()
    return ("the toy models read only these words (any other becomes <unk>, and a warning names it):\n"
            + textwrap.fill(" ".join(words), 100, initial_indent="  ", subsequent_indent="  ")) if words else ""


# ---- generate ------------------------------------------------------------------------------------

def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights_note(model: str, model_base: str | None) -> str:
    if model_base:
        return f"release checkpoint in {Path(model_base).resolve()}"
    if model in ("toy-random", "tiny-random"):
        return f"random weights ({model.split('-')[0]} architecture, init seed 0)"
    from .toy.model import WEIGHTS_DIR

    folder = WEIGHTS_DIR if model == "toy" else Path(model)
    return f"toy weights in {folder.resolve()}"


def load_model(model: str = "toy", model_base: str | None = None, device: str | None = None, dtype: str | None = None,
               fp8: bool = False, vae_tiling: bool | None = None, cpu_offload: bool = False,
               vae_tile_size: tuple[int, int] | None = None, plan_size: tuple[int, int, int] | None = None,
               memory_limit_gib: float | None = None, check_memory: bool = True, cache: str | None = None,
               cache_threshold: float | None = None):
    """The pipeline the command line asks for (the run options are applied here).

    For the release model, ``plan_size`` = (video_length, height, width) is checked against the card's memory
    before any weight is read (`hvlab.loading.load_pipeline`)."""
    import torch

    device = _default_device() if device is None else device
    if vae_tiling is None:  # on for the release (its 720p decode needs it) and whenever a tile size is given
        vae_tiling = bool(model_base) or vae_tile_size is not None
    dt = getattr(torch, DTYPES[dtype]) if dtype else (torch.bfloat16 if device.startswith("cuda") and model_base
                                                      else torch.float32)
    if model_base:
        from .fast.cache import enable_step_cache
        from .loading import load_pipeline

        pipe = load_pipeline(model_base, device=device, dtype=dt, fp8=fp8, cpu_offload=cpu_offload,
                             vae_tiling=vae_tiling, vae_tile_size=vae_tile_size, plan_size=plan_size,
                             memory_limit_gib=memory_limit_gib, check_memory=check_memory)
        enable_step_cache(pipe, cache, cache_threshold)
        print(f"hvlab: loaded the {pipe.layout}", file=sys.stderr)
        return pipe
    if model in ("toy-random", "tiny-random"):
        from .toy.model import random_toy_pipeline

        pipe = random_toy_pipeline(model.split("-")[0], seed=0, device=device, dtype=dt)
    else:
        from .toy.model import WEIGHTS_DIR, load_toy

        folder = WEIGHTS_DIR if model == "toy" else Path(model)
        if not folder.is_dir():
            raise ValueError(f"--model must be one of {MODELS} or a folder of toy weights; {model!r} is neither")
        try:
            pipe = load_toy(device=device, dtype=dt, weights_dir=folder)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} To try the pipeline without them: --model toy-random "
                                    f"(the toy architecture with random weights).") from e
    if cpu_offload:
        pipe.enable_cpu_offload()
    if vae_tiling:
        pipe.enable_vae_tiling(**(dict(zip(("tile_sample_min_size", "tile_sample_min_num_frames"), vae_tile_size))
                                  if vae_tile_size is not None else {}))
    if fp8:
        pipe.enable_fp8()
    if device.startswith("cuda"):
        from .fast import accelerate

        accelerate(pipe.transformer)  # the fast wing's blocks and kernels; the CPU runs the reference blocks
    from .fast.cache import enable_step_cache

    enable_step_cache(pipe, cache, cache_threshold)  # a pipeline hook; None when cache is None / "off"
    return pipe


def _attention_words(spec: str, prompt: str, in_prompt: bool = True) -> list[str]:
    from .inspection.words import WORD_PATTERN as _WORD

    words = [w.group() for w in _WORD.finditer(prompt)]
    if spec == "auto":
        asked = [w for w in words if w.lower() not in STOPWORDS and w.isalnum()]
    else:
        asked = [w.strip() for w in spec.split(",") if w.strip()]
    unknown = [w for w in asked if w not in words]
    if unknown and in_prompt:
        raise ValueError(f"--record-attention words {unknown} are not in the prompt; its words are {words}")
    # cross-attention maps belong to word positions: a word that occurs twice ("moving" in a two-object prompt)
    # keeps both; a concept is the word itself, so it is recorded once
    return asked if in_prompt else list(dict.fromkeys(asked))


def _word_rows(words: list[str], labels: list[str]) -> list[str | int]:
    """Rows for `attention_overlay`: each word's next unused occurrence among the recorded ``labels``, as its
    index when the word occurs more than once there (so the second "moving" draws its own map), else the word."""
    used: dict[str, int] = {}
    rows = []
    for w in words:
        places = [i for i, lab in enumerate(labels) if lab == w]
        if not places:
            continue
        k = used.get(w, 0)
        used[w] = k + 1
        rows.append(w if len(places) == 1 else places[min(k, len(places) - 1)])
    return rows


def _parse_block(spec: str) -> tuple[str, int]:
    kind, _, idx = spec.partition(":")
    if kind not in ("double", "single") or not idx.lstrip("-").isdigit():
        raise ValueError(f"--attention-block must look like double:1 or single:-1, got {spec!r}")
    return kind, int(idx)


# What a --resume / --from-settings file fixes: giving one of these as well is a conflict, refused
GENERATION_FLAGS = {"neg_prompt": "--neg-prompt", "video_size": "--video-size", "video_length": "--video-length",
                    "infer_steps": "--infer-steps", "seed": "--seed", "cfg_scale": "--cfg-scale",
                    "embedded_cfg_scale": "--embedded-cfg-scale", "flow_shift": "--flow-shift",
                    "flow_reverse": "--[no-]flow-reverse", "num_videos": "--num-videos", "seed_device": "--seed-device"}


def check_generate_args(args) -> None:
    """Everything ``hvlab generate`` can check before the model loads (the rules: `hvlab.validate`)."""
    from . import validate

    if args.resume and args.from_settings:
        raise ValueError("--resume and --from-settings both name the settings to use: give one")
    source = "--resume" if args.resume else "--from-settings" if args.from_settings else None
    if source:
        given = [flag for dest, flag in GENERATION_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise ValueError(f"{source} takes every generation setting from its file; do not also pass "
                             f"{', '.join(given)} (to change them, start a new run with a PROMPT)")
    elif args.prompt is None:
        raise ValueError("hvlab generate needs a PROMPT (or --from-settings / --resume)")
    if args.prompt is not None:
        validate.check_prompt_text(args.prompt, "prompt")
    if args.neg_prompt is not None:
        validate.check_prompt_text(args.neg_prompt, "negative_prompt", allow_empty=True)
    h, w = args.video_size or (None, None)
    validate.check_generation_values(
        height=h, width=w, video_length=args.video_length, num_inference_steps=args.infer_steps, seed=args.seed,
        guidance_scale=args.cfg_scale, embedded_guidance_scale=args.embedded_cfg_scale, flow_shift=args.flow_shift,
        num_videos_per_prompt=args.num_videos, seed_device=args.seed_device, official=RELEASE_DEFAULTS)
    validate.check_run_options(args)
    if args.device is not None:
        validate.check_device(args.device)
    if args.attention_block is not None:
        _parse_block(args.attention_block)


def _saved_settings(args):
    """(GenerationSettings, resume state or None, the saved run options) of --from-settings / --resume."""
    from .runs import GenerationSettings, load_state, read_json

    if args.from_settings:
        saved = read_json(args.from_settings, "a settings.json written by hvlab generate")
        settings = GenerationSettings.from_dict(saved, source=args.from_settings)
        state = None
    else:
        state = load_state(args.resume)
        saved = state["settings"]
        settings = GenerationSettings.from_dict(saved, source=args.resume)
    if args.prompt is not None and args.prompt not in settings.prompt:
        raise ValueError(f"the saved settings are for {settings.prompt}, not {args.prompt!r}: drop the PROMPT")
    run = saved.get("run") if isinstance(saved, dict) else None
    return settings, state, run if isinstance(run, dict) else {}


def _ordinal(n: int) -> str:
    return "step" if n == 1 else f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')} step"


def cmd_generate(args):
    """Run ``hvlab generate``; returns (output folder, GenerationOutput); ``out.files`` lists the files written.

    Every flag is checked before the model loads, then the output folder is claimed (`hvlab.outputs`): a
    failed run removes the folder it made, and the lock keeps a second run with the same --save-path out."""
    import torch

    from .outputs import OutputFolder

    check_generate_args(args)
    run = dict(model=args.model, model_base=args.model_base, device=args.device, dtype=args.dtype, fp8=args.fp8,
               vae_tiling=args.vae_tiling, cpu_offload=args.cpu_offload,
               vae_tile_size=tuple(args.vae_tile_size) if args.vae_tile_size else None,
               cache=args.cache, cache_threshold=args.cache_threshold)
    settings, state = None, None
    if args.from_settings or args.resume:
        settings, state, saved_run = _saved_settings(args)
        for k in ("model", "model_base"):  # a different model gives a different video: say so
            if run[k] not in (None, saved_run.get(k)) and saved_run.get(k) is not None:
                print(f"hvlab: warning: {args.from_settings or args.resume} was made with --{k.replace('_', '-')} "
                      f"{saved_run[k]}; running it with --{k.replace('_', '-')} {run[k]}, which gives another video",
                      file=sys.stderr)
        for k, v in saved_run.items():  # the recorded run options, unless given again here
            if k in run and run[k] in (None, False):
                run[k] = v
    if run["model"] is None and not run["model_base"]:
        run["model"] = "toy"
    from .fast.cache import check_cache_args

    if run["cache"] == "off" and args.cache_threshold is None:
        run["cache_threshold"] = None  # a threshold restored from --from-settings belongs to the recorded cache
    run["cache"], run["cache_threshold"] = check_cache_args(run["cache"], run["cache_threshold"])
    if args.record_attention and run["cache"]:
        raise ValueError("--record-attention needs every step of every row, which --cache skips: drop one of them")
    run["device"] = _run_device(run["device"])
    threads = args.threads if args.threads is not None else (
        1 if run["device"] == "cpu" and not run["model_base"] else None)
    if threads:
        torch.set_num_threads(threads)
    rank = 0
    if args.ulysses_degree != 1:  # sequence parallel: see hvlab.fast.parallel
        if args.record_attention:
            raise ValueError("--record-attention needs the whole sequence in one process: drop --ulysses-degree")
        from .fast.parallel import init_ulysses_from_env

        rank = init_ulysses_from_env(args.ulysses_degree, run["device"])
    # the folder first: a taken --save-path is refused before minutes of loading
    folder = OutputFolder.claim(args.save_path, resume_file=args.resume) if rank == 0 else None
    if folder is not None and folder.note:
        print(f"hvlab generate: {folder.note}", file=sys.stderr)
    failed = True
    try:
        result = _generate(folder, args, run, settings, state, rank)
        failed = False
        return result
    finally:
        if folder is not None:
            folder.release(failed)


def _run_device(device) -> str:
    from .validate import check_device

    return check_device(device) if device is not None else _default_device()


def _generate(folder, args, run: dict, settings, state, rank: int):
    """Load, denoise, decode and write into ``folder``: the part of `cmd_generate` after the checks."""
    import torch

    from . import __version__, faults
    from .inspection import AttentionRecorder, LatentRecorder
    from .outputs import atomic_write, holding_sigint
    from .runs import GenerationInterrupted, NonFiniteLatentsError, save_state

    if settings is not None:  # what the memory plans check before the weights load
        plan = (settings.video_length, settings.height, settings.width)
    else:
        d = RELEASE_DEFAULTS
        h, w = args.video_size or (d["height"], d["width"])
        plan = (d["video_length"] if args.video_length is None else args.video_length, h, w)
    t_start = time.perf_counter()
    faults.pause_point("load")  # the interruption tests' pause points (inactive unless HVLAB_PAUSE_AT is set)
    pipe = load_model(**run, plan_size=plan, memory_limit_gib=args.memory_limit_gib,
                      check_memory=not args.no_memory_check)
    faults.install(pipe)
    pipe.check_memory, pipe.memory_limit_gib = not args.no_memory_check, args.memory_limit_gib
    t_load = time.perf_counter() - t_start
    if settings is None:
        h, w = args.video_size or (None, None)
        settings = pipe.settings_for(args.prompt, args.neg_prompt, height=h, width=w, video_length=args.video_length,
                                     num_inference_steps=args.infer_steps, seed=args.seed,
                                     guidance_scale=args.cfg_scale, embedded_guidance_scale=args.embedded_cfg_scale,
                                     flow_shift=args.flow_shift, flow_reverse=args.flow_reverse,
                                     num_videos_per_prompt=1 if args.num_videos is None else args.num_videos,
                                     seed_device="cpu" if args.seed_device is None else args.seed_device)
    latents, start = (state["latents"], state["step"]) if state else (None, 0)
    if args.ulysses_degree != 1:
        from .fast.parallel import broadcast_from_rank0, enable_ulysses

        enable_ulysses(pipe)
        settings = broadcast_from_rank0(settings)  # a randomly drawn seed must be rank 0's everywhere
        if rank != 0:  # the same denoising loop (1/N of each step), no decode, no files
            pipe.generate(settings, latents=latents, start_step=start, state_info=dict(run=run))
            return None, None
    out_dir = folder.path
    n = settings.num_inference_steps
    every = args.preview_every if args.preview_every is not None else max(1, -(-n // 8))
    latent_rec = LatentRecorder(pipe, every=every, keep_latents=True) if every > 0 and start < n else None
    att_rec, words = None, None
    if args.record_attention:
        words = _attention_words(args.record_attention, settings.prompt[0], args.attention_kind == "cross")
        step = args.attention_step if args.attention_step is not None else n // 2
        if not start <= step < n:
            raise ValueError(f"--attention-step must be in [{start}, {n - 1}] for {n} steps"
                             + (f" resumed at step {start}" if start else "") + f", got {step}")
        if args.attention_kind == "concept":
            from .inspection import ConceptRecorder

            att_rec = ConceptRecorder(pipe, words, steps=[step], blocks=[_parse_block(args.attention_block)])
        else:
            att_rec = AttentionRecorder(pipe, steps=[step], blocks=[_parse_block(args.attention_block)],
                                        reduce_heads="mean")
    hooks = [h for h in (latent_rec, att_rec) if h is not None]
    info = dict(hvlab_version=__version__, torch_version=torch.__version__, run=run,
                weights=_weights_note(run["model"], run["model_base"]), fps=pipe.defaults["fps"],
                resumed_from=str(Path(args.resume).resolve()) if args.resume else None,
                output_dir=str(out_dir), command=["hvlab", *getattr(args, "argv", sys.argv[1:])])
    try:
        for h in hooks:
            h.attach()
        out = pipe.generate(settings, progress=not args.quiet, state_dir=out_dir, latents=latents, start_step=start,
                            state_info=dict(run=run))  # --resume reloads the model the run used
    except GenerationInterrupted as e:
        _stopped(e.path, e.stage, e.step)
    except NonFiniteLatentsError as e:
        raise ValueError(str(e)) from None
    finally:
        for h in hooks:
            h.detach()
    try:  # pictures, videos and settings.json: each file whole or absent; Ctrl-C keeps the denoised latents
        faults.pause_point("save")
        out.timings["load_s"] = t_load
        files = _extras(out, out_dir, pipe, latent_rec, att_rec, words, args, info)
        files.append(atomic_write(out_dir / "latents.pt", lambda tmp: torch.save(out.latents, tmp)))
        out.timings["total_s"] = time.perf_counter() - t_start
        gif = args.gif if args.gif is not None else settings.height * settings.width <= 256 * 256
        saved = out.save(out_dir, fps=info["fps"], gif=gif, extra=info, also=files)
        files = saved[:-1] + files + saved[-1:]  # videos, pictures and latents, settings.json last
    except KeyboardInterrupt:
        with holding_sigint(reraise=False):
            path = save_state(out_dir / "interrupted.pt", out.latents, n, dict(settings.to_dict(), run=run))
        _stopped(path, "decode", n)
    out.files = files
    return out_dir, out


def _stopped(path, stage: str, step: int):
    what = "while decoding or saving (the denoised latents are kept)" if stage == "decode" else f"before step {step}"
    print(f"\ninterrupted {what}; saved {path}\nresume with: hvlab generate --resume {path}", file=sys.stderr)
    raise SystemExit(130)


def _extras(out, out_dir: Path, pipe, latent_rec, att_rec, words, args, info: dict) -> list[str]:
    """Previews, channel statistics and attention maps as PNGs; records what was made in ``info``."""
    import matplotlib.pyplot as plt

    from .outputs import atomic_write

    files = []

    def save_figure(fig, name):
        files.append(atomic_write(out_dir / name, lambda tmp: fig.savefig(tmp, dpi=100)))
        plt.close(fig)

    if latent_rec is not None and latent_rec.steps:
        from .inspection.preview import fit_latent_to_rgb, latent_to_rgb
        from .inspection.viz import channel_stats_plot, denoising_strip

        rgb_map, source = pipe.latent_rgb_map, "the model's shipped latent_to_rgb map"
        if rgb_map is None:  # no shipped map: fit one on this run's own (latent, video) pairs
            rgb_map = fit_latent_to_rgb(out.latents, out.videos * 2 - 1)
            source = "a 16->3 map least-squares fitted on this run's final latents and video"
        previews = latent_to_rgb(latent_rec.x0.flatten(0, 1), rgb_map).unflatten(0, latent_rec.x0.shape[:2])
        for b in range(previews.shape[1]):
            suffix = "" if previews.shape[1] == 1 else f"_{b}"
            save_figure(denoising_strip(previews[:, b], latent_rec.steps, latent_rec.sigmas,
                                        title=f"predicted x0 at every {_ordinal(latent_rec.every)}, video {b} "
                                              f"({source})"), f"previews{suffix}.png")
            save_figure(channel_stats_plot(latent_rec.stats, latent_rec.steps, sample=b), f"channel_stats{suffix}.png")
        info["previews"] = dict(every=latent_rec.every, steps=latent_rec.steps, rgb_map=source)
    if att_rec is not None:
        from .inspection.viz import attention_overlay

        maps = att_rec.maps(sample=0, softmax=True) if args.attention_kind == "concept" else att_rec.text_maps(sample=0)
        rows = _word_rows(words, maps.labels)
        words = [maps.labels[r] if isinstance(r, int) else r for r in rows]
        save_figure(attention_overlay(out.videos[0], maps, labels=rows), "attention.png")
        files.append(atomic_write(out_dir / "attention.pt", lambda tmp: torch_save_maps(maps, tmp)))
        info["attention"] = dict(kind=args.attention_kind, words=words,
                                 label_indices=[r if isinstance(r, int) else maps.labels.index(r) for r in rows],
                                 steps=maps.steps, blocks=maps.blocks, heads=maps.heads,
                                 direction=maps.direction, aggregation=maps.aggregation)
    return files


def torch_save_maps(maps, path) -> None:
    import torch

    torch.save(dict(maps=maps.maps, steps=maps.steps, blocks=[list(b) for b in maps.blocks], heads=maps.heads,
                    labels=maps.labels, direction=maps.direction, aggregation=maps.aggregation, prompt=maps.prompt),
               path)


# ---- info ----------------------------------------------------------------------------------------

def cmd_info(args) -> None:
    import torch
    from torchinfo import summary

    from .model import PRESETS, HYVideoDiffusionTransformer, params_count, preset_config
    from .toy.model import WEIGHTS_DIR
    from .vae import VAE_884_16C_HY_CONFIG, AutoencoderKLCausal3D

    config = preset_config(args.model)  # a name or an alias; an unknown one names the accepted ones
    with torch.device("meta"):  # nothing is allocated: the 13B model is only shapes here
        model = HYVideoDiffusionTransformer(config)
    print(summary(model, depth=args.depth, verbose=0, col_names=("num_params",)))
    print("\nparams_count (the official grouping: double = qkv + proj + mlp of both streams, single = linear1 + linear2)")
    rows = []
    for name in ("HYVideo-T/2-cfgdistill", "toy"):
        with torch.device("meta"):
            counts = params_count(HYVideoDiffusionTransformer(PRESETS[name]))
        rows.append((name, counts))
    keys = list(rows[0][1])
    print(f"{'model':<24}" + "".join(f"{k:>18}" for k in keys))
    for name, counts in rows:
        print(f"{name:<24}" + "".join(f"{counts[k]:>18,}" for k in keys))
    with torch.device("meta"):
        vae = AutoencoderKLCausal3D(VAE_884_16C_HY_CONFIG)
    print(f"\nrelease VAE (884-16c-hy): {sum(p.numel() for p in vae.parameters()):,} parameters")
    have = (WEIGHTS_DIR / "dit.safetensors").exists()
    print(f"toy weights: {'present' if have else 'absent'} in {WEIGHTS_DIR}")


# ---- convert -------------------------------------------------------------------------------------

def _config_arg(value: str | None, presets: dict, cls, flag: str):
    if value is None:
        return None
    if value in presets:
        return presets[value]
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{flag} must be one of {sorted(presets)} or a JSON file, got {value!r}")
    return cls(**json.loads(path.read_text()))


def cmd_convert(args) -> None:
    from .checkpoint import CheckpointError
    from .convert import convert
    from .model import PRESET_ALIASES, PRESETS, HYVideoConfig
    from .vae import VAE_PRESETS, VAEConfig

    dit_presets = dict(PRESETS, **{alias: PRESETS[name] for alias, name in PRESET_ALIASES.items()})
    try:
        written = convert(args.src, args.dst, args.to,
                          dit_config=_config_arg(args.dit_config, dit_presets, HYVideoConfig, "--dit-config"),
                          vae_config=_config_arg(args.vae_config, VAE_PRESETS, VAEConfig, "--vae-config"),
                          dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, text_encoder_2=args.text_encoder_2)
    except (CheckpointError, FileExistsError) as e:
        raise ValueError(str(e)) from e
    print(f"wrote the {written}")


# ---- entry point ---------------------------------------------------------------------------------

def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings of a command (unknown words, a long CPU run, a truncated prompt) as one line each on stderr."""
    print(f"hvlab: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """The `hvlab` command: parse ``argv`` (default: the command line) and run its subcommand; returns the exit code.

    A user's mistake (a bad flag value, a missing or damaged file, a taken folder, a run that would not fit) ends
    with one ``hvlab <command>: error: ...`` message on stderr and exit code 2, never a traceback
    (``HVLAB_TRACEBACK=1`` shows it); Ctrl-C ends with exit code 130 and says what was saved."""
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train-toy", "eval-toy"):  # forwarded verbatim, --help included
        if argv[0] == "train-toy":
            from .toy.train import main as target
        else:
            from .toy.evaluate import main as target
        target(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    with warnings.catch_warnings():  # restored afterwards: main() also runs inside other programs (tests)
        warnings.simplefilter("default")
        warnings.showwarning = _print_warning
        return _main(parser, args)


def _main(parser, args) -> int:
    import os

    try:
        if args.command == "generate":
            out_dir, out = cmd_generate(args)
            if out_dir is not None:  # None on sequence-parallel ranks other than 0
                print(f"wrote {len(out.files)} files to {out_dir}:")
                for f in out.files:
                    print(f"  {f}")
        elif args.command == "info":
            cmd_info(args)
        elif args.command == "convert":
            cmd_convert(args)
    except KeyboardInterrupt:  # before the first denoising step: nothing to keep (later ones save a state file)
        if os.environ.get("HVLAB_TRACEBACK"):
            raise
        parser.exit(130, f"\nhvlab {args.command}: interrupted before denoising began (while loading or "
                         f"encoding): nothing to resume, run the command again\n")
    except Exception as e:  # noqa: BLE001  (sorted below: a user's mistake gets a line, a bug its traceback)
        from .checkpoint import CheckpointError
        from .fast.memory import MemoryPlanError

        if not isinstance(e, (ValueError, OSError, IndexError, CheckpointError, MemoryPlanError)) or \
                os.environ.get("HVLAB_TRACEBACK"):
            raise
        parser.exit(2, f"hvlab {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
