"""The size guard every run passes: what it will allocate, and how long it will take, before it starts.

`hvlab.fast.memory` plans the release model on a GPU before its weights load. This guard covers every model
(the toy, the random ones, the release) on the CPU and on a GPU, once the model is loaded and before the first
latent is drawn: `HunyuanVideoPipeline.generate` calls `check_run_size`, which refuses a run whose estimate
exceeds the memory available (the card's free memory; on the CPU the machine's available RAM), with the
estimate and sizes that would fit; and `estimate_seconds` gives the time a CPU run will take, so that a run of
hours says so before it starts.

What is counted (weights already loaded are not: they are no longer free memory):

- latents: x, v and the next x in float32, (B, C, T, h, w) each; true CFG doubles the DiT's batch;
- DiT activations: one double and one single block traced on the meta device at the run's token count
  (`hvlab.fast.memory.trace_dit_block_peaks`: shapes only, nothing allocated);
- VAE decode: the decoder traced on the meta device at a small latent (5 frames of 64 x 64 px), scaled by the
  voxels decoded at once (one video, or one tile with tiling): its activations grow with the voxels, and its
  frame-causal attention is computed in chunks of a fixed size; plus the decoded videos (float32 and uint8
  frames on the CPU);
- the weights that visit the device only for their stage (``cpu_offload``).

Estimates, not measurements: they are meant to catch the 20 GB `torch.randn` of a 100000 x 100000 request,
not to predict the last percent.
"""
from __future__ import annotations

import math
import os
import time

import torch

from .memory import GiB, MemoryPlanError, _LiveBytes, available_GiB, trace_dit_block_peaks

_REF_LATENT = (2, 8, 8)  # (T, h, w) of the traced decode: 5 frames of 64 x 64 pixels
ATTENTION_CHUNK_BYTES = 2**26 * 4  # vae_blocks.frame_causal_attention keeps its fp32 scores below 2**26 entries
_CACHE: dict = {}


def _cached(key, compute):
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def vae_decode_cost(vae_config, dtype: torch.dtype) -> tuple[float, float, int]:
    """(peak bytes inside the decoder, FLOPs, output voxels) for the reference latent (1, C, 2, 8, 8); cached."""
    def trace():
        from torch.utils.flop_counter import FlopCounterMode

        from ..vae import AutoencoderKLCausal3D

        vae = AutoencoderKLCausal3D(vae_config, device="meta", dtype=dtype)
        z = torch.empty(1, vae_config.latent_channels, *_REF_LATENT, device="meta", dtype=dtype)
        track, flops = _LiveBytes(), FlopCounterMode(display=False)
        with torch.no_grad(), flops, track:
            out = vae._decode_tile(z)
            del out
        T, h, w = _REF_LATENT
        voxels = (vae_config.temporal_compression_ratio * (T - 1) + 1) * h * w * vae_config.spatial_compression_ratio ** 2
        return float(track.peak), float(flops.get_total_flops()), voxels

    return _cached(("vae", repr(vae_config), str(dtype)), trace)


_REF_TOKENS = 256  # image tokens of the traced DiT blocks


def _dit_peaks(config, L_img: int, L_txt: int, dtype, batch: int, fast: bool, chunk_tokens) -> dict[str, float]:
    """One block's peaks at ``L_img`` image tokens: traced once per model at `_REF_TOKENS` and scaled by the
    token count (with attention an output-sized stub, every tensor in a block is (B, L, width); token chunking
    makes the scaled figure an upper bound)."""
    ref = _cached(("dit", repr(config), L_txt, str(dtype), batch, fast, chunk_tokens),
                  lambda: trace_dit_block_peaks(config, _REF_TOKENS, L_txt, chunk_tokens, dtype=dtype, batch=batch,
                                                fast=fast))
    scale = (L_img + L_txt) / (_REF_TOKENS + L_txt)
    return {k: v * scale for k, v in ref.items()}


def _param_bytes(module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters()))


def _on(module, device: torch.device) -> bool:
    p = next(module.parameters(), None)
    return p is None or p.device.type == device.type


def _decode_voxels(vae, frames: int, height: int, width: int) -> int:
    """Pixels x frames decoded in one decoder call: the whole video, or one tile."""
    if not vae.use_tiling:
        return frames * height * width
    t = vae.tiling
    rs, rt = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
    edge = t.tile_latent_size * rs
    return min(frames, rt * t.tile_latent_frames + 1) * min(height, edge) * min(width, edge)


