"""The toy model's synthetic videos, the detector that reads them back, and the word-level tokenizer.

Rendering is checked against geometry computed independently (area, centroid, an 8x8 supersampled
inside-test), the detector against the rendered ground truth (clean, and blurred + noisy as a VAE
would return it), the blob finder against a breadth-first search, and the tokenizer against the
committed files and the prompt template's words.
"""
import json
import math
import re
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hvlab import prompts
from hvlab.toy import data, detector
from hvlab.toy import tokenizer as toy_tok

# ----------------------------------------------------------------------------- splits and captions


def test_heldout_split_is_disjoint_covering_and_every_word_and_pair_is_trained():
    assert len(data.ALL_COMBOS) == 7 * 3 * 4 == 84
    assert len(data.HELDOUT) == 21 and len(data.TRAIN) == 63
    assert set(data.HELDOUT).isdisjoint(data.TRAIN)
    assert set(data.HELDOUT) | set(data.TRAIN) == set(data.ALL_COMBOS)
    # the rule, recomputed from the names
    for c, s, d in data.ALL_COMBOS:
        expected = "heldout" if (c + s + d) % 4 == 0 else "train"
        assert data.split_of(data.COLOURS[c], data.SHAPES[s], data.DIRECTIONS[d]) == expected
    # composition: every single value and every (colour, shape) pair occurs in training
    for position, names in enumerate((data.COLOURS, data.SHAPES, data.DIRECTIONS)):
        assert {t[position] for t in data.TRAIN} == set(range(len(names)))
    assert {(c, s) for c, s, _ in data.TRAIN} == {(c, s) for c in range(7) for s in range(3)}
    # sampling respects the split
    g = torch.Generator().manual_seed(0)
    for split in ("train", "heldout"):
        a = data.sample_attributes(500, g, split)
        combos = set(zip(a["colour"].tolist(), a["shape"].tolist(), a["direction"].tolist()))
        assert combos == set(data.SPLITS[split])  # all of them drawn, nothing from the other split


def test_caption_round_trip_and_errors():
    for c, s, d in data.ALL_COMBOS:
        names = (data.COLOURS[c], data.SHAPES[s], data.DIRECTIONS[d])
        assert data.caption(c, s, d) == data.caption(*names) == f"a {names[0]} {names[1]} moving {names[2]}"
        assert data.parse_caption(data.caption(c, s, d)) == names
    assert data.parse_caption("  A Red  Circle moving RIGHT ") == ("red", "circle", "right")
    with pytest.raises(ValueError, match=r"unknown colour 'purple'.*expected one of red, green"):
        data.parse_caption("a purple circle moving right")
    with pytest.raises(ValueError, match=r"unknown shape 'hexagon'.*circle, square, triangle"):
        data.parse_caption("a red hexagon moving up")
    with pytest.raises(ValueError, match=r"unknown direction 'sideways'.*left, right, up, down"):
        data.parse_caption("a red circle moving sideways")
    for bad in ("a red circle moving", "red circle moving right", "a red circle going right", ""):
        with pytest.raises(ValueError, match="a <colour> <shape> moving <direction>"):
            data.parse_caption(bad)
    with pytest.raises(ValueError, match="shape index must be in 0..2"):
        data.caption(0, 3, 0)
    with pytest.raises(ValueError, match="split must be one of train, heldout, all"):
        data.sample_attributes(2, None, "test")
    with pytest.raises(ValueError, match="frames - 1 must be a multiple of 4"):
        data.sample_attributes(2, None, frames=16)
    with pytest.raises(ValueError, match="size must be at least"):
        data.sample_attributes(2, None, size=64)


# ----------------------------------------------------------------------------- rendering


def test_sampling_and_dataset_are_deterministic():
    v1, c1, a1 = data.sample_batch(6, torch.Generator().manual_seed(7), "all")
    v2, c2, a2 = data.sample_batch(6, torch.Generator().manual_seed(7), "all")
    v3, _, _ = data.sample_batch(6, torch.Generator().manual_seed(8), "all")
    assert torch.equal(v1, v2) and c1 == c2 and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert not torch.equal(v1, v3)
    ds = data.SyntheticShapes("heldout", length=10, seed=3)
    late = ds[5]
    for i in (9, 0, 2):  # access order does not matter
        ds[i]
    again = data.SyntheticShapes("heldout", length=10, seed=3)[5]
    assert torch.equal(late["video"], again["video"]) and late["caption"] == again["caption"]
    assert late["video"].shape == (3, 17, 128, 128)
    assert data.split_of(*data.parse_caption(late["caption"])) == "heldout"
    assert not torch.equal(ds[4]["video"], late["video"])
    assert not torch.equal(data.SyntheticShapes("heldout", length=10, seed=4)[5]["video"], late["video"])
    with pytest.raises(IndexError):
        ds[10]


