import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffreg.config import get_config
from diffreg.models import MODELS, DiffuseReg, build
from diffreg.spatial import warp
from diffreg.models.diffusereg import (
    ConditionalWindowAttention, FusionSwinBlock, bending_energy, conditional_attention_mask, region_guidance,
    smoothness_guidance,
)
from tests.helpers import ShiftedBlobs

# a tiny denoiser for fast CPU tests (stage widths 6, 12, 24, 48)
SMALL = dict(feature_size=6, num_heads=(1, 2, 2, 4), timesteps=50, beta_start=1e-4, beta_end=0.2,
             teacher_steps=3)


def _pair(dims, size, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, *size, generator=g) * 2 - 1, torch.rand(b, 1, *size, generator=g) * 2 - 1


class Oracle(nn.Module):
    """A noise predictor that knows phi_0 (normalised): eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def encode(self, moving, fixed):
        return None

    def forward(self, x, t, moving=None, fixed=None, cond=None):
        return self.schedule.predict_eps(x, t, self.x0.to(x.dtype))


def _with_oracle(dims=2, size=(32, 32), b=1, seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = DiffuseReg(dims=dims, **SMALL).eval()
    model.field_mean.copy_(torch.linspace(-0.5, 0.5, dims))
    model.field_std.copy_(torch.linspace(1.0, 2.0, dims))
    phi0 = scale * torch.randn(b, dims, *size, generator=torch.Generator().manual_seed(seed + 1))
    model.denoiser = Oracle(model.schedule, model.normalize(phi0))
    return model, phi0


# ------------------------------------------------------------------------------------------------------------
# Eq. 2 and the conditional mask
# ------------------------------------------------------------------------------------------------------------

def test_mask_paper_locality_and_time_token():
    allowed = conditional_attention_mask((4, 4), "paper")
    n = 16
    assert allowed.shape == (1, 3 * n + 1, 3 * n + 1)
    assert allowed[0, 0].all() and allowed[0, :, 0].all()  # the time token: full attention both ways
    # window position 0 = (0, 0); 5 = (1, 1) is adjacent, 10 = (2, 2) is not, in every group
    for gq in range(3):
        for gk in range(3):
            q, k = 1 + gq * n, 1 + gk * n
            assert allowed[0, q + 0, k + 5] and not allowed[0, q + 0, k + 10]
    assert conditional_attention_mask((4, 4), "shifted").all()
    assert conditional_attention_mask((4, 4), "none").all()
    # a shifted window: two regions; "shifted" tiles the region mask, "paper" adds locality on top of it
    region = torch.zeros(1, n, n)
    region[0, :8, 8:] = region[0, 8:, :8] = -100.0
    sh = conditional_attention_mask((4, 4), "shifted", region)
    assert not sh[0, 1, 1 + 2 * n + 8] and sh[0, 1, 1 + 2 * n + 7] and sh[0, 1 + 8, 0]
    pa = conditional_attention_mask((4, 4), "paper", region)
    assert not pa[0, 1 + 4, 1 + 8] and pa[0, 1 + 4, 1 + 5]  # (1,0)->(2,0): adjacent but another region
    with pytest.raises(ValueError):
        conditional_attention_mask((4, 4), "full")


def test_fusion_keeps_field_tokens_and_matches_full_masked_msa():
    torch.manual_seed(0)
    c, heads, n, nw, b = 8, 2, 16, 3, 2
    att = ConditionalWindowAttention(c, heads, (4, 4))
    with torch.no_grad():
        att.attn.relative_position_bias_table.normal_()
    field = torch.randn(b * nw, n, c)
    cond = torch.randn(b * nw, 2 * n + 1, c)
    allowed = conditional_attention_mask((4, 4), "paper").expand(nw, -1, -1)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    out, w = att(field, cond, mask[:, -n:], return_weights=True)
    assert out.shape == (b * nw, n, c)  # only the field tokens come back
    assert w.shape == (b * nw, heads, n, 3 * n + 1)
    # masked keys get exactly zero weight; each row sums to one
    assert (w.masked_select(~allowed[None, :, None, -n:].expand(b, -1, heads, -1, -1).reshape(w.shape)) == 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(()))
    # independent reference: full masked MSA over all 3N + 1 tokens (SDPA), then keep the last N rows (eq. 2)
    a = att.attn
    tokens = torch.cat([cond, field], 1)
    q, k, v = a.qkv(tokens).reshape(b * nw, 3 * n + 1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    rpb = a.relative_position_bias_table[a.relative_position_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
    bias = torch.zeros(heads, 3 * n + 1, 3 * n + 1)
    bias[:, 1:, 1:] = rpb.repeat(1, 3, 3)
    full = bias[None, None] + mask[None, :, None]
    full = full.expand(b, -1, -1, -1, -1).reshape(b * nw, heads, 3 * n + 1, 3 * n + 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=a.scale)
    ref = a.proj(ref.transpose(1, 2).reshape(b * nw, 3 * n + 1, c)[:, -n:])
    assert torch.allclose(out, ref, atol=1e-5)


def test_fusion_block_is_local_to_windows_and_neighbourhoods():
    torch.manual_seed(0)
    blk = FusionSwinBlock(8, 2, (4, 4), (0, 0), mask="paper").eval()
    x, cf, cm = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    t = torch.randn(1, 8)
    with torch.no_grad():
        y = blk(x, cf, cm, t)
        cf2 = cf.clone()
        cf2[0, 6, 6] += 10.0  # an image token in another window, and far from (0, 0)
        y2 = blk(x, cf2, cm, t)
        cm3 = cm.clone()
        cm3[0, 3, 3] += 10.0  # same window as (0, 0) but not adjacent to it; adjacent to (2, 2)
        y3 = blk(x, cf, cm3, t)
    assert torch.allclose(y[0, :4, :4], y2[0, :4, :4]) and not torch.allclose(y[0, 4:, 4:], y2[0, 4:, 4:])
    assert torch.allclose(y3[0, 0, 0], y[0, 0, 0]) and not torch.allclose(y3[0, 2, 2], y[0, 2, 2])
    blk.mask = "shifted"
    blk._mask_cache.clear()
    with torch.no_grad():
        y4 = blk(x, cf, cm3, t)
    assert not torch.allclose(y4[0, 0, 0], blk(x, cf, cm, t)[0, 0, 0])  # no locality inside a window


# ------------------------------------------------------------------------------------------------------------
# Shapes, loss, batch > 1, 2D and 3D, paper size
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,size", [(2, (32, 64)), (3, (32, 32, 64))])
def test_shapes_loss_and_backward_batch2(dims, size):
    torch.manual_seed(0)
    model = DiffuseReg(dims=dims, **SMALL)
    m, f = _pair(dims, size, b=2)
    terms = model.loss({"moving": m, "fixed": f})
    assert set(terms) == {"total", "diffuse", "sim", "reg"}
    assert torch.allclose(terms["total"], terms["diffuse"] + 1.0 * terms["sim"] + 0.1 * terms["reg"])
    terms["total"].backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())  # frozen teacher
    res = model.register(m, f, sampler="ddim", steps=2)
    assert res.ddf.shape == (2, dims, *size) and res.warped.shape == m.shape
    assert res.extras["steps"] == 2 and res.extras["t_stop"] == 0


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = DiffuseReg(dims=2, **SMALL).eval()
    m, f = _pair(2, (32, 64), b=2)
    x_T = torch.randn(2, 2, 32, 64)
    both = model.sample(m, f, "ddim", 3, x_T=x_T, return_trajectory=False)
    one = model.sample(m[1:], f[1:], "ddim", 3, x_T=x_T[1:], return_trajectory=False)
    assert torch.allclose(both.phi0_hat[1:], one.phi0_hat, atol=1e-5)


def test_bad_inputs():
    model = DiffuseReg(dims=2, **SMALL)
    m, f = _pair(2, (48, 48))
    with pytest.raises(ValueError, match="divisible by 32"):
        model.register(m, f)
    m, f = _pair(2, (32, 32))
    with pytest.raises(ValueError):
        model.register(m, f, sampler="euler")
    with pytest.raises(ValueError):
        model.register(m, f, sampler="ddpm", steps=10)
    with pytest.raises(ValueError):
        model.register(m, f, sampler="ddim", steps=0)
    with pytest.raises(ValueError, match="unknown"):
        model.register(m, f, temperature=2)
    with pytest.raises(ValueError):
        DiffuseReg(dims=2, feature_size=6, num_heads=(4, 2, 2, 4))
    with pytest.raises(ValueError):
        DiffuseReg(dims=2, mask="global", **SMALL)


def test_paper_profile_parameter_count():
    # Official DiffuseReg (feature size 120, 3D): ~437 M parameters, of which 25,834,248 are dead weights (the image
    # encoder's last Swin block past its LayerNorm and its last patch merging feed nothing); ours leaves them out.
    # Counted on the meta device (nothing allocated).
    with torch.device("meta"):
        model = build("diffusereg", profile="paper", dims=3)
    n = model.num_parameters()
    print(f"DiffuseReg 3D paper denoiser: {n:,} parameters")
    assert n == 411_462_735
    assert abs(n + 25_834_248 - 437e6) / 437e6 < 0.001
    cfg = get_config("diffusereg", "paper")
    assert cfg.model["feature_size"] == 120 and cfg.model["timesteps"] == 2000
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 1e-4 and cfg.train.epochs == 1200
    assert MODELS["diffusereg"] is DiffuseReg


# ------------------------------------------------------------------------------------------------------------
# Sampling: step counts, oracle, determinism, early stop
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 1), ("ddim", 7), ("ddim", 50)])
def test_oracle_sampler_returns_phi0(sampler, steps):
    model, phi0 = _with_oracle(b=2)
    states = list(model.sample(*_pair(2, (32, 32), b=2), sampler=sampler, steps=steps, seed=3))
    assert len(states) == (model.schedule.num_timesteps if steps is None else steps)
    assert states[-1].t_next == -1
    assert torch.allclose(states[-1].phi0_hat, phi0, atol=1e-3)
    assert torch.allclose(states[-1].phi_next, phi0, atol=1e-3)
    res = model.register(*_pair(2, (32, 32), b=2), sampler=sampler, steps=steps)
    assert torch.allclose(res.ddf, phi0, atol=1e-3)


def test_ddim_eta0_is_deterministic_and_stop_at():
    torch.manual_seed(0)
    model = DiffuseReg(dims=2, **SMALL).eval()
    m, f = _pair(2, (32, 64))
    x_T = torch.randn(1, 2, 32, 64)
    a = model.sample(m, f, "ddim", 5, eta=0.0, x_T=x_T, seed=1, return_trajectory=False)
    b = model.sample(m, f, "ddim", 5, eta=0.0, x_T=x_T, seed=2, return_trajectory=False)
    assert torch.equal(a.phi0_hat, b.phi0_hat)
    c = model.sample(m, f, "ddim", 5, eta=1.0, x_T=x_T, seed=2, return_trajectory=False)
    assert not torch.allclose(a.phi0_hat, c.phi0_hat)
    assert torch.equal(model.register(m, f, sampler="ddpm").ddf, model.register(m, f, sampler="ddpm").ddf)  # seed 0
    traj = list(model.sample(m, f, "ddim", 10, stop_at=25, x_T=x_T))
    assert traj[-1].t <= 25 < traj[-2].t
    stopped = model.register(m, f, sampler="ddim", steps=10, stop_at=lambda s: s.t < 40)
    assert stopped.extras["steps"] < 10 and stopped.extras["t_stop"] < 40
    first = traj[0]
    assert first.phi_t.shape == first.phi0_hat.shape == (1, 2, 32, 64) and first.warped.shape == m.shape


# ------------------------------------------------------------------------------------------------------------
# Guidance
# ------------------------------------------------------------------------------------------------------------

def test_bending_energy_analytic():
    h, w = 12, 10
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    affine = torch.stack([0.3 * y - 0.2 * x + 1, 0.1 * x])[None]
    assert bending_energy(affine).abs().max() < 1e-9
    quad = torch.stack([0.5 * y ** 2, torch.zeros_like(x)])[None]  # d2u/dy2 = 1: (H - 2) * W voxels
    assert torch.allclose(bending_energy(quad), torch.tensor([(h - 2) * w], dtype=torch.float64))
    mixed = torch.stack([torch.zeros_like(x), x * y])[None]  # d2u/dxdy = 1, counted twice: 2 (H - 1)(W - 1)
    assert torch.allclose(bending_energy(mixed), torch.tensor([2.0 * (h - 1) * (w - 1)], dtype=torch.float64))


def test_smoothness_guidance_reduces_bending_energy():
    from monai.losses import BendingEnergyLoss

    model, phi0 = _with_oracle(b=2, scale=2.0)
    m, f = _pair(2, (32, 32), b=2)
    plain = model.register(m, f, sampler="ddim", steps=5).ddf
    guided = model.register(m, f, sampler="ddim", steps=5, guidance=smoothness_guidance(0.5)).ddf
    assert torch.allclose(plain, phi0, atol=1e-3)
    assert (bending_energy(guided) < 0.8 * bending_energy(plain)).all()
    be = BendingEnergyLoss()  # an independent definition (MONAI, central differences)
    assert be(guided) < be(plain)
    # an affine field is left alone
    lin = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij"))[None]
    g = smoothness_guidance(1.0)
    phi = lin.clone().requires_grad_(True)
    grad, = torch.autograd.grad(g(phi, 0).sum(), phi)
    assert grad.abs().max() < 1e-5
    with pytest.raises(ValueError):
        smoothness_guidance(-1.0)


def test_region_guidance_aligns_inside_the_region():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    f = torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 40)[None, None] * 2 - 1
    m = torch.roll(f, shifts=(2, -1), dims=(2, 3))  # the blob moved by 2 and -1 voxels
    model, _ = _with_oracle(b=1, scale=0.0)  # the oracle's phi_0 is the identity
    region = (f > -0.5).float()

    def err(ddf):
        return float((region * (warp(m, ddf) - f) ** 2).sum())

    plain = model.register(m, f, sampler="ddim", steps=5).ddf
    guided = model.register(m, f, sampler="ddim", steps=5, guidance=region_guidance(m, f, region, 2.0)).ddf
    assert err(guided) < 0.8 * err(plain)
    with pytest.raises(ValueError):
        region_guidance(m, f, region[..., :16], 1.0)


# ------------------------------------------------------------------------------------------------------------
# Teacher, statistics, training, checkpoints
# ------------------------------------------------------------------------------------------------------------

def test_prepare_trains_teacher_caches_and_run_restores(tmp_path):
    from diffreg.config import MethodConfig, TrainConfig
    from diffreg.evaluate import evaluate
    from diffreg.train import fit, load_run

    data = ShiftedBlobs(n=4, size=(32, 64))  # (a 1 x 1 bottleneck cannot be instance-normalised in training)
    torch.manual_seed(0)
    model = DiffuseReg(dims=2, **SMALL)
    cfg = MethodConfig("diffusereg", "quick", model=dict(SMALL), train=TrainConfig(steps=3, log_every=1))
    fit(model, data, cfg, out=tmp_path, progress=False)
    assert (tmp_path / "teacher" / "checkpoint.pt").is_file() and bool(model.teacher_trained)
    # the statistics are the per-axis mean / SD of the teacher fields over the training pairs
    with torch.no_grad():
        phi = torch.cat([model.teacher(d["moving"][None], d["fixed"][None]) for d in data])
    assert torch.allclose(model.field_mean, phi.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.field_std, phi.transpose(0, 1).flatten(1).std(1, unbiased=False).clamp_min(1e-3),
                          rtol=1e-4)
    loaded, _ = load_run(tmp_path)
    assert torch.equal(loaded.field_std, model.field_std) and bool(loaded.teacher_trained)
    for a, b in zip(loaded.teacher.parameters(), model.teacher.parameters()):
        assert torch.equal(a, b)
    table = evaluate(loaded, data, limit=2, sampler="ddim", steps=2)
    assert len(table) == 2 and "dice" in table[0]
    # a given teacher (a run directory) is used as is: prepare does not train another one
    other = DiffuseReg(dims=2, **SMALL)
    other.set_teacher(load_run(tmp_path / "teacher")[0])
    before = [p.clone() for p in other.teacher.parameters()]
    other.prepare(data, out=None)
    assert all(torch.equal(a, b) for a, b in zip(before, other.teacher.parameters()))
    with pytest.raises(ValueError):
        DiffuseReg(dims=2, **{**SMALL, "teacher": {"layout": "vm1"}}).set_teacher(load_run(tmp_path / "teacher")[0])


def test_consistency_weighting_abar():
    torch.manual_seed(0)
    model = DiffuseReg(dims=2, **SMALL).eval()
    m, f = _pair(2, (32, 64), b=2)
    noise = torch.randn(2, 2, 32, 64)
    batch = {"moving": m, "fixed": f}
    t = torch.tensor([0, 49])
    plain = model.loss(batch, t=t, noise=noise)
    model.consistency_weighting = "abar"
    weighted = model.loss(batch, t=t, noise=noise)
    assert torch.allclose(weighted["diffuse"], plain["diffuse"])
    # per pair: the unweighted terms of each pair times abar_t, averaged over the batch
    w = model.schedule.alphas_cumprod[t].float()
    model.consistency_weighting = "none"
    single = [model.loss({"moving": m[i:i + 1], "fixed": f[i:i + 1]}, t=t[i:i + 1], noise=noise[i:i + 1])
              for i in range(2)]
    for key in ("sim", "reg"):
        expected = (w[0] * single[0][key] + w[1] * single[1][key]) / 2
        assert torch.allclose(weighted[key], expected, rtol=1e-4), key
    assert w[1] < 0.01 and float(weighted["reg"]) < 0.5 * float(plain["reg"])  # the t ~ T estimate is muted
    with pytest.raises(ValueError):
        DiffuseReg(dims=2, consistency_weighting="snr", **SMALL)


class OracleV(Oracle):
    """The oracle in the v-parameterization: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""

    def forward(self, x, t, moving=None, fixed=None, cond=None):
        eps = super().forward(x, t)
        a = self.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 6)])
