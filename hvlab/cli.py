"""The ``hvlab`` command: generate a video, describe a model, train or evaluate the toy model.

    hvlab generate "a red circle moving right"                 # the shipped toy model, CPU, a few seconds
    hvlab generate "a cat walks on the grass" --model-base ckpts --video-size 720 1280 --video-length 129 --fp8
    hvlab generate --from-settings outputs/2025-01-01_12-00-00/settings.json   # the same video again
    hvlab generate --resume outputs/.../interrupted.pt                          # finish a run stopped with Ctrl-C
    hvlab info --model 13b
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

    g = sub.add_parser("generate", help="text -> video (default: the shipped toy model)")
    g.add_argument("prompt", nargs="?", help="the prompt (omit with --from-settings / --resume)")
    g.add_argument("--model", default=None,
                   help=f"'toy' (shipped weights), a folder of toy-format weights, or a random-weight model for "
                        f"smoke tests: {MODELS[1:]} (default toy)")
    g.add_argument("--model-base", default=None, help="release checkpoint folder (ckpts/ layout); overrides --model")
    g.add_argument("--video-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    g.add_argument("--video-length", type=int, default=None, help=f"frames, 4k + 1 (release {RELEASE_DEFAULTS['video_length']})")
    g.add_argument("--infer-steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="video i uses seed + i (default: random, recorded)")
    g.add_argument("--cfg-scale", type=float, default=None, help="true CFG scale (1.0 = off)")
    g.add_argument("--embedded-cfg-scale", type=float, default=None, help=f"guidance for distilled models (release {RELEASE_DEFAULTS['embedded_guidance_scale']})")
    g.add_argument("--flow-shift", type=float, default=None)
    g.add_argument("--flow-reverse", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--neg-prompt", default=None, help="negative prompt (used with --cfg-scale > 1)")
    g.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    g.add_argument("--seed-device", default="cpu",
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
                   help="VAE tile edge in pixels and length in frames (release 256 64; 128 32 needs less memory)")
    g.add_argument("--cpu-offload", action="store_true", help="keep text encoders and VAE on the CPU between uses")
    g.add_argument("--memory-limit-gib", type=float, default=None,
                   help="release model: plan against this many GiB instead of the card's free memory")
    g.add_argument("--no-memory-check", action="store_true",
                   help="release model: load even when the memory plan says the video will not fit")
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

    for name, target in (("train-toy", "hvlab.toy.train"), ("eval-toy", "hvlab.toy.evaluate")):
        t = sub.add_parser(name, help=f"forwards its arguments to python -m {target}", add_help=False)
        t.add_argument("args", nargs=argparse.REMAINDER)
    return p


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

    device = device or _default_device()
    vae_tiling = bool(model_base) if vae_tiling is None else vae_tiling
    dt = getattr(torch, DTYPES[dtype]) if dtype else (torch.bfloat16 if device.startswith("cuda") and model_base
                                                      else torch.float32)
    if model_base:
        from .fast.cache import enable_step_cache
        from .loading import load_pipeline

        pipe = load_pipeline(model_base, device=device, dtype=dt, fp8=fp8, cpu_offload=cpu_offload,
                             vae_tiling=vae_tiling, vae_tile_size=vae_tile_size, plan_size=plan_size,
                             memory_limit_gib=memory_limit_gib, check_memory=check_memory)
        enable_step_cache(pipe, cache, cache_threshold)
        return pipe
    if model in ("toy-random", "tiny-random"):
        from .toy.model import random_toy_pipeline

        pipe = random_toy_pipeline(model.split("-")[0], seed=0, device=device, dtype=dt)
    else:
        from .toy.model import WEIGHTS_DIR, load_toy

        folder = WEIGHTS_DIR if model == "toy" else Path(model)
        if not folder.is_dir():
            raise SystemExit(f"--model must be one of {MODELS} or a folder of toy weights; {model!r} is neither")
        try:
            pipe = load_toy(device=device, dtype=dt, weights_dir=folder)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} To try the pipeline without them: --model toy-random "
                                    f"(the toy architecture with random weights).") from e
    if cpu_offload:
        pipe.enable_cpu_offload()
    if vae_tiling:
        pipe.enable_vae_tiling(**(dict(zip(("tile_sample_min_size", "tile_sample_min_num_frames"), vae_tile_size))
                                  if vae_tile_size else {}))
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
        raise SystemExit(f"--record-attention words {unknown} are not in the prompt; its words are {words}")
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
        raise SystemExit(f"--attention-block must look like double:1 or single:-1, got {spec!r}")
    return kind, int(idx)


def cmd_generate(args):
    """Run ``hvlab generate``; returns (output folder, GenerationOutput)."""
    import torch

    from . import __version__
    from .inspection import AttentionRecorder, LatentRecorder
    from .runs import GenerationInterrupted, GenerationSettings, NonFiniteLatentsError, load_state

    run = dict(model=args.model, model_base=args.model_base, device=args.device, dtype=args.dtype, fp8=args.fp8,
               vae_tiling=args.vae_tiling, cpu_offload=args.cpu_offload,
               vae_tile_size=tuple(args.vae_tile_size) if args.vae_tile_size else None,
               cache=args.cache, cache_threshold=args.cache_threshold)
    settings, resume = None, None
    if args.from_settings or args.resume:
        saved = (json.loads(Path(args.from_settings).read_text()) if args.from_settings
                 else load_state(args.resume)["settings"])
        settings = GenerationSettings.from_dict(saved)
        for k, v in (saved.get("run") or {}).items():  # the recorded run options, unless given again here
            if k in run and run[k] in (None, False):
                run[k] = v
        resume = args.resume
        if args.prompt is not None and args.prompt not in settings.prompt:
            raise SystemExit(f"the saved settings are for {settings.prompt}, not {args.prompt!r}: drop the PROMPT")
    elif not args.prompt:
        raise SystemExit("hvlab generate needs a PROMPT (or --from-settings / --resume)")
    run["model"] = run["model"] or "toy"
    from .fast.cache import check_cache_args

    if run["cache"] == "off" and args.cache_threshold is None:
        run["cache_threshold"] = None  # a threshold restored from --from-settings belongs to the recorded cache
    run["cache"], run["cache_threshold"] = check_cache_args(run["cache"], run["cache_threshold"])
    if args.record_attention and run["cache"]:
        raise SystemExit("--record-attention needs every step of every row, which --cache skips: drop one of them")
    run["device"] = run["device"] or _default_device()
    threads = args.threads or (1 if run["device"] == "cpu" and not run["model_base"] else None)
    if threads:
        torch.set_num_threads(threads)
    rank = 0
    if args.ulysses_degree != 1:  # sequence parallel: see hvlab.fast.parallel
        if args.record_attention:
            raise SystemExit("--record-attention needs the whole sequence in one process: drop --ulysses-degree")
        from .fast.parallel import init_ulysses_from_env

        rank = init_ulysses_from_env(args.ulysses_degree, run["device"])

    if settings is not None:  # what the memory plan checks before the release weights load
        plan = (settings.video_length, settings.height, settings.width)
    else:
        d = RELEASE_DEFAULTS
        h, w = args.video_size or (d["height"], d["width"])
        plan = (args.video_length or d["video_length"], h, w)
    t_start = time.perf_counter()
    pipe = load_model(**run, plan_size=plan, memory_limit_gib=args.memory_limit_gib,
                      check_memory=not args.no_memory_check)
    t_load = time.perf_counter() - t_start
    if settings is None:
        h, w = args.video_size or (None, None)
        settings = pipe.settings_for(args.prompt, args.neg_prompt, height=h, width=w, video_length=args.video_length,
                                     num_inference_steps=args.infer_steps, seed=args.seed,
                                     guidance_scale=args.cfg_scale, embedded_guidance_scale=args.embedded_cfg_scale,
                                     flow_shift=args.flow_shift, flow_reverse=args.flow_reverse,
                                     num_videos_per_prompt=args.num_videos, seed_device=args.seed_device)
    if args.ulysses_degree != 1:
        from .fast.parallel import broadcast_from_rank0, enable_ulysses

        enable_ulysses(pipe)
        settings = broadcast_from_rank0(settings)  # a randomly drawn seed must be rank 0's everywhere
        if rank != 0:  # the same denoising loop (1/N of each step), no decode, no files
            state = load_state(resume) if resume else None
            pipe.generate(settings, latents=state["latents"] if state else None,
                          start_step=state["step"] if state else 0)
            return None, None
    out_dir = Path(args.save_path or Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    n = settings.num_inference_steps
    every = args.preview_every if args.preview_every is not None else max(1, -(-n // 8))
    latent_rec = LatentRecorder(pipe, every=max(1, every), keep_latents=True) if every > 0 else None
    att_rec, words = None, None
    if args.record_attention:
        words = _attention_words(args.record_attention, settings.prompt[0], args.attention_kind == "cross")
        step = args.attention_step if args.attention_step is not None else n // 2
        if not 0 <= step < n:
            raise SystemExit(f"--attention-step must be in [0, {n - 1}] for {n} steps, got {step}")
        if args.attention_kind == "concept":
            from .inspection import ConceptRecorder

            att_rec = ConceptRecorder(pipe, words, steps=[step], blocks=[_parse_block(args.attention_block)])
        else:
            att_rec = AttentionRecorder(pipe, steps=[step], blocks=[_parse_block(args.attention_block)],
                                        reduce_heads="mean")
    hooks = [h for h in (latent_rec, att_rec) if h is not None]
    state = load_state(resume) if resume else None
    info = dict(hvlab_version=__version__, torch_version=torch.__version__, run=run,
                weights=_weights_note(run["model"], run["model_base"]), fps=pipe.defaults["fps"],
                resumed_from=resume, command=["hvlab", *getattr(args, "argv", sys.argv[1:])])
    try:
        for h in hooks:
            h.attach()
        out = pipe.generate(settings, progress=not args.quiet, state_dir=out_dir,
                            latents=state["latents"] if state else None, start_step=state["step"] if state else 0)
    except GenerationInterrupted as e:
        print(f"\ninterrupted before step {e.step}; saved {e.path}\nresume with: hvlab generate --resume {e.path}",
              file=sys.stderr)
        raise SystemExit(130)
    except NonFiniteLatentsError as e:
        raise SystemExit(f"error: {e}")
    finally:
        for h in hooks:
            h.detach()
    out.timings["load_s"] = t_load
    files = _extras(out, out_dir, pipe, latent_rec, att_rec, words, args, info)
    out.timings["total_s"] = time.perf_counter() - t_start
    gif = args.gif if args.gif is not None else settings.height * settings.width <= 256 * 256
    files = out.save(out_dir, fps=info["fps"], gif=gif, extra=dict(info, files=files)) + files
    torch.save(out.latents, out_dir / "latents.pt")
    return out_dir, out


def _extras(out, out_dir: Path, pipe, latent_rec, att_rec, words, args, info: dict) -> list[str]:
    """Previews, channel statistics and attention maps as PNGs; records what was made in ``info``."""
    files = []
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
            fig = denoising_strip(previews[:, b], latent_rec.steps, latent_rec.sigmas,
                                  title=f"predicted x0 at every {latent_rec.every}th step, video {b} ({source})")
            fig.savefig(out_dir / f"previews{suffix}.png", dpi=100)
            fig = channel_stats_plot(latent_rec.stats, latent_rec.steps, sample=b)
            fig.savefig(out_dir / f"channel_stats{suffix}.png", dpi=100)
            files += [str(out_dir / f"previews{suffix}.png"), str(out_dir / f"channel_stats{suffix}.png")]
        info["previews"] = dict(every=latent_rec.every, steps=latent_rec.steps, rgb_map=source)
    if att_rec is not None:
        from .inspection.viz import attention_overlay

        maps = att_rec.maps(sample=0, softmax=True) if args.attention_kind == "concept" else att_rec.text_maps(sample=0)
        rows = _word_rows(words, maps.labels)
        words = [maps.labels[r] if isinstance(r, int) else r for r in rows]
        fig = attention_overlay(out.videos[0], maps, labels=rows)
        fig.savefig(out_dir / "attention.png", dpi=100)
        torch_save_maps(maps, out_dir / "attention.pt")
        files += [str(out_dir / "attention.png"), str(out_dir / "attention.pt")]
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


# ---- entry point ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    """The `hvlab` command: parse ``argv`` (default: the command line) and run its subcommand; returns the exit code."""
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
    from .fast.memory import MemoryPlanError

    try:
        if args.command == "generate":
            out_dir, _ = cmd_generate(args)
            if out_dir is not None:  # None on sequence-parallel ranks other than 0
                print(out_dir)
        elif args.command == "info":
            cmd_info(args)
    except (ValueError, FileNotFoundError, IndexError, MemoryPlanError) as e:  # bad input: the message names the fix
        parser.exit(2, f"hvlab {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
