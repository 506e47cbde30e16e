"""hvlab's toy HunyuanVideo: the release architecture at laptop size, and its one-line loader.

Same classes and code path as the 13B release (token refiner, double and single blocks, 3D RoPE,
flow matching, causal 3D VAE with 8x spatial / 4x temporal compression, LLM + CLIP text encoders,
the video prompt template); only the sizes differ. Frames are 128 x 128 x 17 -> latents
16 x 5 x 16 x 16 -> 5 x 8 x 8 = 320 video tokens after the 1x2x2 patch.

The text encoders are a 4-layer Llama and a 2-layer CLIP text model over a word-level vocabulary,
kept at a fixed random initialisation: the DiT learns to read them (the token refiner is trained).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..model import PRESETS, HYVideoDiffusionTransformer
from ..vae import TINY_VAE_CONFIG, AutoencoderKLCausal3D, VAEConfig
from .facts import TINY_DEFAULTS, TOY_DEFAULTS, TOY_FRAMES, TOY_SIZE  # noqa: F401  (torch-free: --help reads them)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# The VAE: 8x spatial and 4x temporal compression into 16 channels, as the release; narrower blocks.
TOY_VAE_CONFIG = VAEConfig(
    block_out_channels=(32, 64, 64, 64),  # release (128, 256, 512, 512)
    layers_per_block=1,  # release 2
    norm_num_groups=8,  # release 32
    latent_channels=16,
    scaling_factor=1.0,  # replaced by 1 / std of the trained VAE's latents, stored in config.json
)

# Text encoders (fixed random initialisation).
TOY_LLM = dict(hidden=128, layers=4, heads=4, seed=1234, max_length=16)  # skip 2 -> layer-2 states
TOY_CLIP = dict(hidden=64, layers=2, seed=4321, max_length=77)


def build_text_encoders(tokenizer=None):
    """The toy LLM and CLIP text encoders at their fixed random initialisation."""
    from ..prompts import PROMPT_TEMPLATE
    from ..text_encoder import tiny_clip_encoder, tiny_llm_encoder
    from .tokenizer import load_toy_tokenizer

    tok = tokenizer or load_toy_tokenizer()
    llm = tiny_llm_encoder(tok, hidden=TOY_LLM["hidden"], layers=TOY_LLM["layers"], heads=TOY_LLM["heads"],
                           seed=TOY_LLM["seed"], template=PROMPT_TEMPLATE["dit-llm-encode-video"],
                           max_length=TOY_LLM["max_length"])
    clip = tiny_clip_encoder(load_toy_tokenizer(kind="clip"), hidden=TOY_CLIP["hidden"],
                             layers=TOY_CLIP["layers"], seed=TOY_CLIP["seed"], max_length=TOY_CLIP["max_length"])
    return llm, clip


def toy_vae_config(scaling_factor: float | None = None) -> VAEConfig:
    d = asdict(TOY_VAE_CONFIG)
    if scaling_factor is not None:
        d["scaling_factor"] = float(scaling_factor)
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_toy(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights_dir=None):
    """The shipped toy model as a ready `HunyuanVideoPipeline` (one line: ``pipe = hvlab.load_toy()``).

    Weights load through the same loaders as the release checkpoints (`load_dit_checkpoint`,
    `load_vae_checkpoint`) from safetensors files.
    """
    from ..checkpoint import load_dit_checkpoint, load_into, load_state_dict_file
    from ..pipeline import HunyuanVideoPipeline
    from ..validate import check_device, check_dtype
    from ..vae import load_vae_checkpoint

    device, dtype = check_device(device), check_dtype(dtype)
    wd = Path(weights_dir or os.environ.get("HVLAB_TOY_WEIGHTS", WEIGHTS_DIR))
    if not (wd / "dit.safetensors").exists():
        raise FileNotFoundError(
            f"toy weights not found in {wd} (expected dit.safetensors, vae.safetensors, "
            f"text_encoder.safetensors, text_encoder_2.safetensors, config.json). Train them with "
            f"`python -m hvlab.toy.train` or restore the folder from the repository.")
    meta = json.loads((wd / "config.json").read_text())
    dit = HYVideoDiffusionTransformer(PRESETS["toy"])  # the DiT preset (hvlab.model.PRESETS)
    load_dit_checkpoint(dit, str(wd / "dit.safetensors"))
    vae = AutoencoderKLCausal3D(toy_vae_config(meta["vae_scaling_factor"]))
    load_vae_checkpoint(vae, str(wd / "vae.safetensors"))
    llm, clip = build_text_encoders()
    load_into(llm.model, load_state_dict_file(wd / "text_encoder.safetensors"), "toy text_encoder")
    load_into(clip.model, load_state_dict_file(wd / "text_encoder_2.safetensors"), "toy text_encoder_2")
    for m in (dit, vae, llm, clip):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    defaults = dict(TOY_DEFAULTS, **meta.get("defaults", {}))
    return HunyuanVideoPipeline(dit, vae, llm, clip, defaults=defaults, device=device, dtype=dtype,
                                latent_rgb_map=meta.get("latent_to_rgb"))


def random_toy_pipeline(preset: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32):
    """A pipeline of the real architecture with seeded random weights and the toy's tokenizers, for tests
    and smoke runs (`hvlab.loading.random_pipeline` builds the DiT and VAE).

    "tiny": every block type at the smallest sizes (64 x 64 x 9 frames by default, 4 steps, a few ms per step
    on a CPU), with tiny text encoders over the toy vocabulary; "toy": the toy model's sizes and its own fixed
    text encoders, without its trained weights. The same seed always gives the same weights.
    """
    from ..loading import random_pipeline
    from ..text_encoder import tiny_clip_encoder, tiny_llm_encoder
    from .tokenizer import load_toy_tokenizer

    if preset == "tiny":
        dit_cfg, vae_cfg, defaults = PRESETS["tiny"], TINY_VAE_CONFIG, dict(TINY_DEFAULTS)
        # 3 layers, so the official "skip the last 2" picks layer 1
        llm = tiny_llm_encoder(load_toy_tokenizer(), hidden=dit_cfg.text_states_dim, layers=3, heads=2,
                               seed=seed + 1, max_length=32)
        clip = tiny_clip_encoder(load_toy_tokenizer(kind="clip"), hidden=dit_cfg.text_states_dim_2, layers=1,
                                 heads=2, seed=seed + 2, max_length=77)
    elif preset == "toy":
        dit_cfg, vae_cfg, defaults = PRESETS["toy"], toy_vae_config(), dict(TOY_DEFAULTS)
        llm, clip = build_text_encoders()  # the toy's own (fixed) text encoders
    else:
        raise ValueError(f'preset must be "tiny" or "toy", got {preset!r}')
    return random_pipeline(dit_cfg, vae_cfg, llm, clip, defaults=defaults, seed=seed, device=device, dtype=dtype)
