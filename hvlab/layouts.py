"""Checkpoint layouts: the shapes HunyuanVideo arrives in on disk, which one a path is, and reading each lazily.

The same numbers are published in four shapes (docs/checkpoints.md lists every name, prefix and dtype, with
sources):

* **official** -- Tencent's ``ckpts/`` folder (`hvlab.loading.RELEASE_FILES`): the DiT as a torch pickle
  (weights under ``"module"``, official names), or the FP8 pair with its scale map; the VAE as
  ``pytorch_model.pt`` + ``config.json``; both text encoders as Hugging Face folders.
* **diffusers** -- a ``HunyuanVideoPipeline`` folder: ``model_index.json``; ``transformer/`` (config.json and
  sharded safetensors with an index, diffusers names: q, k, v unfused); ``vae/`` (same names as the release);
  ``text_encoder/`` + ``tokenizer/`` (a LlamaModel) and ``text_encoder_2/`` + ``tokenizer_2/`` (CLIPTextModel).
* **single files** -- one .safetensors per component, as ComfyUI users download them: a DiT under official
  names (maybe prefixed ``model.diffusion_model.``) in bf16 or FP8 e4m3 (no scales, or ComfyUI's
  ``scale_weight`` ones), a VAE under release names, ``llava_llama3`` (``model.``-prefixed Llama names, fp16 or
  scaled fp8) and ``clip_l`` (``text_model.`` names). A folder of them, or each given on its own.

`detect_layout` says which one a path is (or assembles one from per-component paths) and what it found;
``load_dit`` / ``load_vae`` / ``load_text_encoder`` build each model on the meta device and assign its tensors
from memory-mapped files, shard by shard (`hvlab.checkpoint.assign_tensors`), checking names and shapes from
the headers before any weight is read. Configs come from the layout when it has them (diffusers config.json,
hvlab's own metadata in files it wrote), else from the tensor shapes with the release's constants.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .checkpoint import (CheckpointError, assign_tensors, check_state_dict_keys, iter_diffusers_to_official,
                         iter_safetensors, load_state_dict_file, meta_tensors, read_safetensors_header)

COMPONENTS = ("dit", "vae", "text_encoder", "text_encoder_2")
LAYOUTS = {  # what detect_layout can read, in the words its errors use
    "official": "the release's ckpts/ folder: hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt "
                "(or the _fp8.pt + _fp8_map.pt pair), hunyuan-video-t2v-720p/vae/{config.json,pytorch_model.pt}, "
                "text_encoder/, text_encoder_2/",
    "diffusers": "a diffusers HunyuanVideoPipeline folder: model_index.json, transformer/ (config.json + "
                 "diffusion_pytorch_model*.safetensors), vae/, text_encoder/ + tokenizer/, "
                 "text_encoder_2/ + tokenizer_2/",
    "single-files": "a folder of .safetensors files, one per component, recognised by their keys (ComfyUI's "
                    "hunyuan_video_*.safetensors DiT in bf16 or fp8, hunyuan_video_vae_*.safetensors, "
                    "llava_llama3_*.safetensors, clip_l.safetensors)",
    "components": "each component given on its own (a file or folder): load_pipeline(dit=..., vae=..., "
                  "text_encoder=..., text_encoder_2=...), hvlab convert --dit/--vae/--text-encoder/--text-encoder-2",
}
METADATA_KEY = "hvlab_config"  # safetensors metadata hvlab writes: the component's config as JSON
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# A key every file of a component has, whatever prefix it carries; CLIP before the LLM (its layers also end in
# "layers.0.self_attn.q_proj.weight"). The DiT's second key is diffusers' name for the same tensor.
SIGNATURES = (
    ("dit", "txt_in.individual_token_refiner.blocks.0.norm1.weight"),
    ("dit", "context_embedder.token_refiner.refiner_blocks.0.norm1.weight"),
    ("vae", "decoder.conv_in.conv.weight"),
    ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1.weight"),
    ("text_encoder", "layers.0.self_attn.q_proj.weight"),
)
# Keys single text-encoder files may carry that hvlab's models do not use: the LM head, CLIP's projection
# (CLIPTextModel has none), a legacy position-id buffer.
UNUSED_KEYS = ("lm_head.weight", "text_projection.weight", "logit_scale", "text_model.embeddings.position_ids",
               "embeddings.position_ids")


# ----------------------------------------------------------------------------- the official layout
RELEASE_DIT_DIR = "hunyuan-video-t2v-720p/transformers"
RELEASE_FILES = {  # what `load_pipeline` needs under model_base (the official ckpts/ layout)
    "dit": f"{RELEASE_DIT_DIR}/mp_rank_00_model_states.pt",
    "dit_fp8": f"{RELEASE_DIT_DIR}/mp_rank_00_model_states_fp8.pt",
    "dit_fp8_map": f"{RELEASE_DIT_DIR}/mp_rank_00_model_states_fp8_map.pt",
    "vae_config": "hunyuan-video-t2v-720p/vae/config.json",
    "vae": "hunyuan-video-t2v-720p/vae/pytorch_model.pt",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
}


class CheckpointLayoutError(FileNotFoundError):
    """A path (or set of component paths) that is no layout hvlab reads; the message lists the layouts it
    reads and what was found."""


def _listing(base: Path, depth: int = 3, limit: int = 40) -> list[str]:
    found = []
    for root, dirs, files in os.walk(base):
        rel = Path(root).relative_to(base)
        if len(rel.parts) >= depth:
            dirs[:] = []
        dirs.sort()
        found += [str(rel / n) + ("/" if n in dirs else "") for n in sorted(dirs) + sorted(files)]
        if len(found) > limit:
            return found[:limit] + ["..."]
    return found


def check_release_layout(model_base, fp8: bool = False) -> dict[str, Path]:
    """Paths of the release files under ``model_base``; raises `CheckpointLayoutError` naming what is missing."""
    base = Path(model_base)
    p = {k: base / v for k, v in RELEASE_FILES.items()}
    has_bf16 = p["dit"].is_file()
    has_fp8 = p["dit_fp8"].is_file() and p["dit_fp8_map"].is_file()
    missing = [] if has_bf16 or has_fp8 else [RELEASE_FILES["dit"] + (" (or the _fp8.pt + _fp8_map.pt pair)")]
    missing += [RELEASE_FILES[k] for k in ("vae_config", "vae", "text_encoder", "text_encoder_2") if not p[k].is_file()]
    if missing:
        expected = "\n  ".join(f"{v}" for v in RELEASE_FILES.values())
        found = "\n  ".join(_listing(base)) if base.is_dir() else "(the folder does not exist)"
        raise CheckpointLayoutError(
            f"{base} is not the HunyuanVideo release layout: missing {missing}.\nExpected under {base}:\n  {expected}\n"
            f"Found:\n  {found or '(empty)'}\nDownload the release into this layout (see the official README's "
            f"ckpts/ section), or pass --model toy for the shipped toy model.")
    p["use_fp8_file"] = has_fp8 and (fp8 or not has_bf16)
    return p


@dataclass
class Component:
    role: str              # one of COMPONENTS
    path: Path             # a file or a folder
    format: str            # "official", "official-fp8", "diffusers", "safetensors" or "transformers" (HF folder)
    prefix: str = ""       # removed from every key (single files: "model.diffusion_model.", "model.", ...)
    tokenizer: Path | None = None  # text encoders: the tokenizer folder (None: hvlab's built-in one)
    detail: str = ""       # what was found, for the layout's description

    def __str__(self) -> str:
        return f"{self.role}: {self.path} ({self.detail or self.format})"


@dataclass
class Layout:
    kind: str                                   # a key of LAYOUTS
    root: Path | None                           # the folder it was found in
    components: dict[str, Component] = field(default_factory=dict)

    def __str__(self) -> str:
        where = f" in {self.root}" if self.root else ""
        return f"{self.kind} layout{where}: " + "; ".join(str(c) for c in self.components.values())


# ----------------------------------------------------------------------------------------------- detection
def classify_safetensors(path: str | os.PathLike) -> tuple[str, str] | None:
    """(component, key prefix) of a single .safetensors file from its header, or None if it is none of them."""
    header, _ = read_safetensors_header(path)
    for role, signature in SIGNATURES:
        for key in header:
            if key.endswith(signature):
                return role, key[: -len(signature)]
    return None


def _describe_file(path: Path, prefix: str) -> str:
    header, meta = read_safetensors_header(path)
    dtypes = sorted({str(d).removeprefix("torch.") for d, _ in header.values()})
    scaled = any(k.endswith(".scale_weight") for k in header)
    return (f"single file, {len(header)} tensors, {'/'.join(dtypes)}" + (", scaled fp8" if scaled else "")
            + (f", prefix {prefix!r}" if prefix else ""))


def _single_file(role: str, path: Path) -> Component:
    found = classify_safetensors(path)
    if found is None or found[0] != role:
        what = f"a {found[0]} file" if found else "no HunyuanVideo component (none of its signature keys)"
        raise CheckpointLayoutError(f"{path} was given as the {role} but its keys make it {what}; expected keys such as "
                          f"{[s for r, s in SIGNATURES if r == role]}")
    return Component(role, path, "safetensors", prefix=found[1], tokenizer=_tokenizer_beside(role, path),
                     detail=_describe_file(path, found[1]))


TOKENIZER_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # diffusers' names


def _tokenizer_beside(role: str, path: Path) -> Path | None:
    """A single text-encoder file's tokenizer: ``tokenizer/`` (LLM) or ``tokenizer_2/`` (CLIP) beside it (hvlab
    convert writes them), else None: hvlab's built-in Llama-3 / CLIP tokenizer is used."""
    folder = path.parent / TOKENIZER_FOLDERS.get(role, "")
    return folder if role in TOKENIZER_FOLDERS and (folder / "tokenizer_config.json").is_file() else None


