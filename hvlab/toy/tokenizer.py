"""The toy model's tokenizer: one id per word, and the Llama-3 special tokens of the prompt template.

The release encodes prompts with Llama-3's byte-level BPE (128,256 ids) and CLIP's (49,408 ids). The
toy's text encoders are tiny, so a vocabulary that size would be almost all of their weights. Its
prompts are short English ("a red circle moving right") wrapped in the same video prompt template as
the release, so a word-level vocabulary of a few hundred entries covers everything it reads:

* the special tokens the template is written with (``<|start_header_id|>``, ``<|end_header_id|>``,
  ``<|eot_id|>``), Llama-3's ``<|begin_of_text|>`` / ``<|end_of_text|>``, CLIP's ``<|startoftext|>`` /
  ``<|endoftext|>``, and ``<pad>`` / ``<unk>``;
* every word, digit and punctuation mark of hvlab's prompt templates and negative prompt;
* the caption words of `hvlab.toy.data`, and a few generic words to experiment with.

Text is lower-cased, split on whitespace, then punctuation and digits become tokens of their own
("video.2." -> "video", ".", "2", "."); words outside the vocabulary become ``<unk>``. As with Llama-3,
encoding prepends ``<|begin_of_text|>``, so ``derive_crop_start`` counts BOS exactly as for the
release. The CLIP flavour (``kind="clip"``) shares the vocabulary and ids, and wraps a prompt as CLIP
does: ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>``.

The built files live in ``hvlab/toy/weights/tokenizer/`` (regenerate them with
``python -m hvlab.toy.tokenizer``); a test checks that they equal a fresh build.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import data

TOKENIZER_DIR = Path(__file__).resolve().parent / "weights" / "tokenizer"

PAD, UNK = "<pad>", "<unk>"
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, UNK, LLAMA_BOS, LLAMA_EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  CLIP_BOS, CLIP_EOS)  # ids 0..8, in this order
# Words beyond the templates and captions, so a notebook can prompt with a colour, shape or motion the toy
# never trained on and see what the model makes of a real (untrained-on) word rather than of <unk>.
EXTRA_WORDS = ("an", "the", "is", "it", "in", "on", "at", "to", "from", "with", "of", "and", "or", "not", "no",
               "one", "two", "three", "object", "shape", "colour", "color", "black", "orange", "purple",
               "pink", "grey", "gray", "brown", "ball", "box", "star", "big", "small", "large", "fast",
               "slow", "slowly", "quickly", "moves", "move", "still", "static", "rotating", "towards",
               "across", "frame", "picture")
MAX_LENGTH = {"llm": 512, "clip": 77}  # model_max_length of each flavour (the encoders set their own)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),  # "\n\n" and spaces are separators only, never tokens
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


def _words(text: str) -> list[str]:
    """The vocabulary entries a text needs: its words after normalising and pre-tokenizing."""
    for special in SPECIAL_TOKENS:
        text = text.replace(special, " ")
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(normalizers.Lowercase().normalize_str(text))]


def toy_vocabulary() -> list[str]:
    """The vocabulary in id order: SPECIAL_TOKENS, then every needed word sorted. Deterministic."""
    from ..prompts import NEGATIVE_PROMPT, PROMPT_TEMPLATE  # imported here: the prompts module owns the text

    words = set()
    for template in PROMPT_TEMPLATE.values():
        words.update(_words(template["template"].replace("{}", " ")))
    words.update(_words(NEGATIVE_PROMPT))
    for c, s, d in data.ALL_COMBOS:
        words.update(_words(data.caption(c, s, d)))
    words.update(str(i) for i in range(10))
    words.update(EXTRA_WORDS)
    return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


def _post_processor(kind: str, vocab: dict[str, int]) -> processors.TemplateProcessing:
    if kind == "llm":  # Llama-3: BOS in front, nothing at the end
        return processors.TemplateProcessing(single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS}:1 $B:1",
                                             special_tokens=[(LLAMA_BOS, vocab[LLAMA_BOS])])
    return processors.TemplateProcessing(single=f"{CLIP_BOS} $A {CLIP_EOS}",
                                         pair=f"{CLIP_BOS} $A {CLIP_EOS} {CLIP_BOS}:1 $B:1 {CLIP_EOS}:1",
                                         special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])])


def _check_kind(kind: str) -> None:
    if kind not in MAX_LENGTH:
        raise ValueError(f"kind must be 'llm' (the Llama-style encoder) or 'clip', got {kind!r}")


def _wrap(backend: Tokenizer, kind: str) -> PreTrainedTokenizerFast:
    """A `tokenizers` backend -> the `transformers` tokenizer of one flavour (the backend is modified)."""
    backend.post_processor = _post_processor(kind, backend.get_vocab())
    bos, eos, pad = (LLAMA_BOS, LLAMA_EOS, PAD) if kind == "llm" else (CLIP_BOS, CLIP_EOS, CLIP_EOS)
    extra = [t for t in SPECIAL_TOKENS if t not in (bos, eos, pad, UNK)]
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=UNK, additional_special_tokens=extra, padding_side="right",
                                   model_max_length=MAX_LENGTH[kind])


def _build_backend() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(toy_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer()
    # Special tokens are matched in the raw text before normalising, so "<|eot_id|>" is one id.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def build_toy_tokenizer(kind: str = "llm", save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer from `toy_vocabulary()`; with `save_dir`, also write its files there.

    The folder holds tokenizer.json (vocabulary, normaliser, pre-tokenizer and the llm flavour's
    BOS post-processor), tokenizer_config.json and special_tokens_map.json, so
    ``AutoTokenizer.from_pretrained(folder)`` works too. The files are written here, not with
    ``save_pretrained``, so their content does not depend on the installed transformers version.
    """
    _check_kind(kind)
    backend = _build_backend()
    if save_dir is not None:
        folder = Path(save_dir)
        folder.mkdir(parents=True, exist_ok=True)
        backend.post_processor = _post_processor("llm", backend.get_vocab())  # the saved flavour
        backend.save(str(folder / "tokenizer.json"), pretty=True)
        special = dict(bos_token=LLAMA_BOS, eos_token=LLAMA_EOS, pad_token=PAD, unk_token=UNK)
        extra = [t for t in SPECIAL_TOKENS if t not in special.values()]
        config = dict(tokenizer_class="PreTrainedTokenizerFast", **special, additional_special_tokens=extra,
                      padding_side="right", model_max_length=MAX_LENGTH["llm"], clean_up_tokenization_spaces=False)
        for name, content in (("tokenizer_config.json", config),
                              ("special_tokens_map.json", dict(special, additional_special_tokens=extra))):
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return _wrap(backend, kind)


def load_toy_tokenizer(kind: str = "llm", path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The saved toy tokenizer (``hvlab/toy/weights/tokenizer`` by default), built afresh if absent."""
    _check_kind(kind)
    file = Path(path or TOKENIZER_DIR) / "tokenizer.json"
    if not file.is_file():
        if path is not None:
            raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}; build one with "
                                    f"build_toy_tokenizer(save_dir={str(path)!r})")
        return build_toy_tokenizer(kind)
    return _wrap(Tokenizer.from_file(str(file)), kind)


if __name__ == "__main__":
    build_toy_tokenizer(save_dir=TOKENIZER_DIR)
    print(f"saved the toy tokenizer ({len(toy_vocabulary())} ids) to {TOKENIZER_DIR}")
