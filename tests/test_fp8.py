"""FP8 weights: the e4m3 format, error budgets derived from its 3 mantissa bits, both forwards, the official
checkpoint pair, and the fallback off FP8 hardware. GPU tests run where torch._scaled_mm has FP8 tensor cores.

The error figures all follow from one number. Rounding to nearest with 3 mantissa bits leaves an error
uniform in +-half a step, step = 2^(e-3) for a value in [2^e, 2^(e+1)). Relative to x = 2^e (1 + f), with the
mantissa f distributed as for bell-shaped data (Benford, density 1 / ((1 + f) ln 2)), the RMS relative
error is EPS1 = 2^-3 / sqrt(12) * sqrt(E[(1 + f)^-2]) = 2^-3 / sqrt(12) * sqrt(3 / (8 ln 2)) = 2.654%.
One quantized operand gives a layer EPS1 relative error; two independent ones sqrt(2) * EPS1 = 3.75%. So the
scaled_mm per-layer bound against the *original* bf16 weights is 5e-2 (not 3e-2: two e4m3 operands cannot reach
it, whatever the scaling). Against the bf16 maths on the *same* (dequantized FP8) weights, issue 7's reading of its
3e-2 bar, only the activation's rounding is left: EPS1 = 2.65% <= 3e-2.
"""
import copy
import importlib.util
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvlab.fast import fp8
from hvlab.checkpoint import CheckpointError, load_state_dict_file
from hvlab.fast.fp8 import (E4M3_MAX, FP8_DTYPE, FP8FallbackWarning, FP8Linear, convert_to_fp8, dequantize_weight,
                       emulate_scaled_mm, load_fp8_checkpoint, quantize_weight, save_fp8_checkpoint)
from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoDiffusionTransformer, randomize_weights_

EPS1 = 2**-3 / math.sqrt(12) * math.sqrt(3 / (8 * math.log(2)))  # 0.02654
SCALED_MM_LAYER_TOL = 5e-2  # sqrt(2) * EPS1 = 3.75%, plus margin
MODEL_TOL = 5e-2  # whole tiny model (2 blocks) vs its bf16 self; measured ~3.4%
SAME_WEIGHTS_LAYER_TOL = 3e-2  # scaled_mm vs bf16 maths on the same (dequantized FP8) weights: EPS1 = 2.65%

FP8_GPU, FP8_GPU_WHY = fp8.fp8_supported("cuda") if torch.cuda.is_available() else (False, "no CUDA")
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason=f"needs an FP8 GPU: {FP8_GPU_WHY}")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decode_e4m3(t: torch.Tensor) -> torch.Tensor:
    """Independent decoder of float8_e4m3fn bytes: sign | 4 exponent bits (bias 7) | 3 mantissa bits;
    exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN (the "fn" variant has no infinities)."""
    b = t.view(torch.uint8).long()
    sign = 1 - 2 * ((b >> 7) & 1).double()
    e, m = (b >> 3) & 0xF, (b & 7).double()
    value = torch.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * torch.pow(2.0, (e - 7).double()))
    value = torch.where((e == 15) & (m == 7), torch.full_like(value, float("nan")), value)
    return sign * value


def mlp(d_in=64, hidden=256, d_out=96, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out)).to(torch.bfloat16)


def all_linears(name, module):
    return isinstance(module, nn.Linear)


def model_inputs(cfg, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 12)
    mask[:, :7] = 1
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    ts = torch.randn(1, 12, cfg.text_states_dim, generator=g)
    ts2 = torch.randn(1, cfg.text_states_dim_2, generator=g)
    return [x.to(device, dtype), torch.tensor([500.0], device=device), ts.to(device, dtype), mask.to(device),
            ts2.to(device, dtype), torch.tensor([6016.0], device=device)]


def tiny_model(seed=0):
    return randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed).to(torch.bfloat16).eval()


