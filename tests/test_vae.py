"""The causal 3D VAE: parity with diffusers' AutoencoderKLHunyuanVideo (untiled and tiled), release keys, tiling
maths, causality, checkpoint loading and errors. All at the tiny config except the meta-device release checks."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvlab.checkpoint import CheckpointError
from hvlab.vae import (TINY_VAE_CONFIG, VAE_884_16C_HY_CONFIG, AutoencoderKLCausal3D, DiagonalGaussianDistribution,
                       load_vae_checkpoint, sampling_schedule)
from hvlab.vae_blocks import CausalConv3d, frame_causal_attention, frame_causal_attention_explicit
from hvlab.vae_tiling import TilingConfig, decode_axes, run_tiled, tile_plan

# the release checkpoint's key listing, carried in the repository (a copy of ../shared/reference/vae_release_keys.tsv)
TSV = Path(__file__).resolve().parent / "data" / "vae_release_keys.tsv"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_(model, seed=0):
    """Weights with O(1) activations, GroupNorm affines away from (1, 0) so that misplaced keys would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def pair():
    """hvlab's tiny VAE and diffusers' AutoencoderKLHunyuanVideo holding the same weights."""
    from diffusers import AutoencoderKLHunyuanVideo

    cfg = TINY_VAE_CONFIG
    ours = randomize_(AutoencoderKLCausal3D(cfg), seed=1).eval()
    ref = AutoencoderKLHunyuanVideo(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
        spatial_compression_ratio=cfg.spatial_compression_ratio,
        temporal_compression_ratio=cfg.temporal_compression_ratio).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical key names, no conversion
    return ours, ref


def test_parity_with_diffusers_untiled(pair):
    ours, ref = pair
    ours.disable_tiling()
    ref.disable_tiling()
    ref.use_framewise_encoding = ref.use_framewise_decoding = False  # diffusers tiles time by default
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        dec, ref_dec = ours.decode(z), ref.decode(z).sample
    assert post.mean.shape == (1, 16, 3, 4, 4) and dec.shape == (1, 3, 9, 32, 32)
    assert rel(post.mean, ref_post.mean) <= 1e-5 and rel(post.logvar, ref_post.logvar) <= 1e-5
    assert rel(dec, ref_dec) <= 1e-5


