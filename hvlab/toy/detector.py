"""Read a toy video back into words: which colour, which shape, which way it moves.

The toy model is judged on what it draws, so this module inspects *decoded* frames (after the VAE)
of the synthetic scenes in `hvlab.toy.data`: one coloured object on a black background.

1. Foreground: a pixel belongs to the object when its brightest channel exceeds half of the video's
   object brightness (the 99.5th percentile of that channel; at least 0.2 on a 0..1 scale), which
   puts the mask edge on the half-coverage contour, the true edge even after blur. Per frame, the
   largest 8-connected blob of at least `min_area` px is the object; smaller specks are ignored.
2. Colour: per-channel median of the object pixels over all frames, divided by its brightest channel
   (so a dim or washed-out object keeps its hue), then the nearest palette entry.
3. Shape: three per-frame numbers, medians over frames, compared with each shape's ideal values:
   fill = area / bbox area (square 1, circle pi/4, triangle 1/2) and the mean row width in the top and
   bottom quarters of the bbox relative to its width (a triangle is narrow on top and wide below, a
   circle narrow at both ends, a square full everywhere). Blur rounds corners, which lowers the
   square's fill and raises the triangle's; the profile keeps the three apart anyway.
4. Direction: centroid displacement from the mean of the first 3 to the mean of the last 3 frames
   that show an object; the dominant axis wins. Image y grows downwards, so "up" is dy < 0.

Inputs: one video, either a uint8 array or tensor (F, H, W, 3) in 0..255 (what a video file holds),
or a floating tensor or array (3, F, H, W) in [-1, 1] (what the VAE decodes to).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import COLOURS, DIRECTIONS, PALETTE, SHAPES, parse_caption

MIN_AREA = 40  # px; blobs smaller than this are noise, not the object (the smallest object has ~650 px)
MIN_LEVEL = 0.2  # lowest foreground threshold on a 0..1 scale, far above VAE noise on black
# Ideal (fill, top-quarter width, bottom-quarter width) per shape, in SHAPES order. Circle: pi/4, and
# the mean of sqrt(1 - y^2) over y in [1/2, 1] = 0.614; triangle: 1/2, 1/8, 7/8.
SHAPE_PROTOTYPES = torch.tensor([[0.785, 0.614, 0.614], [1.0, 1.0, 1.0], [0.5, 0.125, 0.875]])


@dataclass
class Detection:
    """What `detect` read from one video. A field is None when no object was found to decide it."""

    colour: str | None
    shape: str | None
    direction: str | None
    confidence: dict[str, float] = field(default_factory=dict)  # per attribute, 0 (a tie) .. 1 (unambiguous)
    extra: dict = field(default_factory=dict)  # the measured features behind each decision


def _as_rgb(frames) -> torch.Tensor:
    """Any accepted input -> float tensor (F, H, W, 3) in 0..1."""
    x = torch.as_tensor(frames) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (F, H, W, 3) in 0..255, got shape {tuple(x.shape)}")
        return x.float() / 255
    if x.is_floating_point():
        if x.dim() != 4 or x.shape[0] != 3:
            raise ValueError(f"float frames must be (3, F, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        return ((x.float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)
    raise TypeError(f"frames must be uint8 (F, H, W, 3) or floating (3, F, H, W), got dtype {x.dtype}")


def _largest_blobs(fg: torch.Tensor, min_area: int) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) bool keeping, per frame, only the largest 8-connected blob.

    Connected components on the foreground pixels alone (a few % of the frame): every pixel starts
    as its own label; each round a pixel takes the largest label among its 8 neighbours, hands it
    to the pixel its current label names ("hooking"), then follows labels twice ("pointer jumping").
    Labels spread along chains of pointers, so a blob settles in a handful of rounds, not its width.
    """
    N, H, W = fg.shape
    frame, pix = fg.view(N, H * W).nonzero(as_tuple=True)  # (P,) each
    P = pix.numel()
    if P == 0:
        return torch.zeros_like(fg)
    sparse_id = torch.full((N * H * W + 1,), P, device=fg.device)  # dense position -> 0..P-1; P = none
    sparse_id[frame * H * W + pix] = torch.arange(P, device=fg.device)
    y, x = pix // W, pix % W
    neighbours = []
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        yy, xx = y + dy, x + dx
        inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        pos = torch.where(inside, frame * H * W + yy * W + xx, N * H * W)
        neighbours.append(sparse_id[pos])  # (P,) neighbour's id, or P
    neighbours = torch.stack(neighbours)  # (8, P)
    label = torch.arange(P + 1, device=fg.device)  # slot P is a sentinel that never wins
    label[P] = -1
    for _ in range(P):
        best = torch.maximum(label[:P], label[neighbours].amax(dim=0))  # (P,) largest label nearby
        new = label.clone()
        new[:P] = best
        new.scatter_reduce_(0, label[:P], best, reduce="amax")  # hook: the named pixel learns it too
        for _ in range(2):
            new[:P] = torch.maximum(new[:P], new[new[:P]])  # pointer jumping
        if torch.equal(new, label):
            break
        label = new
    label = label[:P]  # every pixel of a blob now holds the blob's largest id
    size = torch.bincount(label, minlength=P)[label]  # (P,) size of the pixel's blob
    key = size * P + label  # largest blob first, ties broken by label
    best = torch.full((N,), -1, device=fg.device).scatter_reduce(0, frame, key, reduce="amax")
    keep = (key == best[frame]) & (size >= min_area)
    out = torch.zeros(N * H * W, dtype=torch.bool, device=fg.device)
    out[frame[keep] * H * W + pix[keep]] = True
    return out.view(N, H, W)