def cpu_scaled_mm_available(rowwise: bool) -> bool:
    """torch 2.13's CPU build has a _scaled_mm with per-tensor and rowwise scales; 2.11's per-tensor only."""
    a = torch.zeros(16, 16).to(FP8_DTYPE)
    sa, sb = (torch.ones(16, 1), torch.ones(1, 16)) if rowwise else (torch.tensor(1.0), torch.tensor(1.0))
    try:
        torch._scaled_mm(a, a.t(), sa, sb, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------- the format
def test_e4m3_decoder_agrees_with_torch_and_format_facts():
    every = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE)
    ours, theirs = decode_e4m3(every), every.double()
    finite = ~torch.isnan(ours)
    assert torch.equal(torch.isnan(theirs), ~finite) and finite.sum() == 254  # +-NaN only, no infinities
    assert torch.equal(ours[finite], theirs[finite])
    assert ours[finite].max() == E4M3_MAX == torch.finfo(FP8_DTYPE).max
    assert ours[finite][ours[finite] > 0].min() == 2.0**-9  # smallest subnormal


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_error_bound_per_element(per_channel):
    # magnitudes over 8 decades, so normals, subnormals and the top of the range all occur
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.empty(64, 256).uniform_(-9, 9, generator=g))
    w[3] = 0  # an all-zero row (a zero-initialised gate) must not divide by zero
    w_fp8, scale = quantize_weight(w.to(torch.bfloat16), per_channel)
    w = w.to(torch.bfloat16).double()
    assert w_fp8.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == ((64,) if per_channel else ())
    s = scale.double().reshape(-1, 1) if per_channel else scale.double()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    expected = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert ((s - expected).abs() <= 2**-8 * expected).all()  # amax / 448, rounded to bf16 (8 significant bits)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)  # exactly representable in bf16
    deq = decode_e4m3(w_fp8) * s
    assert not torch.isnan(deq).any()
    # round to nearest: half a step = 2^-4 of the value for normals, 2^-10 * scale in the subnormal range;
    # the bf16-rounded scale may saturate the largest element by <= 2^-8, inside the same bound
    bound = torch.maximum(2**-4 * w.abs(), 2**-10 * s.expand_as(w)) * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    top = decode_e4m3(w_fp8).abs().amax(dim=1) if per_channel else decode_e4m3(w_fp8).abs().amax()
    assert (top[top > 0] >= 416).all()  # the range is used: each max lands on one of the top two codes
    assert torch.equal(dequantize_weight(w_fp8, scale, torch.float64), deq)


def test_quantize_rms_error_matches_three_mantissa_bits():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
    w_fp8, scale = quantize_weight(w)
    assert rel(dequantize_weight(w_fp8, scale, torch.float32), w) == pytest.approx(EPS1, rel=0.1)


def test_scale_follows_the_official_bf16_dequantization():
    # the official forward computes w_fp8.to(bf16) * scale.to(bf16); hvlab's fp32 route must give the same weights
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    w_fp8, scale = quantize_weight(w)
    official = w_fp8.to(torch.bfloat16) * scale.to(torch.bfloat16)
    assert torch.equal(dequantize_weight(w_fp8, scale, torch.bfloat16), official)


