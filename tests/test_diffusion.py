"""Tests of diffreg.diffusion: schedules (vs MONAI), the forward process, and samplers with oracle models."""

from __future__ import annotations

import math

import pytest
import torch

from diffreg.diffusion import (NoiseSchedule, SamplerStep, cosine_beta_schedule, ddim_invert, ddim_sample,
                               ddim_timesteps, ddpm_sample, final, linear_beta_schedule, predict_x0, q_sample)


def test_linear_schedule_endpoints_and_monai():
    from monai.networks.schedulers import DDPMScheduler

    betas = linear_beta_schedule()
    assert betas.dtype == torch.float64 and betas.shape == (2000,)
    assert math.isclose(float(betas[0]), 1e-6) and math.isclose(float(betas[-1]), 1e-2)
    assert torch.allclose(torch.diff(betas), torch.full((1999,), (1e-2 - 1e-6) / 1999, dtype=torch.float64))
    s = NoiseSchedule(betas)
    monai = DDPMScheduler(num_train_timesteps=2000, schedule="linear_beta", beta_start=1e-6, beta_end=1e-2)
    assert torch.allclose(monai.betas.double(), betas, rtol=1e-5, atol=1e-9)  # MONAI: linear in beta, float32
    assert torch.allclose(monai.alphas_cumprod.double(), s.alphas_cumprod, rtol=1e-4, atol=1e-7)
    assert 0 < float(s.alphas_cumprod[-1]) < 1e-3  # x_T is almost pure noise
    assert float(s.alphas_cumprod_prev[0]) == 1.0 and float(s.posterior_variance[0]) == 0.0
    assert s.num_timesteps == len(s) == 2000


def test_cosine_schedule_and_monai():
    from monai.networks.schedulers import DDPMScheduler

    betas = cosine_beta_schedule(1000)
    assert betas.shape == (1000,) and float(betas.max()) <= 0.999 and float(betas.min()) > 0
    s = NoiseSchedule(betas)
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
    assert torch.allclose(monai.alphas_cumprod.double(), s.alphas_cumprod, atol=1e-5)
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.2]))
    with pytest.raises(ValueError):
        linear_beta_schedule(steps=0)


