"""HYVideoDiffusionTransformer: the 13B HunyuanVideo DiT, read top-down.

    latents x (B, 16, T, H, W) ──img_in (Conv3d 1x2x2 patches)──> img (B, L_img, D)
    LLM states (B, L_txt, 4096) ──txt_in (token refiner)───────> txt (B, L_txt, D)
    vec = time_in(t) + vector_in(CLIP pooled) + guidance_in(guidance)        (B, D)
    20 x MMDoubleStreamBlock(img, txt)   ->  40 x MMSingleStreamBlock(cat(img, txt))
    final_layer(img) -> unpatchify -> velocity (B, 16, T, H, W)

What differs from a vanilla DiT: text joins the token sequence (no cross-attention); dual-stream then
single-stream blocks; a bidirectional refiner over a decoder-only LLM's states; 3D RoPE with theta 256;
guidance distilled into an embedding (one forward per step instead of two).

``forward`` is split into ``embed``, ``double_stream``, ``single_stream`` and ``final`` so that hooks and the
sequence-parallel wrapper can reuse the pieces.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from .blocks import FinalLayer, MMDoubleStreamBlock, MMSingleStreamBlock
from .modulation import MLPEmbedder, TimestepEmbedder
from .refiner import SingleTokenRefiner
from .rope import get_nd_rotary_pos_embed


@dataclass
class HYVideoConfig:
    in_channels: int = 16  # latent channels from the causal 3D VAE
    out_channels: int = 16  # predicted velocity channels (= in_channels for text-to-video)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent cells per token
    hidden_size: int = 3072  # D, the width of every token
    heads_num: int = 24  # nh; head_dim hd = hidden_size / heads_num = 128
    mlp_width_ratio: float = 4.0  # MLP hidden = ratio * D (12288)
    mm_double_blocks_depth: int = 20  # dual-stream blocks (separate image/text weights)
    mm_single_blocks_depth: int = 40  # single-stream blocks (shared weights, fused linears)
    rope_dim_list: tuple[int, int, int] = (16, 56, 56)  # head-dim channels given to the t, h, w axes
    rope_theta: float = 256.0  # RoPE base (not 10000)
    qkv_bias: bool = True  # bias on the double blocks' qkv and projection
    text_states_dim: int = 4096  # width of the LLM hidden states (llava-llama-3-8b)
    text_states_dim_2: int = 768  # width of CLIP-L's pooled output
    guidance_embed: bool = True  # guidance-distilled: embed the guidance scale (x1000) like a timestep
    refiner_depth: int = 2  # blocks in the token refiner
    text_projection: str = "single_refiner"  # the only text projection the release uses

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.rope_dim_list = tuple(self.rope_dim_list)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size must be divisible by heads_num = {self.heads_num}, got {self.hidden_size}")
        if len(self.rope_dim_list) != 3 or sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(
                f"rope_dim_list must give 3 axes (t, h, w) summing to head_dim = hidden_size / heads_num = "
                f"{self.head_dim}, got {self.rope_dim_list} (sum {sum(self.rope_dim_list)})"
            )
        if any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"every rope_dim_list entry must be even (channels rotate in pairs), got {self.rope_dim_list}")
        if self.text_projection != "single_refiner":
            raise ValueError(f"text_projection must be 'single_refiner' (the released model's), got {self.text_projection!r}")
        for name in ("mm_double_blocks_depth", "mm_single_blocks_depth", "refiner_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)


HYVIDEO_T2_CONFIG = HYVideoConfig()  # the 13B release "HYVideo-T/2-cfgdistill"
TINY_CONFIG = HYVideoConfig(  # every block type, small enough for CPU tests
    hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=1, mm_single_blocks_depth=1,
    text_states_dim=32, text_states_dim_2=16,
)
# hvlab's trained toy model (hvlab/toy): the release layout, 1/16 the width, 2 + 4 blocks instead of 20 + 40.
TOY_CONFIG = HYVideoConfig(
    hidden_size=192, heads_num=3,  # head_dim 64 (release 24 x 128)
    mm_double_blocks_depth=2, mm_single_blocks_depth=4,
    rope_dim_list=(16, 24, 24),  # sums to head_dim 64; t keeps the release's 16 channels
    text_states_dim=128, text_states_dim_2=64,  # the toy LLM's and CLIP's widths
    guidance_embed=False,  # not guidance-distilled: the toy samples with true CFG
    refiner_depth=1,
)
# The one registry of DiT presets: the release by its official name, and hvlab's two small ones.
# PRESET_ALIASES are the other accepted spellings (``hvlab info --model 13b``).
PRESETS: dict[str, HYVideoConfig] = {"HYVideo-T/2-cfgdistill": HYVIDEO_T2_CONFIG, "toy": TOY_CONFIG,
                                     "tiny": TINY_CONFIG}
PRESET_ALIASES: dict[str, str] = {"13b": "HYVideo-T/2-cfgdistill"}


def preset_name(name: str) -> str:
    """The `PRESETS` key for ``name``, a preset name or one of `PRESET_ALIASES`; raises naming the accepted ones."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}: expected one of {sorted(PRESETS)} "
                         f"or an alias {PRESET_ALIASES}")
    return name


