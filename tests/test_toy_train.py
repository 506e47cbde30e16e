"""The two-object retraining command at a tiny size on the CPU: it warm-starts from the shipped weights,
checkpoints, survives an interruption (resume continues from the last saved step) and exports weights
that the toy loader reads.
"""
from __future__ import annotations

import json

import pytest
import torch

from hvlab.checkpoint import load_state_dict_file
from hvlab.toy import train
from hvlab.toy.model import WEIGHTS_DIR

TINY = ("--world two-object --init-from {init} --out {out} --device cpu --vae-steps 1 --dit-steps 3 --pool 4 "
        "--vae-batch 2 --vae-frames 5 --dit-batch 2 --save-every 1 --vae-check 1")


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_two_object_training_warm_starts_checkpoints_resumes_and_exports(tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = TINY.format(init=WEIGHTS_DIR, out=out).split()
    real_save, dit_saves = train.save_state, []

    def save_then_stop(path, state):  # the machine goes away while the DiT's second step is being saved
        if "dit" in state:
            dit_saves.append(state["dit_step"])
            if len(dit_saves) == 2:
                raise Interrupted
        real_save(path, state)

    monkeypatch.setattr(train, "save_state", save_then_stop)
    with pytest.raises(Interrupted):
        train.main(argv)
    saved = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    assert (saved["vae_step"], saved["dit_step"], saved["dit_total"]) == (1, 1, 3)
    check = saved["vae_check"]
    assert check["n"] == 1 and 0 <= check["colour_acc"] <= 1  # the two-object read-back ran once, and is kept

    monkeypatch.setattr(train, "save_state", real_save)
    train.main(argv + ["--resume"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["vae_steps"], summary["dit_steps"], summary["world"]) == (1, 3, "two-object")
    assert summary["vae_two_object_check"] == check  # not recomputed after the resume
    assert "--world two-object" in summary["command"] and f"--init-from {WEIGHTS_DIR}" in summary["command"]
    assert len((out / "vae_loss.csv").read_text().splitlines()) == 2  # header + the one VAE step: not redone

    # warm start: three tiny steps moved the shipped weights a little, not to a fresh initialisation
    new, old = (load_state_dict_file(d / "dit.safetensors") for d in (out / "weights", WEIGHTS_DIR))
    diffs = [float((new[k].float() - old[k].float()).abs().max()) for k in old]
    assert 0 < max(diffs) < 0.05
    from hvlab.toy.model import load_toy

    pipe = load_toy(weights_dir=out / "weights")
    meta = json.loads((out / "weights" / "config.json").read_text())
    assert meta["training"]["world"] == "two-object"
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["vae_scaling_factor"])