def test_objects_stay_inside_the_frame():
    g = torch.Generator().manual_seed(1)
    a = data.sample_attributes(5000, g, "all")
    t = torch.arange(17.0)
    step = a["speed"][:, None] * data.DIRECTION_VECTORS[a["direction"]]  # (B, 2) px per frame
    centre = a["start_xy"][:, None] + t[None, :, None] * step[:, None]  # (B, F, 2)
    r = a["radius"][:, None, None]
    assert bool(((centre - r) >= data.MARGIN - 1e-4).all() and ((centre + r) <= 128 - data.MARGIN + 1e-4).all())
    assert a["radius"].min() >= 18 and a["radius"].max() <= 24
    assert a["speed"].min() >= 2.5 and a["speed"].max() <= 4.0
    # the rendered border stays black, and every frame shows the object
    v, _, _ = data.sample_batch(48, g, "all")
    assert v.shape == (48, 3, 17, 128, 128) and v.min() == -1 and v.max() == 1
    border = torch.cat([v[..., 0, :], v[..., -1, :], v[..., :, 0], v[..., :, -1]], dim=-1)
    assert bool((border == -1).all())
    assert bool(((v > -1).any(dim=1).flatten(2).any(dim=2)).all())


def _analytic(attrs, frames=17):
    """Area and area-centroid of each object at each frame, from the geometry alone."""
    r, s = attrs["radius"].double(), attrs["shape"]
    area = torch.stack([math.pi * r ** 2, (2 * data.SQUARE_HALF_SIDE * r) ** 2, 2 * r ** 2])[s, torch.arange(len(s))]
    t = torch.arange(frames, dtype=torch.float64)
    step = attrs["speed"].double()[:, None] * data.DIRECTION_VECTORS.double()[attrs["direction"]]  # (B, 2)
    centre = attrs["start_xy"].double()[:, None] + t[None, :, None] * step[:, None]  # (B, F, 2)
    centre[:, :, 1] += torch.where(s == 2, r / 3, 0.0)[:, None]  # a triangle's centroid: a third up from its base
    return area, centre


def test_render_area_centroid_and_colour_follow_the_geometry():
    g = torch.Generator().manual_seed(2)
    a = data.sample_attributes(24, g, "all")
    v = data.render_videos(a["colour"], a["shape"], a["direction"], radius=a["radius"], start_xy=a["start_xy"],
                           speed=a["speed"])
    coverage = ((v + 1) / 2).amax(dim=1).double()  # (B, F, H, W): every palette colour has a channel at 1
    area, centre = _analytic(a)
    got_area = coverage.sum(dim=(2, 3))
    # the 1-px anti-aliased ramp integrates to the exact area up to curvature terms (<0.5% here)
    assert torch.allclose(got_area, area[:, None].expand_as(got_area), rtol=5e-3)
    xs = torch.arange(128, dtype=torch.float64) + 0.5
    cx = (coverage.sum(dim=2) * xs).sum(-1) / got_area
    cy = (coverage.sum(dim=3) * xs).sum(-1) / got_area
    assert torch.allclose(torch.stack([cx, cy], -1), centre, atol=0.05)
    inside = coverage == 1
    for b in range(24):  # fully covered pixels carry exactly the palette colour
        rgb = v[b][:, inside[b]]  # (3, n)
        assert torch.equal(rgb, (2 * data.PALETTE[a["colour"][b]] - 1)[:, None].expand_as(rgb))


def _supersampled(shape, cx, cy, r, size=128, k=8):
    """Fraction of k x k sub-samples per pixel inside the shape: an independent point-in-shape test."""
    sub = (torch.arange(size * k, dtype=torch.float64) + 0.5) / k
    x, y = sub.view(1, -1) - cx, sub.view(-1, 1) - cy
    if shape == "circle":
        inside = x ** 2 + y ** 2 <= r ** 2
    elif shape == "square":
        inside = (x.abs() <= 0.9 * r) & (y.abs() <= 0.9 * r)
    else:  # apex (0, -r), base from (-r, r) to (r, r): |x| <= r (y + r) / (2 r) below the apex, above the base
        inside = (y <= r) & (x.abs() <= (y + r) / 2)
    return inside.double().view(size, k, size, k).mean(dim=(1, 3))


