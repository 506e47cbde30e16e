"""The fast attention path equals the explicit one, padding never reaches real tokens, and the probability
helpers (chunked columns, selected rows) equal the explicit probabilities."""
import pytest
import torch
import torch.nn.functional as F

from hvlab import attention as A
from hvlab.blocks import MMDoubleStreamBlock
from hvlab.model import randomize_weights_

IMG, TXT, NH, HD = 10, 6, 2, 16
L = IMG + TXT


def qkv(B, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, NH, HD, generator=g).to(dtype) for _ in range(3)]


def per_token_reference(q, k, v, img_len, txt_lens):
    """Independent reference: each query row softmaxes over the keys of its own segment, one row at a time."""
    B = q.shape[0]
    out = torch.empty_like(q, dtype=torch.float64)
    for b in range(B):
        n = img_len + (L - img_len if txt_lens is None else int(txt_lens[b]))
        for i in range(L):
            keys = range(0, n) if i < n else range(n, L)
            kk, vv = k[b, list(keys)].double(), v[b, list(keys)].double()  # (K, nh, hd)
            s = torch.einsum("hd,khd->hk", q[b, i].double(), kk) / HD**0.5
            out[b, i] = torch.einsum("hk,khd->hd", s.softmax(-1), vv)
    return out


@pytest.mark.parametrize("txt_lens", [None, [6], [0], [3], [6, 2], [1, 4, 1]])
def test_fast_equals_explicit_and_reference(txt_lens):
    B = 1 if txt_lens is None else len(txt_lens)
    lens = None if txt_lens is None else torch.tensor(txt_lens)
    q, k, v = qkv(B)
    fast = A.attention(q, k, v, img_len=IMG, txt_lens=lens)
    explicit, probs = A.attention_explicit(q, k, v, img_len=IMG, txt_lens=lens)
    torch.testing.assert_close(fast, explicit, atol=1e-6, rtol=1e-5)  # fp32 SDPA vs fp32 einsum
    torch.testing.assert_close(fast.double(), per_token_reference(q, k, v, IMG, lens), atol=1e-6, rtol=1e-5)
    assert probs.shape == (B, NH, L, L)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, NH, L))


def test_probs_never_cross_segments():
    q, k, v = qkv(2)
    lens = torch.tensor([2, 5])
    _, probs = A.attention_explicit(q, k, v, img_len=IMG, txt_lens=lens)
    for b, n in enumerate((IMG + 2, IMG + 5)):
        assert probs[b, :, :n, n:].abs().max() == 0  # real queries never read padding
        assert probs[b, :, n:, :n].abs().max() == 0  # padding reads only padding


def test_padding_values_do_not_change_real_tokens():
    q, k, v = qkv(2)
    lens = torch.tensor([3, 1])
    out = A.attention(q, k, v, img_len=IMG, txt_lens=lens)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for b, n in enumerate((IMG + 3, IMG + 1)):
        for t in (q2, k2, v2):
            t[b, n:] = 100 * torch.randn_like(t[b, n:])
    out2 = A.attention(q2, k2, v2, img_len=IMG, txt_lens=lens)
    torch.testing.assert_close(out2[0, : IMG + 3], out[0, : IMG + 3])
    torch.testing.assert_close(out2[1, : IMG + 1], out[1, : IMG + 1])


def test_batched_equals_one_sample_at_a_time():
    q, k, v = qkv(3, seed=4)
    lens = torch.tensor([6, 2, 2])
    out = A.attention(q, k, v, img_len=IMG, txt_lens=lens)
    for b in range(3):
        alone = A.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], img_len=IMG, txt_lens=lens[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], alone)


