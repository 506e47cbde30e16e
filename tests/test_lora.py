"""LoRA: every shared file layout lands on the right rows, fuse/unfuse/remove restore bits, diffusers agrees.

Each layout's file is written here by hand, in exactly the keys its own project uses (checked against their code:
diffusers' HunyuanVideo LoRA conversion and PEFT, musubi-tuner's networks/lora.py and convert_lora.py, ComfyUI's
comfy/lora.py), and the expected update of every official weight is computed here from the file's tensors with the
row offsets of the fused layers written out: q = rows 0:D, k = D:2D, v = 2D:3D, the single blocks' MLP = 3D:.

Tolerances: the side branch computes B (A x) where the reference computes (W + B A) x, two float32 orders of the
same sum: <= 1e-5 relative. Fusing, unfusing and removing are compared bit for bit.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hvlab import lora
from hvlab.checkpoint import CheckpointError, official_to_diffusers
from hvlab.fast.fp8 import FP8Linear, convert_to_fp8, dequantize_weight
from hvlab.model import TINY_CONFIG, HYVideoDiffusionTransformer, randomize_weights_

D, MLP = TINY_CONFIG.hidden_size, TINY_CONFIG.mlp_hidden_dim  # 64, 256


def _model(seed=3):
    return randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed=seed).eval()


def _inputs(B=2):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[-1, 3:] = 0
    return (torch.randn(B, 16, 2, 4, 4, generator=g), torch.tensor([700.0, 50.0][:B]),
            torch.randn(B, 5, 32, generator=g), mask, torch.randn(B, 16, generator=g), torch.tensor([6016.0] * B))


def _rand(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- the layouts, written by hand ------------------------------------------------------------------------
# Each builder returns (state dict as the tool writes it, {official module: expected delta (out, in)}).

def diffusers_file(g, r=2):
    """diffusers / PEFT: transformer. + diffusers names, q/k/v split, no alpha (alpha = r: scale 1)."""
    sd, expected = {}, {}
    split = {"double_blocks.0.img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                              "transformer_blocks.0.attn.to_v"],
             "double_blocks.0.txt_attn_qkv": ["transformer_blocks.0.attn.add_q_proj",
                                              "transformer_blocks.0.attn.add_k_proj",
                                              "transformer_blocks.0.attn.add_v_proj"],
             "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                         "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
             "txt_in.individual_token_refiner.blocks.1.self_attn_qkv": [
                 "context_embedder.token_refiner.refiner_blocks.1.attn.to_q",
                 "context_embedder.token_refiner.refiner_blocks.1.attn.to_k",
                 "context_embedder.token_refiner.refiner_blocks.1.attn.to_v"]}
    rows = [D, D, D, MLP]
    for official, names in split.items():
        parts = []
        for name, n in zip(names, rows):
            A, B = _rand(g, r, D), _rand(g, n, r)
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = A, B
            parts.append(B @ A)
        expected[official] = torch.cat(parts)
    for official, name, shape in [("double_blocks.0.img_mlp.fc1", "transformer_blocks.0.ff.net.0.proj", (MLP, D)),
                                  ("single_blocks.0.linear2", "single_transformer_blocks.0.proj_out", (D, D + MLP))]:
        A, B = _rand(g, r, shape[1]), _rand(g, shape[0], r)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = A, B
        expected[official] = B @ A
    # diffusers' norm_out.linear reads (scale, shift); the official final layer (shift, scale)
    A, B = _rand(g, r, D), _rand(g, 2 * D, r)
    sd["transformer.norm_out.linear.lora_A.weight"], sd["transformer.norm_out.linear.lora_B.weight"] = A, B
    expected["final_layer.adaLN_modulation.1"] = torch.cat([(B @ A)[D:], (B @ A)[:D]])
    return sd, expected


def kohya_file(g, r=4, alpha=2.0):
    """kohya / musubi-tuner: lora_unet_ + official names with '_', lora_down / lora_up / alpha, fused qkv."""
    sd, expected = {}, {}
    for official, (out, inn) in {"double_blocks.0.img_attn_qkv": (3 * D, D), "double_blocks.0.txt_mlp.fc2": (D, MLP),
                                 "single_blocks.0.linear1": (3 * D + MLP, D)}.items():
        key = "lora_unet_" + official.replace(".", "_")
        A, B = _rand(g, r, inn), _rand(g, out, r)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = A, B
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        expected[official] = (alpha / r) * B @ A
    return sd, expected


def kohya_split_file(g, r=2, alpha=4.0):
    """musubi-tuner's split_dims variant: lora_down.{i} / lora_up.{i} per q, k, v block of a fused layer."""
    key = "lora_unet_double_blocks_0_txt_attn_qkv"
    sd, parts = {f"{key}.alpha": torch.tensor(alpha)}, []
    for i in range(3):
        A, B = _rand(g, r, D), _rand(g, D, r)
        sd[f"{key}.lora_down.{i}.weight"], sd[f"{key}.lora_up.{i}.weight"] = A, B
        parts.append((alpha / r) * B @ A)
    return sd, {"double_blocks.0.txt_attn_qkv": torch.cat(parts)}