def _hf_folder(role: str, path: Path, tokenizer: Path | None = None) -> Component:
    if not (path / "config.json").is_file():
        raise CheckpointLayoutError(f"{path} was given as the {role} but holds no config.json (a Hugging Face folder) "
                          f"and is not a .safetensors file")
    tok = tokenizer if tokenizer is not None else path
    return Component(role, path, "transformers", tokenizer=tok, detail="Hugging Face folder")


def component_from_path(role: str, path: str | os.PathLike) -> Component:
    """One component given on its own: a .safetensors file, a Hugging Face folder (text encoders), a release
    file (DiT .pt, the VAE folder) or a diffusers subfolder (transformer/, vae/)."""
    if role not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {role!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointLayoutError(f"{role}: {path} does not exist")
    if path.is_file() and path.suffix == ".safetensors":
        return _single_file(role, path)
    if role == "dit":
        if path.is_file():  # an official pickle, or the fp8 one with its _map beside it
            if path.name.endswith("_fp8.pt"):
                return Component(role, path, "official-fp8", detail="official FP8 pair")
            return Component(role, path, "official", detail="official torch pickle")
        if (path / "config.json").is_file():
            return Component(role, path, "diffusers", detail=_diffusers_detail(path))
    elif role == "vae" and path.is_dir() and (path / "config.json").is_file():
        fmt = "official" if list(path.glob("*.pt")) else "diffusers"
        return Component(role, path, fmt, detail=f"{fmt} VAE folder")
    elif role.startswith("text_encoder") and path.is_dir():
        return _hf_folder(role, path)
    raise CheckpointLayoutError(f"{role}: cannot read {path}; expected a .safetensors file"
                      + {"dit": ", mp_rank_00_model_states(_fp8).pt or a diffusers transformer/ folder",
                         "vae": " or a VAE folder with config.json"}.get(role, " or a Hugging Face folder"))


def _diffusers_shards(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    return sorted(folder.glob("*.safetensors"))


def _diffusers_detail(folder: Path) -> str:
    shards = _diffusers_shards(folder)
    return f"diffusers folder, {len(shards)} shard{'s' * (len(shards) != 1)}"


def _official(base: Path, prefer_fp8: bool = False) -> dict[str, Component]:
    found = {}
    dit, fp8 = base / RELEASE_FILES["dit"], base / RELEASE_FILES["dit_fp8"]
    if dit.is_file() and not (prefer_fp8 and fp8.is_file() and (base / RELEASE_FILES["dit_fp8_map"]).is_file()):
        found["dit"] = Component("dit", dit, "official", detail="official torch pickle")
    elif fp8.is_file() and (base / RELEASE_FILES["dit_fp8_map"]).is_file():
        found["dit"] = Component("dit", fp8, "official-fp8", detail="official FP8 pair")
    vae = base / RELEASE_FILES["vae"]
    if vae.is_file() and (base / RELEASE_FILES["vae_config"]).is_file():
        found["vae"] = Component("vae", vae.parent, "official", detail="official VAE folder")
    for role in ("text_encoder", "text_encoder_2"):
        if (base / RELEASE_FILES[role]).is_file():
            found[role] = Component(role, base / role, "transformers", tokenizer=base / role,
                                    detail="Hugging Face folder")
    return found


def _diffusers(base: Path) -> dict[str, Component]:
    found = {}
    if (base / "transformer" / "config.json").is_file() and _diffusers_shards(base / "transformer"):
        found["dit"] = Component("dit", base / "transformer", "diffusers", detail=_diffusers_detail(base / "transformer"))
    if (base / "vae" / "config.json").is_file() and list((base / "vae").glob("*.safetensors")):
        found["vae"] = Component("vae", base / "vae", "diffusers", detail="diffusers VAE folder")
    for role, tok in TOKENIZER_FOLDERS.items():
        if (base / role / "config.json").is_file() and (base / tok).is_dir():
            found[role] = Component(role, base / role, "transformers", tokenizer=base / tok,
                                    detail=f"Hugging Face folder + {tok}/")
    return found


def _classify_folder(folder: Path) -> Component | None:
    """A Hugging Face / diffusers model folder met inside a folder of single files (ComfyUI users keep e.g.
    llava-llama-3-8b-text-encoder-tokenizer/ there): which component its config.json says it is, if any."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name, kind = raw.get("_class_name") or (raw.get("architectures") or [""])[0], raw.get("model_type", "")
    if name == "HunyuanVideoTransformer3DModel":
        return Component("dit", folder, "diffusers", detail=_diffusers_detail(folder))
    if name == "AutoencoderKLHunyuanVideo":
        return Component("vae", folder, "diffusers", detail="diffusers VAE folder")
    role = "text_encoder" if kind in ("llama", "llava") else "text_encoder_2" if kind.startswith("clip") else None
    return None if role is None else Component(role, folder, "transformers", tokenizer=folder,
                                               detail=f"Hugging Face folder ({kind})")


def _single_files(base: Path) -> tuple[dict[str, Component], dict[str, list[Path]], list[Path]]:
    """The components of a folder of single files: (one per role, roles with several candidates, unknown files).
    Files inside a model folder (one with a config.json) count as that folder."""
    by_role: dict[str, list[Component]] = {}
    unknown, folders = [], {}
    for f in sorted(base.rglob("*.safetensors")):
        rel = f.relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        owner = next((base / Path(*rel.parts[:i]) for i in range(1, len(rel.parts))
                      if (base / Path(*rel.parts[:i]) / "config.json").is_file()), None)
        if owner is not None:
            if owner not in folders:
                folders[owner] = c = _classify_folder(owner)
                if c is not None:
                    by_role.setdefault(c.role, []).append(c)
            continue
        found = classify_safetensors(f)
        if found is None:
            unknown.append(f)
        else:
            role, prefix = found
            by_role.setdefault(role, []).append(Component(role, f, "safetensors", prefix=prefix,
                                                          tokenizer=_tokenizer_beside(role, f),
                                                          detail=_describe_file(f, prefix)))
    one = {r: cs[0] for r, cs in by_role.items() if len(cs) == 1}
    return one, {r: [c.path for c in cs] for r, cs in by_role.items() if len(cs) > 1}, unknown


def _listing_with_roles(base: Path) -> str:
    lines = []
    for rel in _listing(base):
        p = base / rel
        if p.suffix == ".safetensors" and p.is_file():
            found = classify_safetensors(p)
            rel += f"  <- {found[0]} file" if found else "  <- not a HunyuanVideo component"
        lines.append(rel)
    return "\n  ".join(lines) or "(empty)"


def _readable_layouts() -> str:
    return "\n".join(f"  {k}: {v}" for k, v in LAYOUTS.items())


def detect_layout(path: str | os.PathLike | None = None, prefer_fp8: bool = False,
                  **components: str | os.PathLike | None) -> Layout:
    """Which layout ``path`` is, with every component found; ``components`` (dit=, vae=, text_encoder=,
    text_encoder_2=) give or replace single components. ``prefer_fp8`` picks the official FP8 pair when the
    release folder has both DiT files. Raises `CheckpointLayoutError` listing the layouts hvlab reads and what
    was found when the four components are not all there."""
    unknown_roles = set(components) - set(COMPONENTS)
    if unknown_roles:
        raise ValueError(f"unknown components {sorted(unknown_roles)}: expected {COMPONENTS}")
    given = {r: component_from_path(r, p) for r, p in components.items() if p is not None}
    if path is None:
        layout = Layout("components", None)
    else:
        base = Path(path)
        if base.is_file():  # one file: the DiT (the others must be given)
            given.setdefault("dit", component_from_path("dit", base))
            layout = Layout("components", None)
        elif not base.is_dir():
            raise CheckpointLayoutError(f"{base} is not the HunyuanVideo release layout nor another layout hvlab reads: "
                              f"the folder does not exist. hvlab reads:\n{_readable_layouts()}")
        elif (base / "model_index.json").is_file():
            layout = Layout("diffusers", base, _diffusers(base))
        elif (base / "hunyuan-video-t2v-720p").is_dir():
            layout = Layout("official", base, _official(base, prefer_fp8))
        else:
            one, several, _ = _single_files(base)
            if several:
                choices = "; ".join(f"{r}: {', '.join(str(f) for f in fs)}" for r, fs in several.items())
                raise CheckpointLayoutError(f"{base} holds several files for one component ({choices}): pass the one to "
                                  f"use on its own, e.g. load_pipeline({str(base)!r}, dit=...) / --dit PATH")
            layout = Layout("single-files", base, one)
    layout.components.update(given)
    if given and layout.kind != "components" and set(given) != set(COMPONENTS):
        layout.kind += " + components"
    missing = [r for r in COMPONENTS if r not in layout.components]
    if missing:
        where = f"{layout.root}" if layout.root else "the components given"
        found = (_listing_with_roles(layout.root) if layout.root else
                 "\n  ".join(str(c) for c in layout.components.values()) or "(nothing)")
        head = (f"{where} is not the HunyuanVideo release layout nor another layout hvlab reads"
                if not layout.components else f"{where} looks like the {layout.kind} layout but lacks {missing}")
        raise CheckpointLayoutError(f"{head}. hvlab reads:\n{_readable_layouts()}\nFound:\n  {found}\nGive a missing "
                          f"component on its own (e.g. text_encoder=PATH), or pass --model toy for the shipped "
                          f"toy model.")
    layout.components = {r: layout.components[r] for r in COMPONENTS}
    return layout


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
    files = _diffusers_shards(component.path) if component.format == "diffusers" else [component.path]
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
