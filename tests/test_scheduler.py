"""FlowMatchDiscreteScheduler: the official numbers, diffusers parity, and exactness on straight flows."""
import io
import math

import numpy as np
import pytest
import torch

from hvlab.scheduler import (FlowMatchDiscreteScheduler, add_noise, plot_sigma_schedule, predicted_x0,
                             sample_training_sigmas)


def make(n=50, **kw):
    s = FlowMatchDiscreteScheduler(**kw)
    s.set_timesteps(n)
    return s


def test_official_timesteps_for_50_steps_shift_7():
    # Reference section 5: the numbers the official sampler feeds the DiT.
    s = make(50, shift=7.0, reverse=True)
    t = [round(x, 2) for x in s.timesteps.tolist()]
    assert t[:3] == [1000.0, 997.09, 994.08]
    assert t[-5:] == [437.5, 378.38, 308.82, 225.81, 125.0]
    assert s.timesteps.shape == (50,) and s.sigmas.shape == (51,)
    assert s.timesteps.dtype == torch.float32 and s.sigmas.dtype == torch.float32
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    assert torch.all(s.sigmas[1:] < s.sigmas[:-1])


def test_defaults_are_the_official_cli():
    s = FlowMatchDiscreteScheduler()
    assert (s.num_train_timesteps, s.shift, s.reverse, s.solver) == (1000, 7.0, True, "euler")


def test_matches_diffusers_flow_match_scheduler():
    # diffusers' HunyuanVideo pipeline: FlowMatchEulerDiscreteScheduler(shift) fed linspace(1, 0, n + 1)[:-1].
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 30
    ref = FlowMatchEulerDiscreteScheduler(shift=9.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])
    ours = make(n, shift=9.0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), atol=1e-6, rtol=0)
    # timesteps up to 1000 in float32 (one ulp 6e-5): measured 1.2e-4, two ulps
    torch.testing.assert_close(ours.timesteps, ref.timesteps.float(), atol=3e-4, rtol=0)

    g = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(2, 4, 3, 5, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x_ours.shape, generator=g)
        x_ours = ours.step(v, i, x_ours)
        x_ref = ref.step(v, t, x_ref).prev_sample
    # 30 Euler steps in float32, the sigma differences rounded apart: measured max 6.0e-7
    torch.testing.assert_close(x_ours, x_ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 7.0, 17.0])
