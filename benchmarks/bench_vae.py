"""Time the causal 3D VAE decoding a 720x1280x129 latent with tiling: seconds, peak GPU memory, tile calls.

Runs, each in the same process and on the same card, fp16, random weights (the same weights for all):
  hvlab 256px/64f      AutoencoderKLCausal3D, the release's tiles (256 px, 64 frames, 25% overlap): 84 calls
  hvlab 128px/64f      128 px tiles (stride 96 px, 32 px blend), the release's temporal tiles
  hvlab 128px/32f      128 px tiles and 32-frame temporal tiles (8 + 1 latent frames, stride 6)
  diffusers ...        diffusers' AutoencoderKLHunyuanVideo, if `import diffusers` works (else skipped, and said):
                       at its own defaults (256 px, 16-frame temporal tiles: the reference's 28.7 s / 4.97 GiB
                       anchor), at the release's tiles (same plan as hvlab 256px/64f: outputs are compared), and
                       at 128 px with its default temporal tiles (the reference's 33.9 s / 2.36 GiB anchor).

Each run: a warm-up decode of a small latent at the same tile setting, then one timed decode between
torch.cuda.synchronize() calls, under torch.inference_mode, with the peak of torch.cuda.max_memory_allocated
(reset before the run; it includes the 0.49 GB of fp16 weights and the 0.71 GB output). Prints a markdown table;
writes $OUT/bench_vae.json (OUT defaults to ./outputs) after every run.

    python benchmarks/bench_vae.py                     # 720x1280x129 on the GPU
    python benchmarks/bench_vae.py --frames 65 --height 544 --width 960
    python benchmarks/bench_vae.py --quick             # tiny config, tiny video, CPU or GPU, seconds
    python benchmarks/bench_vae.py --meta              # no GPU: estimated peak per tile setting, from shapes

--meta decodes on the meta device (shapes only) and adds up the bytes of live tensors after every op: the peak of
activations + output, without weights, cuDNN workspace or allocator slack. For 720x1280x129 fp16 it gives
6.75 GiB (256 px / 64 frames), 2.75 GiB (128 px / 64 frames) and 1.62 GiB (128 px / 32 frames).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_dit import sync  # noqa: E402
from hvlab.vae import TINY_VAE_CONFIG, VAE_884_16C_HY_CONFIG, AutoencoderKLCausal3D  # noqa: E402
from hvlab.video import latent_shape  # noqa: E402

# (name, tile_sample_min_size px, tile_sample_min_num_frames, overlap) for hvlab; quick runs scale them down.
HVLAB_TILES = [("256px/64f", 256, 64, 0.25), ("128px/64f", 128, 64, 0.25), ("128px/32f", 128, 32, 0.25)]
QUICK_TILES = [("32px/16f", 32, 16, 0.25), ("32px/8f", 32, 8, 0.5)]


DIFFUSERS_DEFAULTS = dict(tile_sample_min_height=256, tile_sample_min_width=256, tile_sample_min_num_frames=16,
                          tile_sample_stride_height=192, tile_sample_stride_width=192, tile_sample_stride_num_frames=12)


def diffusers_settings(quick: bool):
    """(name, changes to diffusers' default tiles, the hvlab run whose output should match it or None)."""
    if quick:
        return [("32px/16f", dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                                  tile_sample_stride_width=24), "hvlab 32px/16f")]
    return [
        ("defaults 256px/16f", {}, None),
        ("256px/64f", dict(tile_sample_min_num_frames=64, tile_sample_stride_num_frames=48), "hvlab 256px/64f"),
        ("128px/16f", dict(tile_sample_min_height=128, tile_sample_min_width=128, tile_sample_stride_height=96,
                           tile_sample_stride_width=96), None),
    ]


