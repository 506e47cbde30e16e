"""The bad-input battery of issue 18: every case is a mistake a user makes, through ``hvlab generate`` (in-process,
stderr captured) or the Python API, and every case asserts the *message*, not only that something failed.

The command-line cases also assert that the error is one line of ``hvlab generate: error:`` with exit code 2, no
traceback, and that the ``--save-path`` folder the failed run would have written does not exist afterwards (a
failed run leaves no empty folder). Cases are grouped by the issue's classes (`CLASSES` counts them):

 1. zero (or another falsy value) is refused, never replaced by the default;
 2. interruptions keep the work (the SIGINT tests of real processes are in test_interrupts.py);
 3. output folders: never shared, never left empty;
 4. sizes: refused before allocating, with the estimate and settings that fit; long CPU runs say so;
 5. --resume / --from-settings refuse the flags they would ignore;
 6. NaN written by a callback is caught at its step, and the "finite" file is finite;
 7. damaged checkpoint and resume files are named with their path;
 8. ordinary command-line mistakes end in one line, not a traceback;
 9. nonsense that was silently accepted is refused (or, for unknown words, warned about);
10. the scheduler's messages name the right official defaults.

All on the tiny random-weight model (64 x 64 x 9 frames, 4 steps) unless a case needs the toy's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hvlab import cli
from hvlab.checkpoint import CheckpointError, load_state_dict_file
from hvlab.fast.memory import MemoryPlanError
from hvlab.runs import GenerationInterrupted, GenerationSettings, NonFiniteLatentsError, load_state, save_state
from hvlab.toy.model import random_toy_pipeline

PROMPT = "a red circle moving right"
TINY = ["--model", "tiny-random"]
CLASSES: dict[int, int] = {}  # class -> number of cases, filled as the parametrisations are built


def cases(klass: int, rows: list) -> list:
    """Parametrisation rows (id, *args) of class ``klass``, counted."""
    CLASSES[klass] = CLASSES.get(klass, 0) + len(rows)
    return [pytest.param(*r[1:], id=f"c{klass}-{r[0]}") for r in rows]


def case(klass: int):
    """Counts a single-case test in class ``klass``."""
    def count(test):
        CLASSES[klass] = CLASSES.get(klass, 0) + 1
        return test
    return count


@pytest.fixture(scope="module")
def pipe():
    return random_toy_pipeline("tiny", seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished tiny run (its settings.json) and a resume file stopped before step 2, plus damaged copies."""
    d = tmp_path_factory.mktemp("saved")
    argv = ["generate", PROMPT, *TINY, "--seed", "3", "--quiet", "--preview-every", "0", "--no-gif",
            "--save-path", str(d / "run")]
    cli.cmd_generate(cli.build_parser().parse_args(argv))
    p = random_toy_pipeline("tiny", seed=0)

    def stop(state):
        if state.i == 2:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as err:
        p(PROMPT, seed=3, callback=stop, save_path=d / "stopped")
    files = SimpleNamespace(dir=d, settings=d / "run" / "settings.json", resume=Path(err.value.path))
    good = json.loads(files.settings.read_text())
    state = torch.load(files.resume, weights_only=True)

    def settings_with(name, **change):
        path = d / f"{name}.json"
        path.write_text(json.dumps(dict(good, **change)))
        return path

    def state_with(name, **change):
        path = d / f"{name}.pt"
        torch.save(dict(state, **change), path)
        return path

    raw = files.resume.read_bytes()
    bad = {
        "truncated.pt": raw[: len(raw) // 2], "random.pt": os.urandom(300), "empty.pt": b"",
        "text.pt": b"<html>not found</html>\n", "invalid.json": b'{"prompt": ["a"],\n "height": 64,,\n}',
        "latin1.json": '{"prompt": ["caf\xe9"]}'.encode("latin-1"),
    }
    for name, data in bad.items():
        (d / name).write_bytes(data)
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"latents": torch.zeros(1)}, d / "nokeys.pt")
    files.bad = {
        **{k: d / k for k in bad}, "list.pt": d / "list.pt", "nokeys.pt": d / "nokeys.pt",
        "height_str": settings_with("height_str", height="64"), "seeds_str": settings_with("seeds_str", seeds="x"),
        "prompt_int": settings_with("prompt_int", prompt=5), "cfg_str": settings_with("cfg_str", guidance_scale="hi"),
        "reverse_str": settings_with("reverse_str", flow_reverse="yes"),
        "steps_float": settings_with("steps_float", num_inference_steps=2.5),
        "steps_zero": settings_with("steps_zero", num_inference_steps=0),
        "seed_neg": settings_with("seed_neg", seeds=[-1]), "cfg_nan": settings_with("cfg_nan", guidance_scale=float("nan")),
        "no_height": d / "no_height.json", "list.json": d / "list.json",
        "step_past": state_with("step_past", step=99), "step_str": state_with("step_str", step="2"),
        "latents_4d": state_with("latents_4d", latents=torch.zeros(1, 16, 3, 4)),
        "nan_latents": state_with("nan_latents", latents=torch.full_like(state["latents"], float("nan"))),
        "state_bad_settings": state_with("state_bad_settings", settings=dict(state["settings"], height=-64)),
    }
    (d / "no_height.json").write_text(json.dumps({k: v for k, v in good.items() if k != "height"}))
    (d / "list.json").write_text("[1, 2]")
    return files


def run_cli(argv, capsys, out: Path) -> str:
    """``hvlab generate ARGV --save-path OUT``: asserts exit 2, one error line, no traceback, no folder left."""
    with pytest.raises(SystemExit) as err:
        cli.main(["generate", *argv, "--quiet", "--save-path", str(out)])
    cap = capsys.readouterr()
    assert err.value.code == 2, cap.err
    assert cap.err.startswith("hvlab generate: error: ") and "Traceback" not in cap.err, cap.err
    assert not out.exists(), f"the failed run left {out}"
    return cap.err


def fill(argv, saved):
    return [a.format(settings=saved.settings, resume=saved.resume, d=saved.dir,
                     **{k.replace(".", "_"): v for k, v in saved.bad.items()}) for a in argv]


# ---- 1. zero is refused, never replaced by a default ------------------------------------------------------------

