"""Tests of diffreg.metrics against analytic answers, numpy, scipy and SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffreg import metrics
from diffreg.metrics import (acdc_dice, camus_dice, dice, endpoint_error, folding_percent, hd95, jacobian_determinant,
                             jacobian_std, registration_report, sdlogj)


def random_field(shape, seed=0, amplitude=1.5):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((1, len(shape)) + tuple(shape))
    u = ndimage.gaussian_filter(u, sigma=(0, 0) + (1.5,) * len(shape))
    return amplitude * u / np.abs(u).max()


def numpy_jacobian(u):
    """Reference: numpy.gradient (central interior, first-order one-sided border) of (1, ndim, *spatial)."""
    ndim = u.shape[1]
    jac = np.empty((ndim, ndim) + u.shape[2:])
    for i in range(ndim):
        grads = np.gradient(u[0, i], axis=tuple(range(ndim)))
        grads = grads if isinstance(grads, (list, tuple)) else [grads]
        for j in range(ndim):
            jac[i, j] = grads[j] + (1.0 if i == j else 0.0)
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


@pytest.mark.parametrize("shape", [(16, 20), (6, 10, 12)])
def test_jacobian_matches_numpy_gradient(shape):
    u = random_field(shape)
    ref = numpy_jacobian(u)
    ours = jacobian_determinant(u)  # numpy input
    assert ours.shape == (1,) + shape and ours.dtype == torch.float64
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(jacobian_determinant(torch.from_numpy(u).float())[0].numpy(), ref, atol=1e-5)
    assert ref.min() < 1 < ref.max()  # a non-trivial field


@pytest.mark.parametrize("shape", [(16, 20), (6, 10, 12)])
def test_jacobian_matches_simpleitk_interior(shape):
    """SimpleITK's DisplacementFieldJacobianDeterminantFilter uses x, y, z component order and reversed index order:
    the ITK image of the field is the numpy array (*spatial, ndim) with channels reversed. Central differences agree
    exactly in the interior. On the border ITK differs: it uses a zero-flux (replicated) neighbour, i.e. half the
    one-sided difference, whereas we use numpy's full one-sided difference."""
    sitk = pytest.importorskip("SimpleITK")
    u = random_field(shape, seed=1)
    arr = np.moveaxis(u[0, ::-1], 0, -1).copy()  # (*spatial, ndim) in x, y[, z] order
    img = sitk.GetImageFromArray(arr, isVector=True)
    assert tuple(img.GetSize()) == tuple(reversed(shape))
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminantFilter().Execute(img))
    ours = jacobian_determinant(u)[0].numpy()
    inner = tuple(slice(1, n - 1) for n in shape)
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-5)
    assert np.abs(ours - ref).max() > 1e-3  # the border really differs
    # a field transposed the wrong way (channels not reversed) does not match: the test is sensitive to order
    wrong = sitk.GetImageFromArray(np.moveaxis(u[0], 0, -1).copy(), isVector=True)
    wrong_det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminantFilter().Execute(wrong))
    assert np.abs(ours[inner] - wrong_det[inner]).max() > 1e-2


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_linear_field(ndim):
    rng = np.random.default_rng(2)
    A = 0.3 * rng.standard_normal((ndim, ndim))
    shape = (5, 6, 7)[:ndim]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    u = np.einsum("ij,j...->i...", A, grid)[None]  # u_i = sum_j A_ij x_j
    det = jacobian_determinant(torch.from_numpy(u))
    assert torch.allclose(det, torch.full_like(det, float(np.linalg.det(np.eye(ndim) + A))), atol=1e-12)
    # the channel/axis convention: u_0 = a * x_1 (channel 0 varies along axis 1) has det 1 (shear)
    v = np.zeros_like(u)
    v[0, 0] = 0.8 * grid[1]
    assert torch.allclose(jacobian_determinant(v), torch.ones(1, *shape, dtype=torch.float64))
    v[0, 1] = 0.5 * grid[0]  # now det = 1 - 0.8 * 0.5
    assert torch.allclose(jacobian_determinant(v), torch.full((1, *shape), 0.6, dtype=torch.float64))


