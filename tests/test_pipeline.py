"""The sampling pipeline on a tiny random-weight model: reproducibility, one generator per video,
interrupt/resume, NaN detection, the release-layout loader, and errors that name the fix.

Equalities here are exact (torch.equal) unless noted: the same CPU ops in the same order give the same bits.
"""
from __future__ import annotations

import json

import pytest
import torch

from hvlab.loading import CheckpointLayoutError, check_release_layout
from hvlab.runs import GenerationInterrupted, GenerationSettings, NonFiniteLatentsError, load_state
from hvlab.toy.model import random_toy_pipeline

PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def pipe():
    return random_toy_pipeline("tiny", seed=0)


def test_fixed_seed_gives_the_same_video_and_another_seed_does_not(pipe):
    a = pipe(PROMPT, seed=7)
    b = pipe(PROMPT, seed=7)
    c = pipe(PROMPT, seed=8)
    assert torch.equal(a.videos, b.videos) and torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.videos, c.videos)
    assert a.settings.seeds == [7]


def test_one_generator_per_video(pipe):
    """Video i of a batch is the video a single run with seeds[i] makes (its noise does not depend on the batch)."""
    both = pipe([PROMPT, "a blue square moving up"], seed=3)
    assert both.settings.seeds == [3, 4]
    alone = pipe("a blue square moving up", seed=4)
    torch.testing.assert_close(both.latents[1:], alone.latents, atol=1e-5, rtol=0)  # batched matmuls may round apart
    two = pipe(PROMPT, seed=[11, 5], num_videos_per_prompt=2)
    assert two.settings.prompt == [PROMPT, PROMPT] and two.settings.seeds == [11, 5]
    torch.testing.assert_close(two.latents[1:], pipe(PROMPT, seed=5).latents, atol=1e-5, rtol=0)


def test_settings_json_reproduces_the_video(pipe, tmp_path):
    out = pipe(PROMPT, seed=21, guidance_scale=3.0, negative_prompt="blurry", save_path=tmp_path)
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["seeds"] == [21] and saved["negative_prompt"] == ["blurry"]
    again = pipe.generate(GenerationSettings.from_dict(saved))
    assert torch.equal(again.videos, out.videos)
    assert (tmp_path / "video.mp4").stat().st_size > 0


def test_interrupt_then_resume_equals_an_uninterrupted_run(pipe, tmp_path):
    kw = dict(seed=5, num_inference_steps=6, guidance_scale=2.5, negative_prompt="")
    full = pipe(PROMPT, **kw)

    def ctrl_c_at_step_3(state):
        if state.i == 3:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as err:
        pipe(PROMPT, callback=ctrl_c_at_step_3, save_path=tmp_path, **kw)
    assert err.value.step == 3 and isinstance(err.value, KeyboardInterrupt)
    state = load_state(err.value.path)
    assert state["step"] == 3 and state["settings"]["seeds"] == [5]
    steps_seen = []
    resumed = pipe(resume_from=err.value.path, callback=lambda s: steps_seen.append(s.i))
    assert steps_seen == [3, 4, 5]
    assert torch.equal(resumed.videos, full.videos) and torch.equal(resumed.latents, full.latents)
    with pytest.raises(ValueError, match="takes every setting"):
        pipe(resume_from=err.value.path, seed=1)


def test_nan_is_caught_at_its_step_and_that_steps_latents_are_saved(pipe, tmp_path):
    kw = dict(seed=2, num_inference_steps=5)
    before = {}
    clean = pipe(PROMPT, callback=lambda s: before.setdefault(s.i, s.latents_in.clone()), **kw)
    calls = []

    def nan_on_third_call(module, args, output):
        calls.append(1)
        return output.masked_fill(torch.rand_like(output) < 0.01, float("nan")) if len(calls) == 3 else output

    handle = pipe.transformer.register_forward_hook(nan_on_third_call)
    try:
        with pytest.raises(NonFiniteLatentsError, match=r"NaN appeared in the latents at denoising step 2 of 5") as err:
            pipe(PROMPT, save_path=tmp_path, **kw)
    finally:
        handle.remove()
    assert "bfloat16" in str(err.value) and err.value.step == 2  # the message names a fix
    saved = load_state(tmp_path / "nan_step002.pt")
    assert torch.equal(saved["latents"], before[2]) and saved["step"] == 2
    assert torch.isnan(saved["latents_after"]).any() and not torch.isnan(saved["latents"]).any()
    # once the cause is gone, the saved state resumes to the clean video
    assert torch.equal(pipe(resume_from=tmp_path / "nan_step002.pt").videos, clean.videos)


@pytest.mark.parametrize("kwargs, message", [
    (dict(video_length=10), r"video_length must be 4k\+1.*got 10, nearest valid: 9 or 13"),
    (dict(height=100), r"height must be a multiple of 16.*got 100, nearest valid: 96 or 112"),
    (dict(width=72), r"width must be a multiple of 16.*nearest valid: 64 or 80"),
    (dict(guidance_scale=2.0, negative_prompt=["x", "y"]), r"one string or 1 strings"),
    (dict(seed=[1, 2]), r"one seed per video \(1\), got 2"),
])
def test_bad_inputs_raise_errors_that_name_the_fix(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, **kwargs)


