"""The two text encoders: a decoder-only LLM for per-token states, CLIP-L for one pooled vector.

What differs from a vanilla text-to-image DiT (T5 tokens + CLIP pooled):

* The per-token conditioning comes from a **decoder-only LLM** (the language model of
  llava-llama-3-8b, 32 layers, 4096 wide), not an encoder. Each prompt is wrapped in a chat
  template (:mod:`hvlab.prompts`), and the states are taken **two layers before the end**
  (``hidden_states[-(2 + 1)]``, *without* the final RMSNorm): the last layers of a causal LM
  specialise in predicting the next token, the ones just before hold more general features.
  Because the LLM attends causally, padding on the right never changes a real token's state.
  The template's instruction tokens are then cropped away: ``[B, 256, 4096]`` and a ``[B, 256]``
  mask go to the DiT's token refiner.
* CLIP-L contributes only its **pooled** vector (the final-layer state at the first
  ``<|endoftext|>``, 768-d, no projection), added into the DiT's modulation vector.

Both encoders are frozen and only run once per prompt; :func:`hvlab.fast.offload.on_device` moves one to
the GPU for the encode and back to the CPU afterwards, so the 16 GB LLM does not sit next to the
DiT during denoising.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .prompts import apply_template, derive_crop_start, validate_prompts
from .runs import RELEASE_DEFAULTS

LLM_LAYOUT = (
    "a Hugging Face folder with config.json, the weights (model*.safetensors or pytorch_model*.bin) and the "
    "tokenizer files (tokenizer.json + tokenizer_config.json): either a LlamaModel / LlamaForCausalLM "
    "(e.g. Kijai/llava-llama-3-8b-text-encoder-tokenizer, or the official preprocess_text_encoder_tokenizer_utils.py "
    "output) or a whole LlavaForConditionalGeneration (xtuner/llava-llama-3-8b-v1_1-transformers), "
    "whose language model is used"
)
CLIP_LAYOUT = (
    "a Hugging Face folder with config.json, the weights and the tokenizer of openai/clip-vit-large-patch14 "
    "(a CLIPModel or CLIPTextModel checkpoint)"
)


@dataclass
class TextEncoderOutput:
    hidden_state: torch.Tensor                    # LLM: (B, L_txt, D) cropped states; CLIP: (B, D) pooled
    attention_mask: torch.Tensor                  # (B, L_txt) 1 = real token (CLIP: its 77 input tokens)
    hidden_states_list: tuple | None = None       # every layer's (B, L, D) output, uncropped, when asked


class TextEncoder(nn.Module):
    """A frozen ``transformers`` text model plus its tokenizer, producing what the DiT consumes.

    Args:
        model: a ``LlamaModel``-like decoder (``kind="llm"``) or a ``CLIPTextModel`` (``kind="clip"``).
        tokenizer: the matching ``transformers`` tokenizer.
        kind: "llm" (per-token states, cropped after the template) or "clip" (pooled vector).
        max_length: tokens handed on: 256 for the LLM (after cropping), 77 for CLIP.
        template: an entry of ``PROMPT_TEMPLATE`` or ``{"template": "...{}..."}`` (LLM only).
        hidden_state_skip_layer: how many final layers to skip: output = ``hidden_states[-(skip + 1)]``.
        apply_final_norm: pass the picked state through the model's final norm (official: False).
        crop_start: tokens to drop from the front; None derives it from the template and tokenizer
            (:func:`hvlab.prompts.derive_crop_start`), so it always matches the tokenizer in use.
    """

    def __init__(self, model: nn.Module, tokenizer, kind: str, max_length: int, template: dict | None = None,
                 hidden_state_skip_layer: int = 2, apply_final_norm: bool = False, crop_start: int | None = None):
        super().__init__()
        if kind not in ("llm", "clip"):
            raise ValueError(f"kind must be 'llm' or 'clip', got {kind!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (256 for the LLM, 77 for CLIP), got {max_length!r}")
        if kind == "clip" and template is not None:
            raise ValueError("CLIP reads the raw prompt: pass template=None for kind='clip'")
        n_layers = model.config.num_hidden_layers
        if kind == "llm" and not 0 <= hidden_state_skip_layer < n_layers:
            raise ValueError(f"hidden_state_skip_layer must be in [0, {n_layers - 1}] for this "
                             f"{n_layers}-layer model (official: 2), got {hidden_state_skip_layer}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.template = template
        self.hidden_state_skip_layer = hidden_state_skip_layer
        self.apply_final_norm = apply_final_norm
        if crop_start is None:
            crop_start = derive_crop_start(tokenizer, template) if template is not None else 0
        if crop_start < 0:
            raise ValueError(f"crop_start must be >= 0, got {crop_start}")
        self.crop_start = crop_start

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def _tokenize(self, texts: list[str], total_length: int, device) -> dict[str, torch.Tensor]:
        full_lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
        for i, n in enumerate(full_lengths):
            if n > total_length:  # counted before truncation, so the message can say how much is lost
                where = (f"after the template's {self.crop_start}-token prefix, closing tokens included"
                         if self.crop_start else "start and end tokens included")
                warnings.warn(  # stacklevel 4: the line that called encode()
                    f"prompt {i} is {n - self.crop_start} tokens long ({where}) but the {self.kind} encoder keeps "
                    f"{total_length - self.crop_start}: the last {n - total_length} tokens were dropped", stacklevel=4)
        enc = self.tokenizer(texts, padding="max_length", max_length=total_length, truncation=True,
                             padding_side="right", return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def _final_norm(self) -> nn.Module:
        for name in ("norm", "final_layer_norm", "ln_f"):
            if isinstance(getattr(self.model, name, None), nn.Module):
                return getattr(self.model, name)
        raise AttributeError(f"apply_final_norm=True but {type(self.model).__name__} has no norm/final_layer_norm/ln_f")

    def encode(self, prompts: str | Sequence[str], device=None, output_hidden_states: bool = False) -> TextEncoderOutput:
        """Tokenize and encode (without gradients: the encoders are frozen); see the class docstring."""
        prompts = validate_prompts(prompts)
        device = torch.device(device) if device is not None else self.device
        encode = self._encode_clip if self.kind == "clip" else self._encode_llm
        with torch.no_grad():
            return encode(prompts, device, output_hidden_states)

    def _encode_llm(self, prompts: list[str], device, output_hidden_states: bool) -> TextEncoderOutput:
        texts = [apply_template(p, self.template) for p in prompts] if self.template is not None else prompts
        batch = self._tokenize(texts, self.max_length + self.crop_start, device)
        out = self.model(**batch, output_hidden_states=True)
        if self.hidden_state_skip_layer == 0:
            state = out.last_hidden_state                                    # the final norm is already in
        else:
            state = out.hidden_states[-(self.hidden_state_skip_layer + 1)]   # (B, crop_start + L_txt, D)
            if self.apply_final_norm:
                state = self._final_norm()(state)
        c = self.crop_start
        return TextEncoderOutput(hidden_state=state[:, c:], attention_mask=batch["attention_mask"][:, c:],
                                 hidden_states_list=out.hidden_states if output_hidden_states else None)

    def _encode_clip(self, prompts: list[str], device, output_hidden_states: bool) -> TextEncoderOutput:
        batch = self._tokenize(prompts, self.max_length, device)
        out = self.model(**batch, output_hidden_states=output_hidden_states)
        # The pooled state is the final (layer-normed) state at the FIRST end-of-text token. For
        # openai's CLIP that is exactly `pooler_output`, but transformers falls back to "position of
        # the largest id" when a config says eos_token_id == 2 (a legacy value), which is wrong for any
        # other vocabulary; picking the position here works for every tokenizer.
        ids = batch["input_ids"]
        is_eos = ids == self.tokenizer.eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"every CLIP input needs an end-of-text token (id {self.tokenizer.eos_token_id}); "
                             f"the tokenizer did not append one")
        eos_pos = is_eos.int().argmax(dim=1)                                   # first EOS, (B,)
        pooled = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), eos_pos]  # (B, D)
        return TextEncoderOutput(hidden_state=pooled, attention_mask=batch["attention_mask"],
                                 hidden_states_list=out.hidden_states if output_hidden_states else None)

    def forward(self, prompts, device=None) -> TextEncoderOutput:
        return self.encode(prompts, device)


def _read_config(path: Path, what: str, layout: str) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r} (missing {config.name}); expected {layout}")
    return json.loads(config.read_text())


def _load_tokenizer(path: Path, layout: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, padding_side="right")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load a tokenizer from {str(path)!r} ({e}); expected {layout}") from e


def load_llm_encoder(path: str = "ckpts/text_encoder", dtype: torch.dtype = torch.float16, device="cpu",
                     template: dict | None = None, max_length: int = 256, hidden_state_skip_layer: int = 2,
                     apply_final_norm: bool = False, tokenizer: str | Path | None = None) -> TextEncoder:
    """The LLM encoder from a local folder (never downloads), with the official settings.

    ``template`` defaults to ``PROMPT_TEMPLATE["dit-llm-encode-video"]``. A LlavaForConditionalGeneration
    folder is loaded whole, then only its language model is kept. ``tokenizer``: the tokenizer's folder when it
    is not ``path`` itself (diffusers keeps it in tokenizer/ beside text_encoder/).
    """
    from transformers import AutoModel
    from .prompts import PROMPT_TEMPLATE

    path = Path(path)
    config = _read_config(path, "LLM text encoder", LLM_LAYOUT)
    if config.get("model_type") == "llava" or "LlavaForConditionalGeneration" in config.get("architectures", []):
        from transformers import LlavaForConditionalGeneration
        full = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        model = full.model.language_model if hasattr(full, "model") else full.language_model
        model = getattr(model, "model", model)  # older layouts nest a CausalLM around the LlamaModel
        del full
    else:
        model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tokenizer = _load_tokenizer(Path(tokenizer) if tokenizer is not None else path, LLM_LAYOUT)
    encoder = TextEncoder(model, tokenizer, "llm", max_length,
                          template=PROMPT_TEMPLATE["dit-llm-encode-video"] if template is None else template,
                          hidden_state_skip_layer=hidden_state_skip_layer, apply_final_norm=apply_final_norm)
    return encoder.to(device)


def load_clip_encoder(path: str = "ckpts/text_encoder_2", dtype: torch.dtype = torch.float16, device="cpu",
                      max_length: int = 77, tokenizer: str | Path | None = None) -> TextEncoder:
    """CLIP-L's text tower from a local folder (never downloads); the vision tower is not loaded.
    ``tokenizer``: the tokenizer's folder when it is not ``path`` (diffusers: tokenizer_2/)."""
    from transformers import CLIPTextModel

    path = Path(path)
    _read_config(path, "CLIP text encoder", CLIP_LAYOUT)
    model = CLIPTextModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tokenizer = _load_tokenizer(Path(tokenizer) if tokenizer is not None else path, CLIP_LAYOUT)
    return TextEncoder(model, tokenizer, "clip", max_length).to(device)


