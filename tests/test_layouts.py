"""Checkpoint layouts (hvlab.layouts, hvlab.convert): a tiny model written in each layout loads through
`load_pipeline` to bit-identical outputs, conversions round-trip bit for bit, and diffusers reads the diffusers
folder hvlab writes.

The tiny model has the release's structure at small widths. Its text encoders follow the release constants that
single files do not store (Llama-3: head dim 128, RoPE base 500,000, RMSNorm eps 1e-5; CLIP-L: head dim 64,
quick-GELU), so a config inferred from a file's shapes is the real one; they use the toy's small vocabulary
(the real Llama-3 tokenizer takes seconds to load) in tokenizer folders. The ComfyUI-style files are written by
hand with the key names, prefixes and dtypes docs/checkpoints.md documents from ComfyUI, diffusion-pipe and
diffusers, and carry no hvlab metadata, so their configs come from shapes (the DiT's and VAE's tiny widths are
not the release's: those two configs are passed, as for the official pickles).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hvlab.checkpoint import CheckpointError, load_state_dict_file, save_safetensors
from hvlab.convert import convert, release_vae_config
from hvlab.fast.fp8 import FP8_DTYPE, FP8Linear, quantize_weight
from hvlab.layouts import LAYOUTS, RELEASE_FILES, CheckpointLayoutError, component_from_path, detect_layout
from hvlab.readers import (CLIP_L_CONSTANTS, LLAMA3_CONSTANTS, dit_config_from_shapes, load_dit, load_text_encoder,
                           text_config_from_shapes, vae_config_from_shapes)
from hvlab.loading import load_pipeline
from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoDiffusionTransformer, randomize_weights_
from hvlab.vae import TINY_VAE_CONFIG, VAE_884_16C_HY_CONFIG, AutoencoderKLCausal3D

DIT_CONFIG = replace(TINY_CONFIG, text_states_dim=128, text_states_dim_2=64)  # the tiny text encoders' widths
FP32 = dict(device="cpu", dtype=torch.float32, text_encoder_dtype=torch.float32, vae_dtype=torch.float32,
            vae_tiling=False)
GEN = dict(seed=1, height=64, width=64, video_length=9, num_inference_steps=2)
# What Kijai's ComfyUI-HunyuanVideoWrapper and diffusion-pipe keep in bf16 when they store the DiT as fp8:
# every weight whose name contains one of these (norms, biases, the embedders); all else becomes e4m3, unscaled.
KEEP_IN_BF16 = ("norm", "bias", "time_in", "vector_in", "guidance_in", "txt_in", "img_in")


def tiny_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from hvlab.toy.tokenizer import load_toy_tokenizer

    lt, ct = load_toy_tokenizer(), load_toy_tokenizer(kind="clip")
    ids = lambda t: dict(bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        llm = LlamaModel(LlamaConfig(vocab_size=len(lt), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                     num_attention_heads=1, num_key_value_heads=1, **LLAMA3_CONSTANTS, **ids(lt)))
        clip_constants = {k: v for k, v in CLIP_L_CONSTANTS.items() if k != "head_dim"}
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(ct), hidden_size=64, intermediate_size=256,
                                            num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                                            **clip_constants, **ids(ct)))
    return llm.half(), lt, clip.half(), ct


def write_official(base: Path, dit, vae, llm, lt, clip, ct) -> Path:
    """The release's ckpts/ layout, as Tencent ships it."""
    for key in ("dit", "vae"):
        (base / RELEASE_FILES[key]).parent.mkdir(parents=True)
    torch.save({"module": dit.state_dict()}, base / RELEASE_FILES["dit"])
    torch.save({"state_dict": {"vae." + k: v for k, v in vae.state_dict().items()}}, base / RELEASE_FILES["vae"])
    (base / RELEASE_FILES["vae_config"]).write_text(json.dumps(release_vae_config(vae.config)))
    for model, tok, name in ((llm, lt, "text_encoder"), (clip, ct, "text_encoder_2")):
        model.save_pretrained(base / name)
        tok.save_pretrained(base / name)
    return base