@pytest.mark.parametrize("argv, message", cases(1, [
    ("steps0", ["--infer-steps", "0"], r"num_inference_steps must be an int >= 1 .*got 0; nearest valid: 1 \(CLI: --infer-steps\)"),
    ("steps-neg", ["--infer-steps", "-4"], r"num_inference_steps must be an int >= 1 .*got -4; nearest valid: 1"),
    ("length0", ["--video-length", "0"], r"video_length must be 4k\+1; got 0, nearest valid: 1"),
    ("size0", ["--video-size", "0", "0"], r"height must be a multiple of 16 .*got 0, nearest valid: 16"),
    ("height0", ["--video-size", "0", "64"], r"height must be a multiple of 16 .*got 0"),
    ("width0", ["--video-size", "64", "0"], r"width must be a multiple of 16 .*got 0, nearest valid: 16"),
    ("videos0", ["--num-videos", "0"], r"num_videos_per_prompt must be an int >= 1, got 0; nearest valid: 1 \(CLI: --num-videos\)"),
    ("threads0", ["--threads", "0"], r"threads must be an int in \[1, \d+\].*got 0; nearest valid: 1"),
    ("tile0", ["--vae-tile-size", "0", "0"], r"vae_tile_size must be an int >= 32 .*got 0; nearest valid: 32"),
    ("tile-frames0", ["--vae-tile-size", "128", "0"], r"vae_tile_size must be an int >= 4 .*frames.*got 0"),
    ("memcap0", ["--memory-limit-gib", "0"], r"memory_limit_gib must be a finite number > 0.0, got 0.0"),
    ("preview-neg", ["--preview-every", "-1"], r"preview_every must be an int >= 0 \(0 turns previews off\), got -1"),
    ("ulysses0", ["--ulysses-degree", "0"], r"ulysses_degree must be an int >= 1, got 0"),
    ("shift0", ["--flow-shift", "0"], r"flow_shift must be a finite number > 0.0 \(official default 7.0\), got 0.0"),
    ("embedded0", ["--embedded-cfg-scale", "0"], r"embedded_guidance_scale must be a finite number > 0.0 .*got 0.0"),
]))
def test_cli_refuses_zero(argv, message, capsys, tmp_path):
    assert __import__("re").search(message, run_cli([PROMPT, *TINY, *argv], capsys, tmp_path / "out"))


@pytest.mark.parametrize("kwargs, message", cases(1, [
    ("steps0", dict(num_inference_steps=0), r"num_inference_steps must be an int >= 1 .*got 0"),
    ("length0", dict(video_length=0), r"video_length must be 4k\+1; got 0"),
    ("height0", dict(height=0), r"height must be a multiple of 16.*got 0"),
    ("width0", dict(width=0), r"width must be a multiple of 16.*got 0"),
    ("videos0", dict(num_videos_per_prompt=0), r"num_videos_per_prompt must be an int >= 1, got 0"),
    ("shift0", dict(flow_shift=0.0), r"flow_shift must be a finite number > 0.0"),
    ("steps-float", dict(num_inference_steps=2.5), r"num_inference_steps must be an int .*got 2.5 \(float\); nearest valid: 2"),
    ("height-bool", dict(height=True), r"height must be an int, got True \(bool\)"),
]))
def test_api_refuses_zero(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.settings_for(PROMPT, **kwargs)


@case(1)
def test_vae_tiling_zero_is_refused_not_the_default(pipe):
    with pytest.raises(ValueError, match=r"tile_sample_min_size must be a multiple of 8 px"):
        pipe.vae.enable_tiling(tile_sample_min_size=0)
    pipe.vae.disable_tiling()


# ---- 2. interruptions keep the work (in-process; real SIGINTs in test_interrupts.py) ------------------------------

@case(2)
def test_ctrl_c_during_decode_keeps_the_denoised_latents_and_resume_goes_straight_to_decode(pipe, tmp_path, monkeypatch):
    full = pipe(PROMPT, seed=4)
    real = pipe.vae.decode

    def interrupted(z):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe.vae, "decode", interrupted)
    with pytest.raises(GenerationInterrupted, match=r"interrupted after denoising \(during the decode") as err:
        pipe(PROMPT, seed=4, save_path=tmp_path / "run")
    monkeypatch.setattr(pipe.vae, "decode", real)
    assert err.value.step == 4 and err.value.stage == "decode" and load_state(err.value.path)["step"] == 4
    steps = []
    resumed = pipe(resume_from=err.value.path, callback=lambda s: steps.append(s.i))
    assert steps == [] and torch.equal(resumed.videos, full.videos)  # no denoising step ran again


@case(2)
def test_ctrl_c_at_a_step_boundary_saves_the_step_its_latents_are_before(pipe, tmp_path):
    full = pipe(PROMPT, seed=6)

    class StopAfterUpdate:  # on_step_end runs after step 1's update, before the loop commits it
        def on_step_end(self, state):
            if state.i == 1:
                raise KeyboardInterrupt

    pipe.hooks.append(StopAfterUpdate())
    try:
        with pytest.raises(GenerationInterrupted, match="interrupted before denoising step 1") as err:
            pipe(PROMPT, seed=6, save_path=tmp_path / "run")
    finally:
        pipe.hooks.pop()
    assert load_state(err.value.path)["step"] == 1
    assert torch.equal(pipe(resume_from=err.value.path).latents, full.latents)


@case(2)
def test_the_printed_resume_command_alone_reloads_the_runs_model(capsys, tmp_path, monkeypatch):
    """``--resume FILE`` with no --model: the file records the run options (here tiny-random, not the default toy)."""
    from hvlab.pipeline import HunyuanVideoPipeline

    run = ["generate", PROMPT, *TINY, "--quiet", "--seed", "2", "--preview-every", "0", "--no-gif"]
    assert cli.main([*run, "--save-path", str(tmp_path / "full")]) == 0
    real, calls = HunyuanVideoPipeline.predict_velocity, []

    def stop_at_step_2(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(HunyuanVideoPipeline, "predict_velocity", stop_at_step_2)
    with pytest.raises(SystemExit) as err:
        cli.main([*run, "--save-path", str(tmp_path / "run")])
    monkeypatch.setattr(HunyuanVideoPipeline, "predict_velocity", real)
    state_file = tmp_path / "run" / "interrupted.pt"
    assert err.value.code == 130 and f"resume with: hvlab generate --resume {state_file}" in capsys.readouterr().err
    assert torch.load(state_file, weights_only=True)["settings"]["run"]["model"] == "tiny-random"
    assert cli.main(["generate", "--resume", str(state_file), "--quiet"]) == 0
    assert torch.equal(torch.load(tmp_path / "run" / "latents.pt"), torch.load(tmp_path / "full" / "latents.pt"))


@case(2)
def test_a_state_file_cut_short_never_replaces_the_last_one(tmp_path, monkeypatch):
    path = tmp_path / "interrupted.pt"
    save_state(path, torch.zeros(1, 16, 1, 2, 2), 1, {"x": 1})
    real = torch.save

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"PK\x03\x04half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, torch.ones(1, 16, 1, 2, 2), 2, {"x": 2})
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous file, whole
    assert os.listdir(tmp_path) == ["interrupted.pt"]  # and no temporary file left


# ---- 3. output folders: never shared, never left empty ------------------------------------------------------

@case(3)
def test_save_path_that_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPT, *TINY, "--quiet", "--save-path", str(tmp_path / "f")])
    assert f"--save-path {tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err


