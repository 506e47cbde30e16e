"""Output-space concept maps (hvlab.inspection.concepts): they watch the generation without touching it.

The concept stream reads the video and is never read back, so a video generated under the recorder must be
bit for bit the plain one; and the concepts' attention, done head by head without an L x L tensor, must equal
the explicit softmax over the joint [concepts | video] sequence with the video's queries masked out of it.
"""
import pytest
import torch

from hvlab.attention import attention_explicit
from hvlab.inspection.concepts import ConceptRecorder, concept_attention


def test_concept_attention_equals_the_explicit_softmax_over_concepts_and_video():
    g = torch.Generator().manual_seed(0)
    B, N, L, nh, hd = 2, 3, 20, 2, 8
    q_c, k_c, v_c = (torch.randn(B, N, nh, hd, generator=g) for _ in range(3))
    q_v, k_v, v_v = (torch.randn(B, L, nh, hd, generator=g) for _ in range(3))
    out = concept_attention(q_c, k_c, v_c, k_v, v_v)
    # the joint sequence [concepts | video]: a concept query's row of the full softmax is exactly its output
    joint, _ = attention_explicit(torch.cat([q_c, q_v], 1), torch.cat([k_c, k_v], 1), torch.cat([v_c, v_v], 1),
                                  img_len=N + L, return_probs=False)
    torch.testing.assert_close(out, joint[:, :N], rtol=1e-5, atol=1e-6)  # float32: SDPA vs einsum order only
    # and it does read the video: changing one video value changes the concepts' output
    v_v2 = v_v.clone()
    v_v2[:, 3] += 10
    assert not torch.allclose(concept_attention(q_c, k_c, v_c, k_v, v_v2), out)


@pytest.fixture(scope="module")
def toy():
    import hvlab

    return hvlab.load_toy()


def test_the_video_is_bit_identical_with_and_without_concept_maps(toy):
    kw = dict(seed=3, num_inference_steps=4)
    plain = toy("a red circle moving right", **kw).videos
    with ConceptRecorder(toy, ["red", "circle", "triangle"], steps=[1, 3]) as rec:
        watched = toy("a red circle moving right", **kw).videos
    assert torch.equal(plain, watched)
    maps = rec.maps()
    n_blocks = len(toy.transformer.double_blocks) + len(toy.transformer.single_blocks)
    assert maps.maps.shape == (2, n_blocks, 1, 3, 5, 8, 8) and maps.labels == ["red", "circle", "triangle"]
    assert maps.steps == [1, 3] and torch.isfinite(maps.maps).all() and maps.maps.abs().sum() > 0
    soft = rec.maps(softmax=True)
    torch.testing.assert_close(soft.maps.sum(3), torch.ones_like(soft.maps.sum(3)))  # a distribution over concepts
    # the recorder is gone after `with`: the blocks' attention is the original function again
    assert all(not hasattr(b.attn_fn, "__wrapped__") for b in [*toy.transformer.double_blocks,
                                                                 *toy.transformer.single_blocks])


def test_concept_maps_only_for_the_rows_of_the_prompt_under_cfg(toy):
    """With CFG the DiT batch is [negative | prompt]: the maps are of the prompt's rows only, one per video."""
    with ConceptRecorder(toy, ["blue"], steps=[0], blocks=[("single", -1)]) as rec:
        toy(["a blue square moving up", "a red circle moving left"], seed=0, num_inference_steps=2)
    assert rec.rows == [2, 3] and rec.records[(0, ("single", 3))].shape[0] == 2


def test_bad_concepts_are_refused_by_name(toy):
    for bad in ([], "red", ["red", " "], [3]):
        with pytest.raises(ValueError, match="concepts must be a non-empty list of words"):
            ConceptRecorder(toy, bad)
    with pytest.raises(IndexError, match="single block index"):
        ConceptRecorder(toy, ["red"], blocks=[("single", 9)])
    rec = ConceptRecorder(toy, ["red"])
    with pytest.raises(ValueError, match="nothing recorded"):
        rec.maps()
