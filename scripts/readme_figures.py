"""Regenerate the README's pictures from the shipped toy weights, on the CPU (about a minute on 2 cores).

    PYTHONPATH=$PWD python scripts/readme_figures.py [OUT_DIR]     # default docs/assets

* ``readme_red_circle.png``: frames 0, 4, 8, 12 and 16 of the video that
  ``hvlab generate "a red circle moving right" --seed 0`` writes (the command is run in-process, with its
  defaults), side by side at full size, no labels.
* ``readme_two_objects.png``: a held-out two-object pair (both objects trained, never together in one video),
  its frames, and for its two colour words and two shape words the cross-attention maps
  (`hvlab.inspection.AttentionRecorder`) beside the concept maps (`hvlab.inspection.ConceptRecorder` over the
  prompt's six attribute words), at the block and step the model card's evaluation chose for concept maps,
  with the detected objects outlined (`hvlab.toy.detector.detect_scene`). The same prompt, seed and settings as
  notebook 10's section "Two objects: which word lands where".

Each image is written atomically (a temporary file, then a rename) and checked to stay under 300 KB.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000
RED_CIRCLE = ("a red circle moving right", 0)
PAIR = ("a blue triangle moving up and a red circle moving down", 0)  # notebook 10's PAIR_PROMPT, PAIR_SEED
PAIR_BLOCK, PAIR_STEP = ("single", 2), 11  # the model card's block and step for concept maps
FRAMES = [0, 4, 8, 12, 16]


def _write_png(path: Path, save) -> Path:
    """``save(tmp_path)`` writes the picture; it lands at ``path`` only when complete and small enough."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        size = os.path.getsize(tmp)
        if size > MAX_BYTES:
            raise SystemExit(f"{path.name} came out {size:,} bytes; the README's pictures must stay under {MAX_BYTES:,}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    return path


def red_circle(out_dir: Path) -> Path:
    from matplotlib.image import imsave

    from hvlab import cli
    from hvlab.inspection.viz import as_frames

    prompt, seed = RED_CIRCLE
    with tempfile.TemporaryDirectory() as run_dir:
        args = cli.build_parser().parse_args(["generate", prompt, "--seed", str(seed), "--quiet", "--preview-every",
                                              "0", "--save-path", run_dir])
        _, out = cli.cmd_generate(args)
    frames = as_frames(out.videos[0])  # (F, H, W, 3) in [0, 1]
    strip = np.concatenate([frames[i] for i in FRAMES], axis=1)  # (H, 5 W, 3): the frames side by side
    return _write_png(out_dir / "readme_red_circle.png", lambda p: imsave(p, strip))


def two_objects(out_dir: Path) -> Path:
    import hvlab.toy.model as tm
    from hvlab.inspection import AttentionRecorder, ConceptRecorder
    from hvlab.inspection.viz import maps_side_by_side
    from hvlab.toy.data import parse_scene
    from hvlab.toy.detector import detect_scene

    prompt, seed = PAIR
    pipe = tm.load_toy()
    objects = parse_scene(prompt)
    words = [w for obj in objects for w in obj]
    with ConceptRecorder(pipe, words, steps=[PAIR_STEP], blocks=[PAIR_BLOCK]) as con, \
            AttentionRecorder(pipe, steps=[PAIR_STEP], blocks=[PAIR_BLOCK], reduce_heads="mean") as cross:
        video = pipe(prompt, seed=seed).videos[0]
    scene = detect_scene(video * 2 - 1, prompt)
    if any(d is None for d in scene):
        raise SystemExit(f"the detector did not find both objects of {prompt!r} (seed {seed}): {scene}")
    maps = {"cross-attention": cross.text_maps(), "concept": con.maps(softmax=True)}
    shown = [objects[0][0], objects[0][1], objects[1][0], objects[1][1]]
    outline = [{"blue": "dodgerblue"}.get(obj[0], obj[0]) for obj in objects]
    title = (f"{prompt!r} (held-out pair, seed {seed}); block {PAIR_BLOCK[0]} {PAIR_BLOCK[1]}, step {PAIR_STEP}. "
             "Left: cross-attention (mean of heads); right: concept maps (softmax over the prompt's six attribute "
             "words). Each map scaled to its own max; outlines: the detected objects")
    fig = maps_side_by_side(video, maps, shown, frames=[0, 8, 16], step=PAIR_STEP, block=PAIR_BLOCK,
                            masks=[d.mask for d in scene], mask_colours=outline, title=title)
    return _write_png(out_dir / "readme_two_objects.png", lambda p: fig.savefig(p, dpi=80))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else ROOT / "docs" / "assets"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    red_circle(out_dir)
    two_objects(out_dir)


if __name__ == "__main__":
    main()