def test_euler_is_exact_on_a_straight_flow(shift):
    # x_sigma = (1 - sigma) x0 + sigma noise has constant velocity noise - x0, so every Euler step
    # lands exactly on the line, whatever the grid.
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    s = make(50, shift=shift)
    x = noise.clone()
    for i in range(50):
        x = s.step(noise - x0, i, x)
        torch.testing.assert_close(x, add_noise(x0, noise, s.sigmas[i + 1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_without_reverse_sigmas_run_from_0_to_1():
    fwd, rev = make(20, shift=7.0, reverse=False), make(20, shift=7.0, reverse=True)
    assert fwd.sigmas[0] == 0.0 and fwd.sigmas[-1] == 1.0
    assert torch.all(fwd.sigmas[1:] > fwd.sigmas[:-1])
    torch.testing.assert_close(fwd.sigmas, 1 - rev.sigmas)
    # Integrating forward turns data into noise on the same straight line.
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    x = x0
    for i in range(20):
        x = fwd.step(noise - x0, i, x)
    torch.testing.assert_close(x, noise, atol=1e-6, rtol=0)  # 20 float32 steps: measured max 2.4e-7


def test_shift_1_is_a_uniform_grid_and_shift_spends_steps_at_high_noise():
    torch.testing.assert_close(make(10, shift=1.0).sigmas, torch.linspace(1, 0, 11))
    s1, s7 = make(50, shift=1.0).sigmas, make(50, shift=7.0).sigmas
    assert torch.all(s7[1:-1] > s1[1:-1])
    assert int((s7[:-1] > 0.5).sum()) > 40  # most of the 50 steps start above sigma 0.5


@pytest.mark.parametrize("kw, match", [
    (dict(shift=0.0), "shift must be"), (dict(shift=-1.0), "shift must be"), (dict(shift=float("nan")), "shift"),
    (dict(solver="heun"), "solver must be one of"), (dict(num_train_timesteps=0), "num_train_timesteps"),
])
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchDiscreteScheduler(**kw)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_step_counts(n):
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        FlowMatchDiscreteScheduler().set_timesteps(n)


def test_step_accepts_index_timestep_value_or_none():
    g = torch.Generator().manual_seed(2)
    x, vs = torch.randn(2, 5, generator=g), [torch.randn(2, 5, generator=g) for _ in range(6)]
    by_index, by_value, by_bf16_value, implicit = make(6), make(6), make(6), make(6)
    xa = xb = xc = xd = x
    for i in range(6):
        t = by_value.timesteps[i]
        xa = by_index.step(vs[i], i, xa)
        xb = by_value.step(vs[i], float(t), xb)
        xc = by_bf16_value.step(vs[i], t.expand(2).to(torch.bfloat16), xc)  # batched, rounded timesteps
        xd = implicit.step(vs[i], None, xd)
        assert implicit.step_index == i + 1
    for other in (xb, xc, xd):
        torch.testing.assert_close(other, xa)


def test_step_errors():
    s = FlowMatchDiscreteScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(torch.zeros(1), 0, torch.zeros(1))
    s.set_timesteps(4)
    with pytest.raises(IndexError, match=r"\[0, 3\]"):
        s.step(torch.zeros(1), 4, torch.zeros(1))
    with pytest.raises(ValueError, match="not on this schedule"):
        s.step(torch.zeros(1), 123.0, torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(2), 0, torch.zeros(1))


def test_step_computes_in_fp32_and_returns_the_sample_dtype():
    s = make(50)
    x = torch.randn(4, 64).to(torch.bfloat16)
    v = torch.randn(4, 64).to(torch.bfloat16)
    out = s.step(v, 10, x)
    expected = (x.float() + v.float() * (s.sigmas[11] - s.sigmas[10])).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_training_helpers_invert_each_other_per_sample():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    xt = add_noise(x0, noise, sigma)
    for b in range(3):
        torch.testing.assert_close(xt[b], (1 - sigma[b]) * x0[b] + sigma[b] * noise[b])
    torch.testing.assert_close(predicted_x0(xt, noise - x0, sigma), x0, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 values but the batch has 3"):
        add_noise(x0, noise, torch.tensor([0.1, 0.2]))


def test_training_sigmas_follow_the_shifted_uniform_law():
    g = torch.Generator().manual_seed(4)
    sig = sample_training_sigmas(20000, shift=3.0, generator=g)
    assert sig.shape == (20000,) and sig.dtype == torch.float32
    assert 0 <= float(sig.min()) and float(sig.max()) <= 1
    # The shift is monotone, so quantiles map through it: median = 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    for q in (0.25, 0.5, 0.9):
        assert abs(float(sig.quantile(q)) - 3 * q / (1 + 2 * q)) < 0.015
    again = sample_training_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sig, again)
    with pytest.raises(ValueError, match="shift"):
        sample_training_sigmas(4, shift=0.0)


def test_plot_sigma_schedule_is_headless_and_draws_each_shift():
    import matplotlib.figure

    shifts = (1.0, 7.0, 17.0)
    fig = plot_sigma_schedule(shifts=shifts, num_inference_steps=20)
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == len(shifts)
    assert "per shift" in ax.get_title()
    for line, shift in zip(lines, shifts):
        np.testing.assert_allclose(line.get_ydata(), make(20, shift=shift).sigmas.numpy())
    assert len(fig.axes) == 2  # the histogram of where steps are spent
    fig.savefig(io.BytesIO(), format="png")  # renders without any display

    import matplotlib.figure as mf
    own = mf.Figure()
    ax2 = own.subplots()
    assert plot_sigma_schedule(ax=ax2) is own and len(own.axes) == 1
    with pytest.raises(ValueError):
        plot_sigma_schedule(num_inference_steps=0)
