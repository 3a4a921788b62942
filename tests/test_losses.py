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


def direct_cc_map(a, b, win):
    """Independent reference: the squared Pearson correlation over each window clipped to the image, voxel by
    voxel with numpy (float64)."""
    import itertools

    import numpy as np

    a, b = a.double().numpy(), b.double().numpy()
    r = win // 2
    spatial = a.shape[2:]
    out = np.zeros(a.shape)
    for n, c in itertools.product(range(a.shape[0]), range(a.shape[1])):
        for p in itertools.product(*(range(s) for s in spatial)):
            box = tuple(slice(max(0, q - r), q + r + 1) for q in p)
            x, y = a[(n, c) + box].ravel(), b[(n, c) + box].ravel()
            x, y = x - x.mean(), y - y.mean()
            out[(n, c) + p] = (x @ y) ** 2 / ((x @ x) * (y @ y))
    return torch.from_numpy(out)


def banded(shape, seed=0, background=-1.0, band=4):
    """A smooth image in [-1, 1] whose border band (``1 / band`` of each size) is flat background, as the
    phantom's and the preprocessed ACDC images are."""
    x = image(shape, seed=seed)
    x = 2 * (x - x.amin()) / (x.amax() - x.amin()) - 1
    inner = (...,) + tuple(slice(n // band, n - n // band) for n in shape)
    out = torch.full_like(x, background)
    out[inner] = x[inner]
    return out


@pytest.mark.parametrize("shape,win", [((9, 11), 5), ((5, 6, 7), 3), ((6, 7), 9)])
def test_ncc_map_against_direct_window_computation(shape, win):
    a, b = image(shape), image(shape, seed=1)
    assert torch.allclose(ncc_map(a, b, win), direct_cc_map(a, b, win), atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 24), (8, 12, 12)])
def test_ncc_self_and_monai_in_the_interior(shape):
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    a = image(shape)
    b = image(shape, seed=1)
    assert math.isclose(float(ncc(a, a, 9)), 1.0, abs_tol=1e-6)
    assert math.isclose(float(ncc_loss(a, a, 9)), -1.0, abs_tol=1e-6)
    # where the window lies inside the image: MONAI's LNCC and VoxelMorph's formula (only the stabilisers differ)
    monai_map = -LocalNormalizedCrossCorrelationLoss(spatial_dims=len(shape), kernel_size=5,
                                                     kernel_type="rectangular", reduction="none")(a, b)
    ours = ncc_map(a, b, 5)
    inner = (...,) + (slice(2, -2),) * len(shape)
    assert ours.shape == a.shape
    assert torch.allclose(ours[inner], monai_map[inner], atol=1e-4)
    assert torch.allclose(ours[inner], voxelmorph_cc_map(a, b, 5)[inner], atol=1e-4)
    assert 0.0 < float(ncc(a, b, 9)) < 0.9


@pytest.mark.parametrize("shape", [(64, 64), (16, 32, 32)])
def test_ncc_affine_intensity_invariance_at_the_border(shape):
    """ncc(a, b) == ncc(2a - 1, 2b - 1) == ncc(3a + 5, 0.5b - 2) for images whose background band touches the
    border; MONAI's zero padding fails this (the reason for the padding-free definition)."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    a = banded(shape, seed=0).float()
    b = banded(shape, seed=1).float()
    ref = float(ncc(a, b))
    for x, y in [((a + 1) / 2, (b + 1) / 2), (2 * a - 1, 2 * b - 1), (3 * a + 5, 0.5 * b - 2), (-a, 4 * b)]:
        assert math.isclose(float(ncc(x, y)), ref, abs_tol=1e-4)
    assert torch.allclose(ncc_map(a, b), ncc_map(3 * a + 5, 0.5 * b - 2), atol=1e-4)
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=len(shape), kernel_size=9, kernel_type="rectangular")
    assert abs(float(monai(a, b)) - float(monai((a + 1) / 2, (b + 1) / 2))) > 0.05  # the artefact this avoids


@pytest.mark.parametrize("shape", [(64, 64), (16, 32, 32)])
def test_ncc_of_unrelated_images_has_no_border_band(shape):
    """Two unrelated images in [-1, 1]: (almost) no voxel looks perfectly correlated. With zero padding the flat
    background against the padding scores cc near 1 along the whole border."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    a, b = banded(shape, seed=2, band=4), banded(shape, seed=3, band=3)  # other content, other outline
    assert float((ncc_map(a, b) > 0.99).double().mean()) < 0.02
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=len(shape), kernel_size=9, kernel_type="rectangular",
                                                reduction="none")
    assert float((-monai(a, b) > 0.99).double().mean()) > 0.1  # the band that zero padding creates
    # flat windows (both images constant) score 0, not 1
    flat = torch.full_like(a, -1.0)
    assert float(ncc_map(flat, b).abs().max()) == 0.0
    assert torch.isfinite(ncc_map(flat, flat)).all()


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


def test_ncc_of_bfloat16_inputs_without_autocast_is_computed_in_float32():
    # A bfloat16 tensor passed without autocast (e.g. from a model cast to bfloat16) must be upcast by the
    # @float32 decorator too: the window statistics in bfloat16 cancel catastrophically.
    a = image((48, 48)).float()
    b = a + 0.3 * image((48, 48), seed=10).float()
    a16, b16 = a.bfloat16(), b.bfloat16()
    assert not torch.is_autocast_enabled("cpu")
    score16 = ncc(a16, b16, 9)
    assert score16.dtype == torch.float32 and ncc_map(a16, b16, 9).dtype == torch.float32
    # exactly the float32 computation on the bfloat16-rounded values, and close to the float32 inputs' value
    torch.testing.assert_close(score16, ncc(a16.float(), b16.float(), 9), rtol=0, atol=1e-6)
    torch.testing.assert_close(score16, ncc(a, b, 9), rtol=0, atol=1e-3)
    torch.testing.assert_close(ncc_map(a16, b16, 9), ncc_map(a, b, 9), rtol=0, atol=1e-2)
    # without the cast (the undecorated function, all in bfloat16) the map is far off
    pure = ncc_map.__wrapped__(a16, b16, 9)
    assert pure.dtype == torch.bfloat16
    assert (pure.float() - ncc_map(a, b, 9)).abs().max() > 0.1


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
