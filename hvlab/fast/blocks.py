"""Fast DiT blocks: the reference blocks' maths with fewer passes over memory and a lower peak.

``FastDoubleStreamBlock`` / ``FastSingleStreamBlock`` / ``FastMLP`` subclass the reference classes of
``hvlab.blocks`` and ``hvlab.modulation`` and add no parameter, so a model keeps its state-dict keys when
``hvlab.fast.accelerate`` swaps them in (and ``hvlab.fast.restore`` swaps them back). Under ``torch.no_grad``
they differ from the reference only in *where* results land and in how many passes it takes:

- **Joint buffers, no cat.** q, k, v of both streams are written straight into (B, L, nh, hd) buffers
  (``kernels.norm_rope(out=...)``), instead of being built per stream and concatenated.
- **Fused kernels.** QK-norm + RoPE in one Triton pass per q / k; GELU (+ the single block's
  [attention | GELU] concatenation, + the FP8 activation quantiser) in one pass (``kernels.gelu_linear``);
  ``addcmul`` for modulate and the gated residuals (one rounding instead of two).
- **Token chunking.** At 720p (118,800 image tokens) the MLP's hidden activation is 2.9 GB in bf16 and
  the single block's ``linear1`` output 5.1 GB: more than any other tensor. Every step outside attention is
  per token, so with ``chunk_tokens = n`` those parts run n tokens at a time: the same numbers (each token
  sees the same weights), a lower peak.

With autograd on (training) they run the reference forward: one ``if``, as nanoGPT's ``if self.flash``.
``tests/test_fast.py`` checks fast == reference.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..blocks import MMDoubleStreamBlock, MMSingleStreamBlock
from ..modulation import MLP, chunk_modulation
from .kernels import gelu_linear, norm_rope


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``modulation.modulate`` in one ``addcmul``: one pass over x and one rounding instead of two."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + apply_gate(y, gate)`` in one ``addcmul``: the residual of every DiT block."""
    return torch.addcmul(x, y, gate.unsqueeze(1))


def token_chunks(L: int, chunk_tokens: int | None) -> list[slice]:
    """Token slices of at most ``chunk_tokens`` (one slice of all L tokens when chunking is off)."""
    if chunk_tokens is None or chunk_tokens >= L:
        return [slice(0, L)]
    return [slice(s, min(s + chunk_tokens, L)) for s in range(0, L, chunk_tokens)]


def _rows(freqs_cis, rows: slice):
    """The RoPE tables' rows for a token slice (None stays None)."""
    return None if freqs_cis is None else (freqs_cis[0][rows], freqs_cis[1][rows])