@case(3)
def test_save_path_under_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPT, *TINY, "--quiet", "--save-path", str(tmp_path / "f" / "run")])
    assert f"cannot make a folder under {tmp_path / 'f'}, which is a file" in capsys.readouterr().err


@case(3)
def test_a_non_empty_save_path_is_refused_and_kept(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "video.mp4").write_bytes(b"someone's video")
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPT, *TINY, "--quiet", "--save-path", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "already holds files (video.mp4); hvlab never writes over another run's results" in err
    assert (tmp_path / "run" / "video.mp4").read_bytes() == b"someone's video"


@case(3)
def test_a_folder_locked_by_a_running_run_is_refused(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".hvlab-run.lock").write_text(f"{os.getppid()}\n")  # a live process
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPT, *TINY, "--quiet", "--save-path", str(tmp_path / "run")])
    assert f"is in use by another hvlab run (pid {os.getppid()}); runs never share a folder" in capsys.readouterr().err


@case(3)
def test_a_lock_left_by_a_killed_run_says_so(capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".hvlab-run.lock").write_text(f"{dead.pid}\n")
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPT, *TINY, "--quiet", "--save-path", str(tmp_path / "run")])
    assert f"locked by hvlab run {dead.pid}, which is no longer running" in capsys.readouterr().err


@case(3)
def test_the_default_folder_gets_a_suffix_when_taken_and_says_so(capsys, tmp_path, monkeypatch):
    import time as time_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time_module, "strftime", lambda fmt, *a: "2030-01-01_00-00-00")
    (tmp_path / "outputs" / "2030-01-01_00-00-00").mkdir(parents=True)
    assert cli.main(["generate", PROMPT, *TINY, "--quiet", "--infer-steps", "1", "--preview-every", "0"]) == 0
    cap = capsys.readouterr()
    assert "outputs/2030-01-01_00-00-00 was taken by another run: writing to" in cap.err
    assert f"wrote 4 files to {tmp_path / 'outputs' / '2030-01-01_00-00-00_2'}:" in cap.out
    assert not os.listdir(tmp_path / "outputs" / "2030-01-01_00-00-00")  # the other run's folder untouched


@case(3)
def test_a_run_failing_after_the_claim_removes_its_folder(capsys, tmp_path):
    msg = run_cli([PROMPT, "--model", str(tmp_path / "no-such-weights")], capsys, tmp_path / "out")
    assert "--model must be one of ('toy', 'toy-random', 'tiny-random') or a folder of toy weights" in msg


@case(3)
def test_an_empty_save_path_is_refused_not_read_as_the_current_folder(pipe, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: an empty --save-path would otherwise write into it
    with pytest.raises(SystemExit) as err:
        cli.main(["generate", PROMPT, *TINY, "--quiet", "--save-path", ""])
    cap = capsys.readouterr()
    assert err.value.code == 2 and "Traceback" not in cap.err
    assert "hvlab generate: error: --save-path is empty (''): name a new folder, or leave --save-path out" in cap.err
    with pytest.raises(ValueError, match=r"save_path is empty \(' '\): name a new folder"):
        pipe(PROMPT, seed=1, save_path=" ")
    assert os.listdir(tmp_path) == []


@case(3)
def test_the_api_refuses_a_used_save_path(pipe, tmp_path):
    (tmp_path / "settings.json").write_text("{}")
    with pytest.raises(ValueError, match=r"save_path .* already holds files \(settings.json\)"):
        pipe(PROMPT, seed=1, save_path=tmp_path)


@case(3)
def test_the_cli_lists_every_file_it_wrote_and_settings_json_lists_them_too(capsys, tmp_path):
    assert cli.main(["generate", PROMPT, *TINY, "--quiet", "--seed", "1", "--save-path", str(tmp_path / "r"),
                     "--record-attention", "red"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [Path(x.strip()) for x in lines[1:]]
    assert lines[0] == f"wrote {len(listed)} files to {tmp_path / 'r'}:" and all(p.is_absolute() for p in listed)
    assert {p.name for p in listed} == set(os.listdir(tmp_path / "r"))
    recorded = json.loads((tmp_path / "r" / "settings.json").read_text())["files"]
    assert sorted(recorded) == sorted(p.name for p in listed) and "attention.pt" in recorded


# ---- 4. sizes: refused before allocating ------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", cases(4, [
    ("100000px", ["--video-size", "100000", "100000"],
     r"100000x100000x9 \(1 video, 117,187,500 image tokens\) needs ~\d+\.\d GiB on cpu in the vae stage but .*"
     r"Settings that fit: --video-size \d+ \d+"),
    ("cap-size", ["--video-size", "1024", "1024", "--memory-limit-gib", "0.5"],
     r"1024x1024x9 .* needs ~\d+\.\d GiB on cpu .* but the cap is 0.5 GiB; .*Settings that fit: --video-size \d+ \d+ "
     r"\(height=\d+, width=\d+\)"),
    ("cap-length", ["--video-length", "4001", "--memory-limit-gib", "0.25"],
     r"64x64x4001 .*but the cap is 0.2 GiB.*--video-length \d+ \(video_length=\d+\)"),
    ("cap-tiling", ["--video-size", "512", "512", "--memory-limit-gib", "0.3"], r"VAE tiling \(--vae-tiling"),
    ("cap-videos", ["--num-videos", "64", "--video-size", "256", "256", "--memory-limit-gib", "0.5"],
     r"256x256x9 \(64 videos.*fewer videos per run \(--num-videos\)"),
]))
def test_cli_refuses_sizes_that_do_not_fit(argv, message, capsys, tmp_path):
    assert __import__("re").search(message, run_cli([PROMPT, *TINY, *argv], capsys, tmp_path / "out"))


@case(4)
def test_api_refuses_an_absurd_size_before_drawing_noise(pipe, monkeypatch):
    drawn = []
    monkeypatch.setattr(pipe, "prepare_latents", lambda *a, **k: drawn.append(1))
    with pytest.raises(MemoryPlanError, match=r"100000x100000x9 .* needs ~\d+\.\d GiB on cpu"):
        pipe(PROMPT, height=100000, width=100000, seed=0)
    assert drawn == []


@case(4)
def test_the_guard_reads_a_cards_free_memory_on_cuda(pipe, monkeypatch):
    """The GPU path on a CPU machine: the pipeline says cuda, a fake card has 1 GiB free."""
    import hvlab.fast.memory as M
    from hvlab.fast.run_size import check_run_size

    monkeypatch.setattr(M, "card_memory", lambda device: (1 * M.GiB, 80 * M.GiB))
    monkeypatch.setattr(pipe, "device", torch.device("cuda"))
    with pytest.raises(MemoryPlanError, match=r"2048x2048x9 .* needs ~\d+\.\d GiB on cuda in the \w+ stage but the card "
                                              r"has 1.0 GiB free \(of 80.0\).*Settings that fit: --video-size"):
        check_run_size(pipe, 2048, 2048, 9)
    assert check_run_size(pipe, 64, 64, 9)["device"].type == "cuda"  # the tiny default fits in 1 GiB


