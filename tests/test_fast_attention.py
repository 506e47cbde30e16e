"""hvlab.fast.attention and hvlab.fast.fp8_attention: the fast kernels compute hvlab's segment attention.

No GPU here, so the FlashAttention-3 call is checked through a stand-in with the FA varlen contract (SDPA
per cu_seqlens segment, written independently of hvlab.attention) and a patched GPU capability; the
dispatch and its notices through the same patch. FP8 attention is checked as maths: with the roundings
switched off it is exact attention (the smoothing is exact), its quantisers keep their error bounds and
their groups, padding never reaches real tokens, and on keys with a shared offset each step of the
recipe lowers the measured error. The GPU runs (FA3 at 720p, the Triton kernel's speed) are in
benchmarks/ and docs/benchmarks.md.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import hvlab.fast.attention as FA
import hvlab.fast.fp8_attention as F8
from hvlab import attention as A
from hvlab.fast import accelerate, acceleration, restore
from hvlab.fast.attention import FA3FallbackWarning, FastAttention, cu_seqlens, fa3_attention
from hvlab.fast.fp8_attention import RECIPES, FP8AttentionRecipe, fp8_attention, quantize, relative_error
from hvlab.fast.parallel import UlyssesAttention
from hvlab.model import TINY_CONFIG, HYVideoDiffusionTransformer, randomize_weights_

IMG, TXT, NH, HD = 40, 9, 2, 16
L = IMG + TXT
TXT_LENS = [None, [9], [0], [3], [9, 2], [1, 5, 0]]


def qkv(B, seed=0, dtype=torch.float32, L=L, nh=NH, hd=HD):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, nh, hd, generator=g).to(dtype) for _ in range(3)]


def lens_of(txt_lens):
    return None if txt_lens is None else torch.tensor(txt_lens)


class FakeVarlen:
    """FlashAttention's varlen contract, written from its documentation: q, k, v (total, nh, hd), one
    softmax per [cu[i], cu[i+1]) range, max_seqlen >= every range. Records its calls."""

    def __init__(self, returns_tuple=False):
        self.calls, self.returns_tuple = [], returns_tuple

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k):
        assert q.dim() == 3 and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
        bounds = cu_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.shape[0] and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        self.calls.append(bounds)
        out = torch.empty_like(q)
        for a, b in zip(bounds, bounds[1:]):
            seg = [t[a:b].transpose(0, 1).float() for t in (q, k, v)]  # (nh, n, hd)
            out[a:b] = F.scaled_dot_product_attention(*seg).transpose(0, 1).to(q.dtype)
        return (out, torch.zeros(1)) if self.returns_tuple else out


@pytest.fixture
def hopper(monkeypatch):
    """Every tensor is on an 'sm90 GPU'; FA3 is absent until a test puts a fake in."""
    monkeypatch.setattr(FA, "_nvidia_capability", lambda q: (9, 0))
    monkeypatch.setattr(FA, "_fa3_func", None)
    monkeypatch.setattr(FA, "_fa3_reason", "fa3_fwd_interface: ModuleNotFoundError (test)")
    return monkeypatch


# --------------------------------------------------------------------------------------- FA3's segments
def test_cu_seqlens_are_the_official_bounds_without_empty_segments():
    assert cu_seqlens([3, 5], 5) == ([0, 3, 5, 10], 5)  # sample 1 has no padding: no [10, 10) segment
    assert cu_seqlens([0, 2], 4) == ([0, 4, 6, 8], 4)  # sample 0 has no real token: padding only
    assert cu_seqlens([7], 7) == ([0, 7], 7)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L = 4\], got \[5\]"):
        cu_seqlens([5], 4)


@pytest.mark.parametrize("txt_lens", TXT_LENS)
@pytest.mark.parametrize("returns_tuple", [False, True])
def test_fa3_varlen_call_equals_hvlab_attention(monkeypatch, txt_lens, returns_tuple):
    fake = FakeVarlen(returns_tuple)
    monkeypatch.setattr(FA, "_fa3_func", fake)
    B = 1 if txt_lens is None else len(txt_lens)
    q, k, v = qkv(B)
    out = fa3_attention(q, k, v, img_len=IMG, txt_lens=lens_of(txt_lens))
    ref = A.attention(q, k, v, img_len=IMG, txt_lens=lens_of(txt_lens))
    explicit, _ = A.attention_explicit(q, k, v, img_len=IMG, txt_lens=lens_of(txt_lens), return_probs=False)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, explicit, atol=1e-6, rtol=1e-5)
    assert len(fake.calls) == 1  # one kernel call for the whole batch


def test_fa3_padded_text_is_exact(monkeypatch):
    """Changing what the padded tokens hold changes no real token's output, bit for bit."""
    monkeypatch.setattr(FA, "_fa3_func", FakeVarlen())
    q, k, v = qkv(2)
    lens = torch.tensor([3, 6])
    out = fa3_attention(q, k, v, img_len=IMG, txt_lens=lens)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for b, n in enumerate((IMG + 3, IMG + 6)):
        for t in (q2, k2, v2):
            t[b, n:] = 100 * torch.randn_like(t[b, n:])
    out2 = fa3_attention(q2, k2, v2, img_len=IMG, txt_lens=lens)
    for b, n in enumerate((IMG + 3, IMG + 6)):
        assert torch.equal(out[b, :n], out2[b, :n])
        assert not torch.equal(out[b, n:], out2[b, n:])  # the padding outputs did change: the test can see


