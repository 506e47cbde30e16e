"""Synthetic text-video data for the toy model: one coloured shape moving across a black frame.

Each video shows a single object, "a {colour} {shape} moving {direction}", 128 x 128 px and 17 frames
(4k + 1, so the causal VAE's 4x temporal compression gives 5 latent frames), values in [-1, 1] and
layout (B, 3, F, H, W) like every hvlab video tensor. Colour, shape and direction each come from a
small list, so a generated video can be checked word by word (`hvlab.toy.detector`).

Composition is tested with held-out combinations: `HELDOUT` holds the 21 of the 84 (colour, shape,
direction) triples with (ci + si + di) % 4 == 0 and the model never sees them in training. Every single
word, and every (colour, shape) pair, still occurs in `TRAIN`; only the triple is new.

Rendering is one vectorised torch expression per shape (signed distance -> anti-aliased coverage), so a
batch of 64 videos takes milliseconds on a GPU, and it is a pure function of the sampled attributes:
all randomness sits in `sample_attributes`, driven by a `torch.Generator`.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from ..video import check_video_length

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white")
PALETTE = torch.tensor([  # RGB in 0..1, one row per entry of COLOURS
    [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0],
    [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0],
])
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates: x grows to the right, y grows *downwards*.
DIRECTION_VECTORS = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])

ALL_COMBOS = tuple((c, s, d) for c in range(len(COLOURS)) for s in range(len(SHAPES))
                   for d in range(len(DIRECTIONS)))
HELDOUT = tuple(t for t in ALL_COMBOS if sum(t) % 4 == 0)  # 21 triples of indices, never trained on
TRAIN = tuple(t for t in ALL_COMBOS if sum(t) % 4 != 0)  # the other 63
SPLITS = {"train": TRAIN, "heldout": HELDOUT, "all": ALL_COMBOS}

FRAMES, SIZE = 17, 128
RADIUS_RANGE = (18.0, 24.0)  # px; the object's half-extent (a 40-48 px object covers 5-6 latent cells)
SPEED_RANGE = (2.5, 4.0)  # px per frame
MARGIN = 1.0  # px kept clear between the object (plus its half-pixel anti-aliased rim) and the border
SQUARE_HALF_SIDE = 0.9  # times the radius: the square's area (3.24 r^2) is close to the circle's (3.14 r^2)


def _index(value, names: tuple[str, ...], what: str) -> int:
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(names)}")
        return names.index(value)
    i = int(value)
    if not 0 <= i < len(names):
        raise ValueError(f"{what} index must be in 0..{len(names) - 1} ({', '.join(names)}), got {i}")
    return i


_WHAT = ("colour", "shape", "direction")


def _indices(colour, shape, direction) -> tuple[int, int, int]:
    return tuple(_index(v, names, what) for v, names, what in zip((colour, shape, direction),
                                                                  (COLOURS, SHAPES, DIRECTIONS), _WHAT))


def caption(colour, shape, direction) -> str:
    """The prompt for one video, e.g. caption("red", "circle", "right") or caption(0, 0, 1)."""
    c, s, d = _indices(colour, shape, direction)
    return f"a {COLOURS[c]} {SHAPES[s]} moving {DIRECTIONS[d]}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of `caption`: "a red circle moving right" -> ("red", "circle", "right")."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"expected a caption of the form 'a <colour> <shape> moving <direction>', got {text!r}")
    for word, names, what in zip(words[1:3] + words[4:], (COLOURS, SHAPES, DIRECTIONS), _WHAT):
        if word not in names:
            raise ValueError(f"unknown {what} {word!r} in {text!r}; expected one of {', '.join(names)}")
    return words[1], words[2], words[4]


def split_of(colour, shape, direction) -> str:
    """"train" or "heldout" for one combination (names or indices)."""
    return "heldout" if sum(_indices(colour, shape, direction)) % 4 == 0 else "train"


def _check_room(frames: int, size: int) -> None:
    check_video_length(frames, name="frames")  # the VAE compresses time 4x
    need = 2 * (RADIUS_RANGE[1] + MARGIN) + SPEED_RANGE[1] * (frames - 1)
    if size < need:
        raise ValueError(f"size must be at least {need:g} px for a radius-{RADIUS_RANGE[1]:g} object to move "
                         f"{SPEED_RANGE[1]:g} px/frame for {frames} frames without leaving the frame, got {size}")


def sample_attributes(n: int, generator: torch.Generator | None = None, split: str = "train", device=None,
                      *, frames: int = FRAMES, size: int = SIZE) -> dict[str, torch.Tensor]:
    """Random attributes for `n` videos: the inputs of `render_videos`, drawn from `generator`.

    Returns a dict of tensors on `device`: colour, shape, direction (B,) long; radius, speed (B,) and
    start_xy (B, 2) float. The combination is uniform over the split's triples; radius, speed and
    start position are uniform, the start chosen so the object stays inside the frame for all frames
    (the coordinate across the motion is free within the frame). Numbers are drawn on the generator's
    device, so a seed gives the same videos whatever `device` is.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_room(frames, size)
    gdev = generator.device if generator is not None else torch.device(device or "cpu")
    combos = torch.tensor(SPLITS[split], device=gdev)  # (K, 3)
    u = torch.rand(n, 5, generator=generator, device=gdev, dtype=torch.float64)  # combo, r, speed, along, across
    combo = combos[(u[:, 0] * len(combos)).long().clamp_max(len(combos) - 1)]  # (B, 3)
    radius = RADIUS_RANGE[0] + (RADIUS_RANGE[1] - RADIUS_RANGE[0]) * u[:, 1]
    speed = SPEED_RANGE[0] + (SPEED_RANGE[1] - SPEED_RANGE[0]) * u[:, 2]
    travel = speed * (frames - 1)
    lo = radius + MARGIN  # lowest allowed centre coordinate on either axis
    hi = size - radius - MARGIN  # highest
    vec = DIRECTION_VECTORS.to(gdev, torch.float64)[combo[:, 2]]  # (B, 2)
    along = vec.abs().argmax(dim=1)  # 0 = x, 1 = y
    sign = vec.sum(dim=1)  # +1 right/down, -1 left/up
    # the start must leave `travel` px of room ahead: [lo, hi - travel] forwards, [lo + travel, hi] backwards
    a_lo = torch.where(sign > 0, lo, lo + travel)
    a_start = a_lo + (hi - lo - travel) * u[:, 3]
    p_start = lo + (hi - lo) * u[:, 4]
    start_xy = torch.where((along == 0)[:, None], torch.stack([a_start, p_start], 1),
                           torch.stack([p_start, a_start], 1))  # (B, 2)
    out = dict(colour=combo[:, 0], shape=combo[:, 1], direction=combo[:, 2],
               radius=radius.float(), speed=speed.float(), start_xy=start_xy.float())
    return {k: v.to(device or gdev) for k, v in out.items()}


