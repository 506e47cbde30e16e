"""Tiled encode and decode for the causal 3D VAE: the release's tile plan and blending, written into one output.

A 720x1280x129 video does not fit through the VAE at once (one decoder activation at full size would be
256 x 129 x 720 x 1280 values), so the release cuts the latent into overlapping tiles, decodes each, and
cross-fades the overlaps linearly:

- space: tiles of 32 latents (256 px) every 24 latents (192 px); the 8 overlapping latents become 64 px
  of blend. Spatial tiling starts once a side exceeds the tile, and then applies to both sides.
- time: tiles of 16 + 1 latent frames every 12. The extra leading frame is causal context: tile k > 0 starts on
  the last frame it shares with tile k - 1, and that frame's output (decoded as if it were frame 0) is dropped.
  The 4 remaining shared latent frames become 16 blended video frames.
- 720x1280x129 (latent 33 x 90 x 160) decodes as 3 time tiles x 4 rows x 7 columns = 84 decoder calls.
Encoding mirrors this in pixel units (256 px / 64 frames per tile, 8 latents / 4 latent frames of blend).

Blending reproduces the release exactly, including one quirk: a tile is blended with the tile above and *then*
with its left neighbour, and that neighbour had itself been blended with the tile above it. Where four tiles
meet, the weights are therefore not bilinear (they still sum to one). hvlab keeps the quirk so that tiled outputs
match the release and diffusers' ``AutoencoderKLHunyuanVideo`` (tests/test_vae.py compares them).

What differs is memory: every tile is written straight into a preallocated output, and only the overlap strips
of the previous row / column / time tile are kept, instead of holding every decoded tile until the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TilingConfig:
    """Tile sizes in latent units (the release defaults; `from_sample_sizes` converts pixel/frame sizes)."""

    tile_latent_size: int = 32  # spatial tile edge in latents (256 px at 8x)
    tile_latent_stride: int = 24  # step between spatial tiles; tile - stride latents overlap (8 -> 64 px blend)
    tile_latent_frames: int = 16  # temporal tile length in latent frames, plus 1 frame of causal context
    tile_latent_stride_frames: int = 12  # step between temporal tiles (4 latent frames -> 16 frames blend)

    @classmethod
    def from_sample_sizes(cls, tile_sample_min_size: int = 256, tile_sample_min_num_frames: int = 64,
                          tile_overlap_factor: float = 0.25, spatial_compression_ratio: int = 8,
                          temporal_compression_ratio: int = 4) -> "TilingConfig":
        """The release's parametrisation: tile edge in pixels, tile length in frames, overlap as a fraction."""
        if not 0.0 <= tile_overlap_factor <= 0.5:
            raise ValueError(f"tile_overlap_factor must be in [0, 0.5] (release 0.25), got {tile_overlap_factor}")
        size = _tile_latents("tile_sample_min_size", tile_sample_min_size, spatial_compression_ratio,
                             tile_overlap_factor, "px")
        frames = _tile_latents("tile_sample_min_num_frames", tile_sample_min_num_frames, temporal_compression_ratio,
                               tile_overlap_factor, "frames")
        return cls(size, size - round(size * tile_overlap_factor), frames, frames - round(frames * tile_overlap_factor))

    def __post_init__(self):
        for name, tile, stride in (("tile_latent_size", self.tile_latent_size, self.tile_latent_stride),
                                   ("tile_latent_frames", self.tile_latent_frames, self.tile_latent_stride_frames)):
            if not (tile >= 1 and tile / 2 <= stride <= tile):
                raise ValueError(f"{name}={tile} needs a stride between {tile / 2:g} and {tile} (overlap at most "
                                 f"half a tile, so a position is blended between two tiles only); got {stride}")