def test_fa3_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(FA, "_fa3_func", None)
    q, k, v = qkv(1)
    with pytest.raises(ValueError, match=r"FlashAttention-3 is not installed: pip install 'hvlab\[fa3\]'"):
        fa3_attention(q, k, v, img_len=IMG)
    with pytest.raises(ValueError, match="attention='fa3' needs FlashAttention-3"):
        accelerate(_model(), attention="fa3")


# --------------------------------------------------------------------------------------------- dispatch
def test_auto_on_hopper_without_fa3_uses_sdpa_with_one_line_notice(hopper):
    q, k, v = qkv(1, dtype=torch.bfloat16)
    fn = FastAttention("auto")
    with pytest.warns(FA3FallbackWarning, match=r"FlashAttention-3 is not installed .*; using cuDNN SDPA") as rec:
        out = fn(q, k, v, img_len=IMG)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert torch.equal(out, A.attention(q, k, v, img_len=IMG))


def test_auto_on_hopper_with_fa3_runs_fa3_and_elsewhere_sdpa_silently(hopper):
    fake = FakeVarlen()
    hopper.setattr(FA, "_fa3_func", fake)
    q, k, v = qkv(1, dtype=torch.bfloat16)
    fn = FastAttention("auto")
    assert fn.choose(q) == "fa3"
    fn(q, k, v, img_len=IMG)
    assert len(fake.calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice where FA3 could not run anyway
        assert fn.choose(q.float()) == "sdpa"  # fp32: FA3 runs bf16
        hopper.setattr(FA, "_nvidia_capability", lambda q: (8, 0))
        assert fn.choose(q) == "sdpa"  # an A100
        hopper.setattr(FA, "_nvidia_capability", lambda q: None)
        assert fn.choose(q) == "sdpa"  # the CPU
    assert FastAttention("sdpa").choose(q) == "sdpa" and FastAttention("fp8").choose(q) == "fp8"


def test_training_never_reaches_the_forward_only_kernels(hopper):
    fake = FakeVarlen()
    hopper.setattr(FA, "_fa3_func", fake)
    q, k, v = (t.requires_grad_() for t in qkv(1, dtype=torch.bfloat16))
    assert FastAttention("auto").choose(q) == "sdpa"
    FastAttention("auto")(q, k, v, img_len=IMG).float().sum().backward()
    assert not fake.calls and q.grad is not None
    with pytest.raises(ValueError, match="runs forward only"):
        FastAttention("fa3")(q, k, v, img_len=IMG)
    with torch.no_grad():
        assert FastAttention("auto").choose(q) == "fa3"


def test_fa3_asked_for_where_it_cannot_run_names_the_reason(hopper):
    hopper.setattr(FA, "_fa3_func", FakeVarlen())
    q, k, v = qkv(1, dtype=torch.bfloat16)
    hopper.setattr(FA, "_nvidia_capability", lambda q: (8, 9))
    with pytest.raises(ValueError, match="attention='fa3': FlashAttention-3 is built for sm90 .* this GPU is sm89"):
        FastAttention("fa3")(q, k, v, img_len=IMG)
    hopper.setattr(FA, "_nvidia_capability", lambda q: (9, 0))
    with pytest.raises(ValueError, match="runs bf16 .* got torch.float16"):
        FastAttention("fa3")(q.half(), k.half(), v.half(), img_len=IMG)


def test_cpu_path_is_the_reference_function():
    q, k, v = qkv(2)
    lens = torch.tensor([3, 7])
    assert FastAttention("auto").choose(q) == "sdpa"  # no patch: a CPU tensor
    assert torch.equal(FastAttention("auto")(q, k, v, img_len=IMG, txt_lens=lens),
                       A.attention(q, k, v, img_len=IMG, txt_lens=lens))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"attention must be one of .* got 'flash'"):
        FastAttention("flash")
    with pytest.raises(ValueError, match="recipe goes with attention='fp8', got attention='sdpa'"):
        FastAttention("sdpa", RECIPES["fp8-head"])
    with pytest.raises(TypeError, match="recipe must be an FP8AttentionRecipe, got str"):
        FastAttention("fp8", "int8")
    with pytest.raises(ValueError, match=r"attention must be one of .* or None, got 'cudnn'"):
        accelerate(_model(), attention="cudnn")
    with pytest.raises(ValueError, match="fp8_recipe goes with attention='fp8', got attention=None"):
        accelerate(_model(), attention=None, fp8_recipe=RECIPES["fp8-head"])
    with pytest.raises(ValueError, match=r"qk must be one of \('fp8', 'int8'\), got 'int4'"):
        FP8AttentionRecipe(qk="int4")
    with pytest.raises(ValueError, match="block must be a positive int .* got 0"):
        FP8AttentionRecipe(block=0)
    with pytest.raises(ValueError, match="pv must be one of"):
        FP8AttentionRecipe(pv="fp16")
    q, k, v = qkv(1)
    with pytest.raises(ValueError, match=r"q, k, v must all be \(B, L, nh, hd\)"):
        fp8_attention(q, k[:, :-1], v, img_len=IMG)
    with pytest.raises(TypeError, match="recipe must be an FP8AttentionRecipe"):
        fp8_attention(q, k, v, img_len=IMG, recipe="int8")