def official_file(prefix, down, up, alpha=None):
    """Official names (ComfyUI "diffusion_model.", diffusion-pipe "transformer."), fused qkv, alpha optional."""
    def build(g, r=3):
        sd, expected = {}, {}
        for official, (out, inn) in {"double_blocks.0.img_attn_qkv": (3 * D, D), "double_blocks.0.img_attn_proj": (D, D),
                                     "single_blocks.0.linear1": (3 * D + MLP, D),
                                     "single_blocks.0.modulation.linear": (3 * D, D)}.items():
            A, B = _rand(g, r, inn), _rand(g, out, r)
            sd[f"{prefix}{official}.{down}.weight"], sd[f"{prefix}{official}.{up}.weight"] = A, B
            if alpha is not None:
                sd[f"{prefix}{official}.alpha"] = torch.tensor(alpha)
            expected[official] = ((alpha if alpha is not None else r) / r) * B @ A
        return sd, expected
    return build


LAYOUTS = {
    "diffusers": (diffusers_file, "diffusers"),
    "kohya": (kohya_file, "kohya"),
    "kohya_split": (kohya_split_file, "kohya"),
    "comfyui": (official_file("diffusion_model.", "lora_A", "lora_B"), "official"),
    "diffusion_pipe": (official_file("transformer.", "lora_A", "lora_B"), "official"),
    "official_kohya_keys": (official_file("diffusion_model.", "lora_down", "lora_up", alpha=1.5), "official"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_equals_the_explicit_update_on_every_layer(layout, tmp_path):
    build, label = LAYOUTS[layout]
    sd, expected = build(torch.Generator().manual_seed(1))
    path = tmp_path / f"{layout}.safetensors"
    save_file(sd, str(path))
    model, scale = _model(), 0.7
    W = {n: model.get_submodule(n).weight.detach().clone() for n in expected}
    factors, got_layout = lora.read_lora(path, model)
    assert got_layout == label and set(factors) == set(expected)
    name = lora.load_lora(model, path, scale=scale)
    assert name == layout
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2))
    for n, delta in expected.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, lora.LoRALinear)
        xin = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(2)) if layer.in_features != D else x
        ref = F.linear(xin, W[n] + scale * delta, layer.base.bias)
        assert rel_err(layer(xin), ref) <= 1e-5, n
    lora.fuse_lora(model)
    for n, delta in expected.items():
        torch.testing.assert_close(model.get_submodule(n).base.weight, W[n] + scale * delta, rtol=0, atol=1e-6)


def test_whole_model_equals_a_model_with_the_explicit_weights():
    """The adapted model (side branch, through every block path: autograd off, chunked) = a copy whose weights
    were set to W + scale * delta by a plain state-dict edit."""
    sd, expected = diffusers_file(torch.Generator().manual_seed(4))
    model, ref = _model(), _model()
    ref_sd = ref.state_dict()
    for n, delta in expected.items():
        ref_sd[n + ".weight"] = ref_sd[n + ".weight"] + 0.5 * delta
    ref.load_state_dict(ref_sd)
    lora.load_lora(model, sd, "d", scale=0.5)
    with torch.no_grad():
        want = ref(*_inputs())
        assert rel_err(model(*_inputs()), want) <= 1e-5
        from hvlab.fast import accelerate
        accelerate(model, chunk_tokens=7)  # the fast blocks with token chunks see the adapted linears too
        assert rel_err(model(*_inputs()), want) <= 1e-5