# ----------------------------------------------------------------------------------------------- forwards
def test_weight_only_forward_matches_linear_with_dequantized_weight():
    lin = mlp()[0]
    layer = FP8Linear.from_linear(lin, mode="weight_only")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # (B, L, D)
    w_exact = (decode_e4m3(layer.weight) * layer.weight_scale.double()).float()
    y = layer(x)
    assert y.shape == (2, 5, 256) and y.dtype == torch.bfloat16
    assert rel(y, F.linear(x, w_exact.to(torch.bfloat16), lin.bias)) <= 1e-3
    y32 = layer(x.float())  # the dtype follows the input: fp32 in, fp32 math
    assert y32.dtype == torch.float32 and rel(y32, F.linear(x.float(), w_exact, lin.bias.float())) <= 1e-6
    # against the unquantized layer: one e4m3 operand, ~EPS1 (inputs from the same seed, so a stable number)
    assert rel(y32, F.linear(x.float(), lin.weight.float(), lin.bias.float())) <= 1.5 * EPS1


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_emulated_scaled_mm_error_budget(per_token, per_channel):
    g = torch.Generator().manual_seed(3)
    for K, N in [(64, 192), (256, 64), (320, 64)]:  # tiny-model layer shapes (qkv, fc2, linear2)
        w, b = torch.randn(N, K, generator=g) / math.sqrt(K), 0.1 * torch.randn(N, generator=g)
        x = torch.randn(4, 64, K, generator=g).to(torch.bfloat16)
        w_fp8, scale = quantize_weight(w, per_channel)
        ref = F.linear(x.float(), w, b)
        err = rel(emulate_scaled_mm(x, w_fp8, scale, b, per_token), ref)
        assert err <= SCALED_MM_LAYER_TOL
        assert err == pytest.approx(math.sqrt(2) * EPS1, rel=0.2)  # both operands really went through e4m3
        # Issue 7's per-layer bar, "vs the bf16 reference on the same weights": against the dequantized FP8
        # weights only the activation's rounding is left, one e4m3 operand (EPS1 = 2.65%): <= 3e-2
        same_weights = F.linear(x.float(), dequantize_weight(w_fp8, scale, torch.float32), b)
        err_same = rel(emulate_scaled_mm(x, w_fp8, scale, b, per_token), same_weights)
        assert err_same <= SAME_WEIGHTS_LAYER_TOL and err_same == pytest.approx(EPS1, rel=0.2)


def test_activation_quantizer_bounds_and_zero_tokens():
    x = torch.randn(6, 80, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    x[2] = 0  # a token of zeros (padding, say) must give zeros, not 0 * inf = nan
    x_fp8, scale = fp8.quantize_activation(x, per_token=True)
    assert x_fp8.shape == (6, 80) and scale.shape == (6, 1) and scale.dtype == torch.float32
    deq = decode_e4m3(x_fp8) * scale.double()
    assert torch.equal(deq[2], torch.zeros(80, dtype=torch.float64))
    xd, s = x.double(), scale.double()
    assert ((deq - xd).abs() <= torch.maximum(2**-4 * xd.abs(), 2**-10 * s) * (1 + 1e-6)).all()
    assert (decode_e4m3(x_fp8).abs().amax(dim=1)[[0, 1, 3, 4, 5]] == 448).all()  # each row's max lands on 448


def test_per_token_scales_protect_small_tokens_from_an_outlier():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g) / math.sqrt(128)
    x = torch.randn(32, 128, generator=g)
    x[0] *= 1e6  # one outlier token: per-tensor scaling pushes the others below e4m3's smallest values
    w_fp8, scale = quantize_weight(w)
    ref = F.linear(x[1:], w)
    tok = rel(emulate_scaled_mm(x, w_fp8, scale, per_token=True)[1:], ref)
    tensor = rel(emulate_scaled_mm(x, w_fp8, scale, per_token=False)[1:], ref)
    assert tok <= SCALED_MM_LAYER_TOL and tensor > 0.5


@pytest.mark.parametrize("per_token,per_channel", [(True, False), (False, False), (True, True)])
def test_scaled_mm_forward_on_cpu_kernel_matches_emulation(per_token, per_channel):
    # recent torch builds ship a CPU _scaled_mm: this runs FP8Linear's real call (scale shapes, layout, bias)
    if not cpu_scaled_mm_available(rowwise=per_token or per_channel):
        pytest.skip(f"torch {torch.__version__} has no CPU _scaled_mm for these scales")
    lin = mlp()[0]
    layer = FP8Linear.from_linear(lin, per_channel, mode="scaled_mm", per_token=per_token)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (3, 7, 256) and y.dtype == torch.bfloat16
    em = emulate_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias, per_token)
    assert rel(y, em) <= 5e-3  # only the bf16 output rounding and summation order differ
    assert rel(y, lin(x)) <= SCALED_MM_LAYER_TOL