# ------------------------------------------------------------------------------- installing into blocks
def _model(seed=3):
    return randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed=seed).eval()


def _inputs(c=TINY_CONFIG, T=2, H=6, W=8, L_txt=7, lens=(5, 3), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L_txt)[None] < torch.tensor(lens)[:, None]).float()
    return (torch.randn(len(lens), c.in_channels, T, H, W, generator=g).to(dtype), torch.tensor([900.0, 300.0]),
            torch.randn(len(lens), L_txt, c.text_states_dim, generator=g).to(dtype), mask,
            torch.randn(len(lens), c.text_states_dim_2, generator=g).to(dtype), torch.tensor([6016.0, 6016.0]))


def _blocks(model):
    return [*model.double_blocks, *model.single_blocks]


def test_accelerate_on_hopper_runs_every_block_through_fa3_and_matches_the_reference(hopper):
    """bf16 on a (patched) H100 with a (fake) FA3: one varlen call per block, the reference model's output."""
    fake = FakeVarlen()
    hopper.setattr(FA, "_fa3_func", fake)
    model = _model().to(torch.bfloat16)
    inp = _inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(*inp)
        accelerate(model, fused="eager")
        out = model(*inp)
    assert len(fake.calls) == len(_blocks(model)) and acceleration(model)["attention"] == ["auto"]
    L_img = 2 * 3 * 4  # (T, H/2, W/2) video tokens, text 7 padded to lengths 5 and 3
    assert fake.calls[0] == [0, L_img + 5, L_img + 7, 2 * L_img + 10, 2 * (L_img + 7)]
    assert relative_error(out, ref) <= 1e-2  # bf16 roundings of the fast blocks and the kernel's order


