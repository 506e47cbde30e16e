"""Synthetic text-video data for the toy model: one or two coloured shapes moving across a black frame.

Each video shows a single object, "a {colour} {shape} moving {direction}", 128 x 128 px and 17 frames
(4k + 1, so the causal VAE's 4x temporal compression gives 5 latent frames), values in [-1, 1] and
layout (B, 3, F, H, W) like every hvlab video tensor. Colour, shape and direction each come from a
small list, so a generated video can be checked word by word (`hvlab.toy.detector`).

Composition is tested with held-out combinations: `HELDOUT` holds the 21 of the 84 (colour, shape,
direction) triples with (ci + si + di) % 4 == 0 and the model never sees them in training. Every single
word, and every (colour, shape) pair, still occurs in `TRAIN`; only the triple is new.

**Two objects** ("a red circle moving left and a blue square moving up"): each object has its own
colour, shape and direction, and the two differ in colour and in shape, so a video can be read back
object by object with colour as the key. Both objects are seen triples (from `TRAIN`); what is held
out is the *pairing*: `HELDOUT_PAIRS` holds every ordered pair whose two appearances (colour, shape)
satisfy (c1 + s1 + c2 + s2) % 4 == 0, 34 of the 126 unordered appearance pairs (612 of the 2,268
ordered pairs of triples), and these two objects are never in one training video, whatever their
directions. Every appearance, colour pair and shape pair still occurs in `TRAIN_PAIRS`. Pair objects
are smaller (radius `PAIR_RADIUS_RANGE`, 14-18 px) and kept `PAIR_GAP` px apart in every frame: at
the single-object radius (18-24 px) only ~0.2% of random placements of two crossing objects are
collision-free, at 14-18 px >= 7% are, so layouts stay varied while each object still spans 3.5-4.5
latent cells (~2 video tokens of 16 px).

Rendering is one vectorised torch expression per shape (signed distance -> anti-aliased coverage), so a
batch of 64 videos takes milliseconds on a GPU, and it is a pure function of the sampled attributes:
all randomness sits in `sample_attributes`, driven by a `torch.Generator`.
"""
from __future__ import annotations

import math
import re

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


def _pair_heldout(a, b) -> bool:
    """The held-out pair rule, on two (colour, shape, ...) index tuples: symmetric, directions ignored."""
    return (a[0] + a[1] + b[0] + b[1]) % 4 == 0


# Ordered pairs ((c1, s1, d1), (c2, s2, d2)) of seen triples that differ in colour and in shape; the order
# is the caption's, and both orders of a pair are in the same split.
ALL_PAIRS = tuple((a, b) for a in TRAIN for b in TRAIN if a[0] != b[0] and a[1] != b[1])  # 2,268
HELDOUT_PAIRS = tuple(p for p in ALL_PAIRS if _pair_heldout(*p))  # 612: 34 appearance pairs never together
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if not _pair_heldout(*p))  # 1,656
PAIR_SPLITS = {"train": TRAIN_PAIRS, "heldout": HELDOUT_PAIRS, "all": ALL_PAIRS}

FRAMES, SIZE = 17, 128
RADIUS_RANGE = (18.0, 24.0)  # px; the object's half-extent (a 40-48 px object covers 5-6 latent cells)
SPEED_RANGE = (2.5, 4.0)  # px per frame
MARGIN = 1.0  # px kept clear between the object (plus its half-pixel anti-aliased rim) and the border
SQUARE_HALF_SIDE = 0.9  # times the radius: the square's area (3.24 r^2) is close to the circle's (3.14 r^2)
PAIR_RADIUS_RANGE = (14.0, 18.0)  # px, for each of two objects (see the module docstring)
PAIR_GAP = 8.0  # px kept between the two objects' bounding boxes (every shape fits its +-r box) in every frame


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


