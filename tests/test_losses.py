"""Tests of diffreg.losses against analytic values, MONAI and an independent box-filter LNCC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffreg.losses import (GradientSmoothness, NCCLoss, gradient_smoothness, mse, ncc, ncc_loss, ncc_map, ssim,
                            ssim_loss)


def image(shape, seed=0, batch=2, channels=1):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((batch, channels) + tuple(max(3, n // 4) for n in shape), generator=g, dtype=torch.float64)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    x = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=False)
    return x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def voxelmorph_cc_map(a, b, win):
    """Independent LNCC map (VoxelMorph formula, zero-padded box sums with conv)."""
    ndim = a.ndim - 2
    conv = [F.conv1d, F.conv2d, F.conv3d][ndim - 1]
    filt = torch.ones((1, 1) + (win,) * ndim, dtype=a.dtype)
    n = float(win ** ndim)

    def box(x):
        return conv(x, filt, padding=win // 2)

    a_sum, b_sum = box(a), box(b)
    cross = box(a * b) - a_sum * b_sum / n
    a_var = box(a * a) - a_sum * a_sum / n
    b_var = box(b * b) - b_sum * b_sum / n
    return cross * cross / (a_var * b_var + 1e-5)


@pytest.mark.parametrize("shape", [(24, 24), (8, 12, 12)])
def test_ncc_self_and_monai(shape):
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    a = image(shape)
    b = image(shape, seed=1)
    assert math.isclose(float(ncc(a, a, 9)), 1.0, abs_tol=1e-6)
    assert math.isclose(float(ncc_loss(a, a, 9)), -1.0, abs_tol=1e-6)
    monai_value = LocalNormalizedCrossCorrelationLoss(spatial_dims=len(shape), kernel_size=9,
                                                      kernel_type="rectangular")(a, b)
    assert torch.allclose(ncc_loss(a, b, 9), monai_value, atol=1e-10)
    # the per-voxel map equals the VoxelMorph formula (squared cc); only the stabiliser differs (1e-5 scale)
    ours = ncc_map(a, b, 5)
    ref = voxelmorph_cc_map(a, b, 5)
    assert ours.shape == a.shape
    assert torch.allclose(ours, ref, atol=1e-4)
    assert 0.0 < float(ncc(a, b, 9)) < 0.9


def test_ncc_affine_intensity_invariance():
    a = image((24, 24))
    b = image((24, 24), seed=1)
    # scaling: invariant everywhere (zero padding scales too)
    assert torch.allclose(ncc(a, 3.0 * b + 0.0), ncc(a, b), atol=1e-8)
    # offset: invariant where the window lies inside the image (zero padding breaks it at the border)
    m1, m2 = ncc_map(a, b, 5), ncc_map(a, -2.0 * b + 5.0, 5)
    inner = (..., slice(2, -2), slice(2, -2))
    assert torch.allclose(m1[inner], m2[inner], atol=1e-8)
    assert not torch.allclose(m1, m2, atol=1e-3)


def test_weighted_ncc():
    a, b = image((20, 20)), image((20, 20), seed=1)
    w1 = torch.ones(2, 1, 20, 20, dtype=torch.float64)
    assert torch.allclose(ncc(a, b, 9, weight=w1), ncc(a, b, 9), atol=1e-12)
    w = torch.rand(2, 1, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ncc(a, b, 9, weight=w), (w * ncc_map(a, b, 9)).mean(), atol=1e-12)
    assert torch.allclose(NCCLoss(9)(a, b, weight=w), -ncc(a, b, 9, weight=w))
    with pytest.raises(ValueError):
        ncc(a, b, 9, weight=torch.ones(2, 1, 10, 10))
    with pytest.raises(ValueError):
        ncc(a, b, 8)
    with pytest.raises(ValueError):
        ncc(a, b[..., :10], 9)


def test_ncc_gradients_flow():
    a = image((16, 16)).requires_grad_(True)
    b = image((16, 16), seed=1)
    ncc_loss(a, b, 5, weight=torch.rand(2, 1, 16, 16, dtype=torch.float64)).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(20, 20), (12, 12, 12)])
def test_ssim(shape):
    a = image(shape)
    b = image(shape, seed=1)
    assert math.isclose(float(ssim(a, a)), 1.0, abs_tol=1e-6)
    assert float(ssim(a, b)) < 0.8
    assert math.isclose(float(ssim_loss(a, a)), 0.0, abs_tol=1e-6)
    # SSIM is not invariant to an intensity offset (luminance term), unlike NCC
    assert float(ssim(a + 1.0, a, data_range=1.0)) < 0.999
    a.requires_grad_(True)
    ssim_loss(a, b, kernel=5, kernel_type="uniform").backward()
    assert a.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        ssim(a[..., :4], b[..., :4])


def test_mse():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 2.0)
    assert float(mse(a, b)) == 4.0
    w = torch.zeros(1, 1, 4, 4)
    w[..., :2, :] = 1.0
    assert float(mse(a, b, weight=w)) == 2.0
    with pytest.raises(ValueError):
        mse(a, b[..., :2])


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradient_smoothness_analytic(ndim):
    shape = (6, 7, 8)[:ndim]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    a = 0.7
    u = torch.zeros((1, ndim) + shape, dtype=torch.float64)
    u[0, 0] = a * grid[0]  # forward difference exactly a along axis 0 in channel 0, zero elsewhere
    # mean over axes of per-axis means over (channels, voxels): (1/ndim) * (a^2 / ndim)
    assert math.isclose(float(gradient_smoothness(u)), a * a / ndim ** 2, rel_tol=1e-12)
    assert math.isclose(float(gradient_smoothness(u, "l1")), a / ndim ** 2, rel_tol=1e-12)
    # every channel linear along every axis with slope a: each squared difference is a^2
    v = a * grid.sum(0).expand(ndim, *shape)[None].clone()
    assert math.isclose(float(gradient_smoothness(v)), a * a, rel_tol=1e-12)
    # a constant field has zero penalty, and the module wrapper agrees
    assert float(gradient_smoothness(torch.ones_like(u))) == 0.0
    assert torch.equal(GradientSmoothness("l2")(u), gradient_smoothness(u))
    u.requires_grad_(True)
    gradient_smoothness(u).backward()
    assert u.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        gradient_smoothness(u, "l3")
    with pytest.raises(ValueError):
        gradient_smoothness(torch.zeros(1, 3, 8, 8))


def test_ssim_matches_monai_ssim_loss():
    from monai.losses import SSIMLoss

    a, b = image((20, 20)).float(), image((20, 20), seed=1).float()
    ref = SSIMLoss(spatial_dims=2, data_range=2.0, win_size=7, kernel_sigma=1.5)(a, b)
    assert torch.allclose(ssim_loss(a, b, kernel=7, data_range=2.0), ref, atol=1e-6)