def write_comfyui(base: Path, dit, vae, llm, lt, clip, ct) -> Path:
    """ComfyUI-style single files, key names and dtypes as the public loaders read them (no hvlab metadata).
    The one addition: the toy tokenizers in tokenizer/ and tokenizer_2/ beside them (ComfyUI bundles the real
    ones, which hvlab builds when no folder is there; the tiny vocabulary needs its own)."""
    base.mkdir()
    lt.save_pretrained(base / "tokenizer")
    ct.save_pretrained(base / "tokenizer_2")
    sd = dit.state_dict()
    save_safetensors({"model.diffusion_model." + k: v for k, v in sd.items()},
                     str(base / "hunyuan_video_t2v_720p_bf16.safetensors"))
    fp8 = {k: v if any(s in k for s in KEEP_IN_BF16) or v.dim() != 2 else v.to(FP8_DTYPE) for k, v in sd.items()}
    save_safetensors(fp8, str(base / "hunyuan_video_720_cfgdistill_fp8_e4m3fn.safetensors"))
    save_safetensors({k: v.bfloat16() for k, v in vae.state_dict().items()}, str(base / "hunyuan_video_vae_bf16.safetensors"))
    lsd = {"model." + k: v for k, v in llm.state_dict().items()}
    save_safetensors(dict(lsd, **{"lm_head.weight": llm.state_dict()["embed_tokens.weight"].clone()}),
                     str(base / "llava_llama3_fp16.safetensors"))
    scaled = {"scaled_fp8": torch.empty(0, dtype=FP8_DTYPE)}
    for k, v in lsd.items():
        if k.endswith("proj.weight"):  # every Linear of the decoder layers, one scale each
            scaled[k], scaled[k[: -len("weight")] + "scale_weight"] = quantize_weight(v)
        else:
            scaled[k] = v
    save_safetensors(scaled, str(base / "llava_llama3_fp8_scaled.safetensors"))
    csd = clip.state_dict()
    prefix = "" if next(iter(csd)).startswith("text_model.") else "text_model."  # the file keeps transformers-4 names
    save_safetensors(dict({prefix + k: v for k, v in csd.items()}, **{"text_projection.weight": torch.eye(64).half()}),
                     str(base / "clip_l.safetensors"))
    return base


@pytest.fixture(scope="module")
def models():
    dit = randomize_weights_(HYVideoDiffusionTransformer(DIT_CONFIG), seed=3).to(torch.bfloat16).eval()
    vae = randomize_weights_(AutoencoderKLCausal3D(TINY_VAE_CONFIG), seed=4).eval()
    return (dit, vae, *tiny_text_encoders())


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    dit, vae, llm, lt, clip, ct = models
    official = write_official(root / "official", dit, vae, llm, lt, clip, ct)
    comfy = write_comfyui(root / "comfyui", dit, vae, llm, lt, clip, ct)
    out = {"official": official, "comfyui": comfy}
    for to in ("diffusers", "single"):
        convert(official, root / to, to, dit_config=DIT_CONFIG)
        out[to] = root / to
    return out


def comfy_components(folders, dit="hunyuan_video_t2v_720p_bf16.safetensors", llm="llava_llama3_fp16.safetensors"):
    c = folders["comfyui"]
    return dict(dit=c / dit, vae=c / "hunyuan_video_vae_bf16.safetensors", text_encoder=c / llm,
                text_encoder_2=c / "clip_l.safetensors")


def dit_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    return (torch.randn(1, 16, 3, 4, 6, generator=g, dtype=dtype), torch.tensor([937.5], dtype=dtype),
            torch.randn(1, 7, 128, generator=g, dtype=dtype), mask, torch.randn(1, 64, generator=g, dtype=dtype),
            torch.tensor([6016.0], dtype=dtype))


@torch.no_grad()
def dit_out(model):
    return model(*dit_inputs())


@pytest.fixture(scope="module")
def official_pipe(folders):
    return load_pipeline(folders["official"], dit_config=DIT_CONFIG, **FP32)