def test_ulysses_keeps_its_wrapper_and_runs_the_chosen_kernel_inside():
    model = _model()
    for b in _blocks(model):  # what UlyssesDiT does (no process group needed to build the wrapper)
        b.attn_fn = UlyssesAttention(b.attn_fn)
    accelerate(model, attention="fp8")
    for b in _blocks(model):
        assert isinstance(b.attn_fn, UlyssesAttention) and isinstance(b.attn_fn.attn_fn, FastAttention)
        assert b.attn_fn.attn_fn.kind == "fp8"
    restore(model)
    assert all(isinstance(b.attn_fn, UlyssesAttention) and b.attn_fn.attn_fn is A.attention for b in _blocks(model))


def test_ulysses_two_processes_with_fp8_attention_equal_one_process():
    """2 gloo ranks, FP8 attention inside the all-to-alls: every rank's output equals the single-process
    FP8 model's (each rank quantises whole heads, the same groups as one process) and differs from exact."""
    from hvlab.fast.parallel import demo_model_and_inputs, spawn_ulysses_forward

    model, inputs = demo_model_and_inputs()
    with torch.no_grad():
        exact = model(**inputs)
        kw = dict(attention="fp8", fused="eager")
        outs = spawn_ulysses_forward(model, inputs, 2, accelerate_kwargs=kw)
        single = accelerate(model, **kw)(**inputs)
    assert relative_error(single, exact) > 1e-4  # FP8 attention did run
    for o in outs:
        assert relative_error(o, single) <= 1e-5


def test_recorders_wrap_the_fast_attention_and_are_refused_underneath():
    from hvlab.inspection import AttentionRecorder

    model = _model()
    inp = _inputs()
    with torch.no_grad():
        accelerate(model, attention="fp8", fused="eager")
        fp8_out = model(*inp)
        with AttentionRecorder(model, blocks=[("double", 0)]) as rec:
            recorded = model(*inp)
        assert torch.equal(recorded, fp8_out) and rec.records  # the recorder sees the fp8 model, changes nothing
        restore(model)
        with AttentionRecorder(model, blocks=[("single", 0)]):
            with pytest.raises(ValueError, match="attach recorders after accelerate"):
                accelerate(model, attention="fp8")
            assert model.double_blocks[0].attn_fn is A.attention  # refused before any block changed


# ----------------------------------------------------------------------------------------- FP8 maths
@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("txt_lens", TXT_LENS)
def test_without_roundings_every_recipe_is_exact_attention(monkeypatch, name, txt_lens):
    """K and V smoothing are exact in real arithmetic and the segments are hvlab's: with the quantisers
    switched off the emulation equals exact attention (fp32 noise only)."""
    monkeypatch.setattr(F8, "quantize", lambda x, fmt, group, tiles: (x.float(), None))
    monkeypatch.setattr(F8, "quantize_p", lambda p: p)
    monkeypatch.setattr(F8, "_bf16", lambda x: x.float())
    B = 1 if txt_lens is None else len(txt_lens)
    q, k, v = qkv(B, seed=1)
    k, v = k + 5 * torch.randn(1, 1, NH, HD), v + 3  # offsets, so that the smoothing has work to do
    out = fp8_attention(q, k, v, img_len=IMG, txt_lens=lens_of(txt_lens), recipe=RECIPES[name])
    torch.testing.assert_close(out, A.attention(q, k, v, img_len=IMG, txt_lens=lens_of(txt_lens)),
                               atol=2e-5, rtol=1e-5)


