"""The causal 3D VAE "884-16c-hy" (`AutoencoderKLCausal3D`): video <-> 16-channel latents, 8x8 space, 4x time.

What differs from an image VAE (SD's AutoencoderKL), whose layout it otherwise follows:

- every convolution is a causal 3D convolution (`hvlab.vae_blocks`), so frame 0 is encoded like an image and
  4k + 1 frames map to k + 1 latent frames (129 -> 33): latent frame 0 holds video frame 0 alone, latent frame
  k > 0 holds frames 4k - 3 .. 4k;
- time is halved in encoder blocks 1 and 2 and doubled in decoder blocks 1 and 2 (`sampling_schedule`);
- the mid-block attention is frame-causal (tokens of frame i see frames <= i);
- large videos go through in overlapping tiles (`enable_tiling`, `hvlab.vae_tiling`).

Latents from `encode` are NOT scaled: multiply by ``config.scaling_factor`` (0.476986) before the DiT, and divide
by it before `decode` (the pipeline does both). Parameter names equal the release checkpoint's, which equal
diffusers' ``AutoencoderKLHunyuanVideo`` keys (248 tensors, 246,478,803 parameters).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_into, load_state_dict_file
from .vae_blocks import CausalConv3d, DownEncoderBlockCausal3D, UNetMidBlockCausal3D, UpDecoderBlockCausal3D, silu
from .vae_tiling import TilingConfig, decode_axes, encode_axes, run_tiled
from .video import check_video_length, nearest_valid


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB in
    out_channels: int = 3  # RGB out
    latent_channels: int = 16  # "16c"
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width of each encoder block (decoder reversed)
    layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
    norm_num_groups: int = 32  # GroupNorm groups everywhere (eps 1e-6)
    temporal_compression_ratio: int = 4  # 4k + 1 frames -> k + 1 latent frames (release key: time_compression_ratio)
    spatial_compression_ratio: int = 8  # pixels per latent along H and W ("88" of 884)
    mid_block_add_attention: bool = True  # frame-causal single-head attention in both mid-blocks
    scaling_factor: float = 0.476986  # latents * scaling_factor ~ unit variance for the DiT (no shift)
    sample_size: int = 256  # default spatial tile edge in pixels for enable_tiling() (release config key)
    sample_tsize: int = 64  # default temporal tile length in frames for enable_tiling() (release config key)


VAE_884_16C_HY_CONFIG = VAEConfig()
# Tests: 8x space and 4x time like the release, 252k parameters; a 9x32x32 video round trip takes ~40 ms on a CPU.
TINY_VAE_CONFIG = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
VAE_PRESETS = {"884-16c-hy": VAE_884_16C_HY_CONFIG, "tiny": TINY_VAE_CONFIG}


def sampling_schedule(num_blocks: int, spatial_ratio: int, temporal_ratio: int) -> list[tuple[int, int]]:
    """(time factor, space factor) of the resampler after encoder block i; decoder block i uses the same list.

    Space is halved in the first log2(spatial) blocks; time in the log2(temporal) blocks before the last one.
    Release (4 blocks, 8x, 4x): [(1, 2), (2, 2), (2, 2), (1, 1)]. Because the decoder indexes the same list
    (block 0 = lowest resolution), it is not an exact mirror: it doubles space only in block 0 and time in blocks
    1-2, one block later (at higher resolution) than reversing the encoder would.
    """
    ns, nt = int(math.log2(spatial_ratio)), int(math.log2(temporal_ratio))
    if 2**ns != spatial_ratio or 2**nt != temporal_ratio or ns > num_blocks or nt > num_blocks - 1:
        raise ValueError(f"with {num_blocks} blocks, spatial_compression_ratio must be a power of 2 up to "
                         f"{2 ** num_blocks} and temporal_compression_ratio a power of 2 up to {2 ** (num_blocks - 1)};"
                         f" got {spatial_ratio} and {temporal_ratio}")
    return [(2 if num_blocks - 1 - nt <= i < num_blocks - 1 else 1, 2 if i < ns else 1) for i in range(num_blocks)]


class DiagonalGaussianDistribution:
    """The posterior N(mean, exp(logvar)) from the encoder's 2 * latent_channels moments (logvar clamped to
    [-30, 20], as the release). `kl` sums over every non-batch dimension (diffusers' copy sums dims 1-3 only,
    a leftover from 4-D image latents)."""

    def __init__(self, moments: torch.Tensor):  # (B, 2 * C, T, h, w)
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, T, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:  # (B,) KL(q || N(0, I))
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class EncoderCausal3D(nn.Module):
    """conv_in -> down blocks -> mid block -> GroupNorm, SiLU -> conv_out to 2 * latent_channels (mean, logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        schedule = sampling_schedule(len(ch), cfg.spatial_compression_ratio, cfg.temporal_compression_ratio)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlockCausal3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, schedule[i])
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlockCausal3D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4k+1, H, W) -> (B, 2C, k+1, H/8, W/8)
        x = self.conv_in(x)
        for layer in _layers(self.down_blocks, "downsamplers"):
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class DecoderCausal3D(nn.Module):
    """conv_in -> mid block -> up blocks -> GroupNorm, SiLU -> conv_out to RGB."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        schedule = sampling_schedule(len(ch), cfg.spatial_compression_ratio, cfg.temporal_compression_ratio)
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        # up_blocks before mid_block: only the order of state_dict() keys, which then equals the release's
        self.up_blocks = nn.ModuleList(
            UpDecoderBlockCausal3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, schedule[i])
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlockCausal3D(ch[0], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, k+1, h, w) -> (B, 3, 4k+1, 8h, 8w)
        x = self.mid_block(self.conv_in(z))
        for layer in _layers(self.up_blocks, "upsamplers"):
            x = layer(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


def _layers(blocks: nn.ModuleList, resampler: str):
    """The resnets and resamplers of all blocks, in order. Looping over these rather than calling each block keeps
    no block input alive after its first resnet: at a 256 px decoder tile that input is 2 GB (fp16) of upsampled
    activation, otherwise held by the caller through the block's remaining resnets."""
    for block in blocks:
        yield from block.resnets
        yield from getattr(block, resampler) or []