def test_tiled_parity_with_diffusers(pair):
    """Same tile settings on both sides (32 px / 16 frames, 25% overlap): the release's tile plan and blending,
    including its corner-blending order, reproduced to fp32 rounding."""
    ours, ref = pair
    ours.enable_tiling(tile_sample_min_size=32, tile_sample_min_num_frames=16, tile_overlap_factor=0.25)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=16,
                      tile_sample_stride_height=24, tile_sample_stride_width=24, tile_sample_stride_num_frames=12)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    z = torch.randn(1, 16, 5, 5, 7, generator=torch.Generator().manual_seed(2))  # 2 time tiles x 2 rows x 3 cols
    x = torch.rand(1, 3, 17, 40, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1  # 2 x 2 x 2 tiles
    try:
        ours.decode_tile_calls = ours.encode_tile_calls = 0
        with torch.no_grad():
            dec, ref_dec = ours.decode(z), ref.decode(z).sample
            post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    finally:
        ours.disable_tiling()
        ref.disable_tiling()
    assert ours.decode_tile_calls == 12 and ours.encode_tile_calls == 8
    assert dec.shape == ref_dec.shape == (1, 3, 17, 40, 56)
    assert rel(dec, ref_dec) <= 1e-5
    assert rel(post.mean, ref_post.mean) <= 1e-5


def _release_rows():
    rows = []
    for line in TSV.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            rows.append((key, tuple(json.loads(shape))))
    return rows


def test_release_config_matches_release_keys():
    model = AutoencoderKLCausal3D(VAE_884_16C_HY_CONFIG, device="meta")
    sd = model.state_dict()
    assert len(sd) == 248
    assert sum(p.numel() for p in model.parameters()) == 246_478_803
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == _release_rows()  # same keys, shapes and order


def test_sampling_schedule():
    # release: space halved in blocks 0-2, time in blocks 1-2, nothing in the last block
    assert sampling_schedule(4, 8, 4) == [(1, 2), (2, 2), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="power of 2"):
        sampling_schedule(4, 8, 3)


def test_release_tile_plan_is_84_calls():
    plan = tile_plan((33, 90, 160))  # the latent of 720 x 1280 x 129
    assert len(plan) == 84
    assert sorted({p[0].start for p in plan}) == [0, 12, 24] and plan[-1][0] == slice(24, 33)
    assert len({p[1].start for p in plan}) == 4 and len({p[2].start for p in plan}) == 7


def test_release_decode_on_meta_counts_84_tiles():
    """The real decode path at 720p on the meta device (shapes only, no memory): one full decoder tile, then all
    of 720 x 1280 x 129 with the decoder stubbed to return a tile's shape, counting the calls."""
    model = AutoencoderKLCausal3D(VAE_884_16C_HY_CONFIG, device="meta", dtype=torch.float16)
    model.enable_tiling()
    with torch.no_grad():
        tile = model.decode(torch.empty(1, 16, 16, 32, 32, device="meta"))  # fits one tile: one decoder call
        assert tile.shape == (1, 3, 61, 256, 256) and model.decode_tile_calls == 1
        model.decoder.forward = lambda z: torch.empty(z.shape[0], 3, 1 + 4 * (z.shape[2] - 1), 8 * z.shape[3],
                                                      8 * z.shape[4], device=z.device, dtype=z.dtype)
        model.decode_tile_calls = 0
        video = model.decode(torch.empty(1, 16, 33, 90, 160, device="meta"))
    assert video.shape == (1, 3, 129, 720, 1280)
    assert model.decode_tile_calls == 84


def _local_decoder(z):
    """A stand-in decoder whose every output pixel depends only on the latent at its position: frame 0 kept once,
    later frames repeated 4x, pixels 8x8. Tiling it must reproduce decoding it whole, whatever the overlap."""
    z = z[:, :3]
    rest = z[:, :, 1:].repeat_interleave(4, dim=2)
    return torch.cat([z[:, :, :1], rest], dim=2).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiling_reproduces_a_local_decoder(overlap):
    """Crops, offsets, context-frame drops and blend weights (which must sum to one) are exact: with a decoder
    that has no receptive field, tiled == untiled. overlap 0: every latent is decoded by exactly one tile."""
    z = torch.randn(2, 16, 9, 7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tiling = TilingConfig.from_sample_sizes(32, 16, overlap)
    axes = decode_axes(z.shape[2:], tiling)
    assert all(len(a.src) > 1 for a in axes)
    out = run_tiled(_local_decoder, z, axes, (3, 33, 56, 80))
    torch.testing.assert_close(out, _local_decoder(z), rtol=1e-12, atol=1e-12)


def test_tiled_decode_single_tile_and_overlap_tolerance(pair):
    ours, _ = pair
    z = torch.randn(1, 16, 5, 5, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours.disable_tiling()
        whole = ours.decode(z)
        ours.enable_tiling(64, 32)  # one tile covers the input: tiling must change nothing
        assert torch.equal(ours.decode(z), whole)
        ours.enable_tiling(32, 16)  # 2 x 2 x 2 tiles of at most 5 x 4 x 4 latents, 25% overlap
        tiled = ours.decode(z)
    ours.disable_tiling()
    # A real decoder's tiles differ from the whole: GroupNorm statistics, conv borders and attention see only the
    # tile, and at this size a tile is most of the input. Measured for this random tiny model: 0.673 (0.733 with
    # no overlap; other weight/latent seeds 0.63-0.91). Bound 0.75: this catches misplaced tiles (error ~1.4), not
    # blending details; the blending is exact in the local-decoder and diffusers tests above.
    assert rel(tiled, whole) < 0.75


def test_enable_tiling_sizes_and_errors():
    model = AutoencoderKLCausal3D(TINY_VAE_CONFIG, device="meta")
    model.enable_tiling()
    assert model.tiling == TilingConfig(32, 24, 16, 12)  # release: 256 px, 64 frames, 25% overlap
    model.enable_tiling(128)
    assert model.tiling == TilingConfig(16, 12, 16, 12)  # 128 px tiles: stride 96 px, 32 px blend
    with pytest.raises(ValueError, match="nearest valid: 192 or 224"):
        model.enable_tiling(200)  # 25 latents: a 6.25-latent overlap cannot be blended
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        model.enable_tiling(256, 64, 0.75)


def _per_frame_norms_(model):
    """Swap every GroupNorm for one that takes statistics per frame (same weights)."""

    class FrameGroupNorm(nn.GroupNorm):
        def forward(self, x):  # (B, C, T, H, W)
            B, C, T, H, W = x.shape
            y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))
            return y.reshape(B, T, C, H, W).transpose(1, 2)

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                new = FrameGroupNorm(child.num_groups, child.num_channels, child.eps)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
    return model


def test_causality():
    """Convolutions and attention are causal: with per-frame norms, changing video frame k leaves every latent
    frame before k's unchanged, and changing latent frame j leaves every video frame before j's unchanged.
    The release's GroupNorm pools statistics over all frames, so the real model does leak the future."""
    model = randomize_(AutoencoderKLCausal3D(TINY_VAE_CONFIG), seed=6).eval()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 9, 16, 16, generator=g) * 2 - 1
    z = torch.randn(1, 16, 3, 2, 2, generator=g)
    with torch.no_grad():
        leaked = model.encode(torch.cat([x[:, :, :8], -x[:, :, 8:]], 2)).mean[:, :, 0] - model.encode(x).mean[:, :, 0]
        assert leaked.abs().max() > 1e-3  # frame 8 moved latent 0 through GroupNorm statistics
        _per_frame_norms_(model)
        mean = model.encode(x).mean
        for k in range(9):
            lat = 0 if k == 0 else (k - 1) // 4 + 1  # latent frame holding video frame k
            x2 = x.clone()
            x2[:, :, k] = -x2[:, :, k]
            mean2 = model.encode(x2).mean
            torch.testing.assert_close(mean2[:, :, :lat], mean[:, :, :lat], rtol=0, atol=1e-6)
            assert (mean2[:, :, lat] - mean[:, :, lat]).abs().max() > 1e-4
        video = model.decode(z)
        for j in range(3):
            first = 0 if j == 0 else 4 * (j - 1) + 1  # first video frame decoded from latent frame j
            z2 = z.clone()
            z2[:, :, j] += 1.0
            video2 = model.decode(z2)
            torch.testing.assert_close(video2[:, :, :first], video[:, :, :first], rtol=0, atol=1e-6)
            assert (video2[:, :, first] - video[:, :, first]).abs().max() > 1e-4


