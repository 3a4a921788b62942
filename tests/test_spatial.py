"""Tests of diffreg.spatial against scipy.ndimage and analytic answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from diffreg.spatial import compose, identity_grid, integrate, resize_field, warp


def smooth_field(shape, amplitude=2.0, seed=0, batch=1, dtype=torch.float64):
    """A random smooth displacement (B, ndim, *shape): coarse noise upsampled (cubic-ish via two linear passes)."""
    g = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    coarse = torch.randn((batch, ndim) + tuple(3 for _ in shape), generator=g, dtype=dtype)
    mode = "bilinear" if ndim == 2 else "trilinear"
    return amplitude * F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


def smooth_image(shape, seed=1, batch=1, channels=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((batch, channels) + tuple(5 for _ in shape), generator=g, dtype=dtype)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(16, 20), (6, 10, 12)])
def test_identity_grid(shape):
    grid = identity_grid(shape, dtype=torch.float64)
    assert grid.shape == (len(shape),) + shape
    for i, n in enumerate(shape):
        idx = [0] * len(shape)
        idx[i] = n - 1
        assert grid[(i,) + tuple(idx)] == n - 1
        assert torch.all(grid[i].amax() == n - 1) and torch.all(grid[i].amin() == 0)
    # grid[i] varies along axis i only
    assert torch.all(torch.diff(grid[0], dim=0) == 1)
    assert torch.all(torch.diff(grid[0], dim=1) == 0)


@pytest.mark.parametrize("shape", [(16, 20), (6, 10, 12)])
def test_warp_matches_scipy_map_coordinates(shape):
    """warped(p) = image(p + ddf(p)), linear, border padding == map_coordinates(order=1, mode='nearest')."""
    img = smooth_image(shape, channels=2, batch=2)
    ddf = smooth_field(shape, amplitude=3.0, batch=2)  # large enough to sample outside the image
    out = warp(img, ddf)
    grid = identity_grid(shape, dtype=torch.float64)
    for b in range(2):
        coords = (grid + ddf[b]).numpy()
        for c in range(2):
            ref = map_coordinates(img[b, c].numpy(), coords, order=1, mode="nearest")
            np.testing.assert_allclose(out[b, c].numpy(), ref, atol=1e-10)
    # nearest mode also agrees with map_coordinates(order=0) away from exact .5 ties
    out_n = warp(img, ddf, mode="nearest")
    coords = (grid + ddf[0]).numpy()
    ref_n = map_coordinates(img[0, 0].numpy(), coords, order=0, mode="nearest")
    frac = np.abs(coords - np.round(coords))
    safe = np.all(np.abs(frac - 0.5) > 1e-6, axis=0)
    np.testing.assert_allclose(out_n[0, 0].numpy()[safe], ref_n[safe], atol=1e-12)


def test_warp_channel_order_is_array_order():
    """Channel 0 moves along axis 0 (rows), channel 1 along axis 1 (columns)."""
    img = torch.arange(20.0).view(1, 1, 4, 5)
    d = torch.zeros(1, 2, 4, 5)
    d[:, 0] = 1.0
    out = warp(img, d)
    assert torch.equal(out[0, 0, :3], img[0, 0, 1:])
    d = torch.zeros(1, 2, 4, 5)
    d[:, 1] = -1.0
    out = warp(img, d)
    assert torch.equal(out[0, 0, :, 1:], img[0, 0, :, :-1])
    assert torch.equal(out[0, 0, :, 0], img[0, 0, :, 0])  # border padding


@pytest.mark.parametrize("shape", [(12, 16), (5, 8, 9)])
def test_zero_field_is_identity_and_integer_shift(shape):
    img = smooth_image(shape, batch=3, channels=2, dtype=torch.float32)
    zero = torch.zeros((3, len(shape)) + shape)
    assert torch.allclose(warp(img, zero), img, atol=1e-6)
    shift = [2, -1, 1][: len(shape)]
    ddf = torch.zeros_like(zero)
    for i, s in enumerate(shift):
        ddf[:, i] = s
    out = warp(img, ddf)
    # out(p) = img(p + s): compare on the region where p + s is inside
    sl_out = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape))
    sl_in = tuple(slice(a.start + s, a.stop + s) for a, s in zip(sl_out, shift))
    assert torch.allclose(out[(...,) + sl_out], img[(...,) + sl_in], atol=1e-5)


def test_nearest_labels_keep_dtype_and_label_set():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 4, (2, 1, 16, 16), generator=g)
    lab[0, 0, 0, 0] = 7
    ddf = smooth_field((16, 16), amplitude=2.0, batch=2, dtype=torch.float32)
    out = warp(lab, ddf, mode="nearest")
    assert out.dtype == torch.int64 and out.shape == lab.shape
    assert set(out.unique().tolist()) <= set(lab.unique().tolist())
    lab8 = lab.to(torch.uint8)
    assert warp(lab8, ddf, mode="nearest").dtype == torch.uint8
    assert torch.equal(warp(lab, torch.zeros_like(ddf), mode="nearest"), lab)


def test_warp_gradients_flow():
    img = smooth_image((12, 12), dtype=torch.float32).requires_grad_(True)
    ddf = (0.5 * smooth_field((12, 12), dtype=torch.float32)).requires_grad_(True)
    warp(img, ddf).pow(2).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert ddf.grad is not None and ddf.grad.abs().sum() > 0


def test_warp_errors():
    img = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError):
        warp(img, torch.zeros(1, 3, 8, 8))  # wrong channel count
    with pytest.raises(ValueError):
        warp(img, torch.zeros(1, 2, 8, 9))  # spatial mismatch
    with pytest.raises(ValueError):
        warp(img, torch.zeros(2, 2, 8, 8))  # batch mismatch
    with pytest.raises(ValueError):
        warp(img, torch.zeros(1, 2, 8, 8), mode="bicubic")
    with pytest.raises(ValueError):
        warp(img, torch.zeros(1, 2, 8, 8), padding_mode="wrap")
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 2, 8, 8))  # labels need nearest
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError):
        compose(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError):
        integrate(torch.zeros(1, 2, 8, 8), steps=-1)
    with pytest.raises(ValueError):
        resize_field(torch.zeros(1, 2, 8, 8), (16, 16, 16))
    with pytest.raises(ValueError):
        identity_grid((4, 0))


def non_commuting_pair(shape, amp=2.5):
    """A smooth image in [-1, 1] and two sinusoidal fields a, b that do not commute (a moves along axis 0 as a
    function of axis 1, b along axis 1 as a function of axis 0)."""
    g = identity_grid(shape, dtype=torch.float64)
    x = torch.ones(shape, dtype=torch.float64)
    for i, n in enumerate(shape):
        x = x * torch.cos(2 * math.pi * g[i] / n * 0.7 + 0.3 * i)
    a = torch.zeros((1, len(shape)) + shape, dtype=torch.float64)
    b = torch.zeros_like(a)
    a[0, 0] = amp * torch.sin(2 * math.pi * g[1] / shape[1])
    b[0, 1] = amp * torch.sin(2 * math.pi * g[0] / shape[0])
    if len(shape) == 3:
        a[0, 2] = amp * torch.cos(2 * math.pi * g[0] / shape[0])
        b[0, 2] = amp * torch.sin(2 * math.pi * g[1] / shape[1])
    return x[None, None], a, b


@pytest.mark.parametrize("shape", [(24, 24), (12, 12, 12)])
def test_compose_matches_sequential_warping(shape):
    """warp(warp(x, b), a) == warp(x, compose(a, b)) up to interpolation error (interior); compose(b, a) does not."""
    x, a, b = non_commuting_pair(shape)
    seq = warp(warp(x, b), a)
    comp = warp(x, compose(a, b))
    wrong = warp(x, compose(b, a))
    inner = (...,) + tuple(slice(3, n - 3) for n in shape)
    err = (seq - comp)[inner].abs().max().item()
    assert err < 0.05, err
    assert (seq - wrong)[inner].abs().max().item() > 5 * err
    # the composition formula itself, checked with map_coordinates on b
    grid = identity_grid(shape, dtype=torch.float64)
    coords = (grid + a[0]).numpy()
    ref = np.stack([map_coordinates(b[0, i].numpy(), coords, order=1, mode="nearest") for i in range(len(shape))])
    np.testing.assert_allclose(compose(a, b)[0].numpy(), ref + a[0].numpy(), atol=1e-10)


@pytest.mark.parametrize("shape", [(24, 24), (12, 12, 12)])
def test_integrate_inverse_and_constant(shape):
    _, a, b = non_commuting_pair(shape, amp=1.0)
    v = a + b
    fwd, bwd = integrate(v), integrate(-v)
    ident = compose(fwd, bwd)
    inner = (slice(None), slice(None)) + tuple(slice(3, n - 3) for n in shape)
    size = fwd[inner].abs().max().item()
    assert size > 0.9  # the field itself is not small ...
    assert ident[inner].abs().max().item() < 0.05 * size  # ... but exp(v) o exp(-v) is ~ identity
    assert (fwd - v)[inner].abs().max().item() > 0.1  # and exp(v) is not just v
    # a constant velocity integrates to the same constant displacement (exact for border padding)
    c = torch.zeros((1, len(shape)) + shape, dtype=torch.float64)
    for i in range(len(shape)):
        c[:, i] = 0.7 * (i + 1)
    assert torch.allclose(integrate(c), c, atol=1e-10)
    assert torch.equal(integrate(v, steps=0), v)


@pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")
def test_integrate_matches_monai_dvf2ddf():
    from monai.networks.blocks import DVF2DDF

    v = smooth_field((16, 16), amplitude=2.0, seed=7, dtype=torch.float32)
    ref = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(v)
    assert torch.allclose(integrate(v, steps=7), ref, atol=1e-5)


@pytest.mark.parametrize("shape,new", [((16, 16), (32, 32)), ((16, 12), (8, 24)), ((4, 8, 8), (8, 16, 16))])
def test_resize_field_scales_vectors(shape, new):
    ndim = len(shape)
    ddf = torch.zeros((2, ndim) + shape)
    for i in range(ndim):
        ddf[:, i] = 2.0 * (i + 1)
    out = resize_field(ddf, new)
    assert out.shape == (2, ndim) + new
    for i in range(ndim):
        assert torch.allclose(out[:, i], torch.full_like(out[:, i], 2.0 * (i + 1) * new[i] / shape[i]))
    # 2 voxels at 16 px -> 4 voxels at 32 px
    if shape == (16, 16):
        assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 4.0))
    assert resize_field(ddf, shape) is ddf