@case(4)
def test_a_long_cpu_run_prints_its_estimated_time(capsys, tmp_path, monkeypatch):
    from hvlab.pipeline import HunyuanVideoPipeline

    monkeypatch.setattr(HunyuanVideoPipeline, "SLOW_RUN_S", 0.0)  # any run counts as long
    assert cli.main(["generate", PROMPT, *TINY, "--quiet", "--infer-steps", "2", "--save-path", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert __import__("re").search(r"hvlab: warning: this run will take roughly \d+ s on this CPU \(2 steps of ~\d+ s", err)


@case(4)
def test_the_time_estimate_grows_with_the_work(pipe):
    from hvlab.fast.run_size import estimate_seconds

    small = estimate_seconds(pipe, 64, 64, 9, 4)
    long = estimate_seconds(pipe, 64, 64, 4001, 4)
    assert long["denoise"] > 100 * small["denoise"] and long["decode"] > 100 * small["decode"]


# ---- 5. --resume / --from-settings refuse the flags they would ignore ------------------------------------------

FIXED = [("seed", ["--seed", "4"]), ("steps", ["--infer-steps", "5"]), ("size", ["--video-size", "32", "32"]),
         ("length", ["--video-length", "5"]), ("cfg", ["--cfg-scale", "2"]), ("embedded", ["--embedded-cfg-scale", "5"]),
         ("shift", ["--flow-shift", "3"]), ("reverse", ["--no-flow-reverse"]), ("videos", ["--num-videos", "2"]),
         ("seed-device", ["--seed-device", "cpu"]), ("neg", ["--neg-prompt", "blurry"])]


@pytest.mark.parametrize("source, flag", cases(5, [(f"{src}-{name}", src, flag) for src in ("from-settings", "resume")
                                                   for name, flag in FIXED]))
def test_saved_settings_refuse_other_generation_flags(source, flag, saved, capsys, tmp_path):
    path = saved.settings if source == "from-settings" else saved.resume
    msg = run_cli([f"--{source}", str(path), *TINY, *flag], capsys, tmp_path / "out")
    shown = "--[no-]flow-reverse" if "flow-reverse" in flag[0] else flag[0]
    assert f"--{source} takes every generation setting from its file; do not also pass {shown}" in msg


@case(5)
def test_a_tile_size_with_tiling_turned_off_is_refused(capsys, tmp_path):
    msg = run_cli([PROMPT, *TINY, "--no-vae-tiling", "--vae-tile-size", "128", "32"], capsys, tmp_path / "out")
    assert "--vae-tile-size sets the tiles of VAE tiling, which --no-vae-tiling turns off: drop one" in msg


@case(5)
def test_a_tile_size_alone_turns_tiling_on_instead_of_being_ignored():
    vae = cli.load_model("tiny-random", vae_tile_size=(64, 16)).vae
    assert vae.use_tiling and (vae.tiling.tile_latent_size, vae.tiling.tile_latent_frames) == (8, 4)
    assert not cli.load_model("tiny-random").vae.use_tiling  # the toy's default: off


@case(5)
def test_resuming_with_another_model_than_the_recorded_one_says_so(saved, capsys, tmp_path):
    """settings.json records --model tiny-random; --from-settings with --model toy-random warns, and the toy has no
    guidance embedding, so the file's embedded scale is refused naming the other model as the cause."""
    with pytest.raises(SystemExit) as err:
        cli.main(["generate", "--from-settings", str(saved.settings), "--model", "toy-random", "--quiet",
                  "--save-path", str(tmp_path / "out")])
    warning, error = capsys.readouterr().err.splitlines()
    assert err.value.code == 2 and not (tmp_path / "out").exists()
    assert warning == (f"hvlab: warning: {saved.settings} was made with --model tiny-random; running it with --model "
                       f"toy-random, which gives another video")
    assert error.startswith("hvlab generate: error: these settings have embedded_guidance_scale = 6.0, for a DiT with "
                            "a guidance embedding, but this DiT has none") and "made with another model" in error


@case(5)
def test_a_recorded_model_replaced_on_the_command_line_warns(saved, capsys, tmp_path):
    s = json.loads(saved.settings.read_text())
    s["run"]["model"] = "toy-random"
    path = tmp_path / "toy_settings.json"
    path.write_text(json.dumps(dict(s, embedded_guidance_scale=None, num_inference_steps=1)))
    assert cli.main(["generate", "--from-settings", str(path), *TINY, "--quiet", "--preview-every", "0",
                     "--save-path", str(tmp_path / "r")]) == 0
    assert (f"hvlab: warning: {path} was made with --model toy-random; running it with --model tiny-random, which "
            f"gives another video") in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", cases(5, [
    ("both", ["--resume", "{resume}", "--from-settings", "{settings}"], r"--resume and --from-settings both name"),
    ("other-prompt", ["a blue square moving up", "--from-settings", "{settings}"],
     r"the saved settings are for \['a red circle moving right'\], not 'a blue square moving up': drop the PROMPT"),
    ("no-prompt", [], r"hvlab generate needs a PROMPT \(or --from-settings / --resume\)"),
]))
def test_saved_settings_conflicts(argv, message, saved, capsys, tmp_path):
    assert __import__("re").search(message, run_cli([*fill(argv, saved), *TINY], capsys, tmp_path / "out"))


@case(5)
def test_the_api_refuses_settings_next_to_resume_from(pipe, saved):
    with pytest.raises(ValueError, match=r"resume_from takes every setting .*do not also pass \['seed_device'\]"):
        pipe(resume_from=saved.resume, seed_device="cpu")


# ---- 6. NaN from a callback -------------------------------------------------------------------------------

@case(6)
def test_nan_written_by_a_callback_is_caught_at_its_step_and_the_saved_file_is_finite(pipe, tmp_path):
    clean = pipe(PROMPT, seed=8)

    def poison(state):
        if state.i == 1:
            state.latents[0, 0, 0, 0, 0] = float("nan")

    with pytest.raises(NonFiniteLatentsError, match=r"NaN appeared in the latents at denoising step 1 of 4 .*after the "
                                                    r"step's hooks and callback ran") as err:
        pipe(PROMPT, seed=8, callback=poison, save_path=tmp_path / "run")
    saved = load_state(err.value.path)
    assert err.value.step == 1 and saved["step"] == 1 and torch.isfinite(saved["latents"]).all()
    assert torch.equal(pipe(resume_from=err.value.path).videos, clean.videos)


