"""The two attention paths: a fast one (never builds an L x L tensor) and an explicit one that shows its work.

Layout everywhere: q, k, v are ``(B, L, nh, hd)`` with the sequence ordered
``[image tokens (img_len) | text tokens (L - img_len)]``; text is padded on the right to a fixed length.

**Segments.** What differs from a vanilla DiT is how padding is handled. The official model calls
flash-attn's *varlen* kernel with ``cu_seqlens = [0, n_0, L, L + n_1, 2L, ...]`` where ``n_b = img_len +
txt_lens[b]``. So in sample b:

- the ``n_b`` real tokens (all image tokens and the first ``txt_lens[b]`` text tokens) attend only to each
  other, and
- the padded text tokens form a segment of their own and attend only among themselves. Their outputs are
  junk, but no real token ever reads them, so padding never changes the video.

``attention`` reproduces this with plain SDPA calls on contiguous slices (samples with the same ``n_b`` share
one call), or with ``flash_attn_varlen_func`` when asked for. With no mask, SDPA may use a fused kernel; on CUDA
the backends "auto" and "cudnn" ask for cuDNN's first (on the lent H100 at 720p: ~564 TFLOP/s against ~350 for
flash), then flash, memory-efficient and math, in that priority. On the CPU nothing changes. ``attention_explicit`` builds the same segment
mask and returns the probabilities, for teaching and capture at small sizes. A test keeps them equal.

**Token refiner rule.** The text refiner uses a different mask: ``valid_i AND valid_j``, with key 0 always
visible. A padded query therefore sees key 0 only, and its output is exactly ``v[0]``.

**Probabilities without an L x L tensor.** ``A[i, j] = softmax_j(q_i . k_j / sqrt(hd))`` over a sample's real
keys. At 720p the sequence has ~119k tokens and one head's matrix would be 56 GB, so ``text_video_probs`` and
``video_query_probs`` return only the entries asked for: a few rows are cheap (one softmax each); a column
needs every video row's exact normaliser ``lse_i = logsumexp_j (q_i . k_j / sqrt(hd))``, computed in chunks of
rows (``max_elements`` scores at a time), then ``exp(score - lse)`` at the wanted keys. The scores
``q . k / sqrt(hd)`` in fp32 are written once, in ``attention_scores``, and every explicit path uses them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
from typing import Sequence

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "cudnn", "sdpa", "flash")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Choose the fast path's kernel.

    "auto" (default) and "cudnn": SDPA asking for cuDNN first on CUDA (`sdpa_priority`); "cudnn" raises on
    tensors it cannot serve. "sdpa": SDPA with torch's own choice. "flash": flash-attn's varlen kernel.
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    if name == "flash" and not _flash_installed():
        raise ValueError("attention backend 'flash' needs the flash_attn package (pip install flash-attn)")
    _backend = name


def sdpa_priority(device_type: str = "cuda"):
    """Context in which SDPA tries cuDNN, then flash, memory-efficient and math (a nullcontext off CUDA).

    ``set_priority=True`` (torch >= 2.6) makes the list an order, not only a set of allowed kernels; math
    stays last so a shape no fused kernel supports still runs.
    """
    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order)


def get_attention_backend() -> str:
    return _backend


def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _use_flash(q: torch.Tensor) -> bool:
    if _backend == "flash":
        if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
            raise ValueError(f"the flash backend needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}")
        return True
    return False


def _sdpa_context(q: torch.Tensor):
    """The kernel order for this call: cuDNN first on CUDA for "auto" / "cudnn", torch's choice otherwise."""
    if _backend == "cudnn" and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(f"the cudnn backend needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}; "
                         "use set_attention_backend('auto') to run anywhere")
    if _backend in ("auto", "cudnn") and q.is_cuda:
        return sdpa_priority("cuda")
    return contextlib.nullcontext()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, img_len: int,
           txt_lens: torch.Tensor | None) -> None:
    if v is None and (q.dim() != 4 or q.shape != k.shape):
        raise ValueError(f"q, k must both be (B, L, nh, hd) with the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if v is not None and (q.dim() != 4 or q.shape != k.shape or q.shape != v.shape):
        raise ValueError(
            f"q, k, v must all be (B, L, nh, hd) with the same shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, L = q.shape[:2]
    if not 0 <= img_len <= L:
        raise ValueError(f"img_len must lie in [0, L = {L}], got {img_len}")
    if txt_lens is not None:
        if txt_lens.shape != (B,):
            raise ValueError(f"txt_lens must be (B,) = ({B},), got shape {tuple(txt_lens.shape)}")
        if (txt_lens < 0).any() or (txt_lens > L - img_len).any():
            raise ValueError(f"txt_lens must lie in [0, L - img_len = {L - img_len}], got {txt_lens.tolist()}")


def valid_lengths(B: int, L: int, img_len: int, txt_lens: torch.Tensor | None) -> list[int]:
    """n_b = img_len + txt_lens[b]: the number of real tokens of each sample (a Python list; syncs once on GPU)."""
    if txt_lens is None:
        return [L] * B
    return [img_len + int(n) for n in txt_lens.tolist()]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants (B, nh, L, hd); no mask, so torch may pick its flash / cuDNN / efficient kernel.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, L, nh, hd)


def segment_bounds(lengths: list[int], L: int) -> list[int]:
    """Segment boundaries in the flattened (B * L) sequence: ``[0, n_0, L, L + n_1, 2L, ...]``, 2B + 1 numbers.

    Sample b is two segments: its ``n_b`` real tokens, then its padding (empty when ``n_b == L``).
    """
    bounds = [0]
    for b, n in enumerate(lengths):
        if not 0 <= n <= L:
            raise ValueError(f"each length must lie in [0, L = {L}], got {n} for sample {b}")
        bounds += [b * L + n, (b + 1) * L]
    return bounds


def get_cu_seqlens(text_mask: torch.Tensor, img_len: int) -> torch.Tensor:
    """The official ``get_cu_seqlens(text_mask, img_len)``: flash-attn's ``cu_seqlens`` for the joint sequence.

    ``text_mask`` (B, L_txt) ones then zeros; returns int32 (2B + 1,) on the mask's device, the
    `segment_bounds` of ``n_b = img_len + text_mask[b].sum()`` with ``L = img_len + L_txt``.
    """
    if text_mask.dim() != 2:
        raise ValueError(f"text_mask must be (B, L_txt), got shape {tuple(text_mask.shape)}")
    B, L_txt = text_mask.shape
    valid = text_mask.bool()
    txt_lens = valid.sum(1)
    if not torch.equal(valid, torch.arange(L_txt, device=valid.device)[None, :] < txt_lens[:, None]):
        raise ValueError("text_mask must be ones then zeros in every row (padding on the right), got "
                         f"{text_mask.int().tolist()}")
    lengths = valid_lengths(B, img_len + L_txt, img_len, txt_lens)
    return torch.tensor(segment_bounds(lengths, img_len + L_txt), dtype=torch.int32, device=text_mask.device)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    B, L, nh, hd = q.shape
    cu = torch.tensor(segment_bounds(lengths, L), dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        q.reshape(B * L, nh, hd), k.reshape(B * L, nh, hd), v.reshape(B * L, nh, hd), cu, cu, L, L
    )
    return out.reshape(B, L, nh, hd)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, img_len: int, txt_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Segment attention without masks: real tokens among themselves, padding among itself. Returns (B, L, nh, hd)."""
    _check(q, k, v, img_len, txt_lens)
    B, L = q.shape[:2]
    lengths = valid_lengths(B, L, img_len, txt_lens)
    if _use_flash(q):
        return _flash_varlen(q, k, v, lengths)
    with _sdpa_context(q):
        return _segments_sdpa(q, k, v, lengths)


def _segments_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                   kernel=None) -> torch.Tensor:
    """The segments of every sample, each through ``kernel(q, k, v)`` on (b, n, nh, hd) slices (default SDPA);
    the fast wing passes its own kernels (e.g. FP8 attention) to keep these semantics in one place."""
    kernel = _sdpa if kernel is None else kernel
    B, L = q.shape[:2]
    if all(n == L for n in lengths):
        return kernel(q, k, v)
    out = torch.empty_like(q)
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        groups.setdefault(n, []).append(b)
    for n, members in groups.items():
        rows = slice(None) if len(members) == B else torch.tensor(members, device=q.device)
        qb, kb, vb = q[rows], k[rows], v[rows]
        if n > 0:
            out[rows, :n] = kernel(qb[:, :n], kb[:, :n], vb[:, :n])  # real tokens
        if n < L:
            out[rows, n:] = kernel(qb[:, n:], kb[:, n:], vb[:, n:])  # the padding segment
    return out


def segment_mask(B: int, L: int, img_len: int, txt_lens: torch.Tensor | None, device=None) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query i may attend to key j: both real, or both padding, of one sample."""
    lengths = torch.tensor(valid_lengths(B, L, img_len, txt_lens), device=device)
    is_pad = torch.arange(L, device=device)[None, :] >= lengths[:, None]  # (B, L)
    return (is_pad[:, :, None] == is_pad[:, None, :]).unsqueeze(1)


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The logits of attention: ``q (..., Lq, hd)``, ``k (..., Lk, hd)`` -> ``q . k / sqrt(hd)``, fp32 (..., Lq, Lk)."""
    return (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5


def _explicit(q, k, v, mask: torch.Tensor | None, return_probs: bool):
    scores = attention_scores(q.transpose(1, 2), k.transpose(1, 2))  # (B, nh, L, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)  # (B, L, nh, hd)
    return out, (probs if return_probs else None)


def attention_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    img_len: int,
    txt_lens: torch.Tensor | None = None,
    return_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same segment attention as ``attention``, written out: scores, mask, fp32 softmax.

    Returns ``(out (B, L, nh, hd), probs (B, nh, L, L) or None)``. Memory grows as L^2: small sizes only.
    """
    _check(q, k, v, img_len, txt_lens)
    B, L = q.shape[:2]
    mask = None if txt_lens is None else segment_mask(B, L, img_len, txt_lens, q.device)
    return _explicit(q, k, v, mask, return_probs)


# --- probabilities without an L x L tensor ---------------------------------------------------------------

DIRECTIONS = ("key", "query")  # text token as key (a column of A) / text token as query (a row of A)


def _selection(q: torch.Tensor, rows, heads) -> tuple[list[int], list[int]]:
    B, nh = q.shape[0], q.shape[2]
    rows = list(range(B)) if rows is None else [int(b) for b in rows]
    heads = list(range(nh)) if heads is None else [int(h) for h in heads]
    if any(not 0 <= b < B for b in rows):
        raise IndexError(f"rows must lie in [0, {B - 1}] (the batch has {B} samples), got {rows}")
    if any(not 0 <= h < nh for h in heads):
        raise IndexError(f"heads must lie in [0, {nh - 1}] (q has {nh} heads), got {heads}")
    return rows, heads


@torch.no_grad()
def text_video_probs(q: torch.Tensor, k: torch.Tensor, *, img_len: int, txt_lens: torch.Tensor | None = None,
                     direction: str = "key", rows: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                     max_elements: int = 2**26) -> torch.Tensor:
    """Exact attention probabilities between every real text token and the video tokens.

    q, k: (B, L, nh, hd) as a block passes them to ``attn_fn`` ([video | text], text padded right).
    ``direction="key"``: ``P[b, h, j, i] = A[i, img_len + j]``, video query i's weight on text key j,
    normalised over all of row i's keys with a chunked log-sum-exp (``max_elements`` scores at a time).
    ``direction="query"``: ``P[b, h, j, i] = A[img_len + j, i]``, text query j's weight on video key i.
    Returns (len(rows), len(heads), n_txt, img_len) float32 on q's device, n_txt = the largest real text
    length among ``rows``; entries of padded text tokens are 0.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1 (scores held at once), got {max_elements}")
    _check(q, k, None, img_len, txt_lens)
    B, L = q.shape[:2]
    rows, heads = _selection(q, rows, heads)
    lengths = valid_lengths(B, L, img_len, txt_lens)
    n_txt = max(lengths[b] for b in rows) - img_len
    out = torch.zeros(len(rows), len(heads), n_txt, img_len, device=q.device)
    for bi, b in enumerate(rows):
        n = lengths[b]
        for hi, h in enumerate(heads):
            kh = k[b, :n, h]  # (n, hd): the sample's real keys only
            if direction == "query":  # a few rows: one softmax each
                out[bi, hi, :n - img_len] = attention_scores(q[b, img_len:n, h], kh).softmax(dim=-1)[:, :img_len]
                continue
            chunk = max(1, max_elements // n)
            for r0 in range(0, img_len, chunk):
                r1 = min(r0 + chunk, img_len)
                s = attention_scores(q[b, r0:r1, h], kh)  # (c, n): one chunk of video rows
                lse = torch.logsumexp(s, dim=-1, keepdim=True)  # exact normaliser of each row
                out[bi, hi, :n - img_len, r0:r1] = (s[:, img_len:n] - lse).exp().T
    return out


@torch.no_grad()
def video_query_probs(q: torch.Tensor, k: torch.Tensor, query_index: Sequence[int], *, img_len: int,
                      txt_lens: torch.Tensor | None = None, rows: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None) -> torch.Tensor:
    """Rows of A for chosen video query tokens, restricted to the video keys:
    (len(rows), len(heads), len(query_index), img_len) float32 (normalised over all real keys)."""
    _check(q, k, None, img_len, txt_lens)
    B, L = q.shape[:2]
    rows, heads = _selection(q, rows, heads)
    idx = [int(i) for i in query_index]
    if any(not 0 <= i < img_len for i in idx):
        raise IndexError(f"query_index must lie in [0, img_len - 1 = {img_len - 1}] (video tokens), got {idx}")
    lengths = valid_lengths(B, L, img_len, txt_lens)
    idx_t = torch.tensor(idx, device=q.device, dtype=torch.long)
    out = torch.zeros(len(rows), len(heads), len(idx), img_len, device=q.device)
    for bi, b in enumerate(rows):
        n = lengths[b]
        for hi, h in enumerate(heads):
            out[bi, hi] = attention_scores(q[b, idx_t, h], k[b, :n, h]).softmax(dim=-1)[:, :img_len]
    return out


# --- the token refiner's rule -----------------------------------------------------------------------------

def refiner_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) valid flags -> (B, 1, L, L) bool: valid_i AND valid_j, and key 0 always visible."""
    valid = mask.bool()
    full = valid[:, :, None] & valid[:, None, :]
    full[:, :, 0] = True  # no query row is ever fully masked (softmax of all -inf would be NaN)
    return full.unsqueeze(1)


def refiner_attention_explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, return_probs: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refiner self-attention with the mask built out; q, k, v (B, L, nh, hd), mask (B, L) or None (all valid)."""
    return _explicit(q, k, v, None if mask is None else refiner_mask(mask), return_probs)


def refiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Refiner self-attention without an L x L mask when ``mask`` is a prefix of ones per row.

    Valid rows attend to the first n tokens (SDPA on the slice); padded rows see key 0 only, so their
    output is ``v[:, 0]``. A non-prefix mask falls back to SDPA with the explicit boolean mask.
    """
    if mask is None:
        return _sdpa(q, k, v)
    B, L = mask.shape
    valid = mask.bool()
    lengths = valid.sum(1)
    if not torch.equal(valid, torch.arange(L, device=mask.device)[None, :] < lengths[:, None]):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=refiner_mask(mask)
        )
        return out.transpose(1, 2)
    out = v[:, :1].expand_as(v).clone()  # padded rows: v at key 0
    for n in sorted(set(lengths.tolist())):
        if n == 0:
            continue
        rows = torch.nonzero(lengths == n).squeeze(1)
        out[rows, :n] = _sdpa(q[rows, :n], k[rows, :n], v[rows, :n])
    return out