@pytest.mark.skipif(not cpu_scaled_mm_available(rowwise=True), reason="this torch has no rowwise CPU _scaled_mm")
def test_whole_tiny_model_with_cpu_scaled_mm_within_budget():
    model, inputs = tiny_model(), model_inputs(TINY_CONFIG)
    with torch.no_grad():
        ref = model(*inputs)
        q = convert_to_fp8(copy.deepcopy(model), mode="weight_only")
        for m in q.modules():  # the CPU kernel, forced: convert_to_fp8 itself only picks it on FP8 GPUs
            if isinstance(m, FP8Linear):
                m.mode = "scaled_mm"
        assert rel(q(*inputs), ref) <= MODEL_TOL


# -------------------------------------------------------------------------------------------- conversion
def test_default_filter_takes_the_official_320_layers_of_the_13b_model():
    model = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta", dtype=torch.bfloat16)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    convert_to_fp8(model, mode="weight_only")
    layers = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 320 and all(n.startswith(("double_blocks.", "single_blocks.")) for n in layers)
    assert sum(n.endswith(("_mod.linear", "modulation.linear")) for n in layers) == 2 * 20 + 40
    assert fp8.fp8_param_share(model) == pytest.approx(0.972, abs=5e-4)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys  # same 856 keys, same shapes
    assert isinstance(model.final_layer.linear, nn.Linear) and isinstance(model.txt_in.input_embedder, nn.Linear)


def test_chosen_layer_kinds_stay_bf16():
    from hvlab.fast import accelerate

    model = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta", dtype=torch.bfloat16)
    accelerate(model, fused="eager", fp8="weight_only", fp8_keep_bf16=fp8.MODULATION_KINDS)
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear and fp8.default_fp8_filter(n, m)]
    assert len(kept) == 20 * 2 + 40 and all(fp8.layer_kind(n) in fp8.MODULATION_KINDS for n in kept)
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 320 - 80
    assert fp8.layer_kind("single_blocks.39.linear2") == "single.linear2"
    with pytest.raises(ValueError, match=r"does not have: \['single.linear3'\]; its FP8 layer kinds are \["):
        fp8.fp8_filter(model, ["single.linear3"])
    with pytest.raises(ValueError, match="fp8_keep_bf16 goes with fp8=..., got fp8=None"):
        accelerate(model, fp8_keep_bf16=["single.linear2"])


def test_convert_skips_layers_whose_dims_are_not_multiples_of_16():
    model = nn.Sequential()
    model.double_blocks = nn.ModuleList([nn.Linear(64, 48), nn.Linear(64, 40)])
    convert_to_fp8(model, mode="weight_only")
    assert isinstance(model.double_blocks[0], FP8Linear) and type(model.double_blocks[1]) is nn.Linear


def test_dtype_casts_keep_the_fp8_payload():
    model = convert_to_fp8(mlp(), mode="weight_only", include=all_linears)
    before = model[0].weight.view(torch.uint8).clone()
    model.to(torch.float32)
    assert model[0].weight.dtype == FP8_DTYPE and torch.equal(model[0].weight.view(torch.uint8), before)
    assert model[0].weight_scale.dtype == torch.float32 and model[0].bias.dtype == torch.float32


def test_loading_bf16_weights_into_fp8_layer_is_refused():
    layer = FP8Linear(64, 32)
    with pytest.raises(CheckpointError, match="float8_e4m3fn"):
        layer.load_state_dict({"weight": torch.zeros(32, 64, dtype=torch.bfloat16), "bias": torch.zeros(32)})


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="'auto', 'scaled_mm', 'weight_only'"):
        convert_to_fp8(mlp(), mode="int8", include=all_linears)
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert_to_fp8(mlp())  # default filter: nothing inside double_blocks / single_blocks
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        FP8Linear(64, 32)(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="out_features"):
        quantize_weight(torch.zeros(8))