def preset_config(name: str) -> HYVideoConfig:
    """The `HYVideoConfig` of a preset, by name or alias (``preset_config("13b") is HYVIDEO_T2_CONFIG``)."""
    return PRESETS[preset_name(name)]


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, C, T*pt, H*ph, W*pw) -> (B, L = T*H*W, C*pt*ph*pw), tokens t-major, features (c, pt, ph, pw)."""
    pt, ph, pw = patch_size
    return rearrange(x, "B C (T pt) (H ph) (W pw) -> B (T H W) (C pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(x: torch.Tensor, grid_size: Sequence[int], patch_size: Sequence[int], out_channels: int) -> torch.Tensor:
    """(B, T*H*W, C*pt*ph*pw) -> (B, C, T*pt, H*ph, W*pw); the inverse of ``patchify`` (c outermost)."""
    (T, H, W), (pt, ph, pw) = grid_size, patch_size
    return rearrange(x, "B (T H W) (C pt ph pw) -> B C (T pt) (H ph) (W pw)",
                     T=T, H=H, W=W, C=out_channels, pt=pt, ph=ph, pw=pw)


class PatchEmbed(nn.Module):
    """``img_in``: a Conv3d with kernel = stride = patch, i.e. one Linear per non-overlapping patch."""

    def __init__(self, patch_size: Sequence[int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "B D T H W -> B (T H W) D")  # (B, L_img, D)


def text_lengths(text_mask: torch.Tensor) -> torch.Tensor:
    """(B, L_txt) mask -> (B,) number of valid tokens, checking that each row is ones then zeros."""
    valid = text_mask.bool()
    lens = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device)[None, :] < lens[:, None]
    if not torch.equal(valid, prefix):
        bad = int((valid != prefix).any(dim=1).nonzero()[0])
        raise ValueError(
            "text_mask must be a contiguous prefix of ones per row (real tokens first, then padding, as with "
            f"tokenizer padding_side='right'); row {bad} is {text_mask[bad].int().tolist()[:32]}"
        )
    if (lens == 0).any():
        raise ValueError(f"every text_mask row needs at least one valid token; got lengths {lens.tolist()}")
    return lens


class HYVideoDiffusionTransformer(nn.Module):
    """The HunyuanVideo DiT; state-dict keys equal the official checkpoint's (loads with strict=True)."""

    def __init__(self, config: HYVideoConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = c = config
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:  # build directly on `device` ("meta" allocates nothing)
            self.img_in = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
            self.txt_in = SingleTokenRefiner(c.text_states_dim, c.hidden_size, c.heads_num, c.refiner_depth,
                                             c.mlp_width_ratio, c.qkv_bias)
            self.time_in = TimestepEmbedder(c.hidden_size)
            self.vector_in = MLPEmbedder(c.text_states_dim_2, c.hidden_size)
            self.guidance_in = TimestepEmbedder(c.hidden_size) if c.guidance_embed else None
            self.double_blocks = nn.ModuleList(
                [MMDoubleStreamBlock(c.hidden_size, c.heads_num, c.mlp_width_ratio, c.qkv_bias)
                 for _ in range(c.mm_double_blocks_depth)]
            )
            self.single_blocks = nn.ModuleList(
                [MMSingleStreamBlock(c.hidden_size, c.heads_num, c.mlp_width_ratio)
                 for _ in range(c.mm_single_blocks_depth)]
            )
            self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        if dtype is not None:
            self.to(dtype)

    # --- pieces of forward -------------------------------------------------------------------------------

    def grid_size(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Post-patch token grid (T/pt, H/ph, W/pw) for latents of shape (B, C, T, H, W)."""
        return tuple(n // p for n, p in zip(latent_shape[2:], self.config.patch_size))

    def rope(self, grid_size: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin), each (T*H*W, head_dim), for a post-patch grid."""
        return get_nd_rotary_pos_embed(self.config.rope_dim_list, grid_size, self.config.rope_theta, device=device,
                                       head_dim=self.config.head_dim)

    def embed(self, x, t, text_states, text_mask, text_states_2, guidance=None):
        """Tokens and conditioning: returns img (B, L_img, D), txt (B, L_txt, D), vec (B, D), txt_lens (B,).

        Expects inputs that passed ``check_inputs`` (t and guidance already (B,)).
        """
        txt_lens = text_lengths(text_mask)
        vec = self.time_in(t) + self.vector_in(text_states_2)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(guidance)
        img = self.img_in(x)
        txt = self.txt_in(text_states, t, text_mask)
        return img, txt, vec, txt_lens

    def double_stream(self, img, txt, vec, freqs_cis, txt_lens=None):
        """Runs the dual-stream blocks; img (B, L_img, D) and txt (B, L_txt, D) keep separate weights."""
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, freqs_cis, txt_lens)
        return img, txt

    def single_stream(self, img, txt, vec, freqs_cis, txt_lens=None) -> torch.Tensor:
        """Runs the single-stream blocks on cat(img, txt) and returns only the image tokens."""
        L_img = img.shape[1]
        x = torch.cat([img, txt], dim=1)  # (B, L, D)
        for block in self.single_blocks:
            x = block(x, vec, L_img, freqs_cis, txt_lens)
        return x[:, :L_img]

    def final(self, img: torch.Tensor, vec: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        """Image tokens (B, L_img, D) -> velocity (B, out_channels, T, H, W)."""
        return unpatchify(self.final_layer(img, vec), grid_size, self.config.patch_size, self.config.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                text_states_2: torch.Tensor, guidance: torch.Tensor | None = None,
                freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Predict the flow-matching velocity for latents x (B, C, T, H, W) at timesteps t (B,) in [0, 1000].

        text_states (B, L_txt, text_states_dim) with text_mask (B, L_txt) (ones then zeros), text_states_2
        (B, text_states_dim_2) (CLIP pooled), guidance (B,) = cfg scale * 1000 when ``guidance_embed``.
        """
        t, guidance = self.check_inputs(x, t, text_states, text_mask, text_states_2, guidance)
        grid = self.grid_size(x.shape)
        if freqs_cis is None:
            freqs_cis = self.rope(grid, device=x.device)
        img, txt, vec, txt_lens = self.embed(x, t, text_states, text_mask, text_states_2, guidance)
        img, txt = self.double_stream(img, txt, vec, freqs_cis, txt_lens)
        img = self.single_stream(img, txt, vec, freqs_cis, txt_lens)
        return self.final(img, vec, grid)

    def check_inputs(self, x, t, text_states, text_mask, text_states_2, guidance=None):
        """Validate types, dtypes, shapes and values before any compute; scalar t / guidance are broadcast to
        (B,). Returns (t, guidance).

        x, text_states and text_states_2 must be floating tensors in the model's dtype (no silent casts: a
        float64 or float16 input to a float32 model is a mistake upstream), t and guidance finite numbers."""
        c = self.config
        for name, v in (("x", x), ("text_states", text_states), ("text_mask", text_mask),
                        ("text_states_2", text_states_2)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        dtype = self.img_in.proj.weight.dtype  # FP8 leaves img_in alone: this is the compute dtype
        if not torch.is_autocast_enabled(x.device.type):
            for name, v in (("x", x), ("text_states", text_states), ("text_states_2", text_states_2)):
                if v.dtype != dtype:
                    kind = "a floating-point" if not v.is_floating_point() else f"a {dtype}"
                    raise ValueError(f"{name} is {v.dtype} but the DiT's weights are {dtype}: pass {kind} tensor "
                                     f"({name}.to({dtype})), as the pipeline does")
        if text_mask.is_floating_point() and text_mask.device.type != "meta" and \
                not bool(torch.all((text_mask == 0) | (text_mask == 1))):
            raise ValueError("text_mask must hold 0 and 1 only (an int, bool or 0/1 float tensor), got other values")
        if x.dim() != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be latents (B, C, T, H, W) with C = in_channels = {c.in_channels}, "
                             f"got shape {tuple(x.shape)}")
        B = x.shape[0]
        for axis, n, p in zip("THW", x.shape[2:], c.patch_size):
            if n % p:
                raise ValueError(f"latent {axis} must be a multiple of the patch size {p} along {axis} "
                                 f"(patch_size {c.patch_size}), got {axis} = {n} in shape {tuple(x.shape)}")
        t = self._per_sample(t, B, "t", x.device)
        if text_states.dim() != 3 or text_states.shape[0] != B or text_states.shape[2] != c.text_states_dim:
            raise ValueError(f"text_states must be (B, L_txt, text_states_dim) = ({B}, L_txt, {c.text_states_dim}), "
                             f"got {tuple(text_states.shape)}")
        if tuple(text_mask.shape) != tuple(text_states.shape[:2]):
            raise ValueError(f"text_mask must be (B, L_txt) = {tuple(text_states.shape[:2])} to match text_states, "
                             f"got {tuple(text_mask.shape)}")
        if tuple(text_states_2.shape) != (B, c.text_states_dim_2):
            raise ValueError(f"text_states_2 (CLIP pooled) must be (B, text_states_dim_2) = ({B}, "
                             f"{c.text_states_dim_2}), got {tuple(text_states_2.shape)}")
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (guidance_embed=True): pass guidance (B,) = "
                                 "embedded cfg scale * 1000, e.g. 6016.0 for scale 6.0 in bf16")
            guidance = self._per_sample(guidance, B, "guidance", x.device)
        return t, guidance

    @staticmethod
    def _per_sample(v, B: int, name: str, device) -> torch.Tensor:
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a number or a (B,) tensor, got {type(v).__name__}")
        v = torch.as_tensor(v, device=device)
        if v.dim() == 0:
            v = v.expand(B)
        if tuple(v.shape) != (B,):
            raise ValueError(f"{name} must be a scalar or (B,) = ({B},), got shape {tuple(v.shape)}")
        what = "timesteps in [0, 1000]" if name == "t" else "embedded cfg scale x 1000, e.g. 6016.0"
        if v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{name} must be real numbers ({what}), got a {v.dtype} tensor")
        if v.device.type != "meta" and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite ({what}), got {v.tolist()[:8]}")
        return v


def params_count(model: HYVideoDiffusionTransformer) -> dict[str, int]:
    """Parameter counts as the official ``params_count``: double = qkv + proj + mlp of both streams,
    single = linear1 + linear2, attn+mlp = double + single, total = every parameter."""

    def n(*modules: nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    double = sum(n(b.img_attn_qkv, b.img_attn_proj, b.img_mlp, b.txt_attn_qkv, b.txt_attn_proj, b.txt_mlp)
                 for b in model.double_blocks)
    single = sum(n(b.linear1, b.linear2) for b in model.single_blocks)
    return {"double": double, "single": single, "attn+mlp": double + single, "total": n(model)}


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values of a sensible size, the zero-initialised gates included.

    A freshly built DiT is the identity in every block (adaLN-Zero) and outputs zeros, which would make a
    parity test pass for the wrong reason. Matrices get std 1/sqrt(fan_in), biases std 0.1, norm weights
    1 + 0.1 * noise.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]:
            value = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            value = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(value.to(p.dtype))
    return model