class FastMLP(MLP):
    """fc1 -> GELU(tanh) -> fc2 with GELU (and, for an FP8 fc2, its quantiser) fused into fc2's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_linear(self.fc2, self.fc1(x))


class _FastBlock:
    """What both fast blocks share: their settings (set by ``hvlab.fast.accelerate``)."""

    chunk_tokens: int | None = None  # tokens per chunk of the per-token parts; None: all at once
    kernels: str = "auto"  # norm_rope backend: "auto" (Triton on CUDA), "eager", or "kernel" (tests, interpreter)


class FastDoubleStreamBlock(_FastBlock, MMDoubleStreamBlock):
    """``MMDoubleStreamBlock`` writing q, k, v into joint buffers, with fused kernels and token chunks."""

    def forward(self, img, txt, vec, freqs_cis=None, txt_lens=None):
        if torch.is_grad_enabled():
            return super().forward(img, txt, vec, freqs_cis, txt_lens)
        img_msa, img_mlp = chunk_modulation(self.img_mod(vec), 2)  # (shift, scale, gate) x 2, each (B, D)
        txt_msa, txt_mlp = chunk_modulation(self.txt_mod(vec), 2)

        B, L_img, D = img.shape
        L_txt = txt.shape[1]
        q, k, v = (img.new_empty(B, L_img + L_txt, self.heads_num, D // self.heads_num) for _ in range(3))
        self._qkv_into(img, self.img_norm1, img_msa, self.img_attn_qkv, self.img_attn_q_norm,
                       self.img_attn_k_norm, freqs_cis, (q, k, v), 0)
        self._qkv_into(txt, self.txt_norm1, txt_msa, self.txt_attn_qkv, self.txt_attn_q_norm,
                       self.txt_attn_k_norm, None, (q, k, v), L_img)
        attn = self.attn_fn(q, k, v, img_len=L_img, txt_lens=txt_lens)  # (B, L, nh, hd)
        del q, k, v
        attn = rearrange(attn, "B L nh hd -> B L (nh hd)")
        img_attn, txt_attn = attn[:, :L_img], attn[:, L_img:]

        img = gated_residual(img, self.img_attn_proj(img_attn), img_msa.gate)
        img = self._mlp_residual(img, self.img_norm2, self.img_mlp, img_mlp)
        txt = gated_residual(txt, self.txt_attn_proj(txt_attn), txt_msa.gate)
        txt = self._mlp_residual(txt, self.txt_norm2, self.txt_mlp, txt_mlp)
        return img, txt

    def _qkv_into(self, x, norm1, mod, qkv, q_norm, k_norm, freqs_cis, bufs, offset: int) -> None:
        """norm1 -> modulate -> qkv -> QK-norm (+ RoPE when ``freqs_cis``), chunk by chunk, written into
        bufs = (q, k, v) at ``offset + token``: q and k directly by ``norm_rope``, v by a copy."""
        for s in token_chunks(x.shape[1], self.chunk_tokens):
            dst = slice(offset + s.start, offset + s.stop)
            x_mod = modulate(norm1(x[:, s]), mod.shift, mod.scale)
            q, k, bufs[2][:, dst] = rearrange(qkv(x_mod), "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
            tables = _rows(freqs_cis, s)
            norm_rope(q, q_norm, tables, dtype=x.dtype, backend=self.kernels, out=bufs[0][:, dst])
            norm_rope(k, k_norm, tables, dtype=x.dtype, backend=self.kernels, out=bufs[1][:, dst])

    def _mlp_residual(self, x: torch.Tensor, norm2, mlp, mod) -> torch.Tensor:
        """x + gate * MLP(modulate(norm2(x))), over token chunks."""
        chunks = token_chunks(x.shape[1], self.chunk_tokens)
        if len(chunks) == 1:
            return gated_residual(x, mlp(modulate(norm2(x), mod.shift, mod.scale)), mod.gate)
        out = torch.empty_like(x)  # (B, L, D)
        for s in chunks:
            out[:, s] = gated_residual(x[:, s], mlp(modulate(norm2(x[:, s]), mod.shift, mod.scale)), mod.gate)
        return out


class FastSingleStreamBlock(_FastBlock, MMSingleStreamBlock):
    """``MMSingleStreamBlock`` with linear1 -> QK-norm + RoPE per chunk into buffers, and GELU fused into linear2.

    Unchunked, no buffer is allocated: v and the MLP input stay views of ``linear1``'s output, and only q and
    k are new tensors: buffers filled from the whole (B, L, 3D + mlp_hidden) ``linear1`` output would hold
    its 7 (B, L, D) a second time at the block's peak (+1 (B, L, D) over the pre-issue-16 blocks, 0.68 GiB
    at 720p: ``bench_dit.py --impls hvlab-fp8`` 24.38 GiB on an H200 against 23.7 before).
    """

    def forward(self, x, vec, img_len, freqs_cis=None, txt_lens=None):
        if torch.is_grad_enabled():
            return super().forward(x, vec, img_len, freqs_cis, txt_lens)
        (mod,) = chunk_modulation(self.modulation(vec), 1)
        B, L, D = x.shape
        chunks = token_chunks(L, self.chunk_tokens)
        if len(chunks) == 1:  # all tokens at once: q, k new; v and mlp_in views of linear1's output
            q, k, v, mlp_in = self._linear1_qk(x, mod, chunks[0], img_len, freqs_cis)
        else:  # per chunk into q, k, v and mlp_in buffers: one chunk of linear1's output at a time
            q, k, v = (x.new_empty(B, L, self.heads_num, D // self.heads_num) for _ in range(3))
            mlp_in = x.new_empty(B, L, self.mlp_hidden_dim)
            for s in chunks:
                _, _, v[:, s], mlp_in[:, s] = self._linear1_qk(x, mod, s, img_len, freqs_cis, out=(q[:, s], k[:, s]))

        attn = self.attn_fn(q, k, v, img_len=img_len, txt_lens=txt_lens)  # (B, L, nh, hd)
        del q, k, v  # free the attention inputs before the second half
        attn = rearrange(attn, "B L nh hd -> B L (nh hd)")
        # linear2([attn | GELU(mlp_in)]): GELU, the concatenation and (FP8) the quantiser in one pass
        if len(chunks) == 1:
            return gated_residual(x, gelu_linear(self.linear2, mlp_in, prefix=attn), mod.gate)
        res = torch.empty_like(x)  # (B, L, D)
        for s in chunks:
            res[:, s] = gated_residual(x[:, s], gelu_linear(self.linear2, mlp_in[:, s], prefix=attn[:, s]), mod.gate)
        return res

    def _linear1_qk(self, x, mod, s: slice, img_len: int, freqs_cis, out=(None, None)):
        """pre_norm -> modulate -> linear1 -> QK-norm, and RoPE on the image tokens, for the tokens ``s`` of x.
        Returns q, k (B, n, nh, hd) (written into ``out`` = (q buffer, k buffer) if given) and v (B, n, nh, hd),
        mlp_in (B, n, mlp_hidden): views of linear1's output."""
        x_mod = modulate(self.pre_norm(x[:, s]), mod.shift, mod.scale)
        qkv, mlp_in = torch.split(self.linear1(x_mod), [3 * x.shape[-1], self.mlp_hidden_dim], dim=-1)
        del x_mod  # (B, n, D): not needed past linear1
        q, k, v = rearrange(qkv, "B L (K nh hd) -> K B L nh hd", K=3, nh=self.heads_num)
        n_img = max(0, min(s.stop, img_len) - s.start)  # image tokens of this slice carry RoPE
        tables = _rows(freqs_cis, slice(s.start, s.start + n_img)) if n_img and freqs_cis is not None else None
        q = norm_rope(q, self.q_norm, tables, n_rope=n_img, dtype=x.dtype, backend=self.kernels, out=out[0])
        k = norm_rope(k, self.k_norm, tables, n_rope=n_img, dtype=x.dtype, backend=self.kernels, out=out[1])
        return q, k, v, mlp_in


FAST_CLASSES = {MMDoubleStreamBlock: FastDoubleStreamBlock, MMSingleStreamBlock: FastSingleStreamBlock, MLP: FastMLP}
