"""Time one DiT step (one forward: the model is guidance-distilled) at 720p and 544p, 129 frames.

Implementations, each in the same run and on the same card (hvlab's with the fast wing's blocks, and the
attention named: "sdpa" = cuDNN SDPA, "fa3" = FlashAttention-3 with hvlab's varlen segments, "fp8" = hvlab's
FP8 attention, its Triton kernel; hvlab.fast.accelerate(attention=...)):
  hvlab-bf16               HYVideoDiffusionTransformer in bf16, cuDNN SDPA
  hvlab-fa3                the same with FlashAttention-3 (exact; needs the fa3 extra on an sm90 GPU)
  hvlab-fp8                FP8 GEMMs (hvlab.fast.fp8.convert_to_fp8, mode "scaled_mm"), cuDNN SDPA
  hvlab-fp8-fa3            FP8 GEMMs + FlashAttention-3
  hvlab-fp8-fp8attn        FP8 GEMMs + FP8 attention, recipe fp8_attention.DEFAULT_RECIPE (INT8 QK^T, FP8 PV)
  hvlab-fp8-int8attn       FP8 GEMMs + INT8 QK^T / bf16 PV attention (recipe "int8qk-block+K-bf16pv")
  hvlab-reference          (not run by default) the reference blocks alone (no fast wing): what a student reads
  hvlab-fp8-weight-only    (not run by default) the official FP8 behaviour: fp8 storage, bf16 math
  diffusers                diffusers' HunyuanVideoTransformer3DModel in bf16, its default attention (if importable)

All models are the 13B configuration with random weights (normal, std 0.02, fixed seed; norm weights 1),
built on "meta" and materialised directly on the GPU, one model at a time. Text is 256 padded tokens of
which 24 are real: hvlab attends over the real ones only (exact for batch 1), diffusers gets the mask.
Attention runs under sdpa_kernel([cuDNN, flash, efficient]) with priority where torch supports it.

Reports s/step (after one warm-up step), TFLOP/s against the nominal count of `dit_flops` (with
L_txt = 256, the reference's 12.07 PFLOP at 720p, for every implementation), peak memory, card and torch.
Writes $OUT/bench_dit.json (OUT defaults to ./outputs) after every configuration, then prints a table.

    python benchmarks/bench_dit.py                          # 720p and 544p, the default impls, 1 timed step
    python benchmarks/bench_dit.py --sizes 544p --impls hvlab-fp8 --steps 3
    python benchmarks/bench_dit.py --quick                  # tiny config, CPU or GPU, seconds
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoConfig, HYVideoDiffusionTransformer  # noqa: E402

# Latent grids (T, H, W) for 129 frames: the causal VAE maps 4k+1 frames -> k+1 and divides H, W by 8.
SIZES = {"720p": (33, 90, 160), "544p": (33, 68, 120)}  # 720x1280, 544x960
QUICK_SIZE = {"quick": (3, 8, 8)}
# impl: (FP8 GEMM mode or None, hvlab.fast.accelerate's attention, FP8 attention recipe name or None)
HVLAB_IMPLS = {
    "hvlab-bf16": (None, "sdpa", None),
    "hvlab-fa3": (None, "fa3", None),
    "hvlab-fp8": ("scaled_mm", "sdpa", None),
    "hvlab-fp8-fa3": ("scaled_mm", "fa3", None),
    "hvlab-fp8-fp8attn": ("scaled_mm", "fp8", None),
    "hvlab-fp8-int8attn": ("scaled_mm", "fp8", "int8qk-block+K-bf16pv"),
    "hvlab-fp8-weight-only": ("weight_only", "sdpa", None),
    "hvlab-reference": (None, "sdpa", None),  # built without the fast wing
}
IMPLS = ("diffusers", "hvlab-bf16", "hvlab-fa3", "hvlab-fp8", "hvlab-fp8-fa3", "hvlab-fp8-fp8attn", "hvlab-fp8-int8attn")
ALL_IMPLS = IMPLS + ("hvlab-fp8-weight-only", "hvlab-reference")
TEXT_LEN, TEXT_REAL = 256, 24  # padded text length (the LLM's max) and real tokens in it


def dit_flops(config: HYVideoConfig, L_img: int, L_txt: int) -> dict[str, float]:
    """FLOPs of one DiT forward: block linears + attention (2 FLOPs per multiply-add).

    Per token and block, double and single blocks cost the same: D*3D (qkv) + D*D (proj) + 2*D*mlp (MLP) in a
    double block (each token through its own stream's weights), D*(3D+mlp) + (D+mlp)*D in a single block.
    Attention costs 4*L^2*D per block (QK^T and PV over all heads). Ignored, being < 0.1%: embedders, the
    token refiner, per-sample modulation linears, the final layer, norms, RoPE, softmax.
    At 720x1280x129 (L_img 118,800, L_txt 256): linear 1.618, attention 10.45, total 12.07 PFLOP.
    """
    D, mlp = config.hidden_size, config.mlp_hidden_dim
    L = L_img + L_txt
    double = 2 * (D * 3 * D + D * D + D * mlp + mlp * D) * L
    single = 2 * (D * (3 * D + mlp) + (D + mlp) * D) * L
    linear = config.mm_double_blocks_depth * double + config.mm_single_blocks_depth * single
    attention = (config.mm_double_blocks_depth + config.mm_single_blocks_depth) * 4 * L * L * D
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def tokens(config: HYVideoConfig, grid: tuple[int, int, int]) -> int:
    return (grid[0] // config.patch_size[0]) * (grid[1] // config.patch_size[1]) * (grid[2] // config.patch_size[2])


# ------------------------------------------------------------------------------------------------- models
@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter in place on its own device: normal(0, std), norm weights 1 (a seeded generator)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)
    return model


def _materialise(model: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    if any(True for _ in model.buffers()):
        raise RuntimeError("init_random_ fills parameters only; this model has buffers that to_empty leaves garbage")
    return init_random_(model.to_empty(device=device), seed)


def build_hvlab(config: HYVideoConfig, device: torch.device, seed: int, fast: bool = True,
                attention: str = "sdpa", fp8_recipe=None) -> torch.nn.Module:
    """hvlab's DiT with random weights; ``fast``: with the fast wing's blocks and ``attention``
    (``hvlab.fast.accelerate``)."""
    from hvlab.fast import accelerate

    model = _materialise(HYVideoDiffusionTransformer(config, device="meta", dtype=torch.bfloat16), device, seed)
    return (accelerate(model, attention=attention, fp8_recipe=fp8_recipe) if fast else model).eval()


def diffusers_kwargs(config: HYVideoConfig) -> dict:
    assert config.patch_size[1] == config.patch_size[2], "diffusers takes one spatial patch size"
    return dict(in_channels=config.in_channels, out_channels=config.out_channels, num_attention_heads=config.heads_num,
                attention_head_dim=config.head_dim, num_layers=config.mm_double_blocks_depth,
                num_single_layers=config.mm_single_blocks_depth, num_refiner_layers=config.refiner_depth,
                mlp_ratio=config.mlp_width_ratio, patch_size=config.patch_size[1], patch_size_t=config.patch_size[0],
                guidance_embeds=config.guidance_embed, text_embed_dim=config.text_states_dim,
                pooled_projection_dim=config.text_states_dim_2, rope_theta=config.rope_theta,
                rope_axes_dim=tuple(config.rope_dim_list))


def build_diffusers(config: HYVideoConfig, device: torch.device, seed: int) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**diffusers_kwargs(config))
    return _materialise(model.to(torch.bfloat16), device, seed).eval()


def make_inputs(config: HYVideoConfig, grid, device, seed: int = 1) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    bf = dict(dtype=torch.bfloat16)
    mask = torch.zeros(1, TEXT_LEN)
    mask[:, :TEXT_REAL] = 1
    return {
        "x": torch.randn(1, config.in_channels, *grid, generator=g, **bf).to(device),
        "t": torch.tensor([900.0], device=device),
        "text_states": torch.randn(1, TEXT_LEN, config.text_states_dim, generator=g, **bf).to(device),
        "text_mask": mask.to(device),
        "text_states_2": torch.randn(1, config.text_states_dim_2, generator=g, **bf).to(device),
        "guidance": torch.tensor([6016.0], device=device),  # embedded cfg 6.0 * 1000, as bf16 rounds it
    }


def step_fn(impl: str, model, inp: dict):
    if impl == "diffusers":
        return lambda: model(inp["x"], inp["t"], inp["text_states"], inp["text_mask"].bool(), inp["text_states_2"],
                             guidance=inp["guidance"], return_dict=False)[0]
    return lambda: model(inp["x"], inp["t"], inp["text_states"], inp["text_mask"], inp["text_states_2"],
                         guidance=inp["guidance"])


def sdpa_context(device: torch.device):
    """Prefer cuDNN attention (the fastest on H100 here), then flash, then memory-efficient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if device.type != "cuda":
        backends.append(SDPBackend.MATH)  # the CPU smoke test; on a GPU, math at L ~ 1e5 would only OOM
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


# ----------------------------------------------------------------------------------------------- running
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_one(impl: str, size: str, grid, config: HYVideoConfig, device, steps: int, seed: int,
            fast_accum: bool) -> dict:
    L_img = tokens(config, grid)
    flops = dit_flops(config, L_img, TEXT_LEN)
    row = {"size": size, "impl": impl, "latent": [config.in_channels, *grid], "L_img": L_img,
           "L_txt": TEXT_LEN, "L_txt_real": TEXT_REAL, "pflop_per_step": flops["total"] / 1e15}
    model = out = None
    try:
        t0 = time.perf_counter()
        if impl == "diffusers":
            model = build_diffusers(config, device, seed)
        else:
            from hvlab.fast.fp8_attention import RECIPES

            mode, attention, recipe = HVLAB_IMPLS[impl]
            recipe = None if recipe is None else RECIPES[recipe]
            if attention == "fp8" and device.type == "cuda":  # never time the fp32 emulation at 720p (hours)
                from hvlab.fast.fp8_attention import DEFAULT_RECIPE, triton_serves

                probe = torch.empty(1, 1, config.heads_num, config.head_dim, device=device, dtype=torch.bfloat16)
                ok, reason = triton_serves(probe, recipe or DEFAULT_RECIPE)
                if not ok:
                    raise RuntimeError(f"FP8 attention's Triton kernel cannot run here: {reason}")
            model = build_hvlab(config, device, seed, attention=attention, fp8_recipe=recipe)
            row["attention"] = attention
            if attention == "fp8":
                from hvlab.fast.fp8_attention import DEFAULT_RECIPE

                row["fp8_attention_recipe"] = str(recipe or DEFAULT_RECIPE)
            if mode is not None:
                from hvlab.fast.fp8 import convert_to_fp8, fp8_param_share, set_fp8_mode

                convert_to_fp8(model, mode="weight_only", use_fast_accum=fast_accum)
                row["fp8_mode"] = set_fp8_mode(model, mode)  # falls back (with a warning) off FP8 GPUs
                row["fp8_param_share"] = round(fp8_param_share(model), 4)
                row["fast_accum"] = fast_accum
        sync(device)
        free(device)
        row["build_s"] = round(time.perf_counter() - t0, 2)
        inp = make_inputs(config, grid, device)
        step = step_fn(impl, model, inp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with torch.no_grad(), sdpa_context(device):
            for i in range(steps + 1):  # step 0 warms up (cuDNN plans, allocator)
                sync(device)
                t0 = time.perf_counter()
                out = step()
                sync(device)
                times.append(time.perf_counter() - t0)
        row["warmup_s"] = round(times[0], 3)
        row["step_s"] = [round(t, 3) for t in times[1:]]
        row["s_per_step"] = sum(times[1:]) / steps
        row["tflops"] = flops["total"] / row["s_per_step"] / 1e12
        row["finite"] = bool(torch.isfinite(out).all())
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:  # record and go on: an OOM in one configuration must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    finally:
        del model, out
        free(device)
    return row


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["card"] = "cpu"
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        env["diffusers"] = f"not importable ({type(e).__name__})"
    return env


def markdown_table(env: dict, rows: list[dict]) -> str:
    lines = [f"DiT step, {env['card']}, torch {env['torch']} (TFLOP/s against the nominal FLOPs, L_txt = {TEXT_LEN})",
             "", "| size | impl | s/step | vs diffusers | TFLOP/s | peak GiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["size"]: r["s_per_step"] for r in rows if r["impl"] == "diffusers" and "s_per_step" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['impl']} | - | - | - | - | {r['error'][:80]} |")
            continue
        speedup = f"{base[r['size']] / r['s_per_step']:.2f}x" if r["size"] in base else "-"
        note = [f"attention {r['attention']}"] if "attention" in r else []
        if "fp8_attention_recipe" in r:
            note.append(r["fp8_attention_recipe"])
        if "fp8_mode" in r:
            note.append(f"fp8 {r['fp8_mode']}" + ("" if r.get("fast_accum", True) else ", exact accumulation"))
        if not r.get("finite", True):
            note.append("non-finite output")
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['size']} | {r['impl']} | {r['s_per_step']:.3f} | {speedup} | {r['tflops']:.4g} | {peak} | "
                     f"{', '.join(note)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="720p,544p", help=f"comma list of {list(SIZES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(ALL_IMPLS)}")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration, after one warm-up")
    p.add_argument("--quick", action="store_true", help="tiny config and latent: a smoke test on CPU or GPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--exact-accum", action="store_true",
                   help="hvlab-fp8: exact fp32 accumulation instead of Hopper's fast FP8 accumulation (the default)")
    p.add_argument("--norm-rope", nargs=2, metavar=("PAIRS", "WARPS"), default=None,
                   help="hvlab: the QK-norm + RoPE kernel's setting, e.g. 'split 4' (scripts/gpu/bench_kernels.py "
                        "prints the fastest); default: hvlab.fast.kernels's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args(argv)

    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in ALL_IMPLS]
    if bad:
        p.error(f"--impls must come from {list(ALL_IMPLS)}, got {bad}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.quick:
        config, sizes = TINY_CONFIG, QUICK_SIZE
    else:
        names = [s.strip() for s in args.sizes.split(",") if s.strip()]
        if any(n not in SIZES for n in names):
            p.error(f"--sizes must come from {list(SIZES)}, got {names}")
        config, sizes = HYVIDEO_T2_CONFIG, {n: SIZES[n] for n in names}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out or os.environ.get("OUT") or "outputs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_dit.json")

    try:  # hvlab attends with plain SDPA (cuDNN under sdpa_context), not flash-attn varlen, for batch 1
        from hvlab.attention import set_attention_backend

        set_attention_backend("sdpa")
    except (ImportError, ValueError):
        pass

    from hvlab.fast import kernels as fused

    if args.norm_rope:
        if args.norm_rope[0] not in fused.PAIR_MODES or not args.norm_rope[1].isdigit():
            p.error(f"--norm-rope takes a mode from {list(fused.PAIR_MODES)} and a warp count, got {args.norm_rope}")
        fused.pair_mode, fused.num_warps = args.norm_rope[0], int(args.norm_rope[1])
    env = environment(device)
    env["norm_rope"] = f"{fused.pair_mode}, {fused.num_warps} warps"
    report = {"env": env, "config": "tiny" if args.quick else "HYVideo-T/2-cfgdistill", "steps": args.steps,
              "text": {"padded": TEXT_LEN, "real": TEXT_REAL}, "results": []}
    print(json.dumps(env), flush=True)
    for size, grid in sizes.items():
        for impl in impls:
            if impl == "diffusers" and not env["diffusers"][:1].isdigit():
                row = {"size": size, "impl": impl, "error": f"diffusers {env['diffusers']}"}
            else:
                row = run_one(impl, size, grid, config, device, args.steps, args.seed, not args.exact_accum)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            with open(path, "w") as f:  # after every configuration: a timeout still leaves numbers
                json.dump(report, f, indent=1)
    print(markdown_table(env, report["results"]))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
