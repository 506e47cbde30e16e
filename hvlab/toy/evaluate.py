"""Score the toy model: generate videos for held-out and seen prompts, then read them back with the
synthetic-data detector (colour, shape, direction of motion from the decoded frames).

    python -m hvlab.toy.evaluate                      # shipped weights, CPU
    python -m hvlab.toy.evaluate --weights runs/toy/weights --device cuda --out runs/toy/eval.json

Held-out prompts are attribute combinations never seen in training (``data.HELDOUT``): scoring them
tests composition, not memory.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import data
from .detector import detect, score


def eval_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` captions cycling through the split's combinations in a seeded order."""
    combos = list(data.HELDOUT if split == "heldout" else data.TRAIN)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(combos), generator=g).tolist()
    return [data.caption(*combos[order[i % len(combos)]]) for i in range(n)]


def evaluate(pipe, n: int = 63, splits=("heldout", "train"), batch: int = 21, seed: int = 1000,
             **gen_kwargs) -> dict:
    """Generate ``n`` videos per split and score them; returns accuracies and every detection."""
    results = {}
    for split in splits:
        prompts = eval_prompts(split, n, seed)
        dets, t0 = [], time.perf_counter()
        for s in range(0, n, batch):
            chunk = prompts[s:s + batch]
            out = pipe(chunk, seed=seed + s, **gen_kwargs)
            dets += [detect(v * 2 - 1) for v in out.videos]
        acc = score(dets, prompts)
        acc["seconds"] = round(time.perf_counter() - t0, 1)
        acc["examples"] = [{"prompt": p, "colour": d.colour, "shape": d.shape, "direction": d.direction}
                           for p, d in zip(prompts, dets)]
        results[split] = acc
    return results


def format_table(results: dict) -> str:
    rows = ["| split | n | colour | shape | direction |", "|---|---|---|---|---|"]
    for split, r in results.items():
        rows.append(f"| {split} | {r['n']} | {r['colour_acc']:.1%} | {r['shape_acc']:.1%} | {r['direction_acc']:.1%} |")
    return "\n".join(rows)


def main(argv=None):
    from .model import load_toy

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="folder of toy weights (default: the shipped ones)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=63, help="videos per split")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    pipe = load_toy(device=args.device, weights_dir=args.weights)
    kw = {k: v for k, v in dict(num_inference_steps=args.steps, guidance_scale=args.cfg,
                                flow_shift=args.shift).items() if v is not None}
    res = evaluate(pipe, n=args.n, **kw)
    res["settings"] = dict(pipe.defaults, **kw)
    print(format_table({k: v for k, v in res.items() if k != "settings"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