def test_v_parameterization_oracle_returns_phi0(sampler, steps):
    model, phi0 = _with_oracle(b=2)
    model.parameterization = "v"
    model.denoiser = OracleV(model.schedule, model.denoiser.x0)
    res = model.register(*_pair(2, (32, 32), b=2), sampler=sampler, steps=steps)
    assert torch.allclose(res.ddf, phi0, atol=1e-3)
    with pytest.raises(ValueError):
        DiffuseReg(dims=2, parameterization="score", **SMALL)


class OracleX0(Oracle):
    """The oracle in the x0-parameterization: the network outputs phi_0 (normalised) itself."""

    def forward(self, x, t, moving=None, fixed=None, cond=None):
        return self.x0.to(x.dtype).expand_as(x)


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 6)])
def test_x0_parameterization_oracle_returns_phi0(sampler, steps):
    model, phi0 = _with_oracle(b=2)
    model.parameterization = "x0"
    model.denoiser = OracleX0(model.schedule, model.denoiser.x0)
    res = model.register(*_pair(2, (32, 32), b=2), sampler=sampler, steps=steps)
    assert torch.allclose(res.ddf, phi0, atol=1e-3)
    # the derived noise estimate is the true one: eps_hat = (phi_t - sqrt(abar) phi_0) / sqrt(1 - abar)
    x0 = model.denoiser.x0
    noise, t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 30])
    x_t = model.schedule.q_sample(x0, t, noise)
    assert torch.allclose(model.predict_eps(x_t, t, None), noise, atol=1e-3)


