"""How far is FP8 attention from exact attention? Output errors of each recipe, measured, on the CPU or a GPU.

Three parts (``--parts``), each a table in docs/benchmarks.md:

  toy        q, k, v recorded from the trained toy model (hvlab.load_toy) in every block at an early, a
             middle and a late step (exact attention while recording): the relative error of each recipe's
             output against the exact output, over the real tokens (padding outputs are never read)
  synthetic  Gaussian q, k, v, and keys sharing an offset with a peaky softmax, at L tokens
  videos     toy videos with the recipe's attention in every block vs exact attention, same seeds: PSNR and
             SSIM per prompt, and the detector's accuracy on both (hvlab.toy.evaluate's prompts and seeds)
  dit        (GPU) q, k, v recorded from the 13B DiT with random weights at 720p (--size) in its first and last
             double and single blocks: each recipe's Triton kernel against exact attention (cuDNN SDPA)

The recipes are the emulation of ``hvlab.fast.fp8_attention`` (torch's e4m3 / int8 casts, fp32 maths), so
the numbers hold for any kernel that quantises the same way. Writes $OUT/fp8_attention_error.json (OUT
defaults to ./outputs) after each part and prints markdown tables.

    OMP_NUM_THREADS=1 python benchmarks/fp8_attention_error.py --parts toy,synthetic
    OMP_NUM_THREADS=1 python benchmarks/fp8_attention_error.py --parts videos --recipe int8qk-block+KV --n 21
    python benchmarks/fp8_attention_error.py --parts dit --size 720p       # one H100 / H200, ~5 min
    python benchmarks/fp8_attention_error.py --quick          # seconds: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_dit, for the dit part

from hvlab.attention import attention, valid_lengths  # noqa: E402
from hvlab.fast.fp8_attention import DEFAULT_RECIPE, RECIPES, fp8_attention, relative_error  # noqa: E402


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _blocks(dit):
    return [("double", i, b) for i, b in enumerate(dit.double_blocks)] + \
           [("single", i, b) for i, b in enumerate(dit.single_blocks)]


# ------------------------------------------------------------------------------------------- part: toy
def record_toy_qkv(pipe, prompts: list[str], steps: list[int], seed: int) -> list[dict]:
    """q, k, v (and img_len, txt_lens) of every block at the given denoising steps, exact attention."""
    records, state = [], {"step": -1}
    dit = pipe.transformer
    originals = []

    def pre_hook(module, args, kwargs):
        state["step"] += 1  # one DiT call per step (true CFG runs both halves in one batch)

    def wrap(kind, i, fn):
        def attn_fn(q, k, v, *, img_len, txt_lens=None):
            if state["step"] in steps:
                records.append(dict(block=f"{kind} {i}", step=state["step"], q=q.detach().clone(),
                                    k=k.detach().clone(), v=v.detach().clone(), img_len=img_len,
                                    txt_lens=None if txt_lens is None else txt_lens.clone()))
            return fn(q, k, v, img_len=img_len, txt_lens=txt_lens)
        return attn_fn

    handle = dit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for kind, i, b in _blocks(dit):
            originals.append((b, b.attn_fn))
            b.attn_fn = wrap(kind, i, b.attn_fn)
        pipe(prompts, seed=seed)
    finally:
        handle.remove()
        for b, fn in originals:
            b.attn_fn = fn
    return records


def part_toy(recipes: dict, n_prompts: int, seed: int) -> dict:
    import hvlab
    from hvlab.toy.evaluate import eval_prompts

    pipe = hvlab.load_toy()
    n_steps = pipe.defaults["num_inference_steps"]
    steps = sorted({0, n_steps // 2, n_steps - 1})
    prompts = eval_prompts("heldout", n_prompts, seed)
    t0 = time.perf_counter()
    records = record_toy_qkv(pipe, prompts, steps, seed)
    rows = {}
    for name, recipe in recipes.items():
        errs = []
        for r in records:
            ref = attention(r["q"], r["k"], r["v"], img_len=r["img_len"], txt_lens=r["txt_lens"])
            out = fp8_attention(r["q"], r["k"], r["v"], img_len=r["img_len"], txt_lens=r["txt_lens"], recipe=recipe)
            lengths = valid_lengths(r["q"].shape[0], r["q"].shape[1], r["img_len"], r["txt_lens"])
            errs.append(dict(block=r["block"], step=r["step"], rel=relative_error(out, ref, lengths)))
        by_step = {s: max(e["rel"] for e in errs if e["step"] == s) for s in steps}
        worst = max(errs, key=lambda e: e["rel"])
        rows[name] = dict(recipe=str(recipe), max=worst["rel"], worst_at=f"{worst['block']}, step {worst['step']}",
                          mean=sum(e["rel"] for e in errs) / len(errs), max_by_step=by_step, all=errs)
    q = records[0]["q"]
    return dict(prompts=prompts, steps=steps, calls=len(records), shape=list(q.shape),
                img_len=records[0]["img_len"], seconds=round(time.perf_counter() - t0, 1), rows=rows)


# ------------------------------------------------------------------------------------- part: synthetic
def synthetic_cases(L: int, nh: int = 4, hd: int = 128, seed: int = 0) -> dict:
    """Two cases of (1, L, nh, hd) fp32 q, k, v.

    gaussian: every entry N(0, 1) (logits std 1: a flat softmax).
    offset+peaky: q = 4 N(0, 1) (logits std 4: a peaky softmax); k = N(0, 1) + 8 u_k, v = N(0, 1) + 2 u_v with
    one N(0, 1) vector u per head shared by every token (an offset 8x the keys' spread, as DiT keys show).
    """
    g = torch.Generator().manual_seed(seed)
    n = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = {"gaussian": (n(1, L, nh, hd), n(1, L, nh, hd), n(1, L, nh, hd))}
    cases["offset+peaky"] = (4 * n(1, L, nh, hd), n(1, L, nh, hd) + 8 * n(1, 1, nh, hd),
                             n(1, L, nh, hd) + 2 * n(1, 1, nh, hd))
    return cases


def part_synthetic(recipes: dict, L: int) -> dict:
    t0 = time.perf_counter()
    rows = {name: {} for name in recipes}
    for case, (q, k, v) in synthetic_cases(L).items():
        ref = attention(q, k, v, img_len=L)
        for name, recipe in recipes.items():
            rows[name][case] = relative_error(fp8_attention(q, k, v, img_len=L, recipe=recipe), ref)
    return dict(L=L, shape=[1, L, 4, 128], seconds=round(time.perf_counter() - t0, 1), rows=rows)


# ---------------------------------------------------------------------------------------- part: videos
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two videos in [0, 1], in dB (inf when equal)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over the frames
    and channels of two (3, F, H, W) videos in [0, 1]."""
    x = a.permute(1, 0, 2, 3).reshape(-1, 1, *a.shape[-2:]).double()  # (F*3, 1, H, W)
    y = b.permute(1, 0, 2, 3).reshape(-1, 1, *b.shape[-2:]).double()
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = (w1[:, None] * w1[None, :] / w1.sum() ** 2)[None, None]
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx, syy, sxy = F.conv2d(x * x, w) - mu_x ** 2, F.conv2d(y * y, w) - mu_y ** 2, F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def generate(pipe, prompts: list[str], batch: int, seed: int, cache: str | None = None) -> torch.Tensor:
    """hvlab.toy.evaluate's loop: batches of ``batch`` prompts, seeds seed + s, videos (N, 3, F, H, W).
    With ``cache`` (a path prefix), each batch is saved as it is done and found again by a rerun."""
    out = []
    for s in range(0, len(prompts), batch):
        path = None if cache is None else f"{cache}_from{s}_n{len(prompts[s:s + batch])}.pt"
        if path is not None and os.path.exists(path):
            out.append(torch.load(path))
            continue
        out.append(pipe(prompts[s:s + batch], seed=seed + s).videos)
        if path is not None:
            torch.save(out[-1], path + ".tmp")
            os.replace(path + ".tmp", path)
    return torch.cat(out)


def part_videos(recipe, n: int, batch: int, seed: int, out_dir: str) -> dict:
    import hvlab
    from hvlab.fast.attention import FastAttention, install, uninstall
    from hvlab.toy.detector import detect, score
    from hvlab.toy.evaluate import eval_prompts

    pipe = hvlab.load_toy()
    prompts = {split: eval_prompts(split, n, seed) for split in ("heldout", "train")}
    cache = os.path.join(out_dir, f"toy_exact_videos_n{n}_b{batch}_s{seed}.pt")
    t0 = time.perf_counter()
    if os.path.exists(cache):  # the exact videos of an earlier run with the same prompts and seeds
        exact = torch.load(cache)
    else:
        exact = {split: generate(pipe, p, batch, seed) for split, p in prompts.items()}
        torch.save(exact, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    t_exact = time.perf_counter() - t0
    tag = "".join(c if c.isalnum() else "_" for c in str(recipe))[:80]
    blocks = [b for _, _, b in _blocks(pipe.transformer)]
    for b in blocks:  # only attention changes: the reference blocks keep their own maths
        install(b, FastAttention("fp8", recipe))
    try:
        t0 = time.perf_counter()
        approx = {split: generate(pipe, p, batch, seed, os.path.join(out_dir, f"toy_fp8_{tag}_{split}_s{seed}"))
                  for split, p in prompts.items()}  # batch by batch on disk: a stopped run resumes
        t_fp8 = time.perf_counter() - t0
    finally:
        for b in blocks:
            uninstall(b)
    res = dict(recipe=str(recipe), n_per_split=n, batch=batch, seed=seed, seconds_exact=round(t_exact, 1),
               seconds_fp8=round(t_fp8, 1), splits={})
    for split, p in prompts.items():
        per = [dict(prompt=pr, psnr=psnr(a, e), ssim=ssim(a, e)) for pr, a, e in zip(p, approx[split], exact[split])]
        acc_e = score([detect(v * 2 - 1) for v in exact[split]], p)
        acc_a = score([detect(v * 2 - 1) for v in approx[split]], p)
        res["splits"][split] = dict(psnr_min=min(x["psnr"] for x in per), psnr_mean=sum(x["psnr"] for x in per) / n,
                                    ssim_min=min(x["ssim"] for x in per), ssim_mean=sum(x["ssim"] for x in per) / n,
                                    exact=acc_e, fp8=acc_a, per_prompt=per)
    return res


# ------------------------------------------------------------------------------------------- part: dit
def part_dit(recipes: dict, size: str, seed: int) -> dict:
    """q, k, v of the 13B DiT (random weights: bench_dit's, std 0.02) at ``size``, blocks double 0 / 19 and
    single 0 / 39, one forward at t = 900; exact = hvlab.attention.attention (cuDNN), each recipe through
    fp8_attention_triton (its kernel, the thing that would run)."""
    from bench_dit import SIZES, build_hvlab, make_inputs

    from hvlab.fast.fp8_attention import fp8_attention_triton
    from hvlab.model import HYVIDEO_T2_CONFIG

    device = torch.device("cuda")
    config = HYVIDEO_T2_CONFIG
    model = build_hvlab(config, device, seed, attention="sdpa")
    inp = make_inputs(config, SIZES[size], device)
    chosen = {("double", 0), ("double", config.mm_double_blocks_depth - 1), ("single", 0),
              ("single", config.mm_single_blocks_depth - 1)}
    records, originals = [], []

    def wrap(name, fn):
        def attn_fn(q, k, v, *, img_len, txt_lens=None):
            out = fn(q, k, v, img_len=img_len, txt_lens=txt_lens)
            errs = {}
            lengths = valid_lengths(q.shape[0], q.shape[1], img_len, txt_lens)
            for rname, recipe in recipes.items():
                approx = fp8_attention_triton(q, k, v, img_len=img_len, txt_lens=txt_lens, recipe=recipe)
                errs[rname] = relative_error(approx, out, lengths)
                del approx
            records.append(dict(block=name, rows=errs))
            print(json.dumps(records[-1]), flush=True)
            return out
        return attn_fn

    t0 = time.perf_counter()
    for kind, i, b in _blocks(model):
        if (kind, i) in chosen:
            originals.append((b, b.attn_fn))
            b.attn_fn = wrap(f"{kind} {i}", b.attn_fn)
    with torch.no_grad():
        model(**inp)
    del model
    rows = {n: {r["block"]: r["rows"][n] for r in records} for n in recipes}
    return dict(size=size, card=torch.cuda.get_device_name(device), seconds=round(time.perf_counter() - t0, 1),
                rows=rows)


# --------------------------------------------------------------------------------------------- report
def tables(report: dict) -> str:
    lines = []
    if "toy" in report:
        t = report["toy"]
        lines += [f"Toy q, k, v ({t['calls']} attention calls: {len(t['steps'])} steps {t['steps']} x every block, "
                  f"q {t['shape']}): relative output error vs exact attention", "",
                  "| recipe | max | mean | " + " | ".join(f"max at step {s}" for s in t["steps"]) + " | worst |",
                  "|---|---|---|" + "---|" * len(t["steps"]) + "---|"]
        for name, r in t["rows"].items():
            by = " | ".join(f"{r['max_by_step'][s]:.2%}" for s in t["steps"])
            lines.append(f"| {name} | {r['max']:.2%} | {r['mean']:.2%} | {by} | {r['worst_at']} |")
        lines.append("")
    if "synthetic" in report:
        s = report["synthetic"]
        cases = list(next(iter(s["rows"].values())))
        lines += [f"Synthetic q, k, v {s['shape']}: relative output error vs exact attention", "",
                  "| recipe | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
        for name, r in s["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2%}" for c in cases) + " |")
        lines.append("")
    if "dit" in report:
        d = report["dit"]
        blocks = list(next(iter(d["rows"].values())))
        lines += [f"13B DiT, random weights, {d['size']} ({d['card']}): Triton kernel vs exact attention", "",
                  "| recipe | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
        for name, r in d["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[b]:.2%}" for b in blocks) + " |")
        lines.append("")
    if "videos" in report:
        v = report["videos"]
        lines += [f"Toy videos, {v['recipe']} vs exact attention ({v['n_per_split']} prompts per split, same seeds)",
                  "", "| split | PSNR min / mean (dB) | SSIM min / mean | colour | shape | direction |",
                  "|---|---|---|---|---|---|"]
        for split, r in v["splits"].items():
            acc = " | ".join(f"{r['exact'][a]:.1%} -> {r['fp8'][a]:.1%}" for a in ("colour_acc", "shape_acc",
                                                                                   "direction_acc"))
            lines.append(f"| {split} | {r['psnr_min']:.1f} / {r['psnr_mean']:.1f} | {r['ssim_min']:.4f} / "
                         f"{r['ssim_mean']:.4f} | {acc} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="toy,synthetic", help="comma list of toy, synthetic, videos, dit")
    p.add_argument("--size", default="720p", help="the dit part's size (bench_dit.SIZES)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {list(RECIPES)} (toy, synthetic)")
    p.add_argument("--recipe", default=None, help="the recipe of the videos part (default: DEFAULT_RECIPE)")
    p.add_argument("--L", type=int, default=4096, help="tokens of the synthetic cases")
    p.add_argument("--toy-prompts", type=int, default=4, help="prompts recorded in the toy part (one batch)")
    p.add_argument("--n", type=int, default=21, help="videos per split (held-out, seen) in the videos part")
    p.add_argument("--batch", type=int, default=21)
    p.add_argument("--seed", type=int, default=1000, help="hvlab.toy.evaluate's seeds")
    p.add_argument("--quick", action="store_true", help="synthetic only, L = 256, two recipes: a smoke run")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    names = [s.strip() for s in args.recipes.split(",") if s.strip()]
    bad = [x for x in parts if x not in ("toy", "synthetic", "videos", "dit")] + [x for x in names if x not in RECIPES]
    if args.recipe is not None and args.recipe not in RECIPES:
        bad.append(args.recipe)
    if bad:
        p.error(f"unknown parts or recipes {bad}: parts from toy, synthetic, videos; recipes from {list(RECIPES)}")
    if "dit" in parts and not torch.cuda.is_available():
        p.error("the dit part needs a CUDA GPU (the 13B model at --size, the Triton kernel)")
    if args.quick:
        parts, names, args.L = ["synthetic"], ["fp8-head", "int8qk-block+KV"], 256
    recipes = {n: RECIPES[n] for n in names}
    out_dir = args.out or os.environ.get("OUT") or "outputs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fp8_attention_error.json")
    report = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "machine": os.uname().machine, "cpu_count": os.cpu_count()}}
    for part in parts:
        if part == "toy":
            report["toy"] = part_toy(recipes, args.toy_prompts, args.seed)
        elif part == "synthetic":
            report["synthetic"] = part_synthetic(recipes, args.L)
        elif part == "dit":
            report["dit"] = part_dit(recipes, args.size, 0)
        else:
            recipe = DEFAULT_RECIPE if args.recipe is None else RECIPES[args.recipe]
            report["videos"] = part_videos(recipe, args.n, args.batch, args.seed, out_dir)
        write_json(path, report)
    print(tables(report))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