@pytest.mark.parametrize("shape", data.SHAPES)
def test_render_matches_supersampled_geometry(shape):
    cx, cy, r = 57.3, 70.8, 21.4
    v = data.render_videos(torch.tensor([6]), torch.tensor([data.SHAPES.index(shape)]), torch.tensor([1]),
                           radius=r, start_xy=torch.tensor([[cx, cy]]), speed=3.0, frames=1)
    got = ((v[0, 0, 0] + 1) / 2).double()
    ref = _supersampled(shape, cx, cy, r)
    # signed-distance anti-aliasing approximates the box-filtered coverage: equal away from the edges,
    # within a fraction of a pixel on them (the reference itself is quantised to 1/8 per axis)
    diff = (got - ref).abs()
    assert float(diff.max()) < 0.25 and float(diff.mean()) < 1e-3
    assert abs(float(got.sum() / ref.sum()) - 1) < 5e-3
    assert bool((diff[(ref == 0) | (ref == 1)] < 0.25).all())


# ----------------------------------------------------------------------------- detector


def _bfs_largest(fg, min_area):
    """Reference for the blob finder: breadth-first search, 8-connectivity, largest blob per frame."""
    out = np.zeros_like(fg)
    for n in range(fg.shape[0]):
        seen = np.zeros(fg.shape[1:], bool)
        best = []
        for i, j in zip(*np.nonzero(fg[n])):
            if seen[i, j]:
                continue
            blob, queue = [], deque([(i, j)])
            seen[i, j] = True
            while queue:
                p, q = queue.popleft()
                blob.append((p, q))
                for dp in (-1, 0, 1):
                    for dq in (-1, 0, 1):
                        a, b = p + dp, q + dq
                        if 0 <= a < fg.shape[1] and 0 <= b < fg.shape[2] and fg[n, a, b] and not seen[a, b]:
                            seen[a, b] = True
                            queue.append((a, b))
            if len(blob) > len(best):
                best = blob
        if len(best) >= min_area:
            for p, q in best:
                out[n, p, q] = True
    return out


def _dense(fg, kept_fn):
    """Run a detector step that works on pixel lists on a dense (N, H, W) mask, and return a dense mask."""
    N, H, W = fg.shape
    frame, pix = fg.reshape(N, H * W).nonzero(as_tuple=True)
    kept = kept_fn(frame, pix, (N, H, W))
    out = torch.zeros(N * H * W, dtype=torch.bool)
    out[frame[kept] * H * W + pix[kept]] = True
    return out.view(N, H, W)


def _largest(frame, pix, shape, min_area):
    return detector._largest_blobs(detector._neighbours(frame, pix, shape), frame, shape[0], min_area)


def test_largest_blob_matches_breadth_first_search():
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(12, 40, 50, generator=g) < torch.linspace(0.3, 0.7, 12).view(12, 1, 1)  # sparse .. percolating
    got = _dense(fg, lambda f, p, shape: _largest(f, p, shape, 5)).numpy()
    ref = _bfs_largest(fg.numpy(), 5)
    assert (got.sum(axis=(1, 2)) == ref.sum(axis=(1, 2))).all()  # same size (a tie may pick another blob)
    assert got.sum() > 0 and (got <= fg.numpy()).all()
    assert not _dense(fg, lambda f, p, shape: _largest(f, p, shape, 10 ** 6)).any()  # nothing reaches min_area


def test_opening_matches_dense_morphology():
    g = torch.Generator().manual_seed(1)
    fg = torch.rand(6, 30, 40, generator=g) < torch.linspace(0.5, 0.9, 6).view(6, 1, 1)
    x = fg[:, None].float()
    eroded = -F.max_pool2d(-F.pad(x, (1, 1, 1, 1), value=0.0), 3, stride=1)  # outside the frame counts as empty
    ref = F.max_pool2d(eroded, 3, stride=1, padding=1)[:, 0] > 0.5
    assert torch.equal(_dense(fg, lambda f, p, shape: detector._open(detector._neighbours(f, p, shape))), ref)


