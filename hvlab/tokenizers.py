"""The two real tokenizers HunyuanVideo uses, built offline from BPE files that ship on PyPI.

HunyuanVideo conditions on two text encoders, and each has its own tokenizer:

* the LLM (llava-llama-3-8b) uses **Llama-3's tokenizer**: a byte-level BPE with 128,000 merges
  learnt by tiktoken, plus 256 special tokens (``<|begin_of_text|>`` = 128000, ``<|eot_id|>``, ...).
  Meta ships it as a tiktoken rank file, ``llama_models/llama3/tokenizer.model``, inside the PyPI
  package ``llama-models``;
* CLIP-L uses **CLIP's tokenizer**: a byte-level BPE over lower-cased words with an end-of-word
  marker ``</w>``, 49,408 ids, 77 tokens per prompt. Its merge list ships as
  ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside ``open-clip-torch``.

Both packages are installed with ``--no-deps`` purely as carriers of those data files, so this module
finds the files with ``importlib.util.find_spec`` and never imports the packages themselves
(open_clip would need torchvision). It turns them into Hugging Face ``transformers`` tokenizers,
so the rest of hvlab (and the real checkpoints' own tokenizers) share one calling convention.

The one piece of real work is :func:`tiktoken_to_bpe`: tiktoken stores only a *rank* per token
(lower rank = merged earlier), while a ``tokenizers`` BPE model wants a vocabulary and an ordered
*merge list*. Tiktoken's rule is "repeatedly merge the adjacent pair whose concatenation has the
lowest rank", so every split of a token into two tokens is a merge, ordered by the rank of the
result. ``ignore_merges=True`` reproduces tiktoken's shortcut of taking a whole pre-token
directly when it is itself in the vocabulary. ``tests/test_prompts.py`` checks the result
against tiktoken id for id.

When a user has ``ckpts/text_encoder`` / ``ckpts/text_encoder_2``, the tokenizers saved there are
used instead (see :mod:`hvlab.text_encoder`); these builders make the real vocabularies available
for tests, the toy model and the notebooks without any download.
"""
from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

# Llama-3's pre-tokenizer split pattern (from llama_models/llama3/tokenizer.py): contractions,
# words with one optional leading non-letter, numbers in groups of at most 3 digits, punctuation
# runs, newlines, and whitespace.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256  # ids 128000 .. 128255, right after the 128,000 BPE tokens

# The named special tokens in id order, as llama_models/llama3/tokenizer.py lists them (Llama 3.1+
# names; Llama 3.0's tokenizer called 128004/128005/128008/128010/128011 "reserved" tokens, the ids
# of everything HunyuanVideo's templates use are the same).
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",           # 128000: BOS, prepended to every encoding
    "<|end_of_text|>",             # 128001
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",   # 128004: hvlab pads with this one
    "<|step_id|>",
    "<|start_header_id|>",         # 128006: the templates' role headers
    "<|end_header_id|>",           # 128007
    "<|eom_id|>",
    "<|eot_id|>",                  # 128009: end of turn, closes the user prompt in the templates
    "<|python_tag|>",
    "<|image|>",
)

CLIP_VOCAB_SIZE = 49408    # 256 bytes + 256 bytes with "</w>" + 48,894 merges + 2 specials
CLIP_MAX_LENGTH = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by every byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) are moved to
    code points 256.. so that a token's string form never contains whitespace or control characters.
    The dict's order matters for CLIP, whose first 256 ids are these characters in this order:
    the printable bytes first, then the moved ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {package!r} is not installed; it carries {relative}. "
            f"Install it with `{install_hint}` (no dependencies are needed: hvlab only reads the file)."
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{package!r} is installed but has no {relative} under {list(spec.submodule_search_locations)}")


def llama3_bpe_file() -> Path:
    """Path to Llama-3's tiktoken rank file inside the ``llama-models`` package."""
    return _package_file("llama_models", "llama3/tokenizer.model", "pip install --no-deps llama-models")