# --------------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("mode", ["scaled_mm", "auto"])
def test_scaled_mm_off_fp8_hardware_falls_back_with_one_line_notice(mode):
    model = mlp()  # on the CPU: never FP8 tensor cores, whatever this machine has
    with pytest.warns(FP8FallbackWarning) as record:
        convert_to_fp8(model, mode=mode, include=all_linears)
    notices = [r for r in record if issubclass(r.category, FP8FallbackWarning)]
    assert len(notices) == 1  # once per conversion, not once per layer
    text = str(notices[0].message)
    assert "\n" not in text and "weight_only" in text and "cpu" in text
    assert all(m.mode == "weight_only" for m in model.modules() if isinstance(m, FP8Linear))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_fp8(mlp(), mode="weight_only", include=all_linears)  # asked for: no notice


# ------------------------------------------------------------------------------------- the official pair
@pytest.mark.parametrize("per_channel", [False, True])
def test_official_layout_round_trip(tmp_path, per_channel):
    model, inputs = tiny_model(), model_inputs(TINY_CONFIG)
    ckpt, smap = save_fp8_checkpoint(model.state_dict(), tmp_path, per_channel=per_channel)
    assert os.path.basename(ckpt) == "mp_rank_00_model_states_fp8.pt"
    assert os.path.basename(smap) == "mp_rank_00_model_states_fp8_map.pt"
    assert fp8.default_map_path(ckpt) == smap  # the official loader's rule: x.pt -> x_map.pt

    raw = torch.load(ckpt, weights_only=True)
    assert list(raw) == ["module"] and set(raw["module"]) == set(model.state_dict())
    quantized = {k[: -len(".weight")] for k, v in raw["module"].items() if v.dtype == FP8_DTYPE}
    expected = {n for n, m in model.named_modules() if fp8.default_fp8_filter(n, m)}
    assert quantized == expected and len(expected) == 13
    scales = torch.load(smap, weights_only=True)
    assert set(scales) == expected
    assert all(s.dtype == torch.float32 and s.dim() == (1 if per_channel else 0) for s in scales.values())
    assert raw["module"]["final_layer.linear.weight"].dtype == torch.bfloat16  # kept in bf16

    fresh = HYVideoDiffusionTransformer(TINY_CONFIG, device="meta", dtype=torch.bfloat16)  # nothing allocated
    load_fp8_checkpoint(fresh, ckpt, mode="weight_only")  # map path found beside it, the official way
    assert not any(p.is_meta for p in fresh.parameters())
    assert {p.dtype for p in fresh.parameters()} == {torch.bfloat16, FP8_DTYPE}
    assert fresh.double_blocks[0].img_attn_qkv.weight.dtype == FP8_DTYPE
    quant = convert_to_fp8(copy.deepcopy(model), mode="weight_only", per_channel=per_channel)
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), quant(*inputs))
        assert rel(fresh(*inputs), model(*inputs)) <= MODEL_TOL


def test_fp32_rest_of_checkpoint_is_cast_to_the_model_dtype(tmp_path):
    model, inputs = tiny_model(), model_inputs(TINY_CONFIG)
    ckpt, _ = save_fp8_checkpoint({k: v.float() for k, v in model.state_dict().items()}, tmp_path)
    fresh = load_fp8_checkpoint(HYVideoDiffusionTransformer(TINY_CONFIG, device="meta", dtype=torch.bfloat16),
                                ckpt, mode="weight_only")
    assert fresh.final_layer.linear.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel(fresh(*inputs), model(*inputs)) <= MODEL_TOL


def test_mismatched_pair_is_refused(tmp_path):
    ckpt, smap = save_fp8_checkpoint(tiny_model().state_dict(), tmp_path)
    scales = torch.load(smap, weights_only=True)
    del scales["single_blocks.0.linear2"]
    torch.save(scales, smap)
    with pytest.raises(CheckpointError, match="single_blocks.0.linear2"):
        load_fp8_checkpoint(HYVideoDiffusionTransformer(TINY_CONFIG, device="meta"), ckpt, mode="weight_only")


