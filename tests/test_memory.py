"""Token chunking, the memory plan, check_fits, the cuDNN-first SDPA context and the e2e script's quick mode."""
import math

import pytest
import torch
import torch.nn.functional as F

import hvlab.attention as A
from hvlab.fast import accelerate, acceleration, restore
from hvlab.fast.memory import (GiB, MemoryPlanError, check_fits, dit_weight_bytes, estimate_pipeline_memory,
                          trace_dit_block_peaks)
from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoDiffusionTransformer, params_count, randomize_weights_


def _inputs(c, T=2, H=6, W=8, L_txt=7, lens=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    mask = (torch.arange(L_txt)[None] < torch.tensor(lens)[:, None]).float()
    return (torch.randn(B, c.in_channels, T, H, W, generator=g), torch.tensor([900.0, 300.0]),
            torch.randn(B, L_txt, c.text_states_dim, generator=g), mask,
            torch.randn(B, c.text_states_dim_2, generator=g), torch.tensor([6016.0, 6016.0]))


@pytest.mark.parametrize("chunk", [1, 5, 7, 16])
def test_chunked_forward_equals_unchunked(chunk):
    """Chunks that straddle the image/text boundary (L_img = 24, L = 31) change nothing (fp32, <= 1e-6 rel)."""
    model = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed=3).eval()
    inp = _inputs(TINY_CONFIG)
    with torch.no_grad():
        ref = model(*inp)
        accelerate(model, chunk_tokens=chunk)
        assert acceleration(model)["fast_blocks"] == 2 and acceleration(model)["chunk_tokens"] == chunk
        out = model(*inp)
        restore(model)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-6


def test_chunking_is_inference_only_and_validated():
    model = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed=3)
    accelerate(model, chunk_tokens=4)
    inp = _inputs(TINY_CONFIG)
    model(*inp).square().mean().backward()  # unchunked under autograd: gradients flow as usual
    assert model.single_blocks[0].linear1.weight.grad is not None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            accelerate(model, chunk_tokens=bad)