def test_state_dict_keys_are_unchanged_and_load_strictly():
    model = _model()
    before = model.state_dict()
    lora.add_lora(model, "t", rank=2)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    fresh = _model(seed=9)
    lora.add_lora(fresh, "t", rank=2)
    fresh.load_state_dict(before, strict=True)  # the official keys load into an adapted model
    assert torch.equal(fresh.double_blocks[0].img_attn_qkv.base.weight, before["double_blocks.0.img_attn_qkv.weight"])


def _trained(model, name, seed=5):
    for p in lora.lora_parameters(model, name):
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.2
    return model


def test_fuse_unfuse_restores_bit_identically_and_fused_equals_unfused():
    model = _model()
    original = {n: m.weight for n, m in lora._linears(model).items()}
    with torch.no_grad():
        y0 = model(*_inputs())
    lora.add_lora(model, "a", rank=3, alpha=6.0, split_fused=True)
    _trained(model, "a")
    with torch.no_grad():
        y_side = model(*_inputs())
        lora.fuse_lora(model, "a")
        y_fused = model(*_inputs())
        assert rel_err(y_fused, y_side) <= 1e-5 and rel_err(y_side, y0) > 1e-2  # the adapter does something
        lora.unfuse_lora(model, "a")
        for n, m in lora.lora_layers(model).items():
            assert m.base.weight is original[n]  # the very tensor that was there, not a subtraction
        assert torch.equal(model(*_inputs()), y_side)
        lora.set_lora_scale(model, "a", 0.0)
        assert torch.equal(model(*_inputs()), y0)


def test_two_adapters_compose_and_remove_restores():
    model = _model()
    modules = dict(model.named_modules())
    with torch.no_grad():
        y0 = model(*_inputs())
    lora.add_lora(model, "a", rank=2, targets="double_blocks.*")
    lora.add_lora(model, "b", rank=3, targets=("*_attn_qkv", "single_blocks.*.linear1"), split_fused=True)
    _trained(model, "a", 1), _trained(model, "b", 2)
    lora.set_lora_scale(model, "a", 0.5)
    layer = model.double_blocks[0].img_attn_qkv  # holds both
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    delta = {n: sum(p.delta_weight(3 * D) for p in layer.adapters[n]) for n in "ab"}
    want = F.linear(x, layer.base.weight + 0.5 * delta["a"] + delta["b"], layer.base.bias)
    assert rel_err(layer(x), want) <= 1e-5
    with torch.no_grad():
        y_both = model(*_inputs())
        lora.fuse_lora(model, "b")  # one fused, one side branch
        assert rel_err(model(*_inputs()), y_both) <= 1e-5
        lora.remove_lora(model, "a")
        assert rel_err(layer(x), F.linear(x, layer._original["weight"] + delta["b"], layer.base.bias)) <= 1e-5
        lora.remove_lora(model)
        assert torch.equal(model(*_inputs()), y0)
    assert not lora.lora_layers(model)
    assert all(m is modules[n] for n, m in model.named_modules())  # the original module objects are back


def test_saved_diffusers_file_round_trips(tmp_path):
    model = _model()
    lora.add_lora(model, "a", rank=2, alpha=3.0)  # fused factors with alpha != r
    lora.add_lora(model, "s", rank=2, targets="*qkv", split_fused=True)
    _trained(model, "a"), _trained(model, "s")
    for name in ("a", "s"):
        want = {n: sum(p.delta_weight(m.out_features) for p in m.adapters[name])
                for n, m in lora.lora_layers(model).items() if name in m.adapters}
        path = lora.save_lora(model, tmp_path / f"{name}.safetensors", name, metadata={"base": "tiny"})
        assert lora.lora_metadata(path)["base"] == "tiny"
        keys = list(lora.lora_state_dict(model, name))
        assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight" in keys
        other = _model()
        factors, layout = lora.read_lora(path, other)
        assert layout == "diffusers"
        for n, d in want.items():
            got = sum(lora.LoRAPart(*f).delta_weight(d.shape[0]) for f in factors[n])
            torch.testing.assert_close(got, d, rtol=0, atol=1e-6)