@case(6)
def test_a_callback_writing_into_the_steps_input_changes_nothing(pipe):
    clean = pipe(PROMPT, seed=8)

    def scribble(state):
        state.latents_in.fill_(float("nan"))  # a copy: the loop's own latents are untouched

    assert torch.equal(pipe(PROMPT, seed=8, callback=scribble).latents, clean.latents)


@case(6)
def test_inf_written_by_a_hook(pipe, tmp_path):

    class Inf:
        def on_step_end(self, state):
            if state.i == 2:
                state.latents.fill_(float("inf"))

    pipe.hooks.append(Inf())
    try:
        with pytest.raises(NonFiniteLatentsError, match=r"inf appeared in the latents at denoising step 2 of 4"):
            pipe(PROMPT, seed=8, save_path=tmp_path / "run")
    finally:
        pipe.hooks.pop()
    assert torch.isfinite(load_state(tmp_path / "run" / "nan_step002.pt")["latents"]).all()


@case(6)
def test_a_resume_file_holding_nan(pipe, saved):
    with pytest.raises(NonFiniteLatentsError, match=r"the starting latents \(before step 2\) already hold NaN/inf"):
        pipe(resume_from=saved.bad["nan_latents"])


# ---- 7. damaged files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", cases(7, [(n, n, m) for n, m in [
    ("truncated.pt", r"is truncated: it starts as a torch zip archive but its end \(the archive's directory\) is missing"),
    ("random.pt", r"is not a torch file: it starts with the bytes"),
    ("empty.pt", r"is empty \(0 bytes\): the download or copy did not finish"),
    ("text.pt", r"is not a torch file: it starts with the bytes b'<htm'.*web page"),
    ("list.pt", r"is not an hvlab resume file \(expected a dict with latents, step, settings; got a list\)"),
    ("nokeys.pt", r"is not an hvlab resume file: expected the keys latents, step, settings.*missing \['step', 'settings'\]"),
    ("step_past", r"says step 99, but its settings run 4 steps .*the file does not belong to these settings"),
    ("step_str", r"step must be an int, got '2' \(str\)"),
    ("latents_4d", r"latents must be a float tensor \(B, C, T, H, W\), got \(1, 16, 3, 4\)"),
    ("state_bad_settings", r"\(its settings\): height must be a multiple of 16 .*got -64"),
]]))
def test_cli_names_a_damaged_resume_file(name, message, saved, capsys, tmp_path):
    msg = run_cli(["--resume", str(saved.bad[name]), *TINY], capsys, tmp_path / "out")
    assert str(saved.bad[name]) in msg and __import__("re").search(message, msg), msg


@pytest.mark.parametrize("make, message", cases(7, [
    ("safetensors-truncated", lambda p: p.write_bytes(_safetensors_bytes()[:-5]),
     r"is not a complete safetensors file \(Error while deserializing header: incomplete metadata"),
    ("safetensors-empty", lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    ("safetensors-random", lambda p: p.write_bytes(os.urandom(64)), r"is not a complete safetensors file"),
    ("pt-truncated", lambda p: p.write_bytes(_torch_bytes()[:-40]),
     r"is truncated: it starts as a torch zip archive but its end \(the archive's directory\) is missing"),
    ("pt-random", lambda p: p.write_bytes(b"\x9a" + os.urandom(99)), r"is not a torch file: it starts with the bytes b'\\x9a"),
    ("pt-legacy-truncated", lambda p: p.write_bytes(_torch_bytes(zip=False)[:-40]),
     r"cannot be read as a torch file \(RuntimeError: unexpected EOF"),
    ("pt-folder", lambda p: p.mkdir(), r"no checkpoint found; expected \*.safetensors"),
    ("pt-missing", lambda p: None, r"checkpoint not found"),
]))
def test_api_names_a_damaged_checkpoint(make, message, tmp_path):
    path = tmp_path / ("w.safetensors" if "safetensors" in message or "empty" in message else "w.pt")
    make(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)


def _torch_bytes(zip: bool = True) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.ones(100)}, buf, _use_new_zipfile_serialization=zip)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.ones(4)})


@case(7)
def test_cli_names_a_damaged_toy_weight_file(capsys, tmp_path):
    import shutil

    from hvlab.toy.model import WEIGHTS_DIR

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    dit = folder / "dit.safetensors"
    dit.write_bytes(dit.read_bytes()[:1000])
    msg = run_cli([PROMPT, "--model", str(folder)], capsys, tmp_path / "out")
    assert f"checkpoint '{dit}' (1,000 bytes) is not a complete safetensors file" in msg


@case(7)
def test_a_pickle_that_would_run_code_is_still_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "x": print}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*unpickling those could run code.*Unsupported global"):
        load_state_dict_file(path)


