"""Prompt templates, crop_start, and the two tokenizers (checked against tiktoken and open_clip)."""
import gzip
import importlib.util
import random
import sys
import types

import pytest

from hvlab.prompts import (NEGATIVE_PROMPT, PROMPT_TEMPLATE, apply_template, derive_crop_start, split_template,
                           validate_prompts)
from hvlab.tokenizers import (CLIP_VOCAB_SIZE, clip_bpe_file, clip_tokenizer, llama3_special_tokens,
                              llama3_tokenizer)

VIDEO, IMAGE = PROMPT_TEMPLATE["dit-llm-encode-video"], PROMPT_TEMPLATE["dit-llm-encode"]

SAMPLES = [
    "A cat walks on the grass, realistic style.",
    "  leading spaces\n\n\nnew lines\r\n\ttabs   trailing  ",
    "日本語のテキスト 🐱🚀 émoji ÀÉÎ Ünïcödé — “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "12345678 3.14159 don't I'LL we've They'RE x_y-z http://a.b/c?d=e#f",
    "",
    apply_template("A dog surfing a wave at sunset.", VIDEO),
    apply_template("a red cube", IMAGE),
]


@pytest.fixture(scope="module")
def llama():
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_ref():
    mod = pytest.importorskip("llama_models.llama3.tokenizer")  # Meta's own tiktoken-based tokenizer
    return mod.Tokenizer.get_instance()


# ---- templates ---------------------------------------------------------------------------------------

def test_video_template_is_the_one_diffusers_uses():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert VIDEO == DEFAULT_PROMPT_TEMPLATE
    assert "of the video.2. The color" in VIDEO["template"]  # no space between the numbered items


def test_negative_prompt_is_plain_text():
    assert NEGATIVE_PROMPT.startswith("Aerial view, aerial view,") and "{}" not in NEGATIVE_PROMPT


@pytest.mark.parametrize("name, expected", [("dit-llm-encode-video", 95), ("dit-llm-encode", 36)])
def test_derived_crop_start_with_the_real_llama3_tokenizer(llama, name, expected):
    template = PROMPT_TEMPLATE[name]
    assert derive_crop_start(llama, template) == expected == template["crop_start"]
    # diffusers' independent recipe: tokenize the whole template with "{}" left in, then remove the
    # 2 tokens of "{}<|eot_id|>".
    assert len(llama(template["template"])["input_ids"]) - 2 == expected


@pytest.mark.parametrize("template", [VIDEO, IMAGE, {"template": "Q:\n{} A:"}])
@pytest.mark.parametrize("which", ["llama", "clip"])
def test_crop_start_points_at_the_prompt_tokens(llama, template, which):
    tok = llama if which == "llama" else clip_tokenizer()
    prompt = "zebras crossing a river"
    full = tok(apply_template(prompt, template))["input_ids"]
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    c = derive_crop_start(tok, template)
    assert full[c:c + len(alone)] == alone  # CLIP appends an EOS: it must not count in crop_start
    if which == "llama" and template in (VIDEO, IMAGE):  # the DiT gets the prompt, then <|eot_id|>
        assert full[c:] == alone + [llama.convert_tokens_to_ids("<|eot_id|>")]


@pytest.mark.parametrize("template", ["Q: {} A:", VIDEO["template"].replace("\n\n{}", "\n\n {}")])
def test_crop_start_refuses_a_prefix_that_merges_into_the_prompt(llama, template):
    # In byte-level BPE " zebras" is one token: the prefix's trailing space would be cropped with it.
    with pytest.raises(ValueError, match="merge with the prompt's first token"):
        derive_crop_start(llama, template)


def test_apply_template_keeps_braces_and_validates():
    assert apply_template("{x}", {"template": "a {y} b {} c"}) == "a {y} b {x} c"
    assert split_template(VIDEO)[1] == "<|eot_id|>"
    with pytest.raises(ValueError, match="exactly one '{}'"):
        apply_template("p", {"template": "no slot"})
    with pytest.raises(ValueError, match="found 2"):
        apply_template("p", "{} and {}")
    with pytest.raises(TypeError, match="prompt must be a str"):
        apply_template(3, VIDEO)