def test_quantize_cli(tmp_path):
    spec = importlib.util.spec_from_file_location("quantize_fp8", os.path.join(
        os.path.dirname(__file__), "..", "scripts", "quantize_fp8.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    model = tiny_model()
    src = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": model.state_dict()}, src)
    cli.main([str(src), "--out", str(tmp_path / "fp8")])
    sd = load_state_dict_file(tmp_path / "fp8" / "mp_rank_00_model_states_fp8.pt")
    assert sum(v.dtype == FP8_DTYPE for v in sd.values()) == 13


# --------------------------------------------------------------------------------------------------- GPU
@needs_fp8_gpu
@pytest.mark.parametrize("per_token,per_channel", [(True, False), (False, False), (True, True)])
def test_gpu_scaled_mm_layers_match_bf16_and_emulation(per_token, per_channel):
    g = torch.Generator(device="cuda").manual_seed(0)
    for M, K, N in [(4096, 3072, 9216), (4096, 15360, 3072), (1, 3072, 18432), (333, 128, 64)]:
        lin = nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, K**-0.5, generator=g)
            lin.bias.normal_(0, 0.1, generator=g)
        x = torch.randn(1, M, K, device="cuda", generator=g).to(torch.bfloat16)
        layer = FP8Linear.from_linear(lin, per_channel, mode="scaled_mm", per_token=per_token)
        with torch.no_grad():
            y, ref = layer(x), F.linear(x.float(), lin.weight.float(), lin.bias.float())
        assert y.shape == (1, M, N) and y.dtype == torch.bfloat16
        assert rel(y, ref) <= SCALED_MM_LAYER_TOL
        # vs exact fp32 accumulation: bf16 output rounding plus Hopper's fast accumulation (3.3e-3 at K = 15360)
        assert rel(y, emulate_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias, per_token)) <= 1e-2


@needs_fp8_gpu
def test_gpu_scaled_mm_vs_bf16_on_the_same_weights_per_layer_and_whole_model():
    """Issue 7's bars: FP8 GEMMs vs the bf16 reference on the same (FP8) weights, i.e. the weight-only forward:
    per layer <= 3e-2 at the 13B model's layer shapes, whole model <= 5e-2."""
    g = torch.Generator(device="cuda").manual_seed(1)
    for K, N in [(3072, 9216), (3072, 21504), (15360, 3072), (12288, 3072)]:  # qkv, linear1, linear2, fc2
        lin = nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, K**-0.5, generator=g)
        x = torch.randn(1, 4096, K, device="cuda", generator=g).to(torch.bfloat16)
        layer = FP8Linear.from_linear(lin, mode="scaled_mm")
        with torch.no_grad():
            y = layer(x)
            layer.mode = "weight_only"
            ref = layer(x)
        assert rel(y, ref) <= SAME_WEIGHTS_LAYER_TOL, (K, N, rel(y, ref))
    model = convert_to_fp8(tiny_model().cuda(), mode="weight_only")
    inputs = model_inputs(TINY_CONFIG, device="cuda")
    with torch.no_grad():
        ref = model(*inputs)
        fp8.set_fp8_mode(model, "scaled_mm")
        assert rel(model(*inputs), ref) <= MODEL_TOL


