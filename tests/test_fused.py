"""hvlab.fast.kernels.norm_rope: the one-pass QK-norm + RoPE equals the eager definition.

Three levels: the eager path against the composition it replaced (RMSNorm, then rope.apply_rotary_emb on
the image tokens); the Triton kernel's logic on the CPU under the Triton interpreter; the compiled kernel
on a GPU (bf16, the real layout), and a whole DiT with and without it.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hvlab.fast import kernels as fused
from hvlab.modulation import RMSNorm
from hvlab.rope import apply_rotary_emb, get_nd_rotary_pos_embed

ROPE, GRID = [8, 12, 12], [2, 3, 5]  # 30 image tokens, head_dim 32


def _inputs(dtype, L=37, nh=3, hd=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(2, L, 3 * nh * hd, generator=g) * 3).to(device, dtype)
    q = qkv.view(2, L, 3, nh, hd)[:, :, 0]  # a strided view, as the blocks pass it
    norm = RMSNorm(hd).to(device, dtype)
    norm.weight.data = (torch.rand(hd, generator=g) + 0.5).to(device, dtype)
    return q, norm


def test_eager_path_equals_rmsnorm_then_rope_on_the_image_tokens():
    q, norm = _inputs(torch.float32)
    cos, sin = get_nd_rotary_pos_embed(ROPE, GRID)
    n = cos.shape[0]  # 30 of 37 tokens are image tokens; the last 7 (text) carry no position
    out = fused.norm_rope(q, norm, (cos, sin), n_rope=n)
    y = norm(q)
    rot, _ = apply_rotary_emb(y[:, :n], y[:, :n], (cos, sin))
    torch.testing.assert_close(out[:, :n], rot, rtol=0, atol=0)
    torch.testing.assert_close(out[:, n:], y[:, n:], rtol=0, atol=0)
    # RoPE is a rotation per channel pair: it keeps each head's norm
    torch.testing.assert_close(out.norm(dim=-1), y.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_agreement_flags_a_wrong_result_and_accepts_one_flipped_rounding():
    q, norm = _inputs(torch.bfloat16, L=64, nh=4, hd=32)
    cos, sin = get_nd_rotary_pos_embed([8, 12, 12], [4, 4, 4])
    ref = fused.norm_rope(q, norm, (cos, sin), backend="eager")
    assert fused.agreement(ref.clone(), ref) == dict(max_pair_ulps=0.0, differ=0.0, rel=0.0, ok=True)
    one_ulp = ref.clone()
    one_ulp.view(torch.int16).view(-1)[::97] += 1  # one bf16 ulp on ~1% of the elements
    assert fused.agreement(one_ulp, ref)["ok"]
    rope_skipped = fused.norm_rope(q, norm, None, backend="eager")  # a plausible bug: no rotation
    assert not fused.agreement(rope_skipped, ref)["ok"]
    swapped = ref.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # another: pair channels swapped
    assert not fused.agreement(swapped, ref)["ok"]
    # float32 (the toy model on a GPU): last-bit noise on every element is fine, a real error is not
    q32, norm32 = _inputs(torch.float32, L=64, nh=4, hd=32)
    ref32 = fused.norm_rope(q32, norm32, (cos, sin), backend="eager")
    noisy = ref32 * (1 + 3e-7 * torch.randn(ref32.shape, generator=torch.Generator().manual_seed(1)))
    assert (noisy != ref32).float().mean() > 0.5 and fused.agreement(noisy, ref32)["ok"]
    assert not fused.agreement(fused.norm_rope(q32, norm32, None, backend="eager"), ref32)["ok"]


def test_a_kernel_that_disagrees_on_first_use_is_switched_off_with_a_warning(monkeypatch):
    q, norm = _inputs(torch.float32)
    monkeypatch.setattr(fused, "_kernel_failed", False)
    monkeypatch.setattr(fused, "_kernel_verified", False)
    monkeypatch.setattr(fused, "_use_kernel", lambda *a: True)
    monkeypatch.setattr(fused, "triton", type("T", (), {"next_power_of_2": staticmethod(lambda n: n)}))

    class Broken:  # stands in for a miscompiled kernel: writes ones
        def __getitem__(self, grid):
            return lambda x, w, cos, sin, out, *a, **k: out.fill_(1.0)

    monkeypatch.setattr(fused, "_norm_rope_kernel", Broken(), raising=False)
    with pytest.warns(UserWarning, match="disagrees with the eager path"):
        out = fused.norm_rope(q, norm)
    torch.testing.assert_close(out, fused.norm_rope_reference(q, norm))  # the caller still gets the right result
    assert fused._kernel_failed


def test_bad_tables_and_backend_name_the_expected_values():
    q, norm = _inputs(torch.float32)
    cos, sin = get_nd_rotary_pos_embed(ROPE, GRID)
    with pytest.raises(ValueError, match=r"\(n_rope, head_dim\) = \(20, 32\)"):
        fused.norm_rope(q, norm, (cos, sin), n_rope=20)
    with pytest.raises(ValueError, match="'auto', 'eager' or 'kernel'"):
        fused.norm_rope(q, norm, backend="triton")


# The interpreter must be switched on before triton is imported, so the check runs in a fresh process.
INTERPRETED = textwrap.dedent("""
    import json, torch
    from hvlab.fast import kernels as fused
    from hvlab.rope import get_nd_rotary_pos_embed
    from tests.test_fused import _inputs, ROPE, GRID
    cos, sin = get_nd_rotary_pos_embed(ROPE, GRID)
    res = {}
    for mode in fused.PAIR_MODES:
        fused.pair_mode = mode
        for name, dt, wdt in [("fp32", torch.float32, torch.float32), ("fp16", torch.float16, torch.float16),
                              ("fp16-w32", torch.float16, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16)]:
            for n in (30, 0):
                q, norm = _inputs(dt, seed=n)
                norm.to(wdt)
                f = (cos, sin) if n else None
                ref = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=dt, backend="eager")
                out = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=dt, backend="kernel")
                assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
                # out=: written straight into a token slice of a longer joint buffer, the rest untouched
                joint = torch.full((2, 45, *q.shape[2:]), 7.0, dtype=dt)
                got = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=dt, backend="kernel", out=joint[:, 3:40])
                assert got.data_ptr() == joint[:, 3:40].data_ptr() and torch.equal(got, out)
                assert (joint[:, :3] == 7).all() and (joint[:, 40:] == 7).all()
                d = (out.float() - ref.float()).abs()
                res[f"{mode}/{name}/{n}"] = dict(rel=(d.norm() / ref.float().norm()).item(),
                                                 ulps=(d / ref.float().abs().clamp(min=1e-3)).max().item(),
                                                 differ=(out != ref).float().mean().item(),
                                                 agree=fused.agreement(out, ref)["ok"])
    print(json.dumps(res))