def pair_caption(first, second) -> str:
    """The prompt for a two-object video: pair_caption(("red", "circle", "left"), (2, 1, 2)) ->
    "a red circle moving left and a blue square moving up"."""
    return f"{caption(*first)} and {caption(*second)}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of `caption`: "a red circle moving right" -> ("red", "circle", "right")."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"expected a caption of the form 'a <colour> <shape> moving <direction>', got {text!r}")
    for word, names, what in zip(words[1:3] + words[4:], (COLOURS, SHAPES, DIRECTIONS), _WHAT):
        if word not in names:
            raise ValueError(f"unknown {what} {word!r} in {text!r}; expected one of {', '.join(names)}")
    return words[1], words[2], words[4]


def parse_scene(text: str) -> list[tuple[str, str, str]]:
    """One (colour, shape, direction) per object, in caption order, for a one- or two-object caption."""
    parts = re.split(r"\s+and\s+", text.strip().lower())
    if len(parts) > 2:
        raise ValueError(f"a toy caption describes one or two objects, got {len(parts)} in {text!r}")
    return [parse_caption(p) for p in parts]


def split_of(colour, shape, direction) -> str:
    """"train" or "heldout" for one combination (names or indices)."""
    return "heldout" if sum(_indices(colour, shape, direction)) % 4 == 0 else "train"


def pair_split_of(first, second) -> str:
    """"train" or "heldout" for two objects (each (colour, shape, direction), names or indices).

    A pair containing a held-out triple is in neither split: pairs are made of seen triples only."""
    a, b = _indices(*first), _indices(*second)
    if a[0] == b[0] or a[1] == b[1]:
        raise ValueError(f"the two objects must differ in colour and in shape, got {first} and {second}")
    if a in HELDOUT or b in HELDOUT:
        raise ValueError(f"pairs are made of seen triples only; {first if a in HELDOUT else second} is held out")
    return "heldout" if _pair_heldout(a, b) else "train"


def _check_room(frames: int, size: int) -> None:
    check_video_length(frames, name="frames")  # the VAE compresses time 4x
    need = 2 * (RADIUS_RANGE[1] + MARGIN) + SPEED_RANGE[1] * (frames - 1)
    if size < need:
        raise ValueError(f"size must be at least {need:g} px for a radius-{RADIUS_RANGE[1]:g} object to move "
                         f"{SPEED_RANGE[1]:g} px/frame for {frames} frames without leaving the frame, got {size}")


def _gen_device(generator, device) -> torch.device:
    return generator.device if generator is not None else torch.device(device or "cpu")


def _motion(u: torch.Tensor, direction: torch.Tensor, radius_range, frames: int, size: int):
    """Uniform numbers u (..., 4) -> radius, speed (...) and a start_xy (..., 2) that keeps the object
    inside the frame for all frames (the coordinate across the motion is free within the frame)."""
    radius = radius_range[0] + (radius_range[1] - radius_range[0]) * u[..., 0]
    speed = SPEED_RANGE[0] + (SPEED_RANGE[1] - SPEED_RANGE[0]) * u[..., 1]
    travel = speed * (frames - 1)
    lo = radius + MARGIN  # lowest allowed centre coordinate on either axis
    hi = size - radius - MARGIN  # highest
    vec = DIRECTION_VECTORS.to(u.device, torch.float64)[direction]  # (..., 2)
    along = vec.abs().argmax(dim=-1)  # 0 = x, 1 = y
    sign = vec.sum(dim=-1)  # +1 right/down, -1 left/up
    # the start must leave `travel` px of room ahead: [lo, hi - travel] forwards, [lo + travel, hi] backwards
    a_lo = torch.where(sign > 0, lo, lo + travel)
    a_start = a_lo + (hi - lo - travel) * u[..., 2]
    p_start = lo + (hi - lo) * u[..., 3]
    start_xy = torch.where((along == 0)[..., None], torch.stack([a_start, p_start], -1),
                           torch.stack([p_start, a_start], -1))  # (..., 2)
    return radius, speed, start_xy