def test_tiles_start_at_every_segment_and_never_cross_one():
    t = F8.segment_tiles([5, 3], 8, block=4)  # segments [0, 5) [5, 8) [8, 11) [11, 16)
    assert t.start.tolist() == [0, 4, 5, 8, 11, 15] and t.end.tolist() == [5, 5, 8, 11, 16, 16]
    assert t.first.tolist() == [0, 0, 2, 3, 4, 4] and t.longest == 5
    assert t.segment.tolist() == [0] * 5 + [1] * 3 + [2] * 3 + [3] * 5
    assert t.tile.tolist() == [0] * 4 + [1] + [2] * 3 + [3] * 3 + [4] * 4 + [5]


@pytest.mark.parametrize("fmt,group", [("fp8", "head"), ("fp8", "block"), ("int8", "block"), ("int8", "token"),
                                       ("fp8", "channel"), ("fp8", "block-channel"), ("int8", "head")])
def test_quantisers_keep_their_bound_and_their_groups(fmt, group):
    g = torch.Generator().manual_seed(2)
    lengths, L = [150, 90], 150  # sample 0: one segment of 150; sample 1: 90 real, 60 padding
    x = torch.randn(2 * L, 3, 32, generator=g) * torch.rand(2 * L, 1, 1, generator=g) * 4
    tiles = F8.segment_tiles(lengths, L, 64)
    payload, scale = quantize(x, fmt, group, tiles)
    assert payload.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    xq = payload.float() * scale
    amax = F8.group_amax(x, group, tiles)
    if fmt == "int8":  # uniform steps: half a step of amax / 127 at most
        assert ((xq - x).abs() <= amax / 127 / 2 * (1 + 1e-6)).all()
    else:  # e4m3: half an ulp (2^-4 of the value) for normal numbers, half the smallest step below
        tiny = amax / 448 * 2.0 ** -6
        assert ((xq - x).abs() <= torch.maximum(x.abs() * 2.0 ** -4, tiny * 2.0 ** -3) * (1 + 1e-6)).all()
    assert (amax.amax(dim=-1) <= x.abs().amax(dim=-1).amax(dim=0) + 0).all()
    # a group's scale depends on its own members only: scale token 200 up (sample 1's real segment
    # [150, 240), its tile [150, 214))
    y = x.clone()
    y[200] *= 50
    yq = quantize(y, fmt, group, tiles)[0].float() * quantize(y, fmt, group, tiles)[1]
    untouched = {"head": list(range(150)) + list(range(240, 300)), "channel": list(range(150)) + list(range(240, 300)),
                 "token": [i for i in range(300) if i != 200], "block": list(range(150)) + list(range(214, 300)),
                 "block-channel": list(range(150)) + list(range(214, 300))}[group]
    assert torch.equal(yq[untouched], xq[untouched])  # other samples, the padding segment, other tiles
    if group != "token":  # and the members of its own group do change scale
        mates = [i for i in range(150, 240) if i != 200 and i not in untouched]
        assert not torch.equal(yq[mates], xq[mates])


@pytest.mark.parametrize("name", ["fp8-head", "fp8-block+KV", "int8qk-block+KV"])
def test_fp8_padding_never_reaches_real_tokens(name):
    """The scales and means come from the real tokens (and blocks from each segment's start), so what the
    padding holds changes no real output, bit for bit."""
    q, k, v = qkv(2, seed=4)
    lens = torch.tensor([2, 8])
    out = fp8_attention(q, k, v, img_len=IMG, txt_lens=lens, recipe=RECIPES[name])
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for b, n in enumerate((IMG + 2, IMG + 8)):
        for t in (q2, k2, v2):
            t[b, n:] = 100 * torch.randn_like(t[b, n:])
    out2 = fp8_attention(q2, k2, v2, img_len=IMG, txt_lens=lens, recipe=RECIPES[name])
    for b, n in enumerate((IMG + 2, IMG + 8)):
        assert torch.equal(out[b, :n], out2[b, :n])


