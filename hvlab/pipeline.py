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
``pipe(resume_from=path)``. Settings, run records and resume files live in `hvlab.runs`; loading the
release checkpoint (`load_pipeline`) and random-weight pipelines in `hvlab.loading`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .fast.offload import on_device
from .prompts import NEGATIVE_PROMPT, validate_prompts
from .runs import (RELEASE_DEFAULTS, GenerationInfo, GenerationInterrupted, GenerationOutput, GenerationSettings,
                   NonFiniteLatentsError, StepState, load_state, save_state)
from .scheduler import FlowMatchDiscreteScheduler, cfg_combine, initial_noise
from .text_encoder import embedded_guidance
from .video import check_video_size, latent_frames


def _seed_device(value) -> str:
    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"seed_device must name a torch device (\"cpu\", \"cuda\"), got {value!r}") from e


class HunyuanVideoPipeline:
    """Text -> video with a HunyuanVideo DiT, its causal 3D VAE and the two text encoders.

    ``defaults`` holds the model's own default generation arguments (the release's are the official
    CLI's; the toy model ships its own). ``cpu_offload`` keeps the text encoders and the VAE on the CPU
    and moves each to ``device`` only while it runs. ``latent_rgb_map`` is the 16 -> 3 preview map for
    this VAE (`hvlab.inspection.preview`), used by `hvlab.inspection.hooks.LatentRecorder`.
    """

    RELEASE_DEFAULTS = RELEASE_DEFAULTS  # `hvlab.runs.RELEASE_DEFAULTS`, the official CLI's

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, defaults=None,
                 device="cpu", dtype=torch.float32, cpu_offload: bool = False, latent_rgb_map: dict | None = None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.scheduler: FlowMatchDiscreteScheduler | None = None  # the one the last `denoise` ran
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

    def prepare_latents(self, seeds: list[int], height: int, width: int, video_length: int,
                        seed_device: str = "cpu") -> torch.Tensor:
        """Gaussian noise (B, C, T, H, W) float32, one generator per video (`hvlab.scheduler.initial_noise`):
        on the CPU by default, so a seed reproduces across devices."""
        return initial_noise(self.latent_shape(height, width, video_length), seeds, self.device, seed_device)

    # ---- stage 3: the loop ----------------------------------------------------------------
    def predict_velocity(self, x, t, text, mask, pooled, guidance_scale, embedded_scale):
        """One DiT evaluation (two with true CFG: [negative, positive] in one batch)."""
        cfg = guidance_scale > 1.0
        x_in = torch.cat([x, x]) if cfg else x
        tt = torch.full((x_in.shape[0],), float(t), device=self.device, dtype=torch.float32)
        guidance = None
        if self.transformer.config.guidance_embed:
            g = embedded_guidance(embedded_scale if embedded_scale is not None
                                  else RELEASE_DEFAULTS["embedded_guidance_scale"])
            guidance = g.to(device=self.device, dtype=torch.float32).expand(x_in.shape[0])
        v = self.transformer(x_in.to(self.dtype), tt, text, mask, pooled, guidance=guidance).float()
        if cfg:
            v_neg, v_pos = cfg_combine(v)
            v = v_neg + guidance_scale * (v_pos - v_neg)
        return v

    @torch.no_grad()
    def denoise(self, latents, text, mask, pooled, *, num_inference_steps, guidance_scale=1.0,
                embedded_guidance_scale=None, flow_shift=RELEASE_DEFAULTS["flow_shift"], flow_reverse=True,
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

        With ``progress`` a bar counts the VAE's decoder calls (`AutoencoderKLCausal3D.decode_calls`: one per
        tile with tiling), advanced by a forward hook on ``vae.decoder`` that is removed afterwards.
        """
        with on_device(self.vae, self.device, self.cpu_offload):
            vae_dtype = next(self.vae.parameters()).dtype
            z = (latents.to(self.device) / self.vae.config.scaling_factor).to(vae_dtype)
            bar, hook = None, None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=z.shape[0] * self.vae.decode_calls(z.shape), desc="decoding")
                def count_tile(module, args, output) -> None:  # returns None: the output is kept as it is
                    bar.update(1)

                hook = self.vae.decoder.register_forward_hook(count_tile)
            try:
                videos = [(self.vae.decode(z[b:b + 1]).float() / 2 + 0.5).clamp(0, 1).cpu() for b in range(z.shape[0])]
            finally:
                if bar is not None:
                    hook.remove()
                    bar.close()
        return torch.cat(videos)

    # ---- all of it -----------------------------------------------------------------------
    def settings_for(self, prompt, negative_prompt=None, *, height=None, width=None, video_length=None,
                     num_inference_steps=None, seed=None, guidance_scale=None, embedded_guidance_scale=None,
                     flow_shift=None, flow_reverse=None, num_videos_per_prompt=1,
                     seed_device: str = "cpu") -> GenerationSettings:
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
            num_videos_per_prompt=num_videos_per_prompt, seed_device=_seed_device(seed_device))

    def __call__(self, prompt=None, negative_prompt=None, *, height=None, width=None, video_length=None,
                 num_inference_steps=None, seed=None, guidance_scale=None, embedded_guidance_scale=None,
                 flow_shift=None, flow_reverse=None, num_videos_per_prompt=1, callback=None,
                 progress=False, save_path=None, resume_from=None, seed_device: str = "cpu") -> GenerationOutput:
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
                                     flow_reverse=flow_reverse, num_videos_per_prompt=num_videos_per_prompt,
                                     seed_device=seed_device)
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
            latents = self.prepare_latents(s.seeds, s.height, s.width, s.video_length, s.seed_device)
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
            out.save(save_path, fps=self.defaults["fps"])
        return out
