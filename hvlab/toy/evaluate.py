"""Score the toy model: generate videos for held-out and seen prompts, then read them back with the
synthetic-data detector (colour, shape, direction of motion from the decoded frames).

    python -m hvlab.toy.evaluate                      # shipped weights, CPU: one-object prompts
    python -m hvlab.toy.evaluate --weights runs/toy/weights --device cuda --out runs/toy/eval.json
    python -m hvlab.toy.evaluate --world two-object   # and 40 held-out two-object prompts, per object
    python -m hvlab.toy.evaluate --world two-object --maps cross --out eval2.json   # and word-map binding
    python -m hvlab.toy.evaluate --world two-object --maps cross concept   # both kinds of map
    python -m hvlab.toy.evaluate --world two-object --maps mine --map-source mine=some.module:factory

Held-out prompts are attribute combinations never seen in training (``data.HELDOUT``); held-out pairs
are two seen objects never shown together (``data.HELDOUT_PAIRS``): scoring them tests composition,
not memory. Two-object videos are scored per object, the detected objects assigned to the caption's
by colour (`hvlab.toy.detector.detect_scene`).

**Word maps** (``--maps``): for each kind of map, block and step, how well each object's colour,
shape and direction word's map lands on its own object (`hvlab.toy.map_metrics`). A kind is a
*map source*: ``source(pipe, prompts, blocks, steps)`` returns a recorder that is entered as a context
manager around one ``pipe(prompts, ...)`` call and then answers ``word_maps(sample, prompt)`` with a
tensor (len(steps), len(blocks), n_objects, 3, T, h, w): the maps of each object's colour, shape and
direction word on the post-patch grid. `cross_attention_source` is the built-in "cross" kind (video
queries on text keys, heads averaged, subword tokens summed per word, `hvlab.inspection.AttentionRecorder`).
The block and step are chosen on `--n-select` selection prompts (held-out pairs, other prompts and
seeds than the reported ones), then the reported prompts are scored at that block and step.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time

import torch

from . import data, map_metrics
from .detector import detect, detect_scene, score, score_scenes

SELECTION_SEED = 3000  # seeds of the selection prompts (the reported pairs use --seed, 2000 by default)


def eval_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` captions cycling through the split's combinations in a seeded order."""
    combos = list(data.HELDOUT if split == "heldout" else data.TRAIN)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(combos), generator=g).tolist()
    return [data.caption(*combos[order[i % len(combos)]]) for i in range(n)]


def pair_prompts(split: str = "heldout", n: int = 40, seed: int = 0, start: int = 0) -> list[str]:
    """Two-object captions ``start .. start + n`` of the split's pairs in a seeded order (cycling), so
    two calls with different ``start`` give different prompts."""
    pairs = data.PAIR_SPLITS[split]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [data.pair_caption(*pairs[order[i % len(pairs)]]) for i in range(start, start + n)]


def evaluate(pipe, n: int = 63, splits=("heldout", "train"), batch: int = 21, seed: int = 1000,
             **gen_kwargs) -> dict:
    """Generate ``n`` one-object videos per split and score them; returns accuracies and every detection."""
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


# ---- word maps --------------------------------------------------------------------------------------

def word_positions(prompt: str) -> list[list[int]]:
    """Per object of a toy caption, the word indices of its colour, shape and direction (`ROLES` order):
    "a red circle moving left and a blue square moving up" -> [[1, 2, 4], [7, 8, 10]]."""
    return [[6 * k + 1, 6 * k + 2, 6 * k + 4] for k in range(len(data.parse_scene(prompt)))]


class _RecordedWords:
    """A map source around one recorder (``self.recorder``, attached while the source is entered)."""

    def __enter__(self):
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc):
        self.recorder.__exit__(*exc)


class CrossAttentionWords(_RecordedWords):
    """The "cross" map source: text-as-key cross-attention per word, mean of heads (`AttentionRecorder`)."""

    def __init__(self, pipe, prompts, blocks, steps):
        from ..inspection import AttentionRecorder

        self.recorder = AttentionRecorder(pipe, steps=steps, blocks=blocks, reduce_heads="mean")
        self.steps = sorted(steps)  # the recorder's order

    def word_maps(self, sample: int, prompt: str) -> torch.Tensor:
        maps = self.recorder.text_maps(sample=sample)  # (S, K, 1, N words, T, h, w)
        if maps.labels != prompt.split() or maps.steps != self.steps:
            raise ValueError(f"recorded words {maps.labels} at steps {maps.steps} do not match the prompt "
                             f"{prompt!r} and steps {self.steps}")
        pos = word_positions(prompt)
        m = maps.maps[:, :, 0, [i for obj in pos for i in obj]]  # (S, K, n_obj * 3, T, h, w)
        return m.unflatten(2, (len(pos), len(map_metrics.ROLES)))