def test_each_step_of_the_recipe_lowers_the_error_on_offset_keys():
    """Keys sharing an offset 8x their spread and a peaky softmax (benchmarks/fp8_attention_error.py's
    case at L = 1024): smoothing, then INT8 QK^T, each cut the measured error."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("fp8_attention_error", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "fp8_attention_error.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    q, k, v = bench.synthetic_cases(1024, nh=2)["offset+peaky"]
    ref = A.attention(q, k, v, img_len=1024)
    err = {n: relative_error(fp8_attention(q, k, v, img_len=1024, recipe=RECIPES[n]), ref)
           for n in ("fp8-head", "fp8-head+K", "fp8-head+KV", "int8qk-block+KV")}
    assert err["fp8-head+K"] < 0.5 * err["fp8-head"]
    assert err["fp8-head+KV"] < err["fp8-head+K"]
    assert err["int8qk-block+KV"] < 0.5 * err["fp8-head+KV"]
    assert err["int8qk-block+KV"] <= 0.03


def test_long_sequences_are_chunked_to_the_same_result():
    q, k, v = qkv(1, seed=5, L=300)
    r = RECIPES["int8qk-block+KV"]
    whole = fp8_attention(q, k, v, img_len=300, recipe=r)
    chunked = fp8_attention(q, k, v, img_len=300, recipe=r, max_elements=300 * 7)  # 3 query rows at a time
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------- the Triton kernel, interpreted
KERNEL_SCRIPT = """
import dataclasses, json, torch
from hvlab.attention import attention
from hvlab.fast import accelerate
from hvlab.fast.fp8_attention import RECIPES, fp8_attention, fp8_attention_triton, relative_error
from tests.test_fast_attention import _inputs, _model
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(3, 150, 1, 32, generator=g) for _ in range(3))
q, k = 2 * q, k + 4 * torch.randn(1, 1, 1, 32, generator=g)
lens, img = torch.tensor([0, 5, 30]), 120  # segments of 120, 30, 125, 25, 150: 1 to 5 key tiles of 32
n = [img + int(x) for x in lens]
ref = attention(q, k, v, img_len=img, txt_lens=lens)
res = {}
for name in ("fp8-head", "int8qk-block+KV", "int8qk-block+K-bf16pv"):
    r = dataclasses.replace(RECIPES[name], block=32)
    kern = fp8_attention_triton(q, k, v, img_len=img, txt_lens=lens, recipe=r)
    emul = fp8_attention(q, k, v, img_len=img, txt_lens=lens, recipe=r)
    res[name] = [relative_error(kern, emul, n), relative_error(emul, ref, n)]
model, inp = _model(), _inputs()
with torch.no_grad():
    accelerate(model, attention="fp8", fused="eager", fp8_recipe=RECIPES["int8qk-block+KV"])
    import os; os.environ.pop("TRITON_INTERPRET")  # FastAttention picks the emulation on the CPU again
    a = model(*inp)
    os.environ["TRITON_INTERPRET"] = "1"
    b = model(*inp)  # the kernel (tiny model: head_dim 32, one tile per segment)
res["model"] = [relative_error(b, a), 0.0]
print(json.dumps(res))
"""


@pytest.mark.skipif(F8.triton is None, reason="triton is not installed (pip install triton)")
def test_triton_kernel_under_the_interpreter_equals_the_emulation():
    """Multi-tile segments of mixed lengths, the three recipe families: the kernel's online softmax, scales and P
    rounding give the emulation's numbers (fp32 order only: 1e-6 to 4e-5 measured, where a rounding tie
    flips), far inside each recipe's own error (1.7% to 16% here)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (kernel_vs_emulation, emulation_vs_exact) in res.items():
        assert kernel_vs_emulation <= 2e-4, (name, kernel_vs_emulation)  # a few e4m3 rounding ties flip
        assert name == "model" or emulation_vs_exact >= 50 * kernel_vs_emulation  # the recipe's own error


