"""Inspection: look inside a generation while it runs, and show what was seen.

- `hooks` — the hook protocol the pipeline calls (`PipelineHook`) and `LatentRecorder` (x, x0, per-channel
  statistics, previews and decodes at every step).
- `attention_maps` — `AttentionRecorder` (text <-> video heat maps at chosen steps, blocks and heads, without
  an L x L tensor) and its result `AttentionMaps`; `upsample_to_video` puts a map on the video's frames.
- `words` — `token_words`: which prompt word each text token belongs to.
- `concepts` — `ConceptRecorder`: ConceptAttention-style maps in the attention output space (a concept stream
  through the text weights that reads the video and is never read back).
- `preview` — cheap RGB previews of latents through a fitted per-pixel 16 -> 3 map (linear, or one hidden layer).
- `viz` — matplotlib figures sized for the docs page (frame grids, video grids, denoising strips, attention
  overlays, maps of several kinds side by side, animations) and `Table`.
- `widgets` — ipywidgets explorers, each with a static-figure twin.

The attention probabilities themselves (chunked exact log-sum-exp columns, selected rows) live beside the
explicit attention path, in `hvlab.attention`.
"""
from .attention_maps import AttentionMaps, AttentionRecorder, resolve_blocks, upsample_to_video
from .hooks import LatentRecorder, PipelineHook, channel_stats
from .preview import fit_latent_to_rgb, latent_to_rgb, video_on_latent_grid
from .viz import (animation_html, as_frames, attention_overlay, channel_stats_plot, denoising_strip, frame_grid,
                  heat_on_frames, maps_side_by_side, pick_frames, save_animation, videos_grid)
from .widgets import attention_explorer, attention_static, latent_explorer, latents_static
from .words import WORD_PATTERN, token_words

from .concepts import ConceptRecorder, concept_attention

__all__ = [
    "ConceptRecorder", "concept_attention",
    "PipelineHook", "LatentRecorder", "channel_stats",
    "AttentionRecorder", "AttentionMaps", "resolve_blocks", "upsample_to_video",
    "token_words", "WORD_PATTERN",
    "fit_latent_to_rgb", "latent_to_rgb", "video_on_latent_grid",
    "animation_html", "as_frames", "attention_overlay", "channel_stats_plot", "denoising_strip", "frame_grid",
    "heat_on_frames", "maps_side_by_side", "pick_frames", "save_animation", "videos_grid",
    "attention_explorer", "attention_static", "latent_explorer", "latents_static",
]
