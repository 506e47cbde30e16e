"""What the command line says about the toy models before torch is imported: their generation defaults and
the toy tokenizer's vocabulary (read from its tokenizer.json, so ``hvlab generate --help`` stays instant).

`hvlab.toy.model` builds the models with these defaults; `hvlab.toy.tokenizer` builds the tokenizer whose file
`vocabulary_words` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..runs import RELEASE_DEFAULTS

TOKENIZER_FILE = Path(__file__).resolve().parent / "weights" / "tokenizer" / "tokenizer.json"
TOY_FRAMES, TOY_SIZE = 17, 128

# Generation defaults that the toy was evaluated with (the model card lists the evaluation).
TOY_DEFAULTS = dict(height=TOY_SIZE, width=TOY_SIZE, video_length=TOY_FRAMES, num_inference_steps=30,
                    guidance_scale=4.0, embedded_guidance_scale=None, flow_shift=5.0, flow_reverse=True,
                    fps=8, negative_prompt="")
# The "tiny" preset's (every block type at the smallest sizes): guidance-distilled like the release, 4 steps.
TINY_DEFAULTS = dict(height=64, width=64, video_length=9, num_inference_steps=4, guidance_scale=1.0,
                     embedded_guidance_scale=RELEASE_DEFAULTS["embedded_guidance_scale"], flow_shift=5.0,
                     flow_reverse=True, fps=8, negative_prompt="")


def vocabulary_words(path: Path = TOKENIZER_FILE) -> list[str]:
    """The words the toy tokenizer knows (its special tokens left out), in id order; [] without the file."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError):
        return []
    return [w for w in sorted(vocab, key=vocab.get) if not (w.startswith("<") and w.endswith(">"))]