def _sd_circle(x, y, r):
    return torch.sqrt(x * x + y * y) - r


def _sd_square(x, y, r):
    qx, qy = x.abs() - SQUARE_HALF_SIDE * r, y.abs() - SQUARE_HALF_SIDE * r  # exact box distance
    outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
    return outside + torch.maximum(qx, qy).clamp_max(0)


def _sd_triangle(x, y, r):
    """Signed distance to the triangle apex (0, -r), base corners (+-r, r): exact inside and outside."""
    corners = [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]  # in units of r, clockwise on screen
    planes, segs = [], []
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        ax_, ay_, ex, ey = ax * r, ay * r, (bx - ax) * r, (by - ay) * r  # edge from A, vector E
        length = torch.sqrt(ex * ex + ey * ey)
        px, py = x - ax_, y - ay_
        planes.append((px * ey - py * ex) / length)  # > 0 outside this edge (outward normal (ey, -ex))
        t = ((px * ex + py * ey) / (length * length)).clamp(0, 1)
        segs.append(torch.sqrt((px - t * ex) ** 2 + (py - t * ey) ** 2))
    inside_d = torch.maximum(torch.maximum(planes[0], planes[1]), planes[2])  # exact inside a convex polygon
    outside_d = torch.minimum(torch.minimum(segs[0], segs[1]), segs[2])  # distance to the nearest edge
    return torch.where(inside_d <= 0, inside_d, outside_d)


_SIGNED_DISTANCE = (_sd_circle, _sd_square, _sd_triangle)  # indexed like SHAPES