def measure(decode, z, warm_z, device, reset_count, get_count) -> dict:
    """One decode of z after a warm-up decode of warm_z: seconds, peak GiB (None on CPU), decoder calls, output."""
    with torch.inference_mode():
        decode(warm_z)
        sync(device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        reset_count()
        t0 = time.perf_counter()
        out = decode(z)
        sync(device)
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(seconds=seconds, peak_GiB=peak, tile_calls=get_count(), finite=bool(torch.isfinite(out).all()),
                shape=list(out.shape)), out


def meta_peak_GiB(model, z) -> float:
    """Peak bytes of live tensor storages while decoding z on the meta device (see --meta)."""
    from hvlab.fast.memory import _LiveBytes

    track = _LiveBytes()
    with torch.inference_mode(), track:
        model.decode(z)
    return track.peak / 2**30


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs_diff": (a - b).abs().max().item(), "rel_err": ((a - b).norm() / b.norm()).item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=129, help="video frames (4k+1), default 129")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--quick", action="store_true", help="tiny config, 17x64x80 video: checks the script's logic")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline")
    p.add_argument("--meta", action="store_true", help="no GPU: estimate peak memory per tile setting from shapes")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args()

    device = torch.device("meta" if args.meta else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.float16  # fp16 conv3d is not a CPU thing
    if args.quick:
        cfg, (frames, height, width), tiles = TINY_VAE_CONFIG, (17, 64, 80), QUICK_TILES
    else:
        cfg, (frames, height, width), tiles = VAE_884_16C_HY_CONFIG, (args.frames, args.height, args.width), HVLAB_TILES
    C, T, h, w = latent_shape(height, width, frames, cfg.latent_channels)
    out_dir = args.out or os.environ.get("OUT") or "outputs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_vae.json")

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    env = {"device": card, "torch": torch.__version__,
           "dtype": str(dtype), "config": "tiny" if args.quick else "884-16c-hy", "video": [frames, height, width],
           "latent": [1, C, T, h, w], "seed": args.seed, "diffusers": None}
    if args.no_diffusers or args.meta:
        env["diffusers_skipped"] = "--meta" if args.meta else "--no-diffusers"
    else:
        try:
            import diffusers
            env["diffusers"] = diffusers.__version__
        except ImportError as e:
            env["diffusers_skipped"] = f"import diffusers failed ({e}); baseline not run"
    rows = []

    def save():
        with open(path, "w") as f:
            json.dump({"env": env, "runs": rows}, f, indent=1)

    def run(row, fn):
        try:
            fn(row)
        except Exception as e:  # record and go on (e.g. out of memory at one setting)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    torch.manual_seed(args.seed)
    model = AutoencoderKLCausal3D(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    env["weights_GiB"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
    print(json.dumps(env), flush=True)
    z = torch.randn(1, C, T, h, w, generator=torch.Generator().manual_seed(args.seed + 1)).to(device, dtype)
    warm_z = z[:, :, : min(T, 5), : min(h, 40), : min(w, 40)].clone()  # several tiles, some partial
    keep = {s for _, _, s in diffusers_settings(args.quick)} if env["diffusers"] else set()
    outputs = {}  # hvlab outputs (on the CPU) that a diffusers run is compared with

    def hvlab_run(row):
        model.enable_tiling(row["tile_px"], row["tile_frames"], row["overlap"])
        stats, out = measure(model.decode, z, warm_z, device, lambda: setattr(model, "decode_tile_calls", 0),
                             lambda: model.decode_tile_calls)
        row.update(stats)
        if row["impl"] in keep:
            outputs[row["impl"]] = out.cpu()

    def meta_run(row):
        model.enable_tiling(row["tile_px"], row["tile_frames"], row["overlap"])
        model.decode_tile_calls = 0
        row.update(estimated_peak_GiB=meta_peak_GiB(model, z), tile_calls=model.decode_tile_calls)

    for name, size, tframes, overlap in tiles:
        row = {"impl": f"hvlab {name}", "tile_px": size, "tile_frames": tframes, "overlap": overlap}
        run(row, meta_run if args.meta else hvlab_run)

    if env["diffusers"]:
        from diffusers import AutoencoderKLHunyuanVideo

        ref = AutoencoderKLHunyuanVideo(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor)
        ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()}, strict=True)  # same weights
        del model
        gc.collect()
        ref = ref.to(device, dtype).eval()
        calls = [0]
        inner = ref.decoder.forward

        def counted(x):
            calls[0] += 1
            return inner(x)

        ref.decoder.forward = counted

        def diffusers_run(row):
            ref.enable_tiling(**{**DIFFUSERS_DEFAULTS, **row.pop("changes")})
            stats, out = measure(lambda x: ref.decode(x).sample, z, warm_z, device, lambda: calls.__setitem__(0, 0),
                                 lambda: calls[0])
            row.update(stats)
            if row.get("same_plan_as") in outputs:
                row["vs_hvlab"] = compare(out.cpu(), outputs[row["same_plan_as"]])

        for name, changes, same_as in diffusers_settings(args.quick):
            run({"impl": f"diffusers {name}", "changes": changes, "same_plan_as": same_as}, diffusers_run)
    else:
        print(f"diffusers baseline skipped: {env['diffusers_skipped']}", flush=True)

    print(f"\nVAE decode of a 1x{C}x{T}x{h}x{w} latent ({frames}x{height}x{width}) on {env['device']}, {dtype}, "
          f"torch {env['torch']}; weights {env['weights_GiB']:.2f} GiB; one timed decode after a warm-up")
    if args.meta:
        print("(--meta: no timing; peak = estimated activations + output, add the weights)")
    print("| implementation | tile calls | seconds | peak GiB | note |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        peak = f"{r['peak_GiB']:.2f}" if r.get("peak_GiB") is not None else "-"
        if "estimated_peak_GiB" in r:
            peak = f"~{r['estimated_peak_GiB']:.2f}"
        secs = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        note = r.get("error", "" if r.get("finite", True) else "non-finite output")
        if "vs_hvlab" in r:
            note += (f"vs {r['same_plan_as']}: rel err {r['vs_hvlab']['rel_err']:.1e}, "
                     f"max abs diff {r['vs_hvlab']['max_abs_diff']:.1e}")
        print(f"| {r['impl']} | {r.get('tile_calls', '-')} | {secs} | {peak} | {note} |")
    if env.get("diffusers_skipped"):
        print(f"\ndiffusers: {env['diffusers_skipped']}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
