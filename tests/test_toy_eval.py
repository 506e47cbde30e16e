"""The two-object evaluation: map metrics on maps whose answer is known, the evaluation script on
ground-truth videos (a "pipeline" that renders the prompt), and the cross-attention map source
against the recorder it wraps.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hvlab.toy import data, detector
from hvlab.toy import evaluate as ev
from hvlab.toy import map_metrics as mm

F_, T = 17, 5  # video frames, latent frames


def _box_masks():
    """Two objects filling whole 16 px cells: A on cells (1..2, 2..3), B on cells (5, 6..7), every frame."""
    masks = torch.zeros(2, F_, 128, 128, dtype=torch.bool)
    masks[0, :, 16:48, 32:64] = True
    masks[1, :, 80:96, 96:128] = True
    return masks


def _cell_maps(masks):
    """Each object's coverage on the (T, 8, 8) grid: a map that *is* the mask (constant in time here)."""
    return torch.stack([mm.coverage(m, (8, 8))[::4] for m in masks])  # (2, T, 8, 8)


def _word_maps(per_object):
    return torch.stack([per_object] * 3, dim=1)  # (n_objects, 3 roles, T, h, w): every word the same map


# ---- map metrics ---------------------------------------------------------------------------------------

def test_a_map_equal_to_the_mask_scores_perfectly_and_swapped_maps_score_zero():
    masks = _box_masks()
    maps = _word_maps(_cell_maps(masks))
    right = mm.summarise([mm.binding_scores(maps, list(masks))])
    wrong = mm.summarise([mm.binding_scores(maps.flip(0), list(masks))])
    for role in mm.ROLES:
        assert right[role]["peak_in_own"] == 1.0 and right[role]["peak_in_other"] == 0.0
        assert right[role]["iou"] == 1.0 and right[role]["iou_ceiling"] == 1.0
        assert wrong[role]["peak_in_own"] == 0.0 and wrong[role]["peak_in_other"] == 1.0 and wrong[role]["iou"] == 0.0
        assert right[role]["frames"] == 2 * F_ and right[role]["videos"] == 1
    # two disjoint box maps: their correlation, from its definition
    a, b = maps[0, 0].flatten().double().numpy(), maps[1, 0].flatten().double().numpy()
    assert right["shape"]["correlation"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def test_correlation_matches_numpy_and_its_limits():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 4, T, 8, 8, generator=g)
    got = mm.correlation(x, y)
    ref = [np.corrcoef(x[i].flatten().numpy(), y[i].flatten().numpy())[0, 1] for i in range(4)]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert float(mm.correlation(x[0], x[0])) == pytest.approx(1.0)
    assert float(mm.correlation(x[0], 3 - 2 * x[0])) == pytest.approx(-1.0)
    assert float(mm.correlation(x[0], torch.ones_like(x[0]))) == 0.0  # a flat map correlates with nothing
    with pytest.raises(ValueError, match="same shape"):
        mm.correlation(x[0], x[0, :2])


def test_peak_rule_threshold_and_the_latent_frame_of_each_video_frame():
    masks = _box_masks()
    maps = _cell_maps(masks)[0].clone()  # object A's map, (T, 8, 8)
    # one extra cell at 0.6: still the peak on A; thresholded at half-way it adds one 16 x 16 cell
    maps[:, 7, 0] = 0.6
    iou = mm.frame_iou(maps, masks[0])
    assert torch.allclose(iou, torch.full((F_,), 4 * 256 / (5 * 256)))
    assert bool(mm.peak_hits(maps, masks[0]).all())
    # the peak on a cell the object only grazes (less than half its best cell's coverage) is a miss
    grazed = torch.zeros(F_, 128, 128, dtype=torch.bool)
    grazed[:, 16:48, 32:50] = True  # cells (1..2, 2) full, cells (1..2, 3) covered by 2/16
    peak = torch.zeros(T, 8, 8)
    peak[:, 1, 3] = 1.0
    assert not mm.peak_hits(peak, grazed).any()
    peak[:, 1, 2] = 2.0
    assert bool(mm.peak_hits(peak, grazed).all())
    assert not mm.peak_hits(torch.ones(T, 8, 8), masks[0]).any()  # a flat map peaks nowhere
    # the causal VAE's frame groups: latent frame 0 is video frame 0, latent frame k frames 4k-3 .. 4k
    late = torch.zeros(T, 8, 8)
    late[2] = _cell_maps(masks)[0, 2]  # right only in latent frame 2
    late[[0, 1, 3, 4]] = _cell_maps(masks)[1, 0]  # on B elsewhere
    assert mm.peak_hits(late, masks[0]).nonzero().flatten().tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="multiple of the map grid"):
        mm.peak_hits(torch.zeros(T, 7, 8), masks[0])
    with pytest.raises(ValueError, match="do not group into"):
        mm.peak_hits(torch.zeros(4, 8, 8), masks[0])


