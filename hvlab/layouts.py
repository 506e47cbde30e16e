"""Checkpoint layouts: the shapes HunyuanVideo arrives in on disk, which one a path is, and reading each lazily.

The same numbers are published in four shapes (docs/checkpoints.md lists every name, prefix and dtype, with
sources):

* **official** -- Tencent's ``ckpts/`` folder (`RELEASE_FILES`): the DiT as a torch pickle
  (weights under ``"module"``, official names), or the FP8 pair with its scale map; the VAE as
  ``pytorch_model.pt`` + ``config.json``; both text encoders as Hugging Face folders.
* **diffusers** -- a ``HunyuanVideoPipeline`` folder: ``model_index.json``; ``transformer/`` (config.json and
  sharded safetensors with an index, diffusers names: q, k, v unfused); ``vae/`` (same names as the release);
  ``text_encoder/`` + ``tokenizer/`` (a LlamaModel) and ``text_encoder_2/`` + ``tokenizer_2/`` (CLIPTextModel).
* **single files** -- one .safetensors per component, as ComfyUI users download them: a DiT under official
  names (maybe prefixed ``model.diffusion_model.``) in bf16 or FP8 e4m3 (no scales, or ComfyUI's
  ``scale_weight`` ones), a VAE under release names, ``llava_llama3`` (``model.``-prefixed Llama names, fp16 or
  scaled fp8) and ``clip_l`` (``text_model.`` names). A folder of them, or each given on its own.

`detect_layout` says which one a path is (or assembles one from per-component paths) and what it found, as a
`Layout` of four `Component`s; `hvlab.readers` reads each component into hvlab's models, `hvlab.convert`
writes them in another layout.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import read_safetensors_header

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
# A key every file of a component has, whatever prefix it carries; CLIP before the LLM (its layers also end in
# "layers.0.self_attn.q_proj.weight"). The DiT's second key is diffusers' name for the same tensor.
SIGNATURES = (
    ("dit", "txt_in.individual_token_refiner.blocks.0.norm1.weight"),
    ("dit", "context_embedder.token_refiner.refiner_blocks.0.norm1.weight"),
    ("vae", "decoder.conv_in.conv.weight"),
    ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1.weight"),
    ("text_encoder", "layers.0.self_attn.q_proj.weight"),
)
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


def diffusers_shards(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    return sorted(folder.glob("*.safetensors"))


def _diffusers_detail(folder: Path) -> str:
    shards = diffusers_shards(folder)
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
    if (base / "transformer" / "config.json").is_file() and diffusers_shards(base / "transformer"):
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
