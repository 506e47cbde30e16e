"""Modulation and small layers, checked against independent formulas and diffusers' embeddings."""
import math

import torch
import torch.nn.functional as F

from hvlab.blocks import FinalLayer, MMDoubleStreamBlock, MMSingleStreamBlock
from hvlab.modulation import (MLPEmbedder, ModulateDiT, RMSNorm, TimestepEmbedder, apply_gate, chunk_modulation,
                              modulate, timestep_embedding)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 125.0, 997.09, 1000.0])
    ours = timestep_embedding(t, 256)
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # cos first: at t = 0 the first half is all ones and the second all zeros
    assert torch.equal(ours[0, :128], torch.ones(128)) and torch.equal(ours[0, 128:], torch.zeros(128))


def test_timestep_embedding_formula():
    t = torch.tensor([300.0])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [math.cos(300 * f) for f in freqs] + [math.sin(300 * f) for f in freqs]
    # float32 t * omega (~300, one ulp 3e-5) against float64: measured max 1.9e-6 for these four values
    torch.testing.assert_close(emb[0], torch.tensor(expected), atol=5e-6, rtol=0)


def test_rmsnorm_matches_torch_and_computes_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 5, 32) * 30
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-6))
    xb = x.to(torch.bfloat16)
    expected = F.rms_norm(xb.float(), (32,), eps=1e-6).to(torch.bfloat16) * norm.weight
    assert norm(xb).dtype == torch.float32  # bf16 normalised value times an fp32 weight promotes
    torch.testing.assert_close(norm(xb), expected)


def test_modulate_and_gate_broadcast_over_tokens():
    torch.manual_seed(1)
    x, shift, scale, gate = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    for b in range(2):
        for i in range(3):
            torch.testing.assert_close(modulate(x, shift, scale)[b, i], x[b, i] * (1 + scale[b]) + shift[b])
            torch.testing.assert_close(apply_gate(x, gate)[b, i], x[b, i] * gate[b])
    assert torch.equal(modulate(x), x) and torch.equal(apply_gate(x), x)


def test_chunk_modulation_order():
    params = torch.arange(6 * 2 * 4, dtype=torch.float32).reshape(2, 24)
    msa, mlp = chunk_modulation(params, 2)
    torch.testing.assert_close(msa.shift, params[:, 0:4])
    torch.testing.assert_close(msa.gate, params[:, 8:12])
    torch.testing.assert_close(mlp.scale, params[:, 16:20])


def test_zero_init_makes_blocks_identity():
    """adaLN-Zero: with the modulation at zero, every gate is 0 and each block returns its input."""
    torch.manual_seed(2)
    mod = ModulateDiT(16, factor=6)
    assert torch.count_nonzero(mod(torch.randn(3, 16))) == 0
    img, txt, vec = torch.randn(2, 6, 64), torch.randn(2, 3, 64), torch.randn(2, 64)
    out_img, out_txt = MMDoubleStreamBlock(64, 2)(img, txt, vec)
    assert torch.equal(out_img, img) and torch.equal(out_txt, txt)
    x = torch.cat([img, txt], 1)
    assert torch.equal(MMSingleStreamBlock(64, 2)(x, vec, img_len=6), x)
    assert torch.count_nonzero(FinalLayer(64, (1, 2, 2), 16)(img, vec)) == 0


def test_embedders_keys():
    assert set(TimestepEmbedder(8).state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert set(MLPEmbedder(4, 8).state_dict()) == {"in_layer.weight", "in_layer.bias", "out_layer.weight",
                                                   "out_layer.bias"}
    assert set(ModulateDiT(8, 3).state_dict()) == {"linear.weight", "linear.bias"}


def test_timestep_embedder_is_linear_silu_linear():
    torch.manual_seed(3)
    emb = TimestepEmbedder(8, frequency_embedding_size=16)
    t = torch.tensor([10.0, 500.0])
    f = timestep_embedding(t, 16)
    expected = emb.mlp[2](F.silu(emb.mlp[0](f)))
    torch.testing.assert_close(emb(t), expected)
