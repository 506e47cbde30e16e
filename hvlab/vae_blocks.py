"""The building blocks of the causal 3D VAE: causal convolution, resnet, resampling, frame-causal attention.

What makes them *causal* in time, compared with an image VAE's blocks:

- `CausalConv3d` pads time only on the past side (``k - 1`` frames before, none after) by repeating the first
  frame, so output frame t sees input frames <= t. Space is padded symmetrically, also by repetition.
- `DownsampleCausal3D` is such a convolution with stride 2; `UpsampleCausal3D` repeats every frame except the first
  twice, so 1 + 2k frames become 1 + 4k: frame 0 stays a lone image frame through the whole network.
- The mid-block attention (`CausalFrameAttention`) lets tokens of frame i attend only to frames <= i.

GroupNorm, however, takes its statistics over *all* frames of a group, exactly as the release does: the network is
causal in its convolutions and attention, not in its normalisation (tests/test_vae.py shows both facts).
Shapes: (B, C, T, H, W) everywhere; T counts frames at the block's own resolution.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import attention_scores


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no graph is recorded (decoding at 720p): one activation-sized tensor less per call."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class CausalConv3d(nn.Module):
    """`nn.Conv3d` (as ``.conv``, so keys read ``...conv1.conv.weight``) after causal replicate padding.

    Padding is (left, right) = (k - 1, 0) in time and (k // 2, k // 2) in height and width, both with
    ``mode="replicate"``; the inner convolution itself pads nothing.

    Large inputs are convolved in chunks of frames (stride 1 in time only): each chunk is padded on its own, so
    the padded copy of the whole activation (2.2 GB for one 256 px decoder tile in fp16) is never built. The
    result is the same convolution; `max_chunk_bytes` bounds the padded chunk.
    """

    max_chunk_bytes = 512 * 2**20

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        kt, kh, kw = self.conv.kernel_size
        self.time_pad = kt - 1
        self.space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)  # F.pad order: W first, then H

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_pad == 0 and not any(self.space_pad):
            return self.conv(x)
        B, C, T, H, W = x.shape
        frame_bytes = B * C * (H + 2 * self.space_pad[2]) * (W + 2 * self.space_pad[0]) * x.element_size()
        n = max(1, self.max_chunk_bytes // max(frame_bytes, 1) - self.time_pad)  # output frames per chunk
        if self.conv.stride[0] != 1 or n >= T:
            return self.conv(F.pad(x, (*self.space_pad, self.time_pad, 0), mode="replicate"))
        out = None
        for t0 in range(0, T, n):
            t1 = min(t0 + n, T)
            lo = max(t0 - self.time_pad, 0)  # the chunk's own past frames replace padding, except at frame 0
            piece = F.pad(x[:, :, lo:t1], (*self.space_pad, self.time_pad - (t0 - lo), 0), mode="replicate")
            y = self.conv(piece)  # (B, C_out, t1 - t0, H', W')
            if out is None:
                out = y.new_empty(B, y.shape[1], T, y.shape[3], y.shape[4])
            out[:, :, t0:t1] = y
            del piece, y
        return out


class ResnetBlockCausal3D(nn.Module):
    """GroupNorm -> SiLU -> CausalConv3d, twice, plus a skip (a 1x1x1 causal conv when the width changes).

    As in the release: eps 1e-6, no time embedding, dropout 0 (omitted).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # in place on the conv output: nothing saved for backward is overwritten


class DownsampleCausal3D(nn.Module):
    """A stride-(t, s, s) causal 3x3x3 convolution: T -> (T - 1) // t + 1 (4k + 1 -> 2k + 1 for t = 2)."""

    def __init__(self, channels: int, factors: tuple[int, int]):
        super().__init__()
        ft, fs = factors
        self.conv = CausalConv3d(channels, channels, 3, stride=(ft, fs, fs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleCausal3D(nn.Module):
    """Nearest-neighbour upsampling by (t, s, s), except frame 0 (space only), then a causal 3x3x3 convolution.

    T -> 1 + t (T - 1): the first latent frame stands for one video frame, every later one for t frames.
    The result is written straight into one preallocated tensor (no interpolate + cat copies).
    """

    def __init__(self, channels: int, factors: tuple[int, int]):
        super().__init__()
        self.factors = factors
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, 1 + t(T-1), sH, sW)
        B, C, T, H, W = x.shape
        ft, fs = self.factors
        y = x.new_empty(B, C, 1 + ft * (T - 1), H * fs, W * fs)
        # A (1, fs, fs) block per input pixel of frame 0, an (ft, fs, fs) block per pixel of every later frame.
        y[:, :, :1].view(B, C, 1, H, fs, W, fs).copy_(x[:, :, :1, :, None, :, None].expand(B, C, 1, H, fs, W, fs))
        if T > 1:
            y[:, :, 1:].view(B, C, T - 1, ft, H, fs, W, fs).copy_(
                x[:, :, 1:, None, :, None, :, None].expand(B, C, T - 1, ft, H, fs, W, fs))
        return self.conv(y)


class DownEncoderBlockCausal3D(nn.Module):
    """``num_layers`` resnets, then (if any factor > 1) one `DownsampleCausal3D`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, factors: tuple[int, int]):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(num_layers))
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(out_channels, factors)]) if max(factors) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or []:
            x = down(x)
        return x


class UpDecoderBlockCausal3D(nn.Module):
    """``num_layers`` resnets (the release uses layers_per_block + 1), then (if any factor > 1) an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, factors: tuple[int, int]):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(num_layers))
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(out_channels, factors)]) if max(factors) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or []:
            x = up(x)
        return x