def sample_attributes(n: int, generator: torch.Generator | None = None, split: str = "train", device=None,
                      *, frames: int = FRAMES, size: int = SIZE) -> dict[str, torch.Tensor]:
    """Random attributes for `n` one-object videos: the inputs of `render_videos`, drawn from `generator`.

    Returns a dict of tensors on `device`: colour, shape, direction (B,) long; radius, speed (B,) and
    start_xy (B, 2) float. The combination is uniform over the split's triples; radius, speed and
    start position are uniform, the start chosen so the object stays inside the frame for all frames.
    Numbers are drawn on the generator's device, so a seed gives the same videos whatever `device` is.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_room(frames, size)
    gdev = _gen_device(generator, device)
    combos = torch.tensor(SPLITS[split], device=gdev)  # (K, 3)
    u = torch.rand(n, 5, generator=generator, device=gdev, dtype=torch.float64)  # combo, r, speed, along, across
    combo = combos[(u[:, 0] * len(combos)).long().clamp_max(len(combos) - 1)]  # (B, 3)
    radius, speed, start_xy = _motion(u[:, 1:], combo[:, 2], RADIUS_RANGE, frames, size)
    out = dict(colour=combo[:, 0], shape=combo[:, 1], direction=combo[:, 2],
               radius=radius.float(), speed=speed.float(), start_xy=start_xy.float())
    return {k: v.to(device or gdev) for k, v in out.items()}


def pair_gap(radius: torch.Tensor, speed: torch.Tensor, start_xy: torch.Tensor, direction: torch.Tensor,
             frames: int = FRAMES) -> torch.Tensor:
    """(B,) the smallest gap in px between two objects' bounding boxes over all frames (< 0: they overlap).

    Inputs are two-object attributes: radius, speed, direction (B, 2), start_xy (B, 2, 2)."""
    t = torch.arange(frames, device=start_xy.device, dtype=start_xy.dtype)
    step = speed[..., None] * DIRECTION_VECTORS.to(start_xy.device, start_xy.dtype)[direction]  # (B, 2, 2)
    centre = start_xy[:, :, None] + t[None, None, :, None] * step[:, :, None]  # (B, 2 objects, F, 2)
    apart = (centre[:, 0] - centre[:, 1]).abs() - (radius[:, 0] + radius[:, 1])[:, None, None]  # (B, F, 2)
    return apart.amax(dim=-1).amin(dim=-1)  # boxes are apart when they are apart along x *or* y


def sample_pair_attributes(n: int, generator: torch.Generator | None = None, split: str = "train", device=None,
                           *, frames: int = FRAMES, size: int = SIZE, tries: int = 32) -> dict[str, torch.Tensor]:
    """Random attributes for `n` two-object videos: as `sample_attributes`, with an object axis.

    colour, shape, direction, radius, speed are (B, 2) and start_xy (B, 2, 2), object 0 first in the
    caption. The pair is uniform over the split's ordered pairs (`PAIR_SPLITS`); each object's motion
    is drawn as a single object's (radius from `PAIR_RADIUS_RANGE`), and placements whose boxes come
    closer than `PAIR_GAP` px in some frame are rejected: `tries` candidates per video per round, the
    first good one kept, rounds repeated for the videos still without one. Deterministic per seed.
    """
    if split not in PAIR_SPLITS:
        raise ValueError(f"split must be one of {', '.join(PAIR_SPLITS)}, got {split!r}")
    _check_room(frames, size)
    gdev = _gen_device(generator, device)
    pairs = torch.tensor(PAIR_SPLITS[split], device=gdev)  # (P, 2, 3)
    u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float64)
    combo = pairs[(u * len(pairs)).long().clamp_max(len(pairs) - 1)]  # (B, 2, 3)
    return _pair_attributes(combo, generator, device, frames=frames, size=size, tries=tries)


def _pair_attributes(combo: torch.Tensor, generator, device, *, frames: int, size: int, tries: int = 32) -> dict:
    """Two-object attributes for given (B, 2, 3) index triples: motions drawn, overlapping ones rejected."""
    gdev = combo.device
    n, direction = combo.shape[0], combo[..., 2]
    radius = torch.zeros(n, 2, device=gdev, dtype=torch.float64)
    speed, start_xy = torch.zeros_like(radius), torch.zeros(n, 2, 2, device=gdev, dtype=torch.float64)
    todo = torch.arange(n, device=gdev)
    for _ in range(1000):  # the worst direction pair accepts ~7% of placements: ~1.1 rounds expected
        if todo.numel() == 0:
            break
        k = todo.numel()
        d = direction[todo, None].expand(k, tries, 2)
        cand = _motion(torch.rand(k, tries, 2, 4, generator=generator, device=gdev, dtype=torch.float64), d,
                       PAIR_RADIUS_RANGE, frames, size)  # radius, speed (k, tries, 2), start (k, tries, 2, 2)
        flat = [x.flatten(0, 1) for x in cand]
        ok = (pair_gap(*flat, d.flatten(0, 1), frames) >= PAIR_GAP).view(k, tries)
        found = ok.any(dim=1)
        first = ok.double().argmax(dim=1)  # the first good candidate of each video
        rows, pick = todo[found], first[found]
        radius[rows], speed[rows] = cand[0][found, pick], cand[1][found, pick]
        start_xy[rows] = cand[2][found, pick]
        todo = todo[~found]
    if todo.numel():
        raise RuntimeError(f"no collision-free placement found for {todo.numel()} pairs at size {size}")
    out = dict(colour=combo[..., 0], shape=combo[..., 1], direction=direction,
               radius=radius.float(), speed=speed.float(), start_xy=start_xy.float())
    return {k: v.to(device or gdev) for k, v in out.items()}


def render_captions(captions: list[str], generator: torch.Generator | None = None, device=None, *,
                    frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """Ground-truth videos (B, 3, F, H, W) in [-1, 1] for given one- or two-object captions, in order:
    the objects the words name, with motions drawn from `generator` as by `sample_batch`."""
    _check_room(frames, size)
    gdev = _gen_device(generator, device)
    scenes = [[_indices(*o) for o in parse_scene(c)] for c in captions]
    for text, scene in zip(captions, scenes):
        if len(scene) == 2 and (scene[0][0] == scene[1][0] or scene[0][1] == scene[1][1]):
            raise ValueError(f"the two objects must differ in colour and in shape, got {text!r}")
    videos = torch.empty(len(captions), 3, frames, size, size, device=device or gdev)
    for k in (1, 2):
        rows = [i for i, scene in enumerate(scenes) if len(scene) == k]
        if not rows:
            continue
        combo = torch.tensor([scenes[i] for i in rows], device=gdev)  # (b, k, 3)
        if k == 1:
            u = torch.rand(len(rows), 4, generator=generator, device=gdev, dtype=torch.float64)
            radius, speed, start = _motion(u, combo[:, 0, 2], RADIUS_RANGE, frames, size)
            attrs = dict(colour=combo[:, 0, 0], shape=combo[:, 0, 1], direction=combo[:, 0, 2], radius=radius,
                         speed=speed, start_xy=start)
        else:
            attrs = _pair_attributes(combo, generator, gdev, frames=frames, size=size)
        videos[rows] = render_videos(attrs["colour"], attrs["shape"], attrs["direction"], radius=attrs["radius"],
                                     start_xy=attrs["start_xy"], speed=attrs["speed"], frames=frames, size=size,
                                     device=videos.device)
    return videos


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
    """Draw the videos: attribute indices -> (B, 3, F, H, W) in [-1, 1], black background.

    One object per video: indices (B,), radius and speed scalars or (B,), start_xy (B, 2). K objects
    per video: indices (B, K), radius and speed (B, K), start_xy (B, K, 2), drawn into the same frames.
    Pixel (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5); an object's centre at frame
    t is start_xy + t * speed * direction. Coverage = clamp(0.5 - signed distance, 0, 1) gives each
    edge a one-pixel anti-aliased ramp, so the VAE sees the smooth edges a camera would record. Where
    objects overlap (`sample_pair_attributes` never lets them), each channel keeps the brighter one.
    """
    device = torch.device(device) if device is not None else torch.as_tensor(colours_idx).device
    c = torch.as_tensor(colours_idx, device=device).long()
    s = torch.as_tensor(shapes_idx, device=device).long()
    d = torch.as_tensor(directions_idx, device=device).long()
    single = c.dim() == 1
    if single:
        c, s, d = c[:, None], s[:, None], d[:, None]
    if c.dim() != 2 or s.shape != c.shape or d.shape != c.shape:
        raise ValueError(f"colours_idx, shapes_idx, directions_idx must all be (B,) or all (B, K), got "
                         f"{tuple(torch.as_tensor(colours_idx).shape)}, {tuple(torch.as_tensor(shapes_idx).shape)}, "
                         f"{tuple(torch.as_tensor(directions_idx).shape)}")
    B, K = c.shape
    for idx, names, what in ((c, COLOURS, "colour"), (s, SHAPES, "shape"), (d, DIRECTIONS, "direction")):
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(names)):
            raise ValueError(f"{what} indices must be in 0..{len(names) - 1} ({', '.join(names)}), "
                             f"got {idx.min().item()}..{idx.max().item()}")
    r = torch.as_tensor(radius, device=device, dtype=torch.float32)
    v = torch.as_tensor(speed, device=device, dtype=torch.float32)
    r, v = (x[:, None] if single and x.dim() == 1 else x for x in (r, v))
    r, v = r.expand(B, K).reshape(B * K), v.expand(B, K).reshape(B * K)
    start = torch.as_tensor(start_xy, device=device, dtype=torch.float32)
    want = (B, 2) if single else (B, K, 2)
    if start.shape != want:
        raise ValueError(f"start_xy must be {want}, got {tuple(start.shape)}")
    start, c, s, d = start.reshape(B * K, 2), c.flatten(), s.flatten(), d.flatten()  # one row per object

    t = torch.arange(frames, device=device, dtype=torch.float32)
    centre = start[:, None, :] + (t[None, :, None] * v[:, None, None]) * DIRECTION_VECTORS.to(device)[d][:, None, :]
    # Only a window of win x win px around each object can be non-black (the object plus its half-pixel
    # rim and one pixel of rounding), so distances are evaluated there: ~6x less work than whole frames.
    win = min(size, math.ceil(2 * float(r.max()) + 4)) if B else size
    origin = (centre - win / 2).floor().clamp(0, size - win)  # (BK, F, 2) top-left pixel of the window
    local = torch.arange(win, device=device, dtype=torch.float32)
    coverage = torch.zeros(B * K, frames, win, win, device=device)  # (BK, F, win, win)
    for k, signed_distance in enumerate(_SIGNED_DISTANCE):
        sel = (s == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        rel = origin[sel] + 0.5 - centre[sel]  # (b, F, 2) first pixel centre relative to the object centre
        x = local.view(1, 1, 1, win) + rel[..., 0, None, None]  # (b, F, 1, win)
        y = local.view(1, 1, win, 1) + rel[..., 1, None, None]  # (b, F, win, 1)
        sd = signed_distance(x, y, r[sel].view(-1, 1, 1, 1))  # (b, F, win, win)
        coverage[sel] = (0.5 - sd).clamp(0, 1)
    rows = origin[..., 1, None, None].long() + local.long().view(win, 1)  # (BK, F, win, 1)
    cols = origin[..., 0, None, None].long() + local.long().view(1, win)  # (BK, F, 1, win)
    rgb = PALETTE.to(device)[c]  # (BK, 3)
    window = coverage[:, None] * (2 * rgb)[:, :, None, None, None] - 1  # (BK, 3, F, win, win)
    index = (rows * size + cols).flatten(2)[:, None].expand(B * K, 3, frames, win * win)

    def side_by_side(x):  # (B K, 3, F, win * win) -> (B, 3, F, K win win): a video's K windows in a row
        return x.reshape(B, K, 3, frames, -1).permute(0, 2, 3, 1, 4).reshape(B, 3, frames, -1)

    video = torch.full((B, 3, frames, size * size), -1.0, device=device)  # black
    # paste each window in place, keeping the brighter value, so a window's black margin never paints
    # over another object (and amax does not depend on the order of the writes)
    video.scatter_reduce_(3, side_by_side(index), side_by_side(window.flatten(3)), reduce="amax")
    return video.view(B, 3, frames, size, size)  # (B, 3, F, H, W)


def sample_batch(n: int, generator: torch.Generator | None = None, split: str = "train", device=None,
                 *, frames: int = FRAMES, size: int = SIZE, objects: int = 1):
    """`n` random videos with their captions: (videos (B, 3, F, H, W), captions, attributes dict).

    ``objects=2`` draws two-object videos from the pair splits (`sample_pair_attributes`)."""
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2 (objects per video), got {objects!r}")
    sample = sample_attributes if objects == 1 else sample_pair_attributes
    attrs = sample(n, generator, split, device, frames=frames, size=size)
    videos = render_videos(attrs["colour"], attrs["shape"], attrs["direction"], radius=attrs["radius"],
                           start_xy=attrs["start_xy"], speed=attrs["speed"], frames=frames, size=size,
                           device=attrs["colour"].device)
    triples = torch.stack([attrs["colour"], attrs["shape"], attrs["direction"]], -1).tolist()
    captions = [caption(*t) for t in triples] if objects == 1 else [pair_caption(*p) for p in triples]
    return videos, captions, attrs


WORLDS = ("one-object", "two-object")


def sample_world_batch(n: int, generator: torch.Generator | None, world: str = "one-object", device=None,
                       *, pair_fraction: float = 0.5, split: str = "train"):
    """Training videos of a world: (videos (B, 3, F, H, W), captions). "one-object" is `sample_batch`;
    "two-object" mixes round(n * pair_fraction) two-object videos (last) with one-object ones (first)."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    if not 0 <= pair_fraction <= 1:
        raise ValueError(f"pair_fraction must be in [0, 1] (the share of two-object videos), got {pair_fraction}")
    n_pairs = round(n * pair_fraction) if world == "two-object" else 0
    parts = [sample_batch(k, generator, split, device, objects=o) for k, o in ((n - n_pairs, 1), (n_pairs, 2)) if k]
    return torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]]


