"""Loading: the release checkpoint layout, `load_pipeline`, and pipelines with seeded random weights.

`load_pipeline` reads the official ``ckpts/`` folder (`RELEASE_FILES`; `check_release_layout` names what is
missing) after checking the memory plan, builds the 13B DiT on the meta device so it is never initialised in
memory, and on CUDA swaps in the fast wing's blocks (`hvlab.fast.accelerate`). `random_pipeline` assembles a
pipeline of any config with seeded random DiT and VAE weights around the text encoders it is given (the toy's
builders, `hvlab.toy.model.random_toy_pipeline`, supply small ones).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .pipeline import HunyuanVideoPipeline


def random_pipeline(dit_config, vae_config, text_encoder, text_encoder_2, defaults: dict | None = None, seed: int = 0,
                    device="cpu", dtype=torch.float32, latent_rgb_map: dict | None = None) -> HunyuanVideoPipeline:
    """A pipeline of the real architecture with seeded random DiT and VAE weights, for tests and smoke runs.

    ``dit_config`` / ``vae_config``: an `hvlab.model.HYVideoConfig` and an `hvlab.vae.VAEConfig`;
    ``text_encoder`` / ``text_encoder_2``: the LLM and CLIP `hvlab.text_encoder.TextEncoder` (with their
    tokenizers); ``defaults``: the generation defaults (see `HunyuanVideoPipeline`). The same seed always gives
    the same weights, whatever the caller's RNG state, so a random pipeline's videos are reproducible.
    """
    from .model import HYVideoDiffusionTransformer, randomize_weights_
    from .validate import check_device, check_dtype
    from .vae import AutoencoderKLCausal3D

    device, dtype = check_device(device), check_dtype(dtype)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        dit = randomize_weights_(HYVideoDiffusionTransformer(dit_config), seed=seed)
        vae = AutoencoderKLCausal3D(vae_config)
    for m in (dit, vae, text_encoder, text_encoder_2):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return HunyuanVideoPipeline(dit, vae, text_encoder, text_encoder_2, defaults=defaults, device=device, dtype=dtype,
                                latent_rgb_map=latent_rgb_map)


RELEASE_DIT_DIR = "hunyuan-video-t2v-720p/transformers"
RELEASE_FILES = {  # what `load_pipeline` needs under model_base (the official ckpts/ layout)
    "dit": f"{RELEASE_DIT_DIR}/mp_rank_00_model_states.pt",
    "dit_fp8": f"{RELEASE_DIT_DIR}/mp_rank_00_model_states_fp8.pt",
    "dit_fp8_map": f"{RELEASE_DIT_DIR}/mp_rank_00_model_states_fp8_map.pt",
    "vae_config": "hunyuan-video-t2v-720p/vae/config.json",
    "vae": "hunyuan-video-t2v-720p/vae/pytorch_model.pt",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
}


class CheckpointLayoutError(FileNotFoundError):
    """A model folder that is not the release layout; the message lists what was expected and found."""


def _listing(base: Path, depth: int = 3, limit: int = 40) -> list[str]:
    found = []
    for root, dirs, files in os.walk(base):
        rel = Path(root).relative_to(base)
        if len(rel.parts) >= depth:
            dirs[:] = []
        dirs.sort()
        found += [str(rel / n) + ("/" if n in dirs else "") for n in sorted(dirs) + sorted(files)]
        if len(found) > limit:
            return found[:limit] + ["..."]
    return found


def check_release_layout(model_base, fp8: bool = False) -> dict[str, Path]:
    """Paths of the release files under ``model_base``; raises `CheckpointLayoutError` naming what is missing."""
    base = Path(model_base)
    p = {k: base / v for k, v in RELEASE_FILES.items()}
    has_bf16 = p["dit"].is_file()
    has_fp8 = p["dit_fp8"].is_file() and p["dit_fp8_map"].is_file()
    missing = [] if has_bf16 or has_fp8 else [RELEASE_FILES["dit"] + (" (or the _fp8.pt + _fp8_map.pt pair)")]
    missing += [RELEASE_FILES[k] for k in ("vae_config", "vae", "text_encoder", "text_encoder_2") if not p[k].is_file()]
    if missing:
        expected = "\n  ".join(f"{v}" for v in RELEASE_FILES.values())
        found = "\n  ".join(_listing(base)) if base.is_dir() else "(the folder does not exist)"
        raise CheckpointLayoutError(
            f"{base} is not the HunyuanVideo release layout: missing {missing}.\nExpected under {base}:\n  {expected}\n"
            f"Found:\n  {found or '(empty)'}\nDownload the release into this layout (see the official README's "
            f"ckpts/ section), or pass --model toy for the shipped toy model.")
    p["use_fp8_file"] = has_fp8 and (fp8 or not has_bf16)
    return p


def load_pipeline(model_base="ckpts", device=None, dtype=torch.bfloat16, fp8: bool = False, cpu_offload: bool = False,
                  vae_tiling: bool = True, text_encoder_dtype=torch.float16, vae_dtype=torch.float16,
                  dit_config=None, plan_size: tuple[int, int, int] | None = None,
                  vae_tile_size: tuple[int, int] | None = None, memory_limit_gib: float | None = None,
                  check_memory: bool = True, fast: bool | None = None,
                  chunk_tokens: int | None = None) -> HunyuanVideoPipeline:
    """The release model from the official ``ckpts/`` layout (see `RELEASE_FILES`).

    The DiT is built on the meta device and its weights assigned from the file, so the 13B model is never
    initialised in memory. ``fp8`` uses the _fp8.pt pair when present, else converts the bf16 weights.
    ``dit_config`` defaults to the release's `HYVIDEO_T2_CONFIG` (tests pass a tiny one).
    ``vae_tile_size`` = (px, frames) overrides the VAE config's tiles (release 256 px, 64 frames).
    ``fast`` (default: on CUDA) swaps in the fast wing's blocks (`hvlab.fast.accelerate`, with
    ``chunk_tokens``); off, the DiT runs the reference blocks.

    Before any weight is read (on CUDA, or anywhere with ``memory_limit_gib``), `hvlab.fast.memory.check_load_plan`
    estimates the peak for ``plan_size`` = (video_length, height, width) (default the release's 129 x 720 x
    1280) with these settings and raises `hvlab.fast.memory.MemoryPlanError`, naming the settings that would fit,
    when it exceeds the card's free memory (or ``memory_limit_gib``). ``check_memory=False`` skips the check.
    """
    from .model import HYVIDEO_T2_CONFIG, HYVideoDiffusionTransformer
    from .text_encoder import load_clip_encoder, load_llm_encoder
    from .validate import check_device, check_dtype
    from .vae import AutoencoderKLCausal3D, vae_config_from_json

    device = torch.device(check_device(device) if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype, text_encoder_dtype, vae_dtype = (check_dtype(dtype), check_dtype(text_encoder_dtype, "text_encoder_dtype"),
                                            check_dtype(vae_dtype, "vae_dtype"))
    p = check_release_layout(model_base, fp8)
    config = dit_config or HYVIDEO_T2_CONFIG
    if check_memory and (device.type == "cuda" or memory_limit_gib is not None):
        from .fast.memory import RELEASE_PLAN_SIZE, check_load_plan

        vc = vae_config_from_json(p["vae_config"])  # a config file, not weights
        tile = tuple(vae_tile_size or (vc.sample_size, vc.sample_tsize)) if vae_tiling else None
        check_load_plan(config, device, plan_size or RELEASE_PLAN_SIZE, fp8=fp8 or p["use_fp8_file"],
                        cpu_offload=cpu_offload, vae_tile=tile, cap_GiB=memory_limit_gib)
    dit = HYVideoDiffusionTransformer(config, device="meta")
    if p["use_fp8_file"]:
        from .fast.fp8 import load_fp8_checkpoint

        load_fp8_checkpoint(dit, p["dit_fp8"], p["dit_fp8_map"], device=device)
        dit.to(device)
    else:
        from .checkpoint import load_dit_checkpoint

        load_dit_checkpoint(dit, str(p["dit"]))
        dit.to(device=device, dtype=dtype)
        if fp8:
            from .fast.fp8 import convert_to_fp8

            convert_to_fp8(dit)
    if device.type == "cuda" if fast is None else fast:
        from .fast import accelerate

        accelerate(dit, chunk_tokens=chunk_tokens)
    vae = AutoencoderKLCausal3D.from_pretrained(p["vae"].parent, dtype=vae_dtype)
    te_device = "cpu" if cpu_offload else device
    llm = load_llm_encoder(str(p["text_encoder"].parent), dtype=text_encoder_dtype, device=te_device)
    clip = load_clip_encoder(str(p["text_encoder_2"].parent), dtype=text_encoder_dtype, device=te_device)
    vae.to("cpu" if cpu_offload else device)
    if vae_tiling:
        vae.enable_tiling(*(vae_tile_size or ()))
    for m in (dit, vae, llm, clip):
        m.eval().requires_grad_(False)
    return HunyuanVideoPipeline(dit, vae, llm, clip, device=device, dtype=dtype, cpu_offload=cpu_offload)