def test_q_sample_statistics_and_inversions():
    s = NoiseSchedule.linear(1e-4, 2e-2, 1000)
    x0 = torch.full((4000, 3), 2.0, dtype=torch.float64)
    t = torch.full((4000,), 300, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    xt = s.q_sample(x0, t, generator=g)
    abar = float(s.alphas_cumprod[300])
    assert abs(float(xt.mean()) - 2 * math.sqrt(abar)) < 0.03
    assert abs(float(xt.std()) - math.sqrt(1 - abar)) < 0.03
    # broadcasting over any shape, per-sample t; functional forms agree; x0 / eps inversions are exact
    x0 = torch.randn(3, 2, 5, 6, 7, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(s, x0, t, eps)
    for b in range(3):
        ab = float(s.alphas_cumprod[t[b]])
        assert torch.allclose(xt[b], math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * eps[b], atol=1e-6)
    assert xt.dtype == torch.float32
    assert torch.allclose(predict_x0(s, xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps(xt, t, x0), eps, atol=1e-4)
    snr = s.snr(t)
    assert snr.shape == (3,) and bool(torch.all(snr[:-1] > snr[1:]))
    with pytest.raises(ValueError):
        s.q_sample(x0, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        s.q_sample(x0, torch.tensor([0, 1, 1000]))


def test_posterior_matches_bayes():
    """The posterior q(x_{t-1} | x_t, x0) from the closed form equals the Gaussian product
    q(x_t | x_{t-1}) q(x_{t-1} | x0), computed directly."""
    s = NoiseSchedule.linear(1e-4, 2e-2, 100)
    t = 40
    x0, xt = torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.3]], dtype=torch.float64)
    mean, var = s.posterior(x0, xt, torch.tensor([t]))
    a_t, ab_prev = float(s.alphas[t]), float(s.alphas_cumprod[t - 1])
    prec = a_t / (1 - a_t) + 1 / (1 - ab_prev)
    ref_mean = (math.sqrt(a_t) * float(xt) / (1 - a_t) + math.sqrt(ab_prev) * float(x0) / (1 - ab_prev)) / prec
    assert math.isclose(float(mean), ref_mean, rel_tol=1e-10)
    assert math.isclose(float(var), 1 / prec, rel_tol=1e-10)


def point_oracle(schedule, x_star):
    """Exact eps for data concentrated at one point x*: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    def eps_fn(x, t):
        return schedule.predict_eps(x, t, x_star.expand_as(x))
    return eps_fn


def gaussian_oracle(schedule, mu, sd):
    """Exact E[eps | x_t] for data x0 ~ N(mu, sd^2 I): sqrt(1-abar) (x_t - sqrt(abar) mu) / (abar sd^2 + 1 - abar)."""
    abar = schedule.alphas_cumprod

    def eps_fn(x, t):
        a = abar[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sd ** 2 + 1 - a)
    return eps_fn


def test_ddpm_and_ddim_recover_the_point_with_an_oracle():
    s = NoiseSchedule.linear(1e-4, 2e-2, 200)
    x_star = torch.tensor([[1.5, -0.5, 0.25]], dtype=torch.float64)
    eps_fn = point_oracle(s, x_star)
    g = torch.Generator().manual_seed(0)
    steps = list(ddpm_sample(eps_fn, torch.randn(4, 3, generator=g, dtype=torch.float64), s, generator=g))
    assert len(steps) == 200 and isinstance(steps[0], SamplerStep)
    assert [st.t for st in steps] == list(range(199, -1, -1)) and steps[-1].t_next == -1
    assert torch.allclose(steps[-1].x_next, x_star.expand(4, 3), atol=1e-6)
    assert torch.allclose(steps[0].x0_hat, x_star.expand(4, 3), atol=1e-8)
    x = final(ddim_sample(eps_fn, (4, 3), s, steps=10, generator=g, device="cpu"))
    # float32 start: DDIM with the oracle returns x* exactly up to float32 rounding
    assert torch.allclose(x.double(), x_star.expand(4, 3), atol=1e-5)
    x = final(ddim_sample(eps_fn, torch.randn(4, 3, generator=g, dtype=torch.float64), s, steps=10, eta=1.0,
                          generator=g))
    assert torch.allclose(x, x_star.expand(4, 3), atol=1e-10)


def test_ddpm_samples_a_gaussian_data_distribution():
    """With the exact eps of N(mu, sd^2) data, ancestral DDPM sampling produces that distribution. (T = 200 leaves
    abar_T = 0.13, so x_T is drawn from the exact marginal N(sqrt(abar_T) mu, abar_T sd^2 + 1 - abar_T).)"""
    s = NoiseSchedule.linear(1e-4, 2e-2, 200)
    mu, sd = 1.0, 0.5
    g = torch.Generator().manual_seed(1)
    ab = float(s.alphas_cumprod[-1])
    xT = math.sqrt(ab) * mu + math.sqrt(ab * sd ** 2 + 1 - ab) * torch.randn(20000, 1, generator=g)
    x = final(ddpm_sample(gaussian_oracle(s, mu, sd), xT, s, generator=g))
    assert abs(float(x.mean()) - mu) < 0.02
    assert abs(float(x.std()) - sd) < 0.02
    x = final(ddim_sample(gaussian_oracle(s, mu, sd), xT, s, steps=50, generator=g))
    assert abs(float(x.mean()) - mu) < 0.02
    assert abs(float(x.std()) - sd) < 0.03


def test_ddim_timesteps_and_start_t():
    s = NoiseSchedule.linear(steps=2000)
    ts = ddim_timesteps(s, 50)
    assert ts[0] == 1999 and ts[-1] == 0 and len(ts) == 50 and len(set(ts)) == 50
    ts = ddim_timesteps(s, 80, start_t=200)  # DiffuseMorph synthesis: forward to t=200, 80 strided steps back
    assert ts[0] == 200 and ts[-1] == 0 and len(set(ts)) == 80 and all(a > b for a, b in zip(ts, ts[1:]))
    # starting from a forward-diffused x_{start_t} of the data point, the oracle reverse returns the point
    x_star = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    eps_fn = point_oracle(s, x_star)
    g = torch.Generator().manual_seed(2)
    xs = s.q_sample(x_star.expand(3, 2), torch.full((3,), 200), generator=g)
    steps = list(ddim_sample(eps_fn, xs, s, steps=80, start_t=200))
    assert steps[0].t == 200 and len(steps) == 80
    assert torch.allclose(steps[-1].x_next, x_star.expand(3, 2), atol=1e-8)
    steps = list(ddpm_sample(eps_fn, xs, s, start_t=200, generator=g))
    assert len(steps) == 201 and torch.allclose(steps[-1].x_next, x_star.expand(3, 2), atol=1e-6)
    with pytest.raises(ValueError):
        ddim_timesteps(s, 300, start_t=200)
    with pytest.raises(ValueError):
        list(ddpm_sample(eps_fn, xs, s, start_t=2000))


def test_ddim_invert_then_sample_round_trip():
    """Inversion is the Euler inverse of eta = 0 DDIM: with the exact eps of Gaussian data (the point oracle is
    its sd -> 0 limit) inversion followed by sampling returns x0; the inverted states are ~ N(0, 1)."""
    s = NoiseSchedule.linear(1e-4, 2e-2, 1000)
    mu, sd = 0.5, 0.8
    eps_fn = gaussian_oracle(s, mu, sd)
    g = torch.Generator().manual_seed(3)
    x0 = mu + sd * torch.randn(4000, 1, generator=g, dtype=torch.float64)
    inv = list(ddim_invert(eps_fn, x0, s, steps=100))
    assert inv[0].t == -1 and inv[0].t_next == 0 and inv[-1].t_next == 999
    assert all(a.t_next < b.t_next for a, b in zip(inv, inv[1:]))
    xT = inv[-1].x_next
    assert abs(float(xT.mean())) < 0.05 and abs(float(xT.std()) - 1.0) < 0.05
    err100 = float((final(ddim_sample(eps_fn, xT, s, steps=100)) - x0).abs().mean())
    # ... far below the distance to a sample from an unrelated latent (~ sd * sqrt(2) * 0.8)
    other = final(ddim_sample(eps_fn, torch.randn(x0.shape, generator=g, dtype=torch.float64), s, steps=100))
    assert err100 < 0.05 * float((other - x0).abs().mean())
    # the round-trip error is the first-order discretisation error: it halves when the steps double
    xT = final(ddim_invert(eps_fn, x0, s, steps=200))
    err200 = float((final(ddim_sample(eps_fn, xT, s, steps=200)) - x0).abs().mean())
    assert 0.4 < err200 / err100 < 0.6
    # point data: the round trip returns the point
    x_star = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    xT = final(ddim_invert(point_oracle(s, x_star), x_star.clone(), s, steps=20))
    back = final(ddim_sample(point_oracle(s, x_star), xT, s, steps=20))
    assert torch.allclose(back, x_star, atol=1e-8)


def test_schedule_to_and_clipping():
    s = NoiseSchedule.linear(1e-4, 2e-2, 50).to("cpu")
    assert s.betas.device.type == "cpu" and s.betas.dtype == torch.float64
    x_star = torch.tensor([[3.0, -3.0]], dtype=torch.float64)
    eps_fn = point_oracle(s, x_star)
    g = torch.Generator().manual_seed(4)
    x = final(ddim_sample(eps_fn, (2, 2), s, steps=10, generator=g, clip_x0=1.0))
    assert float(x.abs().max()) <= 1.0 + 1e-6
    for st in ddpm_sample(eps_fn, (2, 2), s, generator=g, clip_x0=1.0):
        assert float(st.x0_hat.abs().max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError):
        list(ddim_sample(lambda x, t: x[:, :1], (2, 2), s, steps=5))
