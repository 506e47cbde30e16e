"""Step caching (hvlab.fast.cache): what it skips, what it reuses, and that threshold 0 changes nothing.

The reference for "what a skipped step outputs" is written here from the model's own pieces (embed, the
blocks, final), and the reference for "which steps are skipped" re-derives each rule from its signal:
FBCache compares the first block's image residual with the last computed step's, TeaCache accumulates
its rescaled step-to-step change of block 0's modulated input. In these loops the inputs of every step are
fixed in advance, so the signals do not depend on the decisions and can be computed independently.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from hvlab.fast.cache import (DEFAULT_THRESHOLDS, StepCache, check_cache_args, l1_rows, rescale, run_cached_loop,
                              spawn_cached_loop, teacache_signal)
from hvlab.fast.parallel import demo_model_and_inputs
from hvlab.toy.model import random_toy_pipeline as random_pipeline

N_STEPS = 8


def _loop(seed: int = 5, n: int = N_STEPS):
    """The demo DiT (4 heads, 2 + 2 blocks, random weights) and n steps of inputs for a batch of 2 rows with
    different text: latents drifting towards another draw, timesteps 950 -> 180."""
    model, inp = demo_model_and_inputs(seed=seed)
    drift = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(seed + 2))
    steps = [dict(inp, x=inp["x"] * (1 - 0.06 * i) + 0.06 * i * drift, t=torch.full((2,), 950.0 - 110 * i))
             for i in range(n)]
    return model, steps


def _pieces(model, inp):
    """Reference pieces of one forward: img, txt, vec, txt_lens, RoPE tables, grid."""
    t, g = model.check_inputs(inp["x"], inp["t"], inp["text_states"], inp["text_mask"], inp["text_states_2"],
                              inp["guidance"])
    grid = model.grid_size(inp["x"].shape)
    img, txt, vec, lens = model.embed(inp["x"], t, inp["text_states"], inp["text_mask"], inp["text_states_2"], g)
    return img, txt, vec, lens, model.rope(grid), grid


def _rel(a, b):  # per row: sum |a - b| / sum |b|
    return [float(x) for x in l1_rows(a, b) / l1_rows(b)]


def _expected_decisions(model, steps, mode, threshold):
    """The rule, re-derived per row from independently computed signals: computed[step][row]."""
    with torch.no_grad():
        signals = []
        for inp in steps:
            img, txt, vec, lens, freqs, _ = _pieces(model, inp)
            if mode == "fbcache":
                signals.append(model.double_blocks[0](img, txt, vec, freqs, lens)[0] - img)
            else:
                signals.append(teacache_signal(model.double_blocks[0], img, vec))
    n, B = len(steps), signals[0].shape[0]
    computed = [[True] * B]
    ref, acc = [signals[0][b:b + 1] for b in range(B)], [0.0] * B
    for i in range(1, n):
        row = []
        for b in range(B):
            change = _rel(signals[i][b:b + 1], ref[b])[0]
            if mode == "fbcache":
                c = i == n - 1 or change >= threshold
                if c:
                    ref[b] = signals[i][b:b + 1]
            else:
                acc[b] += rescale(change, DEFAULT_COEFFS)
                c = i == n - 1 or acc[b] >= threshold
                if c:
                    acc[b] = 0.0
                ref[b] = signals[i][b:b + 1]
            row.append(c)
        computed.append(row)
    return computed


DEFAULT_COEFFS = StepCache.__init__.__kwdefaults__["coefficients"]


# ---- exactness --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fbcache", "teacache"])
def test_threshold_zero_is_the_uncached_run_bit_for_bit(mode):
    pipe = random_pipeline("tiny")
    kw = dict(seed=4, num_inference_steps=6, guidance_scale=3.0)  # true CFG: batch [negative, prompt] x 2 videos
    ref = pipe(["a red circle", "a blue square moving up"], **kw)
    with StepCache(pipe, mode, 0.0) as cache:
        out = pipe(["a red circle", "a blue square moving up"], **kw)
    assert torch.equal(out.latents, ref.latents) and torch.equal(out.videos, ref.videos)
    assert cache.stats.dit_forwards == cache.stats.dit_forwards_uncached == 6 * 4
    assert out.timings["cache"]["computed_steps"] == {r: list(range(6)) for r in
                                                      ("uncond 0", "uncond 1", "cond 0", "cond 1")}
    after = pipe(["a red circle", "a blue square moving up"], **kw)  # detached: the model's own forward again
    assert torch.equal(after.latents, ref.latents)
    assert "double_stream" not in vars(pipe.transformer) and cache not in pipe.hooks


def test_threshold_zero_with_fp8_and_fast_blocks_equals_their_uncached_run():
    import warnings

    from hvlab.fast import accelerate
    from hvlab.fast.fp8 import FP8Linear, convert_to_fp8

    model, steps = _loop(seed=2, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_fp8(model, mode="weight_only")
    accelerate(model, fused="eager")
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    with torch.no_grad():
        ref = [model(**s) for s in steps]
    for mode in ("fbcache", "teacache"):
        outs, stats = run_cached_loop(model, steps, mode, 0.0)
        assert all(torch.equal(o, r) for o, r in zip(outs, ref)), mode
        assert all(all(c) for c in stats["computed"])


# ---- what is skipped, and what a skipped step outputs ----------------------------------------------------
@pytest.mark.parametrize("mode", ["fbcache", "teacache"])
def test_a_high_threshold_skips_every_step_but_the_first_and_last_and_reuses_the_residual(mode):
    model, steps = _loop()
    outs, stats = run_cached_loop(model, steps, mode, 1e9)
    assert [[c for c in row] for row in stats["computed"]] == [[True, True]] + [[False, False]] * 6 + [[True, True]]
    with torch.no_grad():
        uncached = [model(**s) for s in steps]
        img0, txt0, vec0, lens0, freqs, grid = _pieces(model, steps[0])
        if mode == "fbcache":
            img0 = model.double_blocks[0](img0, txt0, vec0, freqs, lens0)[0]
        stack0 = model.single_stream(*model.double_stream(*_pieces(model, steps[0])[:3], freqs, lens0), vec0, freqs,
                                     lens0)
        residual = stack0 - img0  # blocks (1.. for fbcache) at step 0
        for i in range(1, N_STEPS - 1):
            img, txt, vec, lens, _, _ = _pieces(model, steps[i])
            if mode == "fbcache":
                img = model.double_blocks[0](img, txt, vec, freqs, lens)[0]
            expected = model.final(img + residual, vec, grid)
            torch.testing.assert_close(outs[i], expected, rtol=1e-5, atol=1e-6)
            assert (outs[i] - uncached[i]).abs().max() > 1e-3  # really skipped: not the uncached output
    assert torch.equal(outs[0], uncached[0]) and torch.equal(outs[-1], uncached[-1])


@pytest.mark.parametrize("mode, threshold", [("fbcache", 0.4), ("teacache", 0.2)])
def test_decisions_follow_the_rule_row_by_row(mode, threshold):
    model, steps = _loop()
    _, stats = run_cached_loop(model, steps, mode, threshold)
    expected = _expected_decisions(model, steps, mode, threshold)
    assert stats["computed"] == expected
    per_row = list(zip(*expected))
    assert per_row[0] != per_row[1]  # the two rows decide differently here: the per-row path is exercised
    assert any(not all(r) for r in per_row)


def test_first_and_last_steps_are_computed_and_a_resumed_run_computes_its_first_step():
    model, steps = _loop(n=6)
    cache = StepCache(model, "fbcache", 1e9)
    with torch.no_grad(), cache:
        cache.begin(6, start_step=2)
        for i in range(2, 6):
            cache.set_step(i)
            model(**steps[i])
    assert cache.stats.computed_steps() == {"row 0": [2, 5], "row 1": [2, 5]}
    assert cache.stats.steps == [2, 3, 4, 5]


# ---- CFG branches, batches and the report ----------------------------------------------------------------
@pytest.mark.parametrize("mode, threshold", [("fbcache", 0.4), ("teacache", 0.2)])
def test_each_row_keeps_its_own_state_as_if_run_alone(mode, threshold):
    # rows 0 and 1 stand for the [negative | positive] CFG branches of one pipeline call: batched, they must
    # make the same decisions and give the same outputs as each branch run alone
    model, steps = _loop()
    outs, stats = run_cached_loop(model, steps, mode, threshold)
    for b in range(2):
        alone = [{k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in steps]
        outs_b, stats_b = run_cached_loop(model, alone, mode, threshold)
        assert [c[0] for c in stats_b["computed"]] == [c[b] for c in stats["computed"]]
        for o, ob in zip(outs, outs_b):  # batch 2 vs 1 changes only the matmuls' summation order
            assert float((o[b:b + 1] - ob).abs().max() / ob.abs().max()) <= 1e-5
    assert [c[0] for c in stats["computed"]] != [c[1] for c in stats["computed"]]


def test_pipeline_labels_the_cfg_branches_and_reports_what_ran(tmp_path):
    pipe = random_pipeline("tiny")
    calls = []  # rows that entered the single-stream blocks, per call: the work that was really done
    hook = pipe.transformer.single_blocks[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        with StepCache(pipe, "fbcache", 1.0) as cache:
            out = pipe("a red circle", seed=0, num_inference_steps=8, guidance_scale=3.0)
    finally:
        hook.remove()
    s = cache.stats
    assert s.rows == ["uncond 0", "cond 0"]
    assert sum(calls) == s.dit_forwards < s.dit_forwards_uncached == 16
    report = out.timings["cache"]
    assert report == json.loads(json.dumps(s.report()))
    assert report["computed_steps"]["uncond 0"][0] == 0 and report["computed_steps"]["cond 0"][-1] == 7
    skipped = sum(8 - len(v) for v in report["computed_steps"].values())
    assert skipped == s.dit_forwards_uncached - s.dit_forwards > 0
    out.save(tmp_path)
    assert json.loads((tmp_path / "settings.json").read_text())["timings"]["cache"] == report


def test_signals_are_the_relative_l1_changes():
    model, steps = _loop(n=3)
    _, stats = run_cached_loop(model, steps, "teacache", 0.0)
    with torch.no_grad():
        sig = [teacache_signal(model.double_blocks[0], *[_pieces(model, s)[k] for k in (0, 2)]) for s in steps]
    for i in (1, 2):
        manual = [float((sig[i][b] - sig[i - 1][b]).abs().mean() / sig[i - 1][b].abs().mean()) for b in range(2)]
        assert stats["signal"][i] == pytest.approx(manual, rel=1e-5)
    assert stats["signal"][0] == [None, None]


def test_teacache_polynomial_is_the_published_one_and_never_negative():
    # ali-vilab/TeaCache, TeaCache4HunyuanVideo: poly1d([7.33226126e+02, -4.01131952e+02, 6.75869174e+01,
    # -3.14987800e+00, 9.61237896e-02]); its minimum on [0, inf) is ~0.0521 at x ~ 0.0314
    c = DEFAULT_COEFFS
    assert rescale(0.0, c) == pytest.approx(9.61237896e-02)
    assert rescale(0.1, c) == pytest.approx(733.226126e-4 - 401.131952e-3 + 67.5869174e-2 - 0.3149878 + 0.0961237896)
    xs = [k / 10000 for k in range(0, 20001)]
    assert min(rescale(x, c) for x in xs) == pytest.approx(0.05215, abs=1e-4)


# ---- Ulysses: the same decisions on every rank --------------------------------------------------------------
def test_ulysses_ranks_decide_together_and_match_one_process():
    model, steps = _loop(n=6)
    configs = [("fbcache", 0.4), ("teacache", 0.2)]
    single = [run_cached_loop(model, steps, m, th) for m, th in configs]
    ranks = spawn_cached_loop(model, steps, configs, world_size=2)  # 24 video tokens -> 12 per rank
    for k, (outs_1, stats_1) in enumerate(single):
        assert not all(all(c) for c in stats_1["computed"])  # something is skipped
        for rank in ranks:
            assert rank[k]["stats"]["computed"] == stats_1["computed"], configs[k]
            for o, r in zip(rank[k]["outs"], outs_1):
                assert float((o - r).abs().max() / r.abs().max()) <= 1e-5


# ---- bad inputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, threshold, message", [
    ("tea", 0.1, "cache mode must be 'off', 'fbcache' or 'teacache', got 'tea'"),
    ("fbcache", -0.1, "cache threshold must be a finite number >= 0 .* got -0.1"),
    ("teacache", math.nan, "got nan"),
    ("teacache", "0.1", "got '0.1'"),
    ("teacache", True, "got True"),
    ("off", 0.2, r"a cache threshold \(0.2\) needs a cache mode"),
])
def test_bad_mode_or_threshold_is_refused_by_name(mode, threshold, message):
    with pytest.raises(ValueError, match=message):
        check_cache_args(mode, threshold)
    if mode != "off":
        with pytest.raises(ValueError, match=message):
            StepCache(None, mode, threshold)  # checked before the target is looked at


def test_defaults_and_misuse_are_explained():
    assert check_cache_args("fbcache", None) == ("fbcache", 0.06) and check_cache_args(None, None) == (None, None)
    model, steps = _loop(n=3)
    with pytest.raises(ValueError, match=r"coefficients must be finite numbers.*got \('a',\)"):
        StepCache(model, "teacache", 0.1, coefficients=["a"])
    with pytest.raises(TypeError, match="needs a HYVideoDiffusionTransformer.*got Linear"):
        StepCache(torch.nn.Linear(2, 2), "fbcache", 0.1)
    cache = StepCache(model, "fbcache", 0.1)
    with pytest.raises(RuntimeError, match=r"call begin\(num_steps\) before set_step"):
        cache.set_step(0)
    with torch.no_grad(), cache:
        with pytest.raises(RuntimeError, match="already has its double_stream / single_stream replaced"):
            StepCache(model, "teacache", 0.1).attach()
        with pytest.raises(RuntimeError, match="does not know the step"):
            model(**steps[0])
        cache.begin(3)
        with pytest.raises(ValueError, match=r"step must be in \[0, 2\], got 3"):
            cache.set_step(3)
        cache.set_step(0)
        model(**steps[0])
        with pytest.raises(RuntimeError, match="second DiT call at step 0"):
            model(**steps[0])
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 2\], got 3"):
        cache.begin(3, start_step=3)


def test_attention_recording_is_refused_with_a_cache():
    from hvlab.inspection import AttentionRecorder

    pipe = random_pipeline("tiny")
    with StepCache(pipe, "teacache", 0.1), AttentionRecorder(pipe, steps=[1]):
        with pytest.raises(ValueError, match="AttentionRecorder records"):
            pipe("a red circle", seed=0, num_inference_steps=3)


# ---- the command line -------------------------------------------------------------------------------------
def test_cli_records_the_cache_and_the_settings_reproduce_it(tmp_path):
    from hvlab import cli

    def generate(*argv):
        return cli.cmd_generate(cli.build_parser().parse_args(["generate", *argv, "--quiet"]))

    common = ["a red circle", "--model", "tiny-random", "--seed", "1", "--cfg-scale", "3", "--infer-steps", "8",
              "--preview-every", "0", "--no-gif"]
    out_dir, out = generate(*common, "--cache", "teacache", "--cache-threshold", "0.3", "--save-path",
                            str(tmp_path / "a"))
    s = json.loads((out_dir / "settings.json").read_text())
    assert s["run"]["cache"] == "teacache" and s["run"]["cache_threshold"] == 0.3
    assert s["timings"]["cache"]["dit_forwards"] < s["timings"]["cache"]["dit_forwards_uncached"] == 16
    again_dir, again = generate("--from-settings", str(out_dir / "settings.json"), "--save-path", str(tmp_path / "b"))
    assert torch.equal(again.latents, out.latents)
    assert json.loads((again_dir / "settings.json").read_text())["timings"]["cache"] == s["timings"]["cache"]
    _, off = generate("--from-settings", str(out_dir / "settings.json"), "--cache", "off", "--save-path",
                      str(tmp_path / "c"))
    assert "cache" not in off.timings and not torch.equal(off.latents, out.latents)


@pytest.mark.parametrize("argv, message", [
    (["--cache-threshold", "0.1"], "a cache threshold (0.1) needs a cache mode"),
    (["--cache", "fbcache", "--cache-threshold", "-1"], "cache threshold must be a finite number >= 0"),
])
def test_cli_bad_cache_arguments_exit_with_a_message(argv, message, capsys, tmp_path):
    from hvlab import cli

    with pytest.raises(SystemExit) as err:
        cli.main(["generate", "a red circle", "--model", "tiny-random", "--quiet", "--save-path", str(tmp_path), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # one "error:" line, exit code 2, like every other mistake
        cli.main(["generate", "a red circle", "--model", "tiny-random", "--cache", "teacache", "--record-attention",
                  "auto", "--save-path", str(tmp_path)])
    assert err.value.code == 2 and "--record-attention needs every step" in capsys.readouterr().err


# ---- the toy evaluation's bookkeeping (on the tiny random model: fast; the toy run is in docs/benchmarks.md) --
def test_cache_eval_counts_forwards_and_scores_against_the_uncached_videos(tmp_path):
    from hvlab.toy.cache_eval import evaluate_cache, parse_configs, psnr

    pipe = random_pipeline("tiny")
    pipe.defaults.update(guidance_scale=3.0, num_inference_steps=4)  # true CFG: two rows per video
    configs = parse_configs(["fbcache:0", "teacache:1e9"])
    res = evaluate_cache(pipe, configs, n=1, batch=1, out=str(tmp_path / "r.json"), log=lambda *a: None)
    off, zero, high = res["runs"]
    assert off["forwards_per_video"] == zero["forwards_per_video"] == 8 and off["n"] == 2
    assert zero["psnr_mean"] == math.inf and zero["attribute_acc_change_points"] == 0  # threshold 0: the same videos
    assert high["forwards_per_video"] == 4 and high["forward_ratio"] == 2.0  # first and last step of both rows
    assert high["psnr_mean"] < 60
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res, default=str))
    v = torch.rand(3, 2, 4, 4)
    assert psnr(v, v) == math.inf and psnr((v + 0.1).clamp(0, 1), v) == pytest.approx(
        10 * math.log10(1 / float((((v + 0.1).clamp(0, 1) - v) ** 2).mean())))
    with pytest.raises(ValueError, match=r"a configuration is MODE:THRESHOLD.*got 'teacache'"):
        parse_configs(["teacache"])
    with pytest.raises(ValueError, match="cache mode must be .* got 'tea'"):
        parse_configs(["tea:0.1"])


def test_bench_cache_quick_writes_every_measurement(tmp_path):
    import importlib.util
    import os

    from hvlab import attention

    spec = importlib.util.spec_from_file_location("bench_cache", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "bench_cache.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backend = attention.get_attention_backend()
    try:  # main() picks hvlab's attention backend, a global: put it back for the tests that follow
        report = bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)])
    finally:
        attention.set_attention_backend(backend)
    saved = json.loads((tmp_path / "bench_cache.json").read_text())
    assert saved == json.loads(json.dumps(report)) and set(saved["modes"]) == {"fbcache", "teacache"}
    for m in saved["modes"].values():  # the projection is the formula it claims, for every K
        assert all(m[k] > 0 for k in ("computed_s", "skipped_s", "check_s"))
        for k, v in m["projection_s"].items():
            assert v == pytest.approx(int(k) * m["computed_s"] + (50 - int(k)) * m["skipped_s"])
        assert m["overhead_s"] == pytest.approx(m["computed_s"] - saved["uncached_s"])