def test_folding_percent_known_region():
    """u_0 as a function of x_0 with slope -3 between rows a and b: det = 1 + avg of neighbouring slopes, <= 0 on
    rows a..b (both sides of the fold included), 1 elsewhere."""
    H, W, a, b = 20, 8, 6, 11
    incr = np.zeros(H - 1)
    incr[a:b] = -3.0
    g = np.concatenate([[0.0], np.cumsum(incr)])
    u = np.zeros((2, 2, H, W))
    u[0, 0] = g[:, None]  # second case (u[1] = 0): no folding
    det = jacobian_determinant(u)
    assert torch.all(det[0, a:b + 1] <= 0) and torch.all(det[0, :a] == 1) and torch.all(det[0, b + 1:] == 1)
    fp = folding_percent(u)
    assert fp.shape == (2,)
    assert math.isclose(float(fp[0]), 100.0 * (b - a + 1) / H)
    assert float(fp[1]) == 0.0
    d0 = det[0].numpy().ravel()
    assert math.isclose(float(jacobian_std(u)[0]), float(np.std(d0)), rel_tol=1e-12)
    assert math.isclose(float(sdlogj(u)[0]), float(np.std(np.log(np.clip(d0, 1e-9, None)))), rel_tol=1e-12)
    assert float(jacobian_std(u)[1]) == 0.0 and float(sdlogj(u)[1]) == 0.0


def test_dice_analytic_and_nan():
    p = torch.zeros(2, 1, 20, 20, dtype=torch.long)
    t = torch.zeros_like(p)
    p[:, 0, 2:12, 2:12] = 1  # 10 x 10
    t[:, 0, 7:17, 2:12] = 1  # shifted by 5 rows: overlap 50
    t[1, 0, 0, 0] = 2
    d = dice(p, t, [1, 2, 3])
    assert d.shape == (2, 3)
    assert torch.allclose(d[:, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert math.isnan(d[0, 1]) and float(d[1, 1]) == 0.0  # absent from both -> NaN; absent from one -> 0
    assert torch.isnan(d[:, 2]).all()
    # (B, *spatial) and numpy inputs give the same
    assert torch.equal(dice(p[:, 0].numpy(), t[:, 0].numpy(), [1]), d[:, :1])
    with pytest.raises(ValueError):
        dice(p, t[..., :10], [1])
    with pytest.raises(ValueError):
        dice(p.float() + 0.5, t, [1])
    with pytest.raises(ValueError):
        dice(p, t, [])


def test_acdc_and_camus_dice():
    t = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    t[0, 0, 2:6, 2:6] = 1  # RV 16 px
    t[0, 0, 8:12, 8:12] = 2  # Myo 16 px
    t[0, 0, 9:11, 9:11] = 3  # LV 4 px (inside myo)
    p = t.clone()
    p[0, 0, 9:11, 9:11] = 2  # LV predicted as Myo
    d = acdc_dice(p, t)
    assert set(d) == {"lv", "myo", "lv_myo", "rv", "whole", "overall"}
    assert float(d["lv"]) == 0.0 and float(d["rv"]) == 1.0
    assert float(d["lv_myo"]) == 1.0 and float(d["whole"]) == 1.0
    assert math.isclose(float(d["myo"]), 2 * 12 / (16 + 12))
    assert math.isclose(float(d["overall"]), (0 + 2 * 12 / 28 + 1 + 1 + 1) / 5)
    c = camus_dice(t, t)
    assert set(c) == {"lv", "myo", "la", "lv_myo", "overall"}
    assert float(c["overall"]) == float(c["lv"]) == 1.0


def scipy_hd95(p, t, spacing):
    """Independent HD95: surfaces = mask minus its erosion (face connectivity, outside = background); exact EDT to the
    other surface; 95th percentile (linear) in each direction; the larger of the two."""
    def surface(m):
        return m & ~ndimage.binary_erosion(m, border_value=0)

    sp, st = surface(p), surface(t)
    d_pt = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    d_tp = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))


