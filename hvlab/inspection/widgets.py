"""ipywidgets explorers for recorded attention maps and latents, each with a static-figure twin.

The explorers compute everything once (heat maps normalised, frames converted) and their callbacks
only index into those arrays and redraw one small image; no model runs in a callback. A docs site
has no kernel, so notebooks show the explorer and then the static figure (`attention_static`,
`latents_static`), which is what the page keeps. Without ipywidgets installed the explorers return
the static figure.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from .attention_maps import AttentionMaps, upsample_to_video
from .viz import as_frames, attention_overlay, denoising_strip


def _png(draw, size=(3.2, 3.2)) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    draw(fig.subplots())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def attention_static(maps: AttentionMaps, video, **kwargs):
    """The static fallback: every word x 5 frames at the first recorded step, block and head."""
    kw = dict(step=maps.steps[0], block=maps.blocks[0], head=maps.heads[0])
    kw.update(kwargs)
    return attention_overlay(video, maps, **kw)


def attention_explorer(maps: AttentionMaps, video, alpha: float = 0.55, cmap: str = "inferno"):
    """Dropdowns for step, block, head and word and a frame slider over one decoded video.

    Every map is upsampled to the frames and scaled to its own maximum once, here; a callback indexes
    ``heat[step, block, head, word, frame]`` and redraws. Returns an ipywidgets box, or the static
    figure when ipywidgets is missing.
    """
    try:
        import ipywidgets as W
    except ImportError:
        return attention_static(maps, video)
    frames = as_frames(video)  # (F, H, W, 3)
    F_, H, W_ = frames.shape[:3]
    m = maps.maps.float()
    heat = upsample_to_video(m / m.amax(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-12), F_, H, W_).numpy()
    peak = m.amax(dim=(-3, -2, -1)).numpy()  # (S, K, NH, N) the unnormalised maxima, shown in the title

    def opts(values):
        return [(str(v), i) for i, v in enumerate(values)]

    step = W.Dropdown(options=opts(maps.steps), description="step")
    block = W.Dropdown(options=opts(maps.blocks), description="block")
    head = W.Dropdown(options=opts(maps.heads), description="head")
    word = W.Dropdown(options=opts(maps.labels), description="word")
    frame = W.IntSlider(min=0, max=F_ - 1, value=F_ // 2, description="frame")
    image = W.Image(format="png")

    def redraw(_=None):
        s, k, h, n, f = step.value, block.value, head.value, word.value, frame.value

        def draw(ax):
            ax.imshow(frames[f], interpolation="nearest")
            ax.imshow(heat[s, k, h, n, f], cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
            ax.axis("off")
            ax.set_title(f"{maps.labels[n]!r}, frame {f}\n{maps.describe(maps.steps[s], maps.blocks[k], maps.heads[h])}"
                         f"\nscaled to its max {peak[s, k, h, n]:.3f}", fontsize=7)

        image.value = _png(draw)

    for w in (step, block, head, word, frame):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([step, block, head]), W.HBox([word, frame]), image])


def latents_static(recorder, sample: int = 0, rgb_map: dict | None = None):
    """The static fallback: the denoising strip of predicted x0 previews."""
    previews = _previews(recorder, sample, rgb_map)
    return denoising_strip(previews, recorder.steps, recorder.sigmas)


def _previews(recorder, sample: int, rgb_map: dict | None) -> torch.Tensor:
    if rgb_map is not None:
        from .preview import latent_to_rgb

        return latent_to_rgb(recorder.x0[:, sample], rgb_map)
    if recorder.previews is None:
        raise ValueError("the LatentRecorder made no previews (it had no rgb_map): pass rgb_map=")
    return recorder.previews[:, sample]


def latent_explorer(recorder, sample: int = 0, rgb_map: dict | None = None):
    """A step slider and a latent-frame slider over the recorded x0 previews of one video (S, 3, T, h, w)."""
    try:
        import ipywidgets as W
    except ImportError:
        return latents_static(recorder, sample, rgb_map)
    previews = _previews(recorder, sample, rgb_map).permute(0, 2, 3, 4, 1).numpy()  # (S, T, h, w, 3)
    stats = {k: v[:, sample].numpy() for k, v in recorder.stats.items()}  # (S, C)
    step = W.IntSlider(min=0, max=len(recorder.steps) - 1, description="record")
    t = W.IntSlider(min=0, max=previews.shape[1] - 1, description="latent t")
    image = W.Image(format="png")

    def redraw(_=None):
        s = step.value

        def draw(ax):
            ax.imshow(np.clip(previews[s, t.value], 0, 1), interpolation="nearest")
            ax.axis("off")
            ax.set_title(f"x0 preview, step {recorder.steps[s]} (σ={recorder.sigmas[s]:.2f}), latent t={t.value}\n"
                         f"x0 std over channels' (T,H,W): mean {stats['x0_std'][s].mean():.2f}", fontsize=7)

        image.value = _png(draw)

    step.observe(redraw, names="value")
    t.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([step, t]), image])