@pytest.fixture(scope="module")
def samples():
    """Attributes and captions of 201 videos, a third from each split; rendered in chunks when used."""
    g = torch.Generator().manual_seed(123)
    parts = [data.sample_attributes(67, g, split) for split in ("train", "heldout", "all")]
    attrs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    captions = [data.caption(*t) for t in zip(attrs["colour"].tolist(), attrs["shape"].tolist(),
                                              attrs["direction"].tolist())]
    return attrs, captions


def _rendered(attrs, chunk=32):
    for i in range(0, len(attrs["colour"]), chunk):
        a = {k: v[i:i + chunk] for k, v in attrs.items()}
        yield i, data.render_videos(a["colour"], a["shape"], a["direction"], radius=a["radius"],
                                    start_xy=a["start_xy"], speed=a["speed"])


def _vae_like(v, generator, brightness=None, noise=0.05):
    """What a VAE might return: dimmed (per video), 3x3 box blur per frame, gaussian noise (std `noise` on
    the 0..1 scale). In place on `v`, for speed: shifted sums of the video + 1, whose background is 0."""
    u = v.add_(1)  # 0..2, black = 0, so the zero padding at the frame border is black
    if brightness is not None:
        u.mul_(brightness.view(-1, 1, 1, 1, 1))
    for dim in (-1, -2):  # separable box blur: u[i - 1] + u[i] + u[i + 1], then / 3
        s = u.clone()
        s.narrow(dim, 1, u.shape[dim] - 1).add_(u.narrow(dim, 0, u.shape[dim] - 1))
        s.narrow(dim, 0, u.shape[dim] - 1).add_(u.narrow(dim, 1, u.shape[dim] - 1))
        u = s.div_(3)
    return u.sub_(1).add_(torch.randn(u.shape, generator=generator), alpha=2 * noise).clamp_(-1, 1)


def test_detector_reads_clean_videos_perfectly(samples):
    attrs, captions = samples
    assert len(captions) >= 200
    detections = [d for _, v in _rendered(attrs) for d in detector.detect_batch(v)]
    result = detector.score(detections, captions)
    assert result == dict(colour_acc=1.0, shape_acc=1.0, direction_acc=1.0, all_acc=1.0, n=len(captions))


def test_detector_survives_blur_noise_and_dimming(samples):
    attrs, captions = samples
    keep = torch.cat([torch.arange(40) + 67 * k for k in range(3)])  # 40 videos of each split
    attrs, captions = {k: v[keep] for k, v in attrs.items()}, [captions[i] for i in keep]
    g = torch.Generator().manual_seed(0)
    dim = torch.arange(len(captions)) % 3 == 0  # a third as from a VAE that has not learnt full brightness
    detections = []
    for i, v in _rendered(attrs):
        brightness = 1 - 0.5 * dim[i:i + len(v)].float()
        detections += detector.detect_batch(_vae_like(v, g, brightness))
    result = detector.score(detections, captions)
    assert min(result["colour_acc"], result["shape_acc"], result["direction_acc"]) >= 0.98, result
    dimmed = detector.score([d for d, m in zip(detections, dim) if m], captions[::3])
    assert min(dimmed["colour_acc"], dimmed["shape_acc"], dimmed["direction_acc"]) >= 0.98, dimmed


def test_detector_inputs_masks_and_empty_videos(samples):
    attrs, captions = samples
    _, v = next(_rendered({k: x[:2] for k, x in attrs.items()}))
    video = v[1]
    as_uint8 = ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (F, H, W, 3)
    d_float, d_uint8 = detector.detect(video), detector.detect(as_uint8)
    assert (d_float.colour, d_float.shape, d_float.direction) == data.parse_caption(captions[1])
    assert (d_uint8.colour, d_uint8.shape, d_uint8.direction) == (d_float.colour, d_float.shape, d_float.direction)
    m_tensor, m_numpy = detector.object_masks(video), detector.object_masks(as_uint8)
    assert isinstance(m_tensor, torch.Tensor) and isinstance(m_numpy, np.ndarray)
    assert m_tensor.shape == m_numpy.shape == (17, 128, 128) and m_tensor.dtype == torch.bool
    half = ((video + 1) / 2).amax(dim=0) > 0.5  # the object's half-coverage region
    iou = (m_tensor & half).sum() / (m_tensor | half).sum()
    assert float(iou) > 0.97
    empty = torch.full((3, 17, 128, 128), -1.0)
    d = detector.detect(empty)
    assert (d.colour, d.shape, d.direction) == (None, None, None) and not detector.object_masks(empty).any()
    assert detector.score([d], ["a red circle moving up"])["all_acc"] == 0.0
    with pytest.raises(ValueError, match=r"float frames must be \(3, F, H, W\)"):
        detector.detect(video.permute(1, 2, 3, 0))
    with pytest.raises(ValueError, match=r"uint8 frames must be \(F, H, W, 3\)"):
        detector.detect(torch.from_numpy(as_uint8).permute(3, 0, 1, 2).contiguous())
    with pytest.raises(ValueError, match="one caption per detection"):
        detector.score([d], [])