def world_captions(world: str = "one-object", split: str = "train") -> list[str]:
    """Every caption a world's `split` can produce (its single triples, then its pairs), in a fixed order."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    out = [caption(*t) for t in SPLITS[split]]
    return out + [pair_caption(*p) for p in PAIR_SPLITS[split]] if world == "two-object" else out


class SyntheticShapes(Dataset):
    """A fixed, reproducible dataset: item i depends only on (seed, i), not on the order of access.

    Each item is a dict with "video" (3, F, H, W) in [-1, 1], "caption" and the attributes (scalars,
    or per object with ``objects=2``).
    """

    def __init__(self, split: str = "train", length: int = 1024, seed: int = 0, *, frames: int = FRAMES,
                 size: int = SIZE, objects: int = 1):
        if objects not in (1, 2):
            raise ValueError(f"objects must be 1 or 2 (objects per video), got {objects!r}")
        splits = SPLITS if objects == 1 else PAIR_SPLITS
        if split not in splits:
            raise ValueError(f"split must be one of {', '.join(splits)}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be a positive number of videos, got {length}")
        _check_room(frames, size)
        self.split, self.length, self.seed, self.frames, self.size = split, length, seed, frames, size
        self.objects = objects

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length} videos")
        i %= self.length
        # one stream per (seed, i); torch's CPU generator keeps only 32 bits of a seed, so mix them in
        g = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + i * 0x85EBCA77) % 2**32)
        videos, captions, attrs = sample_batch(1, g, self.split, "cpu", frames=self.frames, size=self.size,
                                               objects=self.objects)
        return dict(video=videos[0], caption=captions[0], **{k: v[0] for k, v in attrs.items()})