def test_bench_dit_quick_runs_the_new_paths_and_names_what_is_missing(tmp_path):
    import importlib.util
    import os

    from hvlab import attention
    from hvlab.fast.fp8 import FP8FallbackWarning
    from hvlab.fast.fp8_attention import DEFAULT_RECIPE

    spec = importlib.util.spec_from_file_location("bench_dit", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "bench_dit.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backend = attention.get_attention_backend()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FP8FallbackWarning)
            report = bench.main(["--quick", "--impls", "hvlab-fa3,hvlab-fp8-fp8attn", "--out", str(tmp_path),
                                 "--device", "cpu"])
    finally:
        attention.set_attention_backend(backend)
    rows = {r["impl"]: r for r in report["results"]}
    if FA.fa3_varlen_func() is None:  # this CPU: the FA3 row says why it did not run, the others still ran
        assert "needs FlashAttention-3" in rows["hvlab-fa3"]["error"]
    r = rows["hvlab-fp8-fp8attn"]
    assert "error" not in r and r["finite"] and r["attention"] == "fp8"
    assert r["fp8_attention_recipe"] == str(DEFAULT_RECIPE)


def test_fp8_attention_error_quick_writes_its_table(tmp_path):
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location("fp8_attention_error", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "fp8_attention_error.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "fp8_attention_error.json").read_text())
    assert saved["synthetic"]["rows"] == report["synthetic"]["rows"]
    rows = saved["synthetic"]["rows"]
    assert rows["int8qk-block+KV"]["offset+peaky"] < rows["fp8-head"]["offset+peaky"]
    assert "| int8qk-block+KV |" in bench.tables(report)
    a = torch.rand(3, 4, 16, 16)
    assert bench.psnr(a, a) == float("inf") and bench.ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.01 * torch.randn_like(a)).clamp(0, 1)
    assert 35 < bench.psnr(noisy, a) < 45 and bench.ssim(noisy, a) < bench.ssim(a, a)


# ------------------------------------------------------------------------------------ on a GPU (pending)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_gpu_fa3_within_bf16_noise_at_the_720p_shape_and_padding_exact():
    L_img, L_txt = 33 * 45 * 80, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, L_img + L_txt, 24, 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    ok, reason = FA.fa3_serves(q)
    if not ok:
        pytest.skip(reason)
    lens = torch.tensor([24], device="cuda")
    out = fa3_attention(q, k, v, img_len=L_img, txt_lens=lens)
    ref = A.attention(q, k, v, img_len=L_img, txt_lens=lens)  # cuDNN SDPA on the real segment
    n = L_img + 24
    assert relative_error(out[:, :n], ref[:, :n]) <= 1e-2  # two bf16 kernels: ~3e-3 (issue 17's measurement)
    for t in (q, k, v):
        t[:, n:] = 50 * torch.randn_like(t[:, n:])
    assert torch.equal(fa3_attention(q, k, v, img_len=L_img, txt_lens=lens)[:, :n], out[:, :n])


@gpu
@pytest.mark.parametrize("name", ["int8qk-block+KV", "int8qk-block+K-bf16pv", "fp8-head"])
def test_gpu_fp8_kernel_tracks_the_emulation(name):
    """The compiled kernel (tensor-core int8 / e4m3 / bf16 dots, exp2) against the emulation at L = 4096 with
    keys sharing an offset: close to it, and no less accurate than it against exact attention."""
    ok, reason = F8.triton_serves(torch.empty(1, 1, 1, 128, device="cuda"), RECIPES[name])
    if not ok:
        pytest.skip(reason)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4096, 8, 128, generator=g, device="cuda") for _ in range(3))
    q, k = (3 * q).bfloat16(), (k + 6 * torch.randn(1, 1, 8, 128, generator=g, device="cuda")).bfloat16()
    v = v.bfloat16()
    lens = torch.tensor([3, 200], device="cuda")
    img = 4096 - 256
    n = [img + 3, img + 200]
    exact = A.attention(q.float(), k.float(), v.float(), img_len=img, txt_lens=lens)
    kern = F8.fp8_attention_triton(q, k, v, img_len=img, txt_lens=lens, recipe=RECIPES[name]).float()
    emul = fp8_attention(q, k, v, img_len=img, txt_lens=lens, recipe=RECIPES[name]).float()
    assert relative_error(kern, emul, n) <= 1e-2
    assert relative_error(kern, exact, n) <= relative_error(emul, exact, n) + 5e-3