def test_only_frames_showing_both_objects_count_and_leading_dims_score_each_map():
    masks = _box_masks()
    masks[1, 10:] = False  # B leaves after frame 9
    maps = _word_maps(_cell_maps(_box_masks()))
    s = mm.summarise([mm.binding_scores(maps, list(masks))])
    assert s["colour"]["frames"] == 2 * 10 and s["colour"]["peak_in_own"] == 1.0
    none = mm.summarise([mm.binding_scores(maps, [masks[0], None])])
    assert none["shape"]["frames"] == 0 and none["shape"]["videos"] == 0 and np.isnan(none["shape"]["correlation"])
    # (steps, blocks) in front: each (step, block) is scored as on its own
    stack = torch.stack([maps, maps.flip(0), maps]).view(3, 1, *maps.shape)  # (S=3, K=1, 2, 3, T, 8, 8)
    grid = mm.summarise([mm.binding_scores(stack, list(masks))] * 2)
    assert grid["shape"]["peak_in_own"].tolist() == [[1.0], [0.0], [1.0]]
    assert grid["shape"]["iou"].shape == (3, 1) and grid["shape"]["frames"] == 2 * 2 * 10
    with pytest.raises(ValueError, match="one mask per object"):
        mm.binding_scores(maps, [masks[0]])


# ---- the evaluation on ground truth -------------------------------------------------------------------

class GroundTruthPipe:
    """Stands in for a pipeline: 'generates' the rendered ground truth of each prompt."""

    defaults = dict(num_inference_steps=3)

    def __call__(self, prompts, seed, **kwargs):
        self.videos = data.render_captions(prompts, torch.Generator().manual_seed(seed))
        return SimpleNamespace(videos=(self.videos + 1) / 2)