def _masks(rgb: torch.Tensor, threshold: float | None, min_area: int) -> torch.Tensor:
    """(B, F, H, W, 3) in 0..1 -> object masks (B, F, H, W)."""
    B, Fr, H, W, _ = rgb.shape
    value = rgb.amax(dim=-1)  # (B, F, H, W) brightest channel
    if threshold is None:
        k = max(1, int(0.005 * Fr * H * W))
        level = value.reshape(B, -1).topk(k, dim=1).values[:, -1]  # 99.5th percentile per video
        thr = (0.5 * level).clamp_min(MIN_LEVEL)
    else:
        thr = torch.full((B,), float(threshold), device=rgb.device)
    fg = value > thr.view(B, 1, 1, 1)
    return _largest_blobs(fg.reshape(B * Fr, H, W), min_area).view(B, Fr, H, W)


def object_masks(frames, *, threshold: float | None = None, min_area: int = MIN_AREA):
    """The object's mask per frame, bool (F, H, W): numpy in -> numpy out, tensor in -> tensor out.

    `threshold` (0..1 scale, on the brightest channel) overrides the adaptive half-brightness level.
    A frame with no blob of `min_area` px is all False.
    """
    masks = _masks(_as_rgb(frames)[None], threshold, min_area)[0]
    return masks.cpu().numpy() if isinstance(frames, np.ndarray) else masks


def _nearest(value: torch.Tensor, table: torch.Tensor) -> tuple[int, float]:
    """Index of the nearest row of `table`, and a confidence 1 - d_best / d_second."""
    d = (table - value).norm(dim=1)
    d2, order = d.sort()
    return int(order[0]), float(1 - d2[0] / d2[1].clamp_min(1e-8))


def _shape_features(mask: torch.Tensor) -> torch.Tensor:
    """(F, H, W) bool -> (F, 3) fill, top-quarter and bottom-quarter widths; NaN where no object."""
    Fr, H, W = mask.shape
    m = mask.float()
    area = m.sum(dim=(1, 2))
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (F, H), (F, W)
    r = torch.arange(H, device=mask.device).float()
    top = torch.where(rows, r, torch.tensor(float(H))).amin(dim=1)
    height = rows.sum(dim=1).float().clamp_min(1)  # a blob is connected, so its rows are contiguous
    width = cols.sum(dim=1).float().clamp_min(1)
    pos = (r[None] - top[:, None] + 0.5) / height[:, None]  # (F, H) 0..1 down the bbox
    row_width = m.sum(dim=2)  # (F, H)
    upper = (pos < 0.25) & rows
    lower = (pos > 0.75) & rows
    top_w = (row_width * upper).sum(1) / upper.sum(1).clamp_min(1) / width
    bottom_w = (row_width * lower).sum(1) / lower.sum(1).clamp_min(1) / width
    feats = torch.stack([area / (height * width), top_w, bottom_w], dim=1)
    return torch.where((area > 0)[:, None], feats, torch.tensor(float("nan")))


