"""Tests for the sampler section of generate.py.

Reference problem: data x0 ~ N(mu, s^2) independently per dimension, noise
eps ~ N(0, 1), linear path x_t = (1 - t) x0 + t eps.  Then

    x_t ~ N((1 - t) mu, sigma_t^2),  sigma_t = sqrt((1 - t)^2 s^2 + t^2),
    v(x, t) = E[eps - x0 | x_t = x] = -mu + sigma_t'/sigma_t * (x - (1 - t) mu),
    sigma_t' = (t - (1 - t) s^2) / sigma_t,
    score(x, t) = -(x - (1 - t) mu) / sigma_t^2,

and the exact ODE flow is x_t = (1 - t) mu + sigma_t x1, so it maps x1 to
x0 = mu + s x1.  The first group of tests checks these formulas numerically
(finite differences, continuity equation, Monte Carlo regression) so the
sampler tests rest on a self-validated reference.
"""

import math

import pytest
import torch

import generate as G

MU = torch.tensor([0.7, -1.2, 0.0], dtype=torch.float64)
S = torch.tensor([0.3, 0.8, 1.5], dtype=torch.float64)


@pytest.fixture(autouse=True)
def _float64_default():
    """Tensors created in these tests default to float64; restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------
# Analytic reference (independent of generate.py)
# --------------------------------------------------------------------------


def sigma(t, s=S):
    return torch.sqrt((1 - t) ** 2 * s**2 + t**2)


def dsigma(t, s=S):
    return (t - (1 - t) * s**2) / sigma(t, s)


def exact_velocity(x, t, mu=MU, s=S):
    """x: [B, D]; t: python float or 0-d tensor."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return -mu + dsigma(t, s) / sigma(t, s) * (x - (1 - t) * mu)


def exact_score(x, t, mu=MU, s=S):
    t = torch.as_tensor(t, dtype=x.dtype)
    return -(x - (1 - t) * mu) / sigma(t, s) ** 2


def log_density(x, t, mu=MU, s=S):
    t = torch.as_tensor(t, dtype=x.dtype)
    sg = sigma(t, s)
    return -0.5 * ((x - (1 - t) * mu) / sg) ** 2 - torch.log(sg) - 0.5 * math.log(2 * math.pi)


def model(mu=MU, s=S):
    """A velocity_fn in the sampler calling convention (t has shape [B])."""

    def fn(x, t):
        assert t.shape == (x.shape[0],)
        assert torch.all(t == t[0])
        return exact_velocity(x, t[0], mu, s)

    return fn


def ref_shift(t, s):
    return s * t / (1 + (s - 1) * t)


def ref_unshift(tp, s):
    return tp / (s - (s - 1) * tp)


# --------------------------------------------------------------------------
# Self-validation of the analytic reference
# --------------------------------------------------------------------------

T_CHECK = [0.02, 0.1, 0.3, 0.5, 0.8, 0.97]


