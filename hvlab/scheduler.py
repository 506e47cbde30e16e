"""Flow matching: the noise schedule HunyuanVideo samples with, and the same maths for training.

HunyuanVideo is not a DDPM-style diffusion model. It is a *rectified flow*: a sample at noise
level ``sigma`` in [0, 1] is the straight-line blend

    x_sigma = (1 - sigma) * x0 + sigma * noise,

and the DiT predicts the velocity ``v = dx/dsigma = noise - x0``, which is the same everywhere
along one line. Sampling integrates ``dx = v dsigma`` from sigma = 1 (pure noise) to sigma = 0
(data) with plain Euler steps; with a perfect model one step would do, and the many steps
are there because a real model's v changes with sigma.

What differs from a uniform grid is the **shift**. Steps are placed at
``sigma' = shift * s / (1 + (shift - 1) * s)`` for s evenly spaced in [1, 0]. With shift 7 (the
official default; 9 before Dec 2024) that bends the grid towards sigma = 1: half of the 50 steps
are spent above sigma ~0.88, where a video's layout and motion are decided, and the last step
jumps from 0.125 straight to 0. :func:`plot_sigma_schedule` draws this.

The model is told ``t = sigma * 1000`` (a float, not an integer DDPM index).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .runs import RELEASE_DEFAULTS
from .validate import check_flow_shift, check_steps

SOLVERS = ("euler",)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``: maps [0, 1] onto itself, fixing both ends.

    shift > 1 pushes every interior value towards 1 (more steps at high noise); shift = 1 is the
    identity. SD3 introduced it as the "timestep shift" for high-resolution images.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_shift(shift: float) -> float:
    return check_flow_shift(shift, "shift", default=RELEASE_DEFAULTS["flow_shift"])


def _check_steps(n: int, name: str = "num_inference_steps", default: int = RELEASE_DEFAULTS["num_inference_steps"]) -> int:
    return check_steps(n, name, default=default)


class FlowMatchDiscreteScheduler:
    """Euler sampler for rectified flow on a shifted sigma grid, as in the official release.

    Args:
        num_train_timesteps: the model's time scale: it is fed ``t = sigma * num_train_timesteps``.
        shift: grid shift (see the module docstring); the default is the official CLI's 7.0
            (``hvlab.runs.RELEASE_DEFAULTS["flow_shift"]``).
        reverse: True runs sigma 1 -> 0 (noise to data), which every official command asks for
            with ``--flow-reverse``; False runs 0 -> 1 (the official CLI's literal default).
        solver: only "euler" exists (as upstream).

    After ``set_timesteps(n)``: ``sigmas`` has n + 1 float32 values (the last is the end point,
    0 when reversed) and ``timesteps`` the n values given to the model, ``sigmas[:-1] * 1000``.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = RELEASE_DEFAULTS["flow_shift"],
                 reverse: bool = True, solver: str = "euler"):
        _check_steps(num_train_timesteps, "num_train_timesteps", default=1000)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = _check_shift(shift)
        self.reverse = bool(reverse)
        self.solver = solver
        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None      # (n + 1,) float32
        self.timesteps: torch.Tensor | None = None   # (n,) float32
        self.step_index = 0                          # index of the next step() call

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Build the n-step grid and rewind ``step_index`` to 0."""
        n = _check_steps(num_inference_steps)
        sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)
        sigmas = shift_sigmas(sigmas, self.shift)
        if not self.reverse:
            sigmas = 1 - sigmas
        self.num_inference_steps = n
        self.sigmas = sigmas.to(device)
        self.timesteps = (sigmas[:-1] * self.num_train_timesteps).to(device=device, dtype=torch.float32)
        self.step_index = 0

    def _resolve_index(self, timestep_or_index) -> int:
        """An int (or integer tensor) is a step index; a float (or float tensor) is a timestep value."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        n = len(self.timesteps)
        if timestep_or_index is None:
            index = self.step_index
        elif isinstance(timestep_or_index, bool):
            raise TypeError("timestep_or_index must be an int step index or a float timestep, got a bool")
        elif isinstance(timestep_or_index, int) or (
            isinstance(timestep_or_index, torch.Tensor) and not timestep_or_index.is_floating_point()
        ):
            index = int(torch.as_tensor(timestep_or_index).flatten()[0])
        else:
            t = torch.as_tensor(timestep_or_index, dtype=torch.float32).flatten()
            if not torch.all(t == t[0]):
                raise ValueError(f"all samples must be at the same timestep, got {t.tolist()}")
            # A batch of timesteps may have gone through bf16 (t = 997.09 -> 996.0): take the nearest.
            distance = (self.timesteps.cpu() - t[0].cpu()).abs()
            index = int(distance.argmin())
            if distance[index] > 0.01 * self.num_train_timesteps:
                raise ValueError(
                    f"timestep {float(t[0]):.3f} is not on this schedule (nearest is "
                    f"{float(self.timesteps[index]):.3f}); pass the step index instead"
                )
        if not 0 <= index < n:
            raise IndexError(f"step index must be in [0, {n - 1}] for {n} steps, got {index}")
        return index

    def step(self, model_output: torch.Tensor, timestep_or_index=None, sample: torch.Tensor = None) -> torch.Tensor:
        """One Euler step: ``sample + v * (sigma[i + 1] - sigma[i])``, computed in fp32.

        ``timestep_or_index`` may be the step index (a Python int or an integer tensor), the timestep
        value the model was given (a float or a float tensor, matched to the nearest entry of
        ``timesteps``), or None to use ``step_index``, which every call advances to ``i + 1``.
        Returns the new sample in ``sample``'s dtype.
        """
        if sample is None:
            raise TypeError("step() needs the current sample: step(model_output, timestep_or_index, sample)")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}")
        i = self._resolve_index(timestep_or_index)
        dt = (self.sigmas[i + 1] - self.sigmas[i]).to(device=sample.device, dtype=torch.float32)
        prev_sample = sample.float() + model_output.float() * dt
        self.step_index = i + 1
        return prev_sample.to(sample.dtype)

    # The training-side helpers below are module functions; they are attached here too so that
    # code holding a scheduler can call scheduler.add_noise(...) like diffusers users expect.
    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        return add_noise(x0, noise, sigma)

    @staticmethod
    def predicted_x0(sample: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
        return predicted_x0(sample, v, sigma)

    def __repr__(self) -> str:
        return (f"FlowMatchDiscreteScheduler(num_train_timesteps={self.num_train_timesteps}, shift={self.shift}, "
                f"reverse={self.reverse}, solver={self.solver!r}, steps={self.num_inference_steps})")


def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
    """A float, a 0-d tensor or a (B,) tensor of sigmas, shaped to broadcast against ``like`` (B, ...)."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.ndim == 1:
        if sigma.shape[0] != like.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} values but the batch has {like.shape[0]} samples")
        sigma = sigma.reshape(-1, *([1] * (like.ndim - 1)))
    elif sigma.ndim > 1:
        raise ValueError(f"sigma must be a number or a (B,) tensor, got shape {tuple(sigma.shape)}")
    return sigma


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The training input ``(1 - sigma) * x0 + sigma * noise``; its regression target is ``noise - x0``."""
    s = _per_sample(sigma, x0).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def predicted_x0(sample: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """The clean sample a velocity points at: ``sample - sigma * v`` (one Euler step straight to 0)."""
    s = _per_sample(sigma, sample).to(sample.dtype)
    return sample - s * v


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
                  seed_device: torch.device | str = "cpu") -> torch.Tensor:
    """The starting latents: one standard-normal (C, T, H, W) draw per seed, stacked to (B, C, T, H, W) float32.

    Each video has its own ``torch.Generator(seed_device).manual_seed(seed)``. hvlab's default draws on the CPU,
    so a seed gives the same video on every machine. The official sampler makes its generators on the run's
    device (``torch.Generator(self.device)``), whose random streams differ from the CPU's: pass
    ``seed_device="cuda"`` to draw as it does. (It also draws in the text encoder's dtype, fp16; hvlab draws
    in float32.) The result is moved to ``device``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("initial_noise needs at least one seed")
    seed_device = torch.device(seed_device)
    noise = [torch.randn(tuple(shape), generator=torch.Generator(seed_device).manual_seed(s), device=seed_device)
             for s in seeds]
    return torch.stack(noise).to(device)


def cfg_combine(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a true-CFG batch into (v_negative, v_positive): the official order is **negative half first**
    (``torch.cat([negative_prompt_embeds, prompt_embeds])``, then ``noise_pred.chunk(2)``)."""
    if v.shape[0] % 2:
        raise ValueError(f"a CFG batch holds a negative and a positive half, got an odd batch of {v.shape[0]}")
    v_neg, v_pos = v.chunk(2)
    return v_neg, v_pos


def rescale_noise_cfg(v_cfg: torch.Tensor, v_pos: torch.Tensor, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4).

    The guided prediction is scaled to the per-sample standard deviation of the positive one, then blended
    back: ``phi * v_cfg * std(v_pos) / std(v_cfg) + (1 - phi) * v_cfg``, std over every axis but the batch.
    The official pipeline has this step, but its default is 0.0 and ``sample_video.py`` never sets it, so the
    release never rescales; hvlab's pipeline does not call it either. 0 returns ``v_cfg`` unchanged.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if guidance_rescale == 0.0:
        return v_cfg
    dims = list(range(1, v_cfg.ndim))
    rescaled = v_cfg * (v_pos.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * v_cfg


def sample_training_sigmas(n: int, shift: float = 1.0, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """n training noise levels: u ~ Uniform(0, 1), then the same shift as sampling. (n,) float32.

    Shifting the training distribution like the sampling grid spends training where sampling
    spends steps (shift > 1: mostly high noise). shift = 1 is plain uniform sampling.
    """
    _check_steps(n, "n")
    u = torch.rand(n, generator=generator, dtype=torch.float32,
                   device=generator.device if generator is not None else "cpu")
    return shift_sigmas(u, _check_shift(shift)).to(device)


def plot_sigma_schedule(shifts: Sequence[float] = (1.0, 3.0, 7.0, 9.0, 17.0), num_inference_steps: int = 50,
                        reverse: bool = True, ax=None):
    """Sigma against step index for several shifts, with a marker per step; returns the Figure.

    Without ``ax`` a second panel is added: a histogram of the steps' sigma values (how many of the
    steps are spent in each tenth of the noise range). Uses ``matplotlib.figure.Figure`` directly, not
    pyplot, so it needs no display and never opens a window: show it by returning it from a notebook
    cell, or ``fig.savefig(...)``.
    """
    from matplotlib.figure import Figure

    _check_steps(num_inference_steps)
    schedules = {}
    for shift in shifts:
        scheduler = FlowMatchDiscreteScheduler(shift=shift, reverse=reverse)
        scheduler.set_timesteps(num_inference_steps)
        schedules[shift] = scheduler.sigmas.numpy()

    if ax is None:
        fig = Figure(figsize=(11, 4), layout="constrained")
        ax, ax_hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax_hist = ax.figure, None

    steps = range(num_inference_steps + 1)
    for shift, sigmas in schedules.items():
        ax.plot(steps, sigmas, marker="o", markersize=2.5, linewidth=1, label=f"shift {shift:g}")
    ax.set_xlabel("step index i (the last point is the end of the final step)")
    ax.set_ylabel("sigma (1 = pure noise, 0 = data)")
    ax.set_title(f"Sigma at each of {num_inference_steps} Euler steps, one line per shift\n"
                 f"({'reverse: 1 -> 0' if reverse else 'not reversed: 0 -> 1'}; a marker per step)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    if ax_hist is not None:
        bins = [k / 10 for k in range(11)]
        # Each step i is counted at the sigma it starts from (what the model sees), not the end point.
        ax_hist.hist([s[:-1] for s in schedules.values()], bins=bins, label=[f"shift {s:g}" for s in schedules],
                     orientation="horizontal")
        ax_hist.set_xlabel(f"number of steps (of {num_inference_steps})")
        ax_hist.set_ylabel("sigma the step starts from")
        ax_hist.set_title("Where the steps are spent:\nsteps per 0.1 band of the sigma they start from", fontsize=10)
        ax_hist.grid(alpha=0.3)
    return fig