def _decide(rgb: torch.Tensor, mask: torch.Tensor) -> Detection:
    """One video: rgb (F, H, W, 3) in 0..1 and its object mask (F, H, W) -> Detection."""
    present = mask.flatten(1).any(dim=1)  # (F,)
    n = int(present.sum())
    extra: dict = dict(frames_with_object=n)
    if n == 0:
        return Detection(None, None, None, dict(colour=0.0, shape=0.0, direction=0.0), extra)

    median = rgb[mask].median(dim=0).values  # (3,)
    hue = median / median.max().clamp_min(1e-6)
    ci, c_conf = _nearest(hue, PALETTE.to(rgb.device))
    extra["median_rgb"] = median.tolist()

    feats = _shape_features(mask)[present].median(dim=0).values  # (3,)
    si, s_conf = _nearest(feats, SHAPE_PROTOTYPES.to(rgb.device))
    extra.update(fill=float(feats[0]), top_width=float(feats[1]), bottom_width=float(feats[2]))

    direction, d_conf = None, 0.0
    if n >= 2:
        Fr, H, W = mask.shape
        m = mask[present].float()
        area = m.sum(dim=(1, 2))
        cx = (m.sum(dim=1) * torch.arange(W, device=m.device)).sum(1) / area  # (n,)
        cy = (m.sum(dim=2) * torch.arange(H, device=m.device)).sum(1) / area
        k = min(3, n // 2)
        dx = float(cx[-k:].mean() - cx[:k].mean())
        dy = float(cy[-k:].mean() - cy[:k].mean())
        votes = torch.tensor([-dx, dx, -dy, dy])  # left, right, up (y grows downwards), down
        direction = DIRECTIONS[int(votes.argmax())]
        d_conf = max(abs(dx), abs(dy)) / max(abs(dx) + abs(dy), 1e-6)
        extra.update(dx=dx, dy=dy)
    return Detection(COLOURS[ci], SHAPES[si], direction, dict(colour=c_conf, shape=s_conf, direction=d_conf), extra)


def detect(frames, *, threshold: float | None = None, min_area: int = MIN_AREA) -> Detection:
    """Colour, shape and direction of the object in one decoded video (see the module docstring)."""
    rgb = _as_rgb(frames)
    return _decide(rgb, _masks(rgb[None], threshold, min_area)[0])


def detect_batch(videos: torch.Tensor, *, threshold: float | None = None, min_area: int = MIN_AREA,
                 chunk: int = 16) -> list[Detection]:
    """`detect` for a batch (B, 3, F, H, W) in [-1, 1], finding the blobs `chunk` videos at a time."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[1] != 3:
        shape = tuple(videos.shape) if hasattr(videos, "shape") else type(videos).__name__
        raise ValueError(f"videos must be a tensor (B, 3, F, H, W) in [-1, 1], got {shape}")
    out = []
    for start in range(0, videos.shape[0], chunk):
        rgb = ((videos[start:start + chunk].float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)  # (b, F, H, W, 3)
        masks = _masks(rgb, threshold, min_area)
        out += [_decide(rgb[i], masks[i]) for i in range(rgb.shape[0])]
    return out


def score(detections: list[Detection], captions: list[str]) -> dict:
    """Accuracy of each attribute (and of all three at once) against the prompts the videos came from."""
    if len(detections) != len(captions):
        raise ValueError(f"need one caption per detection, got {len(detections)} detections and {len(captions)} captions")
    if not captions:
        raise ValueError("score needs at least one detection")
    truth = [parse_caption(c) for c in captions]
    hits = torch.tensor([[d.colour == t[0], d.shape == t[1], d.direction == t[2]] for d, t in zip(detections, truth)],
                        dtype=torch.float64)
    acc = hits.mean(dim=0)
    return dict(colour_acc=float(acc[0]), shape_acc=float(acc[1]), direction_acc=float(acc[2]),
                all_acc=float(hits.all(dim=1).double().mean()), n=len(captions))