# --- diffusers itself as the reference (diffusers and peft: test-only dependencies, `.[test]`) ----------------
# (skipped per test, not per module: a module-level skip would hide every test above when peft is missing)

def _diffusers_pair():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ours = _model()
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_theta=256.0, rope_axes_dim=(8, 12, 12),
    ).eval()
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


def _ref_out(ref):
    x, t, text, mask, pooled, guidance = _inputs()
    return ref(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
               pooled_projections=pooled, guidance=guidance, return_dict=False)[0]


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")  # PEFT also wraps the refiner's norm_out
def test_hvlab_saved_adapter_loads_in_diffusers_with_the_same_output(tmp_path):
    ours, ref = _diffusers_pair()
    y0 = ours(*_inputs())
    targets = lora.DEFAULT_TARGETS + ("txt_in.*self_attn_qkv", "final_layer.adaLN_modulation.1")
    lora.add_lora(ours, "fused", rank=2, alpha=4.0, targets=targets)
    lora.add_lora(ours, "split", rank=2, targets="*qkv", split_fused=True)
    _trained(ours, "fused"), _trained(ours, "split")
    lora.remove_lora(ours, "split")  # one adapter per file; "split" is checked below on its own
    path = lora.save_lora(ours, tmp_path / "a.safetensors", "fused")
    ref.load_lora_adapter(str(path), prefix="transformer", adapter_name="fused")
    a, b = ours(*_inputs()), _ref_out(ref)
    assert rel_err(a, y0) > 1e-2 and rel_err(a, b) <= 1e-5


@torch.no_grad()
def test_adapter_written_by_diffusers_loads_in_hvlab(tmp_path):
    """diffusers + PEFT write the file (alpha != r, recorded in the file's lora_adapter_metadata)."""
    ours, ref = _diffusers_pair()
    from peft import LoraConfig  # after _diffusers_pair, which skips the test when peft is missing

    ref.add_adapter(LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "add_v_proj", "proj_mlp", "proj_out", "ff.net.0.proj", "norm_out.linear"]))
    ref.save_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    name = lora.load_lora(ours, tmp_path)  # the folder
    assert "to_q" not in name and lora.read_lora(tmp_path, _model())[1] == "diffusers"
    assert rel_err(ours(*_inputs()), _ref_out(ref)) <= 1e-5


@torch.no_grad()
def test_official_layout_agrees_with_diffusers_conversion():
    """diffusers converts official-name files itself (HunyuanVideoLoraLoaderMixin.lora_state_dict). Its converter
    hard-codes the 13B hidden size 3072 for linear1, so only double-block layers are compared at this size."""
    sd, _ = official_file("diffusion_model.", "lora_A", "lora_B")(torch.Generator().manual_seed(6))
    sd = {k: v for k, v in sd.items() if "double_blocks" in k}
    ours, ref = _diffusers_pair()
    lora.load_lora(ours, dict(sd), "o")
    converted = pytest.importorskip("diffusers").HunyuanVideoPipeline.lora_state_dict(dict(sd))
    ref.load_lora_adapter(converted, prefix="transformer", adapter_name="o")
    assert rel_err(ours(*_inputs()), _ref_out(ref)) <= 1e-5


# --- FP8 ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_fp8_side_branch_adds_the_exact_update():
    model = convert_to_fp8(_model(), mode="weight_only")
    layer_name = "single_blocks.0.linear1"
    base = model.get_submodule(layer_name)
    assert isinstance(base, FP8Linear)
    sd, expected = kohya_file(torch.Generator().manual_seed(7))
    lora.load_lora(model, sd, "k", dtype=torch.float32)
    layer = model.get_submodule(layer_name)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(8))
    got = layer(x) - base(x)  # what the adapter adds on top of the FP8 forward
    assert rel_err(got, F.linear(x, expected[layer_name])) <= 1e-5
    lora.remove_lora(model)
    assert model.get_submodule(layer_name) is base