def test_hd95_discs_and_independent_reference():
    n = 48
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(yy - 23.5, xx - 23.5)
    p = (r < 14).astype(np.int64)
    t = (r < 8).astype(np.int64)
    h = hd95(p[None], t[None], [1])
    assert h.shape == (1, 1)
    assert abs(float(h[0, 0]) - 6.0) <= 1.0  # radius difference
    assert math.isclose(float(h[0, 0]), scipy_hd95(p == 1, t == 1, (1.0, 1.0)), rel_tol=1e-5)
    # irregular shapes, anisotropic spacing, 3D, several labels
    rng = np.random.default_rng(3)
    a = ndimage.gaussian_filter(rng.standard_normal((8, 20, 20)), 2)
    b = ndimage.gaussian_filter(rng.standard_normal((8, 20, 20)), 2)
    la = np.digitize(a, [-0.05, 0.0, 0.05])
    lb = np.digitize(b, [-0.05, 0.0, 0.05])
    spacing = (3.0, 1.5, 1.5)
    h = hd95(la[None, None], lb[None, None], [1, 2, 3], spacing=spacing)
    for k, v in enumerate([1, 2, 3]):
        assert math.isclose(float(h[0, k]), scipy_hd95(la == v, lb == v, spacing), rel_tol=1e-5)
    # NaN when a label is absent from either map; 0 for identical maps
    t2 = t.copy()
    t2[0, 0] = 2
    h = hd95(np.stack([p, p]), np.stack([t, t2]), [1, 2])
    assert torch.isnan(h[:, 1]).all() and not torch.isnan(h[:, 0]).any()
    assert float(hd95(t[None], t[None], [1])[0, 0]) == 0.0
    with pytest.raises(ValueError):
        hd95(p[None], t[None], [1], spacing=(1.0, 1.0, 1.0))


def test_endpoint_error():
    u = torch.zeros(2, 2, 8, 8)
    v = torch.zeros_like(u)
    v[:, 0], v[:, 1] = 3.0, 4.0
    assert torch.allclose(endpoint_error(u, v), torch.full((2,), 5.0, dtype=torch.float64))
    assert torch.allclose(endpoint_error(u, v, spacing=(2.0, 1.0)),
                          torch.full((2,), math.sqrt(36 + 16), dtype=torch.float64))
    v[:, :, :4] = 0.0  # top half correct
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 4:] = True
    assert torch.allclose(endpoint_error(u, v), torch.full((2,), 2.5, dtype=torch.float64))
    assert torch.allclose(endpoint_error(u, v, mask=mask), torch.full((2,), 5.0, dtype=torch.float64))
    with pytest.raises(ValueError):
        endpoint_error(u, v[..., :4])


def _phantom_pair(n=24):
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(yy - n / 2, xx - n / 2)
    fixed = np.zeros((n, n), np.int64)
    fixed[r < 9] = 2
    fixed[r < 6] = 3
    fixed[(np.abs(yy - n / 2) < 3) & (xx < 4)] = 1
    moving = np.roll(fixed, 2, axis=0)
    return torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None]