def clip_bpe_file() -> Path:
    """Path to CLIP's gzipped merge list inside the ``open-clip-torch`` package."""
    return _package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz", "pip install --no-deps open-clip-torch")


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file: one ``base64(token bytes) rank`` pair per line."""
    ranks = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into a byte-level BPE vocabulary and an ordered merge list.

    Every way of cutting a token into two pieces that are both tokens is a merge that tiktoken may
    perform; it performs the one whose result has the lowest rank first, so the merges are sorted by
    the rank of the merged token (ties, i.e. two cuts of one token, by the ranks of the pieces).
    """
    to_char = bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    ordered = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                ordered.append((rank, ranks[left], ranks[right], left, right))
    ordered.sort(key=lambda m: m[:3])
    merges = [(as_str(left), as_str(right)) for _, _, _, left, right in ordered]
    return vocab, merges


def llama3_special_tokens(num_base_tokens: int = 128000) -> dict[str, int]:
    """The 256 special tokens and their ids: the named ones, then ``<|reserved_special_token_2|>`` on."""
    names = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(names))]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def _cache_dir() -> Path:
    root = os.environ.get("HVLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hvlab"
    )
    return Path(root)


def _build_llama3_backend(bpe_path: Path) -> Tokenizer:
    ranks = load_tiktoken_ranks(bpe_path)
    vocab, merges = tiktoken_to_bpe(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    # Split with Llama-3's regex first ("isolated": matches become pre-tokens), then map bytes to
    # characters; use_regex=False stops ByteLevel from applying GPT-2's own split on top.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens(len(ranks))
    # Added in id order so that each lands on its id (the vocabulary ends at len(ranks) - 1).
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for name, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])]
    )
    return tok


@functools.lru_cache(maxsize=None)
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3's tokenizer (128,256 ids) as a ``transformers`` fast tokenizer, built offline.

    Encoding prepends ``<|begin_of_text|>`` (as Meta's Hugging Face tokenizer does); special tokens
    written in the text (``<|start_header_id|>``, ``<|eot_id|>``, ...) become their single ids; padding
    is on the right with ``<|finetune_right_pad_id|>`` (128004). The built tokenizer is cached in
    memory and, as ``tokenizer.json``, under ``~/.cache/hvlab`` (``$HVLAB_CACHE`` overrides): building
    it from the rank file takes a few seconds, loading the JSON well under one.

    The returned object is shared between calls: copy it (``copy.deepcopy``) before changing settings.
    """
    bpe_path = llama3_bpe_file()
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"llama3-{digest}-tokenizer.json"
    backend = None
    if cached.is_file():
        try:
            backend = Tokenizer.from_file(str(cached))
        except Exception:  # a truncated or foreign file: rebuild it
            backend = None
    if backend is None:
        backend = _build_llama3_backend(bpe_path)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            backend.save(str(tmp))
            os.replace(tmp, cached)  # atomic, so parallel test workers never read half a file
        except OSError:
            pass  # a read-only home only costs the rebuild next time
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        padding_side="right",
        model_max_length=131072,  # Llama-3.1's context; HunyuanVideo uses 256 + crop_start
    )


def clip_vocab_and_merges(path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 ids) and merges, rebuilt from the gzipped merge list.

    Ids are assigned in a fixed order: the 256 byte characters, the same 256 with ``</w>`` (a byte
    ending a word), one id per merge result in merge order, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407). The file's first line is a version header; CLIP uses its first
    49,152 - 256 - 2 = 48,894 merges.
    """
    lines = gzip.open(path or clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP's merge file should give {CLIP_VOCAB_SIZE} ids, got {len(tokens)}: is it bpe_simple_vocab_16e6?")
    return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> CLIPTokenizer:
    """CLIP-L's tokenizer (``openai/clip-vit-large-patch14``'s ids) built from open_clip's merge file.

    Text is NFC-normalised, whitespace-collapsed and lower-cased; encodings are
    ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>`` to 77 tokens when asked.
    Unlike open_clip it does not run ``ftfy`` mojibake repair (neither does Hugging Face's fast CLIP
    tokenizer). Shared between calls, like :func:`llama3_tokenizer`.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, padding_side="right")
