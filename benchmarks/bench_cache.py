"""What step caching costs and saves per DiT step at 720p x 129 frames (random weights), and the 50-step projection.

For each cache mode (hvlab.fast.cache: fbcache, teacache), on the 13B configuration with random weights and
the fast blocks (bf16, or FP8 with --fp8), one rank, batch 1 (the release is guidance-distilled: one row):

  uncached       one DiT forward with no cache (the baseline, same run)
  computed       a step the cache computes, at threshold 0: the blocks + the signal, its L1 sums, the residual
  skipped        a step the cache skips (threshold 1e9, a step that is neither first nor last): embed, the
                 signal (fbcache: the first block), the residual add, the final layer
  check          the decision alone on tensors of the real shape (signal + two L1 sums + the host sync)

and the time of a 50-step run that computes K of the 50 steps, K * computed + (50 - K) * skipped, for a few K.
Random weights say nothing about K: which steps a real checkpoint lets one skip depends on its weights
(docs/benchmarks.md quotes the published skip ratios). Writes $OUT/bench_cache.json after every mode.

    python benchmarks/bench_cache.py --size 720p               # the GPU run (one H100/H200: ~3 minutes)
    python benchmarks/bench_cache.py --size 720p --fp8 --repeats 3
    python benchmarks/bench_cache.py --quick                    # tiny config, CPU or GPU, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_dit import QUICK_SIZE, SIZES, build_hvlab, environment, free, make_inputs, sdpa_context, sync  # noqa: E402
from hvlab.fast.cache import MODES, StepCache, l1_rows, teacache_signal  # noqa: E402
from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG  # noqa: E402

STEPS = 50
PROJECTED_K = (50, 40, 31, 24, 18)  # computed steps of 50: 1x, 1.25x, ~1.6x, ~2.1x, ~2.8x fewer forwards


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def cached_steps(model, inp, mode: str, threshold: float, repeats: int, device) -> list[float]:
    """Time steps 1..repeats of a cached loop (step 0, always computed, fills the cache untimed)."""
    cache = StepCache(model, mode, threshold)
    times = []
    with cache:
        cache.begin(repeats + 2)  # the last step (forced) is never run: every timed step is a free decision
        cache.set_step(0)
        model(**inp)
        for i in range(1, repeats + 1):
            cache.set_step(i)
            times += timed(lambda: model(**inp), device, 1)
    expected = threshold == 0
    assert all(c == [expected] for c in cache.stats.computed[1:]), cache.stats.computed  # measured what we meant
    return times


def check_time(model, inp, mode: str, repeats: int, device) -> list[float]:
    """The decision's own cost: the signal (fbcache: the residual of block 0's output, given) and two L1 sums."""
    m = model
    t, g = m.check_inputs(inp["x"], inp["t"], inp["text_states"], inp["text_mask"], inp["text_states_2"],
                          inp["guidance"])
    img, _, vec, _ = m.embed(inp["x"], t, inp["text_states"], inp["text_mask"], inp["text_states_2"], g)
    prev, other = torch.randn_like(img), torch.randn_like(img)

    def decide():
        signal = teacache_signal(m.double_blocks[0], img, vec) if mode == "teacache" else other - img
        sums = torch.stack([l1_rows(signal, prev), l1_rows(prev)])
        return sums.cpu()

    decide()
    return timed(decide, device, repeats)


def run(config, grid, device, repeats: int, fp8: bool, seed: int, report: dict, path: str) -> dict:
    """Fill ``report`` with the measurements, writing it to ``path`` after the baseline and after every mode."""
    model = build_hvlab(config, device, seed)
    if fp8:
        from hvlab.fast.fp8 import convert_to_fp8

        convert_to_fp8(model, mode="auto")
    inp = make_inputs(config, grid, device)
    pt, ph, pw = config.patch_size
    report.update(L_img=(grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw), precision="fp8" if fp8 else "bf16",
                  repeats=repeats, modes={})
    with torch.no_grad(), sdpa_context(device):
        model(**inp)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report["uncached_s"] = statistics.median(timed(lambda: model(**inp), device, repeats))
        if device.type == "cuda":
            report["uncached_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        _write(path, report)
        for mode in MODES:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = {"computed_s": statistics.median(cached_steps(model, inp, mode, 0.0, repeats, device)),
                   "skipped_s": statistics.median(cached_steps(model, inp, mode, 1e9, repeats, device)),
                   "check_s": statistics.median(check_time(model, inp, mode, max(repeats, 5), device))}
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["overhead_s"] = row["computed_s"] - report["uncached_s"]
            row["projection_s"] = {str(k): k * row["computed_s"] + (STEPS - k) * row["skipped_s"] for k in PROJECTED_K}
            report["modes"][mode] = row
            print(json.dumps({mode: row}), flush=True)
            _write(path, report)
            free(device)
    return report


def _write(path: str, report: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)  # a timeout mid-write leaves the previous complete file


def markdown(env: dict, r: dict) -> str:
    lines = [f"Step cache at L_img {r['L_img']}, {r['precision']}, {env['card']}, torch {env['torch']} "
             f"(median of {r['repeats']})", "",
             "| mode | uncached s/step | computed step | skipped step | check alone | peak GiB | "
             + " | ".join(f"50 steps, {k} computed" for k in PROJECTED_K) + " |",
             "|---" * (6 + len(PROJECTED_K)) + "|"]
    for mode, m in r["modes"].items():
        peak = f"{m['peak_gib']:.1f}" if "peak_gib" in m else "-"
        lines.append(f"| {mode} | {r['uncached_s']:.3f} | {m['computed_s']:.3f} | {m['skipped_s']:.4f} | "
                     f"{m['check_s'] * 1e3:.2f} ms | {peak} | "
                     + " | ".join(f"{m['projection_s'][str(k)]:.1f} s" for k in PROJECTED_K) + " |")
    lines.append(f"\n50 uncached steps: {STEPS * r['uncached_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="720p", choices=sorted(SIZES))
    p.add_argument("--quick", action="store_true", help="tiny config and latent: a smoke test on CPU or GPU")
    p.add_argument("--fp8", action="store_true", help="FP8 linears (scaled_mm where the card has them)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (the median is kept)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    config, grid = (TINY_CONFIG, QUICK_SIZE["quick"]) if args.quick else (HYVIDEO_T2_CONFIG, SIZES[args.size])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out or os.environ.get("OUT") or "outputs"
    os.makedirs(out_dir, exist_ok=True)
    try:  # batch 1: plain SDPA (cuDNN under sdpa_context), as bench_dit
        from hvlab.attention import set_attention_backend

        set_attention_backend("sdpa")
    except (ImportError, ValueError):
        pass
    env = environment(device)
    path = os.path.join(out_dir, "bench_cache.json")
    report = {"env": env, "config": "tiny" if args.quick else "HYVideo-T/2-cfgdistill",
              "size": "quick" if args.quick else args.size}
    print(json.dumps(env), flush=True)
    run(config, grid, device, args.repeats, args.fp8, args.seed, report, path)
    print(markdown(env, report))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