def _tile_latents(name: str, size: int, ratio: int, overlap: float, unit: str) -> int:
    """size / ratio latents, checking that the overlap is a whole number of latents (else the blend misaligns)."""
    def ok(s: int) -> bool:
        return s > 0 and s % ratio == 0 and abs(s // ratio * overlap - round(s // ratio * overlap)) < 1e-9

    if not ok(size):
        lo = next((s for s in range(size - 1, 0, -1) if ok(s)), None)
        hi = next((s for s in range(size + 1, 2 * size + 64 * ratio) if ok(s)), None)
        nearest = " or ".join(str(s) for s in (lo, hi) if s) or "none nearby (try tile_overlap_factor=0.25)"
        raise ValueError(f"{name} must be a multiple of {ratio} {unit} whose overlap ({overlap} x {name} / {ratio}) "
                         f"is a whole number of latents; got {size}, nearest valid: {nearest}")
    return size // ratio


def spatial_tiles(length: int, tile: int, stride: int, tiled: bool = True) -> list[tuple[int, int]]:
    """(start, end) tiles along one spatial axis: one tile every ``stride``, clipped at the end; one tile if not
    ``tiled``. As in the release, once either side exceeds the tile *both* sides are tiled this way, so a side that
    fits but exceeds the stride still gets a thin second tile (e.g. 32 latents: 0..32 and 24..32)."""
    if not tiled:
        return [(0, length)]
    return [(s, min(s + tile, length)) for s in range(0, length, stride)]


def temporal_tiles(length: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) tiles of ``tile + 1`` frames along time, one every ``stride``; one tile if ``length <= tile``.

    A last tile of a single frame would be empty once its context frame is dropped, and the tile before already
    reaches the end: it is skipped, as the release's current code does (diffusers' port decodes it, then drops
    all of its output).
    """
    if length <= tile:
        return [(0, length)]
    tiles = []
    for s in range(0, length, stride):
        e = min(s + tile + 1, length)
        if tiles and e - s <= 1:
            break
        tiles.append((s, e))
    return tiles


@dataclass
class AxisTiles:
    """The tiles of one axis: input ranges, where each tile's output starts, and how much output is blended."""

    src: list[tuple[int, int]]  # (start, end) in input units
    dst: list[int]  # output start of each tile (after a time tile's context frame is dropped)
    blend: int  # output positions cross-faded at the start of every tile after the first


def decode_axes(latent_shape, tiling: TilingConfig, spatial_ratio: int = 8, temporal_ratio: int = 4):
    """The (time, height, width) `AxisTiles` for decoding a latent of shape (T, h, w)."""
    T, h, w = latent_shape
    t = temporal_tiles(T, tiling.tile_latent_frames, tiling.tile_latent_stride_frames)
    tiled = max(h, w) > tiling.tile_latent_size
    spatial = [spatial_tiles(n, tiling.tile_latent_size, tiling.tile_latent_stride, tiled) for n in (h, w)]
    blend_s = spatial_ratio * (tiling.tile_latent_size - tiling.tile_latent_stride)
    return (AxisTiles(t, [0] + [1 + temporal_ratio * s for s, _ in t[1:]],
                      temporal_ratio * (tiling.tile_latent_frames - tiling.tile_latent_stride_frames)),
            *(AxisTiles(tiles, [spatial_ratio * s for s, _ in tiles], blend_s) for tiles in spatial))