def test_score_counts_each_attribute():
    dets = [detector.Detection("red", "circle", "left"), detector.Detection("red", "square", "up"),
            detector.Detection("blue", "circle", None), detector.Detection(None, None, None)]
    caps = ["a red circle moving left", "a red circle moving up", "a red circle moving down", "a red circle moving up"]
    assert detector.score(dets, caps) == dict(colour_acc=0.5, shape_acc=0.5, direction_acc=0.5, all_acc=0.25, n=4)


# ----------------------------------------------------------------------------- tokenizer



def _template_tokens(text):
    """Independent reading of a template: special tokens whole, then lower-cased words, digits, punctuation."""
    out = []
    for piece in re.split(r"(<\|[a-z_]+\|>)", text):
        if re.fullmatch(r"<\|[a-z_]+\|>", piece):
            out.append(piece)
        else:
            out += re.findall(r"[a-z]+|\d|[^\sa-z\d]", piece.lower())
    return out


def test_committed_tokenizer_equals_a_fresh_build(tmp_path):
    fresh_dir = tmp_path / "tok"
    toy_tok.build_toy_tokenizer(save_dir=fresh_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((toy_tok.TOKENIZER_DIR / name).read_text()) == json.loads((fresh_dir / name).read_text())
    committed, fresh = (json.loads((d / "tokenizer.json").read_text()) for d in (toy_tok.TOKENIZER_DIR, fresh_dir))
    for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor"):
        assert committed[key] == fresh[key], key
    assert list(committed["model"]["vocab"]) == toy_tok.toy_vocabulary()
    assert toy_tok.toy_vocabulary() == toy_tok.toy_vocabulary()  # deterministic


def test_tokenizer_covers_captions_and_template():
    tok = toy_tok.load_toy_tokenizer()
    vocab = tok.get_vocab()
    assert len(tok) == len(vocab) < 300
    for c, s, d in data.ALL_COMBOS:
        cap = data.caption(c, s, d)
        ids = tok(cap)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids[1:]) == cap.split()
        assert tok.decode(ids, skip_special_tokens=True) == cap
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    for key, template in prompts.PROMPT_TEMPLATE.items():
        text = template["template"]
        ids = tok(text.replace("{}", "a red circle moving right"))["input_ids"]
        assert tok.unk_token_id not in ids, key
        expected = ["<|begin_of_text|>"] + _template_tokens(text.replace("{}", " a red circle moving right "))
        assert tok.convert_ids_to_tokens(ids) == expected
        prefix = text.split("{}")[0]
        assert prompts.derive_crop_start(tok, template) == 1 + len(_template_tokens(prefix))  # BOS counted
    ids = tok("a Violet zebra moving right")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|begin_of_text|>", "a", "<unk>", "<unk>", "moving", "right"]
    enc = tok(["a red circle moving up", "a square"], padding="max_length", max_length=8)
    assert enc["input_ids"][1][3:] == [tok.pad_token_id] * 5 and enc["attention_mask"][1] == [1, 1, 1] + [0] * 5


def test_clip_flavour_shares_ids_and_wraps_like_clip():
    llm, clip = toy_tok.load_toy_tokenizer(), toy_tok.load_toy_tokenizer(kind="clip")
    assert llm.get_vocab() == clip.get_vocab()
    enc = clip("a red circle moving up", padding="max_length", max_length=10)
    tokens = clip.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["<|startoftext|>", "a", "red", "circle", "moving", "up"] + ["<|endoftext|>"] * 4
    assert enc["attention_mask"] == [1] * 7 + [0] * 3
    assert llm("a red circle")["input_ids"][1:] == clip("a red circle")["input_ids"][1:-1]
    with pytest.raises(ValueError, match="kind must be 'llm'"):
        toy_tok.load_toy_tokenizer(kind="t5")


