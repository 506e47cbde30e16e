"""Run records: the settings that determine a video, what the loop reports, its outputs, and the resume files.

`RELEASE_DEFAULTS` are the release model's generation defaults (the official sample_video.py's), the one
place hvlab keeps them: the pipeline, the scheduler, the memory plan and the command line read them here.
A `GenerationSettings` is every argument that determines a video, written beside it as settings.json, so
``pipe.generate(GenerationSettings.from_dict(json))`` makes the same video again. Ctrl-C and NaN write a
resume file (`save_state` / `load_state`): the latents before the step that was interrupted or went wrong.

Every file here is written atomically (`hvlab.outputs.atomic_write`), and every file read back is checked
(`hvlab.validate.check_settings`, `load_state`) so that a wrong or damaged one is refused with its path.

This module imports no torch at import time, so ``hvlab --help`` can show the defaults instantly.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .outputs import atomic_write, write_text

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
    def from_dict(cls, d: dict, source: str | None = None) -> "GenerationSettings":
        """Settings from a dict (a settings.json, a resume file's "settings"), every field checked
        (`hvlab.validate.check_settings`); ``source`` names the file in error messages."""
        from .validate import check_settings

        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise ValueError(f"{where}expected generation settings as a JSON object (a dict), got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in d and n not in ("num_videos_per_prompt", "seed_device"))
        if missing:
            raise ValueError(f"{where}generation settings lack {missing}; expected the keys {sorted(names)}")
        s = cls(**{k: v for k, v in d.items() if k in names})
        check_settings(s, source, official=RELEASE_DEFAULTS)
        return s

    @classmethod
    def from_json(cls, path) -> "GenerationSettings":
        """Read a settings.json; a missing, non-UTF-8 or malformed file is refused naming the file (and line)."""
        return cls.from_dict(read_json(path, "a settings.json"), source=str(path))


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
    files: list[str] = field(default_factory=list)  # absolute paths of the files written for it (the CLI's listing)

    def frames_uint8(self):
        """(B, F, H, W, 3) numpy uint8."""
        from .video import to_uint8_frames

        return to_uint8_frames(self.videos * 2 - 1)

    def save(self, folder, fps: int = 24, gif: bool = False, extra: dict | None = None,
             also: list[str] | None = None) -> list[str]:
        """Write video.mp4 (video_{i}.mp4 for several), optionally GIFs, and settings.json (+ ``extra``), each
        atomically. settings.json's "files" lists every file of the run, relative to ``folder``: these and
        ``also`` (files the caller wrote there). Returns the absolute paths of the files written here."""
        from .video import save_video

        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        frames, paths = self.frames_uint8(), []
        for i, f in enumerate(frames):
            stem = "video" if len(frames) == 1 else f"video_{i}"
            for ext in ("mp4", "gif") if gif else ("mp4",):
                paths.append(atomic_write(folder / f"{stem}.{ext}", lambda tmp: save_video(f, tmp, fps=fps)))
        settings_file = folder / "settings.json"
        listed = [*paths, *(also or []), str(settings_file)]
        info = dict(self.settings.to_dict(), timings=self.timings, **(extra or {}),
                    files=[os.path.relpath(p, folder) for p in listed])
        write_text(settings_file, json.dumps(info, indent=2, default=str))
        return paths + [str(settings_file)]


class NonFiniteLatentsError(FloatingPointError):
    """NaN or inf appeared in the latents; ``step`` is where, ``path`` the saved state (or None)."""

    def __init__(self, message: str, step: int, path: str | None, latents: torch.Tensor):
        super().__init__(message)
        self.step, self.path, self.latents = step, path, latents


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``path`` holds the latents before ``step`` (resume with resume_from=path).

    ``step == n`` (``stage == "decode"``): denoising had finished; the file holds the denoised latents and a
    resume goes straight to the decode."""

    def __init__(self, step: int, path: str | None, stage: str = "denoise"):
        what = ("interrupted after denoising (during the decode or while saving)" if stage == "decode"
                else f"interrupted before denoising step {step}")
        super().__init__(what + (f"; state saved to {path}" if path else ""))
        self.step, self.path, self.stage = step, path, stage


def save_state(path, latents: torch.Tensor, step: int, settings: dict | None, **extra) -> str:
    """The resume file: latents (B, C, T, H, W) *before* step ``step``, the step index and the settings;
    written atomically (a second Ctrl-C while it is written leaves the previous file or none)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(latents=latents.detach().float().cpu(), step=int(step), settings=settings, **extra)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path) -> dict:
    """Read a file written by `save_state` (weights_only: tensors, numbers and strings only); a damaged or
    foreign file, wrong settings, or a step outside 0 .. num_inference_steps are refused naming the path."""
    import torch

    from .checkpoint import read_torch_file
    from .validate import check_resume_step

    state = read_torch_file(path, what="resume file")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not an hvlab resume file (expected a dict with latents, step, settings; "
                         f"got a {type(state).__name__})")
    missing = [k for k in ("latents", "step", "settings") if k not in state]
    if missing or state["settings"] is None:
        raise ValueError(f"{path} is not an hvlab resume file: expected the keys latents, step, settings "
                         f"(written on Ctrl-C or NaN), missing {missing or ['settings']}")
    settings = GenerationSettings.from_dict(state["settings"], source=f"{path} (its settings)")
    z = state["latents"]
    if not isinstance(z, torch.Tensor) or z.dim() != 5 or not z.is_floating_point():
        raise ValueError(f"{path}: latents must be a float tensor (B, C, T, H, W), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    check_resume_step(state["step"], settings.num_inference_steps, source=str(path))
    return state


def read_json(path, what: str = "a JSON file"):
    """``json.loads`` of a file, refusing a missing, unreadable, non-UTF-8 or malformed one with its path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not {what}: byte {e.start} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected "
                         f"{what}") from None
