"""Checkpoint conversion and loading: round trips, every file layout, and refusals that explain."""
import pytest
import torch

from hvlab.checkpoint import (CheckpointError, diffusers_to_official, load_dit_checkpoint, load_state_dict_file,
                              official_to_diffusers, save_safetensors)
from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoDiffusionTransformer, randomize_weights_


class NotATensor:  # a pickled instance of this must be refused: unpickling arbitrary classes can run code
    def __init__(self):
        self.payload = "anything"


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 2:] = 0
    return (torch.randn(2, 16, 2, 4, 4, generator=g), torch.tensor([700.0, 50.0]), torch.randn(2, 5, 32, generator=g),
            mask, torch.randn(2, 16, generator=g), torch.tensor([6016.0, 6016.0]))


@pytest.fixture(scope="module")
def source():
    model = randomize_weights_(HYVideoDiffusionTransformer(TINY_CONFIG), seed=11).eval()
    with torch.no_grad():
        out = model(*_inputs())
    return model, out


def _fresh():
    return HYVideoDiffusionTransformer(TINY_CONFIG).eval()


def _check_same(model, expected):
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), expected)  # bit-identical


def test_round_trip_official_diffusers_official_is_identity(source):
    sd = source[0].state_dict()
    back = diffusers_to_official(official_to_diffusers(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_round_trip_13b_layout_on_meta():
    sd = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta").state_dict()
    dsd = official_to_diffusers(sd)
    assert len(dsd) == 856 + 2 * (2 * 2 + 20 * 2 * 2 + 40 * 3)  # every fused weight+bias gains parts
    assert dsd["single_transformer_blocks.3.proj_mlp.weight"].shape == (12288, 3072)
    assert dsd["transformer_blocks.0.attn.add_k_proj.bias"].shape == (3072,)
    back = diffusers_to_official(dsd)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items()}


def test_final_layer_halves_are_swapped(source):
    sd = source[0].state_dict()
    w = sd["final_layer.adaLN_modulation.1.weight"]
    d = official_to_diffusers(sd)["norm_out.linear.weight"]
    assert torch.equal(d[: w.shape[0] // 2], w[w.shape[0] // 2:])  # diffusers' first half = official scale


def test_official_pt_file_loads_strict(source, tmp_path):
    model, expected = source
    for wrapper in ("module", "ema"):
        path = tmp_path / wrapper / "mp_rank_00_model_states.pt"
        path.parent.mkdir()
        torch.save({wrapper: model.state_dict()}, path)
        _check_same(load_dit_checkpoint(_fresh(), path), expected)


def test_safetensors_and_diffusers_layout(source, tmp_path):
    model, expected = source
    save_safetensors(model.state_dict(), str(tmp_path / "official.safetensors"))
    _check_same(load_dit_checkpoint(_fresh(), tmp_path / "official.safetensors"), expected)
    save_safetensors(official_to_diffusers(model.state_dict()), str(tmp_path / "diffusers.safetensors"))
    _check_same(load_dit_checkpoint(_fresh(), str(tmp_path / "diffusers.safetensors")), expected)
    _check_same(load_dit_checkpoint(_fresh(), official_to_diffusers(model.state_dict())), expected)


def test_directory_of_pt_shards(source, tmp_path):
    model, expected = source
    items = list(model.state_dict().items())
    half = len(items) // 2
    torch.save(dict(items[:half]), tmp_path / "pytorch_model_00.pt")
    torch.save(dict(items[half:]), tmp_path / "pytorch_model_01.pt")
    _check_same(load_dit_checkpoint(_fresh(), tmp_path), expected)


def test_missing_and_unexpected_keys_are_named(source):
    sd = dict(source[0].state_dict())
    del sd["double_blocks.0.img_attn_qkv.weight"], sd["final_layer.linear.bias"]
    sd["double_blocks.7.img_attn_qkv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_dit_checkpoint(_fresh(), sd)
    msg = str(err.value)
    n = len(source[0].state_dict())
    assert f"{n} tensors expected, {n - 1} found" in msg
    assert "2 missing keys" in msg and "double_blocks.0.img_attn_qkv.weight" in msg and "final_layer.linear.bias" in msg
    assert "1 unexpected keys" in msg and "double_blocks.7.img_attn_qkv.weight" in msg
    bad = dict(source[0].state_dict(), **{"img_in.proj.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"img_in.proj.bias: expected \(64,\), got \(3,\)"):
        load_dit_checkpoint(_fresh(), bad)
    # the 13B checkpoint into the tiny model: named shape mismatches, not a bare size error
    big = HYVideoDiffusionTransformer(HYVIDEO_T2_CONFIG, device="meta").state_dict()
    with pytest.raises(CheckpointError, match="unexpected keys.*shape mismatches"):
        load_dit_checkpoint(_fresh(), big)


def test_converters_refuse_foreign_keys():
    with pytest.raises(CheckpointError, match="not official HunyuanVideo DiT keys.*decoder.conv_in"):
        official_to_diffusers({"decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not diffusers HunyuanVideo keys"):
        diffusers_to_official({"x_embedder.proj.weight": torch.zeros(1), "vae.foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="fused from 3 diffusers tensors"):
        diffusers_to_official({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)})


def test_pickle_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dit_checkpoint(_fresh(), path)
    legacy = tmp_path / "old.pt"  # the non-zip legacy format takes the other code path
    torch.save({"module": NotATensor()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_dict_file(legacy)
