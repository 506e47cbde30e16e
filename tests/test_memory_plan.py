"""The memory check `load_pipeline` runs before it reads a weight: a fake card (``hvlab.fast.memory.card_memory``
replaced) and a release folder whose weight files are empty, so any attempt to read one is caught."""
import json
from dataclasses import asdict

import pytest
import torch

import hvlab.checkpoint
import hvlab.fast.fp8
import hvlab.fast.memory as M
import hvlab.readers
import hvlab.text_encoder
import hvlab.vae
from hvlab import cli
from hvlab.model import HYVIDEO_T2_CONFIG
from hvlab.loading import RELEASE_FILES, load_pipeline

ALL = ("llm", "clip", "dit", "vae")  # without cpu_offload every model stays on the GPU


class ReadWeights(Exception):
    """Raised by the patched weight readers: loading got past the memory check."""


@pytest.fixture
def release(tmp_path, monkeypatch):
    """An empty-weights release folder, and every weight reader replaced by one that records and raises."""
    base = tmp_path / "ckpts"
    for key, rel in RELEASE_FILES.items():
        if key in ("dit_fp8", "dit_fp8_map"):
            continue
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(json.dumps(asdict(hvlab.vae.VAE_884_16C_HY_CONFIG)) if key == "vae_config" else "")
    reads = []

    def reader(*args, **kwargs):
        reads.append(args[:1])
        raise ReadWeights(args[:1])

    # each module that binds a reader at import is patched where it is used; hvlab.readers (load_pipeline's
    # loaders) is imported above, so its binding is the real reader whichever test imports the loaders first
    for module, name in ((hvlab.checkpoint, "load_state_dict_file"), (hvlab.fast.fp8, "load_state_dict_file"),
                         (hvlab.vae, "load_state_dict_file"), (hvlab.readers, "load_state_dict_file"),
                         (hvlab.text_encoder, "load_llm_encoder"),
                         (hvlab.text_encoder, "load_clip_encoder"), (torch, "load")):
        monkeypatch.setattr(module, name, reader)
    return base, reads


def fake_card(monkeypatch, total_GiB: float, free_GiB: float | None = None):
    free = total_GiB if free_GiB is None else free_GiB
    monkeypatch.setattr(M, "card_memory", lambda device: (int(free * M.GiB), int(total_GiB * M.GiB)))
    # the CLI checks that --device cuda exists before anything else: this machine "has" one card
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def release_estimate(fp8=False, resident=ALL, size=(720, 1280, 129), tile=(256, 64)):
    """The plan computed directly, for the loader's settings: no token chunking, release tiles."""
    return M.estimate_pipeline_memory(HYVIDEO_T2_CONFIG, *size, fp8=fp8, chunk_tokens=None, vae_tile_px=tile[0],
                                      vae_tile_frames=tile[1], resident=resident)


def test_too_small_card_fails_before_any_weight_is_read_with_the_estimate(release, monkeypatch):
    base, reads = release
    fake_card(monkeypatch, 8.0, free_GiB=7.5)
    with pytest.raises(M.MemoryPlanError) as err:
        load_pipeline(base, device="cuda")
    assert reads == []
    msg, est = str(err.value), release_estimate()
    assert "720x1280x129" in msg and "7.5 GiB free (of 8.0)" in msg
    assert f"~{est['peak_GiB']:.1f} GiB in the {est['peak_stage']} stage" in msg
    assert "GiB per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in est["stages"].items()) in msg
    assert f"DiT bf16 weights {est['parts']['DiT bf16 weights']:.1f}" in msg
    # nothing the loader offers fits 7.5 GiB: the smallest plan (FP8 + offload, smallest tiles) is named
    best = release_estimate(fp8=True, resident=("dit",), tile=(128, 32))
    assert best["peak_GiB"] > 7.5
    assert "none of load_pipeline's settings fits" in msg and f"needs ~{best['peak_GiB']:.1f} GiB" in msg
    assert "--fp8" in msg and "--cpu-offload" in msg and "--no-memory-check" in msg


def test_suggested_settings_fit_and_then_loading_starts(release, monkeypatch):
    base, reads = release
    est, offload, fp8 = release_estimate(), release_estimate(resident=("dit",)), release_estimate(fp8=True)
    free = (max(offload["peak_GiB"], fp8["peak_GiB"]) + est["peak_GiB"]) / 2  # both fit, the default does not
    assert offload["peak_GiB"] < free < est["peak_GiB"] and fp8["peak_GiB"] < free
    fake_card(monkeypatch, 80.0, free_GiB=free)
    with pytest.raises(M.MemoryPlanError) as err:
        load_pipeline(base, device="cuda")
    msg = str(err.value)
    assert f"--cpu-offload (cpu_offload=True) (~{offload['peak_GiB']:.1f} GiB)" in msg
    assert f"--fp8 (fp8=True) (~{fp8['peak_GiB']:.1f} GiB)" in msg
    assert "--fp8 (fp8=True) + --cpu-offload" not in msg  # only the smallest changes are named
    assert reads == []
    for kwargs in (dict(cpu_offload=True), dict(fp8=True), dict(check_memory=False)):
        with pytest.raises(ReadWeights):
            load_pipeline(base, device="cuda", **kwargs)
    assert len(reads) == 3