def test_unknown_checkpoint_layout_lists_what_was_expected_and_found(tmp_path):
    (tmp_path / "hunyuan-video-t2v-720p" / "transformers").mkdir(parents=True)
    (tmp_path / "hunyuan-video-t2v-720p" / "transformers" / "model.bin").write_bytes(b"")
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointLayoutError) as err:
        check_release_layout(tmp_path)
    msg = str(err.value)
    assert "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt" in msg  # expected
    assert "hunyuan-video-t2v-720p/vae/pytorch_model.pt" in msg and "text_encoder_2/config.json" in msg
    assert "hunyuan-video-t2v-720p/transformers/model.bin" in msg.split("Found:")[1]  # found
    with pytest.raises(CheckpointLayoutError, match="does not exist"):
        check_release_layout(tmp_path / "nowhere")


def test_load_pipeline_reads_the_release_layout(pipe, tmp_path):
    """A tiny model written in the official ckpts/ layout loads back and makes the same video."""
    from dataclasses import asdict

    from hvlab.model import TINY_CONFIG
    from hvlab.loading import load_pipeline

    base = tmp_path / "ckpts"
    dit_dir, vae_dir = base / "hunyuan-video-t2v-720p" / "transformers", base / "hunyuan-video-t2v-720p" / "vae"
    dit_dir.mkdir(parents=True), vae_dir.mkdir(parents=True)
    torch.save({"module": pipe.transformer.state_dict()}, dit_dir / "mp_rank_00_model_states.pt")
    torch.save({"state_dict": {"vae." + k: v for k, v in pipe.vae.state_dict().items()}}, vae_dir / "pytorch_model.pt")
    (vae_dir / "config.json").write_text(json.dumps(asdict(pipe.vae.config)))
    for enc, name in ((pipe.text_encoder, "text_encoder"), (pipe.text_encoder_2, "text_encoder_2")):
        enc.model.save_pretrained(base / name)
        enc.tokenizer.save_pretrained(base / name)
    loaded = load_pipeline(base, device="cpu", dtype=torch.float32, text_encoder_dtype=torch.float32,
                           vae_dtype=torch.float32, vae_tiling=False, dit_config=TINY_CONFIG)
    loaded.defaults = pipe.defaults
    kw = dict(seed=4, height=64, width=64, video_length=9, num_inference_steps=3)
    # the release LLM encoder keeps 256 text tokens (the tiny one 32); padding never reaches real tokens
    torch.testing.assert_close(loaded(PROMPT, **kw).videos, pipe(PROMPT, **kw).videos, atol=1e-4, rtol=0)


def test_decode_progress_counts_every_tile_and_changes_nothing(pipe):
    z = torch.randn(2, 16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    plain = pipe.decode(z)
    pipe.vae.enable_tiling(tile_sample_min_size=64)  # 8-latent tiles: 2 x 2 per video
    try:
        calls0 = pipe.vae.decode_tile_calls
        tiled = pipe.decode(z, progress=True)
        assert pipe.vae.decode_tile_calls - calls0 == 2 * pipe.vae.decode_calls(z.shape) > 2
        assert "_decode_tile" not in vars(pipe.vae)  # the counting wrapper is gone
        assert not pipe.vae.decoder._forward_hooks  # the bar's hook is removed
        assert torch.equal(pipe.decode(z), tiled)
    finally:
        pipe.vae.disable_tiling()
    assert not torch.equal(tiled, plain)  # tiling really happened (a random VAE's tiles differ at their seams)


def test_decode_progress_bar_reaches_the_vaes_own_tile_count(pipe, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:  # records what the pipeline asks of tqdm
        def __init__(self, total, desc):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    z = torch.randn(2, 16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    pipe.vae.enable_tiling(tile_sample_min_size=64)  # 2 x 2 tiles per video
    try:
        pipe.decode(z, progress=True)
    finally:
        pipe.vae.disable_tiling()
    pipe.decode(z, progress=True)  # untiled: one decoder call per video
    assert [(b.total, b.n, b.closed) for b in bars] == [(8, 8, True), (2, 2, True)]


def test_fp8_flag_converts_the_blocks_and_stays_close(pipe):
    from hvlab.fast.fp8 import FP8Linear

    fp8 = random_toy_pipeline("tiny", seed=0)
    with pytest.warns(UserWarning):  # no FP8 matmul on a CPU: weight-only mode, said once
        fp8.enable_fp8()
    assert any(isinstance(m, FP8Linear) for m in fp8.transformer.modules())
    a, b = pipe(PROMPT, seed=1).latents, fp8(PROMPT, seed=1).latents
    assert not torch.equal(a, b)
    assert (a - b).norm() / a.norm() < 0.1  # e4m3 keeps ~3 significant bits per weight


def test_cpu_offload_moves_the_encoders_and_vae_only_while_used(monkeypatch):
    """On a CPU-only machine we watch the .to() calls instead of a GPU's memory."""
    p = random_toy_pipeline("tiny", seed=0)
    p.enable_cpu_offload()
    p.device = torch.device("meta")  # any device other than the CPU: nothing may actually run there
    moves = []
    for name in ("text_encoder", "text_encoder_2", "vae"):
        m = getattr(p, name)
        monkeypatch.setattr(m, "to", lambda *a, _n=name, **k: moves.append((_n, str(a[0]))))
    from hvlab.fast.offload import on_device

    with on_device(p.vae, p.device, p.cpu_offload):
        assert moves == [("vae", "meta")]
    assert moves == [("vae", "meta"), ("vae", "cpu")]
