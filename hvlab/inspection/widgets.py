"""ipywidgets explorers for recorded attention maps and latents, each with a static-figure twin.

The explorers compute everything once (heat maps normalised, frames converted) and their callbacks
only index into those arrays and redraw one image; no model runs in a callback. The image is drawn at
the size it is shown (`IMAGE_PX` wide, its pixel size pinned on the widget, so JupyterLab does not stretch
it) with its whole title wrapped to that width.

A docs site has no kernel: an explorer's display data also carries its current picture as a PNG (what
the widget showed when the cell ran), which a page without a widget manager shows instead of the
widget's ``VBox(...)`` text (scripts/execute_notebooks.py drops the widget view from the site's copies).
Notebooks follow each explorer with its static figure (`attention_static`, `latents_static`). Without
ipywidgets installed the explorers return the static figure.
"""
from __future__ import annotations

import base64
import functools
import io
import textwrap

import numpy as np
import torch

from .attention_maps import AttentionMaps, upsample_to_video
from .viz import as_frames, attention_overlay, denoising_strip

IMAGE_PX = 640  # explorer images: drawn and shown at this width (the site's figures are >= 600 px wide)
_DPI = 100
_TITLE_CHARS = 80  # characters per title line at 10 pt across IMAGE_PX (~7 px each, measured)


def _title(*lines: str) -> str:
    """Wrap each line to the image's width, so no part of a title is cut off at the figure's edge."""
    return "\n".join(textwrap.fill(line, _TITLE_CHARS) for line in lines)


def _figure(draw, aspect: float = 1.0):
    """One axes on an IMAGE_PX-wide figure (the frame's ``aspect`` = height / width, plus room for the title)."""
    from matplotlib.figure import Figure

    w_in = IMAGE_PX / _DPI
    fig = Figure(figsize=(w_in, w_in * aspect * 0.8 + 1.1), dpi=_DPI, layout="constrained")
    draw(fig.subplots())
    return fig


def _png(fig) -> tuple[bytes, int, int]:
    """The figure as a PNG, and its pixel width and height."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)  # no bbox_inches="tight": the size stays the one pinned on the widget
    png = buf.getvalue()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
    return png, width, height


def _show(image, png: tuple[bytes, int, int]) -> None:
    """Put a picture into an ipywidgets Image at its own pixel size (CSS may otherwise stretch it)."""
    data, width, height = png
    image.value = data
    image.width, image.height = str(width), str(height)
    image.layout.width, image.layout.height = f"{width}px", f"{height}px"


@functools.lru_cache(maxsize=None)
def _explorer_class():
    import ipywidgets as W

    class Explorer(W.VBox):
        """A VBox whose display data also holds its current picture (image/png) and a sentence, for pages
        that cannot run the widget; JupyterLab renders the widget itself."""

        def _repr_mimebundle_(self, **kwargs):
            data = super()._repr_mimebundle_(**kwargs) or {}
            image = self.children[-1]
            data["image/png"] = base64.b64encode(image.value).decode("ascii")
            data["text/plain"] = f"{self.summary} (interactive in JupyterLab; here as it opened)"
            return data

    return Explorer


def _explorer(rows, image, description: str):
    box = _explorer_class()(rows + [image])
    box.summary = description  # the sentence a page without widgets shows
    return box


def attention_static(maps: AttentionMaps, video, **kwargs):
    """The static fallback: every word x 5 frames at the first recorded step, block and head."""
    kw = dict(step=maps.steps[0], block=maps.blocks[0], head=maps.heads[0])
    kw.update(kwargs)
    return attention_overlay(video, maps, **kw)


def attention_explorer(maps: AttentionMaps, video, word: str | None = None, alpha: float = 0.55,
                       cmap: str = "inferno"):
    """Dropdowns for step, block, head and word and a frame slider over one decoded video.

    Every map is upsampled to the frames and scaled to its own maximum once, here; a callback indexes
    ``heat[step, block, head, word, frame]`` and redraws. ``word``: the word it opens on (default: the
    first one that is not an article). Returns an ipywidgets box, or the static figure when ipywidgets
    is missing.
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
    if word is not None and word not in maps.labels:
        raise ValueError(f"word must be one of the recorded words {maps.labels}, got {word!r}")
    first = word if word is not None else next((w for w in maps.labels if w.lower() not in ("a", "an", "the")),
                                               maps.labels[0])
    word = W.Dropdown(options=opts(maps.labels), value=maps.labels.index(first), description="word")
    frame = W.IntSlider(min=0, max=F_ - 1, value=F_ // 2, description="frame")
    image = W.Image(format="png")

    def redraw(_=None):
        s, k, h, n, f = step.value, block.value, head.value, word.value, frame.value

        def draw(ax):
            ax.imshow(frames[f], interpolation="nearest")
            ax.imshow(heat[s, k, h, n, f], cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
            ax.axis("off")
            ax.set_title(_title(f"{maps.labels[n]!r}, frame {f}", maps.describe(maps.steps[s], maps.blocks[k], maps.heads[h]),
                                f"scaled to its max {peak[s, k, h, n]:.3f}"), fontsize=10)

        _show(image, _png(_figure(draw, H / W_)))

    for w in (step, block, head, word, frame):
        w.observe(redraw, names="value")
    redraw()
    return _explorer([W.HBox([step, block, head]), W.HBox([word, frame])], image,
                     f"attention explorer: {len(maps.steps)} steps x {len(maps.blocks)} blocks x {len(maps.heads)} "
                     f"heads x {len(maps.labels)} words, {F_} frames")


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
            ax.set_title(_title(f"x0 preview, step {recorder.steps[s]} (σ={recorder.sigmas[s]:.2f}), latent t={t.value}",
                                f"x0 std over (T, H, W), mean of the channels: {stats['x0_std'][s].mean():.2f}"),
                         fontsize=10)

        _show(image, _png(_figure(draw, previews.shape[2] / previews.shape[3])))

    step.observe(redraw, names="value")
    t.observe(redraw, names="value")
    redraw()
    return _explorer([W.HBox([step, t])], image,
                     f"latent explorer: {len(recorder.steps)} recorded steps x {previews.shape[1]} latent frames")
