"""Cheap RGB previews of latents: a 16 -> 3 linear map fitted by least squares for a given VAE.

A VAE decode per denoising step is costly at 720p; a linear map from the 16 latent channels to RGB
is nearly free and shows layout and colour. hvlab fits the map for the toy VAE (shipped in its
config.json) and `fit_latent_to_rgb` fits one for any VAE from (latent, video) pairs.
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


def fit_latent_to_rgb(latents: torch.Tensor, videos: torch.Tensor) -> dict:
    """Least-squares ``rgb ≈ W z + b`` from latents (B, C, T, h, w) and their videos in [-1, 1].

    Returns ``{"weight": 3 x C list, "bias": 3 list}`` mapping to [-1, 1] RGB (JSON-serialisable).
    """
    B, C, T, h, w = latents.shape
    target = video_on_latent_grid(videos, (T, h, w))  # (B, 3, T, h, w)
    z = latents.float().permute(0, 2, 3, 4, 1).reshape(-1, C).cpu()
    y = target.permute(0, 2, 3, 4, 1).reshape(-1, 3).cpu()
    A = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    sol = torch.linalg.lstsq(A.double(), y.double()).solution.float()  # (C + 1, 3)
    return {"weight": sol[:C].T.tolist(), "bias": sol[C].tolist()}


def latent_to_rgb(latents: torch.Tensor, rgb_map: dict) -> torch.Tensor:
    """Apply a fitted map: latents (B, C, T, h, w) -> preview (B, 3, T, h, w) in [0, 1]."""
    W = torch.tensor(rgb_map["weight"], dtype=torch.float32, device=latents.device)  # (3, C)
    b = torch.tensor(rgb_map["bias"], dtype=torch.float32, device=latents.device)
    if W.shape[1] != latents.shape[1]:
        raise ValueError(f"the RGB map expects {W.shape[1]} latent channels, got {latents.shape[1]}")
    rgb = torch.einsum("oc,bcthw->bothw", W, latents.float()) + b.view(1, 3, 1, 1, 1)
    return (rgb / 2 + 0.5).clamp(0, 1)