def test_saved_folder_loads_with_auto_tokenizer():
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(toy_tok.TOKENIZER_DIR))
    ours = toy_tok.load_toy_tokenizer()
    text = prompts.apply_template("a cyan triangle moving down", prompts.PROMPT_TEMPLATE["dit-llm-encode-video"])
    assert auto(text)["input_ids"] == ours(text)["input_ids"]
    assert (auto.bos_token, auto.eos_token, auto.pad_token, auto.unk_token, auto.padding_side) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<unk>", "right")


# ----------------------------------------------------------------------------- two objects


def test_pair_splits_follow_the_rule_and_keep_every_appearance_colour_and_shape_pair_trained():
    assert len(data.ALL_PAIRS) == 2268 and len(data.HELDOUT_PAIRS) == 612 and len(data.TRAIN_PAIRS) == 1656
    assert set(data.HELDOUT_PAIRS).isdisjoint(data.TRAIN_PAIRS)
    assert set(data.HELDOUT_PAIRS) | set(data.TRAIN_PAIRS) == set(data.ALL_PAIRS)
    train = set(data.TRAIN)
    for a, b in data.ALL_PAIRS:  # seen triples only, differing in colour and in shape
        assert a in train and b in train and a[0] != b[0] and a[1] != b[1]
        expected = "heldout" if (a[0] + a[1] + b[0] + b[1]) % 4 == 0 else "train"
        assert data.pair_split_of(a, b) == data.pair_split_of(b, a) == expected
        assert (b, a) in data.ALL_PAIRS  # both caption orders
    # held out: the appearances (colour, shape), whatever the directions: those two never share a training video
    held_apps = {frozenset((a[:2], b[:2])) for a, b in data.HELDOUT_PAIRS}
    train_apps = {frozenset((a[:2], b[:2])) for a, b in data.TRAIN_PAIRS}
    assert len(held_apps) == 34 and len(held_apps | train_apps) == 126 and held_apps.isdisjoint(train_apps)
    # composition: every appearance, colour pair and shape pair still occurs in training
    assert {x for a, b in data.TRAIN_PAIRS for x in (a[:2], b[:2])} == {(c, s) for c in range(7) for s in range(3)}
    assert {frozenset((a[0], b[0])) for a, b in data.TRAIN_PAIRS} == {frozenset((i, j)) for i in range(7)
                                                                      for j in range(7) if i != j}
    assert {frozenset((a[1], b[1])) for a, b in data.TRAIN_PAIRS} == {frozenset((i, j)) for i in range(3)
                                                                      for j in range(3) if i != j}
    with pytest.raises(ValueError, match="differ in colour and in shape"):
        data.pair_split_of(("red", "circle", "left"), ("red", "square", "up"))
    with pytest.raises(ValueError, match="seen triples only"):
        data.pair_split_of(("red", "circle", "left"), ("green", "square", "up"))  # (1, 1, 2): held out
    g = torch.Generator().manual_seed(0)
    for split in ("train", "heldout"):
        a = data.sample_pair_attributes(3000, g, split)
        drawn = {tuple(map(tuple, p)) for p in torch.stack([a["colour"], a["shape"], a["direction"]], -1).tolist()}
        assert drawn <= set(data.PAIR_SPLITS[split]) and len(drawn) > 0.8 * len(data.PAIR_SPLITS[split])


def test_pair_captions_round_trip():
    text = data.pair_caption(("red", "circle", "left"), (2, 1, 2))
    assert text == "a red circle moving left and a blue square moving up"
    assert data.parse_scene(text) == [("red", "circle", "left"), ("blue", "square", "up")]
    assert data.parse_scene(" A Red circle moving LEFT ") == [("red", "circle", "left")]
    with pytest.raises(ValueError, match="one or two objects, got 3"):
        data.parse_scene(f"{text} and a green triangle moving down")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        data.parse_scene("a red circle moving left and a blue hexagon moving up")
    assert len(set(data.world_captions("two-object"))) == 63 + 1656
    assert data.world_captions("one-object") == [data.caption(*t) for t in data.TRAIN]