@torch.no_grad()
def test_fp8_fuse_requantises_and_unfuse_restores_the_fp8_bytes():
    model = convert_to_fp8(_model(), mode="weight_only")
    base = model.get_submodule("double_blocks.0.img_attn_qkv")
    w8, s8 = base.weight, base.weight_scale
    sd, expected = kohya_file(torch.Generator().manual_seed(7), alpha=4.0 * 8)  # a large update (scale 8)
    lora.load_lora(model, sd, "k")
    lora.fuse_lora(model)
    want = dequantize_weight(w8, s8, torch.float32) + expected["double_blocks.0.img_attn_qkv"]
    got = dequantize_weight(base.weight, base.weight_scale, torch.float32)
    assert base.weight.dtype == torch.float8_e4m3fn
    assert ((got - want).abs() <= want.abs() * 2 ** -4 + 2 * base.weight_scale).all()  # one e4m3 rounding
    lora.unfuse_lora(model)
    assert base.weight is w8 and torch.equal(base.weight_scale, s8)


# --- training: only the adapter learns -------------------------------------------------------------------------
def test_gradients_reach_only_the_adapter():
    model = _model().requires_grad_(False)
    lora.add_lora(model, "t", rank=2)
    params = lora.lora_parameters(model, "t")
    assert len(params) == 2 * 10 and all(p.requires_grad for p in params)
    model(*_inputs()).square().mean().backward()
    As = [p for n, p in model.named_parameters() if n.endswith("lora_A")]
    Bs = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert all(p.grad is None or not p.grad.any() for p in As)  # B = 0: no gradient reaches A at the start
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in Bs)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# --- refusals -------------------------------------------------------------------------------------------------
def _refused(tmp_path, sd, match, exc=CheckpointError):
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(exc, match=match):
        lora.load_lora(_model(), path)


def test_bad_files_are_refused_with_the_keys_named(tmp_path):
    g = torch.Generator().manual_seed(0)
    ok = {"diffusion_model.double_blocks.0.img_attn_proj.lora_A.weight": _rand(g, 2, D),
          "diffusion_model.double_blocks.0.img_attn_proj.lora_B.weight": _rand(g, D, 2)}
    _refused(tmp_path, {**ok, "diffusion_model.double_blocks.0.img_attn_proj.dora_scale": torch.ones(D)},
             r"not LoRA weights.*dora_scale")
    _refused(tmp_path, {**ok, "diffusion_model.double_blocks.7.img_attn_proj.lora_A.weight": _rand(g, 2, D),
                        "diffusion_model.double_blocks.7.img_attn_proj.lora_B.weight": _rand(g, D, 2)},
             r"not linear layers of this model.*double_blocks\.7\.img_attn_proj")
    _refused(tmp_path, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": _rand(g, 2, 3072),
                        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": _rand(g, 9216, 2)},
             r"lora_unet_double_blocks_0_img_attn_qkv: expected down \(r, 64\).*got down \(2, 3072\)")
    _refused(tmp_path, {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": _rand(g, 2, D),
                        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": _rand(g, 3 * D, 2)},
             r"192 rows; double_blocks\.0\.img_attn_qkv rows 64:128")
    _refused(tmp_path, {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": _rand(g, 2, D)},
             r"to_k needs both its down \(lora_A\) and up \(lora_B\)")
    _refused(tmp_path, {"transformer.x_embedder.proj.lora_A.weight": _rand(g, 2, 64),
                        "transformer.x_embedder.proj.lora_B.weight": _rand(g, D, 2)}, r"x_embedder\.proj")


def test_bad_calls_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora.add_lora(model, "a", rank=0)
    with pytest.raises(ValueError, match="no linear layer matches targets"):
        lora.add_lora(model, "a", targets="double_blocks.*.nonexistent")
    lora.add_lora(model, "a", rank=2)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        lora.add_lora(model, "a")
    with pytest.raises(ValueError, match="must be an identifier"):
        lora.add_lora(model, "my adapter")
    with pytest.raises(KeyError, match="no adapter named 'b'.*\\['a'\\]"):
        lora.fuse_lora(model, "b")
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        lora.remove_lora(model, "b")
    with pytest.raises(ValueError, match="ending in .safetensors"):
        lora.save_lora(model, "adapter.pt", "a")
    lora.fuse_lora(model, "a")
    convert_to_fp8(model, mode="weight_only")  # swaps the base layers under the fused adapter
    with pytest.raises(RuntimeError, match="base layer was replaced"):
        lora.unfuse_lora(model, "a")
