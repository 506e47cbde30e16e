"""hvlab next to the official sampler: the flag table is true to hvlab's parser, and the official behaviours
hvlab offers as helpers (size rounding, the image template, guidance rescale) do what the official code does."""
from __future__ import annotations

import pytest
import torch

from hvlab.cli import build_parser
from hvlab.official import OFFICIAL_FLAGS, hvlab_flags
from hvlab.prompts import PROMPT_TEMPLATE, template_for
from hvlab.scheduler import rescale_noise_cfg
from hvlab.video import align_to, check_video_size

# The flags of the blog's two commands (§2.3), in the order it uses them.
BLOG_FLAGS = ["--dit-weight", "--video-size", "--video-length", "--infer-steps", "--prompt", "--seed",
              "--embedded-cfg-scale", "--flow-shift", "--flow-reverse", "--use-cpu-offload", "--use-fp8",
              "--save-path", "--ulysses-degree", "--ring-degree"]


def test_every_hvlab_flag_of_the_table_parses():
    parser = build_parser()
    options = {s for a in parser._subparsers._group_actions[0].choices["generate"]._actions for s in a.option_strings}
    missing = [f for f in hvlab_flags() if f not in options]
    assert not missing, f"OFFICIAL_FLAGS names hvlab flags that `hvlab generate` lacks: {missing}"


def test_the_blog_command_is_covered_and_every_row_says_something():
    official = {f.strip() for row in OFFICIAL_FLAGS for f in row[0].split("/")}
    assert not [f for f in BLOG_FLAGS if f not in official]
    for flag, default, hv, note in OFFICIAL_FLAGS:
        assert flag.startswith("--") and default != ""
        assert hv is not None or note, f"{flag} has no hvlab counterpart and no reason given"


def test_the_blog_command_translated_parses():
    args = build_parser().parse_args(["generate", "A cat walks on the grass, realistic style.", "--model-base", "ckpts",
                                      "--video-size", "720", "1280", "--video-length", "129", "--infer-steps", "50",
                                      "--seed", "42", "--embedded-cfg-scale", "6.0", "--flow-shift", "7.0",
                                      "--flow-reverse", "--cpu-offload", "--fp8", "--save-path", "./results"])
    assert args.video_size == [720, 1280] and args.fp8 and args.cpu_offload and args.flow_reverse


@pytest.mark.parametrize("value, expected", [(720, 720), (1080, 1088), (1, 16), (544, 544), (545, 560)])
def test_align_to_rounds_up_to_a_multiple_of_16(value, expected):
    assert align_to(value) == expected
    check_video_size(align_to(value), align_to(value))  # always a size hvlab accepts
    with pytest.raises(ValueError, match="positive int"):
        align_to(0)


def test_template_for_picks_the_image_template_for_one_frame():
    assert template_for(1) is PROMPT_TEMPLATE["dit-llm-encode"] and template_for(1)["crop_start"] == 36
    assert template_for(129) is PROMPT_TEMPLATE["dit-llm-encode-video"]
    with pytest.raises(ValueError, match="video_length"):
        template_for(0)


def test_guidance_rescale_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    v_pos = torch.randn(2, 4, 3, 5, generator=g)
    v_cfg = 3.0 * torch.randn(2, 4, 3, 5, generator=g) + 1.0
    assert rescale_noise_cfg(v_cfg, v_pos, 0.0) is v_cfg  # the release's value: nothing changes
    full = rescale_noise_cfg(v_cfg, v_pos, 1.0)
    # property: phi = 1 gives each sample the standard deviation of its positive prediction
    torch.testing.assert_close(full.flatten(1).std(1), v_pos.flatten(1).std(1), atol=1e-5, rtol=0)
    # independent reference in float64, one sample at a time
    for b in range(2):
        ref = v_cfg[b].double() * v_pos[b].double().std() / v_cfg[b].double().std()
        half = rescale_noise_cfg(v_cfg, v_pos, 0.7)[b].double()
        torch.testing.assert_close(half, 0.7 * ref + 0.3 * v_cfg[b].double(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rescale_noise_cfg(v_cfg, v_pos, 1.5)