def render_videos(colours_idx: torch.Tensor, shapes_idx: torch.Tensor, directions_idx: torch.Tensor, *,
                  radius, start_xy: torch.Tensor, speed, frames: int = FRAMES, size: int = SIZE,
                  device=None) -> torch.Tensor:
    """Draw the videos: (B,) attribute indices -> (B, 3, F, H, W) in [-1, 1], black background.

    Pixel (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5); the object centre at frame t
    is start_xy + t * speed * direction. Coverage = clamp(0.5 - signed distance, 0, 1) gives each edge
    a one-pixel anti-aliased ramp, so the VAE sees the smooth edges a camera would record.
    """
    device = torch.device(device) if device is not None else torch.as_tensor(colours_idx).device
    c = torch.as_tensor(colours_idx, device=device).long()
    s = torch.as_tensor(shapes_idx, device=device).long()
    d = torch.as_tensor(directions_idx, device=device).long()
    B = c.shape[0]
    if c.dim() != 1 or s.shape != (B,) or d.shape != (B,):
        raise ValueError(f"colours_idx, shapes_idx, directions_idx must all be (B,), got {tuple(c.shape)}, "
                         f"{tuple(s.shape)}, {tuple(d.shape)}")
    for idx, names, what in ((c, COLOURS, "colour"), (s, SHAPES, "shape"), (d, DIRECTIONS, "direction")):
        if B and (idx.min() < 0 or idx.max() >= len(names)):
            raise ValueError(f"{what} indices must be in 0..{len(names) - 1} ({', '.join(names)}), "
                             f"got {idx.min().item()}..{idx.max().item()}")
    r = torch.as_tensor(radius, device=device, dtype=torch.float32).expand(B)
    v = torch.as_tensor(speed, device=device, dtype=torch.float32).expand(B)
    start = torch.as_tensor(start_xy, device=device, dtype=torch.float32)
    if start.shape != (B, 2):
        raise ValueError(f"start_xy must be (B, 2) = ({B}, 2), got {tuple(start.shape)}")

    t = torch.arange(frames, device=device, dtype=torch.float32)
    centre = start[:, None, :] + (t[None, :, None] * v[:, None, None]) * DIRECTION_VECTORS.to(device)[d][:, None, :]
    # Only a window of win x win px around each object can be non-black (the object plus its half-pixel
    # rim and one pixel of rounding), so distances are evaluated there: ~6x less work than whole frames.
    win = min(size, math.ceil(2 * float(r.max()) + 4)) if B else size
    origin = (centre - win / 2).floor().clamp(0, size - win)  # (B, F, 2) top-left pixel of the window
    local = torch.arange(win, device=device, dtype=torch.float32)
    coverage = torch.zeros(B, frames, win, win, device=device)  # (B, F, win, win)
    for k, signed_distance in enumerate(_SIGNED_DISTANCE):
        sel = (s == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        rel = origin[sel] + 0.5 - centre[sel]  # (b, F, 2) first pixel centre relative to the object centre
        x = local.view(1, 1, 1, win) + rel[..., 0, None, None]  # (b, F, 1, win)
        y = local.view(1, 1, win, 1) + rel[..., 1, None, None]  # (b, F, win, 1)
        sd = signed_distance(x, y, r[sel].view(-1, 1, 1, 1))  # (b, F, win, win)
        coverage[sel] = (0.5 - sd).clamp(0, 1)
    rows = origin[..., 1, None, None].long() + local.long().view(win, 1)  # (B, F, win, 1)
    cols = origin[..., 0, None, None].long() + local.long().view(1, win)  # (B, F, 1, win)
    rgb = PALETTE.to(device)[c]  # (B, 3)
    window = coverage[:, None] * (2 * rgb)[:, :, None, None, None] - 1  # (B, 3, F, win, win)
    index = (rows * size + cols).flatten(2)[:, None].expand(B, 3, frames, win * win)
    video = torch.full((B, 3, frames, size * size), -1.0, device=device)  # black
    video.scatter_(3, index, window.flatten(3))  # paste each window in place
    return video.view(B, 3, frames, size, size)  # (B, 3, F, H, W)


def sample_batch(n: int, generator: torch.Generator | None = None, split: str = "train", device=None,
                 *, frames: int = FRAMES, size: int = SIZE):
    """`n` random videos with their captions: (videos (B, 3, F, H, W), captions, attributes dict)."""
    attrs = sample_attributes(n, generator, split, device, frames=frames, size=size)
    videos = render_videos(attrs["colour"], attrs["shape"], attrs["direction"], radius=attrs["radius"],
                           start_xy=attrs["start_xy"], speed=attrs["speed"], frames=frames, size=size,
                           device=attrs["colour"].device)
    captions = [caption(*t) for t in torch.stack([attrs["colour"], attrs["shape"], attrs["direction"]], 1).tolist()]
    return videos, captions, attrs


class SyntheticShapes(Dataset):
    """A fixed, reproducible dataset: item i depends only on (seed, i), not on the order of access.

    Each item is a dict with "video" (3, F, H, W) in [-1, 1], "caption" and the scalar attributes.
    """

    def __init__(self, split: str = "train", length: int = 1024, seed: int = 0, *, frames: int = FRAMES,
                 size: int = SIZE):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be a positive number of videos, got {length}")
        _check_room(frames, size)
        self.split, self.length, self.seed, self.frames, self.size = split, length, seed, frames, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length} videos")
        i %= self.length
        # one stream per (seed, i); torch's CPU generator keeps only 32 bits of a seed, so mix them in
        g = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + i * 0x85EBCA77) % 2**32)
        videos, captions, attrs = sample_batch(1, g, self.split, "cpu", frames=self.frames, size=self.size)
        return dict(video=videos[0], caption=captions[0], **{k: v[0] for k, v in attrs.items()})

