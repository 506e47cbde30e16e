"""Where does a 720p DiT step go? Kernel-level CUDA time of one forward of a shallow 13B-width model.

The per-block work does not depend on depth, so 2 double + 4 single blocks at the full 720p token count
(118,800 video + 256 text tokens) show the same per-block split as the 60-block model, in a tenth of the time.
Prints, per implementation (hvlab FP8 scaled_mm, hvlab bf16), the step time, then the CUDA kernels grouped
(attention, GEMM, Triton kernels, other elementwise) and the top kernels by total time. Writes $OUT/profile.txt.

    python scripts/gpu/profile_step.py [--double 2 --single 4 --size 720p]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))

from bench_dit import SIZES, build_hvlab, free, make_inputs, sdpa_context, step_fn, sync, tokens  # noqa: E402
from hvlab.model import HYVIDEO_T2_CONFIG  # noqa: E402


def group(name: str) -> str:
    n = name.lower()
    if "fmha" in n or "flash" in n or "attention" in n or "cudnn" in n and "sdpa" in n:
        return "attention"
    if "gemm" in n or "xmma" in n or "cutlass" in n or "sm90" in n or "cublas" in n or "nvjet" in n:
        return "gemm"
    if "_kernel" in n and ("norm_rope" in n or "quantize" in n or "triton" in n or n.startswith("_")):
        return "triton"
    return "other"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--size", default="720p")
    p.add_argument("--impls", default="hvlab-fp8,hvlab-bf16")
    a = p.parse_args()
    dev = torch.device("cuda")
    cfg = dataclasses.replace(HYVIDEO_T2_CONFIG, mm_double_blocks_depth=a.double, mm_single_blocks_depth=a.single)
    lines = [f"{torch.cuda.get_device_name()} torch {torch.__version__}; {a.double} double + {a.single} single "
             f"blocks at {a.size} ({tokens(cfg, SIZES[a.size])} video tokens)"]
    for impl in a.impls.split(","):
        model = build_hvlab(cfg, dev, 0)
        if impl == "hvlab-fp8":
            from hvlab.fast.fp8 import convert_to_fp8, set_fp8_mode
            convert_to_fp8(model, mode="weight_only")
            set_fp8_mode(model, "scaled_mm")
        inp = make_inputs(cfg, SIZES[a.size], dev)
        step = step_fn(impl, model, inp)
        with torch.no_grad(), sdpa_context(dev):
            step(); sync(dev)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record(); step(); ev[1].record(); sync(dev)
            wall = ev[0].elapsed_time(ev[1]) / 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(); sync(dev)
        kern = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if e.device_type == torch.autograd.DeviceType.CUDA or t:
                if e.key and t and not e.key.startswith("cuda") and "Memcpy" not in e.key[:6]:
                    kern[e.key] = kern.get(e.key, (0.0, 0))
                    kern[e.key] = (kern[e.key][0] + t / 1e6, kern[e.key][1] + e.count)
        # keep only leaf kernels: drop aten op rows (their time double-counts kernels)
        kern = {k: v for k, v in kern.items() if not k.startswith("aten::")}
        total = sum(v[0] for v in kern.values())
        groups = {}
        for k, (t, c) in kern.items():
            groups[group(k)] = groups.get(group(k), 0.0) + t
        lines.append(f"\n== {impl}: step {wall:.3f} s (events), kernels sum {total:.3f} s, "
                     f"per block-equivalent x60/{a.double + a.single}: {wall * 60 / (a.double + a.single):.2f} s")
        for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {g:10s} {t:8.3f} s  {100 * t / total:5.1f}%")
        for k, (t, c) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:40]:
            lines.append(f"  {t * 1e3:9.2f} ms  x{c:4d}  [{group(k)}] {k[:150]}")
        del model, step, inp, prof
        free(dev)
        print("\n".join(lines[-48:]), flush=True)
    out = os.environ.get("OUT", "outputs")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "profile.txt"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