""")


@pytest.mark.skipif(fused.triton is None, reason="triton is not installed (pip install triton)")
def test_kernel_logic_under_the_triton_interpreter_matches_the_eager_path():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    res = json.loads(run.stdout.strip().splitlines()[-1])
    for m in fused.PAIR_MODES:  # both ways of finding a channel's rotation partner
        for n in (30, 0):
            # float32 throughout: summation order and sqrt rounding only, which `agreement` accepts
            assert res[f"{m}/fp32/{n}"]["rel"] < 1e-6 and res[f"{m}/fp32/{n}"]["agree"], res
            # fp16 (numpy casts round to nearest even, as the GPU does): the same roundings as eager, so the
            # same bytes except where a float32 ulp of the rms tips a rounding
            for name in ("fp16", "fp16-w32"):
                r = res[f"{m}/{name}/{n}"]
                assert r["differ"] < 0.01 and r["ulps"] <= 2 ** -10 and r["agree"], res
            # bf16: the interpreter truncates float32 -> bf16 (the GPU rounds to nearest); within 2 bf16 ulps
            assert res[f"{m}/bf16/{n}"]["rel"] < 1.6e-2, res


@pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and triton")
def test_gpu_kernel_equals_eager_in_bf16_and_a_dit_is_unchanged(monkeypatch):
    from hvlab.model import TINY_CONFIG, HYVideoDiffusionTransformer

    L, nh, hd = 5000, 24, 128
    cos, sin = get_nd_rotary_pos_embed([16, 56, 56], [5, 20, 48])  # 4800 image tokens, then 200 text
    for mode in fused.PAIR_MODES:
        monkeypatch.setattr(fused, "pair_mode", mode)
        for wdt in (torch.bfloat16, torch.float32):
            q, norm = _inputs(torch.bfloat16, L=L, nh=nh, hd=hd, device="cuda")
            norm.to(wdt)
            out = fused.norm_rope(q, norm, (cos, sin), n_rope=cos.shape[0], dtype=torch.bfloat16, backend="kernel")
            ref = fused.norm_rope(q, norm, (cos, sin), n_rope=cos.shape[0], dtype=torch.bfloat16, backend="eager")
            stats = fused.agreement(out, ref)
            assert stats["ok"], (mode, wdt, stats)
            joint = torch.zeros(2, L + 7, nh, hd, device="cuda", dtype=torch.bfloat16)
            fused.norm_rope(q, norm, (cos, sin), n_rope=cos.shape[0], backend="kernel", out=joint[:, 7:])
            assert torch.equal(joint[:, 7:], out) and not joint[:, :7].any()
        q32, norm32 = _inputs(torch.float32, L=L, nh=nh, hd=hd, device="cuda")  # the toy model's dtype
        out = fused.norm_rope(q32, norm32, (cos, sin), n_rope=cos.shape[0], backend="kernel")
        stats = fused.agreement(out, fused.norm_rope(q32, norm32, (cos, sin), n_rope=cos.shape[0], backend="eager"))
        assert stats["ok"], (mode, "fp32", stats)

    torch.manual_seed(0)
    model = HYVideoDiffusionTransformer(TINY_CONFIG).to("cuda", torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    from hvlab.fast import accelerate

    accelerate(model)  # the fast blocks call the kernels
    c = TINY_CONFIG
    x = torch.randn(1, c.in_channels, 5, 16, 16, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 12, c.text_states_dim, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 12, dtype=torch.long, device="cuda")
    mask[:, 9:] = 0
    pooled = torch.randn(1, c.text_states_dim_2, device="cuda", dtype=torch.bfloat16)
    t, guidance = torch.tensor([700.0], device="cuda"), torch.tensor([6016.0], device="cuda")
    with torch.no_grad():
        kernel = model(x, t, text, mask, pooled, guidance=guidance).float()
        monkeypatch.setattr(fused, "_use_kernel", lambda *a: False)
        eager = model(x, t, text, mask, pooled, guidance=guidance).float()
    assert (kernel - eager).norm() / eager.norm() < 1e-2  # bf16 through every block


# ------------------------------------------------------------------------------------------- gelu_linear
def _gelu_case(dtype, seed=0, M=37, Kp=48, Kh=80, N=32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(Kp + Kh, N).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, Kp + Kh, generator=g) * 0.1)
    big = (torch.randn(2, M, 3 * Kh, generator=g) * 2).to(dtype)
    h = big[..., Kh:2 * Kh]  # a strided view, as the single block's MLP half of linear1's output
    prefix = torch.randn(2, M, Kp, generator=g).to(dtype)
    return lin, h, prefix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_linear_is_gelu_then_concatenation_then_linear(dtype):
    lin, h, prefix = _gelu_case(dtype)
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        # the no-grad path writes GELU into the joint input in place: the same bytes as the composition
        assert torch.equal(fused.gelu_linear(lin, h, prefix), lin(torch.cat([prefix, gelu(h, approximate="tanh")], -1)))
        lin2 = torch.nn.Linear(h.shape[-1], 8).to(dtype)
        assert torch.equal(fused.gelu_linear(lin2, h), lin2(gelu(h, approximate="tanh")))
    # with autograd: the plain composition, gradients included
    hg, pg = h.detach().float().requires_grad_(), prefix.detach().float().requires_grad_()
    lin32 = lin.float()
    fused.gelu_linear(lin32, hg, pg).square().sum().backward()
    h2, p2 = hg.detach().clone().requires_grad_(), pg.detach().clone().requires_grad_()
    lin32(torch.cat([p2, gelu(h2, approximate="tanh")], -1)).square().sum().backward()
    torch.testing.assert_close(hg.grad, h2.grad)
    torch.testing.assert_close(pg.grad, p2.grad)


def test_gelu_linear_names_the_expected_widths():
    lin, h, prefix = _gelu_case(torch.float32)
    with pytest.raises(ValueError, match=r"prefix \(48\) \+ h \(70\) columns must equal linear.in_features = 128"):
        fused.gelu_linear(lin, h[..., :70], prefix)
    with pytest.raises(ValueError, match="must share leading dims"):
        fused.gelu_linear(lin, h, prefix[:, :5])


INTERPRETED_GELU = textwrap.dedent("""
    import json, torch
    from hvlab.fast import fp8
    from tests.test_fused import _gelu_case
    gelu = torch.nn.functional.gelu
    res = {}
    for dt in (torch.float16, torch.float32):
        lin, h, prefix = _gelu_case(dt, M=33, Kp=48, Kh=80)
        h2, p2 = h.reshape(-1, 80), prefix.reshape(-1, 48)  # h2 keeps its row stride (240)
        p2[5] = 0; h2[5] = -30  # a row whose GELU is all zeros
        for with_prefix in (True, False):
            y, s = fp8.quantize_gelu_rows(h2, p2 if with_prefix else None)
            act = gelu(h2.float(), approximate="tanh").to(dt)
            row = torch.cat([p2, act], -1) if with_prefix else act
            # the plain kernel on the eager GELU + cat (both interpreted: same float32 -> fp8 casts)
            ry, rs = fp8._quantize_triton(row.contiguous(), None)
            res[f"{dt}/{with_prefix}"] = dict(
                shape=list(y.shape), same_bytes=(y.view(torch.uint8) == ry.view(torch.uint8)).float().mean().item(),
                scale_rel=((s - rs).abs() / rs).max().item(),
                deq_rel=((y.float() * s - ry.float() * rs).norm() / (ry.float() * rs).norm()).item())
        # the plain quantiser goes through the same kernel (no prefix, no GELU)
        x = (torch.randn(33, 80, generator=torch.Generator().manual_seed(3)) * 5).to(dt)
        _, qs = fp8._quantize_triton(x, None)
        inv = torch.full((33, 1), 448.0) / x.float().abs().amax(1, keepdim=True)
        # (the interpreter's own float32 -> fp8 cast is not the GPU's round-to-nearest, so the bytes of this
        # path are checked on the GPU, tests/test_fp8.py; here: its scales, which are the IEEE maths)
        res[f"{dt}/plain"] = dict(scale_exact=bool(torch.equal(qs, inv.reciprocal())))
    print(json.dumps(res))
