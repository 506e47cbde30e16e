"""Writing a checkpoint in any layout hvlab reads: ``hvlab convert SRC DST --to {official,diffusers,single}``.

The source is read exactly as `hvlab.loading.load_pipeline` reads it (`hvlab.readers`: each model built on the
meta device, its tensors memory-mapped and kept in their stored dtypes), then every model's state dict is
written under the target layout's names:

* ``official``: ``hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt`` ({"module": official
  state dict}; an FP8 DiT becomes the ``_fp8.pt`` + ``_fp8_map.pt`` pair), ``hunyuan-video-t2v-720p/vae/``
  (``pytorch_model.pt`` + a release-style ``config.json``), ``text_encoder/`` and ``text_encoder_2/``
  (Hugging Face folders, tokenizers inside);
* ``diffusers``: ``model_index.json``, ``transformer/`` (config.json + safetensors shards of <= 5 GB under
  diffusers' names, with ``diffusion_pytorch_model.safetensors.index.json`` when there are several), ``vae/``,
  ``text_encoder/`` + ``tokenizer/``, ``text_encoder_2/`` + ``tokenizer_2/``, ``scheduler/``;
* ``single``: one .safetensors per component under the names ComfyUI's files use (DiT: official names, FP8 as
  is, ComfyUI's ``scaled_fp8`` marker + ``scale_weight`` when a scale is not 1; LLM: ``model.``-prefixed; CLIP:
  ``text_model.``), each with its config in the safetensors metadata, and the tokenizers beside them in
  ``tokenizer/`` and ``tokenizer_2/`` (single files carry none).

Only names and containers change, never a number: converting there and back gives the same tensors, bit for
bit (tests/test_layouts.py). The output is written to a temporary folder beside ``DST`` and renamed into place
once complete; an existing, non-empty ``DST`` is refused.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import iter_official_to_diffusers, save_safetensors
from .layouts import RELEASE_FILES, Layout, detect_layout
from .readers import METADATA_KEY, load_dit, load_text_encoder, load_vae

TARGETS = ("official", "diffusers", "single")
SHARD_BYTES = 5 * 10**9  # diffusers' conversion script writes the transformer in 5 GB shards
SINGLE_NAMES = {"dit": "hunyuan_video_dit_{dtype}.safetensors", "vae": "hunyuan_video_vae_{dtype}.safetensors",
                "text_encoder": "llava_llama3_{dtype}.safetensors", "text_encoder_2": "clip_l.safetensors"}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float8_e4m3fn: "fp8_e4m3fn"}


def _dtype_name(model: torch.nn.Module) -> str:
    """The file-name dtype: fp8 when any weight is FP8, else the dtype most parameters have."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if torch.float8_e4m3fn in counts:
        return DTYPE_NAMES[torch.float8_e4m3fn]
    dtype = max(counts, key=counts.get)
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _fp8_scales(dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    from .fast.fp8 import FP8Linear

    return {n: m.weight_scale.float().cpu() for n, m in dit.named_modules() if isinstance(m, FP8Linear)}


# ---------------------------------------------------------------------------------------- config files
def diffusers_transformer_config(config) -> dict:
    """diffusers' transformer/config.json (HunyuanVideoTransformer3DModel's arguments) for an `HYVideoConfig`."""
    pt, ph, pw = config.patch_size
    if ph != pw or not config.qkv_bias:
        raise ValueError(f"diffusers' HunyuanVideoTransformer3DModel needs a square spatial patch and qkv biases; "
                         f"this DiT has patch_size={config.patch_size}, qkv_bias={config.qkv_bias}")
    return {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": config.in_channels,
            "out_channels": config.out_channels, "num_attention_heads": config.heads_num,
            "attention_head_dim": config.head_dim, "num_layers": config.mm_double_blocks_depth,
            "num_single_layers": config.mm_single_blocks_depth, "num_refiner_layers": config.refiner_depth,
            "mlp_ratio": config.mlp_width_ratio, "patch_size": ph, "patch_size_t": pt, "qk_norm": "rms_norm",
            "guidance_embeds": config.guidance_embed, "text_embed_dim": config.text_states_dim,
            "pooled_projection_dim": config.text_states_dim_2, "rope_theta": config.rope_theta,
            "rope_axes_dim": list(config.rope_dim_list)}


def diffusers_vae_config(config) -> dict:
    """diffusers' vae/config.json (AutoencoderKLHunyuanVideo's arguments) for a `VAEConfig`."""
    n = len(config.block_out_channels)
    return {"_class_name": "AutoencoderKLHunyuanVideo", "in_channels": config.in_channels,
            "out_channels": config.out_channels, "latent_channels": config.latent_channels,
            "down_block_types": ["HunyuanVideoDownBlock3D"] * n, "up_block_types": ["HunyuanVideoUpBlock3D"] * n,
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "act_fn": "silu", "norm_num_groups": config.norm_num_groups, "scaling_factor": config.scaling_factor,
            "spatial_compression_ratio": config.spatial_compression_ratio,
            "temporal_compression_ratio": config.temporal_compression_ratio,
            "mid_block_add_attention": config.mid_block_add_attention}


def release_vae_config(config) -> dict:
    """The release's vae/config.json (diffusers-0.4-era names, ``time_compression_ratio``) for a `VAEConfig`."""
    n = len(config.block_out_channels)
    return {"_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "block_out_channels": list(config.block_out_channels),
            "down_block_types": ["DownEncoderBlockCausal3D"] * n, "up_block_types": ["UpDecoderBlockCausal3D"] * n,
            "in_channels": config.in_channels, "out_channels": config.out_channels,
            "latent_channels": config.latent_channels, "layers_per_block": config.layers_per_block,
            "norm_num_groups": config.norm_num_groups, "sample_size": config.sample_size,
            "sample_tsize": config.sample_tsize, "scaling_factor": config.scaling_factor,
            "time_compression_ratio": config.temporal_compression_ratio,
            "spatial_compression_ratio": config.spatial_compression_ratio,
            "mid_block_add_attention": config.mid_block_add_attention}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save_encoder(encoder, model_dir: Path, tokenizer_dir: Path) -> None:
    encoder.model.save_pretrained(model_dir)
    encoder.tokenizer.save_pretrained(tokenizer_dir)


# ------------------------------------------------------------------------------------------ the writers
def write_official(dst: Path, dit, vae, llm, clip) -> None:
    sd, scales = dit.state_dict(), _fp8_scales(dit)
    dit_file = dst / (RELEASE_FILES["dit_fp8"] if scales else RELEASE_FILES["dit"])
    dit_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": sd}, dit_file)
    if scales:  # the official FP8 pair: one float32 scale per FP8 layer, keyed by module name
        torch.save(scales, dst / RELEASE_FILES["dit_fp8_map"])
    (dst / RELEASE_FILES["vae"]).parent.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), dst / RELEASE_FILES["vae"])
    _write_json(dst / RELEASE_FILES["vae_config"], release_vae_config(vae.config))
    _save_encoder(llm, dst / "text_encoder", dst / "text_encoder")
    _save_encoder(clip, dst / "text_encoder_2", dst / "text_encoder_2")


