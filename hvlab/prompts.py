"""Prompt templates for the LLM text encoder, and where the user's words start in them.

A vanilla text-to-image DiT feeds the raw prompt to T5 or CLIP. HunyuanVideo instead uses a
decoder-only LLM (the language model of llava-llama-3-8b), and wraps every prompt in a Llama-3 chat
template whose *system* turn asks the model to describe the video: colours, shapes, actions,
camera, ... The LLM reads the prompt "in the light of" that instruction, so its hidden states carry
what a video model needs. Afterwards the instruction's tokens are cut away: only the tokens from
``crop_start`` on (the user's prompt and the closing ``<|eot_id|>``) are handed to the DiT.

``crop_start`` is simply the number of tokens in the template before ``{}``, BOS included. The
official code hard-codes it (36 for the image template, 95 for the video one);
:func:`derive_crop_start` computes it from any tokenizer, so a changed template or tokenizer cannot
silently shift the crop by a token.
"""
from __future__ import annotations

from typing import Sequence

# Exact strings of the official release. Note: the video template has NO space between its numbered
# items ("video.2. The color"), and both end with <|eot_id|> after the user's prompt.
PROMPT_TEMPLATE = {
    "dit-llm-encode": {
        "template": (
            "<|start_header_id|>system<|end_header_id|>\n\n"
            "Describe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        ),
        "crop_start": 36,
    },
    "dit-llm-encode-video": {
        "template": (
            "<|start_header_id|>system<|end_header_id|>\n\n"
            "Describe the video by detailing the following aspects: "
            "1. The main content and theme of the video."
            "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
            "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
            "4. background environment, light, style and atmosphere."
            "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        ),
        "crop_start": 95,
    },
}

# The official negative prompt; used only with true classifier-free guidance (--cfg-scale > 1).
NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, "
    "bad hands, bad teeth, bad eyes, bad limbs, distortion"
)


def template_for(video_length: int) -> dict:
    """The template the official sampler picks: the image one for a single frame, the video one otherwise.

    (The official pipeline passes ``data_type="image"`` when ``video_length == 1``.) hvlab's text encoder keeps
    the template it was built with; for text-to-image as the release does it, build the LLM encoder with
    ``template=template_for(1)`` (crop_start 36).
    """
    if isinstance(video_length, bool) or not isinstance(video_length, int) or video_length < 1:
        raise ValueError(f"video_length must be a positive int (frames), got {video_length!r}")
    return PROMPT_TEMPLATE["dit-llm-encode" if video_length == 1 else "dit-llm-encode-video"]


def _template_text(template: dict | str) -> str:
    text = template["template"] if isinstance(template, dict) else template
    if not isinstance(text, str):
        raise TypeError(f"a prompt template is a str or a dict with a 'template' str, got {type(text).__name__}")
    if text.count("{}") != 1:
        raise ValueError(
            f"a prompt template must contain exactly one '{{}}' where the prompt goes, found {text.count('{}')} "
            f"in {text[:60]!r}..."
        )
    return text


def split_template(template: dict | str) -> tuple[str, str]:
    """(text before the prompt, text after it)."""
    prefix, suffix = _template_text(template).split("{}")
    return prefix, suffix


def apply_template(prompt: str, template: dict | str) -> str:
    """Put ``prompt`` where the template's ``{}`` is.

    Plain concatenation rather than ``str.format``, so braces elsewhere in a custom template are kept.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    prefix, suffix = split_template(template)
    return prefix + prompt + suffix


def derive_crop_start(tokenizer, template: dict | str) -> int:
    """Number of tokens the encoder sees before the prompt: the template's prefix, BOS included.

    The prefix is tokenized with special tokens on, exactly as the encoder tokenizes the full text,
    and the ids it adds at the *front* (BOS) are counted; ids a tokenizer appends at the end (an EOS,
    as T5's does) are not, since in the full text they come after the prompt. Llama-3's tokenizer
    gives 36 for ``"dit-llm-encode"`` and 95 for ``"dit-llm-encode-video"``.
    """
    prefix, _ = split_template(template)
    with_special = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    for lead in range(len(with_special) - len(plain) + 1):
        if with_special[lead:lead + len(plain)] == plain:
            crop_start = lead + len(plain)
            break
    else:
        raise ValueError(
            f"cannot find the template prefix's {len(plain)} tokens inside its encoding with special tokens "
            f"({len(with_special)} ids): this tokenizer changes the text's tokens when it adds special ones; "
            f"pass crop_start explicitly"
        )
    # A prefix ending in a space or punctuation merges with the prompt's first word in byte-level BPE
    # ("Q: " + "zebra" -> "Q", ":", " zebra"), and the crop would then cut into the prompt.
    probe = list(tokenizer(apply_template("Zebra", template), add_special_tokens=True)["input_ids"])
    if probe[:crop_start] != with_special[:crop_start]:
        raise ValueError(
            f"the template's text before '{{}}' ({prefix[-20:]!r} at its end) tokenizes differently once a "
            f"prompt follows it: its last characters merge with the prompt's first token, so no crop_start "
            f"separates instruction from prompt. End the prefix with a newline or a special token, as the "
            f"official templates do with '<|end_header_id|>\\n\\n'"
        )
    return crop_start


def validate_prompts(prompt: str | Sequence[str], batch_size: int | None = None, name: str = "prompt") -> list[str]:
    """A prompt or a list of prompts -> a non-empty list of str.

    With ``batch_size``, a single str is repeated to that many (how a negative prompt is shared by
    the batch) and a list must have exactly that length. ``name`` is used in error messages.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if isinstance(prompt, str):
        return [prompt] * (1 if batch_size is None else batch_size)
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompt) if not isinstance(p, str)]
    if bad:
        i, kind = bad[0]
        raise TypeError(f"{name} must be a list of str, but item {i} is a {kind}")
    if batch_size is not None and len(prompt) != batch_size:
        raise ValueError(f"{name} has {len(prompt)} entries but the batch has {batch_size} prompts: give one per prompt or a single str")
    return list(prompt)
