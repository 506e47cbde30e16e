"""The newcomer's rough edges of issue 19 that live in the command line and the README: each has its check here
(unknown words, the files listed at the end and the folder a failed run leaves are in test_bad_inputs.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvlab import cli
from hvlab.toy.facts import vocabulary_words

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _help() -> str:
    return cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()


def test_help_shows_every_default():
    """Each option that has a default (the model's own where it depends on the model) names it."""
    text = _help().split("\noptions:")[1]
    assert "SUPPRESS" not in text
    for flag, default in [("--infer-steps", "toy 30, tiny-random 4, release 50"), ("--video-length", "toy 17"),
                          ("--video-size", "toy 128 128"), ("--cfg-scale", "toy 4.0"), ("--flow-shift", "release 7.0"),
                          ("--num-videos", "1"), ("--seed-device", "cpu"), ("--attention-block", "double:-1"),
                          ("--ulysses-degree", "1"), ("--save-path", "outputs/<timestamp>/"), ("--seed", "random")]:
        block = text[text.index(f"\n  {flag} "):]
        block = block[: block.index("\n  --", 1)] if "\n  --" in block[1:] else block
        assert "default" in block and default in " ".join(block.split()), (flag, block)


def test_help_and_readme_list_the_toy_vocabulary():
    words = vocabulary_words()
    assert len(words) == 127 and {"red", "circle", "moving", "right", "triangle"} <= set(words)
    assert " ".join(words[:12]) in " ".join(_help().split())
    readme_block = README.split("Its words (also listed at the end of `hvlab generate --help`):\n\n```\n")[1].split("```")[0]
    assert readme_block.split() == words  # the README's list is the tokenizer's, word for word


def test_readme_example_is_what_demo_sh_runs():
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    seed = re.search(r'hvlab generate "\$prompt" --seed (\d+) "\$@"', demo).group(1)
    example = README.split("```\n$ hvlab generate")[1].split("```")[0]
    assert example.splitlines()[0].strip() == f'"a red circle moving right" --seed {seed}'
    assert '${1:-"a red circle moving right"}' in demo
    listed = [line.strip() for line in example.splitlines() if line.startswith("  /")]
    header = next(line for line in example.splitlines() if line.startswith("wrote "))
    assert header == f"wrote {len(listed)} files to {Path(listed[0]).parent}:"  # the CLI's own format
    assert [Path(p).name for p in listed] == ["video.mp4", "video.gif", "previews.png", "channel_stats.png",
                                              "latents.pt", "settings.json"]


def test_readme_counts_the_held_out_evaluation_right():
    from hvlab.toy import data

    evaluation = json.loads((ROOT / "hvlab" / "toy" / "weights" / "config.json").read_text())["evaluation"]
    n = evaluation["heldout"]["n"]
    assert f"on {n} videos of the {len(data.HELDOUT)} held-out attribute" in " ".join(README.split())
    assert "63 held-out attribute combinations" not in README


def test_readme_says_jupyter_as_root_needs_allow_root():
    assert "jupyter lab --allow-root notebooks/" in README


def test_the_test_command_shows_skip_reasons():
    assert re.search(r"python -m pytest [^\n]*-rs", (ROOT / "scripts" / "test.sh").read_text())


@pytest.mark.parametrize("n, text", [(1, "step"), (2, "2nd step"), (3, "3rd step"), (4, "4th step"),
                                     (11, "11th step"), (12, "12th step"), (21, "21st step"), (22, "22nd step")])
def test_previews_title_says_every_nth_step_in_english(n, text):
    assert cli._ordinal(n) == text


def test_reference_tables_travel_with_the_repository():
    """The tests read tests/data/*.tsv; where the shared reference is present, the copies equal it."""
    for name in ("dit_release_keys.tsv", "vae_release_keys.tsv"):
        copy = ROOT / "tests" / "data" / name
        assert copy.is_file() and copy.stat().st_size > 1000
        shared = ROOT.parent / "shared" / "reference" / name
        for candidate in (shared, Path("/work/shared/reference") / name):
            if candidate.is_file():
                assert candidate.read_bytes() == copy.read_bytes(), f"{copy} differs from {candidate}"
    for test in ("test_model.py", "test_vae.py"):
        assert "shared\" / \"reference" not in (ROOT / "tests" / test).read_text()


def test_help_is_instant_without_torch():
    """--help (defaults and vocabulary included) imports no torch."""
    code = "import sys; from hvlab import cli; cli.build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_readme_vocabulary_block_is_wrapped_like_the_generator():
    block = README.split("Its words (also listed at the end of `hvlab generate --help`):\n\n```\n")[1].split("\n```")[0]
    assert block == textwrap.fill(" ".join(vocabulary_words()), 100)