def test_each_layout_is_detected_and_says_what_it_found(folders):
    kinds = {name: detect_layout(path) for name, path in folders.items() if name != "comfyui"}
    assert {n: lay.kind for n, lay in kinds.items()} == {"official": "official", "diffusers": "diffusers",
                                                         "single": "single-files"}
    assert kinds["diffusers"].components["dit"].format == "diffusers"
    assert [c.format for c in kinds["single"].components.values()] == ["safetensors"] * 4
    assert kinds["single"].components["text_encoder"].prefix == "model."  # ComfyUI's llava_llama3 naming
    assert kinds["single"].components["text_encoder"].tokenizer == folders["single"] / "tokenizer"
    text = str(kinds["diffusers"])
    assert text.startswith(f"diffusers layout in {folders['diffusers']}") and "transformer (diffusers folder" in text
    # the ComfyUI folder holds two DiTs and two LLMs: it names them and asks which
    with pytest.raises(CheckpointLayoutError, match="several files for one component") as err:
        detect_layout(folders["comfyui"])
    assert "hunyuan_video_720_cfgdistill_fp8_e4m3fn.safetensors" in str(err.value)
    assert "llava_llama3_fp8_scaled.safetensors" in str(err.value)
    # a ComfyUI models/ tree: one file per component, the LLM as a Hugging Face folder, a LoRA beside
    tree = folders["comfyui"].parent / "comfy_models"
    for sub in ("diffusion_models", "vae", "text_encoders/llava-llama-3-8b-text-encoder-tokenizer", "loras"):
        (tree / sub).mkdir(parents=True)
    for f, sub in (("hunyuan_video_t2v_720p_bf16.safetensors", "diffusion_models"),
                   ("hunyuan_video_vae_bf16.safetensors", "vae"), ("clip_l.safetensors", "text_encoders")):
        (tree / sub / f).symlink_to(folders["comfyui"] / f)
    for f in (folders["official"] / "text_encoder").iterdir():
        (tree / "text_encoders/llava-llama-3-8b-text-encoder-tokenizer" / f.name).symlink_to(f)
    save_safetensors({"lora_unet_x.lora_A.weight": torch.zeros(2, 2)}, str(tree / "loras" / "style.safetensors"))
    found = detect_layout(tree)
    assert found.kind == "single-files"
    assert found.components["text_encoder"].format == "transformers"  # the folder, not its model.safetensors
    assert found.components["dit"].path.name == "hunyuan_video_t2v_720p_bf16.safetensors"
    mixed = detect_layout(folders["official"], dit=folders["comfyui"] / "hunyuan_video_t2v_720p_bf16.safetensors")
    assert mixed.kind == "official + components" and mixed.components["dit"].prefix == "model.diffusion_model."


def test_every_layout_loads_to_bit_identical_outputs(folders, official_pipe):
    ref_dit, ref_video = dit_out(official_pipe.transformer), official_pipe("a red circle moving right", **GEN).videos
    assert ref_dit.abs().mean() > 0.1
    assert official_pipe.layout.kind == "official"
    for name in ("diffusers", "single"):
        pipe = load_pipeline(folders[name], **FP32)  # configs from the layout itself: config.json / metadata
        assert pipe.layout.kind == detect_layout(folders[name]).kind
        assert torch.equal(dit_out(pipe.transformer), ref_dit), name
        assert torch.equal(pipe("a red circle moving right", **GEN).videos, ref_video), name
    # ComfyUI's files: the bf16 DiT (prefixed), bf16 VAE, fp16 LLM with an LM head, CLIP with its projection
    pipe = load_pipeline(**comfy_components(folders), dit_config=DIT_CONFIG, vae_config=TINY_VAE_CONFIG, **FP32)
    assert pipe.layout.kind == "components"
    assert torch.equal(dit_out(pipe.transformer), ref_dit)
    for a, b in ((pipe.text_encoder, official_pipe.text_encoder), (pipe.text_encoder_2, official_pipe.text_encoder_2)):
        assert a.model.state_dict().keys() == b.model.state_dict().keys()
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
        with torch.no_grad():  # the inferred config (no config.json in a single file) computes the same
            assert torch.equal(a.encode(["a red circle"]).hidden_state, b.encode(["a red circle"]).hidden_state)
    for a, b in zip(pipe.vae.state_dict().values(), official_pipe.vae.state_dict().values()):
        assert torch.equal(a, b.bfloat16().float())  # the file is bf16: the same values, rounded once


