"""Hooks that look inside a generation while it runs, and the latent recorder.

A hook is an object in ``pipe.hooks``. The pipeline calls, when a hook has them,

    on_generation_begin(info: GenerationInfo)   # sizes, steps, prompts, which batch rows are conditional
    on_step_begin(i)                            # before the DiT evaluation of step i
    on_step_end(state: StepState)               # after the Euler update of step i
    on_generation_end()

Hooks are installed with ``with``, and the model is restored on exit, exception or not::

    with LatentRecorder(pipe, rgb_map=...) as lat, AttentionRecorder(pipe, steps=[10], blocks=[("double", 1)]) as att:
        out = pipe("a red circle moving right", seed=0)
    maps = att.text_maps()            # one heat map per prompt word, (T, H, W) on the post-patch grid

`LatentRecorder` is here; `AttentionRecorder` is in `hvlab.inspection.attention_maps`.
"""
from __future__ import annotations

import torch


class PipelineHook:
    """Base class: registers itself in ``pipe.hooks`` inside ``with`` and removes itself on exit."""

    def __init__(self, pipe=None):
        self.pipe = pipe

    def on_generation_begin(self, info) -> None:
        pass

    def on_step_begin(self, i: int) -> None:
        pass

    def on_step_end(self, state) -> None:
        pass

    def on_generation_end(self) -> None:
        pass

    def attach(self):
        if self.pipe is not None:
            self.pipe.hooks.append(self)
        return self

    def detach(self) -> None:
        if self.pipe is not None and self in self.pipe.hooks:
            self.pipe.hooks.remove(self)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


# ---- latents ----------------------------------------------------------------------------------------

def channel_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and std of latents (B, C, T, H, W) over T, H, W: each (B, C), float32."""
    z = z.float()
    return {"mean": z.mean(dim=(2, 3, 4)), "std": z.std(dim=(2, 3, 4))}


class LatentRecorder(PipelineHook):
    """Records, every ``every`` steps (and always the last): the latent x after the step, the predicted
    clean latent x0 = x_in - sigma * v, per-channel mean/std of both and an RGB preview of x0 through a
    16 -> 3 per-pixel map (``rgb_map``, see `hvlab.inspection.preview`; default ``pipe.latent_rgb_map``); and, every
    ``decode_every`` steps (and the last), a true VAE decode of x0. Everything is stored on the CPU in
    float32.

    Results: ``steps``, ``sigmas`` (the step's starting noise level), ``latents`` / ``x0`` (S, B, C, T, H, W),
    ``stats[name]`` (S, B, C) for name in latent_mean, latent_std, x0_mean, x0_std, ``previews``
    (S, B, 3, T, H, W) in [0, 1], ``decoded`` {step: (B, 3, F, H, W)}.
    """

    def __init__(self, pipe, every: int = 1, rgb_map: dict | None = None, decode_every: int | None = None,
                 keep_latents: bool = True):
        super().__init__(pipe)
        if every < 1:
            raise ValueError(f"every must be >= 1 (record every k-th step), got {every}")
        if decode_every is not None and decode_every < 1:
            raise ValueError(f"decode_every must be None or >= 1, got {decode_every}")
        self.every, self.decode_every, self.keep_latents = every, decode_every, keep_latents
        self.rgb_map = rgb_map if rgb_map is not None else getattr(pipe, "latent_rgb_map", None)
        self.steps: list[int] = []
        self.sigmas: list[float] = []
        self._latents, self._x0, self._previews = [], [], []
        self._stats: dict[str, list[torch.Tensor]] = {}
        self.decoded: dict[int, torch.Tensor] = {}

    def on_step_end(self, state) -> None:
        i, last = state.i, state.i == state.n - 1
        x0 = state.x0  # (B, C, T, H, W) float32
        if self.decode_every is not None and (i % self.decode_every == 0 or last):
            self.decoded[i] = self.pipe.decode(x0, progress=False)
        if i % self.every and not last:
            return
        self.steps.append(i)
        self.sigmas.append(state.sigma)
        for name, z in (("latent", state.latents), ("x0", x0)):
            for stat, value in channel_stats(z).items():
                self._stats.setdefault(f"{name}_{stat}", []).append(value.cpu())
        if self.keep_latents:
            self._latents.append(state.latents.float().cpu())
            self._x0.append(x0.cpu())
        if self.rgb_map is not None:
            from .preview import latent_to_rgb

            self._previews.append(latent_to_rgb(x0, self.rgb_map).cpu())

    @property
    def latents(self) -> torch.Tensor:
        return torch.stack(self._latents)

    @property
    def x0(self) -> torch.Tensor:
        return torch.stack(self._x0)

    @property
    def previews(self) -> torch.Tensor | None:
        return torch.stack(self._previews) if self._previews else None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack(v) for k, v in self._stats.items()}