def test_registration_report():
    moving, fixed = _phantom_pair()
    zero = torch.zeros(1, 2, 24, 24)
    rep = registration_report(zero, moving, fixed, labels="acdc", true_ddf=zero)
    for k in ["dice_initial", "dice", "dice_lv", "dice_myo", "dice_lv_myo", "dice_rv", "dice_whole",
              "folding_percent", "jacobian_std", "sdlogj", "hd95", "epe"]:
        assert k in rep and rep[k].shape == (1,), k
    assert torch.equal(rep["dice"], rep["dice_initial"])
    assert float(rep["folding_percent"]) == 0.0 and float(rep["jacobian_std"]) == 0.0 and float(rep["epe"]) == 0.0
    # the exact translation registers the pair: moving(p + 2 rows)... moving = fixed shifted down by 2, so
    # warped(p) = moving(p + 2 e_0) = fixed(p)
    shift = torch.zeros(1, 2, 24, 24)
    shift[:, 0] = 2.0
    rep = registration_report(shift, moving, fixed, labels="acdc", true_ddf=shift)
    assert float(rep["dice"]) == 1.0 > float(rep["dice_initial"])
    assert float(rep["hd95"]) == 0.0
    rep = registration_report(shift, moving, fixed, labels=[1, 3], spacing=(1.5, 1.5), true_ddf=zero)
    assert {"dice_1", "dice_3", "hd95_1", "hd95_3"} <= set(rep)
    assert math.isclose(float(rep["epe"]), 2.0)  # in voxels, whatever the spacing
    assert float(rep["epe_initial"]) == 0.0
    rep = registration_report(shift, moving, fixed, labels="camus")
    assert math.isclose(float(rep["dice"]), float(rep["dice_lv"]))
    with pytest.raises(ValueError):
        registration_report(shift, moving, fixed, labels="brats")
    with pytest.raises(ValueError):
        registration_report(torch.zeros(1, 2, 20, 20), moving, fixed)


def test_bad_fields():
    with pytest.raises(ValueError):
        jacobian_determinant(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        folding_percent(torch.zeros(1, 2, 1, 8))
    with pytest.raises(ValueError):
        metrics.jacobian_std([1, 2, 3])


def test_warped_dice_equals_the_report_and_psnr_nmse_analytic():
    import math

    from diffreg.metrics import nmse, psnr, registration_report, warped_dice
    from diffreg.spatial import random_smooth_field

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    lab = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    lab[:, 0][:, ((yy - 16) ** 2 + (xx - 16) ** 2) < 64] = 3
    lab[:, 0][:, (((yy - 16) ** 2 + (xx - 16) ** 2) >= 64) & (((yy - 16) ** 2 + (xx - 16) ** 2) < 120)] = 2
    lab[:, 0][:, (yy < 8) & (xx > 20)] = 1
    ddf = random_smooth_field(2, (32, 32), grids=(4,), scale=2.0, generator=g)
    fixed = lab.roll(1, dims=-1)
    light = warped_dice(ddf, lab, fixed)
    full = registration_report(ddf, lab, fixed)
    assert torch.allclose(light["overall"].double(), full["dice"].double())
    assert torch.allclose(light["lv"].double(), full["dice_lv"].double())
    # psnr / nmse against hand computations
    a, b = torch.zeros(4, 4), torch.full((4, 4), 0.1)
    assert math.isclose(float(psnr(a, b)), 20.0, rel_tol=1e-6)       # 10 log10(1 / 0.01) (0.1 in float32)
    assert math.isclose(float(psnr(a, b, data_range=2.0)), 20.0 + 10 * math.log10(4), rel_tol=1e-6)
    assert math.isclose(float(nmse(a, b)), 1.0) and float(nmse(b, b)) == 0.0
    with pytest.raises(ValueError):
        psnr(a, b[:2])


def test_random_smooth_field_shapes_scale_and_reproducibility():
    from diffreg.spatial import random_smooth_field

    f1 = random_smooth_field(3, (24, 32), grids=(5, 9), scale=2.0, generator=torch.Generator().manual_seed(1))
    f2 = random_smooth_field(3, (24, 32), grids=(5, 9), scale=2.0, generator=torch.Generator().manual_seed(1))
    assert f1.shape == (3, 2, 24, 32) and torch.equal(f1, f2)
    big = random_smooth_field(64, (16, 16), grids=(6,), scale=2.0, generator=torch.Generator().manual_seed(2))
    # corners are grid nodes: their values are the coarse noise itself, SD = scale
    assert abs(float(big[..., 0, 0].std()) - 2.0) < 0.3
    assert random_smooth_field(1, (8, 8, 8), grids=(3,)).shape == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError):
        random_smooth_field(1, (8,), grids=(3,))
    with pytest.raises(ValueError):
        random_smooth_field(1, (8, 8), grids=(1,))


