import math

import pytest
import torch

from diffreg.config import get_config
from diffreg.models import DRDM, MODELS, DeformationGenerator, RegistrationModel, build, is_generator
from diffreg.models.drdm import (
    _grid_compose,
    angle_loss,
    cumulative_noise_level,
    distance_loss,
    negative_jacobian,
    noise_level,
    sample_velocity,
)
from diffreg.spatial import compose, warp
from diffreg.train import fit
from tests.helpers import ShiftedBlobs

SMALL = dict(widths=(4, 8, 8), time_dim=16, control_spacing=2, scales=3)  # tiny recovery U-Net for CPU tests


def _smooth_field(b, size, amp, seed):
    """A smooth random field: coarse Gaussian noise upsampled (voxels)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, len(size), *[4] * len(size), generator=g) * amp
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=True)


def _blob(size, b=1):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")
    r2 = sum((x - s / 2) ** 2 for x, s in zip(grids, size))
    img = torch.exp(-r2 / (2 * (size[-1] / 5) ** 2)) * 2 - 1
    return img.expand(b, 1, *size).clone()


def test_paper_parameter_count_matches_official():
    # official RecResACNet (2D): 435,435 trainable weights + its frozen 80 x 100 nn.Embedding time table, which
    # PyTorch counts among the parameters: 443,435, the "~0.443 M" of the official repository
    model = build("drdm", profile="paper", dims=2)
    n = model.num_parameters()
    print(f"DRDM 2D paper: {n:,} trainable (+ 8,000 frozen embedding in the official count)")
    assert n == 435_435
    assert abs(n + 80 * 100 - 0.443e6) / 0.443e6 < 0.002


def test_noise_levels_eq9_eq11():
    assert [noise_level(t) for t in (1, 2, 10, 80)] == [1, 1, 3, 13]  # floor(t^0.6)
    assert cumulative_noise_level(80) == math.floor(80 ** 1.3 / 1.5) == 198
    t = torch.tensor([1, 30, 80])
    assert noise_level(t).tolist() == [1, 7, 13]
    model = DRDM(**SMALL)
    assert model.n_cum(1) == 1  # floor(1 / 1.5) = 0, clamped to n_1 = 1 (psi_{1:1} contains psi_1)
    assert all(model.n_cum(t) >= model.n_t(t) for t in range(1, 81))


@pytest.mark.parametrize("dims,size", [(2, (40, 36)), (3, (16, 20, 24))])
def test_eq5_composition_equals_sequential_warping(dims, size):
    a = _smooth_field(1, size, 3.0, seed=1)
    b = _smooth_field(1, size, 3.0, seed=2)
    image = torch.rand(1, 1, *[4] * dims, generator=torch.Generator().manual_seed(3))
    image = torch.nn.functional.interpolate(image, size=size, mode="bilinear" if dims == 2 else "trilinear",
                                            align_corners=True)
    # <a o b>(I) = a applied to b(I): warp(warp(I, b), a) == warp(I, compose(a, b)) away from the border
    seq = warp(warp(image, b), a)
    once = warp(image, compose(a, b))
    inner = (slice(None), slice(None)) + tuple(slice(4, s - 4) for s in size)
    err = (seq - once)[inner].abs().mean()
    # the other order is a different map, far from the sequential warps
    wrong = (warp(image, compose(b, a)) - seq)[inner].abs().mean()
    assert err < 0.01 and err < 0.25 * wrong, (err, wrong)
    # the fast composition of the forward process is the same function
    assert torch.allclose(_grid_compose(a, b), compose(a, b), atol=1e-4)


def test_multiscale_velocity_eq6_variance():
    # eq. 6-7: at the coarsest grid nodes every scale contributes; between nodes interpolation lowers the variance,
    # so the per-voxel variance lies between the finest scale's and (4^(m+1) - 1) / 3 sigma^2
    g = torch.Generator().manual_seed(0)
    v = sample_velocity(256, (32, 32), 0.1, scales=3, generator=g)
    var = v.var().item() / 0.1 ** 2
    assert 1.0 + 4.0 < var < (4 ** 3 - 1) / 3 + 0.5
    assert v.shape == (256, 2, 32, 32)
    assert sample_velocity(2, (8, 8), torch.tensor([0.0, 1.0]), scales=2, generator=g)[0].abs().max() == 0


def test_magnitude_grows_with_t_as_eq10():
    # eq. 10: Var psi_{t:1} is proportional to n_{t:1} (independent unit fields), so the SD ratio between two levels
    # is sqrt(n_{t2:1} / n_{t1:1}). Exact in the small-displacement limit, where a composition is an addition ...
    levels = (10, 40, 80)
    for sigma, tol in ((1e-5, 0.1), (2e-3, None)):
        model = DRDM(sigma=sigma, **SMALL)
        g = torch.Generator().manual_seed(0)
        sd = {t: model.sample_ddf((32, 32), t, batch=96, generator=g).std().item() for t in levels}
        n = {t: model.n_cum(t) for t in levels}
        if tol is not None:
            for t1, t2 in ((10, 40), (40, 80), (10, 80)):
                expected = math.sqrt(n[t2] / n[t1])
                assert abs(sd[t2] / sd[t1] / expected - 1) < tol, (t1, t2, sd, expected)
        else:
            # ... at the profile's size every composition also resamples the accumulated field, which damps its
            # finest scale, so the growth is somewhat slower than sqrt(n) but still increasing and far from the
            # linear growth of one field composed with itself (the official sampler)
            slope = math.log(sd[80] / sd[10]) / math.log(n[80] / n[10])
            print(f"SD {sd}, growth exponent {slope:.2f} (eq. 10: 0.5)")
            assert sd[10] < sd[40] < sd[80]
            assert 0.3 < slope < 0.6
    assert model.sample_ddf((32, 32), 0, batch=2).abs().max() == 0


def test_paper_profile_field_matches_table_1():
    """The paper profile's random field at T' = 70, measured at the paper geometry (256 x 256, fresh fields, eq. 2),
    against Table 1 (last row, T' = 70): max |psi| 14.8 % and mean |psi| 4.3 % of the image size; each within 25 %."""
    from diffreg.config import get_config
    from diffreg.models import build

    cfg = get_config("drdm", "paper", dims=2)
    assert cfg.data.size == (256, 256) and cfg.model["fields"] == "fresh"
    model = build(cfg)
    psi = model.sample_ddf((256, 256), 70, batch=16, generator=torch.Generator().manual_seed(0))
    size = psi.norm(dim=1).flatten(1) / 256 * 100  # % of the image size
    max_pct, mean_pct = size.amax(1).mean().item(), size.mean(1).mean().item()
    print(f"T' = 70: max {max_pct:.1f} %, mean {mean_pct:.1f} % (Table 1: 14.8 %, 4.3 %)")
    assert abs(max_pct / 14.8 - 1) < 0.25
    assert abs(mean_pct / 4.3 - 1) < 0.25
    # and the deformation level orders the size as in Table 1 (T' = 30: 7.8 % / 2.4 %)
    psi30 = model.sample_ddf((256, 256), 30, batch=16, generator=torch.Generator().manual_seed(0))
    assert (psi30.norm(dim=1).flatten(1) / 2.56).mean().item() < mean_pct


def test_shared_field_grows_linearly_and_points_along_the_diffused_ddf():
    # fields="shared" (the official sampler): one unit field composed with itself, so in the small-displacement limit
    # psi_{t:1} = n_{t:1} u (SD ratio n2 / n1, not sqrt) and psi_t = n_t u is parallel to it; with fresh fields
    # (eq. 2) psi_t is only the share n_t / n_{t:1} of independent fields: the cosine is about sqrt(n_t / n_{t:1})
    shared, fresh = DRDM(sigma=1e-5, fields="shared", **SMALL), DRDM(sigma=1e-5, **SMALL)
    sd = {t: shared.sample_ddf((32, 32), t, batch=4, generator=torch.Generator().manual_seed(0)).std().item()
          for t in (10, 40)}  # the same unit fields at both levels
    assert abs(sd[40] / sd[10] / (shared.n_cum(40) / shared.n_cum(10)) - 1) < 0.02
    images = _blob((32, 32), b=8)
    t = torch.full((8,), 40)
    cos = {}
    for name, model in (("shared", shared), ("fresh", fresh)):
        d = model.diffuse(images, t, generator=torch.Generator().manual_seed(1), perturb=0)
        cos[name] = torch.nn.functional.cosine_similarity(d["dvf"].flatten(1), d["ddf"].flatten(1)).mean().item()
    expected_fresh = math.sqrt(fresh.n_t(40) / fresh.n_cum(40))
    assert cos["shared"] > 0.99 and abs(cos["fresh"] - expected_fresh) < 0.1, (cos, expected_fresh)
    with pytest.raises(ValueError, match="fields"):
        DRDM(fields="stationary")


def test_negative_jacobian_penalty_detects_folding():
    size = (24, 24)
    x0 = torch.arange(size[0], dtype=torch.float32).view(-1, 1).expand(size)
    folding = torch.zeros(1, 2, *size)
    folding[0, 0] = -2.0 * (x0 - 12)  # phi_0 = x0 - 2 (x0 - 12): reflects axis 0, det(I + grad u) = -1
    assert negative_jacobian(folding).item() == pytest.approx(1.0, abs=1e-5)
    smooth = _smooth_field(1, size, 0.5, seed=0)
    assert negative_jacobian(smooth).item() == 0.0
    # the official 'negdetj' takes det(grad u) without the identity: 0 for this folding field
    du = torch.stack(torch.gradient(folding[0], dim=(1, 2)), 1)  # (i, j, H, W)
    official = torch.relu(-(du[0, 0] * du[1, 1] - du[0, 1] * du[1, 0])).mean()
    assert official.item() == 0.0


def test_distance_and_angle_losses_at_the_inverse():
    psi = _smooth_field(1, (32, 32), 1.0, seed=4)
    inv = torch.zeros_like(psi)
    for _ in range(30):  # fixed point of compose(psi, inv) = 0: inv(x + psi(x)) = -psi(x)
        inv = -warp(psi, inv)  # inverse by iteration: inv(y) = -psi(y + inv(y))
    assert distance_loss(psi, inv).item() < 0.1
    assert angle_loss(psi, inv).item() < -0.95
    assert distance_loss(psi, torch.zeros_like(psi)).item() == pytest.approx(1.0, abs=1e-6)
    assert angle_loss(psi, psi).item() > 0.95


@pytest.mark.parametrize("dims,size", [(2, (32, 32)), (3, (8, 16, 16))])
def test_recursion_k2_shapes_and_loss(dims, size):
    torch.manual_seed(0)
    model = DRDM(dims=dims, **SMALL)
    image = _blob(size, b=2)
    total, parts = model.recover_step(image, torch.tensor([5, 60]))
    assert len(parts) == 2 and all(p.shape == (2, dims, *size) for p in parts)
    assert torch.allclose(total, compose(parts[1], parts[0]), atol=1e-5)  # eq. 12: psi^(2) o psi^(1)
    assert torch.allclose(model(image, 5)[0], model.recover_step(image[:1], 5)[0][0], atol=1e-5)
    one, parts1 = model.recover_step(image, 7, recursions=1)
    assert len(parts1) == 1 and torch.allclose(one, parts1[0])
    terms = model.loss({"moving": image, "fixed": image})
    assert set(terms) == {"total", "dist", "ang", "reg"}
    expected = model.lambda_dist * terms["dist"] + model.lambda_ang * terms["ang"] + model.lambda_reg * terms["reg"]
    assert torch.allclose(terms["total"], expected)
    terms["total"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_deform_reproducible_and_level_controls_size():
    torch.manual_seed(0)
    model = DRDM(**SMALL).eval()
    image = _blob((32, 32), b=3)
    d1, x1 = model.deform(image, 20, generator=torch.Generator().manual_seed(7))
    d2, x2 = model.deform(image, 20, generator=torch.Generator().manual_seed(7))
    d3, _ = model.deform(image, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(d1, d2) and torch.equal(x1, x2)
    assert not torch.allclose(d1, d3)
    assert torch.allclose(x1, warp(image, d1))
    d0, x0 = model.deform(image, 0, generator=torch.Generator().manual_seed(7))
    assert d0.abs().max() == 0 and torch.allclose(x0, image)
    # the trajectory gives the same end point and the diffusion frames grow in size
    d4, _, traj = model.deform(image, 20, generator=torch.Generator().manual_seed(7), return_trajectory=True)
    assert torch.allclose(d4, d1, atol=1e-5)
    assert len(traj["diffusion"]) == 21 and len(traj["recovery"]) == 21
    assert [t for t, _, _ in traj["recovery"]] == list(range(20, -1, -1))
    sizes = [f.norm(dim=1).mean().item() for _, f, _ in traj["diffusion"]]
    assert sizes[0] == 0 and sizes[20] > sizes[5] > 0


def test_work_size_resizes_fields():
    torch.manual_seed(0)
    model = DRDM(work_size=(32, 32), **SMALL).eval()
    image = _blob((64, 64), b=2)
    ddf, out = model.deform(image, 10, generator=torch.Generator().manual_seed(0))
    assert ddf.shape == (2, 2, 64, 64) and out.shape == image.shape
    terms = model.loss({"moving": image, "fixed": image})
    assert torch.isfinite(terms["total"])


def test_labels_stay_in_label_set_and_pairs():
    torch.manual_seed(0)
    model = DRDM(**SMALL).eval()
    image = _blob((32, 32), b=2)
    labels = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    labels[:, :, 8:24, 8:24] = 1
    labels[:, :, 12:20, 12:20] = 3
    ddf, _ = model.deform(image, 30, generator=torch.Generator().manual_seed(1))
    warped = model.deform_labels(labels, ddf)
    assert warped.dtype == labels.dtype
    assert set(warped.unique().tolist()) <= {0, 1, 3}
    pairs = model.synthesize_pairs(image, [(10, 20), (0, 30)], labels=labels, generator=torch.Generator().manual_seed(2))
    assert len(pairs) == 2
    for p in pairs:
        assert p["moving"].shape == image.shape and p["ddf"].shape == (2, 2, 32, 32)
        inner = (slice(None), slice(None), slice(4, 28), slice(4, 28))
        # Alg. 4: fixed = moving warped by the known field (up to one extra interpolation)
        assert (warp(p["moving"], p["ddf"]) - p["fixed"])[inner].abs().max() < 0.1
        assert set(p["fixed_label"].unique().tolist()) <= {0, 1, 3}
    assert torch.allclose(pairs[1]["moving"], image)  # T_aug = 0: the moving image is the source


def test_drdm_is_a_deformation_generator_not_a_registration_model():
    # the rest of the package asks the interface (is_generator, isinstance) instead of comparing names
    model = DRDM(**SMALL).eval()
    assert isinstance(model, DeformationGenerator) and not isinstance(model, RegistrationModel)
    assert not hasattr(model, "register")
    assert is_generator("drdm") and not is_generator("voxelmorph") and not is_generator("syn")
    assert [m for m in MODELS if is_generator(m)] == ["drdm"]
    assert model.max_level == model.timesteps == 80 and model.level_symbol == "T'"
    assert DRDM.refusal() == "DRDM generates deformations of one image and does not register pairs"
    image = _blob((32, 32))
    ddf, deformed = model.deform(image, 3, generator=torch.Generator().manual_seed(0))
    assert ddf.shape == (1, 2, 32, 32) and torch.allclose(deformed, warp(image, ddf))


def test_training_reduces_the_recovery_loss(seed, claims):
    # a few dozen steps of the trainer on blob images: the held-out eq. 14 distance loss must drop
    torch.manual_seed(seed)
    model = DRDM(**SMALL)
    data = ShiftedBlobs(n=8, size=(32, 32))
    images = torch.stack([data[i]["fixed"] for i in range(4)])

    def held_out():
        with torch.no_grad():
            d = model.diffuse(images, torch.tensor([20, 40, 60, 80]), generator=torch.Generator().manual_seed(5))
            return distance_loss(d["dvf"], model(d["deformed"], d["t"])).item()

    before = held_out()
    cfg = get_config("drdm", "quick")
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.log_every = 60, 2, 2e-3, 30
    cfg.train.seed = seed
    rows = fit(model, data, cfg, progress=False)
    after = held_out()
    print(f"held-out L_dist {before:.3f} -> {after:.3f}")
    assert len(rows) == 2 and all(math.isfinite(r["total"]) for r in rows)
    claims.check("held_out_distance_ratio", after / before, "<", 0.9, "training lowers the held-out eq. 14 loss")


def test_build_and_config():
    assert MODELS["drdm"] is DRDM
    quick = get_config("drdm", "quick")
    assert quick.data.size == (64, 64) and quick.model["work_size"] == (32, 32)
    paper = get_config("drdm", "paper")
    assert paper.model["timesteps"] == 80 and paper.model["recursions"] == 2
    assert paper.train.lr == 1e-4 and paper.data.size == (256, 256)
    assert get_config("drdm", "paper", dims=3).data.size == (128, 128, 128)
    model = build("drdm", profile="quick")
    assert model.work_size == (32, 32)
    with pytest.raises(ValueError, match="work_size"):
        DRDM(work_size=(30, 30))