def _write_shards(items, folder: Path, stem: str, max_bytes: int = SHARD_BYTES) -> None:
    """diffusers' sharded safetensors: ``stem-0000i-of-0000n.safetensors`` + ``stem.safetensors.index.json``,
    or a single ``stem.safetensors`` when everything fits in one shard."""
    shards, size = [{}], 0
    for k, v in items:
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_safetensors(shards[0], str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(v.numel() * v.element_size() for v in shard.values())
    _write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_diffusers(dst: Path, dit, vae, llm, clip, shard_bytes: int = SHARD_BYTES) -> None:
    if _fp8_scales(dit):
        raise ValueError("the diffusers layout has no FP8 format for HunyuanVideo's transformer: convert an FP8 "
                         "DiT to the official or single layout (or load it in bf16 first)")
    from .runs import RELEASE_DEFAULTS

    dst.mkdir(parents=True, exist_ok=True)
    version = "0.32.0"  # the first diffusers release with HunyuanVideo; hvlab does not need diffusers installed
    _write_json(dst / "model_index.json", {
        "_class_name": "HunyuanVideoPipeline", "_diffusers_version": version,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", type(llm.model).__name__],
        "text_encoder_2": ["transformers", type(clip.model).__name__],
        "tokenizer": ["transformers", type(llm.tokenizer).__name__],
        "tokenizer_2": ["transformers", type(clip.tokenizer).__name__],
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]})
    _write_json(dst / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": version,
        "shift": RELEASE_DEFAULTS["flow_shift"], "num_train_timesteps": 1000})
    _write_json(dst / "transformer" / "config.json",
                dict(diffusers_transformer_config(dit.config), _diffusers_version=version))
    items = iter_official_to_diffusers(dit.state_dict().items(), hidden_size=dit.config.hidden_size)
    _write_shards(items, dst / "transformer", "diffusion_pytorch_model", shard_bytes)
    _write_json(dst / "vae" / "config.json", dict(diffusers_vae_config(vae.config), _diffusers_version=version))
    save_safetensors(vae.state_dict(), str(dst / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    _save_encoder(llm, dst / "text_encoder", dst / "tokenizer")
    _save_encoder(clip, dst / "text_encoder_2", dst / "tokenizer_2")


def write_single(dst: Path, dit, vae, llm, clip) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    sd, scales = dict(dit.state_dict()), _fp8_scales(dit)
    if scales and any(bool((s != 1).any()) for s in scales.values()):  # ComfyUI's scaled-fp8 convention
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        sd.update({f"{n}.scale_weight": s for n, s in scales.items()})
    meta = {METADATA_KEY: json.dumps(asdict(dit.config))}
    save_safetensors(sd, str(dst / SINGLE_NAMES["dit"].format(dtype=_dtype_name(dit))), metadata=meta)
    save_safetensors(vae.state_dict(), str(dst / SINGLE_NAMES["vae"].format(dtype=_dtype_name(vae))),
                     metadata={METADATA_KEY: json.dumps(asdict(vae.config))})
    clip_keys = clip.model.state_dict()
    clip_prefix = "" if any(k.startswith("text_model.") for k in clip_keys) else "text_model."  # transformers v5
    for encoder, role, prefix, tok in ((llm, "text_encoder", "model.", "tokenizer"),
                                       (clip, "text_encoder_2", clip_prefix, "tokenizer_2")):
        save_safetensors({prefix + k: v for k, v in encoder.model.state_dict().items()},
                         str(dst / SINGLE_NAMES[role].format(dtype=_dtype_name(encoder.model))),
                         metadata={METADATA_KEY: encoder.model.config.to_json_string()})
        encoder.tokenizer.save_pretrained(dst / tok)


WRITERS = {"official": write_official, "diffusers": write_diffusers, "single": write_single}


def convert(src=None, dst=None, to: str = "single", dit_config=None, vae_config=None, **components) -> Layout:
    """Read ``src`` (any layout; ``components`` give or replace single components, as in
    `hvlab.layouts.detect_layout`) and write it to ``dst`` in layout ``to``. Returns the layout detected in
    ``dst`` afterwards, which is how the output is checked to be readable."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not empty: choose a new folder (nothing is overwritten)")
    layout = detect_layout(src, **components)
    c = layout.components
    dit = load_dit(c["dit"], dit_config, dtype=None, fp8_mode="weight_only")
    vae = load_vae(c["vae"], vae_config, dtype=None)
    llm = load_text_encoder(c["text_encoder"], dtype=None)
    clip = load_text_encoder(c["text_encoder_2"], dtype=None)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        WRITERS[to](tmp, dit, vae, llm, clip)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return detect_layout(dst)
