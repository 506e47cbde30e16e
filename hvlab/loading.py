"""Loading: `load_pipeline`, and pipelines with seeded random weights.

`load_pipeline` finds the checkpoint's layout (official ``ckpts/``, diffusers, single files: `hvlab.layouts`,
which also holds `RELEASE_FILES` and `check_release_layout`), checks the memory plan, builds every model on the
meta device and assigns its weights from memory-mapped files (`hvlab.readers`), and on CUDA swaps in the fast
wing's blocks (`hvlab.fast.accelerate`). `random_pipeline` assembles a
pipeline of any config with seeded random DiT and VAE weights around the text encoders it is given (the toy's
builders, `hvlab.toy.model.random_toy_pipeline`, supply small ones).
"""
from __future__ import annotations

import logging

import torch

from .layouts import RELEASE_FILES, CheckpointLayoutError, check_release_layout  # noqa: F401 (re-exported)
from .pipeline import HunyuanVideoPipeline

log = logging.getLogger("hvlab")


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


def load_pipeline(model_base=None, device=None, dtype=torch.bfloat16, fp8: bool = False, cpu_offload: bool = False,
                  vae_tiling: bool = True, text_encoder_dtype=torch.float16, vae_dtype=torch.float16,
                  dit_config=None, plan_size: tuple[int, int, int] | None = None,
                  vae_tile_size: tuple[int, int] | None = None, memory_limit_gib: float | None = None,
                  check_memory: bool = True, fast: bool | None = None, chunk_tokens: int | None = None, *,
                  dit=None, vae=None, text_encoder=None, text_encoder_2=None, vae_config=None) -> HunyuanVideoPipeline:
    """The release model from whatever layout it is stored in (`hvlab.layouts`): the official ``ckpts/`` folder,
    a diffusers folder, a folder of single .safetensors files (ComfyUI's), or components given one by one
    (``dit=``, ``vae=``, ``text_encoder=``, ``text_encoder_2=``, each a file or folder, also replacing one
    component of ``model_base``). The layout found is logged and kept as ``pipe.layout``; a path that is none of
    them raises `CheckpointLayoutError` listing the layouts read and what was found.

    Every model is built on the meta device and its tensors assigned from memory-mapped files shard by shard, so
    the 13B DiT is never initialised in memory. FP8 DiT files load as FP8 (`hvlab.fast.fp8.FP8Linear`); ``fp8``
    converts bf16 weights (or picks the official _fp8.pt pair when it is there). ``dit_config`` /
    ``vae_config`` default to what the layout says (diffusers config.json, hvlab's metadata), else the release's
    (official pickles) or what the tensor shapes give (single files; tiny test models pass theirs).
    ``vae_tile_size`` = (px, frames) overrides the VAE config's tiles (release 256 px, 64 frames).
    ``fast`` (default: on CUDA) swaps in the fast wing's blocks (`hvlab.fast.accelerate`, with
    ``chunk_tokens``); off, the DiT runs the reference blocks.

    Before any weight is read (on CUDA, or anywhere with ``memory_limit_gib``), `hvlab.fast.memory.check_load_plan`
    estimates the peak for ``plan_size`` = (video_length, height, width) (default the release's 129 x 720 x
    1280) with these settings and raises `hvlab.fast.memory.MemoryPlanError`, naming the settings that would fit,
    when it exceeds the card's free memory (or ``memory_limit_gib``). ``check_memory=False`` skips the check.
    """
    from .layouts import detect_layout
    from .readers import dit_config_for, dit_is_fp8, load_dit, load_text_encoder, load_vae, vae_config_for

    from .validate import check_device, check_dtype

    device = torch.device(check_device(device) if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype, text_encoder_dtype, vae_dtype = (check_dtype(dtype), check_dtype(text_encoder_dtype, "text_encoder_dtype"),
                                            check_dtype(vae_dtype, "vae_dtype"))
    components = dict(dit=dit, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if model_base is None and not any(components.values()):
        model_base = "ckpts"
    layout = detect_layout(model_base, prefer_fp8=fp8, **components)
    log.info("hvlab: loading the %s", layout)
    c = layout.components
    config = dit_config_for(c["dit"], dit_config)
    file_fp8 = dit_is_fp8(c["dit"])
    vc = vae_config_for(c["vae"], vae_config)  # a config file or a header, not weights
    if check_memory and (device.type == "cuda" or memory_limit_gib is not None):
        from .fast.memory import RELEASE_PLAN_SIZE, check_load_plan

        tile = tuple(vae_tile_size or (vc.sample_size, vc.sample_tsize)) if vae_tiling else None
        check_load_plan(config, device, plan_size or RELEASE_PLAN_SIZE, fp8=fp8 or file_fp8,
                        cpu_offload=cpu_offload, vae_tile=tile, cap_GiB=memory_limit_gib)
    dit_model = load_dit(c["dit"], config, device=device, dtype=dtype)
    if fp8 and not file_fp8:
        from .fast.fp8 import convert_to_fp8

        convert_to_fp8(dit_model)
    if device.type == "cuda" if fast is None else fast:
        from .fast import accelerate

        accelerate(dit_model, chunk_tokens=chunk_tokens)
    vae_model = load_vae(c["vae"], vc, dtype=vae_dtype)
    te_device = "cpu" if cpu_offload else device
    llm = load_text_encoder(c["text_encoder"], dtype=text_encoder_dtype, device=te_device)
    clip = load_text_encoder(c["text_encoder_2"], dtype=text_encoder_dtype, device=te_device)
    vae_model.to("cpu" if cpu_offload else device)
    if vae_tiling:
        vae_model.enable_tiling(*(vae_tile_size or ()))
    for m in (dit_model, vae_model, llm, clip):
        m.eval().requires_grad_(False)
    pipe = HunyuanVideoPipeline(dit_model, vae_model, llm, clip, device=device, dtype=dtype, cpu_offload=cpu_offload)
    pipe.layout = layout
    return pipe