def test_jacobian_statistics_of_a_known_determinant_map():
    import math

    from diffreg.metrics import jacobian_statistics

    det = torch.tensor([[[1.0, -1.0], [0.5, 2.0]]], dtype=torch.float64)
    s = jacobian_statistics(det)
    assert s["folding_percent"].tolist() == [25.0]
    assert s["jacobian_std"].item() == pytest.approx(float(torch.tensor([1.0, -1.0, 0.5, 2.0]).double().std(correction=0)))
    logs = torch.tensor([0.0, math.log(1e-9), math.log(0.5), math.log(2.0)], dtype=torch.float64)
    assert s["sdlogj"].item() == pytest.approx(float(logs.std(correction=0)))
    # the same numbers as the per-field functions, from one determinant
    from diffreg.metrics import folding_percent, jacobian_determinant, sdlogj

    ddf = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    stats = jacobian_statistics(jacobian_determinant(ddf))
    assert torch.equal(stats["folding_percent"], folding_percent(ddf)) and torch.equal(stats["sdlogj"], sdlogj(ddf))


def test_ejection_fraction_from_propagated_labels_has_known_answers():
    from diffreg.metrics import ejection_fraction, ejection_fraction_report, label_volume

    # an LV (label 3) of 10 x 10 voxels at ED and 6 x 10 at ES, 2 mm x 1.5 mm pixels: EF = 100 (100 - 60) / 100 = 40 %
    ed = torch.zeros(1, 1, 20, 20, dtype=torch.long)
    ed[..., 5:15, 5:15] = 3
    ed[..., 0:2, :] = 1   # another structure does not count
    es = torch.zeros_like(ed)
    es[..., 7:13, 5:15] = 3
    assert label_volume(ed, 3, (2.0, 1.5)).item() == pytest.approx(100 * 3.0)
    assert ejection_fraction(torch.tensor([100.0]), torch.tensor([60.0])).item() == pytest.approx(40.0)
    assert torch.isnan(ejection_fraction(torch.tensor([0.0]), torch.tensor([0.0]))).all()
    # ED -> ES: a warped ED label with 7 x 10 LV voxels predicts EF 30 %, an error of 10 points
    warped = torch.zeros_like(ed)
    warped[..., 6:13, 5:15] = 3
    r = ejection_fraction_report(ed, es, warped, "ed->es", "acdc", (2.0, 1.5))
    assert (r["ef_true"].item(), r["ef"].item(), r["ef_error"].item()) == pytest.approx((40.0, 30.0, 10.0))
    # ES -> ED: the warped ES label stands for ED; a perfect propagation has no error
    r = ejection_fraction_report(es, ed, ed, "es->ed", "acdc")
    assert (r["ef_true"].item(), r["ef"].item(), r["ef_error"].item()) == pytest.approx((40.0, 40.0, 0.0))
    with pytest.raises(ValueError, match="direction"):
        ejection_fraction_report(es, ed, ed, "ed-es")


def test_evaluate_reports_the_ejection_fraction_of_the_phantom():
    """The identity field propagates the moving label unchanged: on the phantom (ES -> ED) its EF is 0 and its error
    is the phantom's true EF, which a contracting heart makes positive."""
    from diffreg.data import open_dataset
    from diffreg.evaluate import evaluate
    from diffreg.models.base import RegistrationModel

    class Identity(RegistrationModel):
        def forward(self, moving, fixed):
            return torch.zeros(moving.shape[0], 2, *moving.shape[2:])

    data = open_dataset("phantom", "test", dims=2, profile="quick")
    assert data.direction == "es->ed"
    table = evaluate(Identity(), data, limit=3)
    for row in table:
        assert row["ef"] == pytest.approx(0.0) and row["ef_true"] > 10 and row["ef_error"] == pytest.approx(row["ef_true"])
