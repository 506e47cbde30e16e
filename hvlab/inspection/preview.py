"""Cheap RGB previews of latents: a small per-pixel map from the latent channels to RGB, fitted for a VAE.

A VAE decode per denoising step is costly at 720p; a map applied to each latent pixel on its own is
nearly free and shows layout and colour. `fit_latent_to_rgb` fits one from (latent, video) pairs:

- ``hidden=0``: a linear map ``rgb = W z + b`` by least squares (closed form);
- ``hidden=N``: one hidden layer, ``rgb = W2 silu(W1 z + b1) + b2``, fitted by Adam from a seeded start.
  A VAE is free to store colour non-linearly: the toy VAE keeps most of "green" in one channel that
  swings from +3 to -12, and no linear map tells its red objects from magenta ones (a linear fit gives
  red objects a blue channel as bright as their red one). hvlab ships a ``hidden=32`` map for the toy VAE
  in its config.json (`hvlab.toy.train.fit_toy_preview_map`); tests/test_hooks.py checks that its
  previews show every toy colour as the decoded video does.

Pixels can be weighted by their brightness (``foreground_weight``): on mostly black frames an unweighted
fit spends itself on the background and gets the object, the part a preview is for, wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def video_on_latent_grid(videos: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Average a video (B, 3, F, H, W) down to the latent grid (B, 3, T, h, w).

    Latent frame 0 holds video frame 0 alone; latent frame k > 0 holds frames 4k-3 .. 4k (causal VAE).
    """
    T, h, w = latent_shape
    F_ = videos.shape[2]
    r = (F_ - 1) // max(1, T - 1) if T > 1 else 1
    first = videos[:, :, :1]
    rest = videos[:, :, 1:].reshape(*videos.shape[:2], T - 1, r, *videos.shape[3:]).mean(3) if T > 1 else first[:, :, :0]
    v = torch.cat([first, rest], dim=2)  # (B, 3, T, H, W)
    return F.adaptive_avg_pool3d(v.float(), (T, h, w))


def fit_latent_to_rgb(latents: torch.Tensor, videos: torch.Tensor, hidden: int = 0, foreground_weight: float = 0.0,
                      steps: int = 1500, lr: float = 1e-2, max_rows: int = 8192, seed: int = 0) -> dict:
    """Fit a latent -> RGB map from latents (B, C, T, h, w) and their videos (B, 3, F, H, W) in [-1, 1].

    Each latent pixel is paired with its video averaged onto the latent grid (`video_on_latent_grid`); a
    pixel weighs ``1 + foreground_weight * brightness`` (brightest channel, 0..1) in the squared error.
    Returns a JSON-serialisable dict mapping to [-1, 1] RGB: ``{"weight": 3 x C, "bias": 3}`` for
    ``hidden=0``, plus ``"hidden_weight": hidden x C, "hidden_bias": hidden`` (and ``weight`` 3 x hidden).
    The hidden-layer fit runs ``steps`` full-batch Adam steps on ``max_rows`` latent pixels drawn (seeded, with
    replacement) in proportion to their weights, which is the weighted error in expectation at a fraction of
    the cost: most pixels of a toy video are the same black.
    """
    if latents.dim() != 5 or videos.dim() != 5 or videos.shape[1] != 3 or len(videos) != len(latents):
        raise ValueError(f"expected latents (B, C, T, h, w) and videos (B, 3, F, H, W) with the same B, got "
                         f"{tuple(latents.shape)} and {tuple(videos.shape)}")
    if hidden < 0 or foreground_weight < 0:
        raise ValueError(f"hidden and foreground_weight must be >= 0, got {hidden} and {foreground_weight}")
    B, C, T, h, w = latents.shape
    target = video_on_latent_grid(videos, (T, h, w))  # (B, 3, T, h, w)
    z = latents.detach().float().permute(0, 2, 3, 4, 1).reshape(-1, C).cpu()  # (N, C) one row per latent pixel
    y = target.permute(0, 2, 3, 4, 1).reshape(-1, 3).cpu()  # (N, 3)
    weight = 1 + foreground_weight * ((y.amax(dim=1) + 1) / 2).clamp(0, 1)  # (N,)
    if hidden == 0:
        A = torch.cat([z, torch.ones(len(z), 1)], dim=1)
        s = weight.sqrt()[:, None]
        sol = torch.linalg.lstsq((A * s).double(), (y * s).double()).solution.float()  # (C + 1, 3)
        return {"weight": sol[:C].T.tolist(), "bias": sol[C].tolist()}
    g = torch.Generator().manual_seed(seed)
    rows = torch.multinomial(weight, max_rows, replacement=True, generator=g)
    z, y = z[rows], y[rows]
    mean, std = z.mean(0), z.std(0).clamp_min(1e-6)  # start from standardised inputs, folded in at the end
    W1 = (torch.randn(hidden, C, generator=g) / C ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    W2 = (torch.randn(3, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b2 = torch.zeros(3, requires_grad=True)
    zn = (z - mean) / std
    opt = torch.optim.Adam([W1, b1, W2, b2], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            pred = F.silu(zn @ W1.T + b1) @ W2.T + b2
            loss = (pred - y).square().mean()  # the rows were drawn by weight
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    W1, b1 = W1.detach() / std, b1.detach() - (W1.detach() / std) @ mean  # W1 (z - m) / s = (W1 / s) z - (W1 / s) m
    return {"hidden_weight": W1.tolist(), "hidden_bias": b1.tolist(), "weight": W2.detach().tolist(),
            "bias": b2.detach().tolist()}


def latent_to_rgb(latents: torch.Tensor, rgb_map: dict) -> torch.Tensor:
    """Apply a fitted map: latents (B, C, T, h, w) -> preview (B, 3, T, h, w) in [0, 1]."""
    def tensor(key):
        return torch.tensor(rgb_map[key], dtype=torch.float32, device=latents.device)

    x = latents.float()
    if "hidden_weight" in rgb_map:
        W1 = tensor("hidden_weight")  # (hidden, C)
        if W1.shape[1] != x.shape[1]:
            raise ValueError(f"the RGB map expects {W1.shape[1]} latent channels, got {x.shape[1]}")
        x = F.silu(torch.einsum("oc,bcthw->bothw", W1, x) + tensor("hidden_bias").view(1, -1, 1, 1, 1))
    W, b = tensor("weight"), tensor("bias")  # (3, C or hidden), (3,)
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"the RGB map expects {W.shape[1]} latent channels, got {x.shape[1]}")
    rgb = torch.einsum("oc,bcthw->bothw", W, x) + b.view(1, 3, 1, 1, 1)
    return (rgb / 2 + 0.5).clamp(0, 1)
