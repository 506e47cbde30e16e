"""Read a toy video back into words: which colour, which shape, which way it moves.

The toy model is judged on what it draws, so this module inspects *decoded* frames (after the VAE)
of the synthetic scenes in `hvlab.toy.data`: one coloured object on a black background.

1. Foreground: a pixel belongs to the object when its brightest channel exceeds half of the video's
   object brightness (the 99.5th percentile of that channel; at least 0.2 on a 0..1 scale), which
   puts the mask edge on the half-coverage contour, the true edge even after blur. A 3x3 opening
   removes the one-pixel spurs noise leaves on a blurred edge. Per frame, the largest 8-connected
   blob of at least `min_area` px is the object; smaller specks are ignored.
2. Colour: per-channel median of the object pixels over all frames, divided by its brightest channel
   (so a dim or washed-out object keeps its hue), then the nearest palette entry.
3. Shape: three per-frame numbers, medians over frames, compared with each shape's ideal values:
   fill = area / bbox area (square 1, circle pi/4, triangle 1/2) and the mean row width in the top and
   bottom quarters of the bbox relative to its width (a triangle is narrow on top and wide below, a
   circle narrow at both ends, a square full everywhere). Blur rounds corners, which lowers the
   square's fill and raises the triangle's; the profile keeps the three apart anyway.
4. Direction: centroid displacement from the mean of the first 3 to the mean of the last 3 frames
   that show an object; the dominant axis wins. Image y grows downwards, so "up" is dy < 0.

**Two objects** (`detect_objects`, `detect_scene`, `score_scenes`): the two objects of a scene differ
in colour, so they are told apart by colour, not by connectivity (generated objects may touch).
Every pixel brighter than `MIN_LEVEL` gets the palette colour nearest to its rgb divided by its
brightest channel; per colour, pixels above half of that colour's brightness (its 90th percentile)
are kept, opened, and the largest blob per frame is that colour's object in that frame. The colours
whose blobs are present in the most frames (at least a quarter of them) and cover the most pixels
are the objects; each one's mask (F, H, W) is `Detection.mask`, and its shape and direction are read
from its own pixels as above. `detect_scene` then assigns the detected objects to the caption's
objects by colour: exact colour matches first, any remaining object to the remaining caption object
whose colour is nearest, so a wrong colour still leaves its shape and direction to be scored.

Inputs: one video, either a uint8 array or tensor (F, H, W, 3) in 0..255 (what a video file holds),
or a floating tensor or array (3, F, H, W) in [-1, 1] (what the VAE decodes to). The work is done on
lists of foreground pixels (a few % of the frame): about 20 ms per 128 x 128 x 17 video on one CPU core.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .data import COLOURS, DIRECTIONS, PALETTE, SHAPES, parse_caption, parse_scene

MIN_AREA = 40  # px; blobs smaller than this are noise, not the object (the smallest object has ~650 px)
MIN_LEVEL = 0.2  # lowest foreground threshold on a 0..1 scale, far above VAE noise on black
# Ideal (fill, top-quarter width, bottom-quarter width) per shape, in SHAPES order. Circle: pi/4, and
# the mean of sqrt(1 - y^2) over y in [1/2, 1] = 0.614; triangle: 1/2, 1/8, 7/8.
SHAPE_PROTOTYPES = torch.tensor([[0.785, 0.614, 0.614], [1.0, 1.0, 1.0], [0.5, 0.125, 0.875]])
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # 8-connectivity


@dataclass
class Detection:
    """What `detect` read from one video. A field is None when no object was found to decide it."""

    colour: str | None
    shape: str | None
    direction: str | None
    confidence: dict[str, float] = field(default_factory=dict)  # per attribute, 0 (a tie) .. 1 (unambiguous)
    extra: dict = field(default_factory=dict)  # the measured features behind each decision
    mask: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (F, H, W) bool, two-object reader


def _as_video(frames) -> torch.Tensor:
    """Any accepted input -> float tensor (3, F, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (F, H, W, 3) in 0..255, got shape {tuple(x.shape)}")
        return x.permute(3, 0, 1, 2).float() / 127.5 - 1
    if x.is_floating_point():
        if x.dim() != 4 or x.shape[0] != 3:
            raise ValueError(f"float frames must be (3, F, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        return x.float()
    raise TypeError(f"frames must be uint8 (F, H, W, 3) or floating (3, F, H, W), got dtype {x.dtype}")


def _neighbours(frame: torch.Tensor, pix: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(8, P): for each listed pixel, the list position of each of its 8 neighbours, or P if not listed.

    `frame`, `pix` list P pixels of N frames of H x W (pix = y * W + x). Positions are looked up in a
    dense map with a one-pixel border that is never listed, so no bounds checks are needed.
    """
    N, H, W = shape
    P, Wp = pix.numel(), W + 2
    padded = frame * ((H + 2) * Wp) + (pix // W + 1) * Wp + pix % W + 1  # (P,) index in the bordered frames
    position = torch.full((N * (H + 2) * Wp,), P, dtype=torch.int32, device=pix.device)  # int32: half the memory
    position[padded] = torch.arange(P, dtype=torch.int32, device=pix.device)
    return torch.stack([position[padded + (dy * Wp + dx)] for dy, dx in _OFFSETS])


def _open(nb: torch.Tensor) -> torch.Tensor:
    """(P,) bool: which listed pixels survive a 3x3 opening (erode, then dilate) of the listed set."""
    P = nb.shape[1]
    core = torch.cat([(nb < P).all(dim=0), torch.zeros(1, dtype=torch.bool, device=nb.device)])  # erosion
    return core[:P] | core[nb].any(dim=0)  # dilation, within the set: an opening never adds pixels


def _restrict(nb: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The neighbour table with the dropped pixels cut off: they and links to them become "none"."""
    P = nb.shape[1]
    keep_ext = torch.cat([keep, torch.zeros(1, dtype=torch.bool, device=nb.device)])
    return torch.where(keep_ext[nb] & keep, nb, P)  # dropped pixels are left as lone 1-px blobs


def _largest_blobs(nb: torch.Tensor, frame: torch.Tensor, n_frames: int, min_area: int) -> torch.Tensor:
    """(P,) bool: which listed pixels belong to their frame's largest 8-connected blob (>= min_area px).

    Connected components by label propagation: every pixel starts as its own label; each round a
    pixel takes the largest label among its 8 neighbours, hands it to the pixel its current label
    names ("hooking"), then follows labels twice ("pointer jumping"). Labels spread along chains of
    pointers, so a blob settles in a handful of rounds, not in as many rounds as it is wide.
    """
    P = nb.shape[1]
    if P == 0:
        return torch.zeros(0, dtype=torch.bool, device=nb.device)
    label = torch.arange(P + 1, device=nb.device)
    label[P] = -1  # the "no neighbour" slot never wins a max
    for _ in range(P):
        best = label[:P].clone()
        for k in range(8):
            torch.maximum(best, label[nb[k]], out=best)  # largest label nearby
        new = label.clone()
        new[:P] = best
        new.scatter_reduce_(0, label[:P], best, reduce="amax")  # hook: the named pixel learns it too
        for _ in range(2):
            new[:P] = torch.maximum(new[:P], new[new[:P]])  # pointer jumping
        if torch.equal(new, label):
            break
        label = new
    label = label[:P]  # every pixel of a blob now holds the blob's largest list position
    size = torch.bincount(label, minlength=P)[label]  # (P,) size of the pixel's blob
    key = size * P + label  # largest blob first, ties broken by label
    best = torch.full((n_frames,), -1, device=nb.device).scatter_reduce(0, frame, key, reduce="amax")
    return (key == best[frame]) & (size >= min_area)


def _object_pixels(video: torch.Tensor, threshold: float | None, min_area: int):
    """(B, 3, F, H, W) in [-1, 1] -> (frame, y, x) of every object pixel; frame indexes the B * F frames."""
    B, _, Fr, H, W = video.shape
    value = ((video.amax(dim=1) + 1) / 2).clamp(0, 1)  # (B, F, H, W) brightest channel, 0..1
    if threshold is None:
        k = max(1, int(0.005 * Fr * H * W))
        level = value.reshape(B, -1).topk(k, dim=1).values[:, -1]  # 99.5th percentile per video
        thr = (0.5 * level).clamp_min(MIN_LEVEL)
    else:
        thr = torch.full((B,), float(threshold), device=value.device)
    frame, pix = (value > thr.view(B, 1, 1, 1)).view(B * Fr, H * W).nonzero(as_tuple=True)
    nb = _neighbours(frame, pix, (B * Fr, H, W))
    kept = _largest_blobs(_restrict(nb, _open(nb)), frame, B * Fr, min_area)
    frame, pix = frame[kept], pix[kept]
    return frame, pix // W, pix % W


def object_masks(frames, *, threshold: float | None = None, min_area: int = MIN_AREA):
    """The object's mask per frame, bool (F, H, W): numpy in -> numpy out, tensor in -> tensor out.

    `threshold` (0..1 scale, on the brightest channel) overrides the adaptive half-brightness level.
    A frame with no blob of `min_area` px is all False.
    """
    video = _as_video(frames)
    _, Fr, H, W = video.shape
    f, y, x = _object_pixels(video[None], threshold, min_area)
    mask = torch.zeros(Fr, H, W, dtype=torch.bool, device=video.device)
    mask[f, y, x] = True
    return mask.cpu().numpy() if isinstance(frames, np.ndarray) else mask


def _nearest(value: torch.Tensor, table: torch.Tensor) -> tuple[int, float]:
    """Index of the nearest row of `table`, and a confidence 1 - d_best / d_second."""
    dist, order = (table - value).norm(dim=1).sort()
    return int(order[0]), float(1 - dist[0] / dist[1].clamp_min(1e-8))


def _frame_features(f, y, x, N: int, H: int) -> torch.Tensor:
    """Per frame (N, 6): area, fill, top-quarter width, bottom-quarter width, centroid x, centroid y."""
    f, y, x = f.cpu(), y.cpu(), x.cpu()  # N * H numbers at most: small, and bincount is fastest here
    area = torch.bincount(f, minlength=N).double()
    none = torch.full((N,), -1, dtype=torch.long)
    top = torch.full((N,), H, dtype=torch.long).scatter_reduce(0, f, y, reduce="amin")
    bottom, right = none.scatter_reduce(0, f, y, reduce="amax"), none.scatter_reduce(0, f, x, reduce="amax")
    left = torch.full((N,), 1 << 30, dtype=torch.long).scatter_reduce(0, f, x, reduce="amin")
    height, width = (bottom - top + 1).clamp_min(1).double(), (right - left + 1).clamp_min(1).double()
    row_width = torch.bincount(f * H + y, minlength=N * H).view(N, H).double()  # (N, H)
    pos = (torch.arange(H)[None] - top[:, None] + 0.5) / height[:, None]  # 0..1 down the bbox
    upper, lower = (pos > 0) & (pos < 0.25), (pos > 0.75) & (pos < 1)
    top_w = (row_width * upper).sum(1) / upper.sum(1).clamp_min(1) / width
    bottom_w = (row_width * lower).sum(1) / lower.sum(1).clamp_min(1) / width
    safe = area.clamp_min(1)
    cx = torch.bincount(f, weights=x.double(), minlength=N) / safe
    cy = torch.bincount(f, weights=y.double(), minlength=N) / safe
    return torch.stack([area, area / (height * width), top_w, bottom_w, cx, cy], dim=1)


def _decide(feats: torch.Tensor, rgb: torch.Tensor) -> Detection:
    """One video: per-frame features (F, 6) and the object pixels' colours (P, 3) -> Detection."""
    present = feats[:, 0] > 0
    n = int(present.sum())
    extra: dict = dict(frames_with_object=n)
    if n == 0:
        return Detection(None, None, None, dict(colour=0.0, shape=0.0, direction=0.0), extra)
    median = rgb.median(dim=0).values  # (3,)
    ci, c_conf = _nearest(median / median.max().clamp_min(1e-6), PALETTE.double())
    shape_feats = feats[present, 1:4].median(dim=0).values  # fill, top width, bottom width
    si, s_conf = _nearest(shape_feats, SHAPE_PROTOTYPES.double())
    extra.update(median_rgb=median.tolist(), fill=float(shape_feats[0]), top_width=float(shape_feats[1]),
                 bottom_width=float(shape_feats[2]))
    direction, d_conf = None, 0.0
    if n >= 2:
        cx, cy = feats[present, 4], feats[present, 5]
        k = min(3, n // 2)
        dx, dy = float(cx[-k:].mean() - cx[:k].mean()), float(cy[-k:].mean() - cy[:k].mean())
        votes = torch.tensor([-dx, dx, -dy, dy])  # left, right, up (y grows downwards), down
        direction = DIRECTIONS[int(votes.argmax())]
        d_conf = abs(abs(dx) - abs(dy)) / max(abs(dx) + abs(dy), 1e-6)  # 0 for a diagonal, 1 along an axis
        extra.update(dx=dx, dy=dy)
    return Detection(COLOURS[ci], SHAPES[si], direction, dict(colour=c_conf, shape=s_conf, direction=d_conf), extra)


def _detect(video: torch.Tensor, threshold: float | None, min_area: int) -> list[Detection]:
    """(B, 3, F, H, W) in [-1, 1] -> one Detection per video."""
    B, _, Fr, H, W = video.shape
    f, y, x = _object_pixels(video, threshold, min_area)
    rgb = ((video[f // Fr, :, f % Fr, y, x].double().cpu() + 1) / 2).clamp(0, 1)  # (P, 3) grouped by video
    feats = _frame_features(f, y, x, B * Fr, H).view(B, Fr, -1)
    per_video = torch.bincount(f.cpu() // Fr, minlength=B).tolist()
    return [_decide(feats[b], colours) for b, colours in enumerate(rgb.split(per_video))]


def detect(frames, *, threshold: float | None = None, min_area: int = MIN_AREA) -> Detection:
    """Colour, shape and direction of the object in one decoded video (see the module docstring)."""
    return _detect(_as_video(frames)[None], threshold, min_area)[0]


def detect_batch(videos: torch.Tensor, *, threshold: float | None = None, min_area: int = MIN_AREA,
                 chunk: int = 32) -> list[Detection]:
    """`detect` for a batch (B, 3, F, H, W) in [-1, 1], `chunk` videos at a time."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[1] != 3:
        shape = tuple(videos.shape) if hasattr(videos, "shape") else type(videos).__name__
        raise ValueError(f"videos must be a tensor (B, 3, F, H, W) in [-1, 1], got {shape}")
    out = []
    for start in range(0, videos.shape[0], chunk):
        out += _detect(videos[start:start + chunk].float(), threshold, min_area)
    return out


def score(detections: list[Detection], captions: list[str]) -> dict:
    """Accuracy of each attribute (and of all three at once) against the prompts the videos came from."""
    if len(detections) != len(captions):
        raise ValueError(f"need one caption per detection, got {len(detections)} detections and "
                         f"{len(captions)} captions")
    if not captions:
        raise ValueError("score needs at least one detection")
    truth = [parse_caption(c) for c in captions]
    hits = torch.tensor([[d.colour == t[0], d.shape == t[1], d.direction == t[2]] for d, t in zip(detections, truth)],
                        dtype=torch.float64)
    acc = hits.mean(dim=0)
    return dict(colour_acc=float(acc[0]), shape_acc=float(acc[1]), direction_acc=float(acc[2]),
                all_acc=float(hits.all(dim=1).double().mean()), n=len(captions))


# ---- two objects, told apart by colour ----------------------------------------------------------------

def _colour_pixels(video: torch.Tensor, min_area: int):
    """(3, F, H, W) in [-1, 1] -> (label, frame, y, x) of the pixels of each colour's largest blob per frame."""
    _, Fr, H, W = video.shape
    rgb = ((video + 1) / 2).clamp(0, 1)  # (3, F, H, W)
    value = rgb.amax(dim=0)  # (F, H, W)
    f, y, x = (value > MIN_LEVEL).nonzero(as_tuple=True)
    v = value[f, y, x]
    hue = rgb[:, f, y, x].T / v[:, None]  # (P, 3) brightest channel = 1
    label = torch.cdist(hue, PALETTE.to(hue)).argmin(dim=1)  # nearest palette colour
    level = torch.zeros(len(COLOURS), device=v.device)
    for c in label.unique().tolist():  # half of each colour's own brightness: a dim object keeps its mask
        level[c] = torch.quantile(v[label == c], 0.9)
    keep = v > (0.5 * level[label]).clamp_min(MIN_LEVEL)
    label, f, y, x = label[keep], f[keep], y[keep], x[keep]
    frame = label * Fr + f  # one pseudo-frame per (colour, frame): blobs never mix colours
    nb = _neighbours(frame, y * W + x, (len(COLOURS) * Fr, H, W))
    kept = _largest_blobs(_restrict(nb, _open(nb)), frame, len(COLOURS) * Fr, min_area)
    return label[kept], f[kept], y[kept], x[kept]


def detect_objects(frames, n_objects: int = 2, *, min_area: int = MIN_AREA) -> list[Detection]:
    """Up to `n_objects` objects of one video, told apart by colour (module docstring), largest first.

    Each Detection carries its colour, shape, direction and ``mask`` (F, H, W) bool, on the input's
    device (a tensor; numpy in -> numpy mask out)."""
    if n_objects < 1:
        raise ValueError(f"n_objects must be >= 1, got {n_objects}")
    video = _as_video(frames)
    _, Fr, H, W = video.shape
    label, f, y, x = _colour_pixels(video, min_area)
    frames_with = torch.zeros(len(COLOURS), Fr, dtype=torch.bool, device=video.device)
    frames_with[label, f] = True
    n_frames = frames_with.sum(dim=1)
    area = torch.bincount(label, minlength=len(COLOURS))
    key = n_frames * (H * W * Fr + 1) + area  # most frames first, then most pixels
    chosen = [c for c in key.argsort(descending=True).tolist() if n_frames[c] >= max(2, Fr // 4)][:n_objects]
    rgb = ((video + 1) / 2).clamp(0, 1)
    out = []
    for c in chosen:
        sel = label == c
        fc, yc, xc = f[sel], y[sel], x[sel]
        feats = _frame_features(fc, yc, xc, Fr, H)
        det = _decide(feats, rgb[:, fc, yc, xc].T.double().cpu())
        mask = torch.zeros(Fr, H, W, dtype=torch.bool, device=video.device)
        mask[fc, yc, xc] = True
        det.extra["median_colour"] = det.colour  # the one-object reading; the label below is per pixel
        out.append(replace(det, colour=COLOURS[c], mask=mask.cpu().numpy() if isinstance(frames, np.ndarray) else mask))
    return out


def _palette_distance(d: Detection, colour: str) -> float:
    """How far a detection's median colour (brightest channel scaled to 1) is from a palette colour."""
    rgb = d.extra.get("median_rgb")
    if rgb is None:  # a Detection made by hand: only its label to go by
        return 0.0 if d.colour == colour else 1.0
    rgb = torch.tensor(rgb, dtype=torch.float64)
    return float((rgb / rgb.max().clamp_min(1e-6) - PALETTE[COLOURS.index(colour)].double()).norm())


def assign_by_colour(detections: list[Detection], objects: list[tuple[str, str, str]]) -> list[Detection | None]:
    """Match detected objects to a caption's objects (each (colour, shape, direction)): one entry per
    caption object, None where nothing is left. Most exact colour matches win, then the most objects
    matched; ties go to the match whose detected median colours lie nearest to the wanted ones."""
    slots = list(detections) + [None] * len(objects)  # spare Nones: an object may be missing

    def cost(order):
        pairs = [(d, o[0]) for d, o in zip(order, objects) if d is not None]
        return -sum(d.colour == c for d, c in pairs), -len(pairs), sum(_palette_distance(d, c) for d, c in pairs)

    return list(min(itertools.permutations(slots, len(objects)), key=cost))


def detect_scene(frames, text: str, *, min_area: int = MIN_AREA) -> list[Detection | None]:
    """The objects of one video assigned to the objects of its caption (one or two), by colour."""
    objects = parse_scene(text)
    return assign_by_colour(detect_objects(frames, len(objects), min_area=min_area), objects)


def score_scenes(scenes: list[list[Detection | None]], captions: list[str]) -> dict:
    """Per-object accuracy of colour, shape and direction over every object of every caption (a missing
    object counts as wrong on all three), ``all_acc`` (every attribute of every object of a video right)
    and the same per position in the caption (``by_position[k]``, k = 0 the first object)."""
    if len(scenes) != len(captions):
        raise ValueError(f"need one caption per scene, got {len(scenes)} scenes and {len(captions)} captions")
    if not captions:
        raise ValueError("score_scenes needs at least one scene")
    rows, positions, videos = [], [], []
    for scene, text in zip(scenes, captions):
        truth = parse_scene(text)
        if len(scene) != len(truth):
            raise ValueError(f"{text!r} has {len(truth)} objects but its scene lists {len(scene)}")
        hits = [[d is not None and d.colour == t[0], d is not None and d.shape == t[1],
                 d is not None and d.direction == t[2]] for d, t in zip(scene, truth)]
        rows += hits
        positions += range(len(truth))
        videos.append(all(all(h) for h in hits))
    hits = torch.tensor(rows, dtype=torch.float64)
    pos = torch.tensor(positions)

    def acc(h):
        a = h.mean(dim=0)
        return dict(colour_acc=float(a[0]), shape_acc=float(a[1]), direction_acc=float(a[2]), objects=len(h))

    return dict(acc(hits), all_acc=sum(videos) / len(videos), n=len(captions),
                by_position=[acc(hits[pos == k]) for k in range(int(pos.max()) + 1)])
