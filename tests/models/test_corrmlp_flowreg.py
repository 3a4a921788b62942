"""CorrMLP and FlowReg: the official networks' parameter counts, the correlation and window layers against direct
computations, the sampler against analytic answers, the EMA teacher and the warmup stage."""

from __future__ import annotations

import pytest
import torch

from diffreg.config import get_config
from diffreg.losses import gradient_smoothness
from diffreg.models import FlowReg, build
from diffreg.models.corrmlp import _unwindows, _windows, local_correlation, physical_smoothness

#: parameters of the official networks at train.yaml's widths (encoder 8, decoder 16, time 64), counted by building
#: mathpluscode/FlowReg's corrmlp.networks.CorrMLP(1, 8, 16) and flowreg.networks.FlowReg(1, 8, 16, 64) (commit 286411e)
OFFICIAL_CORRMLP = 4_190_834
OFFICIAL_FLOWREG = 4_219_242


def test_paper_profiles_have_the_official_parameter_counts():
    corrmlp, flowreg = build("corrmlp", "paper"), build("flowreg", "paper")
    assert corrmlp.dims == flowreg.dims == 3
    assert corrmlp.num_parameters() == OFFICIAL_CORRMLP
    assert flowreg.num_parameters() == OFFICIAL_FLOWREG
    # "0.7 % extra parameters over its backbone" (FlowReg's abstract)
    assert round(100 * (flowreg.num_parameters() / corrmlp.num_parameters() - 1), 1) == 0.7


def test_local_correlation_is_the_channel_mean_of_shifted_products():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    corr = local_correlation(a, b)
    assert corr.shape == (2, 9, 5, 6)
    padded = torch.nn.functional.pad(b, (1, 1, 1, 1))
    for k, (dy, dx) in enumerate([(i, j) for i in range(3) for j in range(3)]):
        expected = (a * padded[:, :, dy:dy + 5, dx:dx + 6]).mean(1)
        assert torch.allclose(corr[:, k], expected)
    assert local_correlation(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 4, 4, 4)).shape[1] == 27


@pytest.mark.parametrize("shape,win", [((2, 10, 7, 4), 3), ((1, 9, 11, 13, 2), 5)])
def test_windows_partition_and_restore_the_input(shape, win):
    x = torch.randn(*shape)
    w, grid, padded = _windows(x, win)
    assert w.shape == (shape[0], grid[0] * grid[1] * (grid[2] if len(grid) == 3 else 1), win ** len(grid), shape[-1])
    assert all(p % win == 0 and p >= s for p, s in zip(padded, shape[1:-1]))
    assert torch.equal(_unwindows(w, grid, win, shape[1:-1]), x)
    # a window holds a contiguous block of the image
    assert torch.equal(w[0, 0].reshape(*([win] * len(grid)), shape[-1])[(slice(None),) * len(grid)],
                       torch.nn.functional.pad(x, [0, 0] + [0, win] * len(grid))[(0,) + (slice(0, win),) * len(grid)])


def test_physical_smoothness_is_the_package_smoothness_at_unit_spacing_and_uses_mm_otherwise():
    torch.manual_seed(0)
    u = torch.randn(2, 3, 4, 5, 6)
    assert torch.allclose(physical_smoothness(u), gradient_smoothness(u))
    # component 0 grows by 1 voxel (3.15 mm) per voxel along axis 0 (3.15 mm): derivative 1 there, 0 elsewhere; the
    # mean over the 3 components and the 3 axes is 1 / 9
    ramp = torch.zeros(1, 3, 4, 5, 6)
    ramp[:, 0] = torch.arange(4.0).view(4, 1, 1)
    assert physical_smoothness(ramp, (3.15, 1.5, 1.5)).item() == pytest.approx(1.0 / 9.0)
    # along axis 1 (1.5 mm) the same 3.15 mm step is a derivative of 2.1
    ramp = torch.zeros(1, 3, 4, 5, 6)
    ramp[:, 0] = torch.arange(5.0).view(1, 5, 1)
    assert physical_smoothness(ramp, (3.15, 1.5, 1.5)).item() == pytest.approx(2.1 ** 2 / 9.0)


def test_corrmlp_starts_near_the_identity_and_trains_one_step():
    torch.manual_seed(0)
    model = build("corrmlp", "quick")
    x, y = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    assert model(x, y).abs().max() < 1e-2   # heads initialised at N(0, 1e-5)
    terms = model.loss({"moving": x, "fixed": y})
    assert set(terms) == {"total", "ncc", "smooth"}
    terms["total"].backward()
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 1, 30, 32), torch.rand(1, 1, 30, 32))


class _Constant(torch.nn.Module):
    """A stand-in network that always predicts the field ``c`` and counts its calls."""

    def __init__(self, c):
        super().__init__()
        self.c, self.calls = c, 0

    def forward(self, moving, fixed, field, t):
        self.calls += 1
        return self.c.expand_as(field)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("guess", [False, True])
def test_heun_sampler_reaches_a_constant_prediction_with_2s_minus_1_evaluations(steps, guess):
    """With x1-prediction ``c`` the velocity ``(c - phi_t) / (1 - t)`` carries any state to ``c`` along a straight
    line: Euler and Heun reach it exactly, every intermediate prediction is ``c``, and Heun costs 2 S - 1 calls."""
    model = FlowReg(dims=2)
    c = torch.randn(1, 2, 16, 16)
    model.net = _Constant(c)
    x = torch.rand(1, 1, 16, 16)
    result = model.register(x, x, steps=steps, initial_guess=guess)
    assert torch.allclose(result.ddf, c, atol=1e-5)
    assert model.net.calls == 2 * steps - 1 == result.extras["evaluations"]
    assert len(result.extras["trajectory"]) == steps


def test_noise_is_isotropic_in_millimetres():
    model = build("flowreg", "paper")
    scale = model.noise_std.flatten().tolist()
    assert scale == pytest.approx([5 * 1.5 / 3.15, 5.0, 5.0])


def test_reflow_updates_the_ema_teacher_before_each_step():
    torch.manual_seed(0)
    model = build("flowreg", "quick")
    model.train()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.01)   # the student moved away from the teacher
    before = [p.clone() for p in model.ema.parameters()]
    x = torch.rand(1, 1, 32, 32)
    terms = model.loss({"moving": x, "fixed": x})
    assert {"total", "ncc", "smooth", "v_mse"} <= set(terms)
    m = model.ema_momentum
    for b, t, s in zip(before, model.ema.parameters(), model.net.parameters()):
        assert torch.allclose(t, m * b + (1 - m) * s, atol=1e-6)
    assert not any(p.requires_grad for p in model.ema.parameters())
    assert model.num_parameters() == sum(p.numel() for p in model.net.parameters())


def test_warmup_is_a_stage_that_leaves_the_network_trainable(tmp_path):
    from diffreg.train import train_stages
    from tests.helpers import ShiftedBlobs

    cfg = get_config("flowreg", "quick")
    cfg.model.update(warmup_steps=3)
    torch.manual_seed(0)
    model = build(cfg)
    before = [p.clone() for p in model.net.parameters()]
    assert train_stages(model, ShiftedBlobs(n=3, size=(32, 32)), out=tmp_path, progress=False) == ["warmup"]
    assert (tmp_path / "warmup" / "checkpoint.pt").is_file() and bool(model.warmup_done)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    assert all(p.requires_grad for p in model.net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.ema.parameters(), model.net.parameters()))
    assert model.stages() == []
