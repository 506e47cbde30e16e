"""How far is the FP8-GEMM DiT from the bf16 DiT on the same weights, after every block? Variants, measured.

One model with fan-in-scaled random weights (std 1/sqrt(fan_in), hvlab.model.randomize_weights_'s rule,
drawn on the model's device), one input, and for each FP8 variant a copy of the model converted with
hvlab.fast.fp8.convert_to_fp8: the relative error ||v_fp8 - v_ref|| / ||v_ref|| of the whole output
(the predicted velocity), and of the image tokens after the double stream and after every 10th block.

Variants (``--variants``):
  weight_only/tensor       the official FP8 path: e4m3 weights, one scale per tensor, bf16 maths
  weight_only/channel      the same with one scale per output channel
  scaled_mm/tensor/token   FP8 GEMMs, per-tensor weight scales, per-token activation scales (the default)
  scaled_mm/channel/token  per-output-channel weight scales (rowwise _scaled_mm: same kernel, same cost)
  scaled_mm/tensor/tensor  one activation scale per call
  scaled_mm/channel/token+mod-bf16   the adaLN modulation linears kept in bf16 (M = B rows: no GEMM time to
                           save; their error shifts every token at once; +26% of the weights' bytes in bf16)
and, with ``--sweep``, a per-layer-kind sensitivity sweep (only that kind in FP8) followed by
scaled_mm/channel/token keeping the 1, 2, 3 most sensitive kinds in bf16 (``keep-bf16:<kinds>``).

On a GPU the models run the fast wing's blocks (``accelerate(chunk_tokens=16384, attention="sdpa")``,
what load_pipeline runs); on the CPU the reference blocks, and the FP8 GEMM is emulated in fp32 (the e4m3 operands' exact products, fp32 sums: what the
tensor cores compute without fast accumulation) and the model runs in fp32, so the table shows the FP8
error alone; on an FP8 GPU the real ``torch._scaled_mm`` runs against the bf16 model. Random weights show
how the rounding error grows with depth, not the quality a real checkpoint would keep.

    python benchmarks/fp8_depth_error.py --size 720p --sweep                     # 13B, 720p: one H100/H200
    OMP_NUM_THREADS=1 python benchmarks/fp8_depth_error.py --device cpu --hidden 512 --heads 4 \\
        --grid 2 24 24 --sweep                                                   # full depth, reduced width
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvlab.fast.fp8 import (MODULATION_KINDS, FP8Linear, convert_to_fp8, default_fp8_filter, fp8_filter,  # noqa: E402
                            layer_kind)
from hvlab.model import HYVIDEO_T2_CONFIG, HYVideoDiffusionTransformer  # noqa: E402

SIZES = {"720p": (33, 90, 160), "544p": (33, 68, 120)}
VARIANTS = {  # name: (mode, per_channel weight scales, per_token activation scales, kinds kept in bf16)
    "weight_only/tensor": ("weight_only", False, True, "none"),
    "weight_only/channel": ("weight_only", True, True, "none"),
    "scaled_mm/tensor/token": ("scaled_mm", False, True, "none"),
    "scaled_mm/channel/token": ("scaled_mm", True, True, "none"),
    "scaled_mm/tensor/tensor": ("scaled_mm", False, False, "none"),
    "scaled_mm/channel/token+mod-bf16": ("scaled_mm", True, True, "modulation"),
}


@torch.no_grad()
def init_fan_in_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """randomize_weights_'s rule (matrices std 1/sqrt(fan_in), biases std 0.1, norm weights 1 + 0.1 noise),
    drawn with a generator on each parameter's own device (a 13B model is never built on the CPU)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 1 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]:
            p.normal_(1.0, 0.1, generator=g)
        else:
            p.normal_(0.0, 0.1, generator=g)
    return model


def make_inputs(config, grid, text_len: int, text_real: int, device, dtype, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, text_len)
    mask[:, :text_real] = 1
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return dict(x=r(1, config.in_channels, *grid), t=torch.tensor([900.0], device=device),
                text_states=r(1, text_len, config.text_states_dim), text_mask=mask.to(device),
                text_states_2=r(1, config.text_states_dim_2), guidance=torch.tensor([6016.0], device=device))