class ConceptWords(_RecordedWords):
    """The "concept" map source: output-space concept maps (`hvlab.inspection.ConceptRecorder`) for every
    colour, shape and direction word of the toy's vocabulary at once, softmax over those concepts; each
    object's words pick their own rows."""

    VOCABULARY = data.COLOURS + data.SHAPES + data.DIRECTIONS  # the concepts, in this order

    def __init__(self, pipe, prompts, blocks, steps):
        from ..inspection import ConceptRecorder

        self.vocabulary = list(self.VOCABULARY)
        self.recorder = ConceptRecorder(pipe, self.vocabulary, steps=steps, blocks=blocks)
        self.steps = sorted(steps)

    def word_maps(self, sample: int, prompt: str) -> torch.Tensor:
        maps = self.recorder.maps(sample=sample, softmax=True)  # (S, K, 1, N concepts, T, h, w)
        if maps.steps != self.steps:
            raise ValueError(f"recorded steps {maps.steps} do not match {self.steps}")
        objects = data.parse_scene(prompt)  # [(colour, shape, direction), ...]
        idx = [self.vocabulary.index(w) for obj in objects for w in obj]
        return maps.maps[:, :, 0, idx].unflatten(2, (len(objects), len(map_metrics.ROLES)))


cross_attention_source = CrossAttentionWords
concept_source = ConceptWords
MAP_SOURCES = {"cross": cross_attention_source, "concept": concept_source}


def all_blocks(pipe) -> list[tuple[str, int]]:
    dit = pipe.transformer
    return [("double", i) for i in range(len(dit.double_blocks))] + [("single", j) for j in range(len(dit.single_blocks))]


def _grid(summary: dict, blocks, steps) -> dict:
    """Tensors (S, K) per role and metric -> {"block kind i, step s": {role: {metric: float}}}."""
    out = {}
    for si, step in enumerate(steps):
        for ki, block in enumerate(blocks):
            out[f"{block[0]} {block[1]}, step {step}"] = {
                role: {k: (float(v[si, ki]) if isinstance(v, torch.Tensor) else v) for k, v in m.items()}
                for role, m in summary.items()}
    return out


def binding_rank(cell: dict) -> tuple:
    """How a (block, step) is chosen: the mean of the colour and shape words' peak-in-own-object
    rates, ties broken by the lower shape-word correlation between the two objects."""
    return ((cell["colour"]["peak_in_own"] + cell["shape"]["peak_in_own"]) / 2, -cell["shape"]["correlation"])


def run_pairs(pipe, prompts: list[str], *, seed: int, batch: int = 20, sources: dict | None = None,
              blocks=None, steps=None, **gen_kwargs) -> dict:
    """Generate two-object videos (video i gets seed + i), score each object, and (with ``sources``)
    score every source's word maps at every (block, step). Returns accuracies, examples and, per map
    kind, ``grid`` {"double 1, step 29": {role: metrics}}."""
    sources = sources or {}
    steps = list(range(gen_kwargs.get("num_inference_steps") or pipe.defaults["num_inference_steps"])) \
        if steps is None else sorted(steps)
    blocks = all_blocks(pipe) if blocks is None else [tuple(b) for b in blocks]
    scenes, per_kind, t0 = [], {k: [] for k in sources}, time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        recorders = {k: src(pipe, chunk, blocks, steps) for k, src in sources.items()}
        with contextlib.ExitStack() as stack:
            for r in recorders.values():
                stack.enter_context(r)
            out = pipe(chunk, seed=seed + s, **gen_kwargs)
        for b, prompt in enumerate(chunk):
            scene = detect_scene(out.videos[b] * 2 - 1, prompt)
            scenes.append(scene)
            masks = [d.mask if d is not None else None for d in scene]
            for kind, rec in recorders.items():
                per_kind[kind].append(map_metrics.binding_scores(rec.word_maps(b, prompt), masks))
    result = score_scenes(scenes, prompts)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["examples"] = [{"prompt": p, "objects": [None if d is None else [d.colour, d.shape, d.direction]
                                                   for d in sc]} for p, sc in zip(prompts, scenes)]
    if sources:
        result["maps"] = {kind: _grid(map_metrics.summarise(rows), blocks, steps) for kind, rows in per_kind.items()}
    return result


def evaluate_pairs(pipe, n: int = 40, split: str = "heldout", batch: int = 20, seed: int = 2000,
                   sources: dict | None = None, n_select: int = 16, blocks=None, steps=None,
                   **gen_kwargs) -> dict:
    """``n`` two-object prompts of ``split``, scored per object. With map ``sources``: first the
    ``n_select`` selection prompts (the next ones in the same seeded order, seeds from
    `SELECTION_SEED`) choose each kind's block and step (`binding_rank`), then the ``n`` reported
    prompts are scored there; ``maps[kind]`` holds the choice, both sets' value at it, and the
    reported set's full grid (for figures over blocks and steps)."""
    prompts = pair_prompts(split, n, seed=0)
    result = run_pairs(pipe, prompts, seed=seed, batch=batch, sources=sources, blocks=blocks, steps=steps,
                       **gen_kwargs)
    if sources:
        chosen = run_pairs(pipe, pair_prompts(split, n_select, seed=0, start=n), seed=SELECTION_SEED, batch=batch,
                           sources=sources, blocks=blocks, steps=steps, **gen_kwargs)
        for kind, grid in result["maps"].items():
            sel = chosen["maps"][kind]
            best = max(sel, key=lambda key: binding_rank(sel[key]))
            result["maps"][kind] = dict(chosen=best, selection=sel[best], report=grid[best],
                                        selection_prompts=n_select, report_grid=grid,
                                        selection_accuracy={k: chosen[k] for k in ("colour_acc", "shape_acc",
                                                                                    "direction_acc")})
    return result