def test_v_weighting_is_eq4_over_abar():
    torch.manual_seed(0)
    model = DiffuseReg(dims=2, **SMALL).eval()
    m, f = _pair(2, (32, 64), b=2)
    noise, t = torch.randn(2, 2, 32, 64), torch.tensor([3, 40])
    batch = {"moving": m, "fixed": f}
    single = [model.loss({"moving": m[i:i + 1], "fixed": f[i:i + 1]}, t=t[i:i + 1], noise=noise[i:i + 1])["diffuse"]
              for i in range(2)]
    model.diffusion_weighting = "v"
    w = 1 / model.schedule.alphas_cumprod[t].float()
    assert torch.allclose(model.loss(batch, t=t, noise=noise)["diffuse"], (w[0] * single[0] + w[1] * single[1]) / 2,
                          rtol=1e-4)
    # "x0": eq. 4 times (1 - abar) / abar = the mean squared error of phi0_hat (normalised)
    model.diffusion_weighting = "x0"
    a = model.schedule.alphas_cumprod[t].float()
    w = (1 - a) / a
    assert torch.allclose(model.loss(batch, t=t, noise=noise)["diffuse"], (w[0] * single[0] + w[1] * single[1]) / 2,
                          rtol=1e-4)
    with pytest.raises(ValueError):
        DiffuseReg(dims=2, diffusion_weighting="snr", **SMALL)