def estimate_run(pipe, height: int, width: int, video_length: int, batch: int = 1, cfg: bool = False) -> dict:
    """Bytes per stage a run allocates on ``pipe.device`` (beyond the weights resident there) and on the host.

    Returns ``{"device": torch.device, "stages": {stage: bytes}, "parts": {name: bytes}, "host": bytes,
    "L_img": int}``; on the CPU the host's videos are part of the "vae" stage.
    """
    dit, vae, dev = getattr(pipe.transformer, "model", pipe.transformer), pipe.vae, torch.device(pipe.device)
    c = dit.config
    C, T, h, w = (c.in_channels, *pipe.latent_shape(height, width, video_length)[1:])
    pt, ph, pw = c.patch_size
    L_img = (T // pt) * (h // ph) * (w // pw)
    L_txt = int(getattr(pipe.text_encoder, "max_length", 256))
    rows = batch * (2 if cfg else 1)
    first = dit.double_blocks[0] if len(dit.double_blocks) else (dit.single_blocks[0] if len(dit.single_blocks) else None)
    fast = first is not None and type(first).__name__.startswith("Fast")
    dtype = pipe.dtype if pipe.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
    peaks = _dit_peaks(c, L_img, L_txt, dtype, rows, fast, getattr(first, "chunk_tokens", None)) if first else \
        {"double": 0.0, "single": 0.0, "stream": rows * (L_img + L_txt) * c.hidden_size * 4.0}
    latent = batch * C * T * h * w * 4.0
    vae_dtype = next(vae.parameters()).dtype
    peak_ref, _, voxels_ref = vae_decode_cost(vae.config, vae_dtype)
    voxels = _decode_voxels(vae, video_length, height, width)
    rs, rt = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
    latent_tokens = voxels / (rs * rs * rt)  # the mid-block attention's sequence, about
    video_px = 3.0 * video_length * height * width
    parts = {
        "latents (x, v, next x; fp32)": 3 * latent + rows * C * T * h * w * torch.finfo(dtype).bits / 8,
        "DiT activations (one block, traced)": 2 * peaks["stream"] + max(peaks["double"], peaks["single"])
                                              + 2 * L_img * c.head_dim * 4.0,
        "VAE decoder activations (scaled trace)": peak_ref * voxels / voxels_ref
                                                  + min(ATTENTION_CHUNK_BYTES, 4.0 * latent_tokens ** 2),
        "decoded video (one, VAE dtype)": video_px * torch.finfo(vae_dtype).bits / 8,
        "videos on the CPU (fp32 + uint8 frames)": batch * video_px * 5.0,
    }
    offload = {"text": max((_param_bytes(e) for e in (pipe.text_encoder, pipe.text_encoder_2) if not _on(e, dev)),
                           default=0.0),
               "vae": _param_bytes(vae) if not _on(vae, dev) else 0.0}
    stages = {
        "text": offload["text"],
        "dit": parts["latents (x, v, next x; fp32)"] + parts["DiT activations (one block, traced)"],
        "vae": latent + parts["VAE decoder activations (scaled trace)"] + parts["decoded video (one, VAE dtype)"]
        + offload["vae"],
    }
    host = parts["videos on the CPU (fp32 + uint8 frames)"]
    if dev.type == "cpu":
        stages["vae"] += host
        host = 0.0
    return {"device": dev, "stages": stages, "parts": parts, "host": host, "L_img": L_img}


def host_available_GiB() -> tuple[float, str]:
    """RAM this process may still use: /proc/meminfo's MemAvailable (and a cgroup limit, if lower)."""
    have, where = math.inf, "no memory figure on this system"
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ":" in ln}
        have, where = info["MemAvailable"] / GiB, f"the machine has {info['MemAvailable'] / GiB:.1f} GiB of RAM available"
    except (OSError, KeyError, ValueError, IndexError):
        pages = getattr(os, "sysconf", lambda name: -1)
        try:
            have = pages("SC_AVPHYS_PAGES") * pages("SC_PAGE_SIZE") / GiB
            where = f"the machine has {have:.1f} GiB of RAM free"
        except (ValueError, OSError):
            pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max" and (int(limit) - used) / GiB < have:
            have = (int(limit) - used) / GiB
            where = f"this container may use {have:.1f} GiB more (cgroup memory.max)"
    except (OSError, ValueError):
        pass
    return have, where


def _peak(est: dict) -> tuple[str, float]:
    stage = max(est["stages"], key=est["stages"].get)
    return stage, est["stages"][stage]