# ---- tables and the command line ----------------------------------------------------------------------

def results_table(results: dict, evaluation: str | None = None):
    """Accuracies per split as a `hvlab.inspection.viz.Table` (an HTML table in a notebook, Markdown as text);
    ``evaluation`` adds a first column naming the run, so that two tables' rows can be shown as one."""
    from ..inspection.viz import Table

    rows = [{"split": split, "n": f"{r['n']} ({r['objects']} objects)" if "objects" in r else r["n"],
             "colour": f"{r['colour_acc']:.1%}", "shape": f"{r['shape_acc']:.1%}",
             "direction": f"{r['direction_acc']:.1%}"} for split, r in results.items()]
    return Table([{"evaluation": evaluation, **r} for r in rows] if evaluation is not None else rows)


def format_table(results: dict) -> str:
    """The accuracies as a Markdown table (what ``python -m hvlab.toy.evaluate`` prints)."""
    return str(results_table(results))


def format_maps(maps: dict) -> str:
    rows = ["| map kind | chosen on selection prompts | word | peak in own object | peak in other | IoU (ceiling) "
            "| correlation of the two objects' maps |", "|---|---|---|---|---|---|---|"]
    for kind, m in maps.items():
        for role in map_metrics.ROLES:
            r = m["report"][role]
            rows.append(f"| {kind} | {m['chosen']} | {role} | {r['peak_in_own']:.1%} | {r['peak_in_other']:.1%} | "
                        f"{r['iou']:.2f} ({r['iou_ceiling']:.2f}) | {r['correlation']:.2f} |")
    return "\n".join(rows)


def _load_source(spec: str):
    """"kind=package.module:callable" -> (kind, callable)."""
    kind, sep, target = spec.partition("=")
    module, colon, name = target.partition(":")
    if not (sep and colon and kind and module and name):
        raise ValueError(f"--map-source must look like KIND=package.module:callable, got {spec!r}")
    return kind, getattr(importlib.import_module(module), name)


def main(argv=None):
    from .model import load_toy

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="folder of toy weights (default: the shipped ones)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--world", choices=data.WORLDS, default="one-object",
                   help="two-object: also score held-out two-object prompts, per object")
    p.add_argument("--n", type=int, default=63, help="one-object videos per split")
    p.add_argument("--splits", nargs="+", default=["heldout", "train"], choices=["heldout", "train"])
    p.add_argument("--n-pairs", type=int, default=40, help="held-out two-object prompts reported")
    p.add_argument("--pair-split", default="heldout", choices=list(data.PAIR_SPLITS))
    p.add_argument("--maps", nargs="*", default=[], help="map kinds to score on the two-object prompts "
                                                         f"(built in: {', '.join(MAP_SOURCES)})")
    p.add_argument("--map-source", action="append", default=[], metavar="KIND=MODULE:CALLABLE",
                   help="another kind of map: a source callable (see the module docstring)")
    p.add_argument("--n-select", type=int, default=16, help="selection prompts that choose each kind's block/step")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    sources = dict(MAP_SOURCES)
    sources.update(_load_source(s) for s in args.map_source)
    unknown = [k for k in args.maps if k not in sources]
    if unknown:
        raise SystemExit(f"unknown map kind(s) {unknown}: built in are {list(MAP_SOURCES)}; add others with "
                         f"--map-source KIND=module:callable")
    if args.maps and args.world != "two-object":
        raise SystemExit("--maps scores two-object prompts: add --world two-object")
    pipe = load_toy(device=args.device, weights_dir=args.weights)
    kw = {k: v for k, v in dict(num_inference_steps=args.steps, guidance_scale=args.cfg,
                                flow_shift=args.shift).items() if v is not None}
    res = evaluate(pipe, n=args.n, splits=args.splits, **kw) if args.n else {}
    if args.world == "two-object":
        res[f"{args.pair_split} pairs"] = evaluate_pairs(
            pipe, n=args.n_pairs, split=args.pair_split, batch=args.batch, n_select=args.n_select,
            sources={k: sources[k] for k in args.maps}, **kw)
    res["settings"] = dict(pipe.defaults, **kw)
    print(format_table({k: v for k, v in res.items() if k != "settings"}))
    maps = {k: v for r in res.values() if isinstance(r, dict) for k, v in r.get("maps", {}).items()}
    if maps:
        print(format_maps(maps))
    if args.out:
        from pathlib import Path

        path = Path(args.out)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        tmp.replace(path)  # atomic: a half-written file never replaces a finished one


if __name__ == "__main__":
    main()
