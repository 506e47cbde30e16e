"""Which prompt word each of the DiT's text tokens belongs to, so attention maps can be labelled by word."""
from __future__ import annotations

import re

WORD_PATTERN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")  # a word: letters / digits (with ' or -), or one punctuation mark


def token_words(text_encoder, prompt: str) -> tuple[list[str], list[int], list[str]]:
    """Which prompt word each of the DiT's text tokens belongs to.

    Tokenizes the prompt inside the encoder's template exactly as `TextEncoder.encode` does, drops
    the ``crop_start`` template tokens, and maps each remaining token to the word (a run of letters /
    digits, or one punctuation mark) its character span overlaps, using the fast tokenizer's offsets.
    Returns ``(words, word_of_token, tokens)``: ``word_of_token[j]`` indexes ``words`` or is -1 for a
    token outside the prompt (e.g. the closing ``<|eot_id|>``); ``tokens`` are the token strings.
    """
    from ..prompts import split_template

    tok = text_encoder.tokenizer
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"token_words needs a fast tokenizer (character offsets); got {type(tok).__name__}")
    prefix, suffix = split_template(text_encoder.template) if text_encoder.template is not None else ("", "")
    enc = tok(prefix + prompt + suffix, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
              max_length=text_encoder.max_length + text_encoder.crop_start)
    c = text_encoder.crop_start
    offsets, ids = enc["offset_mapping"][c:], enc["input_ids"][c:]
    spans = [(m.start(), m.end()) for m in WORD_PATTERN.finditer(prompt)]
    words = [prompt[a:b] for a, b in spans]
    word_of_token = []
    for a, b in offsets:
        a, b = a - len(prefix), b - len(prefix)
        hit = [w for w, (s, e) in enumerate(spans) if a < e and s < b and b > a]
        word_of_token.append(hit[0] if hit else -1)
    return words, word_of_token, tok.convert_ids_to_tokens(ids)