def check_run_size(pipe, height: int, width: int, video_length: int, batch: int = 1, cfg: bool = False,
                   cap_GiB: float | None = None) -> dict:
    """Raise `MemoryPlanError` before anything is allocated when the run would not fit; return the estimate.

    The message gives the estimate per stage, the memory available, and the largest sizes that would fit
    (the same aspect ratio and length, or the same size with fewer frames), and VAE tiling when the decode is
    what does not fit."""
    est = estimate_run(pipe, height, width, video_length, batch, cfg)
    dev = est["device"]
    if dev.type == "cuda":
        have, where = available_GiB(dev, cap_GiB)
    else:
        have, where = host_available_GiB()
        if cap_GiB is not None and cap_GiB < have:
            have, where = cap_GiB, f"the cap is {cap_GiB:.1f} GiB"
    stage, need = _peak(est)
    host_have, host_where = host_available_GiB() if est["host"] else (math.inf, "")
    if need / GiB <= have and est["host"] / GiB <= host_have:
        return est

    def fits(h, w, f):
        e = estimate_run(pipe, h, w, f, batch, cfg)
        return _peak(e)[1] / GiB <= have and e["host"] / GiB <= host_have

    tips = []  # sizes stay on the 16-pixel and 4k + 1 grids
    for r in (0.75, 0.5, 0.35, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.004, 0.002, 0.001):
        h2, w2 = max(16, int(height * r) // 16 * 16), max(16, int(width * r) // 16 * 16)
        if (h2, w2) != (height, width) and fits(h2, w2, video_length):
            tips.append(f"--video-size {h2} {w2} (height={h2}, width={w2})")
            break
    f2 = video_length
    while f2 > 1:
        f2 = max(1, (f2 - 1) // 8 * 4 + 1)  # about half, still 4k + 1
        if fits(height, width, f2):
            tips.append(f"--video-length {f2} (video_length={f2})")
            break
    if stage == "vae" and not pipe.vae.use_tiling:
        tips.append("VAE tiling (--vae-tiling, pipe.enable_vae_tiling())")
    if batch > 1:
        tips.append("fewer videos per run (--num-videos)")
    on_host = need / GiB <= have
    what = (f"~{est['host'] / GiB:.1f} GiB on the CPU for the decoded videos but {host_where}" if on_host else
            f"~{need / GiB:.1f} GiB on {dev.type} in the {stage} stage but {where}")
    terms = "; ".join(f"{k} {v / GiB:.2f}" for k, v in est["parts"].items() if v / GiB >= 0.005)
    raise MemoryPlanError(
        f"{height}x{width}x{video_length} ({batch} video{'s' if batch > 1 else ''}, {est['L_img']:,} image tokens) "
        f"needs {what}; the estimate in GiB: {terms}. "
        + (f"Settings that fit: {'; '.join(tips)}" if tips else "No smaller setting of this run fits either"))


# ---- time ---------------------------------------------------------------------------------------------------

def estimate_flops(pipe, height: int, width: int, video_length: int, steps: int, batch: int = 1,
                   cfg: bool = False) -> dict[str, float]:
    """FLOPs of the denoising loop and of the decode: the DiT's linears 2 x params x tokens (each stream's
    weights on its own tokens), attention 4 x L^2 x D per block, the VAE from its meta trace scaled by voxels."""
    from ..model import params_count

    dit = getattr(pipe.transformer, "model", pipe.transformer)
    c = dit.config
    C, T, h, w = (c.in_channels, *pipe.latent_shape(height, width, video_length)[1:])
    pt, ph, pw = c.patch_size
    L_img = (T // pt) * (h // ph) * (w // pw)
    L_txt = int(getattr(pipe.text_encoder, "max_length", 256))
    L = L_img + L_txt
    counts = params_count(dit)
    blocks = len(dit.double_blocks) + len(dit.single_blocks)
    per_forward = 2 * (counts["double"] / 2 * L + counts["single"] * L) + 4 * L * L * c.hidden_size * blocks
    rows = batch * (2 if cfg else 1)
    _, flops_ref, voxels_ref = vae_decode_cost(pipe.vae.config, next(pipe.vae.parameters()).dtype)
    return {"denoise": per_forward * rows * steps, "decode": flops_ref * batch * video_length * height * width / voxels_ref}


def cpu_flops_per_second() -> float:
    """This CPU's float32 matmul speed at the current thread count: the best of a few ~5 ms bursts (~40 ms in all;
    the best, since a burst the scheduler interrupts only looks slower), cached."""
    def measure():
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        a @ b
        best = 0.0
        for _ in range(8):
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.005:
                a @ b
                n += 1
            best = max(best, 2 * 256**3 * n / (time.perf_counter() - t0))
        return best

    return _cached(("cpu_rate", torch.get_num_threads()), measure)


def estimate_seconds(pipe, height: int, width: int, video_length: int, steps: int, batch: int = 1,
                     cfg: bool = False, efficiency: tuple[float, float] = (0.3, 0.6)) -> dict[str, float]:
    """Rough seconds on the CPU: `estimate_flops` over the measured matmul speed times ``efficiency`` (denoising,
    decode): the DiT's small matmuls and attention, and the VAE's convolutions, run below a large matmul's speed
    (factors set on the toy at 128 x 128 x 17 on a busy 2-core CPU, where the estimates came within about a third
    of the measured 36 s of denoising and 32 s of decoding)."""
    rate = cpu_flops_per_second()
    f = estimate_flops(pipe, height, width, video_length, steps, batch, cfg)
    denoise, decode = f["denoise"] / (rate * efficiency[0]), f["decode"] / (rate * efficiency[1])
    return {"denoise": denoise, "decode": decode, "per_step": denoise / max(steps, 1)}


def describe_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