# ------------------------------------------------------------------------------------------------------------
# Diagnosis: the denoiser's error per timestep
# ------------------------------------------------------------------------------------------------------------

class _Fixed(nn.Module):
    """A teacher (or a denoiser output) that returns a given tensor."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def encode(self, moving, fixed):
        return None

    def forward(self, *args, **kwargs):
        return self.value


def test_denoiser_error_per_timestep_against_analytic_answers():
    from diffreg.diagnostics import denoiser_error_per_timestep

    model, phi0 = _with_oracle(b=2)
    model.teacher = _Fixed(phi0)
    m, f = _pair(2, (32, 32), b=2)
    ts = [0, 10, 25, 49]
    rows = denoiser_error_per_timestep(model, m, f, timesteps=ts)
    assert [r["t"] for r in rows] == ts
    for r in rows:  # the oracle knows phi_0: no error at any noise level
        assert r["eps_mse"] < 1e-8 and r["x0_rmse"] < 1e-4
        assert r["x0_hf"] == pytest.approx(r["teacher_hf"], rel=1e-4)
        assert r["x0_sensitivity"] < 1e-4       # ... and its estimate ignores the noisy field
        # the mean-field baseline: RMS of the teacher's field about the mean field, in voxels, whatever t
        mean = model.denormalize(torch.zeros_like(phi0))
        assert r["x0_rmse_mean_field"] == pytest.approx(float(((phi0 - mean) ** 2).mean().sqrt()), rel=1e-4)
    trivial = [r["x0_rmse_trivial"] for r in rows]
    assert trivial == sorted(trivial) and trivial[0] < 0.1 < trivial[-1]  # rescaling the noisy field: worse with t
    # a predictor of zeros: eps_mse = E[eps^2] ~ 1 and its phi0_hat is exactly the trivial estimate
    model.denoiser = _Fixed(torch.zeros(2, 2, 32, 32))
    zero = denoiser_error_per_timestep(model, m, f, timesteps=ts, seed=3)
    for r in zero:
        assert r["eps_mse"] == pytest.approx(1.0, abs=0.1)
        assert r["x0_rmse"] == pytest.approx(r["x0_rmse_trivial"], rel=1e-5)
        # x0_hat - x0 = sqrt((1 - abar) / abar) eps, in voxels (std 1 and 2 per axis): RMS sqrt(2.5 (1 - abar) / abar)
        assert r["x0_rmse"] == pytest.approx(math.sqrt(2.5 * (1 - r["abar"]) / r["abar"]), rel=0.1)
        assert r["x0_sensitivity"] == pytest.approx(1.0, rel=1e-4)   # it passes every change of phi_t on
    with pytest.raises(ValueError, match="timesteps"):
        denoiser_error_per_timestep(model, m, f, timesteps=[50])
    default = [r["t"] for r in denoiser_error_per_timestep(model, m, f)]  # 20 levels spread over 0 ... T - 1
    assert default[0] == 0 and default[-1] == 49 and len(default) == 20