@pytest.mark.parametrize("t", T_CHECK)
def test_reference_dsigma_matches_finite_difference(t):
    h = 1e-6
    fd = (sigma(torch.tensor(t + h)) - sigma(torch.tensor(t - h))) / (2 * h)
    torch.testing.assert_close(dsigma(torch.tensor(t)), fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("t", T_CHECK)
def test_reference_velocity_solves_continuity_equation(t):
    # d p / dt + d (p v) / dx = 0, by central differences on a grid of x.
    x = torch.linspace(-4, 4, 41).unsqueeze(1) * torch.ones(1, 3)
    h = 1e-5

    def p(x, t):
        return torch.exp(log_density(x, t))

    dp_dt = (p(x, t + h) - p(x, t - h)) / (2 * h)
    flux = lambda x: p(x, t) * exact_velocity(x, t)  # noqa: E731
    dflux_dx = (flux(x + h) - flux(x - h)) / (2 * h)
    torch.testing.assert_close(dp_dt + dflux_dx, torch.zeros_like(x), rtol=0, atol=1e-6)
    # ...and the check is not vacuous: a wrong velocity violates it.
    bad = lambda x: p(x, t) * (exact_velocity(x, t) * 1.05)  # noqa: E731
    residual = dp_dt + (bad(x + h) - bad(x - h)) / (2 * h)
    assert residual.abs().max() > 1e-3


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_reference_velocity_is_conditional_expectation(t):
    # Linear least squares of (eps - x0) on x_t recovers E[eps - x0 | x_t]
    # (exact for jointly Gaussian variables).
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = MU + S * torch.randn(n, 3, generator=g)
    eps = torch.randn(n, 3, generator=g)
    xt = (1 - t) * x0 + t * eps
    target = eps - x0
    xc = xt - xt.mean(0)
    slope = (xc * (target - target.mean(0))).mean(0) / (xc**2).mean(0)
    intercept = target.mean(0) - slope * xt.mean(0)
    # exact_velocity(x) = a x + b
    b = exact_velocity(torch.zeros(1, 3), t)[0]
    a = exact_velocity(torch.ones(1, 3), t)[0] - b
    torch.testing.assert_close(slope, a, rtol=0, atol=0.01)
    torch.testing.assert_close(intercept, b, rtol=0, atol=0.02)


def test_reference_flow_map_trajectory():
    # x_t = (1 - t) mu + sigma_t x1 satisfies dx/dt = v(x_t, t), x_1 = x1, x_0 = mu + s x1.
    x1 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    traj = lambda t: (1 - t) * MU + sigma(torch.tensor(t)) * x1  # noqa: E731
    torch.testing.assert_close(traj(1.0), x1)
    torch.testing.assert_close(traj(0.0), MU + S * x1)
    h = 1e-6
    for t in T_CHECK:
        fd = (traj(t + h) - traj(t - h)) / (2 * h)
        torch.testing.assert_close(exact_velocity(traj(t), t), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("t", T_CHECK)
def test_reference_score_is_grad_log_density(t):
    x = torch.linspace(-3, 3, 13).unsqueeze(1) * torch.ones(1, 3)
    h = 1e-6
    fd = (log_density(x + h, t) - log_density(x - h, t)) / (2 * h)
    torch.testing.assert_close(exact_score(x, t), fd, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Score / drift identities
# --------------------------------------------------------------------------


@pytest.mark.parametrize("t", T_CHECK + [1.0])
def test_score_from_velocity_matches_gaussian_score(t):
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2)) * 2
    score = G.score_from_velocity(exact_velocity(x, t), x, t)
    torch.testing.assert_close(score, exact_score(x, t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", T_CHECK)
def test_sde_drift_formula(t):
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    v = exact_velocity(x, t)
    # v - 0.5 * w(t) * score with w(t) = 2t
    expected = v - 0.5 * (2 * t) * exact_score(x, t)
    torch.testing.assert_close(G.sde_drift(v, x, t), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------
# Time grids and shift
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0, math.sqrt(2), 4.0])
def test_shift_formula_and_inverse(shift):
    t = torch.linspace(0, 1, 101)
    tp = G.shift_time(t, shift)
    torch.testing.assert_close(tp, ref_shift(t, shift))
    torch.testing.assert_close(ref_unshift(tp, shift), t)
    assert float(tp[0]) == 0.0 and abs(float(tp[-1]) - 1.0) < 1e-15
    assert torch.all(tp[1:] > tp[:-1])
    if shift > 1:
        assert torch.all(tp[1:-1] > t[1:-1])  # shifted towards noise
    # works on python floats too
    assert abs(G.shift_time(0.25, shift) - ref_shift(0.25, shift)) < 1e-15


def test_shift_one_is_identity():
    t = torch.rand(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(G.shift_time(t, 1.0), t)
    assert torch.equal(G.ode_time_grid(7, 1.0), torch.linspace(1, 0, 8, dtype=torch.float64))


def test_time_shift_for_shape():
    assert G.time_shift_for_shape((4, 32, 32)) == pytest.approx(1.0)
    assert G.time_shift_for_shape((32, 16, 16)) == pytest.approx(math.sqrt(2))
    assert G.time_shift_for_shape((16, 32, 32)) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        G.time_shift_for_shape((8, 4, 32, 32))


@pytest.mark.parametrize("num_steps", [1, 2, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_time_grid(num_steps, shift):
    ts = G.ode_time_grid(num_steps, shift)
    assert ts.dtype == torch.float64
    assert ts.shape == (num_steps + 1,)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert torch.all(ts[1:] < ts[:-1])
    base = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    torch.testing.assert_close(ts, ref_shift(base, shift), rtol=0, atol=1e-14)


@pytest.mark.parametrize("num_steps", [2, 5, 250])
@pytest.mark.parametrize("shift", [1.0, 2.0])
@pytest.mark.parametrize("t_last", [0.04, 0.01])
def test_sde_time_grid(num_steps, shift, t_last):
    ts = G.sde_time_grid(num_steps, shift, t_last)
    assert ts.dtype == torch.float64
    assert ts.shape == (num_steps + 1,)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert torch.all(ts[1:] < ts[:-1])
    assert float(ts[-2]) == pytest.approx(ref_shift(t_last, shift), rel=1e-12)
    expected = torch.cat([torch.linspace(1, t_last, num_steps, dtype=torch.float64), torch.zeros(1)])
    torch.testing.assert_close(ts, ref_shift(expected, shift), rtol=0, atol=1e-14)


def test_grid_argument_validation():
    with pytest.raises(ValueError):
        G.ode_time_grid(0)
    with pytest.raises(ValueError):
        G.sde_time_grid(10, t_last=0.0)
    with pytest.raises(ValueError):
        G.shift_time(0.5, 0.0)


# --------------------------------------------------------------------------
# ODE samplers: convergence order to the exact flow map
# --------------------------------------------------------------------------


def _ode_errors(sampler, steps, shift):
    x1 = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    target = MU + S * x1
    return [(sampler(model(), x1, n, shift=shift) - target).abs().max().item() for n in steps]


STEPS = [8, 16, 32, 64]


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_euler_first_order_convergence(shift):
    errs = _ode_errors(G.euler_ode, STEPS, shift)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 0.1, errs  # max over 64x3 samples, |x1| up to ~3
    for r in ratios[1:]:
        assert 1.8 < r < 2.2, (errs, ratios)


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_heun_second_order_convergence(shift):
    errs = _ode_errors(G.heun_ode, STEPS, shift)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert errs[-1] < 2e-3, errs
    for r in ratios[1:]:
        assert 3.6 < r < 4.4, (errs, ratios)
    # Heun beats Euler at equal NFE.
    assert _ode_errors(G.heun_ode, [16], shift)[0] < _ode_errors(G.euler_ode, [32], shift)[0]


def test_euler_single_step_by_hand():
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    out = G.euler_ode(model(), x1, 1)
    torch.testing.assert_close(out, x1 - exact_velocity(x1, 1.0))


def test_heun_two_steps_by_hand():
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    shift = 3.0
    ts = [1.0, ref_shift(0.5, shift), 0.0]
    x = x1.clone()
    for t, tn in zip(ts, ts[1:]):
        dt = tn - t
        k1 = exact_velocity(x, t)
        k2 = exact_velocity(x + dt * k1, tn)
        x = x + dt * (k1 + k2) / 2
    torch.testing.assert_close(G.heun_ode(model(), x1, 2, shift=shift), x, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# Euler-Maruyama SDE
# --------------------------------------------------------------------------


def _hand_em(x1, num_steps, noises, shift=1.0, t_last=0.04):
    """Reference recursion written from the closed forms (analytic score)."""
    base = [1 - (1 - t_last) * k / (num_steps - 1) for k in range(num_steps)] if num_steps > 1 else [1.0]
    ts = [ref_shift(t, shift) for t in base] + [0.0]
    x = x1.clone()
    for i in range(num_steps):
        t, tn = ts[i], ts[i + 1]
        dt = tn - t
        drift = exact_velocity(x, t) - 0.5 * (2 * t) * exact_score(x, t)
        x = x + drift * dt
        if i < num_steps - 1:
            x = x + math.sqrt(2 * t * abs(dt)) * noises[i]
    return x


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_em_matches_hand_recursion_with_given_noise(shift):
    n = 12
    x1 = torch.randn(8, 3, generator=torch.Generator().manual_seed(8))
    noises = [torch.randn(8, 3, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]
    out = G.euler_maruyama_sde(model(), x1, n, lambda i: noises[i], shift=shift)
    torch.testing.assert_close(out, _hand_em(x1, n, noises, shift), rtol=1e-12, atol=1e-12)


def test_em_last_step_is_noise_free():
    n = 10
    x1 = torch.randn(8, 3, generator=torch.Generator().manual_seed(9))
    calls = []

    def zeros(i):
        calls.append(i)
        return torch.zeros(8, 3)

    out = G.euler_maruyama_sde(model(), x1, n, zeros)
    assert calls == list(range(n - 1))
    torch.testing.assert_close(out, _hand_em(x1, n, [torch.zeros(8, 3)] * n), rtol=1e-12, atol=1e-12)

    # noise_fn is never asked for the last interval's noise.
    def noisy(i):
        assert i < n - 1
        return torch.zeros(8, 3)

    torch.testing.assert_close(G.euler_maruyama_sde(model(), x1, n, noisy), out)


def _exact_discrete_law(num_steps, shift, t_last, mu, s):
    """Mean and variance of the EM output for x1 ~ N(0, 1), per dimension.

    Each step is affine in x for the Gaussian model: x' = A x + B + C z.
    """
    base = [1 - (1 - t_last) * k / (num_steps - 1) for k in range(num_steps)]
    ts = [ref_shift(t, shift) for t in base] + [0.0]
    m = torch.zeros_like(mu)
    var = torch.ones_like(mu)
    for i in range(num_steps):
        t, tn = ts[i], ts[i + 1]
        dt = tn - t
        a = dsigma(torch.tensor(t), s) / sigma(torch.tensor(t), s)  # v = a x + b
        b = -mu - a * (1 - t) * mu
        k = 1 / sigma(torch.tensor(t), s) ** 2  # score = -k x + k (1-t) mu
        A = 1 + dt * (a + t * k)
        B = dt * (b - t * k * (1 - t) * mu)
        C2 = 2 * t * abs(dt) if i < num_steps - 1 else 0.0
        m = A * m + B
        var = A**2 * var + C2
    return m, var


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_em_sample_statistics(shift):
    n_samples, num_steps, t_last = 20_000, 250, 0.04
    mu = torch.tensor([0.7, -1.2])
    s = torch.tensor([0.3, 0.8])
    x1 = torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(10))

    def noise_fn(i):
        return torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(1_000 + i))

    out = G.euler_maruyama_sde(model(mu, s), x1, num_steps, noise_fn, shift=shift, t_last=t_last)
    assert out.dtype == torch.float64
    mean, std = out.mean(0), out.std(0)

    # 1) Tight: the exact law of the discretised scheme (4 standard errors).
    m_ref, var_ref = _exact_discrete_law(num_steps, shift, t_last, mu, s)
    std_ref = var_ref.sqrt()
    se_mean = std_ref / math.sqrt(n_samples)
    se_std = std_ref / math.sqrt(2 * n_samples)
    assert torch.all((mean - m_ref).abs() < 4 * se_mean), (mean, m_ref)
    assert torch.all((std - std_ref).abs() < 4 * se_std), (std, std_ref)

    # 2) Against the data distribution.  The mean is unbiased for any grid.
    #    The single deterministic step from shift(t_last) to 0 shrinks the
    #    spread: ~3% for s = 0.3 at shift 1 (t = 0.04), ~10% at shift 2
    #    (t = 0.077), so the std check against s is made at shift 1 only;
    #    the t_last -> 0 limit is checked in the next test.
    assert torch.all((mean - mu).abs() < 4 * s / math.sqrt(n_samples)), (mean, mu)
    if shift == 1.0:
        assert torch.all((std / s - 1).abs() < 0.04), (std, s)


def test_em_law_approaches_data_as_t_last_shrinks():
    # Uses the exact discrete law only (no sampling): with small t_last and
    # many steps the scheme's output law converges to N(mu, s^2).
    mu = torch.tensor([0.7, -1.2])
    s = torch.tensor([0.3, 0.8])
    m, var = _exact_discrete_law(4000, 1.0, 0.002, mu, s)
    torch.testing.assert_close(m, mu, rtol=0, atol=1e-3)
    torch.testing.assert_close(var.sqrt(), s, rtol=5e-3, atol=0)


# --------------------------------------------------------------------------
# NFE, progress, dtypes, registry
# --------------------------------------------------------------------------


class Counting:
    def __init__(self):
        self.calls = 0
        self.ts = []

    def __call__(self, x, t):
        self.calls += 1
        self.ts.append(float(t[0]))
        return exact_velocity(x, t[0])


@pytest.mark.parametrize("name", ["euler", "heun", "euler_maruyama"])
@pytest.mark.parametrize("num_steps", [1, 5, 17])
def test_nfe_and_progress(name, num_steps):
    spec = G.SAMPLERS[name]
    x1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(11))
    f = Counting()
    ticks = []
    kwargs = {"progress": ticks.append}
    if spec.stochastic:
        kwargs["noise_fn"] = lambda i: torch.zeros(3, 3)
    spec.fn(f, x1, num_steps, **kwargs)
    assert f.calls == G.nfe(name, num_steps) == G.nfe(spec, num_steps)
    assert ticks == [1] * num_steps
    assert f.ts[0] == 1.0
    if name == "heun":
        assert f.ts[-1] == 0.0
    else:
        assert all(t > 0 for t in f.ts)


def test_nfe_values():
    assert G.nfe("euler", 50) == 50
    assert G.nfe("heun", 50) == 100
    assert G.nfe("euler_maruyama", 250) == 250
    assert set(G.SAMPLERS) == {"euler", "heun", "euler_maruyama"}


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["euler", "heun", "euler_maruyama"])
def test_computes_in_float32(in_dtype, name):
    spec = G.SAMPLERS[name]
    x1 = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(12)).to(in_dtype)
    seen = []

    def fn(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return -x

    kwargs = {"noise_fn": lambda i: torch.zeros(4, 2, 2)} if spec.stochastic else {}
    out = spec.fn(fn, x1, 3, **kwargs)
    assert out.dtype == torch.float32
    assert out.shape == x1.shape
    assert all(s == (torch.float32, torch.float32, (4,)) for s in seen)


def test_input_not_modified_and_shape_checked():
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(13))
    before = x1.clone()
    G.euler_ode(model(), x1, 4)
    G.heun_ode(model(), x1, 4)
    G.euler_maruyama_sde(model(), x1, 4, lambda i: torch.ones(4, 3))
    assert torch.equal(x1, before)
    with pytest.raises(ValueError):
        G.euler_ode(lambda x, t: x[:, :2], x1, 2)
    with pytest.raises(ValueError):
        G.euler_maruyama_sde(model(), x1, 3, lambda i: torch.zeros(4, 2))
