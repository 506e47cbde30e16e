"""Pictures of a generation: frame grids, denoising strips, animations, attention overlays, channel statistics.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so it needs no display and never
opens a window: return it from a notebook cell, or ``fig.savefig(path)``. Titles state every aggregation in
the picture (over heads, steps, subword tokens) and where a map sits (step, block).

Inputs follow hvlab's conventions: one video is (3, F, H, W) in [0, 1] (a row of
``GenerationOutput.videos``) or uint8 (F, H, W, 3); heat maps are (T, H, W) on the post-patch token grid
(see `hvlab.inspection.attention_maps.upsample_to_video` for the frame mapping).
"""
from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np
import torch

from .attention_maps import AttentionMaps, upsample_to_video


# Sizes for the docs site, where a notebook's outputs are ~690 px wide in a 1280 px window and figures are
# drawn at 100 dpi: at most PAGE_IN wide, so a figure is shown at >= 60% of its size and its 8-point labels
# stay readable (scripts/check_site.py checks both), and at least MIN_IN wide (the site's 600 px floor).
PAGE_IN = 10.5
MIN_IN = 6.6


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _wrap(text: str, width_in: float, fontsize: float = 10) -> str:
    """Wrap each line of a title to the figure's width (~0.6 em per character), so it never widens the figure."""
    chars = max(30, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def as_frames(video) -> np.ndarray:
    """(3, F, H, W) float in [0, 1] or (F, H, W, 3) uint8 -> (F, H, W, 3) float32 numpy in [0, 1]."""
    x = video.detach().cpu() if isinstance(video, torch.Tensor) else torch.as_tensor(np.asarray(video))
    if x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == 3:
        return x.float().numpy() / 255
    if x.is_floating_point() and x.dim() == 4 and x.shape[0] == 3:
        return x.float().clamp(0, 1).permute(1, 2, 3, 0).numpy()
    raise ValueError(f"a video must be (3, F, H, W) float in [0, 1] or (F, H, W, 3) uint8, got {x.dtype} {tuple(x.shape)}")


def pick_frames(num_frames: int, n: int = 8) -> list[int]:
    """``n`` frame indices spread evenly from the first to the last frame."""
    n = max(1, min(n, num_frames))
    return sorted({round(i * (num_frames - 1) / max(1, n - 1)) for i in range(n)})


def frame_grid(video, frames: Sequence[int] | None = None, ncols: int | None = None, title: str | None = None):
    """Chosen frames of one video side by side (default 8 evenly spaced), each labelled with its index.

    The figure is between MIN_IN and PAGE_IN wide whatever the frames' shape (a strip of several videos side
    by side gets wide panels), and the title wraps to that width."""
    f = as_frames(video)
    frames = list(frames) if frames is not None else pick_frames(len(f))
    ncols = len(frames) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1 (or None: one row), got {ncols}")
    nrows = -(-len(frames) // ncols)
    aspect = f.shape[2] / f.shape[1]  # width / height of a frame
    width = min(PAGE_IN, max(MIN_IN, 1.6 * aspect * ncols))
    text = _wrap(title or f"{len(frames)} of {len(f)} frames", width)
    fig = _figure(width, nrows * (width / ncols / aspect + 0.3) + 0.25 * (text.count("\n") + 1) + 0.2)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, frames):
        ax.imshow(f[i], interpolation="nearest")
        ax.set_title(f"frame {i}", fontsize=9)
    fig.suptitle(text, fontsize=10)
    return fig


def videos_grid(videos, labels: Sequence[str], frames: Sequence[int] | None = None, title: str | None = None):
    """Several videos, one row each (labelled, e.g. with its prompt), the same frames in the columns.

    ``videos``: (B, 3, F, H, W) in [0, 1] (``GenerationOutput.videos``) or a list of single videos."""
    vids = [as_frames(v) for v in videos]
    if len(labels) != len(vids):
        raise ValueError(f"need one label per video: {len(vids)} videos, {len(labels)} labels")
    frames = list(frames) if frames is not None else pick_frames(len(vids[0]), 5)
    aspect = vids[0].shape[2] / vids[0].shape[1]
    width = min(PAGE_IN, max(MIN_IN, 1.7 * aspect * len(frames) + 1.6))
    panel = (width - 1.6) / len(frames)  # inches per frame; 1.6 in for the row labels
    text = _wrap(title or f"{len(vids)} videos, frames {', '.join(map(str, frames))}", width)
    fig = _figure(width, len(vids) * (panel / aspect + 0.1) + 0.3 + 0.25 * (text.count("\n") + 1))
    axes = fig.subplots(len(vids), len(frames), squeeze=False)
    for r, (v, label) in enumerate(zip(vids, labels)):
        for c, i in enumerate(frames):
            ax = axes[r, c]
            ax.imshow(v[i], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=9)
            if c == 0:
                ax.set_ylabel(textwrap.fill(label, 18), fontsize=9, rotation=0, ha="right", va="center")
    fig.suptitle(text, fontsize=10)
    return fig


def denoising_strip(previews: torch.Tensor, steps: Sequence[int], sigmas: Sequence[float] | None = None,
                    latent_frames: Sequence[int] | None = None, title: str | None = None):
    """How the predicted clean video x0 forms: one column per recorded step, one row per latent frame.

    ``previews``: (S, 3, T, h, w) in [0, 1] for one video (e.g. ``LatentRecorder.previews[:, b]``).
    """
    p = previews.detach().float().cpu()
    S, _, T = p.shape[:3]
    rows = list(latent_frames) if latent_frames is not None else pick_frames(T, 3)
    panel = min(1.2, (PAGE_IN - 0.6) / S)  # inches per preview: the strip stays within the page
    text = _wrap(title or "predicted x0 = x - σ·v at each recorded step (16→3 per-pixel preview)", panel * S + 0.6)
    fig = _figure(max(MIN_IN, panel * S + 0.6), (panel + 0.05) * len(rows) + 0.8 + 0.25 * text.count("\n"))
    axes = fig.subplots(len(rows), S, squeeze=False)
    for r, t in enumerate(rows):
        for c in range(S):
            ax = axes[r, c]
            ax.imshow(p[c, :, t].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                label = f"step {steps[c]}" + (f"\nσ={sigmas[c]:.2f}" if sigmas is not None else "")
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"latent t={t}", fontsize=8)
    fig.suptitle(text, fontsize=10)
    return fig


def channel_stats_plot(stats: dict[str, torch.Tensor], steps: Sequence[int], sample: int = 0,
                       names: Sequence[str] = ("x0_mean", "x0_std"), title: str | None = None):
    """Per-channel statistics over the steps: one panel per statistic, one line per latent channel.

    ``stats[name]`` is (S, B, C), as ``LatentRecorder.stats``; each value is a mean or std over (T, H, W).
    """
    fig = _figure(min(PAGE_IN, 4.2 * len(names)), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names):
        values = stats[name][:, sample].numpy()  # (S, C)
        for c in range(values.shape[1]):
            ax.plot(steps, values[:, c], lw=1, label=f"c{c}")
        ax.set_xlabel("denoising step")
        kind, stat = name.rsplit("_", 1)
        ax.set_title(f"{stat} of {kind} per channel (over T, H, W)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(_wrap(title or f"latent channel statistics, video {sample}", min(PAGE_IN, 4.2 * len(names))),
                 fontsize=10)
    return fig


def heat_on_frames(video, heat: torch.Tensor) -> np.ndarray:
    """Upsample one (T, H, W) heat map to the video's frames: (F, H_px, W_px) numpy (nearest)."""
    f = as_frames(video)
    return upsample_to_video(heat.float(), len(f), f.shape[1], f.shape[2]).numpy()


def attention_overlay(video, maps: AttentionMaps, labels: Sequence[str] | None = None,
                      frames: Sequence[int] | None = None, step=None, block=None, head=None, alpha: float = 0.55,
                      cmap: str = "inferno", normalize: str = "per_map", title: str | None = None):
    """Heat maps over decoded frames: one row per word (label), one column per frame.

    ``labels``: words, or indices into ``maps.labels`` (to pick one occurrence of a word that occurs twice).

    ``normalize="per_map"`` scales each word's map to its own maximum over all frames (shapes are
    comparable, magnitudes are not: the row label gives the maximum); ``"shared"`` uses one scale.
    """
    f = as_frames(video)
    labels = list(labels) if labels is not None else list(maps.labels)
    frames = list(frames) if frames is not None else pick_frames(len(f), 5)
    heats = [heat_on_frames(video, maps.get(lab, step=step, block=block, head=head)) for lab in labels]
    vmax_all = max(float(h.max()) for h in heats) or 1.0
    width = min(PAGE_IN, max(MIN_IN, 1.7 * len(frames) + 1.0))
    fig = _figure(width, (width - 1.0) / len(frames) * len(labels) + 0.9)
    axes = fig.subplots(len(labels), len(frames), squeeze=False)
    for r, (lab, h) in enumerate(zip(labels, heats)):
        vmax = (float(h.max()) or 1.0) if normalize == "per_map" else vmax_all
        for c, i in enumerate(frames):
            ax = axes[r, c]
            ax.imshow(f[i], interpolation="nearest")
            ax.imshow(h[i], cmap=cmap, alpha=alpha, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=8)
            if c == 0:
                name = f"{maps.labels[lab]!r} (word {lab})" if isinstance(lab, int) else repr(lab)
                ax.set_ylabel(f"{name}\nmax {float(h.max()):.3f}", fontsize=8)
    what = {"key": "attention of video tokens on each word (text as key)",
            "query": "attention of each word over the video (text as query)",
            "video_query": "attention of one video token over the video",
            "concept": "concept maps: each word's attention output . each video token's (ConceptAttention)"}[maps.direction]
    scale = "each row scaled to its max" if normalize == "per_map" else "one colour scale"
    text = _wrap(title or f"{what}\n{maps.describe(step, block, head)}; {scale}", width, 9)
    fig.suptitle(text, fontsize=9)
    return fig


def maps_side_by_side(video, maps: dict[str, AttentionMaps], labels: Sequence[str], frames: Sequence[int] | None = None,
                      step=None, block=None, masks: Sequence | None = None, mask_colours: Sequence[str] | None = None,
                      cmap: str = "gray", show_video: bool = True, title: str | None = None):
    """Several kinds of map of the same words, side by side: one row per word, one group of columns per kind.

    ``maps``: {name: AttentionMaps} (e.g. cross-attention and concept maps of one generation), each holding
    every word of ``labels``. Each panel is one map at one frame, scaled to that map's maximum over all frames
    (its shape is what counts; the row label gives each kind's maximum). ``masks``: optional (F, H, W) bool
    masks (e.g. the detector's, one per object), drawn as outlines in ``mask_colours`` over every map, so a
    reader sees which object a word's map lands on. ``show_video`` adds a first row with the frames themselves.
    """
    f = as_frames(video)
    labels, kinds = list(labels), list(maps)
    frames = list(frames) if frames is not None else pick_frames(len(f), 3)
    if masks is not None:
        masks = [np.asarray(torch.as_tensor(m).cpu()) for m in masks]
        mask_colours = list(mask_colours) if mask_colours is not None else ["tab:red", "tab:blue", "tab:green"]
        if len(mask_colours) < len(masks):
            raise ValueError(f"need a colour per mask: {len(masks)} masks, {len(mask_colours)} colours")
    heats = {k: [heat_on_frames(video, maps[k].get(lab, step=step, block=block)) for lab in labels] for k in kinds}
    ncols = len(kinds) * len(frames)
    width = min(PAGE_IN, max(MIN_IN, 1.5 * ncols + 1.0))
    panel = (width - 1.0) / ncols
    nrows = len(labels) + int(show_video)
    parts = {k: maps[k].describe(step, block).split(", ") for k in kinds}  # step, block, heads[, words]
    how = "; ".join(f"{k}: {', '.join(p[2:])}" for k, p in parts.items())
    text = _wrap(title or f"{' | '.join(kinds)} maps, {', '.join(parts[kinds[0]][:2])} ({how}); each map scaled "
                          f"to its own max over the frames" + ("; outlines: the detected objects" if masks is not None
                                                              else ""), width, 9)
    fig = _figure(width, nrows * panel + 1.0 + 0.2 * text.count("\n"))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for g, kind in enumerate(kinds):
        for c, i in enumerate(frames):
            col = g * len(frames) + c
            for r in range(nrows):
                ax = axes[r, col]
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{kind}\nframe {i}", fontsize=8)
                if show_video and r == 0:
                    ax.imshow(f[i], interpolation="nearest")
                    if col == 0:
                        ax.set_ylabel("video", fontsize=8)
                    continue
                w = r - int(show_video)
                h = heats[kind][w]
                ax.imshow(h[i], cmap=cmap, vmin=0, vmax=float(h.max()) or 1.0, interpolation="nearest")
                for m, colour in zip(masks or [], mask_colours or []):
                    if m[i].any():
                        ax.contour(m[i].astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
                if c == 0:
                    ax.set_ylabel(f"{labels[w]!r}\nmax {float(h.max()):.3g}", fontsize=8)
    fig.suptitle(text, fontsize=9)
    return fig


def save_animation(video, path: str | os.PathLike, fps: int = 8) -> str:
    """Write one video as .mp4, .gif or .html (a self-contained player from matplotlib's to_jshtml)."""
    path = os.fspath(path)
    if path.lower().endswith(".html"):
        with open(path, "w") as fh:
            fh.write(animation_html(video, fps))
        return path
    from ..video import save_video

    return save_video((as_frames(video) * 255).round().astype(np.uint8), path, fps=fps)


def animation_html(video, fps: int = 8, title: str | None = None) -> str:
    """An HTML/JavaScript player for one video (works in notebooks and on a static docs site)."""
    from matplotlib.animation import FuncAnimation

    f = as_frames(video)
    fig = _figure(3, 3.2)
    ax = fig.subplots()
    ax.axis("off")
    im = ax.imshow(f[0], interpolation="nearest")
    ax.set_title(title or "", fontsize=9)

    def update(i):
        im.set_data(f[i])
        return (im,)

    anim = FuncAnimation(fig, update, frames=len(f), interval=1000 / fps, blit=False)
    return anim.to_jshtml(fps=fps, default_mode="loop")


class Table:
    """Rows of a small table (a list of dicts with the same keys), shown as an HTML table in a notebook.

    ``Table(rows)`` is the cell's last expression; ``str(table)`` is the same table in Markdown.
    """

    def __init__(self, rows: Sequence[dict], index: str | None = None):
        rows = [dict(r) for r in rows]
        if not rows:
            raise ValueError("Table needs at least one row")
        self.columns = list(rows[0])
        odd = [i for i, r in enumerate(rows) if list(r) != self.columns]
        if odd:
            raise ValueError(f"every row needs the columns {self.columns}; rows {odd} differ")
        self.rows = rows

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in self.columns) + "</tr>"
                       for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __str__(self) -> str:
        lines = ["| " + " | ".join(map(str, self.columns)) + " |", "|" + " --- |" * len(self.columns)]
        lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)

    __repr__ = __str__