def test_refiner_fast_equals_explicit_and_padded_rows_copy_v0():
    q, k, v = qkv(3, seed=5)
    mask = torch.zeros(3, L, dtype=torch.bool)
    mask[0, :L] = True
    mask[1, :4] = True  # prefix
    mask[2, :0] = True  # no valid tokens: every row sees key 0 only
    fast = A.refiner_attention(q, k, v, mask)
    explicit, probs = A.refiner_attention_explicit(q, k, v, mask)
    torch.testing.assert_close(fast, explicit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast[1, 4:], v[1, :1].expand(L - 4, NH, HD))
    torch.testing.assert_close(fast[2], v[2, :1].expand(L, NH, HD))
    # the rule written out: valid_i AND valid_j, plus key 0
    m = A.refiner_mask(mask)[1, 0]
    assert m[0].all() == False and m[0, :4].all() and m[5, 0] and not m[5, 1:].any()  # noqa: E712


def test_refiner_non_prefix_mask_falls_back_to_masked_sdpa():
    q, k, v = qkv(1, seed=6)
    mask = torch.tensor([[1, 0, 1, 1] + [0] * (L - 4)]).bool()
    fast = A.refiner_attention(q, k, v, mask)
    explicit, _ = A.refiner_attention_explicit(q, k, v, mask, return_probs=False)
    torch.testing.assert_close(fast, explicit, atol=1e-6, rtol=1e-5)