def test_fp8_file_without_scales_loads_as_fp8_with_scale_one(folders, models, tmp_path):
    c = comfy_components(folders, dit="hunyuan_video_720_cfgdistill_fp8_e4m3fn.safetensors")
    with pytest.warns(UserWarning, match="float8_e4m3fn without scales.*scale 1"):
        pipe = load_pipeline(**c, dit_config=DIT_CONFIG, vae_config=TINY_VAE_CONFIG, **FP32)
    dit = pipe.transformer
    fp8_file = load_file(c["dit"])
    layers = {n: m for n, m in dit.named_modules() if isinstance(m, FP8Linear)}
    assert set(layers) == {k[: -len(".weight")] for k, v in fp8_file.items() if v.dtype == FP8_DTYPE}
    assert "final_layer.linear" in layers and "txt_in.input_embedder" not in layers
    assert all(m.weight.dtype == FP8_DTYPE and float(m.weight_scale) == 1.0 for m in layers.values())
    # independently: a plain float model holding the file's values (fp8 read as numbers) computes the same
    plain = HYVideoDiffusionTransformer(DIT_CONFIG)
    plain.load_state_dict({k: v.float() for k, v in fp8_file.items()})
    assert torch.equal(dit_out(dit), dit_out(plain.eval()))
    # the official FP8 pair written from it holds scale 1 for every layer and loads to the same outputs
    with pytest.warns(UserWarning, match="without scales"):
        convert(dst=tmp_path / "official_fp8", to="official", **c, dit_config=DIT_CONFIG, vae_config=TINY_VAE_CONFIG)
    scales = torch.load(tmp_path / "official_fp8" / RELEASE_FILES["dit_fp8_map"], weights_only=True)
    assert set(scales) == set(layers) and all(float(s) == 1.0 for s in scales.values())
    again = load_dit(detect_layout(tmp_path / "official_fp8").components["dit"], DIT_CONFIG, dtype=torch.float32)
    assert torch.equal(dit_out(again), dit_out(dit))


def test_scaled_fp8_text_encoder_is_dequantized_with_its_scales(folders, models):
    c = comfy_components(folders, llm="llava_llama3_fp8_scaled.safetensors")
    enc = load_text_encoder(component_from_path("text_encoder", c["text_encoder"]), dtype=torch.float32)
    raw, fp16 = load_file(c["text_encoder"]), models[2].state_dict()
    got = enc.model.state_dict()
    w = "layers.1.self_attn.q_proj.weight"
    expected = raw["model." + w].float() * raw["model.layers.1.self_attn.q_proj.scale_weight"]
    assert torch.equal(got[w], expected)  # w_fp8 * scale_weight, exactly
    assert torch.equal(got["norm.weight"], fp16["norm.weight"].float())  # unquantized tensors as stored
    err = (got[w] - fp16[w].float()).norm() / fp16[w].float().norm()
    assert 0 < err < 0.04  # e4m3 keeps 3 mantissa bits: ~2.7% RMS (hvlab.fast.fp8's error budget)


def raw_tensors(layout) -> dict[str, dict[str, torch.Tensor]]:
    """Every component's tensors as the files store them (wrappers and the VAE's "vae." prefix removed)."""
    out = {}
    for role, c in layout.components.items():
        if c.format == "official":
            out[role] = load_state_dict_file(c.path / "pytorch_model.pt" if c.path.is_dir() else c.path, prefix="vae.")
        elif c.format == "official-fp8":
            out[role] = dict(load_state_dict_file(c.path), map=load_state_dict_file(str(c.path)[:-3] + "_map.pt"))
        elif c.format == "safetensors":
            out[role] = load_file(c.path)
        else:  # a folder of safetensors (diffusers transformer/, vae/, a Hugging Face folder)
            out[role] = {k: v for f in sorted(c.path.glob("*.safetensors")) for k, v in load_file(f).items()}
    return out


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for role in a:
        assert a[role].keys() == b[role].keys(), role
        for k, v in a[role].items():
            if isinstance(v, dict):
                assert all(torch.equal(v[n], b[role][k][n]) for n in v), (role, k)
            else:
                assert v.dtype == b[role][k].dtype and torch.equal(v, b[role][k]), (role, k)


@pytest.mark.parametrize("start, via", [("official", "diffusers"), ("official", "single"), ("diffusers", "single"),
                                        ("single", "diffusers")])
