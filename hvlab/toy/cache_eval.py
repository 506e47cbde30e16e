"""Step caching on the toy model: how many DiT forwards each threshold saves, and what it costs.

    python -m hvlab.toy.cache_eval --out runs/cache_eval.json        # 21 held-out + 21 seen prompts, CPU
    python -m hvlab.toy.cache_eval --n 2 --configs fbcache:0.1 teacache:0.15

For every configuration (the uncached run first) the same prompts and seeds as `hvlab.toy.evaluate` are
generated with the toy's defaults (30 steps, true CFG 4: two DiT rows per video). Per configuration:

- **DiT forwards**: (row, step) pairs whose blocks ran, per video (uncached: 2 x 30 = 60), and the ratio
  uncached / cached ("fewer forwards");
- **PSNR** of each decoded video against the uncached video of the same prompt and seed (frames in [0, 1],
  10 log10(1 / MSE) over all pixels, then the mean and the minimum over videos);
- **detector accuracy** (`hvlab.toy.detector`): colour, shape, direction and all three, and their change
  from the uncached run in points.

The acceptance of issue 21: a threshold with >= 1.5x fewer forwards keeps the PSNR >= 30 dB and the mean of
the three attribute accuracies within 2 points of the uncached run. Results are written (atomically)
after every configuration; CPU seconds are recorded but are no speed claim (speed is measured on a GPU by
``benchmarks/bench_cache.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from ..fast.cache import StepCache, check_cache_args
from .detector import detect, score
from .evaluate import eval_prompts

DEFAULT_CONFIGS = ("fbcache:0.06,0.1,0.15", "teacache:0.1,0.15")
ATTRIBUTES = ("colour_acc", "shape_acc", "direction_acc")


def parse_configs(specs) -> list[tuple[str, float]]:
    """["fbcache:0.1,0.2", "teacache:0.15"] -> [("fbcache", 0.1), ("fbcache", 0.2), ("teacache", 0.15)]."""
    out = []
    for spec in specs:
        mode, _, values = spec.partition(":")
        if not values:
            raise ValueError(f"a configuration is MODE:THRESHOLD[,THRESHOLD...], e.g. teacache:0.1,0.15; got {spec!r}")
        for v in values.split(","):
            try:
                th = float(v)
            except ValueError:
                raise ValueError(f"threshold {v!r} in {spec!r} is not a number") from None
            out.append(check_cache_args(mode, th))
    return out


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of one video (3, F, H, W) in [0, 1] against another; inf when they are equal."""
    mse = float(((video.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def generate(pipe, prompts: list[str], seed: int, batch: int, mode: str | None, threshold: float | None):
    """Videos (N, 3, F, H, W) and, per video, its DiT forwards (both CFG rows) and CPU seconds in all."""
    videos, forwards, t0 = [], [], time.process_time()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        if mode is None:
            out = pipe(chunk, seed=seed + s)
            rows = 2 if out.settings.guidance_scale > 1 else 1  # true CFG: [negative, prompt] rows per video
            forwards += [rows * out.settings.num_inference_steps] * len(chunk)
        else:
            with StepCache(pipe, mode, threshold) as cache:
                out = pipe(chunk, seed=seed + s)
            steps = cache.stats.computed_steps()
            forwards += [sum(len(steps.get(f"{kind} {b}", ())) for kind in ("uncond", "cond"))
                         for b in range(len(chunk))]
        videos.append(out.videos)
    return torch.cat(videos), forwards, time.process_time() - t0


def summarise(prompts, splits, videos, forwards, reference=None) -> dict:
    dets = [detect(v * 2 - 1) for v in videos]
    acc = score(dets, prompts)
    row = dict(n=len(prompts), forwards_per_video=sum(forwards) / len(forwards),
               **{k: acc[k] for k in (*ATTRIBUTES, "all_acc")},
               attribute_acc=sum(acc[k] for k in ATTRIBUTES) / 3,
               per_split={sp: score([d for d, x in zip(dets, splits) if x == sp],
                                    [p for p, x in zip(prompts, splits) if x == sp]) for sp in dict.fromkeys(splits)},
               videos=[dict(prompt=p, split=sp, forwards=f, colour=d.colour, shape=d.shape, direction=d.direction)
                       for p, sp, f, d in zip(prompts, splits, forwards, dets)])
    if reference is not None:
        values = [psnr(v, r) for v, r in zip(videos, reference)]
        row.update(psnr_mean=sum(values) / len(values), psnr_min=min(values))
        for v, value in zip(row["videos"], values):
            v["psnr"] = value
    return row


def evaluate_cache(pipe, configs, n: int = 21, seed: int = 1000, batch: int = 21, out: str | None = None,
                   log=print) -> dict:
    """The uncached run, then each (mode, threshold) of ``configs``, on ``n`` held-out + ``n`` seen prompts."""
    prompts, splits = [], []
    for split in ("heldout", "train"):
        p = eval_prompts(split, n, seed)
        prompts += p
        splits += [split] * len(p)
    results = dict(settings=dict(pipe.defaults), n_per_split=n, seed=seed, torch=torch.__version__,
                   threads=torch.get_num_threads(), runs=[])
    reference = None
    for mode, threshold in [(None, None), *configs]:
        videos, forwards, cpu_s = [], [], 0.0
        for split in ("heldout", "train"):  # seeds as hvlab.toy.evaluate: seed + chunk start, per split
            idx = [i for i, x in enumerate(splits) if x == split]
            v, f, c = generate(pipe, [prompts[i] for i in idx], seed, batch, mode, threshold)
            videos.append(v)
            forwards += f
            cpu_s += c
        videos = torch.cat(videos)
        row = dict(mode=mode or "off", threshold=threshold, cpu_s=round(cpu_s, 1),
                   **summarise(prompts, splits, videos, forwards, reference))
        if reference is None:
            reference, base = videos, row
        row["forward_ratio"] = base["forwards_per_video"] / row["forwards_per_video"]
        row["attribute_acc_change_points"] = 100 * (row["attribute_acc"] - base["attribute_acc"])
        row["all_acc_change_points"] = 100 * (row["all_acc"] - base["all_acc"])
        results["runs"].append(row)
        log(format_row(row))
        if out:
            _write(out, results)
    results["acceptance"] = acceptance(results["runs"])
    if out:
        _write(out, results)
    return results


def acceptance(runs) -> dict:
    """Issue 21's bar: some threshold with forward ratio >= 1.5, PSNR >= 30 dB, accuracy within 2 points."""
    passing = [f"{r['mode']}:{r['threshold']:g}" for r in runs[1:]
               if r["forward_ratio"] >= 1.5 and r["psnr_mean"] >= 30 and abs(r["attribute_acc_change_points"]) <= 2]
    return dict(met=bool(passing), passing=passing)


def _write(path: str, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


HEADER = ("| cache | threshold | DiT forwards / video | fewer forwards | PSNR mean (min) dB | videos >= 30 dB | colour | "
          "shape | direction | all three | attributes vs uncached |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    p = f"{r['psnr_mean']:.1f} ({r['psnr_min']:.1f})" if "psnr_mean" in r else "(reference)"
    ok = f"{sum(v['psnr'] >= 30 for v in r['videos'])} / {len(r['videos'])}" if "psnr_mean" in r else "-"
    th = "-" if r["threshold"] is None else f"{r['threshold']:g}"
    return (f"| {r['mode']} | {th} | {r['forwards_per_video']:.1f} | {r['forward_ratio']:.2f}x | {p} | {ok} | "
            f"{r['colour_acc']:.1%} | {r['shape_acc']:.1%} | {r['direction_acc']:.1%} | {r['all_acc']:.1%} | "
            f"{r['attribute_acc_change_points']:+.1f} pt |")


def format_table(results: dict) -> str:
    return "\n".join([HEADER, *map(format_row, results["runs"])])


def main(argv=None):
    from .model import load_toy

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="MODE:T1,T2",
                   help=f"cache configurations (default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--n", type=int, default=21, help="prompts per split (held-out, seen); 21 = every held-out triple")
    p.add_argument("--batch", type=int, default=21, help="videos per pipeline call")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the results as JSON here (after every configuration)")
    args = p.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        p.error(str(e))
    if args.n < 1 or args.batch < 1:
        p.error(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
    torch.set_num_threads(args.threads)
    pipe = load_toy(device=args.device)
    print(HEADER)
    res = evaluate_cache(pipe, configs, n=args.n, seed=args.seed, batch=args.batch, out=args.out)
    print(f"acceptance (>= 1.5x fewer forwards, PSNR >= 30 dB, attributes within 2 points): {res['acceptance']}")
    return res


if __name__ == "__main__":
    main()