def test_pairs_stay_apart_inside_the_frame_and_render_as_the_two_objects_alone():
    g = torch.Generator().manual_seed(11)
    a = data.sample_pair_attributes(2000, g, "all")
    gap = data.pair_gap(a["radius"], a["speed"], a["start_xy"], a["direction"])
    assert float(gap.min()) >= data.PAIR_GAP
    # the same, recomputed frame by frame from the boxes (every shape fits in its +-r box)
    t = torch.arange(17.0)
    centre = a["start_xy"][:, :, None] + t[None, None, :, None] * (
        a["speed"][..., None, None] * data.DIRECTION_VECTORS[a["direction"]][:, :, None])  # (B, 2, F, 2)
    r = a["radius"][..., None, None]
    lo, hi = centre - r, centre + r
    apart = torch.maximum(lo[:, 1] - hi[:, 0], lo[:, 0] - hi[:, 1]).amax(-1)  # (B, F): gap along x or y
    assert float(apart.min()) >= data.PAIR_GAP - 1e-4
    assert bool((lo >= data.MARGIN - 1e-4).all() and (hi <= 128 - data.MARGIN + 1e-4).all())
    assert a["radius"].min() >= data.PAIR_RADIUS_RANGE[0] and a["radius"].max() <= data.PAIR_RADIUS_RANGE[1]
    # a pair video is each object rendered alone, combined (they never touch, so max is exact)
    a = {k: v[:12] for k, v in a.items()}
    both = data.render_videos(a["colour"], a["shape"], a["direction"], radius=a["radius"], start_xy=a["start_xy"],
                              speed=a["speed"])
    alone = [data.render_videos(a["colour"][:, k], a["shape"][:, k], a["direction"][:, k], radius=a["radius"][:, k],
                                start_xy=a["start_xy"][:, k], speed=a["speed"][:, k]) for k in range(2)]
    assert torch.equal(both, torch.maximum(*alone))
    assert bool(((alone[0] > -1) & (alone[1] > -1)).sum() == 0)  # disjoint, rims included
    # deterministic per seed
    v1, c1, _ = data.sample_batch(5, torch.Generator().manual_seed(3), "heldout", objects=2)
    v2, c2, _ = data.sample_batch(5, torch.Generator().manual_seed(3), "heldout", objects=2)
    assert torch.equal(v1, v2) and c1 == c2 and all(data.pair_split_of(*data.parse_scene(c)) == "heldout" for c in c1)
    item = data.SyntheticShapes("heldout", length=4, seed=1, objects=2)[2]
    assert item["video"].shape == (3, 17, 128, 128) and item["colour"].shape == (2,)
    with pytest.raises(ValueError, match="objects must be 1 or 2"):
        data.sample_batch(2, None, objects=3)
    with pytest.raises(ValueError, match=r"start_xy must be \(2, 2, 2\)"):
        data.render_videos(a["colour"][:2], a["shape"][:2], a["direction"][:2], radius=a["radius"][:2],
                           start_xy=a["start_xy"][:2, 0], speed=a["speed"][:2])


def test_world_batches_and_ground_truth_renders():
    g = torch.Generator().manual_seed(0)
    videos, captions = data.sample_world_batch(8, g, "two-object", pair_fraction=0.25)
    assert videos.shape == (8, 3, 17, 128, 128)
    assert [len(data.parse_scene(c)) for c in captions] == [1] * 6 + [2] * 2
    _, one = data.sample_world_batch(4, g, "one-object")
    assert all(" and " not in c for c in one)
    with pytest.raises(ValueError, match="world must be one of one-object, two-object"):
        data.sample_world_batch(2, g, "three-object")
    caps = ["a red circle moving left and a blue square moving up", "a green triangle moving down"]
    v = data.render_captions(caps, torch.Generator().manual_seed(1))
    assert v.shape == (2, 3, 17, 128, 128)
    scene = detector.detect_scene(v[0], caps[0])
    assert [(d.colour, d.shape, d.direction) for d in scene] == data.parse_scene(caps[0])
    d = detector.detect(v[1])
    assert (d.colour, d.shape, d.direction) == ("green", "triangle", "down")
    with pytest.raises(ValueError, match="differ in colour and in shape"):
        data.render_captions(["a red circle moving left and a red square moving up"])


@pytest.fixture(scope="module")
def pair_samples():
    g = torch.Generator().manual_seed(321)
    parts = [data.sample_pair_attributes(30, g, split) for split in ("train", "heldout")]
    attrs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    triples = torch.stack([attrs["colour"], attrs["shape"], attrs["direction"]], -1).tolist()
    return attrs, [data.pair_caption(*p) for p in triples]