@pytest.mark.skipif(not torch.cuda.is_available() or fp8.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("M,K", [(1, 3072), (1000, 3088), (4099, 15360)])
def test_gpu_triton_quantizer_gives_the_bytes_of_the_fp32_maths(M, K):
    x = torch.randn(M, K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(M)).to(torch.bfloat16)
    if M > 1:
        x[0] = 0  # a token of zeros
    x[-1] *= 1e3  # a large token
    for per_token in (True, False):
        amax = (x.float().abs().amax(dim=1, keepdim=True) if per_token else x.float().abs().amax()).clamp(min=1e-30)
        inv = torch.full_like(amax, 448.0) / amax  # the documented maths, written out again (IEEE division)
        got, scale = fp8.quantize_activation(x, per_token)
        assert torch.equal(got.view(torch.uint8), (x.float() * inv).to(FP8_DTYPE).view(torch.uint8))
        assert torch.equal(scale, inv.reciprocal())


@needs_fp8_gpu
def test_gpu_whole_tiny_model_scaled_mm_within_budget():
    model = tiny_model().cuda()
    inputs = model_inputs(TINY_CONFIG, device="cuda")
    with torch.no_grad():
        ref = model(*inputs)
        q = convert_to_fp8(copy.deepcopy(model), mode="auto")
        assert all(m.mode == "scaled_mm" for m in q.modules() if isinstance(m, FP8Linear))
        assert rel(q(*inputs), ref) <= MODEL_TOL


@needs_fp8_gpu
def test_gpu_loaded_pair_selects_scaled_mm_after_moving(tmp_path):
    model, inputs = tiny_model(), model_inputs(TINY_CONFIG, device="cuda")
    ckpt, _ = save_fp8_checkpoint(model.state_dict(), tmp_path)
    fresh = load_fp8_checkpoint(HYVideoDiffusionTransformer(TINY_CONFIG, device="meta", dtype=torch.bfloat16),
                                ckpt, mode="auto", device="cuda")
    layer = fresh.single_blocks[0].linear1
    assert layer.mode == "scaled_mm" and layer.weight.is_cuda and layer.weight_scale.is_cuda
    with torch.no_grad():
        assert rel(fresh(*inputs), model.cuda()(*inputs)) <= MODEL_TOL


# --------------------------------------------------------------------------------------------- benchmark
def _bench():
    spec = importlib.util.spec_from_file_location("bench_dit", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "bench_dit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dit_flops_reproduces_the_720p_count_and_the_model_shapes():
    bench = _bench()
    L_img, L_txt = 33 * 45 * 80, 256  # 720x1280x129: latent 33x90x160, 2x2 patches
    f = bench.dit_flops(HYVIDEO_T2_CONFIG, L_img, L_txt)
    assert L_img == 118_800
    assert f["linear"] / 1e15 == pytest.approx(1.618, abs=5e-4)
    assert f["attention"] / 1e15 == pytest.approx(10.45, abs=5e-3)
    assert f["total"] / 1e15 == pytest.approx(12.07, abs=5e-3)
    # independently, from the layers the model really has (token-wise linears; modulation is per sample)
    model = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta")
    linear = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith(("double_blocks", "single_blocks")) and "mod" not in n:
            tokens = L_img if ".img_" in n else L_txt if ".txt_" in n else L_img + L_txt
            linear += 2 * m.in_features * m.out_features * tokens
    assert f["linear"] == linear
    nh, hd, L = HYVIDEO_T2_CONFIG.heads_num, HYVIDEO_T2_CONFIG.head_dim, L_img + L_txt
    assert f["attention"] == (len(model.double_blocks) + len(model.single_blocks)) * nh * 2 * (2 * L * L * hd)


def test_bench_quick_writes_results(tmp_path):
    from hvlab import attention

    bench, backend = _bench(), attention.get_attention_backend()
    try:  # main() picks hvlab's attention backend, a global: put it back for the tests that follow
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FP8FallbackWarning)
            report = bench.main(["--quick", "--impls", "hvlab-bf16,hvlab-fp8", "--out", str(tmp_path),
                                 "--device", "cpu"])
    finally:
        attention.set_attention_backend(backend)
    saved = json.loads((tmp_path / "bench_dit.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    rows = {r["impl"]: r for r in saved["results"]}
    assert set(rows) == {"hvlab-bf16", "hvlab-fp8"} and not any("error" in r for r in rows.values())
    assert rows["hvlab-fp8"]["fp8_mode"] == "weight_only"  # CPU: the fallback, recorded
    assert all(r["finite"] and r["s_per_step"] > 0 for r in rows.values())
    flops = bench.dit_flops(TINY_CONFIG, rows["hvlab-bf16"]["L_img"], 256)["total"]
    assert rows["hvlab-bf16"]["tflops"] == pytest.approx(flops / rows["hvlab-bf16"]["s_per_step"] / 1e12)