def tiny_llm_encoder(tokenizer=None, hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = 0,
                     template: dict | None = None, max_length: int = 256, hidden_state_skip_layer: int = 2) -> TextEncoder:
    """A random-weight Llama of the real architecture, small enough for CPU tests and the toy model.

    ``tokenizer`` defaults to the real Llama-3 tokenizer (the embedding is then 128,256 x hidden);
    ``template`` to ``PROMPT_TEMPLATE["dit-llm-encode-video"]``. The same seed gives the same weights.
    """
    from transformers import LlamaConfig, LlamaModel
    from .prompts import PROMPT_TEMPLATE
    from .tokenizers import llama3_tokenizer

    tokenizer = llama3_tokenizer() if tokenizer is None else tokenizer
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(4096, 2 * max_length),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaModel(config)
    return TextEncoder(model, tokenizer, "llm", max_length,
                       template=PROMPT_TEMPLATE["dit-llm-encode-video"] if template is None else template,
                       hidden_state_skip_layer=min(hidden_state_skip_layer, layers - 1))


def tiny_clip_encoder(tokenizer=None, hidden: int = 32, layers: int = 2, seed: int = 0, max_length: int = 77,
                      heads: int = 2) -> TextEncoder:
    """A random-weight CLIPTextModel; ``tokenizer`` defaults to the real CLIP tokenizer.

    The config's eos_token_id is the tokenizer's, so even ``model(...).pooler_output`` picks the right
    position (transformers' legacy "argmax id" rule applies only when eos_token_id == 2).
    """
    from transformers import CLIPTextConfig, CLIPTextModel
    from .tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer() if tokenizer is None else tokenizer
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return TextEncoder(model, tokenizer, "clip", max_length)


def embedded_guidance(scale: float, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1, device=None) -> torch.Tensor:
    """The guidance value the distilled DiT is given: ``scale * 1000`` computed in ``dtype``. (batch_size,)

    HunyuanVideo was guidance-distilled: instead of running the DiT twice (classifier-free guidance),
    the guidance strength is an input, embedded like the timestep. The official code casts the scale
    to the model dtype (bf16) *before* multiplying by 1000, so the product is rounded to bf16's 8
    significant bits: between 4096 and 8192 bf16 values are 32 apart, and 6000 rounds to **6016**.
    The released model was trained with these rounded values; hvlab reproduces them rather than
    "fixing" them.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number (official default {RELEASE_DEFAULTS['embedded_guidance_scale']}), "
                        f"got {type(scale).__name__}")
    return torch.full((batch_size,), float(scale), dtype=torch.float32, device=device).to(dtype) * 1000.0
