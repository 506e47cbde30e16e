"""hvlab.fused.norm_rope: the one-pass QK-norm + RoPE equals the eager definition.

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

from hvlab import fused
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
    from hvlab import fused
    from hvlab.rope import get_nd_rotary_pos_embed
    from tests.test_fused import _inputs, ROPE, GRID
    cos, sin = get_nd_rotary_pos_embed(ROPE, GRID)
    res = {}
    for name, dt, wdt in [("fp32", torch.float32, torch.float32), ("fp16", torch.float16, torch.float16),
                          ("fp16-w32", torch.float16, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16)]:
        for n in (30, 0):
            q, norm = _inputs(dt, seed=n)
            norm.to(wdt)
            f = (cos, sin) if n else None
            ref = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=dt, backend="eager")
            out = fused.norm_rope(q, norm, f, n_rope=n or None, dtype=dt, backend="kernel")
            assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
            d = (out.float() - ref.float()).abs()
            res[f"{name}/{n}"] = dict(rel=(d.norm() / ref.float().norm()).item(),
                                      ulps=(d / ref.float().abs().clamp(min=1e-3)).max().item(),
                                      differ=(out != ref).float().mean().item())
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
    for n in (30, 0):
        assert res[f"fp32/{n}"]["rel"] < 1e-6, res  # float32 throughout: summation order and sqrt rounding only
        # fp16 (numpy casts round to nearest even, as the GPU does): the same roundings as eager, so the same
        # bytes except where a float32 ulp of the rms tips a rounding
        for name in ("fp16", "fp16-w32"):
            assert res[f"{name}/{n}"]["differ"] < 0.01 and res[f"{name}/{n}"]["ulps"] <= 2 ** -10, res
        # bf16: the interpreter truncates float32 -> bf16 (the GPU rounds to nearest); within 2 bf16 ulps
        assert res[f"bf16/{n}"]["rel"] < 1.6e-2, res


@pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and triton")
def test_gpu_kernel_equals_eager_in_bf16_and_a_dit_is_unchanged(monkeypatch):
    from hvlab.model import TINY_CONFIG, HYVideoDiffusionTransformer

    L, nh, hd = 5000, 24, 128
    cos, sin = get_nd_rotary_pos_embed([16, 56, 56], [5, 20, 48])  # 4800 image tokens, then 200 text
    for wdt in (torch.bfloat16, torch.float32):
        q, norm = _inputs(torch.bfloat16, L=L, nh=nh, hd=hd, device="cuda")
        norm.to(wdt)
        out = fused.norm_rope(q, norm, (cos, sin), n_rope=cos.shape[0], dtype=torch.bfloat16, backend="kernel")
        ref = fused.norm_rope(q, norm, (cos, sin), n_rope=cos.shape[0], dtype=torch.bfloat16, backend="eager")
        stats = fused.agreement(out, ref)
        assert stats["ok"], (wdt, stats)

    torch.manual_seed(0)
    model = HYVideoDiffusionTransformer(TINY_CONFIG).to("cuda", torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
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