def test_plan_size_cap_fraction_and_fp8_file_are_taken_into_account(release, monkeypatch):
    base, reads = release
    fake_card(monkeypatch, 80.0)
    small = release_estimate(fp8=True, resident=("dit",))  # the default plan: 720p x 129 frames
    big = release_estimate(fp8=True, resident=("dit",), size=(1088, 1920, 129))
    assert big["peak_GiB"] > small["peak_GiB"] + 5  # the larger video's DiT stage outgrows the text stage
    cap = (small["peak_GiB"] + big["peak_GiB"]) / 2
    with pytest.raises(M.MemoryPlanError, match=f"cap is {cap:.1f} GiB"):
        load_pipeline(base, device="cuda", fp8=True, cpu_offload=True, memory_limit_gib=cap, plan_size=(129, 1088, 1920))
    with pytest.raises(ReadWeights):
        load_pipeline(base, device="cuda", fp8=True, cpu_offload=True, memory_limit_gib=cap)
    with pytest.raises(M.MemoryPlanError, match="cap is"):  # a cap checks a CPU load too
        load_pipeline(base, device="cpu", fp8=True, cpu_offload=True, memory_limit_gib=cap, plan_size=(129, 1088, 1920))
    # torch.cuda.set_per_process_memory_fraction's cap
    monkeypatch.setattr(M, "memory_fraction", lambda device: cap / 80.0)
    with pytest.raises(M.MemoryPlanError, match=r"set_per_process_memory_fraction\(0\.\d+\) allows"):
        load_pipeline(base, device="cuda", fp8=True, cpu_offload=True, plan_size=(129, 1088, 1920))
    # only the FP8 pair on disk: the loader will use it, so the plan counts FP8 weights without fp8=True
    dit = base / RELEASE_FILES["dit"]
    dit.unlink()
    for key in ("dit_fp8", "dit_fp8_map"):
        (base / RELEASE_FILES[key]).write_text("")
    with pytest.raises(M.MemoryPlanError, match="DiT fp8 weights"):
        load_pipeline(base, device="cuda", cpu_offload=True, plan_size=(129, 1088, 1920))
    assert len(reads) == 1
    with pytest.raises(ValueError, match=r"plan_size must be \(video_length, height, width\)"):
        load_pipeline(base, device="cuda", plan_size=(720, 1280))


def test_resident_weights_count_in_every_stage_and_untiled_vae_costs_more():
    slack = 0.10
    alone, kept = release_estimate(resident=()), release_estimate(resident=ALL)
    p = alone["parts"]
    others = {"text": p["CLIP fp16 weights"] + p["DiT bf16 weights"] + p["VAE fp16 weights"],
              "dit": p["LLM fp16 weights"] + p["CLIP fp16 weights"] + p["VAE fp16 weights"],
              "vae": p["LLM fp16 weights"] + p["CLIP fp16 weights"] + p["DiT bf16 weights"]}
    for stage, extra in others.items():
        assert kept["stages"][stage] == pytest.approx(alone["stages"][stage] + (1 + slack) * extra)
    with pytest.raises(ValueError, match="resident names models"):
        release_estimate(resident=("unet",))
    untiled = M.estimate_pipeline_memory(HYVIDEO_T2_CONFIG, 720, 1280, 129, chunk_tokens=None, vae_tile_px=None)
    # the whole 720p video at once is ~450 release tiles' worth of voxels: far above any tiled decode
    assert untiled["parts"]["VAE tile activations"] > 20 * alone["parts"]["VAE tile activations"]


def test_cli_fails_before_loading_for_the_size_it_is_asked(release, monkeypatch, tmp_path, capsys):
    base, reads = release
    est = release_estimate(fp8=True, resident=("dit",), size=(1088, 1920, 129))
    small = release_estimate(fp8=True, resident=("dit",))  # 720p x 129: its text stage is its peak
    card = (est["peak_GiB"] + small["peak_GiB"]) / 2
    fake_card(monkeypatch, card)
    argv = ["generate", "a cat", "--model-base", str(base), "--device", "cuda", "--quiet", "--fp8", "--cpu-offload",
            "--save-path", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as err:
        cli.main(argv + ["--video-size", "1088", "1920", "--video-length", "129"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "1088x1920x129" in msg and f"~{est['peak_GiB']:.1f} GiB" in msg and f"{card:.1f} GiB free" in msg
    with pytest.raises(ReadWeights):  # the smaller video fits: loading begins
        cli.main(argv + ["--video-size", "720", "1280", "--video-length", "129"])
    with pytest.raises(ReadWeights):
        cli.main(argv + ["--video-size", "1088", "1920", "--video-length", "129", "--no-memory-check"])
    with pytest.raises(SystemExit):
        cli.main(argv + ["--video-size", "720", "1280", "--video-length", "129", "--memory-limit-gib",
                         f"{small['peak_GiB'] - 0.5:.1f}"])
    assert "cap is" in capsys.readouterr().err and len(reads) == 2