""")


@pytest.mark.skipif(fused.triton is None, reason="triton is not installed (pip install triton)")
def test_gelu_quantiser_logic_under_the_triton_interpreter_matches_the_eager_maths():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", INTERPRETED_GELU], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    res = json.loads(run.stdout.strip().splitlines()[-1])
    for dt in ("torch.float16", "torch.float32"):
        assert res[f"{dt}/plain"]["scale_exact"], res
        for with_prefix, K in ((True, 128), (False, 80)):
            r = res[f"{dt}/{with_prefix}"]
            assert r["shape"] == [66, K], res
            # tanh by exp differs from torch's in the last float32 bits: a rounding may tip, rarely
            assert r["same_bytes"] > 0.99 and r["scale_rel"] < 1e-3 and r["deq_rel"] < 1e-2, res


@pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and triton")
def test_gpu_gelu_linear_fp8_matches_the_unfused_fp8_layer():
    from hvlab.fast.fp8 import FP8Linear, fp8_supported

    if not fp8_supported("cuda")[0]:
        pytest.skip("no FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    for M, Kp, Kh, N in [(4099, 3072, 12288, 3072), (513, 0, 12288, 3072)]:
        lin = torch.nn.Linear(Kp + Kh, N, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, (Kp + Kh) ** -0.5, generator=g)
        layer = FP8Linear.from_linear(lin, mode="scaled_mm")
        big = torch.randn(1, M, 2 * Kh, device="cuda", generator=g).to(torch.bfloat16)
        h = big[..., Kh:]
        prefix = torch.randn(1, M, Kp, device="cuda", generator=g).to(torch.bfloat16) if Kp else None
        with torch.no_grad():
            got = fused.gelu_linear(layer, h, prefix)
            act = torch.nn.functional.gelu(h, approximate="tanh")
            ref = layer(act if prefix is None else torch.cat([prefix, act], -1))  # GELU, cat, quantise, GEMM
        assert got.shape == ref.shape == (1, M, N)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3
