"""Run records: the settings that determine a video, what the loop reports, its outputs, and the resume files.

`RELEASE_DEFAULTS` are the release model's generation defaults (the official sample_video.py's), the one
place hvlab keeps them: the pipeline, the scheduler, the memory plan and the command line read them here.
A `GenerationSettings` is every argument that determines a video, written beside it as settings.json, so
``pipe.generate(GenerationSettings.from_dict(json))`` makes the same video again. Ctrl-C and NaN write a
resume file (`save_state` / `load_state`): the latents before the step that was interrupted or went wrong.

This module imports no torch at import time, so ``hvlab --help`` can show the defaults instantly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

# The release's generation defaults (720p, 129 frames, 50 steps, embedded guidance 6.0, flow shift 7.0,
# noise to data, 24 fps); true CFG is off (guidance_scale 1.0): the released DiT is guidance-distilled.
RELEASE_DEFAULTS = dict(height=720, width=1280, video_length=129, num_inference_steps=50,
                        guidance_scale=1.0, embedded_guidance_scale=6.0, flow_shift=7.0,
                        flow_reverse=True, fps=24)


@dataclass
class GenerationSettings:
    """Every argument that determines a video; written next to it as JSON so it can be reproduced."""

    prompt: list[str]  # one per video (a prompt repeated num_videos_per_prompt times)
    negative_prompt: list[str] | None  # one per video; used only with true CFG
    height: int
    width: int
    video_length: int  # frames, 4k + 1
    num_inference_steps: int
    seeds: list[int]  # one per video: latents of video i come from torch.Generator().manual_seed(seeds[i])
    guidance_scale: float  # true CFG (1.0 = off)
    embedded_guidance_scale: float | None  # fed to guidance_in when the DiT has one
    flow_shift: float
    flow_reverse: bool
    num_videos_per_prompt: int = 1
    seed_device: str = "cpu"  # where the generators live: "cpu" (hvlab, any machine) or "cuda" (as the official)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationSettings":
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in d and n not in ("num_videos_per_prompt", "seed_device"))
        if missing:
            raise ValueError(f"generation settings lack {missing}; expected the keys {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StepState:
    """What a step callback sees after denoising step ``i`` (0-based) of ``n``."""

    i: int
    n: int
    t: float  # the timestep fed to the DiT (sigma * 1000)
    sigma: float  # noise level before the step
    sigma_next: float  # noise level after the step
    latents_in: torch.Tensor  # (B, C, T, H, W) x at sigma
    v: torch.Tensor  # (B, C, T, H, W) velocity prediction (after CFG)
    latents: torch.Tensor  # (B, C, T, H, W) x at sigma_next

    @property
    def x0(self) -> torch.Tensor:
        """Predicted clean latent x0 = x - sigma * v (the flow convention x = (1-sigma) x0 + sigma noise)."""
        return self.latents_in.float() - self.sigma * self.v.float()


@dataclass
class GenerationInfo:
    """What hooks learn in ``on_generation_begin``."""

    num_inference_steps: int
    start_step: int  # > 0 when resuming
    latent_shape: tuple  # (B, C, T, H, W)
    grid_size: tuple  # post-patch token grid (T, H, W)
    cond_rows: list[int]  # rows of the DiT batch holding the prompts (with CFG: the second half)
    prompts: list[str] | None  # one per video
    sigmas: torch.Tensor  # (n + 1,)


@dataclass
class GenerationOutput:
    videos: torch.Tensor  # (B, 3, F, H, W) in [0, 1], float32 on the CPU
    latents: torch.Tensor  # (B, C, T, H, W) final denoised latents (unscaled for the VAE: already / scaling)
    settings: GenerationSettings
    timings: dict = field(default_factory=dict)

    def frames_uint8(self):
        """(B, F, H, W, 3) numpy uint8."""
        from .video import to_uint8_frames

        return to_uint8_frames(self.videos * 2 - 1)

    def save(self, folder, fps: int = 24, gif: bool = False, extra: dict | None = None) -> list[str]:
        """Write video.mp4 (video_{i}.mp4 for several), optionally GIFs, and settings.json (+ ``extra``)."""
        from .video import save_video

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        frames, paths = self.frames_uint8(), []
        for i, f in enumerate(frames):
            stem = "video" if len(frames) == 1 else f"video_{i}"
            paths.append(save_video(f, folder / f"{stem}.mp4", fps=fps))
            if gif:
                paths.append(save_video(f, folder / f"{stem}.gif", fps=fps))
        info = dict(self.settings.to_dict(), timings=self.timings, **(extra or {}))
        (folder / "settings.json").write_text(json.dumps(info, indent=2, default=str))
        return paths + [str(folder / "settings.json")]


class NonFiniteLatentsError(FloatingPointError):
    """NaN or inf appeared in the latents; ``step`` is where, ``path`` the saved state (or None)."""

    def __init__(self, message: str, step: int, path: str | None, latents: torch.Tensor):
        super().__init__(message)
        self.step, self.path, self.latents = step, path, latents


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during denoising; ``path`` holds the latents before ``step`` (resume with resume_from=path)."""

    def __init__(self, step: int, path: str | None):
        super().__init__(f"interrupted before denoising step {step}" + (f"; state saved to {path}" if path else ""))
        self.step, self.path = step, path


def save_state(path, latents: torch.Tensor, step: int, settings: dict | None, **extra) -> str:
    """The resume file: latents (B, C, T, H, W) *before* step ``step``, the step index and the settings."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(latents=latents.detach().float().cpu(), step=int(step), settings=settings, **extra), path)
    return str(path)


def load_state(path) -> dict:
    """Read a file written by `save_state` (weights_only: it holds tensors, numbers and strings only)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not an hvlab resume file (expected a dict with latents, step, settings)")
    missing = [k for k in ("latents", "step", "settings") if k not in state]
    if missing or state["settings"] is None:
        raise ValueError(f"{path} is not an hvlab resume file: expected the keys latents, step, settings "
                         f"(written on Ctrl-C or NaN), missing {missing or ['settings']}")
    return state