@contextlib.contextmanager
def emulated_fp8_gemm():
    """FP8Linear.forward_fp8 as fp32 maths on the e4m3 operands (for CPUs): y = (x_fp8 s_x) @ (w_fp8 s_w)^T + b."""
    original = FP8Linear.forward_fp8

    def forward_fp8(self, x_fp8, s_x, dtype):
        s_w = self.weight_scale.reshape(1, -1) if self.weight_scale.dim() else self.weight_scale
        y = (x_fp8.float() * s_x.reshape(-1, 1) if s_x.dim() else x_fp8.float() * s_x) @ \
            (self.weight.float() * s_w.reshape(-1, 1) if s_w.dim() else self.weight.float() * s_w).t()
        return (y if self.bias is None else y + self.bias.float()).to(dtype)

    FP8Linear.forward_fp8 = forward_fp8
    try:
        yield
    finally:
        FP8Linear.forward_fp8 = original


def to_fp8(model, mode: str, per_channel: bool, per_token: bool, keep_bf16=()):
    """A converted copy of ``model``: the official filter less the layer kinds in ``keep_bf16``; ``mode`` is set
    on the layers directly (convert_to_fp8 would fall back to weight_only off FP8 GPUs)."""
    fp8 = copy.deepcopy(model)
    convert_to_fp8(fp8, mode="weight_only", per_channel=per_channel, per_token=per_token,
                   include=fp8_filter(fp8, keep_bf16))
    for m in fp8.modules():
        if isinstance(m, FP8Linear):
            m.mode = mode
    return fp8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Probe:
    """The image tokens after the double stream and after every ``every``-th block (forward hooks)."""

    def __init__(self, model, every: int = 10):
        self.out, self.handles = {}, []
        blocks = [("double", i, b) for i, b in enumerate(model.double_blocks)] + \
                 [("single", i, b) for i, b in enumerate(model.single_blocks)]
        n_img = [None]
        for depth, (k, i, b) in enumerate(blocks, 1):
            last_double = k == "double" and i == len(model.double_blocks) - 1
            if depth % every == 0 or last_double or depth == len(blocks):
                self.handles.append(b.register_forward_hook(self._hook(f"{depth}", k, n_img)))
        self.handles.append(model.register_forward_pre_hook(
            lambda m, a, kw: n_img.__setitem__(0, math.prod(m.grid_size((a[0] if a else kw["x"]).shape))),
            with_kwargs=True))

    def _hook(self, name, k, n_img):
        def hook(module, args, output):
            img = output[0] if k == "double" else output[:, :n_img[0]]
            self.out[name] = img.float().cpu()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run(model, inputs) -> tuple[torch.Tensor, dict]:
    probe = Probe(model)
    try:
        with torch.no_grad():
            out = model(**inputs).float().cpu()
    finally:
        probe.close()
    return out, probe.out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help=f"a latent grid of 129 frames from {list(SIZES)} (13B runs)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"), help="latent grid")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: the 13B model's 3072)")
    p.add_argument("--heads", type=int, default=None, help="heads (head_dim stays hidden / heads)")
    p.add_argument("--double", type=int, default=None, help="double blocks (default 20)")
    p.add_argument("--single", type=int, default=None, help="single blocks (default 40)")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--text-real", type=int, default=24)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--sweep", action="store_true", help="per-kind sensitivity sweep, then keep-bf16 variants")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.variants.split(",") if s.strip()]
    if any(n not in VARIANTS for n in names):
        p.error(f"--variants must come from {list(VARIANTS)}, got {names}")
    if (args.size is None) == (args.grid is None):
        p.error("give one of --size (720p, 544p) or --grid T H W")
    if args.size is not None and args.size not in SIZES:
        p.error(f"--size must be one of {list(SIZES)}, got {args.size!r}")
    grid = tuple(SIZES[args.size] if args.size else args.grid)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = HYVIDEO_T2_CONFIG
    hidden, heads = args.hidden or c.hidden_size, args.heads or c.heads_num
    hd = hidden // heads
    if hd != c.head_dim and args.hidden:
        p.error(f"keep head_dim {c.head_dim} (RoPE splits it 16/56/56): --hidden / --heads gave {hd}")
    config = replace(c, hidden_size=hidden, heads_num=heads,
                     mm_double_blocks_depth=c.mm_double_blocks_depth if args.double is None else args.double,
                     mm_single_blocks_depth=c.mm_single_blocks_depth if args.single is None else args.single)
    out_dir = args.out or os.environ.get("OUT") or "outputs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fp8_depth_error.json")

    t0 = time.perf_counter()
    model = HYVideoDiffusionTransformer(config, device="meta", dtype=dtype).to_empty(device=device)
    model = init_fan_in_(model, args.seed).eval()
    if device.type == "cuda":  # the path that runs at 720p: fast blocks, token chunks, the fused FP8 quantiser
        from hvlab.fast import accelerate

        accelerate(model, chunk_tokens=16384, attention="sdpa")
    L_img = math.prod(model.grid_size((1, config.in_channels, *grid)))
    inputs = make_inputs(config, grid, args.text_len, args.text_real, device, dtype)
    report = {"env": {"torch": torch.__version__, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                      "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "threads": torch.get_num_threads()},
              "config": {"hidden": hidden, "heads": heads, "double": config.mm_double_blocks_depth,
                         "single": config.mm_single_blocks_depth, "grid": list(grid), "L_img": L_img,
                         "text": [args.text_len, args.text_real]},
              "gemm": "torch._scaled_mm" if device.type == "cuda" else "fp32 emulation", "rows": []}
    ref, ref_depth = run(model, inputs)
    report["reference_seconds"] = round(time.perf_counter() - t0, 1)

    def measure(name, **kw):
        t = time.perf_counter()
        fp8 = to_fp8(model, **kw)
        out, depth = run(fp8, inputs)
        del fp8
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = {"variant": name, "rel": rel(out, ref), "by_depth": {d: rel(depth[d], ref_depth[d]) for d in depth},
               "seconds": round(time.perf_counter() - t, 1)}
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "by_depth"}), flush=True)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
        return row

    gemm = contextlib.nullcontext() if device.type == "cuda" else emulated_fp8_gemm()
    with gemm:
        all_kinds = sorted({layer_kind(n) for n, m in model.named_modules() if default_fp8_filter(n, m)})
        for n in names:
            mode, per_channel, per_token, keep = VARIANTS[n]
            kept = [k for k in all_kinds if k in MODULATION_KINDS] if keep == "modulation" else []
            measure(n, mode=mode, per_channel=per_channel, per_token=per_token, keep_bf16=kept)
        if args.sweep:
            kinds = all_kinds
            solo = {}
            for k in kinds:  # only this kind in FP8: its own contribution to the output error
                others = [o for o in kinds if o != k]
                solo[k] = measure(f"only:{k}", mode="scaled_mm", per_channel=True, per_token=True,
                                  keep_bf16=others)["rel"]
            ranked = sorted(kinds, key=solo.get, reverse=True)
            report["sensitivity"] = [[k, solo[k]] for k in ranked]
            for n_keep in (1, 2, 3):
                keep = ranked[:n_keep]
                measure("keep-bf16:" + "+".join(keep), mode="scaled_mm", per_channel=True, per_token=True,
                        keep_bf16=keep)
    print(table(report))
    print(f"wrote {path}")
    return report


def table(report: dict) -> str:
    c = report["config"]
    depths = list(report["rows"][0]["by_depth"]) if report["rows"] else []
    lines = [f"FP8 GEMMs vs {report['env']['dtype']} on the same weights: hidden {c['hidden']}, {c['double']} + "
             f"{c['single']} blocks, grid {c['grid']} ({c['L_img']} video tokens), {report['gemm']}", "",
             "| variant | output | " + " | ".join(f"after block {d}" for d in depths) + " |",
             "|---|---|" + "---|" * len(depths)]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['rel']:.2%} | " + " | ".join(f"{r['by_depth'][d]:.2%}" for d in depths)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