# ---- frame-causal attention -------------------------------------------------------------------------------------

def prepare_causal_attention_mask(num_frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """(L, L) bool mask, True where query token i may attend key token j: frame(j) <= frame(i).

    The release builds the same pattern as an additive float mask (0 / -inf). Either is L x L: at a 720p latent
    (33 x 90 x 160 = 475,200 tokens) that is 226 G entries, so only the explicit path below uses it.
    """
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)  # (L,)
    return frame[None, :] <= frame[:, None]


def frame_causal_attention(q, k, v, tokens_per_frame: int, max_scores: int = 2**26) -> torch.Tensor:
    """Fast path: SDPA per query frame against the keys of frames 0..i, so no mask tensor exists at all.

    q, k, v: (B, nh, L, hd) with tokens ordered frame by frame. Query rows are further split so that
    B * nh * rows * keys <= ``max_scores``: the release's head_dim of 512 exceeds what flash kernels take, and a
    fallback that materialises the scores then stays bounded.
    """
    B, nh, L, hd = q.shape
    if L % tokens_per_frame:
        raise ValueError(f"sequence length {L} is not a whole number of frames of {tokens_per_frame} tokens")
    n = tokens_per_frame
    out = torch.empty_like(q)
    for f in range(L // n):
        keys = (f + 1) * n
        rows = max(1, max_scores // (B * nh * keys))
        for r0 in range(f * n, (f + 1) * n, rows):
            r1 = min(r0 + rows, (f + 1) * n)
            out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :keys], v[:, :, :keys])
    return out


def frame_causal_attention_explicit(q, k, v, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit path for teaching and capture at small sizes: returns (out, probs) with probs (B, nh, L, L)."""
    L = q.shape[-2]
    mask = prepare_causal_attention_mask(L // tokens_per_frame, tokens_per_frame, q.device)
    scores = attention_scores(q, k)  # (B, nh, L, L) fp32
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


class CausalFrameAttention(nn.Module):
    """Single-head self-attention over all T*H*W tokens with a frame-causal mask, GroupNorm first, residual after.

    Key names follow diffusers' ``Attention`` as used by the release: ``group_norm``, ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``. Set ``explicit = True`` to run `frame_causal_attention_explicit` and keep ``attn_probs``.
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.explicit = False
        self.attn_probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        h = rearrange(self.group_norm(x), "B C T H W -> B (T H W) C")
        q, k, v = (rearrange(proj(h), "B L C -> B 1 L C") for proj in (self.to_q, self.to_k, self.to_v))  # nh = 1
        del h
        if self.explicit:
            o, self.attn_probs = frame_causal_attention_explicit(q, k, v, H * W)
        else:
            o = frame_causal_attention(q, k, v, H * W)  # (B, 1, L, C)
        o = self.to_out[0](o[:, 0])
        return x + rearrange(o, "B (T H W) C -> B C T H W", T=T, H=H, W=W)


class UNetMidBlockCausal3D(nn.Module):
    """resnet -> [attention -> resnet] at the lowest resolution (attention optional: mid_block_add_attention)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        # attentions are registered first so that state_dict() lists keys in the release's order
        self.attentions = nn.ModuleList([CausalFrameAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)