def test_frame_causal_attention_paths_agree():
    """Fast path (SDPA per query frame, no mask) == explicit path == diffusers' float mask + SDPA."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

    g = torch.Generator().manual_seed(8)
    T, n = 4, 6
    q, k, v = (torch.randn(2, 1, T * n, 16, generator=g) for _ in range(3))
    fast = frame_causal_attention(q, k, v, n, max_scores=40)  # tiny budget: query rows split too
    explicit, probs = frame_causal_attention_explicit(q, k, v, n)
    mask = prepare_causal_attention_mask(T, n, q.dtype, q.device)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explicit, ref, rtol=1e-5, atol=1e-6)
    frame = torch.arange(T).repeat_interleave(n)
    assert probs[..., frame[:, None] < frame[None, :]].abs().max() == 0  # no weight on future frames
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 1, T * n))


def test_causal_conv_chunked_equals_whole():
    """Time-chunked convolution (used on large activations) == one padded convolution."""
    conv = CausalConv3d(4, 5, 3)
    x = torch.randn(2, 4, 9, 6, 7, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate"), conv.conv.weight, conv.conv.bias)
        conv.max_chunk_bytes = 3 * 2 * 4 * 8 * 9 * 4  # room for 3 padded frames: 1 output frame per chunk
        torch.testing.assert_close(conv(x), ref)
        conv.max_chunk_bytes = 6 * 2 * 4 * 8 * 9 * 4  # 4 output frames per chunk, a short last chunk
        torch.testing.assert_close(conv(x), ref)


def test_posterior():
    moments = torch.randn(2, 32, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    post = DiagonalGaussianDistribution(moments)
    assert torch.equal(post.mode(), moments[:, :16])
    a = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, post.sample(torch.Generator().manual_seed(0)))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, post.mean + torch.exp(0.5 * moments[:, 16:]) * eps)
    normal = torch.distributions.Normal(post.mean, post.std)
    ref = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), ref)


def test_bad_inputs_name_valid_values():
    model = AutoencoderKLCausal3D(TINY_VAE_CONFIG, device="meta")
    with pytest.raises(ValueError, match="got 10, nearest valid: 9 or 13"):
        model.encode(torch.empty(1, 3, 10, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="width must be a multiple of 8, got 36, nearest valid: 32 or 40"):
        model.encode(torch.empty(1, 3, 9, 32, 36, device="meta"))
    with pytest.raises(ValueError, match=r"latents \(B, 16, T, h, w\)"):
        model.decode(torch.empty(1, 4, 3, 4, 4, device="meta"))


RELEASE_STYLE_CONFIG = {  # the release's config.json layout (diffusers-0.4-era names), at the tiny widths
    "_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4, "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 1, "norm_num_groups": 4,
    "sample_size": 256, "sample_tsize": 64, "scaling_factor": 0.476986, "time_compression_ratio": 4,
    "mid_block_add_attention": True,
}


def test_checkpoint_wrapped_and_prefixed_loads_strict(tmp_path):
    src = randomize_(AutoencoderKLCausal3D(TINY_VAE_CONFIG), seed=11)
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_STYLE_CONFIG))
    torch.save({"state_dict": {"vae." + k: v for k, v in src.state_dict().items()}}, tmp_path / "pytorch_model.pt")
    model = AutoencoderKLCausal3D.from_pretrained(tmp_path)
    assert model.config == TINY_VAE_CONFIG
    for (k, a), (_, b) in zip(model.state_dict().items(), src.state_dict().items()):
        assert torch.equal(a, b), k
    # a missing key is refused, and the error names it
    sd = {"vae." + k: v for k, v in src.state_dict().items() if k != "decoder.conv_out.conv.bias"}
    torch.save({"state_dict": sd}, tmp_path / "pytorch_model.pt")
    with pytest.raises(CheckpointError, match="decoder.conv_out.conv.bias"):
        load_vae_checkpoint(AutoencoderKLCausal3D(TINY_VAE_CONFIG), tmp_path / "pytorch_model.pt")
