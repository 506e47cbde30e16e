"""Reading each component of a checkpoint layout into hvlab's models, lazily (`hvlab.layouts` finds them).

``load_dit`` / ``load_vae`` / ``load_text_encoder`` build the model on the meta device and assign its tensors
from memory-mapped files, shard by shard (`hvlab.checkpoint.assign_tensors`), after checking every name and
shape against the files' headers, so a wrong file fails before a weight is read. Names are converted on the
way (diffusers -> official with `hvlab.checkpoint.DIT_KEY_RULES`, prefixes removed). Configs come from the
layout when it has them (diffusers config.json, the metadata of files hvlab wrote), else from the tensor shapes
and the release's constants, which single files do not store. FP8 weights: a DiT keeps them
(`hvlab.fast.fp8.FP8Linear`, the file's ``scale_weight`` or scale 1), a text encoder is dequantized.
docs/checkpoints.md says what each layout holds.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import asdict
from typing import Iterator

import torch
from torch import nn

from .checkpoint import (CheckpointError, assign_tensors, check_state_dict_keys, iter_diffusers_to_official,
                         iter_safetensors, load_state_dict_file, meta_tensors, read_safetensors_header)
from .layouts import TOKENIZER_FOLDERS, Component, diffusers_shards

METADATA_KEY = "hvlab_config"  # safetensors metadata hvlab writes: the component's config as JSON
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Keys single text-encoder files may carry that hvlab's models do not use: the LM head, CLIP's projection
# (CLIPTextModel has none), a legacy position-id buffer.
UNUSED_KEYS = ("lm_head.weight", "text_projection.weight", "logit_scale", "text_model.embeddings.position_ids",
               "embeddings.position_ids")


# ---------------------------------------------------------------------------------------------- configs
def _metadata_config(component: Component) -> dict | None:
    if component.format != "safetensors":
        return None
    _, meta = read_safetensors_header(component.path)
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def _strip(header: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def dit_config_from_shapes(shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
    """An `hvlab.model.HYVideoConfig` from official-named tensor shapes. The head dim is the q-norm's width;
    RoPE's split and base are not in the shapes: the release's (16, 56, 56) and 256 are used, so a head dim
    other than 128 needs the config given (``dit_config=``)."""
    from .model import HYVIDEO_T2_CONFIG, HYVideoConfig

    s = {k: shape for k, (_, shape) in shapes.items()}
    try:
        hidden, in_ch, *patch = s["img_in.proj.weight"]
        head_dim = (s.get("double_blocks.0.img_attn_q_norm.weight") or s["single_blocks.0.q_norm.weight"])[0]
        mlp = (s.get("double_blocks.0.img_mlp.fc1.weight") or (s["single_blocks.0.linear1.weight"][0] - 3 * hidden,))
    except KeyError as e:
        raise CheckpointError(f"cannot infer the DiT config: no {e.args[0]} among the tensors") from e
    if head_dim != HYVIDEO_T2_CONFIG.head_dim:
        raise CheckpointError(f"the DiT's head dim is {head_dim}, not the release's 128: its RoPE split is not "
                              f"in the file, so pass its config (dit_config=HYVideoConfig(...))")
    return HYVideoConfig(
        in_channels=in_ch, out_channels=s["final_layer.linear.weight"][0] // (patch[0] * patch[1] * patch[2]),
        patch_size=tuple(patch), hidden_size=hidden, heads_num=hidden // head_dim, mlp_width_ratio=mlp[0] / hidden,
        mm_double_blocks_depth=_count(s, r"double_blocks\.(\d+)\."),
        mm_single_blocks_depth=_count(s, r"single_blocks\.(\d+)\."),
        rope_dim_list=HYVIDEO_T2_CONFIG.rope_dim_list, rope_theta=HYVIDEO_T2_CONFIG.rope_theta,
        qkv_bias="double_blocks.0.img_attn_qkv.bias" in s or not _count(s, r"double_blocks\.(\d+)\."),
        text_states_dim=s["txt_in.input_embedder.weight"][1], text_states_dim_2=s["vector_in.in_layer.weight"][1],
        guidance_embed="guidance_in.mlp.0.weight" in s,
        refiner_depth=_count(s, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."))


def dit_config_from_diffusers(raw: dict):
    """`HYVideoConfig` from a diffusers transformer/config.json (HunyuanVideoTransformer3DModel's arguments)."""
    from .model import HYVideoConfig

    if raw.get("qk_norm", "rms_norm") != "rms_norm" or raw.get("image_condition_type"):
        raise CheckpointError(f"transformer/config.json: qk_norm={raw.get('qk_norm')!r}, image_condition_type="
                              f"{raw.get('image_condition_type')!r}; hvlab's DiT is the text-to-video one "
                              f"(rms_norm, no image condition)")
    p, pt = raw.get("patch_size", 2), raw.get("patch_size_t", 1)
    return HYVideoConfig(
        in_channels=raw.get("in_channels", 16), out_channels=raw.get("out_channels", 16), patch_size=(pt, p, p),
        hidden_size=raw.get("num_attention_heads", 24) * raw.get("attention_head_dim", 128),
        heads_num=raw.get("num_attention_heads", 24), mlp_width_ratio=raw.get("mlp_ratio", 4.0),
        mm_double_blocks_depth=raw.get("num_layers", 20), mm_single_blocks_depth=raw.get("num_single_layers", 40),
        rope_dim_list=tuple(raw.get("rope_axes_dim", (16, 56, 56))), rope_theta=raw.get("rope_theta", 256.0),
        text_states_dim=raw.get("text_embed_dim", 4096), text_states_dim_2=raw.get("pooled_projection_dim", 768),
        guidance_embed=raw.get("guidance_embeds", True), refiner_depth=raw.get("num_refiner_layers", 2))


def vae_config_from_shapes(shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
    """A `hvlab.vae.VAEConfig` from release-named VAE tensor shapes: widths and depths are read off the
    shapes; GroupNorm groups, compression ratios and the scaling factor are the release's (not in the shapes)."""
    from .vae import VAE_884_16C_HY_CONFIG as R, VAEConfig

    s = {k: shape for k, (_, shape) in shapes.items()}
    n = _count(s, r"encoder\.down_blocks\.(\d+)\.")
    widths = tuple(s[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in range(n))
    if any(w % R.norm_num_groups for w in widths):
        raise CheckpointError(f"VAE widths {widths} are not multiples of the release's {R.norm_num_groups} "
                              f"GroupNorm groups: pass its config (vae_config=VAEConfig(...))")
    return VAEConfig(**{**asdict(R), "in_channels": s["encoder.conv_in.conv.weight"][1],
                        "out_channels": s["decoder.conv_out.conv.weight"][0],
                        "latent_channels": s["decoder.conv_in.conv.weight"][1], "block_out_channels": widths,
                        "layers_per_block": _count(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in s})


# llava-llama-3-8b's language model and CLIP-L: what their single files do not say (transformers configs).
LLAMA3_CONSTANTS = dict(head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                        hidden_act="silu", tie_word_embeddings=False)
CLIP_L_CONSTANTS = dict(head_dim=64, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def text_config_from_shapes(role: str, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], tokenizer=None):
    """The transformers config of a single-file text encoder (keys without prefix): sizes from the shapes, heads
    = width / the release's head dim (Llama-3: 128, CLIP-L: 64), the rest the release's constants."""
    from transformers import CLIPTextConfig, LlamaConfig

    s = {k: shape for k, (_, shape) in shapes.items()}
    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)
    if role == "text_encoder":
        c = LLAMA3_CONSTANTS
        vocab, hidden = s["embed_tokens.weight"]
        q, kv = s["layers.0.self_attn.q_proj.weight"][0], s["layers.0.self_attn.k_proj.weight"][0]
        if q % c["head_dim"] or kv % c["head_dim"]:
            raise CheckpointError(f"LLM q/k widths {q}/{kv} are not multiples of Llama-3's head dim 128")
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=s["layers.0.mlp.gate_proj.weight"][0],
                           num_hidden_layers=_count(s, r"layers\.(\d+)\."), num_attention_heads=q // c["head_dim"],
                           num_key_value_heads=kv // c["head_dim"],
                           attention_bias="layers.0.self_attn.q_proj.bias" in s, **c, **ids)
    c = CLIP_L_CONSTANTS
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // c["head_dim"],
                          intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                          num_hidden_layers=_count(s, r"text_model\.encoder\.layers\.(\d+)\."),
                          max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
                          hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"], **ids)


def dit_config_for(component: Component, given=None):
    """The DiT's config: ``given``, else what the layout says (diffusers config.json, hvlab's metadata), else the
    release's for the official pickle, else inferred from a single file's shapes. Reads no weights."""
    from .model import HYVIDEO_T2_CONFIG, HYVideoConfig

    if given is not None:
        return given
    if component.format == "diffusers":
        return dit_config_from_diffusers(json.loads((component.path / "config.json").read_text()))
    if component.format in ("official", "official-fp8"):
        return HYVIDEO_T2_CONFIG  # the release's pickles carry no config; the official code hard-codes it
    meta = _metadata_config(component)
    if meta is not None:
        return HYVideoConfig(**meta)
    return dit_config_from_shapes(_dit_header(component))


# ------------------------------------------------------------------------------------------ the DiT
def _is_scale_key(key: str) -> bool:
    return key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8"


def _dit_header(component: Component) -> dict:
    """Official-named (dtype, shape) of a single-file or diffusers DiT, weights only, from the headers."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in _dit_items(component, meta=True) if not _is_scale_key(k)}


def _dit_items(component: Component, meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The DiT's tensors under official names (meta stand-ins when ``meta``), scale keys passed through."""
    if component.format == "official":
        sd = load_state_dict_file(component.path)  # memory-mapped pickle: nothing is read yet
        for k in list(sd):
            v = sd.pop(k)  # hand each tensor over, so a converted one's pages can be let go
            yield k, v.to("meta") if meta else v
        return
    files = diffusers_shards(component.path) if component.format == "diffusers" else [component.path]
    if meta:
        raw = (kv for f in files for kv in meta_tensors(read_safetensors_header(f)[0]).items())
    else:
        raw = iter_safetensors(files)
    p = component.prefix
    named = ((k[len(p):] if k.startswith(p) else k, v) for k, v in raw)
    if component.format == "diffusers" or _is_diffusers_named(component):
        yield from iter_diffusers_to_official(named)
    else:
        yield from named


def _is_diffusers_named(component: Component) -> bool:
    header, _ = read_safetensors_header(component.path)
    return any(k.startswith(component.prefix + "context_embedder.") for k in header)


def dit_is_fp8(component: Component) -> bool:
    """Whether the DiT's Linear weights are stored in FP8 (the memory plan counts them so). Reads headers only."""
    if component.format == "official-fp8":
        return True
    if component.format == "official":
        return False
    return any(d == torch.float8_e4m3fn for d, _ in _dit_header(component).values())


def load_dit(component: Component, config=None, device=None, dtype: torch.dtype | None = None,
             fp8_mode: str = "auto") -> nn.Module:
    """The DiT of any layout, built on the meta device and assigned tensor by tensor (``dtype`` None keeps the
    file's). Linear weights stored as FP8 e4m3 become `FP8Linear` layers: with the file's ``scale_weight``
    (ComfyUI's scaled fp8) or, without scales, scale 1 (a warning says so)."""
    from .fast.fp8 import FP8_DTYPE, load_fp8_checkpoint, make_fp8_layers, set_fp8_mode
    from .model import HYVideoDiffusionTransformer

    config = dit_config_for(component, config)
    what = f"DiT {component.path}"
    if component.format == "official-fp8":
        model = HYVideoDiffusionTransformer(config, device="meta", dtype=dtype or torch.bfloat16)
        return load_fp8_checkpoint(model, component.path, mode=fp8_mode, device=device)
    model = HYVideoDiffusionTransformer(config, device="meta")
    stand_ins = {k: v for k, v in _dit_items(component, meta=True) if not _is_scale_key(k)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp8 = {k[: -len(".weight")] for k, v in stand_ins.items()
           if v.dtype == FP8_DTYPE and k.endswith(".weight") and k[: -len(".weight")] in linears}
    make_fp8_layers(model, fp8, what)
    check_state_dict_keys(model.state_dict(), stand_ins, what)  # names and shapes, before any weight is read
    scales: dict[str, torch.Tensor] = {}

    def weights():
        for k, v in _dit_items(component):
            if k.endswith(".scale_weight"):
                scales[k[: -len(".scale_weight")]] = v.float()
            elif not _is_scale_key(k):  # .scale_input (an activation hint) and the scaled_fp8 marker: unused
                yield k, v

    assign_tensors(model, weights(), what, device=device, dtype=dtype, copy=component.format == "diffusers")
    if fp8:
        from .fast.fp8 import _as_scale

        for n in fp8:
            m = model.get_submodule(n)
            if n in scales:
                m.weight_scale = _as_scale(scales[n], m.out_features, f"{n}.scale_weight").to(m.weight.device)
            else:
                m.weight_scale = torch.ones((), device=m.weight.device)
        unscaled = sorted(fp8 - set(scales))
        if unscaled:
            warnings.warn(f"{component.path.name}: {len(unscaled)} Linear weights are float8_e4m3fn without scales "
                          f"(e.g. {unscaled[0]}); loaded as FP8 weights with scale 1, i.e. the stored values are "
                          f"the weights", stacklevel=2)
        set_fp8_mode(model, fp8_mode)
    upcast = sorted(k for k, v in stand_ins.items() if v.dtype in FP8_DTYPES and k[: -len(".weight")] not in fp8)
    if upcast:
        warnings.warn(f"{component.path.name}: {len(upcast)} FP8 tensors outside Linear layers (e.g. {upcast[0]}) "
                      f"were cast to {dtype or torch.bfloat16} (exact)", stacklevel=2)
    return model


# ------------------------------------------------------------------------------------------ the VAE
def vae_config_for(component: Component, given=None):
    from .vae import VAEConfig, vae_config_from_json

    if given is not None:
        return given
    if component.format in ("official", "diffusers"):
        return vae_config_from_json(component.path / "config.json")
    meta = _metadata_config(component)
    if meta is not None:
        return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})
    header, _ = read_safetensors_header(component.path)
    return vae_config_from_shapes(_strip(header, component.prefix))


def load_vae(component: Component, config=None, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal 3D VAE of any layout (its names are the same in all three), on the CPU."""
    from .vae import AutoencoderKLCausal3D

    model = AutoencoderKLCausal3D(vae_config_for(component, config), device="meta")
    what = f"VAE {component.path}"
    if component.format == "official":
        sd = load_state_dict_file(component.path, prefix="vae.")
        items = iter(sd.items())
    else:
        files = [component.path] if component.format == "safetensors" else sorted(component.path.glob("*.safetensors"))
        header = {k: v for f in files for k, v in read_safetensors_header(f)[0].items()}
        check_state_dict_keys(model.state_dict(), meta_tensors(_strip(header, component.prefix)), what)
        p = component.prefix
        items = ((k[len(p):], v) for k, v in iter_safetensors(files) if k.startswith(p))
    return assign_tensors(model, items, what, dtype=dtype).eval()


# -------------------------------------------------------------------------------------- the text encoders
@contextlib.contextmanager
def parameters_on_meta():
    """Build modules whose parameters live on the meta device while their buffers are computed for real.

    transformers models compute non-persistent buffers at construction (RoPE's inverse frequencies, CLIP's
    position ids) and no checkpoint holds them, so they must not be meta; the parameters are assigned from the
    file afterwards, so allocating them would only cost memory."""
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _text_prefix(component: Component, model_keys: set[str]) -> str:
    """What to strip from a single text-encoder file's keys to get the model's: the file's own prefix, plus
    ``text_model.`` for CLIP when the installed transformers names CLIPTextModel's tensors without it (v5)."""
    clip_flat = component.role == "text_encoder_2" and not any(k.startswith("text_model.") for k in model_keys)
    return component.prefix + ("text_model." if clip_flat else "")


def _text_items(component: Component, model_keys: set[str], scales: dict[str, torch.Tensor], meta: bool):
    """A single text-encoder file's tensors under transformers' names: prefix removed, unused keys dropped,
    FP8 weights dequantized (w_fp8 * scale_weight, or scale 1) so the transformers model gets plain floats."""
    p, strip = component.prefix, _text_prefix(component, model_keys)
    raw = meta_tensors(read_safetensors_header(component.path)[0]).items() if meta else iter_safetensors([component.path])
    for k, v in raw:
        rel = k[len(p):] if k.startswith(p) else k
        name = k[len(strip):] if k.startswith(strip) else rel
        if _is_scale_key(rel) or (name not in model_keys and (rel in UNUSED_KEYS or name in UNUSED_KEYS)):
            continue
        if v.dtype in FP8_DTYPES:
            v = v.to(torch.float32) if meta else v.float() * scales.get(name[: -len(".weight")], 1.0)
        yield name, v


def load_text_encoder(component: Component, dtype: torch.dtype | None = torch.float16, device="cpu"):
    """The LLM (role "text_encoder") or CLIP-L ("text_encoder_2") as an `hvlab.text_encoder.TextEncoder`, from a
    Hugging Face folder or a single .safetensors file. A single file brings no tokenizer: the one in
    ``component.tokenizer`` is used, else hvlab's built-in Llama-3 / CLIP tokenizer (`hvlab.tokenizers`)."""
    from .prompts import PROMPT_TEMPLATE
    from .text_encoder import TextEncoder, _load_tokenizer, load_clip_encoder, load_llm_encoder

    llm = component.role == "text_encoder"
    if component.format == "transformers":
        load = load_llm_encoder if llm else load_clip_encoder
        return load(str(component.path), dtype=dtype if dtype is not None else "auto", device=device,
                    tokenizer=component.tokenizer)  # "auto": the dtype the folder stores
    if component.tokenizer is not None:
        tokenizer = _load_tokenizer(component.tokenizer, "a tokenizer folder (tokenizer.json + tokenizer_config.json)")
    else:
        from .tokenizers import clip_tokenizer, llama3_tokenizer

        tokenizer = llama3_tokenizer() if llm else clip_tokenizer()
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    header, _ = read_safetensors_header(component.path)
    meta = _metadata_config(component)
    if meta is not None:
        config = (LlamaConfig if llm else CLIPTextConfig).from_dict(meta)
    else:
        shapes = {k: v for k, v in _strip(header, component.prefix).items() if not _is_scale_key(k)}
        config = text_config_from_shapes(component.role, shapes, tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{component.path}: its embedding has {config.vocab_size} rows but the tokenizer "
                              f"{'in ' + str(component.tokenizer) if component.tokenizer else '(hvlab built-in)'} "
                              f"has {len(tokenizer)} tokens: put the model's own tokenizer in "
                              f"{TOKENIZER_FOLDERS[component.role]}/ beside the file")
    with parameters_on_meta():
        model = (LlamaModel if llm else CLIPTextModel)(config)
    what = f"{component.role} {component.path}"
    keys = set(model.state_dict())
    check_state_dict_keys(model.state_dict(), dict(_text_items(component, keys, {}, meta=True)), what)
    strip = _text_prefix(component, keys)
    scales = {k[len(strip):-len(".scale_weight")]: v.float()
              for k, v in iter_safetensors([component.path]) if k.endswith(".scale_weight")}
    fp8 = [k for k, (d, _) in header.items() if d in FP8_DTYPES and not _is_scale_key(k)]
    if fp8 and len(scales) < len(fp8):
        warnings.warn(f"{component.path.name}: {len(fp8) - len(scales)} FP8 weights without scale_weight; "
                      f"dequantized with scale 1", stacklevel=2)
    if fp8 and dtype is None:
        dtype = torch.float16  # dequantized weights need a float dtype: the release's text encoder dtype
    assign_tensors(model, _text_items(component, keys, scales, meta=False), what, device=device, dtype=dtype)
    if llm:
        return TextEncoder(model, tokenizer, "llm", 256, template=PROMPT_TEMPLATE["dit-llm-encode-video"])
    return TextEncoder(model, tokenizer, "clip", 77)
