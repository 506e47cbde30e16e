"""Ctrl-C (SIGINT) sent to a real ``hvlab generate`` process, at points it is made to stop at (`hvlab.faults`):
each leaves a file that ``--resume`` turns into exactly the uninterrupted run's latents and video; and two runs
started with one ``--save-path`` never share it.

The process blocks at the chosen point and writes a "ready" file, then the test sends SIGINT: the signal lands
at that point every time (no timing guesses). Tiny random-weight model, 5 steps. The interrupted runs are real
processes; the uninterrupted reference and the resumes run in-process (``hvlab.cli.main``), the same code.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right"
RUN = ["generate", PROMPT, "--model", "tiny-random", "--seed", "5", "--infer-steps", "5", "--quiet"]
pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX"),
              pytest.mark.slow]  # each starts a Python that imports torch: ~10 s on a 2-core CPU


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HVLAB_PAUSE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    return env


def hvlab(*argv, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvlab.cli", *argv], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def start_paused(tmp_path: Path, point: str, *argv) -> subprocess.Popen:
    """Start ``hvlab ARGV`` that blocks at ``point``; return once it is there."""
    ready = tmp_path / f"ready-{point.replace(':', '_')}"
    proc = subprocess.Popen([sys.executable, "-m", "hvlab.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(HVLAB_PAUSE_AT=point, HVLAB_PAUSE_READY=str(ready)))
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"hvlab exited ({proc.returncode}) before reaching {point}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"hvlab did not reach {point} in 300 s")
        time.sleep(0.02)
    return proc


def frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(path))


def hvlab_here(*argv) -> None:
    from hvlab import cli

    assert cli.main(list(argv)) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    hvlab_here(*RUN, "--save-path", str(out))
    return out


@pytest.mark.parametrize("point, step, said", [
    ("forward:2", 2, "interrupted before step 2"),  # inside the DiT forward of step 2
    ("step_end:2", 2, "interrupted before step 2"),  # step 2's update made, the loop not yet moved on
    ("step_begin:3", 3, "interrupted before step 3"),  # between steps 2 and 3
    ("decode", 5, "interrupted while decoding or saving (the denoised latents are kept)"),
])
def test_sigint_then_resume_gives_the_uninterrupted_result(point, step, said, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_paused(tmp_path, point, *RUN, "--save-path", str(out))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and said in err and "Traceback" not in err, err
    state_file = out / "interrupted.pt"
    assert f"resume with: hvlab generate --resume {state_file}" in err
    assert os.listdir(out) == ["interrupted.pt"]  # nothing half-written beside it
    assert torch.load(state_file, weights_only=True)["step"] == step

    hvlab_here("generate", "--resume", str(state_file), "--quiet")  # the printed command: the file names its model
    assert torch.equal(torch.load(out / "latents.pt"), torch.load(uninterrupted / "latents.pt"))
    assert np.array_equal(frames(out / "video.gif"), frames(uninterrupted / "video.gif"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["resumed_from"] == str(state_file.resolve()) and settings["timings"]["steps_run"] == 5 - step


def test_sigint_while_loading_prints_one_line(tmp_path):
    proc = start_paused(tmp_path, "load", *RUN, "--save-path", str(tmp_path / "run"))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip() == ("hvlab generate: interrupted before denoising began (while loading or encoding): nothing "
                           "to resume, run the command again")
    assert not (tmp_path / "run").exists()  # the folder it had claimed is gone


def test_two_runs_with_one_save_path_one_is_refused_and_the_first_is_kept(tmp_path):
    out = tmp_path / "shared"
    first = start_paused(tmp_path, "step_begin:1", *RUN, "--save-path", str(out))  # holds the folder
    second = hvlab(*RUN, "--seed", "6", "--save-path", str(out))
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"--save-path {out} is in use by another hvlab run (pid {first.pid}); runs never share a folder" in second.stderr
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode == 130 and os.listdir(out) == ["interrupted.pt"]  # the first run's work, untouched


def test_two_runs_started_together_one_writes_and_the_other_is_refused(tmp_path):
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "hvlab.cli", *RUN, "--seed", str(s), "--save-path", str(out)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "runs never share a folder" in refused or "hvlab never writes over another run's results" in refused
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    assert json.loads((out / "settings.json").read_text())["seeds"] == [winner + 1]  # one run's files, whole
