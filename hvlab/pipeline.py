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
where they appear (from the DiT or written by a hook), and Ctrl-C saves the latents reached so far, or during
the decode the denoised latents; these files resume with ``pipe(resume_from=path)`` to exactly the video an
uninterrupted run makes. Every argument is checked first (`hvlab.validate`), and the size guard
(`hvlab.fast.run_size`) refuses a run that would not fit in memory before anything is allocated. Settings, run records and resume files live in `hvlab.runs`; loading the
release checkpoint (`load_pipeline`) and random-weight pipelines in `hvlab.loading`.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import validate
from .fast.offload import on_device
from .outputs import holding_sigint
from .prompts import NEGATIVE_PROMPT, validate_prompts
from .runs import (RELEASE_DEFAULTS, GenerationInfo, GenerationInterrupted, GenerationOutput, GenerationSettings,
                   NonFiniteLatentsError, StepState, load_state, save_state)
from .scheduler import FlowMatchDiscreteScheduler, cfg_combine, initial_noise
from .text_encoder import embedded_guidance
from .video import check_video_size, latent_frames


class SlowRunWarning(UserWarning):
    """A CPU run whose estimated time is long (`hvlab.fast.run_size.estimate_seconds`)."""


class HunyuanVideoPipeline:
    """Text -> video with a HunyuanVideo DiT, its causal 3D VAE and the two text encoders.

    ``defaults`` holds the model's own default generation arguments (the release's are the official
    CLI's; the toy model ships its own). ``cpu_offload`` keeps the text encoders and the VAE on the CPU
    and moves each to ``device`` only while it runs. ``latent_rgb_map`` is the 16 -> 3 preview map for
    this VAE (`hvlab.inspection.preview`), used by `hvlab.inspection.hooks.LatentRecorder`.
    """

    RELEASE_DEFAULTS = RELEASE_DEFAULTS  # `hvlab.runs.RELEASE_DEFAULTS`, the official CLI's
    SLOW_RUN_S = 60.0  # a CPU run estimated to take longer warns with its estimate (SlowRunWarning)

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
        self.check_memory = True  # the size guard of `generate` (hvlab.fast.run_size); --no-memory-check turns it off
        self.memory_limit_gib: float | None = None  # plan against this many GiB instead of what is free
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

        ``latents`` are the state before step ``start_step``. On NaN/inf (from the DiT, or written into
        ``state.latents`` by a hook or the callback, which may edit it in place), or on Ctrl-C, the state before
        the current step is saved in ``save_dir`` (with ``settings``) and `NonFiniteLatentsError` /
        `GenerationInterrupted` is raised. Hooks and the callback see a copy of the step's input latents, so what
        is saved is never something they changed.
        """
        sched = FlowMatchDiscreteScheduler(shift=flow_shift, reverse=flow_reverse)
        sched.set_timesteps(num_inference_steps, device=self.device)
        self.scheduler = sched
        validate.check_resume_step(start_step, num_inference_steps, source="start_step")
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
        # (steps done, the latents after them), replaced in one assignment: wherever a Ctrl-C lands, the step
        # index saved is the one these latents are before
        done = (start_step, x)
        try:
            for i in steps:
                x = done[1]
                self._hooks("on_step_begin", i)
                t = sched.timesteps[i]
                v = self.predict_velocity(x, t, text, mask, pooled, guidance_scale, embedded_guidance_scale)
                x_next = sched.step(v, i, x)
                if not bool(torch.isfinite(x_next).all()):  # one sync per step: cheap next to a DiT forward
                    self._non_finite(i, num_inference_steps, float(t), x, v, x_next, save_dir, settings)
                if self.hooks or callback is not None:
                    state = StepState(i, num_inference_steps, float(t), float(sched.sigmas[i]),
                                      float(sched.sigmas[i + 1]), x.clone(), v, x_next)
                    self._hooks("on_step_end", state)
                    if callback is not None:
                        callback(state)
                    if not bool(torch.isfinite(x_next).all()):  # written by a hook or the callback
                        self._non_finite(i, num_inference_steps, float(t), x, v, x_next, save_dir, settings,
                                         cause="hook")
                done = (i + 1, x_next)
        except KeyboardInterrupt as e:
            if isinstance(e, GenerationInterrupted):
                raise
            step, x = done
            path = None
            if save_dir is not None:
                with holding_sigint(reraise=False):  # a second Ctrl-C must not cut the file short
                    path = save_state(Path(save_dir) / "interrupted.pt", x, step, settings)
            raise GenerationInterrupted(step, path) from None
        self._hooks("on_generation_end")
        return done[1]

    def _non_finite(self, i, n, t, x, v, x_next, save_dir, settings, cause: str = "dit"):
        bad = "NaN" if bool(torch.isnan(x_next).any()) else "inf"
        path = None
        if save_dir is not None:
            with holding_sigint(reraise=False):
                path = save_state(Path(save_dir) / f"nan_step{i:03d}.pt", x, i, settings, v=v.cpu(),
                                  latents_after=x_next.cpu(), reason=f"{bad} at step {i} ({cause})")
        where = (f"The latents before the step (finite) and its velocity are saved in {path}; after a fix, "
                 f"resume from there with resume_from= / --resume") if path else \
            "Pass save_path= (CLI: --save-path) to keep that step's latents; they are on this error's .latents"
        if cause == "hook":
            raise NonFiniteLatentsError(
                f"{bad} appeared in the latents at denoising step {i} of {n} (t = {t:.2f}) after the step's hooks and "
                f"callback ran: the DiT's output was finite, so a hook or the callback wrote it into state.latents. "
                f"{where}.", i, path, x.cpu())
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
        """Validate the arguments (`hvlab.validate`) and fill in the model's defaults: None means the model's
        default, and nothing else does (0 steps or 0 frames are refused, not replaced). ``seed`` may be one int
        (video i gets seed + i) or a list with one seed per video."""
        d = self.defaults
        prompts = validate_prompts(prompt)
        for p in prompts:
            validate.check_prompt_text(p, "prompt")
        validate.check_generation_values(
            height=height, width=width, video_length=video_length, num_inference_steps=num_inference_steps,
            seed=seed, guidance_scale=guidance_scale, embedded_guidance_scale=embedded_guidance_scale,
            flow_shift=flow_shift, flow_reverse=flow_reverse, num_videos_per_prompt=num_videos_per_prompt,
            seed_device=seed_device, has_guidance_embedding=self.transformer.config.guidance_embed,
            n_prompts=len(prompts), official=RELEASE_DEFAULTS)
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        video_length = d["video_length"] if video_length is None else video_length
        num_inference_steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        check_video_size(height, width)
        latent_frames(video_length)  # raises with the nearest valid lengths
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        negs = None
        if guidance_scale > 1.0:
            negs = validate_prompts(negative_prompt if negative_prompt is not None
                                    else d.get("negative_prompt", NEGATIVE_PROMPT), name="negative_prompt")
            for p in negs:
                validate.check_prompt_text(p, "negative_prompt", allow_empty=True)
            if len(negs) == 1:
                negs = negs * len(prompts)
            if len(negs) != len(prompts):
                raise ValueError(f"negative_prompt must be one string or {len(prompts)} strings "
                                 f"(one per prompt), got {len(negs)}")
        elif negative_prompt is not None:
            raise ValueError(f"negative_prompt (--neg-prompt) is used only with true CFG, but guidance_scale "
                             f"(--cfg-scale) is {guidance_scale} (off): pass a guidance_scale > 1, e.g. 4.0, or drop "
                             f"the negative prompt")
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
        embedded = embedded_guidance_scale if embedded_guidance_scale is not None else d.get("embedded_guidance_scale")
        if not self.transformer.config.guidance_embed:
            embedded = None  # a default for distilled models means nothing here (an explicit one was refused above)
        settings = GenerationSettings(
            prompt=prompts, negative_prompt=negs, height=height, width=width, video_length=video_length,
            num_inference_steps=num_inference_steps, seeds=seeds, guidance_scale=float(guidance_scale),
            embedded_guidance_scale=None if embedded is None else float(embedded),
            flow_shift=float(flow_shift if flow_shift is not None else d["flow_shift"]),
            flow_reverse=bool(d["flow_reverse"] if flow_reverse is None else flow_reverse),
            num_videos_per_prompt=num_videos_per_prompt, seed_device=validate.check_device(seed_device, "seed_device"))
        validate.check_settings(settings, has_guidance_embedding=self.transformer.config.guidance_embed,
                                official=RELEASE_DEFAULTS)
        return settings

    def __call__(self, prompt=None, negative_prompt=None, *, height=None, width=None, video_length=None,
                 num_inference_steps=None, seed=None, guidance_scale=None, embedded_guidance_scale=None,
                 flow_shift=None, flow_reverse=None, num_videos_per_prompt=1, callback=None,
                 progress=False, save_path=None, resume_from=None, seed_device: str | None = None) -> GenerationOutput:
        """Generate; with ``save_path`` the videos and settings.json are written there too.

        ``resume_from``: a file written on Ctrl-C or NaN; every setting is taken from it, so only
        ``prompt`` (which must then match) and the run options (callback, progress, save_path) may be given.
        """
        if resume_from is not None:
            given = {k: v for k, v in dict(negative_prompt=negative_prompt, height=height, width=width,
                                            video_length=video_length, num_inference_steps=num_inference_steps,
                                            seed=seed, guidance_scale=guidance_scale,
                                            embedded_guidance_scale=embedded_guidance_scale, flow_shift=flow_shift,
                                            flow_reverse=flow_reverse, seed_device=seed_device).items()
                     if v is not None}
            if given or num_videos_per_prompt != 1:
                raise ValueError(f"resume_from takes every setting from {resume_from}; do not also pass "
                                 f"{sorted(given) or ['num_videos_per_prompt']}")
            state = load_state(resume_from)
            settings = GenerationSettings.from_dict(state["settings"], source=str(resume_from))
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
                                     seed_device="cpu" if seed_device is None else seed_device)
        return self.generate(settings, callback=callback, progress=progress, save_path=save_path)

    def generate(self, settings: GenerationSettings, *, callback=None, progress=False, save_path=None,
                 latents: torch.Tensor | None = None, start_step: int = 0, state_dir=None,
                 state_info: dict | None = None) -> GenerationOutput:
        """Run one `GenerationSettings` (e.g. read back from a settings.json): the same settings give the
        same video. ``latents``/``start_step`` continue from a saved state (``start_step`` =
        num_inference_steps: denoising is done, only the decode runs). ``save_path`` (a new or empty folder,
        claimed for this run: `hvlab.outputs.OutputFolder`) receives the videos and settings.json;
        ``state_dir`` (default ``save_path``) the Ctrl-C / NaN state files; ``state_info`` is stored in their
        settings beside the generation settings (``hvlab generate`` keeps its run options there, ``"run"``, so
        that ``--resume`` loads the same model).

        Before anything is allocated: every setting is checked (`hvlab.validate.check_settings`), the run's
        memory is estimated and a run that would not fit is refused (`hvlab.fast.run_size.check_run_size`;
        off with ``pipe.check_memory = False``), a long CPU run warns with its estimated time
        (`SlowRunWarning`), and prompt words the tokenizer cannot read are named
        (`hvlab.validate.UnknownWordsWarning`)."""
        from .outputs import OutputFolder

        s = settings
        if not isinstance(s, GenerationSettings):
            raise TypeError(f"settings must be a GenerationSettings (pipe.settings_for(...) or "
                            f"GenerationSettings.from_dict(...)), got {type(s).__name__}")
        validate.check_settings(s, has_guidance_embedding=self.transformer.config.guidance_embed,
                                official=RELEASE_DEFAULTS)
        start_step = validate.check_resume_step(start_step, s.num_inference_steps, source="start_step")
        validate.check_callback(callback)
        if latents is not None:
            expected = (len(s.seeds), *self.latent_shape(s.height, s.width, s.video_length))
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                raise ValueError(f"saved latents have shape {tuple(getattr(latents, 'shape', ()))}, the settings "
                                 f"need {expected}")
        elif start_step:
            raise ValueError(f"start_step={start_step} needs the latents before that step (latents=)")
        self._check_run(s, start_step)
        folder = None
        if save_path is not None:
            folder = OutputFolder.claim(save_path, flag="save_path", resuming=latents is not None)
        failed = True
        try:
            out = self._run(s, callback, progress, folder, latents, start_step,
                            state_dir if state_dir is not None else folder.path if folder else None, state_info)
            failed = False
        finally:
            if folder is not None:
                folder.release(failed)
        return out

    def _check_run(self, s: GenerationSettings, start_step: int) -> None:
        """The size guard, the time estimate of a CPU run, and the words the tokenizer cannot read."""
        from .fast.run_size import check_run_size, describe_seconds, estimate_seconds
        from .model import HYVideoDiffusionTransformer
        from .vae import AutoencoderKLCausal3D

        cfg = s.guidance_scale > 1.0
        # the estimates read the real models' configs (stub models in unit tests have none; a wrapper such as
        # UlyssesDiT computes 1/N of each step, so the whole model's estimate is an upper bound)
        estimable = (isinstance(getattr(self.transformer, "model", self.transformer), HYVideoDiffusionTransformer)
                     and isinstance(self.vae, AutoencoderKLCausal3D))
        if estimable and self.check_memory:
            check_run_size(self, s.height, s.width, s.video_length, batch=len(s.seeds), cfg=cfg,
                           cap_GiB=self.memory_limit_gib)
        if estimable and self.device.type == "cpu":
            t = estimate_seconds(self, s.height, s.width, s.video_length, s.num_inference_steps - start_step,
                                 batch=len(s.seeds), cfg=cfg)
            if t["denoise"] + t["decode"] > self.SLOW_RUN_S:
                warnings.warn(
                    f"this run will take roughly {describe_seconds(t['denoise'] + t['decode'])} on this CPU "
                    f"({s.num_inference_steps - start_step} steps of ~{describe_seconds(t['per_step'])} + a decode of "
                    f"~{describe_seconds(t['decode'])}, estimated from its FLOPs and this CPU's matmul speed); a "
                    f"smaller size, fewer frames or steps, or a GPU make it shorter", SlowRunWarning, stacklevel=3)
        tokenizer = getattr(self.text_encoder, "tokenizer", None)
        if tokenizer is not None and start_step < s.num_inference_steps:
            validate.warn_unknown_words(tokenizer, list(dict.fromkeys(s.prompt)))

    def _run(self, s: GenerationSettings, callback, progress, folder, latents, start_step: int, save_dir,
             state_info: dict | None = None):
        n = s.num_inference_steps
        saved = dict(s.to_dict(), **(state_info or {}))  # the settings a state file records
        timings = {}
        if start_step < n:
            t0 = time.perf_counter()
            text, mask, pooled = self.encode_prompt(s.prompt)
            if s.guidance_scale > 1.0:
                n_text, n_mask, n_pooled = self.encode_prompt(s.negative_prompt or [""] * len(s.prompt))
                text, mask, pooled = torch.cat([n_text, text]), torch.cat([n_mask, mask]), torch.cat([n_pooled, pooled])
            timings["text_encoding_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if latents is None:
                latents = self.prepare_latents(s.seeds, s.height, s.width, s.video_length, s.seed_device)
            latents = self.denoise(latents, text, mask, pooled, num_inference_steps=n,
                                   guidance_scale=s.guidance_scale, embedded_guidance_scale=s.embedded_guidance_scale,
                                   flow_shift=s.flow_shift, flow_reverse=s.flow_reverse, callback=callback,
                                   start_step=start_step, progress=progress, save_dir=save_dir,
                                   settings=saved, prompts=s.prompt)
            timings["denoising_s"] = time.perf_counter() - t0
        else:  # a resume file written during the decode: the latents are already denoised
            latents = latents.float().to(self.device)
            if not bool(torch.isfinite(latents).all()):
                raise NonFiniteLatentsError("the denoised latents of the resume file hold NaN/inf", n, None, latents)
        timings["steps_run"] = n - start_step
        for h in self.hooks:  # a hook that changes the computation (hvlab.fast.cache.StepCache) says what it did
            timings.update(getattr(h, "report", dict)())
        try:
            t0 = time.perf_counter()
            videos = self.decode(latents, progress=progress)
            timings["decode_s"] = time.perf_counter() - t0
            out = GenerationOutput(videos=videos, latents=latents.cpu(), settings=s, timings=timings)
            if folder is not None:
                out.save(folder.path, fps=self.defaults["fps"])
        except KeyboardInterrupt as e:  # the denoised latents are kept: a resume goes straight to the decode
            if isinstance(e, GenerationInterrupted):
                raise
            path = None
            if save_dir is not None:
                with holding_sigint(reraise=False):
                    path = save_state(Path(save_dir) / "interrupted.pt", latents, n, saved)
            raise GenerationInterrupted(n, path, stage="decode") from None
        return out
