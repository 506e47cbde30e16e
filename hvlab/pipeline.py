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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .prompts import NEGATIVE_PROMPT, validate_prompts
from .scheduler import FlowMatchDiscreteScheduler
from .text_encoder import embedded_guidance
from .video import check_video_size, latent_frames, to_uint8_frames


@dataclass
class GenerationSettings:
    """Every argument that determines a video; written next to it as JSON so it can be reproduced."""

    prompt: list[str]
    negative_prompt: list[str] | None
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
class GenerationOutput:
    videos: torch.Tensor  # (B, 3, F, H, W) in [0, 1], float32 on the CPU
    latents: torch.Tensor  # (B, C, T, H, W) final denoised latents (unscaled for the VAE: already / scaling)
    settings: GenerationSettings
    timings: dict = field(default_factory=dict)

    def frames_uint8(self):
        """(B, F, H, W, 3) numpy uint8."""
        return to_uint8_frames(self.videos * 2 - 1)


class HunyuanVideoPipeline:
    """Text -> video with a HunyuanVideo DiT, its causal 3D VAE and the two text encoders.

    ``defaults`` holds the model's own default generation arguments (the release's are the official
    CLI's; the toy model ships its own).
    """

    RELEASE_DEFAULTS = dict(height=720, width=1280, video_length=129, num_inference_steps=50,
                            guidance_scale=1.0, embedded_guidance_scale=6.0, flow_shift=7.0,
                            flow_reverse=True, fps=24)

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, scheduler=None, defaults=None,
                 device="cpu", dtype=torch.float32):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.scheduler = scheduler or FlowMatchDiscreteScheduler()
        self.defaults = dict(self.RELEASE_DEFAULTS, **(defaults or {}))
        self.device = torch.device(device)
        self.dtype = dtype

    # ---- stage 1: text ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]):
        """LLM states (B, L_txt, D), their mask (B, L_txt) and CLIP pooled vectors (B, D2)."""
        out = self.text_encoder.encode(prompts, device=self.device)
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
                progress: bool = False) -> torch.Tensor:
        """Euler integration of the flow from sigma 1 (noise) to 0 (data), fp32 state."""
        sched = FlowMatchDiscreteScheduler(shift=flow_shift, reverse=flow_reverse)
        sched.set_timesteps(num_inference_steps, device=self.device)
        self.scheduler = sched
        x = latents.float()
        steps = range(start_step, num_inference_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="denoising", initial=start_step, total=num_inference_steps)
        for i in steps:
            t = sched.timesteps[i]
            v = self.predict_velocity(x, t, text, mask, pooled, guidance_scale, embedded_guidance_scale)
            x_next = sched.step(v, i, x)
            if callback is not None:
                callback(StepState(i, num_inference_steps, float(t), float(sched.sigmas[i]),
                                   float(sched.sigmas[i + 1]), x, v, x_next))
            x = x_next
        return x

    # ---- stage 4: pixels ------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video in [0, 1], (B, 3, F, H, W) float32 on the CPU."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = (latents / self.vae.config.scaling_factor).to(vae_dtype)
        video = self.vae.decode(z)
        return (video.float() / 2 + 0.5).clamp(0, 1).cpu()

    # ---- all of it -----------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt=None, *, height=None, width=None, video_length=None,
                 num_inference_steps=None, seed=None, guidance_scale=None, embedded_guidance_scale=None,
                 flow_shift=None, flow_reverse=None, num_videos_per_prompt=1, callback=None,
                 progress=False) -> GenerationOutput:
        import time

        d = self.defaults
        prompts = validate_prompts(prompt)
        height = height or d["height"]
        width = width or d["width"]
        video_length = video_length or d["video_length"]
        check_video_size(height, width)
        latent_frames(video_length)  # raises with the nearest valid lengths
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
        seeds = [int(seed) + i for i in range(len(prompts))]
        settings = GenerationSettings(
            prompt=prompts, negative_prompt=negs, height=height, width=width, video_length=video_length,
            num_inference_steps=num_inference_steps or d["num_inference_steps"], seeds=seeds,
            guidance_scale=float(guidance_scale),
            embedded_guidance_scale=(embedded_guidance_scale if embedded_guidance_scale is not None
                                     else d.get("embedded_guidance_scale")),
            flow_shift=float(flow_shift if flow_shift is not None else d["flow_shift"]),
            flow_reverse=bool(d["flow_reverse"] if flow_reverse is None else flow_reverse),
            num_videos_per_prompt=num_videos_per_prompt)
        timings = {}
        t0 = time.perf_counter()
        text, mask, pooled = self.encode_prompt(prompts)
        if negs is not None:
            n_text, n_mask, n_pooled = self.encode_prompt(negs)
            text, mask, pooled = torch.cat([n_text, text]), torch.cat([n_mask, mask]), torch.cat([n_pooled, pooled])
        timings["text_encoding_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents = self.prepare_latents(seeds, height, width, video_length)
        latents = self.denoise(latents, text, mask, pooled, num_inference_steps=settings.num_inference_steps,
                               guidance_scale=settings.guidance_scale,
                               embedded_guidance_scale=settings.embedded_guidance_scale,
                               flow_shift=settings.flow_shift, flow_reverse=settings.flow_reverse,
                               callback=callback, progress=progress)
        timings["denoising_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        videos = self.decode(latents)
        timings["decode_s"] = time.perf_counter() - t0
        return GenerationOutput(videos=videos, latents=latents.cpu(), settings=settings, timings=timings)