def encode_axes(sample_shape, tiling: TilingConfig, spatial_ratio: int = 8, temporal_ratio: int = 4):
    """The (time, height, width) `AxisTiles` for encoding a video of shape (F, H, W) (F = 4k + 1)."""
    Fr, H, W = sample_shape
    t = temporal_tiles(Fr, temporal_ratio * tiling.tile_latent_frames,
                       temporal_ratio * tiling.tile_latent_stride_frames)
    tile_px, stride_px = spatial_ratio * tiling.tile_latent_size, spatial_ratio * tiling.tile_latent_stride
    spatial = [spatial_tiles(n, tile_px, stride_px, max(H, W) > tile_px) for n in (H, W)]
    blend_s = tiling.tile_latent_size - tiling.tile_latent_stride
    return (AxisTiles(t, [0] + [s // temporal_ratio + 1 for s, _ in t[1:]],
                      tiling.tile_latent_frames - tiling.tile_latent_stride_frames),
            *(AxisTiles(tiles, [s // spatial_ratio for s, _ in tiles], blend_s) for tiles in spatial))


def tile_plan(latent_shape, tile_latent_size: int = 32, tile_latent_stride: int = 24, tile_latent_frames: int = 16,
              tile_latent_stride_frames: int = 12) -> list[tuple[slice, slice, slice]]:
    """The latent (time, height, width) slices that a tiled decode feeds to the decoder, in call order.

    ``len(tile_plan((33, 90, 160)))`` is 84: the release's decoder calls for a 720x1280x129 video.
    """
    tiling = TilingConfig(tile_latent_size, tile_latent_stride, tile_latent_frames, tile_latent_stride_frames)
    t, h, w = decode_axes(latent_shape, tiling)
    return [(slice(*ts), slice(*hs), slice(*ws)) for ts in t.src for hs in h.src for ws in w.src]


def _ramp_in(tile: torch.Tensor, prev: torch.Tensor, blend: int, dim: int) -> None:
    """Cross-fade, in place, the first n positions of ``tile`` with the last n of ``prev`` along ``dim``:
    ``tile[y] = prev[-n + y] * (1 - y / n) + tile[y] * (y / n)``, n = min(len(prev), len(tile), blend)."""
    n = min(prev.shape[dim], tile.shape[dim], blend)
    if n == 0:
        return
    shape = [1] * tile.ndim
    shape[dim] = n
    r = (torch.arange(n, dtype=torch.float64) / n).to(tile.device, tile.dtype).view(shape)
    head = tile.narrow(dim, 0, n)
    head.copy_(prev.narrow(dim, prev.shape[dim] - n, n) * (1 - r) + head * r)


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axes, out_shape) -> torch.Tensor:
    """Apply ``fn`` tile by tile over ``x`` (B, C, T, H, W) and blend the tiles into one (B, *out_shape) tensor.

    ``axes`` = (time, height, width) `AxisTiles`. Per tile: drop the context frame (time tiles after the first),
    cross-fade the top rows with the tile above and then the left columns with the tile to the left (both kept as
    strips of the already blended neighbours, as the release blends in place), write the part this tile owns
    (up to where the next tile starts) into the output, cross-fading its first frames in time with what the
    previous time tile wrote there.
    """
    at, ah, aw = axes
    out = None
    prev_t = 0  # output length of the previous time tile
    for k, (t0, t1) in enumerate(at.src):
        above: list[torch.Tensor | None] = [None] * len(aw.src)  # bottom strips of the previous row of tiles
        for i, (h0, h1) in enumerate(ah.src):
            left = None  # right strip of the previous tile in this row
            for j, (w0, w1) in enumerate(aw.src):
                y = fn(x[:, :, t0:t1, h0:h1, w0:w1])  # (B, C', T', H', W')
                if out is None:
                    out = y.new_empty(y.shape[0], *out_shape)
                if k > 0:
                    y = y[:, :, 1:]  # output of the shared context frame: tile k - 1 already holds it
                cur_t = y.shape[2]
                if i > 0 and ah.blend:
                    _ramp_in(y, above[j], ah.blend, dim=3)
                if j > 0 and aw.blend:
                    _ramp_in(y, left, aw.blend, dim=4)
                if ah.blend:
                    above[j] = y[:, :, :, -ah.blend:].clone()
                if aw.blend:
                    left = y[:, :, :, :, -aw.blend:].clone()
                nh = ah.dst[i + 1] - ah.dst[i] if i + 1 < len(ah.src) else y.shape[3]
                nw = aw.dst[j + 1] - aw.dst[j] if j + 1 < len(aw.src) else y.shape[4]
                y = y[:, :, :, :nh, :nw]
                dst = out[:, :, at.dst[k]:at.dst[k] + y.shape[2], ah.dst[i]:ah.dst[i] + nh, aw.dst[j]:aw.dst[j] + nw]
                nt = min(prev_t, cur_t, at.blend) if k > 0 else 0
                if nt:  # dst's first nt frames hold what time tile k - 1 wrote there (its last nt frames)
                    _ramp_in(y, dst[:, :, :nt], nt, dim=2)
                dst.copy_(y)
                del y
        prev_t = cur_t
    return out
