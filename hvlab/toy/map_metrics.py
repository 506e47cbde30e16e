"""Does a word's heat map land on its own object? Scores for the word maps of two-object toy videos.

Inputs are plain tensors, so any kind of map can be scored the same way (cross-attention maps from
`hvlab.inspection.AttentionRecorder`, output-space concept maps, a hand-made map in a test):

* a word's map on the post-patch grid, (T, h, w) — 5 x 8 x 8 for the toy, one cell per 16 x 16 px;
* the object's mask per video frame, (F, H, W) bool — `Detection.mask` from
  `hvlab.toy.detector.detect_objects`.

Video frame f shows latent frame ceil(f / r), r = (F - 1) / (T - 1) (the causal VAE's grouping, as in
`hvlab.inspection.upsample_to_video`), so every score is counted per video frame, over the frames that show
every object of the video (`binding_scores`).

* **coverage** of a cell: the share of its pixels inside the mask.
* **peak hit**: the map's largest cell lies on the object, i.e. the object covers that cell at least
  half as much as it covers its own best-covered cell. (Relative, because a small object on this
  grid may cover no cell by half: a 28 px circle centred on a cell corner covers each of its four
  cells by 0.6 at most.) A flat map (maximum = minimum) peaks nowhere: a miss.
* **IoU**: the map thresholded half-way between the frame's minimum and maximum (a flat frame: no cell
  on), shown at pixel size (nearest), against the mask. The best any map on this grid can score is
  `iou_ceiling`: the same threshold applied to the coverage itself.
* **correlation**: Pearson correlation, over all (T, h, w) cells, between the maps of the same kind of
  word (say, the two shape words) of the two objects; a map that tells the objects apart has a low one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inspection import upsample_to_video

ROLES = ("colour", "shape", "direction")  # the words of each object, in this order on the role axis

# Every function takes maps with any leading dimensions (..., T, h, w) — say (steps, blocks, T, h, w) —
# and scores them all at once against one mask (F, H, W).


def _check(maps: torch.Tensor, mask: torch.Tensor) -> None:
    if maps.dim() < 3 or mask.dim() != 3:
        raise ValueError(f"need maps (..., T, h, w) and a mask (F, H, W), got shapes {tuple(maps.shape)} and "
                         f"{tuple(mask.shape)}")
    T, h, w = maps.shape[-3:]
    Fr, H, W = mask.shape
    if H % h or W % w:
        raise ValueError(f"the frame size {H}x{W} must be a multiple of the map grid {h}x{w}")
    if T > 1 and (Fr - 1) % (T - 1):
        raise ValueError(f"{Fr} video frames do not group into {T} latent frames (expected (F - 1) % (T - 1) == 0)")


def frame_maps(maps: torch.Tensor, video_length: int) -> torch.Tensor:
    """(..., T, h, w) -> (..., F, h, w): the latent frame each video frame shows."""
    h, w = maps.shape[-2:]
    return upsample_to_video(maps.float(), video_length, h, w)


def coverage(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(F, H, W) bool -> (F, h, w): the share of each map cell's pixels inside the mask."""
    H, W = mask.shape[-2:]
    h, w = grid
    return F.avg_pool2d(torch.as_tensor(mask).float()[:, None], (H // h, W // w))[:, 0]


def present_frames(mask: torch.Tensor) -> torch.Tensor:
    """(F,) bool: the frames that show the object."""
    return torch.as_tensor(mask).flatten(1).any(dim=1)


def peak_hits(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., F) bool: per video frame, whether the map's largest cell lies on the object (module
    docstring). Frames without the object are False; count them out with `present_frames`."""
    _check(maps, mask)
    m = frame_maps(maps, mask.shape[0]).flatten(-2)  # (..., F, h w)
    cov = coverage(mask, maps.shape[-2:]).flatten(1).expand_as(m)  # (..., F, h w)
    at_peak = cov.gather(-1, m.argmax(dim=-1, keepdim=True))[..., 0]
    flat = m.amax(dim=-1) == m.amin(dim=-1)
    return (at_peak >= 0.5 * cov.amax(dim=-1)) & (at_peak > 0) & ~flat


def thresholded(maps_per_frame: torch.Tensor) -> torch.Tensor:
    """(..., F, h, w) -> bool: cells at least half-way from their frame's minimum to its maximum."""
    lo = maps_per_frame.flatten(-2).amin(dim=-1)[..., None, None]
    hi = maps_per_frame.flatten(-2).amax(dim=-1)[..., None, None]
    return (maps_per_frame - lo >= 0.5 * (hi - lo)) & (hi > lo)


def _iou(on_cells: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., F, h, w) bool cells vs (F, H, W) bool pixels -> (..., F)."""
    H, W = mask.shape[-2:]
    h, w = on_cells.shape[-2:]
    on = on_cells.repeat_interleave(H // h, dim=-2).repeat_interleave(W // w, dim=-1)
    mask = torch.as_tensor(mask).bool()
    union = (on | mask).flatten(-2).sum(-1)
    return (on & mask).flatten(-2).sum(-1) / union.clamp_min(1)


def frame_iou(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., F) IoU of the thresholded map (at pixel size) with the mask, per video frame."""
    _check(maps, mask)
    return _iou(thresholded(frame_maps(maps, mask.shape[0])), mask)


def iou_ceiling(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(F,) the IoU a map equal to the mask's own cell coverage gets: the best on this grid."""
    return _iou(thresholded(coverage(mask, grid)), mask)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(...) Pearson correlation of two maps (..., T, h, w) over their cells (0 where either is flat)."""
    if a.shape != b.shape:
        raise ValueError(f"maps to correlate must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.double().flatten(-3), b.double().flatten(-3)
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    denom = x.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(denom > 0, (x * y).sum(-1) / denom.clamp_min(1e-300), 0.0)


def binding_scores(word_maps: torch.Tensor, masks: list) -> dict:
    """Counts for one video, to pool over videos with `summarise`.

    ``word_maps`` (..., n_objects, 3, T, h, w): each object's colour, shape and direction word's map
    (`ROLES` order), e.g. with leading (steps, blocks); ``masks``: one (F, H, W) bool mask per object
    (None when the object was not found). Only the frames that show *every* object count (with one
    missing, "its own object" would trivially be the only one there). Per role: ``hits`` / ``other``
    (...) frames whose peak lies on the word's own object / on another one, ``iou`` (...) summed over
    frames, ``frames`` and ``ceiling`` (summed `iou_ceiling`), both counted over all objects, and
    ``correlation`` (..., n_objects - 1) between object 0's map and each other's (empty when no frame
    counts).
    """
    n = len(masks)
    if word_maps.dim() < 5 or word_maps.shape[-4] != len(ROLES) or word_maps.shape[-5] != n:
        raise ValueError(f"word_maps must be (..., n_objects, {len(ROLES)}, T, h, w) with one mask per object, "
                         f"got {tuple(word_maps.shape)} and {len(masks)} masks")
    lead = word_maps.shape[:-5]
    found = all(m is not None for m in masks)
    masks = [torch.as_tensor(m).bool() for m in masks] if found else []
    present = torch.stack([present_frames(m) for m in masks]).all(dim=0) if found else torch.zeros(0, dtype=bool)
    counted = bool(present.any())
    out = {}
    for r, role in enumerate(ROLES):
        s = dict(hits=torch.zeros(lead), other=torch.zeros(lead), iou=torch.zeros(lead), frames=0, ceiling=0.0,
                 correlation=torch.zeros(*lead, 0))
        if counted:
            for k, mask in enumerate(masks):
                maps = word_maps[..., k, r, :, :, :]
                s["frames"] += int(present.sum())
                s["hits"] += (peak_hits(maps, mask) & present).sum(-1)
                s["iou"] += frame_iou(maps, mask)[..., present].sum(-1)
                s["ceiling"] += float(iou_ceiling(mask, maps.shape[-2:])[present].sum())
                others = [m for j, m in enumerate(masks) if j != k]
                if others:
                    on_other = torch.stack([peak_hits(maps, m) for m in others]).any(0)
                    s["other"] += (on_other & present).sum(-1)
            if n > 1:
                s["correlation"] = torch.stack([correlation(word_maps[..., 0, r, :, :, :],
                                                            word_maps[..., k, r, :, :, :]) for k in range(1, n)], -1)
        out[role] = s
    return out


def summarise(scores: list[dict]) -> dict:
    """Pool `binding_scores` of many videos. Per role: ``peak_in_own`` (fraction of the counted frames,
    over all objects), ``peak_in_other``, ``iou`` and ``iou_ceiling`` (means over those frames),
    ``correlation`` (mean over the videos with counted frames; nan if none), ``frames`` (object-frames
    counted) and ``videos`` (videos with counted frames). Values are tensors with the maps' leading
    dimensions (floats for maps without any)."""
    if not scores:
        raise ValueError("summarise needs the scores of at least one video")
    out = {}
    for role in ROLES:
        rows = [s[role] for s in scores]
        frames = sum(r["frames"] for r in rows)
        corr = torch.cat([r["correlation"] for r in rows], -1)
        res = dict(peak_in_own=sum(r["hits"] for r in rows) / max(frames, 1),
                   peak_in_other=sum(r["other"] for r in rows) / max(frames, 1),
                   iou=sum(r["iou"] for r in rows) / max(frames, 1),
                   iou_ceiling=sum(r["ceiling"] for r in rows) / max(frames, 1),
                   correlation=corr.mean(-1) if corr.shape[-1] else torch.full(corr.shape[:-1], float("nan")),
                   frames=frames, videos=sum(r["frames"] > 0 for r in rows))
        out[role] = {k: (float(v) if isinstance(v, torch.Tensor) and v.dim() == 0 else v) for k, v in res.items()}
    return out