def test_weight_bytes_match_parameter_counts():
    n = params_count(HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta"))["total"]
    assert abs(n - 12.82e9) / 12.82e9 < 0.005  # the release's 12.8B
    assert dit_weight_bytes(HYVIDEO_T2_CONFIG, fp8=False) == 2 * n
    # FP8: the real converted tiny model's bytes (fp8 weights + bf16 rest + fp32 scales) equal the estimate
    from hvlab.fast.fp8 import convert_to_fp8

    tiny = HYVideoDiffusionTransformer(TINY_CONFIG, dtype=torch.bfloat16)
    with pytest.warns(UserWarning):
        convert_to_fp8(tiny, mode="auto")
    real = sum(p.numel() * p.element_size() for p in tiny.parameters())
    real += sum(b.numel() * b.element_size() for n, b in tiny.named_buffers() if n.endswith("weight_scale"))
    assert dit_weight_bytes(TINY_CONFIG, fp8=True) == real
    fp8_full = dit_weight_bytes(HYVIDEO_T2_CONFIG, fp8=True)
    assert 0.51 < fp8_full / (2 * n) < 0.53  # 97.2% of parameters at one byte


def test_traced_block_peaks_are_sane():
    """At 720p, chunking lowers both block peaks; a chunked single block must still hold q, k, v, GELU(mlp_in)
    and the attention output (8 token-widths of D), and not much more."""
    c, L_img, L_txt = HYVIDEO_T2_CONFIG, 118_800, 256
    full = trace_dit_block_peaks(c, L_img, L_txt, None)
    chunked = trace_dit_block_peaks(c, L_img, L_txt, 16384)
    U = full["stream"]
    assert U == (L_img + L_txt) * 3072 * 2
    assert chunked["single"] < full["single"] and chunked["double"] < full["double"]
    assert 8 * U <= chunked["single"] <= 11 * U
    # unchunked: the fused linear1 output alone is 7 widths, its GELU 4 and the concat for linear2 5
    assert full["single"] >= 16 * U


def test_estimate_and_check_fits():
    est = estimate_pipeline_memory(HYVIDEO_T2_CONFIG, 720, 1280, 129, fp8=False, chunk_tokens=None)
    assert est["inputs"]["L_img"] == 118_800
    assert math.isclose(est["parts"]["DiT bf16 weights"], dit_weight_bytes(HYVIDEO_T2_CONFIG, False) / GiB)
    assert est["peak_stage"] == "dit" and est["peak_GiB"] > 24
    with pytest.raises(MemoryPlanError) as e:
        check_fits(est, free_GiB=22.0)
    msg = str(e.value)
    assert "22.0 GiB free" in msg and f"~{est['peak_GiB']:.1f} GiB" in msg and "DiT bf16 weights 23.9" in msg
    assert "--fp8" in msg
    fp8 = estimate_pipeline_memory(HYVIDEO_T2_CONFIG, 720, 1280, 129, fp8=True, chunk_tokens=16384)
    assert fp8["peak_GiB"] < 24 < est["peak_GiB"]
    assert check_fits(fp8, free_GiB=79.0, cap_GiB=24.0) == pytest.approx(24.0 - fp8["peak_GiB"])
    with pytest.raises(MemoryPlanError, match="cap is 16.0"):
        check_fits(fp8, free_GiB=79.0, cap_GiB=16.0)
    with pytest.raises(ValueError, match="multiple of 4, got 130"):
        estimate_pipeline_memory(HYVIDEO_T2_CONFIG, 720, 1280, 130)
    with pytest.raises(ValueError, match="traced settings"):
        estimate_pipeline_memory(HYVIDEO_T2_CONFIG, 720, 1280, 129, vae_tile_px=192)


def test_cudnn_context_on_cpu():
    """The CUDA kernel-order context is harmless on CPU tensors (math stays allowed), and "auto" stays exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=g) for _ in range(3))
    ref = A.attention_explicit(q, k, v, img_len=6, txt_lens=torch.tensor([3, 1]))[0]
    with A.sdpa_priority("cuda"):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, A.attention_explicit(q, k, v, img_len=9)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(A.attention(q, k, v, img_len=6, txt_lens=torch.tensor([3, 1])), ref,
                               atol=1e-6, rtol=1e-5)
    A.set_attention_backend("cudnn")
    try:
        with pytest.raises(ValueError, match="cudnn backend needs CUDA"):
            A.attention(q, k, v, img_len=6)
    finally:
        A.set_attention_backend("auto")


def test_e2e_quick(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "e2e_720p.py"
    spec = importlib.util.spec_from_file_location("e2e_720p", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.warns(UserWarning, match="weight_only"):
        report = mod.main(["--quick", "--cap-gib", "0", "--out", str(tmp_path)])  # the cap acts on CUDA only
    assert len(report["runs"]) == 1 and "error" not in report["runs"][0]
    for r in report["runs"]:
        assert r["video_shape"] == [1, 3, 9, 64, 64] and r["video_finite"] and r["denoise"]["finite"]
        assert len(r["denoise"]["step_s"]) == 2
    assert (tmp_path / "e2e_720p.md").read_text().count("| denoise |") == 1
    assert report["estimate"]["stages_GiB"]["dit"] > 0 and "random" in report["weights"].lower()


def test_block_offloader_same_output_at_most_two_blocks_resident():
    """Each block runs on its device copy, at most two copies exist, outputs are unchanged, and after
    remove() every block holds its host tensors again (on CPU the "device copy" is a clone)."""
    from dataclasses import replace

    from hvlab.fast.offload import BlockOffloader

    c = replace(TINY_CONFIG, mm_double_blocks_depth=2, mm_single_blocks_depth=3)
    model = randomize_weights_(HYVideoDiffusionTransformer(c), seed=5).eval()
    inp = _inputs(c)
    with torch.no_grad():
        ref = model(*inp)
        off = BlockOffloader(model, "cpu")
        host = {h.data_ptr() for entries in off._host for *_, h in entries}
        seen = []
        for b in off.blocks:  # runs after the offloader's pre-hook: the block must hold device copies now
            b.register_forward_pre_hook(lambda m, a: seen.append(all(p.data_ptr() not in host for p in m.parameters())))
        out1, out2 = model(*inp), model(*inp)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    assert len(seen) == 2 * len(off.blocks) and all(seen)
    assert off.max_resident == 2
    off.remove()
    assert all(p.data_ptr() in host for b in off.blocks for p in b.parameters())


def test_e2e_random_llm_materialised_from_meta_matches_a_normally_built_one():
    """The meta -> to_empty path must rebuild RoPE's inv_freq buffer: same weights, same states as LlamaModel()."""
    import importlib.util
    import pathlib

    from transformers import LlamaModel

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "e2e_720p.py"
    spec = importlib.util.spec_from_file_location("e2e_720p", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    enc = mod.random_llm_8b(torch.device("cpu"), 0, **small)
    enc.model.float()
    ref = LlamaModel(enc.model.config).eval()
    ref.load_state_dict(enc.model.state_dict())
    ids = torch.tensor([[1, 50, 900, 7, 3000, 12]])
    out = enc.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)