def test_convert_round_trips_are_bit_identical(folders, tmp_path, start, via):
    target = {"official": "official", "diffusers": "diffusers", "single": "single"}[start]
    there = convert(folders[start], tmp_path / via, via, dit_config=DIT_CONFIG)
    back = convert(there.root, tmp_path / "back", target, dit_config=DIT_CONFIG)
    assert back.kind == detect_layout(folders[start]).kind
    assert_same_tensors(raw_tensors(detect_layout(folders[start])), raw_tensors(back))


def test_fp8_single_file_round_trips_through_the_official_pair(folders, tmp_path):
    c = comfy_components(folders, dit="hunyuan_video_720_cfgdistill_fp8_e4m3fn.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "without scales", said by the tests above
        single = convert(dst=tmp_path / "single", to="single", **c, dit_config=DIT_CONFIG, vae_config=TINY_VAE_CONFIG)
        official = convert(single.root, tmp_path / "official", "official")
        back = convert(official.root, tmp_path / "back", "single", dit_config=DIT_CONFIG)  # pickles carry no config
        with pytest.raises(ValueError, match="diffusers layout has no FP8 format"):
            convert(single.root, tmp_path / "diffusers", "diffusers")
    assert official.components["dit"].format == "official-fp8"
    assert_same_tensors(raw_tensors(single), raw_tensors(back))
    dit_file = load_file(single.components["dit"].path)
    assert "scaled_fp8" not in dit_file  # every scale is 1: written unscaled, as the ComfyUI file was
    assert {k: v.dtype for k, v in dit_file.items()} == {k: v.dtype for k, v in load_file(c["dit"]).items()}
    assert not (tmp_path / "diffusers").exists() and not list(tmp_path.glob(".diffusers.partial*"))  # nothing left


def test_diffusers_reads_the_diffusers_folder(folders, official_pipe):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(folders["diffusers"] / "transformer",
                                                                   torch_dtype=torch.float32).eval()
    x, t, text, mask, pooled, guidance = dit_inputs()
    with torch.no_grad():
        b = ref(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
                pooled_projections=pooled, guidance=guidance, return_dict=False)[0]
    a = dit_out(official_pipe.transformer)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5  # as tests/test_diffusers_parity.py, padded text included
    vae = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(folders["diffusers"] / "vae")
    assert tuple(vae.config.block_out_channels) == TINY_VAE_CONFIG.block_out_channels
    assert vae.config.norm_num_groups == TINY_VAE_CONFIG.norm_num_groups
    ours = official_pipe.vae.state_dict()
    assert vae.state_dict().keys() == ours.keys()  # the VAE's names are the same in both layouts
    assert all(torch.equal(v, ours[k]) for k, v in vae.state_dict().items())
    pipe = diffusers.HunyuanVideoPipeline.from_pretrained(folders["diffusers"])  # model_index.json, every folder
    assert type(pipe.text_encoder).__name__ == "LlamaModel" and type(pipe.text_encoder_2).__name__ == "CLIPTextModel"


def test_names_and_shapes_are_checked_before_any_weight_is_read(models, tmp_path, monkeypatch):
    import hvlab.readers

    sd = dict(models[0].state_dict())
    sd["double_blocks.0.img_attn_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    del sd["final_layer.linear.bias"]
    save_safetensors(sd, str(tmp_path / "dit.safetensors"))

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before the names were checked")

    monkeypatch.setattr(hvlab.readers, "iter_safetensors", no_reading)
    with pytest.raises(CheckpointError) as err:
        load_dit(component_from_path("dit", tmp_path / "dit.safetensors"), DIT_CONFIG)
    msg = str(err.value)
    assert "final_layer.linear.bias" in msg and "double_blocks.0.img_attn_proj.weight: expected (64, 64), got (3, 3)" in msg


def test_unreadable_paths_list_the_layouts_hvlab_reads(folders, tmp_path):
    (tmp_path / "loras").mkdir()
    save_safetensors({"lora_unet_down.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "loras" / "style.safetensors"))
    with pytest.raises(CheckpointLayoutError) as err:
        detect_layout(tmp_path)
    msg = str(err.value)
    assert "not the HunyuanVideo release layout nor another layout hvlab reads" in msg
    assert all(f"  {kind}: " in msg for kind in LAYOUTS)  # every layout it can read, described
    assert "loras/style.safetensors  <- not a HunyuanVideo component" in msg  # and what it found
    single = folders["single"]
    (tmp_path / "half").mkdir()
    for f in single.glob("hunyuan_video_*.safetensors"):
        (tmp_path / "half" / f.name).symlink_to(f)
    with pytest.raises(CheckpointLayoutError, match=r"looks like the single-files layout but lacks \['text_encoder', "
                                                    r"'text_encoder_2'\]"):
        detect_layout(tmp_path / "half")
    dit_file = next(single.glob("hunyuan_video_dit_*.safetensors"))
    with pytest.raises(CheckpointLayoutError, match="given as the vae but its keys make it a dit file"):
        detect_layout(single, vae=dit_file)
    with pytest.raises(CheckpointLayoutError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere", **FP32)
    with pytest.raises(FileExistsError, match="not empty"):
        convert(single, tmp_path / "half", "official")


def test_configs_are_recovered_from_shapes(models):
    big = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta").state_dict()
    assert dit_config_from_shapes({k: (v.dtype, tuple(v.shape)) for k, v in big.items()}) == HYVIDEO_T2_CONFIG
    vae = AutoencoderKLCausal3D(VAE_884_16C_HY_CONFIG, device="meta").state_dict()
    assert vae_config_from_shapes({k: (v.dtype, tuple(v.shape)) for k, v in vae.items()}) == VAE_884_16C_HY_CONFIG
    tiny = models[0].state_dict()
    with pytest.raises(CheckpointError, match="head dim is 32.*dit_config"):
        dit_config_from_shapes({k: (v.dtype, tuple(v.shape)) for k, v in tiny.items()})
    for model, role in ((models[2], "text_encoder"), (models[4], "text_encoder_2")):
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
        if role == "text_encoder_2" and not next(iter(shapes)).startswith("text_model."):
            shapes = {"text_model." + k: v for k, v in shapes.items()}
        inferred, real = text_config_from_shapes(role, shapes).to_dict(), model.config.to_dict()
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rope_parameters", "rms_norm_eps", "max_position_embeddings",
                    "hidden_act", "layer_norm_eps"):
            assert inferred.get(key) == real.get(key), (role, key)


def test_single_text_encoder_without_tokenizer_uses_the_built_in_one(folders, tmp_path, monkeypatch):
    import shutil

    import hvlab.tokenizers
    from hvlab.toy.tokenizer import load_toy_tokenizer

    for name in ("clip_l.safetensors", "llava_llama3_fp16.safetensors"):
        shutil.copy(folders["comfyui"] / name, tmp_path / name)
    c = component_from_path("text_encoder_2", tmp_path / "clip_l.safetensors")
    assert c.tokenizer is None  # no tokenizer_2/ beside it
    asked = []
    monkeypatch.setattr(hvlab.tokenizers, "clip_tokenizer", lambda: asked.append("clip") or load_toy_tokenizer("clip"))
    enc = load_text_encoder(c, dtype=torch.float32)
    assert asked == ["clip"] and enc.kind == "clip" and enc.max_length == 77
    # the real Llama-3 tokenizer (128,256 tokens) does not fit the tiny model's 135-row embedding: said so
    monkeypatch.setattr(hvlab.tokenizers, "llama3_tokenizer", lambda: type("Llama3", (), {"__len__": lambda s: 128256, "bos_token_id": 128000,
                                                      "eos_token_id": 128001, "pad_token_id": 128004})())
    with pytest.raises(CheckpointError, match=r"embedding has \d+ rows but the tokenizer \(hvlab built-in\) has 128256"):
        load_text_encoder(component_from_path("text_encoder", tmp_path / "llava_llama3_fp16.safetensors"))


def test_cli_convert_and_generate_name_the_layout(folders, tmp_path, capsys):
    from hvlab import cli

    assert cli.main(["convert", str(folders["diffusers"]), str(tmp_path / "out"), "--to", "single"]) == 0
    assert f"wrote the single-files layout in {tmp_path / 'out'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        cli.main(["convert", str(folders["diffusers"]), str(tmp_path / "out"), "--to", "official"])
    assert err.value.code == 2 and "not empty" in capsys.readouterr().err
    pipe = cli.load_model(model_base=str(tmp_path / "out"), device="cpu", dtype="fp32")
    assert f"hvlab: loaded the single-files layout in {tmp_path / 'out'}" in capsys.readouterr().err
    assert pipe.layout.kind == "single-files"
