"""How should output-space concept maps be normalised? Scores five readings of the same recorded products.

    python benchmarks/concept_normalisation.py [N]     # N two-object selection-set prompts (default 6), CPU

`hvlab.inspection.ConceptRecorder` records, per block and step, the dot product of every concept's attention
output with every video token's. The toy's evaluation (`hvlab.toy.evaluate`, map kind "concept") reads them
as a softmax over its 14 attribute words at each video token. This script generates N held-out two-object
videos once (the prompts after the 40 reported ones, as the evaluation's block/step selection uses), keeps
the raw products of all 14 words, and scores each reading with `hvlab.toy.map_metrics` against the
detector's masks, at the best block and step of each reading (so the numbers are optimistic, and for
comparing readings only):

* ``softmax_vocab``: softmax over the 14 words (the evaluation's reading);
* ``softmax_prompt``: softmax over the prompt's six words only; ``softmax_prompt_T0.5`` at temperature 0.5;
* ``raw``: the products themselves;
* ``raw_centered``: the products minus their mean over the 14 words at each video token.
"""
from __future__ import annotations

import sys
import time

import torch

import hvlab.toy.model as tm
from hvlab.inspection import ConceptRecorder
from hvlab.toy import data, map_metrics
from hvlab.toy.detector import detect_scene
from hvlab.toy.evaluate import ConceptWords, all_blocks, pair_prompts

STEPS = [5, 11, 20, 29]


def readings(raw: torch.Tensor, idx: list[int]) -> dict[str, torch.Tensor]:
    """raw (S, K, 14, T, h, w) -> each reading's maps of the prompt's words, (S, K, 6, T, h, w)."""
    own = raw[:, :, idx]
    return {"softmax_vocab": raw.softmax(dim=2)[:, :, idx],
            "softmax_prompt": own.softmax(dim=2),
            "softmax_prompt_T0.5": (own / 0.5).softmax(dim=2),
            "raw": own,
            "raw_centered": (raw - raw.mean(dim=2, keepdim=True))[:, :, idx]}


def main(n: int = 6) -> None:
    torch.set_grad_enabled(False)
    pipe = tm.load_toy()
    prompts = pair_prompts("heldout", n, seed=0, start=40)
    vocab = list(ConceptWords.VOCABULARY)  # the evaluation's concepts, in its order
    blocks = all_blocks(pipe)
    t0 = time.perf_counter()
    with ConceptRecorder(pipe, vocab, steps=STEPS, blocks=blocks) as rec:
        out = pipe(prompts, seed=3000)
    print(f"{n} videos in {time.perf_counter() - t0:.0f} s")
    scores: dict[str, list] = {}
    for b, prompt in enumerate(prompts):
        scene = detect_scene(out.videos[b] * 2 - 1, prompt)
        print(prompt, "->", [None if d is None else (d.colour, d.shape, d.direction) for d in scene])
        objects = data.parse_scene(prompt)
        idx = [vocab.index(w) for obj in objects for w in obj]
        raw = rec.maps(sample=b, softmax=False).maps[:, :, 0]
        for name, maps in readings(raw, idx).items():
            scores.setdefault(name, []).append(
                map_metrics.binding_scores(maps.unflatten(2, (len(objects), 3)), [d and d.mask for d in scene]))
    for name, rows in scores.items():
        s = map_metrics.summarise(rows)
        cells = [(si, ki) for si in range(len(STEPS)) for ki in range(len(blocks))]
        si, ki = max(cells, key=lambda c: float(s["colour"]["peak_in_own"][c] + s["shape"]["peak_in_own"][c]))
        print(f"{name:20s} best at {blocks[ki]}, step {STEPS[si]}: " + "; ".join(
            f"{role} own {float(s[role]['peak_in_own'][si, ki]):.2f} other {float(s[role]['peak_in_other'][si, ki]):.2f}"
            f" corr {float(s[role]['correlation'][si, ki]):.2f}" for role in map_metrics.ROLES))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
