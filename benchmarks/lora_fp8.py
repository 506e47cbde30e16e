"""LoRA on FP8 weights: a bf16 side branch, or the update fused into the weight and quantised? Measured.

For one linear at a 13B shape (img_attn_qkv: 3072 -> 9216; weights ~ N(0, 0.02^2), like bench_dit.py) and a
rank-16 update dW = B @ A scaled to a given size relative to W, three ways to run W + dW with FP8 weights:

  side branch      FP8(W) x + (B A) x in bf16          hvlab's default (`LoRALinear` on an `FP8Linear`)
  fuse, from FP8   FP8(dequant(FP8(W)) + dW) x         all that is possible with the official FP8 checkpoint
  fuse, from bf16  FP8(W + dW) x                       possible when the bf16 weights are at hand

Reported against y = (W + dW) x in float32, on 256 random tokens: the output error ||y_method - y|| / ||y||,
and the update error ||(y_method - FP8(W) x) - dW x|| / ||dW x||, i.e. how much of what the adapter changes
survives (0 = all of it, 1 = as much error as the update itself). FP8 is the weight-only forward (dequantise,
then matmul), which is what the weights carry on any device.

    python benchmarks/lora_fp8.py                 # CPU, ~30 s
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvlab.fast.fp8 import dequantize_weight, quantize_weight  # noqa: E402


def fp8(w: torch.Tensor) -> torch.Tensor:
    return dequantize_weight(*quantize_weight(w), dtype=torch.float32)


def measure(out_f=9216, in_f=3072, rank=16, ratios=(0.003, 0.01, 0.03, 0.1), tokens=256, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    x = torch.randn(tokens, in_f, generator=g)
    A, B = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    W8 = fp8(W)
    rows = []
    for ratio in ratios:
        Bs = B * (ratio * W.norm() / (B @ A).norm())  # ||Bs @ A|| = ratio * ||W||
        dW = Bs @ A
        y, upd = x @ (W + dW).T, x @ dW.T
        base = x @ W8.T
        side = base + ((x.bfloat16() @ A.bfloat16().T) @ Bs.bfloat16().T).float()
        ways = {"side branch": side, "fuse, from FP8": x @ fp8(W8 + dW).T, "fuse, from bf16": x @ fp8(W + dW).T}
        for name, ym in ways.items():
            rows.append(dict(update_size=ratio, method=name, output_error=float((ym - y).norm() / y.norm()),
                             update_error=float(((ym - base) - upd).norm() / upd.norm())))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = measure()
    print("| ||dW|| / ||W|| | method | output error | update error |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['update_size']:.1%} | {r['method']} | {r['output_error']:.2%} | {r['update_error']:.1%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, torch=torch.__version__), f, indent=2)


if __name__ == "__main__":
    main()