class AutoencoderKLCausal3D(nn.Module):
    """Encoder + decoder + the 1x1x1 ``quant_conv`` / ``post_quant_conv`` of a KL autoencoder.

    ``encode(x)`` takes (B, 3, 4k+1, H, W) in [-1, 1] (H, W multiples of 8) and returns the posterior;
    ``decode(z)`` takes unscaled latents (B, 16, k+1, h, w) and returns (B, 3, 4k+1, 8h, 8w), roughly in [-1, 1].
    Inputs are cast to the model's dtype. ``encode_tile_calls`` / ``decode_tile_calls`` count encoder / decoder
    invocations (1 per untiled call, one per tile when tiled).
    """

    def __init__(self, config: VAEConfig = VAE_884_16C_HY_CONFIG, device=None, dtype=None):
        super().__init__()
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.encoder = EncoderCausal3D(config)
            self.decoder = DecoderCausal3D(config)
            self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
            self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        if dtype is not None:
            self.to(dtype)
        self.use_tiling = False
        self.tiling = TilingConfig.from_sample_sizes(
            config.sample_size, config.sample_tsize, 0.25, config.spatial_compression_ratio,
            config.temporal_compression_ratio)
        self.encode_tile_calls = 0
        self.decode_tile_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_sample_min_num_frames: int | None = None,
                      tile_overlap_factor: float = 0.25) -> None:
        """Encode/decode in overlapping tiles. Defaults: the release's 256 px / 64 frames, 25% overlap.

        Smaller tiles (e.g. 128 px: 16 latents, stride 12, 32 px blend) lower peak memory and cost more calls.
        The overlap must come to whole latents (e.g. a multiple of 32 px at 25%); the error names valid sizes.
        """
        self.tiling = TilingConfig.from_sample_sizes(
            self.config.sample_size if tile_sample_min_size is None else tile_sample_min_size,
            self.config.sample_tsize if tile_sample_min_num_frames is None else tile_sample_min_num_frames,
            tile_overlap_factor, self.config.spatial_compression_ratio, self.config.temporal_compression_ratio)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, F, H, W) -> moments (B, 2C, T, h, w)
        self.encode_tile_calls += 1
        return self.quant_conv(self.encoder(x))

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, T, h, w) -> (B, 3, F, H, W)
        self.decode_tile_calls += 1
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects a video (B, {cfg.in_channels}, F, H, W) in [-1, 1], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"encode expects a floating-point video in [-1, 1], got {x.dtype} (uint8 frames: "
                             f"x.float() / 127.5 - 1)")
        _, _, Fr, H, W = x.shape
        if x.shape[0] == 0:
            raise ValueError(f"encode got an empty batch (B = 0) in shape {tuple(x.shape)}")
        rt, rs = cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        check_video_length(Fr, rt, name="the frame count")
        for name, n in (("height", H), ("width", W)):
            if n < 1 or n % rs:
                raise ValueError(f"{name} must be a multiple of {rs}, got {n}, nearest valid: "
                                 f"{nearest_valid(n, rs)}")
        x = x.to(self.dtype)
        axes = encode_axes((Fr, H, W), self.tiling, rs, rt)
        if not self.use_tiling or all(len(a.src) == 1 for a in axes):
            return DiagonalGaussianDistribution(self._encode_tile(x))
        out_shape = (2 * cfg.latent_channels, (Fr - 1) // rt + 1, H // rs, W // rs)
        return DiagonalGaussianDistribution(run_tiled(self._encode_tile, x, axes, out_shape))

    def decode_calls(self, latent_shape) -> int:
        """How many decoder calls `decode` makes for latents of ``latent_shape`` ((B, C, T, h, w) or (T, h, w)):
        1 untiled, one per tile when tiled (the product of the tiles along time, height and width)."""
        if not self.use_tiling:
            return 1
        cfg = self.config
        axes = decode_axes(tuple(latent_shape[-3:]), self.tiling, cfg.spatial_compression_ratio,
                           cfg.temporal_compression_ratio)
        return math.prod(len(a.src) for a in axes)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"decode expects latents (B, {cfg.latent_channels}, T, h, w) (unscaled: divide the DiT's "
                             f"latents by scaling_factor={cfg.scaling_factor}), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if not z.is_floating_point():
            raise ValueError(f"decode expects floating-point latents, got {z.dtype}")
        for axis, n in zip("BThw", (z.shape[0], *z.shape[2:])):
            if n < 1:
                raise ValueError(f"decode got {axis} = 0 in latents of shape {tuple(z.shape)}: every axis needs at least "
                                 f"one entry (T = 1 latent frame decodes to 1 video frame; h = w = 1 to "
                                 f"{cfg.spatial_compression_ratio} x {cfg.spatial_compression_ratio} pixels)")
        z = z.to(self.dtype)
        _, _, T, h, w = z.shape
        rt, rs = cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        axes = decode_axes((T, h, w), self.tiling, rs, rt)
        if not self.use_tiling or all(len(a.src) == 1 for a in axes):
            return self._decode_tile(z)
        return run_tiled(self._decode_tile, z, axes, (cfg.out_channels, 1 + rt * (T - 1), rs * h, rs * w))

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "AutoencoderKLCausal3D":
        """Load a release VAE folder (config.json + pytorch_model.pt), or a weights file (config.json beside it,
        else the release config). Built on the meta device, so the weights are never initialised twice."""
        path = Path(path)
        cfg_file = (path if path.is_dir() else path.parent) / "config.json"
        config = vae_config_from_json(cfg_file) if cfg_file.exists() else VAE_884_16C_HY_CONFIG
        model = load_vae_checkpoint(cls(config, device="meta"), path)
        return model.to(device=device, dtype=dtype).eval()


def load_vae_checkpoint(model: AutoencoderKLCausal3D, path: str | os.PathLike) -> AutoencoderKLCausal3D:
    """Load weights strictly from a file or folder (.pt or .safetensors; a "state_dict" wrapper and a "vae."
    prefix are removed). A missing, extra or misshapen key raises `hvlab.checkpoint.CheckpointError`."""
    return load_into(model, load_state_dict_file(path, prefix="vae."), what=f"VAE checkpoint {os.fspath(path)!r}")


# Release config.json keys that name the same thing differently, and keys that carry nothing hvlab needs.
_CONFIG_ALIASES = {"time_compression_ratio": "temporal_compression_ratio"}
_CONFIG_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "down_block_types", "up_block_types",
                   "force_upcast", "shift_factor", "latents_mean", "latents_std", "act_fn"}


def vae_config_from_json(path: str | os.PathLike) -> VAEConfig:
    """A `VAEConfig` from the release's (or diffusers') config.json."""
    from .runs import read_json

    raw = read_json(path, "a VAE config.json")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a VAE config.json holds a JSON object, got {type(raw).__name__}")
    if raw.get("act_fn", "silu") != "silu":
        raise ValueError(f"{path}: act_fn must be 'silu' (the only activation hvlab's VAE has), got {raw['act_fn']!r}")
    if raw.get("shift_factor"):
        raise ValueError(f"{path}: shift_factor={raw['shift_factor']} is not supported (the release has none)")
    names = {f.name for f in fields(VAEConfig)}
    kwargs = {}
    for key, value in raw.items():
        key = _CONFIG_ALIASES.get(key, key)
        if key in names:
            if isinstance(value, list):
                value = value[0] if key in ("sample_size", "sample_tsize") else tuple(value)
            kwargs[key] = value
        elif key not in _CONFIG_IGNORED:
            warnings.warn(f"{path}: ignoring unknown VAE config key {key!r}")
    return VAEConfig(**kwargs)