def test_validate_prompts():
    assert validate_prompts("a") == ["a"]
    assert validate_prompts(("a", "b")) == ["a", "b"]
    assert validate_prompts("neg", batch_size=3) == ["neg"] * 3
    with pytest.raises(TypeError, match="str or a list of str, got int"):
        validate_prompts(5)
    with pytest.raises(TypeError, match="item 1 is a NoneType"):
        validate_prompts(["a", None])
    with pytest.raises(ValueError, match="empty list"):
        validate_prompts([])
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but the batch has 2"):
        validate_prompts(["n"], batch_size=2, name="negative_prompt")


# ---- Llama-3 tokenizer vs tiktoken ----------------------------------------------------------------------

def test_llama3_special_tokens_match_meta(llama, tiktoken_ref):
    assert llama3_special_tokens() == tiktoken_ref.special_tokens
    for name, idx in tiktoken_ref.special_tokens.items():
        assert llama.convert_tokens_to_ids(name) == idx
    assert len(llama) == 128256 and llama.bos_token_id == 128000 and llama.padding_side == "right"


@pytest.mark.parametrize("text", SAMPLES)
def test_llama3_ids_equal_tiktoken(llama, tiktoken_ref, text):
    ids = llama(text)["input_ids"]
    assert ids == tiktoken_ref.encode(text, bos=True, eos=False, allowed_special="all")
    assert llama.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text


def test_llama3_ids_equal_tiktoken_on_random_text(llama, tiktoken_ref):
    # Random mixes of scripts, digits, punctuation and whitespace exercise merge order far more than prose.
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 \n\t.,;:'\"!?()[]{}-_/\\@#$%^&*é漢字ßøπжЯ🙂" + "  "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    ours = llama(texts)["input_ids"]
    for text, ids in zip(texts, ours):
        assert ids == tiktoken_ref.encode(text, bos=True, eos=False, allowed_special="all"), text


# ---- CLIP tokenizer vs open_clip's SimpleTokenizer ----------------------------------------------------

@pytest.fixture(scope="module")
def open_clip_ref():
    """open_clip's reference tokenizer, loaded from its file alone (the package needs torchvision).

    Its only missing dependency, ftfy (mojibake repair), is replaced by the identity: the texts below are
    clean, so ftfy would not change them.
    """
    pytest.importorskip("regex")
    spec = importlib.util.find_spec("open_clip")
    path = next(p for p in (f"{d}/tokenizer.py" for d in spec.submodule_search_locations))
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)
    try:
        mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.SimpleTokenizer(bpe_path=str(clip_bpe_file()))
    finally:
        if saved is None:
            sys.modules.pop("ftfy", None)
        else:
            sys.modules["ftfy"] = saved


CLIP_SAMPLES = ["a photo of a cat", "A Cat WALKS on the grass,   realistic style!!", "café naïve 3.14 x2 don't",
                "supercalifragilisticexpialidocious", "emoji 🐱 and 漢字", NEGATIVE_PROMPT]


@pytest.mark.parametrize("text", CLIP_SAMPLES)
def test_clip_ids_equal_open_clip(open_clip_ref, text):
    ours = clip_tokenizer()(text)["input_ids"]
    assert ours == [49406] + open_clip_ref.encode(text) + [49407]


def test_clip_vocab_and_padding():
    tok = clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    # The last merge of the file is the last regular id (49405).
    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    assert tok.convert_tokens_to_ids("".join(lines[48894].split())) == 49405
    enc = tok(["a photo of a cat", "word " * 100], padding="max_length", max_length=77, truncation=True)
    assert [len(x) for x in enc["input_ids"]] == [77, 77]
    assert enc["input_ids"][0][7:] == [49407] * 70 and sum(enc["attention_mask"][0]) == 7
    assert enc["input_ids"][1][-1] == 49407 and sum(enc["attention_mask"][1]) == 77