@case(7)
def test_a_vae_config_with_invalid_json_names_the_file_and_line(tmp_path):
    from hvlab.vae import vae_config_from_json

    (tmp_path / "config.json").write_text('{"latent_channels": 16,\n "act_fn": }')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON \(Expecting value at line 2"):
        vae_config_from_json(tmp_path / "config.json")


# ---- 8. ordinary command-line mistakes: one line, no traceback ---------------------------------------------------

@pytest.mark.parametrize("argv, message", cases(8, [
    ("cuda", [PROMPT, *TINY, "--device", "cuda"], r"device is 'cuda' but CUDA is not available here .*nearest valid: 'cpu'"),
    ("gpu", [PROMPT, *TINY, "--device", "gpu"], r"device must name a torch device such as 'cpu', 'cuda'.*got 'gpu'"),
    ("seed-device", [PROMPT, *TINY, "--seed-device", "tpu"], r"seed_device must name a torch device.*got 'tpu'"),
    ("threads-neg", [PROMPT, *TINY, "--threads", "-2"], r"threads must be an int in \[1, \d+\] .*got -2; nearest valid: 1"),
    ("non-utf8", ["a red \udcff circle", *TINY], r"prompt is not valid UTF-8 text: the bytes b'\\xff' at character 6"),
    ("non-utf8-neg", [PROMPT, *TINY, "--cfg-scale", "2", "--neg-prompt", "bl\udce9"], r"negative_prompt is not valid UTF-8"),
    ("seed-2**64", [PROMPT, *TINY, "--seed", str(2**64)],
     r"seed must be an int in \[0, 18446744073709551615\] .*got 18446744073709551616; nearest valid: 18446744073709551615"),
    ("seed-overflow-batch", [PROMPT, *TINY, "--seed", str(2**64 - 1), "--num-videos", "2"],
     r"seed must be an int in \[0, 18446744073709551614\] .*video i uses seed \+ i for 2 videos"),
    ("attention-block", [PROMPT, *TINY, "--attention-block", "triple:1"], r"--attention-block must look like double:1"),
    ("attention-word", [PROMPT, *TINY, "--record-attention", "square"], r"\['square'\] are not in the prompt"),
    ("attention-step", [PROMPT, *TINY, "--record-attention", "red", "--attention-step", "99"],
     r"--attention-step must be in \[0, 3\] for 4 steps, got 99"),
    ("model-folder", [PROMPT, "--model", "/nonexistent/weights"], r"or a folder of toy weights; '/nonexistent/weights' is neither"),
    ("model-base", [PROMPT, "--model-base", "/nonexistent/ckpts"], r"is not the HunyuanVideo release layout"),
    ("settings-missing", ["--from-settings", "{d}/nothing.json", *TINY], r"nothing.json: no such file \(expected a settings.json"),
    ("settings-folder", ["--from-settings", "{d}", *TINY], r"is a folder, not a settings.json"),
    ("settings-invalid-json", ["--from-settings", "{invalid_json}", *TINY],
     r"invalid.json is not valid JSON \(Expecting property name enclosed in double quotes at line 2, column 15\)"),
    ("settings-latin1", ["--from-settings", "{latin1_json}", *TINY], r"latin1.json is not a settings.json .*: byte \d+ is not UTF-8"),
    ("settings-list", ["--from-settings", "{list_json}", *TINY], r"list.json: expected generation settings as a JSON object"),
    ("settings-missing-key", ["--from-settings", "{no_height}", *TINY], r"no_height.json: generation settings lack \['height'\]"),
    ("settings-height-str", ["--from-settings", "{height_str}", *TINY], r"height_str.json: height must be an int, got '64' \(str\)"),
    ("settings-seeds-str", ["--from-settings", "{seeds_str}", *TINY], r"seeds_str.json: seeds must be a list of one seed per prompt"),
    ("settings-prompt-int", ["--from-settings", "{prompt_int}", *TINY], r"prompt_int.json: prompt must be a str or a list of str, got int"),
    ("settings-cfg-str", ["--from-settings", "{cfg_str}", *TINY], r"cfg_str.json: guidance_scale must be a finite number >= 1.0 .*got 'hi' \(str\)"),
    ("settings-reverse-str", ["--from-settings", "{reverse_str}", *TINY], r"reverse_str.json: flow_reverse must be true or false, got 'yes'"),
    ("settings-steps-float", ["--from-settings", "{steps_float}", *TINY], r"steps_float.json: num_inference_steps must be an int .*got 2.5"),
    ("settings-steps-zero", ["--from-settings", "{steps_zero}", *TINY], r"steps_zero.json: num_inference_steps must be an int >= 1"),
    ("settings-seed-neg", ["--from-settings", "{seed_neg}", *TINY], r"seed_neg.json: seeds\[i\] must be an int in \[0, "),
    ("settings-cfg-nan", ["--from-settings", "{cfg_nan}", *TINY], r"cfg_nan.json: guidance_scale must be a finite number"),
    ("resume-missing", ["--resume", "{d}/nothing.pt", *TINY], r"resume file not found: '.*nothing.pt'"),
    ("resume-folder", ["--resume", "{d}", *TINY], r"resume file '.*' is a folder; expected a file"),
]))
def test_cli_mistakes_end_in_one_line(argv, message, saved, capsys, tmp_path):
    assert __import__("re").search(message, run_cli(fill(argv, saved), capsys, tmp_path / "out"))


@case(8)
@pytest.mark.slow  # each case is a fresh Python that imports torch: ~5 s on a 2-core CPU
def test_real_processes_end_user_mistakes_in_one_line(saved, tmp_path):
    """The same refusals from real ``hvlab generate`` processes (the in-process cases above go through the same
    handler): the interpreter prints no traceback, the exit code is 2, and argv that is not UTF-8 arrives as the
    raw bytes a terminal sends (which only a real process can show)."""
    import re

    env = {k: v for k, v in os.environ.items() if not k.startswith("HVLAB_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    runs = {
        "non-utf8": ([b"a red \xff circle", *TINY], r"prompt is not valid UTF-8 text: the bytes b'\\xff' at character 6"),
        "seed-2**64": ([PROMPT, *TINY, "--seed", str(2**64)], r"seed must be an int in \[0, 18446744073709551615\]"),
        "cuda": ([PROMPT, *TINY, "--device", "cuda"], r"device is 'cuda' but CUDA is not available here"),
        "invalid-json": (["--from-settings", str(saved.bad["invalid.json"]), *TINY],
                         rf"{re.escape(str(saved.bad['invalid.json']))} is not valid JSON \(Expecting property name"),
        "random-resume": (["--resume", str(saved.bad["random.pt"]), *TINY], r"is not a torch file: it starts with"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "hvlab.cli", "generate", *argv, "--quiet", "--save-path",
                                     str(tmp_path / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        err = err.decode("utf-8", "replace")
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err and err.startswith("hvlab generate: error: ") and err.count("\n") == 1, (name, err)
        assert re.search(runs[name][1], err), (name, err)
        assert out == b"" and not (tmp_path / name).exists(), name


# ---- 9. nonsense that was silently accepted -------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", cases(9, [
    ("cfg-nan", ["--cfg-scale", "nan"], r"guidance_scale must be a finite number >= 1.0 .*got nan; e.g. 1.0 \(CLI: --cfg-scale\)"),
    ("cfg-inf", ["--cfg-scale", "inf"], r"guidance_scale must be a finite number >= 1.0 .*got inf"),
    ("cfg-neg", ["--cfg-scale", "-3"], r"guidance_scale must be a finite number >= 1.0 .*got -3.0; nearest valid: 1.0"),
    ("cfg-half", ["--cfg-scale", "0.5"], r"guidance_scale must be .*got 0.5; nearest valid: 1.0"),
    ("embedded-nan", ["--embedded-cfg-scale", "nan"], r"embedded_guidance_scale must be a finite number > 0.0 .*got nan; e.g. 6.0"),
    ("embedded-neg", ["--embedded-cfg-scale", "-1"], r"embedded_guidance_scale must be a finite number > 0.0 .*got -1.0"),
    ("shift-nan", ["--flow-shift", "nan"], r"flow_shift must be a finite number > 0.0 .*got nan; e.g. 7.0"),
    ("shift-neg", ["--flow-shift", "-2"], r"flow_shift must be a finite number > 0.0 .*got -2.0"),
    ("seed-neg", ["--seed", "-1"], r"seed must be an int in \[0, 18446744073709551615\] .*got -1; nearest valid: 0 \(CLI: --seed\)"),
    ("neg-without-cfg", ["--neg-prompt", "blurry"], r"negative_prompt \(--neg-prompt\) is used only with true CFG, but "
                                                    r"guidance_scale \(--cfg-scale\) is 1.0 \(off\)"),
    ("memcap-nan", ["--memory-limit-gib", "nan"], r"memory_limit_gib must be a finite number > 0.0, got nan"),
]))
def test_cli_refuses_nonsense(argv, message, capsys, tmp_path):
    assert __import__("re").search(message, run_cli([PROMPT, *TINY, *argv], capsys, tmp_path / "out"))


@pytest.mark.parametrize("prompt, message", cases(9, [
    ("empty", "", r"prompt is empty, got '': describe the video"),
    ("spaces", "   ", r"prompt is empty \(only whitespace\), got '   '"),
    ("newlines", "\n\t", r"prompt is empty \(only whitespace\)"),
]))
def test_cli_refuses_an_empty_prompt(prompt, message, capsys, tmp_path):
    assert __import__("re").search(message, run_cli([prompt, *TINY], capsys, tmp_path / "out"))


@case(9)
def test_embedded_guidance_on_a_model_without_a_guidance_embedding(capsys, tmp_path):
    msg = run_cli([PROMPT, "--model", "toy", "--embedded-cfg-scale", "6"], capsys, tmp_path / "out")
    assert "embedded_guidance_scale was given (6.0), but this DiT has no guidance embedding" in msg


@pytest.mark.parametrize("prompt, unknown, nothing", cases(9, [
    ("oov", "a zebra galloping right", ["zebra", "galloping"], False),
    ("emoji", "🦓 🐎", ["🦓", "🐎"], True),
    ("all-unknown", "zebra galloping", ["zebra", "galloping"], True),
]))
def test_unknown_words_are_named_with_the_vocabulary(prompt, unknown, nothing, capsys, tmp_path):
    assert cli.main(["generate", prompt, *TINY, "--quiet", "--infer-steps", "1", "--preview-every", "0",
                     "--save-path", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"hvlab: warning: the model's tokenizer does not know {unknown} and reads each as <unk>" in err
    assert ("it sees no word of the prompt at all" in err) == nothing
    assert "Its vocabulary (127 words): , . 0 1 2" in err and " circle " in err and "Traceback" not in err


@case(9)
def test_known_words_give_no_warning(pipe, recwarn):
    pipe(PROMPT, seed=0, num_inference_steps=1)
    assert not [w for w in recwarn if "tokenizer does not know" in str(w.message)]


@case(9)
def test_the_api_warns_of_unknown_words_naming_them_and_the_vocabulary(pipe):
    from hvlab.validate import UnknownWordsWarning

    with pytest.warns(UnknownWordsWarning, match=r"does not know \['zebra', 'galloping'\] and reads each as <unk>\. "
                                                 r"Its vocabulary \(127 words\): , \. 0 1 2") as caught:
        pipe("a zebra galloping right", seed=0, num_inference_steps=1)
    unknown = [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]
    assert len(unknown) == 1 and " circle " in unknown[0].split("Its vocabulary")[1]  # one warning, not one per step


@pytest.mark.parametrize("kwargs, error, message", cases(9, [
    ("empty", dict(prompt=""), ValueError, r"prompt is empty"),
    ("empty-in-list", dict(prompt=[PROMPT, " "]), ValueError, r"prompt is empty \(only whitespace\)"),
    ("not-str", dict(prompt=[PROMPT, 3]), TypeError, r"prompt must be a list of str, but item 1 is a int"),
    ("cfg-nan", dict(prompt=PROMPT, guidance_scale=float("nan")), ValueError, r"guidance_scale must be a finite number"),
    ("cfg-str", dict(prompt=PROMPT, guidance_scale="4"), ValueError, r"guidance_scale must be a finite number >= 1.0 .*got '4' \(str\)"),
    ("seed-neg", dict(prompt=PROMPT, seed=-1), ValueError, r"seed must be an int in \[0, "),
    ("seed-list-neg", dict(prompt=PROMPT, seed=[-5]), ValueError, r"seed must be an int in \[0, .*got -5"),
    ("seed-float", dict(prompt=PROMPT, seed=1.5), ValueError, r"seed must be an int .*got 1.5 \(float\); nearest valid: 2"),
    ("seed-device", dict(prompt=PROMPT, seed_device="cuda"), ValueError, r"seed_device is 'cuda' but CUDA is not available"),
    ("reverse-str", dict(prompt=PROMPT, flow_reverse="no"), ValueError, r"flow_reverse must be true or false, got 'no' \(str\)"),
    ("neg-without-cfg", dict(prompt=PROMPT, negative_prompt="x", guidance_scale=1.0), ValueError, r"is used only with true CFG"),
]))
def test_api_refuses_nonsense(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(**kwargs)


@case(9)
def test_api_refuses_a_callback_that_is_not_a_function_before_the_run(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "prepare_latents", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(TypeError, match=r"callback must be a function taking the step's state .*got 5 \(int\)"):
        pipe(PROMPT, seed=0, callback=5)


def _loaders():
    from hvlab.loading import load_pipeline
    from hvlab.toy.model import load_toy

    return {"load_toy": load_toy, "random_toy_pipeline": random_toy_pipeline,
            "load_pipeline": lambda **k: load_pipeline("/nonexistent/ckpts", **k)}


@pytest.mark.parametrize("loader, kwargs, message", cases(9, [
    ("toy-device", "load_toy", dict(device="gpu"), r"device must name a torch device such as 'cpu', 'cuda'.*got 'gpu'"),
    ("toy-cuda", "load_toy", dict(device="cuda"), r"device is 'cuda' but CUDA is not available here"),
    ("toy-dtype-str", "load_toy", dict(dtype="float16"),
     r"dtype must be a torch floating-point dtype .*got 'float16' \(str\); pass torch.float16, not the string"),
    ("random-dtype-int", "random_toy_pipeline", dict(dtype=torch.int8), r"dtype must be a torch floating-point dtype .*got torch.int8"),
    ("random-fp8", "random_toy_pipeline", dict(dtype=torch.float8_e4m3fn), r"got torch.float8_e4m3fn .*fp8=True"),
    ("release-device", "load_pipeline", dict(device="gpu"), r"device must name a torch device .*got 'gpu'"),
    ("release-dtype", "load_pipeline", dict(dtype="bf16"), r"dtype must be a torch floating-point dtype .*got 'bf16' \(str\)$"),
    ("release-vae-dtype", "load_pipeline", dict(vae_dtype=torch.int32), r"vae_dtype must be a torch floating-point dtype"),
]))
def test_loaders_refuse_bad_devices_and_dtypes_before_building(loader, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _loaders()[loader](**kwargs)


@case(9)
def test_api_embedded_guidance_on_a_model_without_one():
    toy = random_toy_pipeline("tiny", seed=0)
    toy.transformer.config = __import__("dataclasses").replace(toy.transformer.config, guidance_embed=False)
    with pytest.raises(ValueError, match=r"embedded_guidance_scale was given \(6.0\), but this DiT has no guidance"):
        toy.settings_for(PROMPT, embedded_guidance_scale=6.0)
    assert toy.settings_for(PROMPT).embedded_guidance_scale is None  # the default is not recorded as if it were used


def _dit_inputs(pipe, **change):
    c = pipe.transformer.config
    x = dict(x=torch.randn(1, c.in_channels, 1, 2, 2), t=torch.tensor([500.0]),
             text_states=torch.randn(1, 3, c.text_states_dim), text_mask=torch.ones(1, 3, dtype=torch.long),
             text_states_2=torch.randn(1, c.text_states_dim_2), guidance=torch.tensor([6000.0]))
    x.update(change)
    return x


@pytest.mark.parametrize("change, error, message", cases(9, [
    ("x-float64", dict(x=torch.randn(1, 16, 1, 2, 2, dtype=torch.float64)), ValueError,
     r"x is torch.float64 but the DiT's weights are torch.float32: pass a torch.float32 tensor"),
    ("x-float16", dict(x=torch.randn(1, 16, 1, 2, 2).half()), ValueError, r"x is torch.float16 but the DiT's weights are torch.float32"),
    ("x-int", dict(x=torch.zeros(1, 16, 1, 2, 2, dtype=torch.long)), ValueError, r"x is torch.int64 .*pass a floating-point tensor"),
    ("x-list", dict(x=[[0.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    ("text-float64", dict(text_states=torch.randn(1, 3, 32, dtype=torch.float64)), ValueError, r"text_states is torch.float64"),
    ("pooled-int", dict(text_states_2=torch.zeros(1, 16, dtype=torch.int32)), ValueError, r"text_states_2 is torch.int32"),
    ("t-nan", dict(t=torch.tensor([float("nan")])), ValueError, r"t must be finite \(timesteps in \[0, 1000\]\), got \[nan\]"),
    ("t-inf", dict(t=float("inf")), ValueError, r"t must be finite"),
    ("t-str", dict(t="500"), TypeError, r"t must be a number or a \(B,\) tensor, got str"),
    ("t-bool", dict(t=torch.tensor([True])), ValueError, r"t must be real numbers"),
    ("guidance-nan", dict(guidance=torch.tensor([float("nan")])), ValueError, r"guidance must be finite"),
    ("mask-half", dict(text_mask=torch.full((1, 3), 0.5)), ValueError, r"text_mask must hold 0 and 1 only"),
]))
def test_dit_forward_refuses_bad_inputs_at_check_inputs(pipe, change, error, message):
    with pytest.raises(error, match=message):
        pipe.transformer(**_dit_inputs(pipe, **change))


@pytest.mark.parametrize("shape, dtype, message", cases(9, [
    ("frames0", (1, 16, 0, 2, 2), torch.float32, r"decode got T = 0 in latents of shape \(1, 16, 0, 2, 2\)"),
    ("width0", (1, 16, 1, 2, 0), torch.float32, r"decode got w = 0"),
    ("height0", (1, 16, 1, 0, 2), torch.float32, r"decode got h = 0"),
    ("batch0", (0, 16, 1, 2, 2), torch.float32, r"decode got B = 0"),
    ("int", (1, 16, 1, 2, 2), torch.int64, r"decode expects floating-point latents, got torch.int64"),
    ("channels", (1, 4, 1, 2, 2), torch.float32, r"decode expects latents \(B, 16, T, h, w\)"),
]))
def test_vae_decode_refuses_empty_or_wrong_latents(pipe, shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        pipe.vae.decode(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("shape, dtype, message", cases(9, [
    ("width0", (1, 3, 1, 8, 0), torch.float32, r"width must be a multiple of 8, got 0, nearest valid: 8"),
    ("uint8", (1, 3, 1, 8, 8), torch.uint8, r"encode expects a floating-point video in \[-1, 1\], got torch.uint8"),
    ("batch0", (0, 3, 1, 8, 8), torch.float32, r"encode got an empty batch"),
]))
def test_vae_encode_refuses_empty_or_wrong_videos(pipe, shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        pipe.vae.encode(torch.zeros(shape, dtype=dtype))


@case(9)
def test_resume_step_past_the_end(pipe):
    s = pipe.settings_for(PROMPT, seed=0)
    z = pipe.prepare_latents(s.seeds, s.height, s.width, s.video_length)
    with pytest.raises(ValueError, match=r"start_step says step 9, but its settings run 4 steps"):
        pipe.generate(s, latents=z, start_step=9)


@case(9)
def test_a_settings_object_built_by_hand_is_checked(pipe):
    s = pipe.settings_for(PROMPT, seed=0)
    s.num_inference_steps = 0
    with pytest.raises(ValueError, match=r"num_inference_steps must be an int >= 1"):
        pipe.generate(s)


@case(9)
def test_settings_from_a_dict_name_their_source():
    with pytest.raises(ValueError, match=r"my.json: video_length must be 4k\+1; got 8"):
        GenerationSettings.from_dict(dict(prompt=["a"], negative_prompt=None, height=64, width=64, video_length=8,
                                          num_inference_steps=4, seeds=[0], guidance_scale=1.0,
                                          embedded_guidance_scale=None, flow_shift=5.0, flow_reverse=True),
                                     source="my.json")


# ---- 10. the scheduler's messages -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", cases(10, [
    ("train-timesteps0", dict(num_train_timesteps=0), r"num_train_timesteps must be an int >= 1 \(official default 1000\), got 0"),
    ("shift0", dict(shift=0.0), r"shift must be a finite number > 0.0 \(official default 7.0\), got 0.0; e.g. 7.0"),
    ("shift-nan", dict(shift=float("nan")), r"shift must be a finite number > 0.0 .*got nan"),
]))
def test_scheduler_messages_name_the_official_defaults(kwargs, message):
    from hvlab.scheduler import FlowMatchDiscreteScheduler

    with pytest.raises(ValueError, match=message):
        FlowMatchDiscreteScheduler(**kwargs)


@case(10)
def test_set_timesteps_zero_names_the_release_default():
    from hvlab.scheduler import FlowMatchDiscreteScheduler

    with pytest.raises(ValueError, match=r"num_inference_steps must be an int >= 1 \(official default 50\), got 0"):
        FlowMatchDiscreteScheduler().set_timesteps(0)


def test_the_battery_has_at_least_100_cases():
    """The acceptance count of issue 18 (cases by class are listed in the module docstring's order)."""
    assert sum(CLASSES.values()) >= 100, CLASSES
    assert set(CLASSES) == set(range(1, 11)), CLASSES  # every class of the issue has its cases
