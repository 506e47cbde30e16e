"""The sampling pipeline: text encoding -> denoising loop -> VAE decode.

In the spirit of the official ``HunyuanVideoSampler.predict``, written so the loop is visible:
`HunyuanVideoPipeline.__call__` is `encode_prompt`, `prepare_latents`, `denoise` and `decode`, each
usable on its own from a notebook. What differs from a vanilla text-to-video loop:

- two text encoders: the LLM's per-token states feed the token refiner, CLIP's pooled vector joins
  the timestep in ``vec``;
- the release DiT is guidance-distilled: guidance enters as an *embedded* scalar (6.0 -> 6016.0 in
  bf16), one forward per step; true CFG with a negative prompt is optional (the toy model uses it);
- latents are drawn on the CPU from one generator per video (seed, seed+1, ...), so a seed gives the
  same video on any device.

Around the loop: hooks (``pipe.hooks``, see `hvlab.inspection.hooks`) see every step; NaNs are caught at the step
where they appear, and Ctrl-C saves the latents reached so far; both files resume with
``pipe(resume_from=path)``. `load_pipeline` loads the release checkpoint layout.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from .fast.offload import on_device
from .prompts import NEGATIVE_PROMPT, validate_prompts
from .scheduler import FlowMatchDiscreteScheduler
from .text_encoder import embedded_guidance
from .video import check_video_size, latent_frames, to_uint8_frames


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationSettings":
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in d and n != "num_videos_per_prompt")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(latents=latents.detach().float().cpu(), step=int(step), settings=settings, **extra), path)
    return str(path)


def load_state(path) -> dict:
    """Read a file written by `save_state` (weights_only: it holds tensors, numbers and strings only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not an hvlab resume file (expected a dict with latents, step, settings)")
    missing = [k for k in ("latents", "step", "settings") if k not in state]
    if missing or state["settings"] is None:
        raise ValueError(f"{path} is not an hvlab resume file: expected the keys latents, step, settings "
                         f"(written on Ctrl-C or NaN), missing {missing or ['settings']}")
    return state


class HunyuanVideoPipeline:
    """Text -> video with a HunyuanVideo DiT, its causal 3D VAE and the two text encoders.

    ``defaults`` holds the model's own default generation arguments (the release's are the official
    CLI's; the toy model ships its own). ``cpu_offload`` keeps the text encoders and the VAE on the CPU
    and moves each to ``device`` only while it runs. ``latent_rgb_map`` is the 16 -> 3 preview map for
    this VAE (`hvlab.inspection.preview`), used by `hvlab.inspection.hooks.LatentRecorder`.
    """

    RELEASE_DEFAULTS = dict(height=720, width=1280, video_length=129, num_inference_steps=50,
                            guidance_scale=1.0, embedded_guidance_scale=6.0, flow_shift=7.0,
                            flow_reverse=True, fps=24)

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, scheduler=None, defaults=None,
                 device="cpu", dtype=torch.float32, cpu_offload: bool = False, latent_rgb_map: dict | None = None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.scheduler = scheduler or FlowMatchDiscreteScheduler()
        self.defaults = dict(self.RELEASE_DEFAULTS, **(defaults or {}))
        self.device = torch.device(device)
        self.dtype = dtype
        self.cpu_offload = False
        self.latent_rgb_map = latent_rgb_map
        self.hooks: list = []  # objects with on_generation_begin / on_step_begin / on_step_end / on_generation_end
        if cpu_offload:
            self.enable_cpu_offload()

    # ---- options ----------------------------------------------------------------------------
    def enable_cpu_offload(self) -> None:
        """Keep the text encoders and the VAE on the CPU; each visits ``device`` only while it runs."""
        self.cpu_offload = True
        for m in (self.text_encoder, self.text_encoder_2, self.vae):
            m.to("cpu")

    def enable_vae_tiling(self, **kwargs) -> None:
        """Decode in overlapping tiles (the release defaults; kwargs go to ``vae.enable_tiling``)."""
        self.vae.enable_tiling(**kwargs)

    def enable_fp8(self, mode: str = "auto") -> None:
        """Store the DiT blocks' linear weights in FP8 (`hvlab.fast.fp8.convert_to_fp8`)."""
        try:
            from .fast.fp8 import convert_to_fp8
        except ImportError as e:
            raise RuntimeError(f"FP8 needs hvlab.fast.fp8, which failed to import: {e}") from e
        convert_to_fp8(self.transformer, mode=mode)

    def _hooks(self, name: str, *args) -> None:
        for h in list(self.hooks):
            fn = getattr(h, name, None)
            if fn is not None:
                fn(*args)

    # ---- stage 1: text ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]):
        """LLM states (B, L_txt, D), their mask (B, L_txt) and CLIP pooled vectors (B, D2)."""
        with on_device(self.text_encoder, self.device, self.cpu_offload):
            out = self.text_encoder.encode(prompts, device=self.device)
        with on_device(self.text_encoder_2, self.device, self.cpu_offload):
            pooled = self.text_encoder_2.encode(prompts, device=self.device).hidden_state
        return out.hidden_state.to(self.dtype), out.attention_mask, pooled.to(self.dtype)

    # ---- stage 2: noise -------------------------------------------------------------------
    def latent_shape(self, height: int, width: int, video_length: int) -> tuple[int, int, int, int]:
        cfg = self.vae.config
        return (self.transformer.config.in_channels, latent_frames(video_length),
                height // cfg.spatial_compression_ratio, width // cfg.spatial_compression_ratio)

    def prepare_latents(self, seeds: list[int], height: int, width: int, video_length: int) -> torch.Tensor:
        """Gaussian noise, one CPU generator per video so a seed reproduces across devices."""
        shape = self.latent_shape(height, width, video_length)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device)  # (B, C, T, H, W) float32

    # ---- stage 3: the loop ----------------------------------------------------------------
    def predict_velocity(self, x, t, text, mask, pooled, guidance_scale, embedded_scale):
        """One DiT evaluation (two with true CFG: [negative, positive] in one batch)."""
        cfg = guidance_scale > 1.0
        x_in = torch.cat([x, x]) if cfg else x
        tt = torch.full((x_in.shape[0],), float(t), device=self.device, dtype=torch.float32)
        guidance = None
        if self.transformer.config.guidance_embed:
            g = embedded_guidance(embedded_scale if embedded_scale is not None else 6.0)
            guidance = g.to(device=self.device, dtype=torch.float32).expand(x_in.shape[0])
        v = self.transformer(x_in.to(self.dtype), tt, text, mask, pooled, guidance=guidance).float()
        if cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + guidance_scale * (v_pos - v_neg)
        return v

    @torch.no_grad()
    def denoise(self, latents, text, mask, pooled, *, num_inference_steps, guidance_scale=1.0,
                embedded_guidance_scale=None, flow_shift=7.0, flow_reverse=True,
                callback: Callable[[StepState], None] | None = None, start_step: int = 0,
                progress: bool = False, save_dir=None, settings: dict | None = None,
                prompts: list[str] | None = None) -> torch.Tensor:
        """Euler integration of the flow from sigma 1 (noise) to 0 (data), fp32 state.

        ``latents`` are the state before step ``start_step``. On NaN/inf, or on Ctrl-C, the state before
        the current step is saved in ``save_dir`` (with ``settings``) and `NonFiniteLatentsError` /
        `GenerationInterrupted` is raised.
        """
        sched = FlowMatchDiscreteScheduler(shift=flow_shift, reverse=flow_reverse)
        sched.set_timesteps(num_inference_steps, device=self.device)
        self.scheduler = sched
        x = latents.float().to(self.device)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteLatentsError(f"the starting latents (before step {start_step}) already hold NaN/inf: "
                                        f"resume from an earlier file or start again from a seed", start_step, None, x)
        B = x.shape[0]
        cfg = guidance_scale > 1.0
        self._hooks("on_generation_begin", GenerationInfo(
            num_inference_steps, start_step, tuple(x.shape), tuple(self.transformer.grid_size(x.shape)),
            list(range(B, 2 * B)) if cfg else list(range(B)), prompts, sched.sigmas.cpu()))
        steps = range(start_step, num_inference_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="denoising", initial=start_step, total=num_inference_steps)
        i = start_step
        try:
            for i in steps:
                self._hooks("on_step_begin", i)
                t = sched.timesteps[i]
                v = self.predict_velocity(x, t, text, mask, pooled, guidance_scale, embedded_guidance_scale)
                x_next = sched.step(v, i, x)
                if not bool(torch.isfinite(x_next).all()):  # one sync per step: cheap next to a DiT forward
                    self._non_finite(i, num_inference_steps, float(t), x, v, x_next, save_dir, settings)
                state = StepState(i, num_inference_steps, float(t), float(sched.sigmas[i]),
                                  float(sched.sigmas[i + 1]), x, v, x_next)
                self._hooks("on_step_end", state)
                if callback is not None:
                    callback(state)
                x = x_next
        except KeyboardInterrupt as e:
            if isinstance(e, GenerationInterrupted):
                raise
            path = None
            if save_dir is not None:
                path = save_state(Path(save_dir) / "interrupted.pt", x, i, settings)
            raise GenerationInterrupted(i, path) from None
        self._hooks("on_generation_end")
        return x

    def _non_finite(self, i, n, t, x, v, x_next, save_dir, settings):
        bad = "NaN" if bool(torch.isnan(x_next).any()) else "inf"
        path = None
        if save_dir is not None:
            path = save_state(Path(save_dir) / f"nan_step{i:03d}.pt", x, i, settings, v=v.cpu(),
                              latents_after=x_next.cpu(), reason=f"{bad} at step {i}")
        where = (f"The latents before the step (finite) and its velocity are saved in {path}; after a fix, "
                 f"resume from there with resume_from= / --resume") if path else \
            "Pass save_path= (CLI: --save-path) to keep that step's latents; they are on this error's .latents"
        raise NonFiniteLatentsError(
            f"{bad} appeared in the latents at denoising step {i} of {n} (t = {t:.2f}, dtype {self.dtype}). "
            f"{where}. Usual fixes: run the DiT in bfloat16 or float32 instead of float16 (fp16 overflows in the "
            f"blocks' MLPs), lower the cfg scale, or check that the checkpoint matches the model (`hvlab info`).",
            i, path, x.cpu())

    # ---- stage 4: pixels ------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Latents -> video in [0, 1], (B, 3, F, H, W) float32 on the CPU, one video at a time.

        With ``progress`` a bar counts the VAE's decoder calls (one per tile with tiling).
        """
        with on_device(self.vae, self.device, self.cpu_offload):
            vae_dtype = next(self.vae.parameters()).dtype
            z = (latents.to(self.device) / self.vae.config.scaling_factor).to(vae_dtype)
            bar, original = None, None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=z.shape[0] * self._decode_calls(z.shape), desc="decoding")
                original = self.vae._decode_tile

                def counted(tile):
                    out = original(tile)
                    bar.update(1)
                    return out

                self.vae._decode_tile = counted  # instance attribute; the class method is untouched
            try:
                videos = [(self.vae.decode(z[b:b + 1]).float() / 2 + 0.5).clamp(0, 1).cpu() for b in range(z.shape[0])]
            finally:
                if bar is not None:
                    del self.vae._decode_tile
                    bar.close()
        return torch.cat(videos)

    def _decode_calls(self, shape) -> int:
        if not getattr(self.vae, "use_tiling", False):
            return 1
        from .vae_tiling import decode_axes

        c = self.vae.config
        axes = decode_axes(tuple(shape[2:]), self.vae.tiling, c.spatial_compression_ratio, c.temporal_compression_ratio)
        return math.prod(len(a.src) for a in axes)

    # ---- all of it -----------------------------------------------------------------------
    def settings_for(self, prompt, negative_prompt=None, *, height=None, width=None, video_length=None,
                     num_inference_steps=None, seed=None, guidance_scale=None, embedded_guidance_scale=None,
                     flow_shift=None, flow_reverse=None, num_videos_per_prompt=1) -> GenerationSettings:
        """Validate the arguments and fill in the model's defaults. ``seed`` may be one int (video i
        gets seed + i) or a list with one seed per video."""
        d = self.defaults
        prompts = validate_prompts(prompt)
        height = height or d["height"]
        width = width or d["width"]
        video_length = video_length or d["video_length"]
        check_video_size(height, width)
        latent_frames(video_length)  # raises with the nearest valid lengths
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        negs = None
        if guidance_scale > 1.0:
            negs = validate_prompts(negative_prompt if negative_prompt is not None
                                    else d.get("negative_prompt", NEGATIVE_PROMPT))
            if len(negs) == 1:
                negs = negs * len(prompts)
            if len(negs) != len(prompts):
                raise ValueError(f"negative_prompt must be one string or {len(prompts)} strings "
                                 f"(one per prompt), got {len(negs)}")
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        if negs is not None:
            negs = [p for p in negs for _ in range(num_videos_per_prompt)]
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise ValueError(f"seed as a list needs one seed per video ({len(prompts)}), got {len(seed)}")
            seeds = [int(s) for s in seed]
        else:
            seeds = [int(seed) + i for i in range(len(prompts))]
        return GenerationSettings(
            prompt=prompts, negative_prompt=negs, height=height, width=width, video_length=video_length,
            num_inference_steps=num_inference_steps or d["num_inference_steps"], seeds=seeds,
            guidance_scale=float(guidance_scale),
            embedded_guidance_scale=(embedded_guidance_scale if embedded_guidance_scale is not None
                                     else d.get("embedded_guidance_scale")),
            flow_shift=float(flow_shift if flow_shift is not None else d["flow_shift"]),
            flow_reverse=bool(d["flow_reverse"] if flow_reverse is None else flow_reverse),
            num_videos_per_prompt=num_videos_per_prompt)

    def __call__(self, prompt=None, negative_prompt=None, *, height=None, width=None, video_length=None,
                 num_inference_steps=None, seed=None, guidance_scale=None, embedded_guidance_scale=None,
                 flow_shift=None, flow_reverse=None, num_videos_per_prompt=1, callback=None,
                 progress=False, save_path=None, resume_from=None) -> GenerationOutput:
        """Generate; with ``save_path`` the videos and settings.json are written there too.

        ``resume_from``: a file written on Ctrl-C or NaN; every setting is taken from it, so only
        ``prompt`` (which must then match) and the run options (callback, progress, save_path) may be given.
        """
        if resume_from is not None:
            given = {k: v for k, v in dict(negative_prompt=negative_prompt, height=height, width=width,
                                            video_length=video_length, num_inference_steps=num_inference_steps,
                                            seed=seed, guidance_scale=guidance_scale,
                                            embedded_guidance_scale=embedded_guidance_scale, flow_shift=flow_shift,
                                            flow_reverse=flow_reverse).items() if v is not None}
            if given or num_videos_per_prompt != 1:
                raise ValueError(f"resume_from takes every setting from {resume_from}; do not also pass "
                                 f"{sorted(given) or ['num_videos_per_prompt']}")
            state = load_state(resume_from)
            settings = GenerationSettings.from_dict(state["settings"])
            if prompt is not None and sorted(set(validate_prompts(prompt))) != sorted(set(settings.prompt)):
                raise ValueError(f"{resume_from} was generated for {settings.prompt}, not {prompt!r}")
            return self.generate(settings, callback=callback, progress=progress, save_path=save_path,
                                 latents=state["latents"], start_step=state["step"])
        if prompt is None:
            raise TypeError("prompt is required (or resume_from= a saved state)")
        settings = self.settings_for(prompt, negative_prompt, height=height, width=width, video_length=video_length,
                                     num_inference_steps=num_inference_steps, seed=seed, guidance_scale=guidance_scale,
                                     embedded_guidance_scale=embedded_guidance_scale, flow_shift=flow_shift,
                                     flow_reverse=flow_reverse, num_videos_per_prompt=num_videos_per_prompt)
        return self.generate(settings, callback=callback, progress=progress, save_path=save_path)

    def generate(self, settings: GenerationSettings, *, callback=None, progress=False, save_path=None,
                 latents: torch.Tensor | None = None, start_step: int = 0, state_dir=None) -> GenerationOutput:
        """Run one `GenerationSettings` (e.g. read back from a settings.json): the same settings give the
        same video. ``latents``/``start_step`` continue from a saved state. ``save_path`` receives the
        videos and settings.json; ``state_dir`` (default ``save_path``) the Ctrl-C / NaN state files."""
        s = settings
        check_video_size(s.height, s.width)
        if len(s.seeds) != len(s.prompt):
            raise ValueError(f"settings need one seed per prompt: {len(s.prompt)} prompts, {len(s.seeds)} seeds")
        timings = {}
        t0 = time.perf_counter()
        text, mask, pooled = self.encode_prompt(s.prompt)
        if s.guidance_scale > 1.0:
            n_text, n_mask, n_pooled = self.encode_prompt(s.negative_prompt or [""] * len(s.prompt))
            text, mask, pooled = torch.cat([n_text, text]), torch.cat([n_mask, mask]), torch.cat([n_pooled, pooled])
        timings["text_encoding_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if latents is None:
            latents = self.prepare_latents(s.seeds, s.height, s.width, s.video_length)
        else:
            expected = (len(s.seeds), *self.latent_shape(s.height, s.width, s.video_length))
            if tuple(latents.shape) != expected:
                raise ValueError(f"saved latents have shape {tuple(latents.shape)}, the settings need {expected}")
        latents = self.denoise(latents, text, mask, pooled, num_inference_steps=s.num_inference_steps,
                               guidance_scale=s.guidance_scale, embedded_guidance_scale=s.embedded_guidance_scale,
                               flow_shift=s.flow_shift, flow_reverse=s.flow_reverse, callback=callback,
                               start_step=start_step, progress=progress,
                               save_dir=state_dir if state_dir is not None else save_path,
                               settings=s.to_dict(), prompts=s.prompt)
        timings["denoising_s"] = time.perf_counter() - t0
        timings["steps_run"] = s.num_inference_steps - start_step
        for h in self.hooks:  # a hook that changes the computation (hvlab.fast.cache.StepCache) says what it did
            timings.update(getattr(h, "report", dict)())
        t0 = time.perf_counter()
        videos = self.decode(latents, progress=progress)
        timings["decode_s"] = time.perf_counter() - t0
        out = GenerationOutput(videos=videos, latents=latents.cpu(), settings=s, timings=timings)
        if save_path is not None:
            out.save(save_path, fps=self.defaults.get("fps", 24))
        return out


# ---- building pipelines ---------------------------------------------------------------------

def random_pipeline(preset: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32) -> HunyuanVideoPipeline:
    """A pipeline of the real architecture with seeded random weights, for tests and smoke runs.

    "tiny": every block type at the smallest sizes (64 x 64 x 9 frames by default, 4 steps, a few ms
    per step on a CPU); "toy": the toy model's sizes (`hvlab.toy.model`) without its trained weights.
    The same seed always gives the same weights, so a random pipeline's videos are reproducible.
    """
    from .model import TINY_CONFIG, HYVideoDiffusionTransformer, randomize_weights_
    from .text_encoder import tiny_clip_encoder, tiny_llm_encoder
    from .toy.tokenizer import load_toy_tokenizer
    from .vae import TINY_VAE_CONFIG, AutoencoderKLCausal3D

    if preset == "tiny":
        dit_cfg, vae_cfg = TINY_CONFIG, TINY_VAE_CONFIG
        defaults = dict(height=64, width=64, video_length=9, num_inference_steps=4, guidance_scale=1.0,
                        embedded_guidance_scale=6.0, flow_shift=5.0, flow_reverse=True, fps=8, negative_prompt="")
    elif preset == "toy":
        from .toy.model import TOY_DEFAULTS, TOY_DIT_CONFIG, build_text_encoders, toy_vae_config

        dit_cfg, vae_cfg, defaults = TOY_DIT_CONFIG, toy_vae_config(), dict(TOY_DEFAULTS)
    else:
        raise ValueError(f'preset must be "tiny" or "toy", got {preset!r}')
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        dit = randomize_weights_(HYVideoDiffusionTransformer(dit_cfg), seed=seed)
        vae = AutoencoderKLCausal3D(vae_cfg)
    if preset == "toy":
        llm, clip = build_text_encoders()  # the toy's own (fixed) text encoders
    else:  # 3 layers, so the official "skip the last 2" picks layer 1
        llm = tiny_llm_encoder(load_toy_tokenizer(), hidden=dit_cfg.text_states_dim, layers=3, heads=2,
                               seed=seed + 1, max_length=32)
        clip = tiny_clip_encoder(load_toy_tokenizer(kind="clip"), hidden=dit_cfg.text_states_dim_2, layers=1,
                                 heads=2, seed=seed + 2, max_length=77)
    for m in (dit, vae, llm, clip):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return HunyuanVideoPipeline(dit, vae, llm, clip, defaults=defaults, device=device, dtype=dtype)


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
    from .vae import AutoencoderKLCausal3D, vae_config_from_json

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
