"""Video sizes and files: the 4k + 1 frame rule, the 16-pixel size rule, latent shapes, uint8 frames, mp4/GIF.

The causal VAE maps 4k + 1 frames to k + 1 latent frames (frame 0 alone, then groups of 4) and 8x8 pixels to one
latent; the DiT then patchifies 2x2 latents, so H and W must be multiples of 16. hvlab video tensors are
(B, 3, F, H, W) in [-1, 1]; frames for files are uint8 (F, H, W, 3).
"""
from __future__ import annotations

import os

import numpy as np
import torch


def nearest_valid(value: int, step: int, offset: int = 0) -> str:
    """The valid values ``offset + step * k`` on either side of ``value``, as "lo or hi" (for error messages).

    With ``offset`` 0 the smallest valid value is ``step`` (a size of 0 is not a size).
    """
    first = offset if offset > 0 else step
    lo = offset + (value - offset) // step * step
    found = [v for v in (lo, lo + step) if v >= first]
    return " or ".join(str(v) for v in found) if found else str(first)


def check_video_length(video_length: int, temporal_compression_ratio: int = 4, name: str = "video_length") -> int:
    """Return ``video_length`` if it is 4k + 1 frames, else raise naming the nearest valid lengths.

    hvlab's one statement of the frame-count rule: the pipeline, the VAE, the memory plan and the toy data
    all call it (``name`` is the argument's name in the caller's error message).
    """
    r = temporal_compression_ratio
    if video_length < 1 or (video_length - 1) % r:
        raise ValueError(f"{name} must be {r}k+1; got {video_length}, nearest valid: "
                         f"{nearest_valid(video_length, r, offset=1)} (the causal VAE keeps frame 0 alone, "
                         f"then compresses groups of {r}: {name} - 1 must be a multiple of {r}, got {video_length})")
    return video_length


def latent_frames(video_length: int, temporal_compression_ratio: int = 4) -> int:
    """Latent frames for a video of ``video_length`` = 4k + 1 frames: k + 1 (129 -> 33)."""
    check_video_length(video_length, temporal_compression_ratio)
    return (video_length - 1) // temporal_compression_ratio + 1


def video_frames(latent_t: int, temporal_compression_ratio: int = 4) -> int:
    """Video frames decoded from ``latent_t`` latent frames: 4 (latent_t - 1) + 1 (33 -> 129)."""
    if latent_t < 1:
        raise ValueError(f"latent_t must be at least 1, got {latent_t}")
    return temporal_compression_ratio * (latent_t - 1) + 1


def check_video_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Return (height, width) if both are positive multiples of ``multiple`` (VAE 8x times DiT patch 2), else raise.

    The release pipeline rounds sizes up; hvlab asks the caller to choose, and names the nearest valid sizes.
    """
    for name, n in (("height", height), ("width", width)):
        if n < 1 or n % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} (VAE 8x x DiT patch 2); got {n}, "
                             f"nearest valid: {nearest_valid(n, multiple)}")
    return height, width


def align_to(value: int, multiple: int = 16) -> int:
    """``value`` rounded **up** to a multiple of ``multiple``: the official sampler's size rule (``align_to``).

    The official ``predict`` silently generates ``align_to(height, 16) x align_to(width, 16)`` (a 1080-high
    request becomes 1088); hvlab's `check_video_size` refuses such sizes instead, so that the size in
    settings.json is the size asked for. Call this first to get the official behaviour.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"value must be a positive int, got {value!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    return -(-value // multiple) * multiple


def latent_shape(height: int, width: int, video_length: int, channels: int = 16, spatial_compression_ratio: int = 8,
                 temporal_compression_ratio: int = 4, multiple: int = 16) -> tuple[int, int, int, int]:
    """(C, T, h, w) of the latent for a video: 720 x 1280 x 129 -> (16, 33, 90, 160)."""
    check_video_size(height, width, multiple)
    return (channels, latent_frames(video_length, temporal_compression_ratio),
            height // spatial_compression_ratio, width // spatial_compression_ratio)


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> uint8 (B, F, H, W, 3) via (x / 2 + 0.5).clamp(0, 1) * 255, rounded.

    The release truncates instead of rounding (``.astype(np.uint8)``): at most one level darker.
    """
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"to_uint8_frames expects (B, 3, F, H, W) in [-1, 1], got {tuple(x.shape)}")
    x = (x.detach().float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def save_video(frames, path: str | os.PathLike, fps: int = 24) -> str:
    """Write uint8 frames (F, H, W, 3) to ``path``: GIF if it ends in .gif, else mp4 (H.264 via imageio-ffmpeg,
    which ships its own ffmpeg). Returns the path. The release saves at 24 fps."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"save_video expects uint8 frames (F, H, W, 3) (see to_uint8_frames), "
                         f"got {frames.dtype} {frames.shape}")
    import imageio.v2 as imageio

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".gif"):
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)  # duration per frame in ms
    else:
        # yuv420p halves chroma resolution: even sizes are required, and 16-multiples avoid imageio's resize
        imageio.mimsave(path, list(frames), fps=fps, codec="libx264", quality=8, pixelformat="yuv420p")
    return path