def _latent_coverage(mask):
    """(F, H, W) -> (T, 8, 8): each latent frame's mean coverage over the video frames it stands for."""
    cov = mm.coverage(mask, (8, 8))
    group = [-(-f // 4) for f in range(F_)]  # ceil(f / 4)
    return torch.stack([cov[[f for f in range(F_) if group[f] == t]].mean(0) for t in range(T)])


def truth_source(good):
    """A map source whose maps are the objects' own masks at (block, step) == ``good`` and each other's
    everywhere else."""

    class Source:
        def __init__(self, pipe, prompts, blocks, steps):
            self.pipe, self.blocks, self.steps = pipe, blocks, steps

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def word_maps(self, sample, prompt):
            scene = detector.detect_scene(self.pipe.videos[sample], prompt)
            own = torch.stack([_latent_coverage(d.mask) for d in scene])  # (2, T, 8, 8)
            maps = torch.stack([torch.stack([_word_maps(own if (b, s) == good else own.flip(0)) for b in self.blocks])
                                for s in self.steps])
            return maps  # (S, K, 2, 3, T, 8, 8)

    return Source


def test_evaluation_scores_ground_truth_videos_at_100_percent_and_chooses_on_the_selection_prompts():
    blocks, steps = [("double", 0), ("single", 1)], [0, 2]
    good = (("single", 1), 2)
    res = ev.evaluate_pairs(GroundTruthPipe(), n=6, n_select=4, batch=3, sources={"truth": truth_source(good)},
                            blocks=blocks, steps=steps)
    assert (res["colour_acc"], res["shape_acc"], res["direction_acc"], res["all_acc"]) == (1.0, 1.0, 1.0, 1.0)
    assert res["n"] == 6 and res["objects"] == 12
    m = res["maps"]["truth"]
    assert m["chosen"] == "single 1, step 2" and m["selection_prompts"] == 4
    for role in mm.ROLES:
        # latent frames average 4 video frames of motion, so the truth on this grid is nearly, not exactly, 100%
        assert m["report"][role]["peak_in_own"] >= 0.95 and m["report"][role]["peak_in_other"] == 0.0
        assert m["report_grid"]["double 0, step 0"][role]["peak_in_own"] <= 0.05
    assert m["report"]["shape"]["iou"] <= m["report"]["shape"]["iou_ceiling"] + 0.05
    # the reported prompts are held-out pairs, and the selection prompts are other ones
    report, select = ev.pair_prompts("heldout", 6), ev.pair_prompts("heldout", 4, start=6)
    assert not set(report) & set(select) and [e["prompt"] for e in res["examples"]] == report
    assert all(data.pair_split_of(*data.parse_scene(p)) == "heldout" for p in report + select)
    table = ev.format_maps(res["maps"])
    assert "| truth | single 1, step 2 | shape |" in table


def test_word_positions_and_the_command_line_checks():
    assert ev.word_positions("a red circle moving left and a blue square moving up") == [[1, 2, 4], [7, 8, 10]]
    assert ev.word_positions("a red circle moving left") == [[1, 2, 4]]
    kind, fn = ev._load_source("cross=hvlab.toy.evaluate:cross_attention_source")
    assert kind == "cross" and fn is ev.CrossAttentionWords
    with pytest.raises(ValueError, match="KIND=package.module:callable"):
        ev._load_source("sparkle")
    with pytest.raises(SystemExit, match="add --world two-object"):
        ev.main(["--maps", "cross"])
    with pytest.raises(SystemExit, match=r"unknown map kind\(s\) \['sparkle'\]"):
        ev.main(["--world", "two-object", "--maps", "sparkle"])


def test_cross_attention_source_returns_the_recorders_maps_of_each_objects_words():
    from hvlab.inspection import AttentionRecorder
    from hvlab.toy.model import random_toy_pipeline as random_pipeline

    pipe = random_pipeline("tiny", seed=0)
    prompts = ["a red circle moving left and a blue square moving up", "a green triangle moving down and a "
               "white circle moving down"]
    blocks, steps = [("double", 0), ("single", 0)], [1, 3]
    src = ev.cross_attention_source(pipe, prompts, blocks, steps)
    with src:
        pipe(prompts, seed=0)
    with AttentionRecorder(pipe, steps=steps, blocks=blocks, reduce_heads="mean") as rec:
        pipe(prompts, seed=0)
    for b, prompt in enumerate(prompts):
        got = src.word_maps(b, prompt)  # (S, K, 2, 3, T, h, w)
        maps = rec.text_maps(sample=b)
        assert got.shape[:4] == (2, 2, 2, 3)
        words = prompt.split()
        for k, (c, s, d) in enumerate(ev.word_positions(prompt)):
            for r, pos in enumerate((c, s, d)):
                assert words[pos] == data.parse_scene(prompt)[k][r]
                torch.testing.assert_close(got[:, :, k, r], maps.maps[:, :, 0, pos], atol=0, rtol=0)


def test_concept_source_picks_each_objects_own_words_from_the_concept_maps():
    from hvlab.inspection import ConceptRecorder
    from hvlab.toy.model import random_toy_pipeline

    pipe = random_toy_pipeline("tiny", seed=0)
    prompt = "a red circle moving left and a blue square moving up"
    blocks, steps = [("single", 0)], [1]
    src = ev.concept_source(pipe, [prompt], blocks, steps)
    with src:
        pipe(prompt, seed=0, num_inference_steps=3)
    with ConceptRecorder(pipe, src.vocabulary, steps=steps, blocks=blocks) as rec:
        pipe(prompt, seed=0, num_inference_steps=3)
    got = src.word_maps(0, prompt)  # (S, K, 2 objects, 3 roles, T, h, w)
    ref = rec.maps(softmax=True).maps[:, :, 0]
    assert got.shape[:4] == (1, 1, 2, 3)
    for k, words in enumerate([("red", "circle", "left"), ("blue", "square", "up")]):
        for r, w in enumerate(words):
            torch.testing.assert_close(got[:, :, k, r], ref[:, :, src.vocabulary.index(w)], atol=0, rtol=0)