def test_pair_detector_reads_clean_and_vae_like_videos(pair_samples):
    attrs, captions = pair_samples
    v = data.render_videos(attrs["colour"], attrs["shape"], attrs["direction"], radius=attrs["radius"],
                           start_xy=attrs["start_xy"], speed=attrs["speed"])
    scenes = [detector.detect_scene(video, c) for video, c in zip(v, captions)]
    result = detector.score_scenes(scenes, captions)
    assert (result["colour_acc"], result["shape_acc"], result["direction_acc"], result["all_acc"]) == (1, 1, 1, 1)
    assert result["objects"] == 120 and [p["objects"] for p in result["by_position"]] == [60, 60]
    # each object's mask is its own half-coverage region, from colour alone
    for b in range(0, 60, 7):
        for k, det in enumerate(scenes[b]):
            alone = data.render_videos(attrs["colour"][b:b + 1, k], attrs["shape"][b:b + 1, k],
                                       attrs["direction"][b:b + 1, k], radius=attrs["radius"][b:b + 1, k],
                                       start_xy=attrs["start_xy"][b:b + 1, k], speed=attrs["speed"][b:b + 1, k])
            half = ((alone[0] + 1) / 2).amax(dim=0) > 0.5
            assert float((det.mask & half).sum() / (det.mask | half).sum()) > 0.95
    g = torch.Generator().manual_seed(0)
    dim = torch.arange(60) % 3 == 0
    blurred = _vae_like(v, g, 1 - 0.5 * dim.float())
    result = detector.score_scenes([detector.detect_scene(x, c) for x, c in zip(blurred, captions)], captions)
    assert min(result["colour_acc"], result["shape_acc"], result["direction_acc"]) >= 0.98, result


def test_pair_detector_assigns_by_colour_and_scores_missing_objects_as_wrong(pair_samples):
    attrs, captions = pair_samples
    b = 0
    v = data.render_videos(attrs["colour"][b:b + 1], attrs["shape"][b:b + 1], attrs["direction"][b:b + 1],
                           radius=attrs["radius"][b:b + 1], start_xy=attrs["start_xy"][b:b + 1],
                           speed=attrs["speed"][b:b + 1])[0]
    first, second = data.parse_scene(captions[b])
    swapped = data.pair_caption(second, first)  # the same video, objects named in the other order
    scene = detector.detect_scene(v, swapped)
    assert [(d.colour, d.shape, d.direction) for d in scene] == [second, first]
    # one object only: the other caption object gets None and scores wrong on all three attributes
    alone = data.render_videos(attrs["colour"][b:b + 1, 0], attrs["shape"][b:b + 1, 0], attrs["direction"][b:b + 1, 0],
                               radius=attrs["radius"][b:b + 1, 0], start_xy=attrs["start_xy"][b:b + 1, 0],
                               speed=attrs["speed"][b:b + 1, 0])[0]
    scene = detector.detect_scene(alone, captions[b])
    assert scene[1] is None and (scene[0].colour, scene[0].shape) == first[:2]
    r = detector.score_scenes([scene], [captions[b]])
    assert (r["colour_acc"], r["shape_acc"], r["direction_acc"], r["all_acc"]) == (0.5, 0.5, 0.5, 0.0)
    # a wrong colour still leaves its shape and direction to be scored: the odd one out takes the leftover slot
    dets = [detector.Detection("cyan", "square", "up"), detector.Detection("red", "circle", "left")]
    aligned = detector.assign_by_colour(dets, [("red", "circle", "left"), ("blue", "square", "up")])
    assert [d.colour for d in aligned] == ["red", "cyan"]
    r = detector.score_scenes([aligned], ["a red circle moving left and a blue square moving up"])
    assert (r["colour_acc"], r["shape_acc"], r["direction_acc"]) == (0.5, 1.0, 1.0)
    assert r["by_position"][1] == dict(colour_acc=0.0, shape_acc=1.0, direction_acc=1.0, objects=1)
    assert detector.detect_objects(torch.full((3, 17, 128, 128), -1.0)) == []
    with pytest.raises(ValueError, match="has 2 objects but its scene lists 1"):
        detector.score_scenes([[None]], [captions[0]])


def test_tokenizer_reads_two_object_captions_whole():
    from hvlab.toy.model import TOY_LLM

    tok = toy_tok.load_toy_tokenizer()
    assert "and" in tok.get_vocab()  # part of the vocabulary since the first build: no id moved
    for text in data.world_captions("two-object")[::97] + [data.pair_caption(*data.HELDOUT_PAIRS[0])]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.convert_ids_to_tokens(ids[1:]) == text.split()
        # the prompt and the template's closing <|eot_id|> fit in the LLM's max_length: nothing truncated
        assert len(ids) - 1 + 1 <= TOY_LLM["max_length"]