def test_refiner_matches_torch_boolean_mask_sdpa():
    q, k, v = qkv(2, seed=7)
    mask = torch.tensor([[1] * 9 + [0] * (L - 9), [1] * L]).bool()
    valid = mask[:, :, None] & mask[:, None, :]
    valid[:, :, 0] = True
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=valid[:, None])
    torch.testing.assert_close(A.refiner_attention(q, k, v, mask), ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_block_attn_fn_is_swappable_at_call_time():
    """Hooks replace ``block.attn_fn``; the explicit path must give the same block output."""
    torch.manual_seed(8)
    block = randomize_weights_(MMDoubleStreamBlock(32, 2))
    img, txt, vec = torch.randn(2, IMG, 32), torch.randn(2, TXT, 32), torch.randn(2, 32)
    lens = torch.tensor([6, 3])
    ref_img, ref_txt = block(img, txt, vec, txt_lens=lens)
    captured = []

    def explicit(q, k, v, *, img_len, txt_lens=None):
        out, probs = A.attention_explicit(q, k, v, img_len=img_len, txt_lens=txt_lens)
        captured.append(probs)
        return out

    block.attn_fn = explicit
    img2, txt2 = block(img, txt, vec, txt_lens=lens)
    torch.testing.assert_close(img2, ref_img, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(txt2, ref_txt, atol=1e-6, rtol=1e-5)
    assert captured[0].shape == (2, 2, L, L)


def test_bad_inputs_and_backend():
    q, k, v = qkv(2)
    with pytest.raises(ValueError, match=r"txt_lens must be \(B,\) = \(2,\)"):
        A.attention(q, k, v, img_len=IMG, txt_lens=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[0, L - img_len = 6\]"):
        A.attention(q, k, v, img_len=IMG, txt_lens=torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="same shape"):
        A.attention(q, k[:, :3], v, img_len=IMG)
    with pytest.raises(ValueError, match="one of"):
        A.set_attention_backend("xformers")
    assert A.get_attention_backend() == "auto"
    A.set_attention_backend("sdpa")
    try:
        torch.testing.assert_close(A.attention(q, k, v, img_len=IMG), A.attention_explicit(q, k, v, img_len=IMG)[0],
                                   atol=1e-6, rtol=1e-5)
    finally:
        A.set_attention_backend("auto")


def test_gradients_match_explicit():
    """Training goes through the fast path: its gradients must equal the explicit path's."""
    lens = torch.tensor([6, 2, 2])
    grads = []
    for fn in (A.attention, lambda *a, **kw: A.attention_explicit(*a, **kw)[0]):
        q, k, v = (t.requires_grad_() for t in qkv(3, seed=9))
        out = fn(q, k, v, img_len=IMG, txt_lens=lens)
        (out * torch.linspace(-1, 1, HD)).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for g_fast, g_explicit in zip(*grads):
        # float32 SDPA backward vs autograd through the einsum path: measured max 2.4e-7
        torch.testing.assert_close(g_fast, g_explicit, atol=1e-6, rtol=0)


# --- probabilities without an L x L tensor ---------------------------------------------------------------
# text_video_probs normalises a column with a chunked log-sum-exp, attention_explicit with softmax; both start
# from the same fp32 scores, so they agree to ~1e-7 on probabilities <= 1; 1e-6 is asserted.
PROBS_ATOL = 1e-6


def _qk(B=3, L=40, nh=2, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, nh, hd, generator=g) for _ in range(3)]


@pytest.mark.parametrize("max_elements", [50, 2**26])  # many chunks of query rows / a single chunk
def test_text_video_probs_equal_explicit_probabilities(max_elements):
    q, k, v = _qk()
    img_len, txt_lens = 30, torch.tensor([10, 4, 7])  # padded text: 10 slots, fewer real tokens in rows 1, 2
    _, probs = A.attention_explicit(q, k, v, img_len=img_len, txt_lens=txt_lens)  # (B, nh, L, L)
    for direction in ("key", "query"):
        got = A.text_video_probs(q, k, img_len=img_len, txt_lens=txt_lens, direction=direction,
                                 max_elements=max_elements)  # (B, nh, n_txt, L_img)
        for b, n in enumerate(txt_lens.tolist()):
            ref = (probs[b, :, :img_len, img_len:img_len + n].transpose(1, 2) if direction == "key"
                   else probs[b, :, img_len:img_len + n, :img_len])
            torch.testing.assert_close(got[b, :, :n], ref, atol=PROBS_ATOL, rtol=0)
            assert torch.all(got[b, :, n:] == 0)  # padded text tokens get no map


def test_video_query_probs_equal_explicit_rows():
    q, k, v = _qk()
    txt_lens = torch.tensor([10, 4, 7])
    _, probs = A.attention_explicit(q, k, v, img_len=30, txt_lens=txt_lens)
    got = A.video_query_probs(q, k, [0, 7, 29], img_len=30, txt_lens=txt_lens)
    torch.testing.assert_close(got, probs[:, :, [0, 7, 29], :30], atol=PROBS_ATOL, rtol=0)


def test_probability_helpers_reject_bad_selections():
    q, k, _ = _qk()
    with pytest.raises(ValueError, match="direction must be one of"):
        A.text_video_probs(q, k, img_len=30, direction="column")
    with pytest.raises(IndexError, match=r"heads must lie in \[0, 1\].*got \[2\]"):
        A.text_video_probs(q, k, img_len=30, heads=[2])
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 2\].*got \[3\]"):
        A.video_query_probs(q, k, [0], img_len=30, rows=[3])
    with pytest.raises(IndexError, match=r"query_index must lie in \[0, img_len - 1 = 29\].*got \[30\]"):
        A.video_query_probs(q, k, [30], img_len=30)
    with pytest.raises(ValueError, match="same shape"):
        A.text_video_probs(q, k[:, :3], img_len=30)
    with pytest.raises(ValueError, match=r"\[0, L - img_len = 10\]"):
        A.video_query_probs(q, k, [0], img_len=30, txt_lens=torch.tensor([1, 2, 11]))


def test_get_cu_seqlens_matches_the_official_formula():
    """Independent reference, written from the official loop: for sample i, s = img_len + text_len[i];
    cu[2i + 1] = i * max_len + s and cu[2i + 2] = (i + 1) * max_len, with max_len = L_txt + img_len."""
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    cu = A.get_cu_seqlens(mask, IMG)
    max_len = mask.shape[1] + IMG
    ref = torch.zeros(2 * mask.shape[0] + 1, dtype=torch.int32)
    for i, n in enumerate(mask.sum(1).tolist()):
        ref[2 * i + 1] = i * max_len + IMG + n
        ref[2 * i + 2] = (i + 1) * max_len
    assert cu.dtype == torch.int32 and cu.shape == (2 * 3 + 1,)  # the blocks' assert: 2B + 1
    assert torch.equal(cu, ref)
    assert cu.tolist() == [0, 13, 16, 32, 32, 43, 48]  # sample 1 has no padding: an empty segment
    with pytest.raises(ValueError, match="ones then zeros"):
        A.get_cu_seqlens(torch.tensor([[1, 0, 1]]), IMG)
