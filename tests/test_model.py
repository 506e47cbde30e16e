"""The full DiT: size of the 13B release, patchify maths, padding invariance, and errors that teach."""
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hvlab.model import (HYVIDEO_T2_CONFIG, PRESETS, TINY_CONFIG, HYVideoConfig, HYVideoDiffusionTransformer,
                         params_count, patchify, randomize_weights_, unpatchify)

# the release checkpoint's key listing, carried in the repository (a copy of ../shared/reference/dit_release_keys.tsv)
KEYS_TSV = Path(__file__).resolve().parent / "data" / "dit_release_keys.tsv"


def analytic_counts(D=3072, nh=24, ratio=4, n_double=20, n_single=40, C=16, patch=(1, 2, 2), llm=4096, clip=768,
                    refiner=2, freq=256):
    """Parameter count of the DiT from its shapes, written out (Linear: in*out + out)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    hd, M, P = D // nh, int(D * ratio), math.prod(patch)
    timestep_embedder = lin(freq, D) + lin(D, D)
    refiner_block = 2 * 2 * D + lin(D, 3 * D) + lin(D, D) + lin(D, M) + lin(M, D) + lin(D, 2 * D)
    parts = {
        "img_in": C * P * D + D,
        "txt_in": lin(llm, D) + timestep_embedder + lin(llm, D) + lin(D, D) + refiner * refiner_block,
        "time_in": timestep_embedder,
        "vector_in": lin(clip, D) + lin(D, D),
        "guidance_in": timestep_embedder,
        "double": 2 * (lin(D, 6 * D) + lin(D, 3 * D) + 2 * hd + lin(D, D) + lin(D, M) + lin(M, D)),
        "single": lin(D, 3 * D + M) + lin(D + M, D) + 2 * hd + lin(D, 3 * D),
        "final_layer": lin(D, P * C) + lin(D, 2 * D),
    }
    total = sum(v for k, v in parts.items() if k not in ("double", "single"))
    total += n_double * parts["double"] + n_single * parts["single"]
    return parts, total


def test_13b_on_meta_matches_the_release():
    t0 = time.perf_counter()
    model = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta")
    assert time.perf_counter() - t0 < 10
    assert all(p.is_meta for p in model.parameters())  # no weight memory
    parts, total = analytic_counts()
    assert total == 12_821_012_544
    sd = model.state_dict()
    assert len(sd) == 856
    counts = params_count(model)
    assert counts["total"] == total
    # figures from the release notes (reference/hunyuanvideo.md section 1)
    assert parts["double"] == 339_831_296 and parts["single"] == 141_591_808 and parts["txt_in"] == 309_175_296
    assert sum(p.numel() for p in model.double_blocks[0].parameters()) == parts["double"]
    assert sum(p.numel() for p in model.single_blocks[7].parameters()) == parts["single"]
    for name in ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"):
        assert sum(p.numel() for p in getattr(model, name).parameters()) == parts[name], name
    D, M = 3072, 12288
    per_double = 2 * (D * 3 * D + 3 * D + D * D + D + D * M + M + M * D + D)
    per_single = D * (3 * D + M) + 3 * D + M + (D + M) * D + D
    assert counts["double"] == 20 * per_double and counts["single"] == 40 * per_single
    assert counts["attn+mlp"] == counts["double"] + counts["single"]


def test_13b_keys_and_shapes_match_release_list():
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line and not line.startswith("#")]
    expected = {k: tuple(int(n) for n in s.strip("[] ").split(",")) for k, s in rows}
    model = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_preset_aliases_resolve_through_the_one_registry():
    from hvlab.model import PRESET_ALIASES, preset_config

    assert preset_config("13b") is HYVIDEO_T2_CONFIG and preset_config("tiny") is TINY_CONFIG
    assert all(target in PRESETS for target in PRESET_ALIASES.values())
    with pytest.raises(ValueError, match=r"unknown DiT preset '13B'.*HYVideo-T/2-cfgdistill"):
        preset_config("13B")


def test_presets_and_config_validation():
    assert PRESETS["HYVideo-T/2-cfgdistill"] is HYVIDEO_T2_CONFIG and PRESETS["tiny"] is TINY_CONFIG
    tiny = HYVideoDiffusionTransformer(TINY_CONFIG)
    assert len(tiny.double_blocks) and len(tiny.single_blocks) and tiny.guidance_in is not None
    _, total = analytic_counts(D=64, nh=2, n_double=1, n_single=1, llm=32, clip=16)
    assert params_count(tiny)["total"] == total
    with pytest.raises(ValueError, match="divisible by heads_num = 5"):
        HYVideoConfig(hidden_size=64, heads_num=5)
    with pytest.raises(ValueError, match="head_dim = hidden_size / heads_num = 32"):
        HYVideoConfig(hidden_size=64, heads_num=2, rope_dim_list=(16, 56, 56))


def test_patchify_layout_and_inverse():
    torch.manual_seed(0)
    B, C, (T, H, W), (pt, ph, pw) = 2, 3, (2, 3, 4), (1, 2, 2)
    x = torch.randn(B, C, T * pt, H * ph, W * pw)
    tokens = patchify(x, (pt, ph, pw))
    assert tokens.shape == (B, T * H * W, C * pt * ph * pw)
    assert torch.equal(unpatchify(tokens, (T, H, W), (pt, ph, pw), C), x)
    # token (t, h, w) is row (t*H + h)*W + w; feature (c, i, j, k) is ((c*pt + i)*ph + j)*pw + k
    b, c, t, h, w, i, j, k = 1, 2, 1, 2, 3, 0, 1, 0
    row, col = (t * H + h) * W + w, ((c * pt + i) * ph + j) * pw + k
    assert tokens[b, row, col] == x[b, c, t * pt + i, h * ph + j, w * pw + k]
    y = torch.randn(B, T * H * W, C * 8)
    assert torch.equal(patchify(unpatchify(y, (T, H, W), (2, 2, 2), C), (2, 2, 2)), y)


def test_img_in_is_a_linear_map_of_patchify():
    torch.manual_seed(1)
    model = HYVideoDiffusionTransformer(TINY_CONFIG)
    x = torch.randn(2, 16, 3, 4, 6)
    conv = model.img_in(x)
    w = model.img_in.proj.weight.reshape(64, -1)  # (D, C*pt*ph*pw), same (c, pt, ph, pw) order
    # float32 conv vs matmul summation order: measured max 4.8e-7 (outputs ~1)
    torch.testing.assert_close(conv, patchify(x, (1, 2, 2)) @ w.T + model.img_in.proj.bias, atol=1.5e-6, rtol=0)


def _inputs(B=2, L_txt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, 16, 3, 4, 6, generator=g), t=torch.tensor([900.0, 125.0][:B]),
                text_states=torch.randn(B, L_txt, 32, generator=g), text_mask=torch.ones(B, L_txt, dtype=torch.long),
                text_states_2=torch.randn(B, 16, generator=g), guidance=torch.full((B,), 6016.0))


@torch.no_grad()
def test_padded_text_never_changes_the_output():
    model = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG)).eval()
    inp = _inputs(B=1, L_txt=4)
    ref = model(**inp)
    assert ref.abs().mean() > 0.1  # random weights: the output is not trivially zero
    for extra in (1, 5):
        junk = 10 * torch.randn(1, extra, 32)
        padded = dict(inp, text_states=torch.cat([inp["text_states"], junk], 1),
                      text_mask=torch.cat([inp["text_mask"], torch.zeros(1, extra, dtype=torch.long)], 1))
        # measured 0 on the CPU (the real tokens' sums are the same); 1e-6 leaves room for another BLAS
        torch.testing.assert_close(model(**padded), ref, atol=1e-6, rtol=0)


@torch.no_grad()
def test_batch_with_different_lengths_equals_each_sample_alone():
    model = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed=3).eval()
    inp = _inputs(B=2, L_txt=7)
    inp["text_mask"][1, 3:] = 0
    out = model(**inp)
    for b, n in ((0, 7), (1, 3)):
        alone = {k: v[b:b + 1] for k, v in inp.items()}
        alone["text_states"], alone["text_mask"] = alone["text_states"][:, :n], alone["text_mask"][:, :n]
        # a batch of 2 and of 1 sum in other orders: measured max 1.7e-6 on outputs ~1
        torch.testing.assert_close(out[b:b + 1], model(**alone), atol=5e-6, rtol=0)


@torch.no_grad()
def test_bf16_model_close_to_fp32():
    model = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG)).eval()
    model16 = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG, dtype=torch.bfloat16)).eval()
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    inp = _inputs()
    ref = model(**inp)
    inp16 = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("t", "guidance") else v
             for k, v in inp.items()}
    out = model16(**inp16).float()
    assert (out - ref).norm() / ref.norm() < 0.05  # bf16 keeps ~3 significant digits per op


def test_bad_inputs_name_the_expected_values():
    model = HYVideoDiffusionTransformer(TINY_CONFIG)
    inp = _inputs()
    cases = [
        (dict(x=torch.randn(2, 4, 3, 4, 6)), r"C = in_channels = 16, got shape \(2, 4, 3, 4, 6\)"),
        (dict(x=torch.randn(2, 16, 3, 5, 6)), "multiple of the patch size 2 along H.*got H = 5"),
        (dict(text_mask=torch.ones(2, 6)), r"text_mask must be \(B, L_txt\) = \(2, 7\).*got \(2, 6\)"),
        (dict(text_mask=torch.tensor([[1] * 7, [1, 0, 1, 0, 0, 0, 0]])), "contiguous prefix of ones.*row 1"),
        (dict(text_mask=torch.tensor([[1] * 7, [0] * 7])), "at least one valid token"),
        (dict(text_states=torch.randn(2, 7, 31)), r"\(2, L_txt, 32\), got \(2, 7, 31\)"),
        (dict(text_states=torch.randn(3, 7, 32)), r"\(2, L_txt, 32\), got \(3, 7, 32\)"),
        (dict(text_states_2=torch.randn(2, 768)), r"\(B, text_states_dim_2\) = \(2, 16\)"),
        (dict(t=torch.tensor([1.0, 2.0, 3.0])), r"t must be a scalar or \(B,\) = \(2,\)"),
        (dict(guidance=None), "guidance-distilled"),
    ]
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            model(**dict(inp, **change))


def test_explicit_freqs_cis_and_no_guidance_config():
    model = randomize_weights_(HYVideoDiffusionTransformer(replace(TINY_CONFIG, guidance_embed=False))).eval()
    assert model.guidance_in is None
    inp = _inputs()
    inp.pop("guidance")
    with torch.no_grad():
        out = model(**inp)
        out2 = model(**inp, freqs_cis=model.rope((3, 2, 3)))
    torch.testing.assert_close(out, out2)
