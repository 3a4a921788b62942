import pytest
import torch

from diffreg.models import MODELS, VoxelMorph, VoxelMorphDiff, build
from diffreg.spatial import warp
from tests.helpers import ShiftedBlobs


def test_paper_parameter_counts_match_official_voxelmorph():
    # Official voxelmorph (PyTorch) VxmDense, 3D, enc [16,32,32,32]: VM-2 dec [32,32,32,32,32,16,16] = 327,331
    # parameters; VM-1 dec [32,32,32,32,8,8] = 276,523 (counted by hand from the layer list: see module docstring).
    assert build("voxelmorph", profile="paper", dims=3).num_parameters() == 327_331
    assert VoxelMorph(dims=3, layout="vm1").num_parameters() == 276_523


@pytest.mark.parametrize("cls", [VoxelMorph, VoxelMorphDiff])
@pytest.mark.parametrize("dims,size", [(2, (32, 32)), (3, (16, 32, 32))])
def test_shapes_identity_start_and_interface(cls, dims, size, device):
    torch.manual_seed(0)
    model = cls(dims=dims).to(device)
    x = torch.randn(2, 1, *size, device=device)
    y = torch.randn(2, 1, *size, device=device)
    ddf = model(x, y)
    assert ddf.shape == (2, dims, *size)
    # flow layer initialised at N(0, 1e-5): the untrained model is (almost) the identity
    assert ddf.abs().max() < 1e-2
    res = model.register(x, y)
    assert res.ddf.shape == ddf.shape and res.warped.shape == x.shape
    terms = model.loss({"moving": x, "fixed": y})
    assert {"total", "similarity", "smooth"} <= set(terms)
    terms["total"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs():
    m = VoxelMorph(dims=2)
    with pytest.raises(ValueError, match="divisible by 16"):
        m(torch.zeros(1, 1, 30, 32), torch.zeros(1, 1, 30, 32))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 16, 32))
    with pytest.raises(ValueError, match="spatial dims"):
        m(torch.zeros(1, 32, 32), torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="one channel"):
        m(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="layout"):
        VoxelMorph(layout="vm3")
    with pytest.raises(ValueError, match="unknown method"):
        build("nope")


def test_build_knows_every_registered_model():
    for name in MODELS:
        assert isinstance(build(name, profile="quick"), MODELS[name])


class _FixedField(torch.nn.Module):
    """Stands in for the U-Net: always outputs the same field."""

    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, x):
        return self.field.expand(x.shape[0], *self.field.shape[1:])


def test_diffeomorphic_variant_removes_folds_of_a_large_field():
    from diffreg.metrics import folding_percent

    g = torch.Generator().manual_seed(3)
    v = torch.nn.functional.interpolate(torch.randn(1, 2, 6, 6, generator=g) * 4.0, size=(32, 32), mode="bicubic",
                                        align_corners=True)
    plain, diff = VoxelMorph(dims=2), VoxelMorphDiff(dims=2)
    plain.unet, diff.unet = _FixedField(v), _FixedField(v)
    x = torch.zeros(1, 1, 32, 32)
    folds_plain = float(folding_percent(plain(x, x))[0])
    folds_diff = float(folding_percent(diff(x, x))[0])
    assert folds_plain > 1.0
    assert folds_diff < 0.2 * folds_plain


def test_voxelmorph_learns_translations_on_held_out_pairs(seed, claims):
    torch.manual_seed(seed)
    train, test = ShiftedBlobs(16, seed=0), ShiftedBlobs(6, seed=1)
    model = VoxelMorph(dims=2, smooth_weight=0.1)
    # lr 1e-3 for 400 steps: at 2e-3 for 250 steps the held-out error ratio ranged 0.30-0.88 over seeds and CPU
    # kernel levels (the trajectory is chaotic at that rate); at 1e-3 for 400 steps it stays within 0.26-0.38
    # (benchmarks/claims/summary.md, "unit tests")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(400):
        b = train[step % len(train)]
        loss = model.loss({"moving": b["moving"][None], "fixed": b["fixed"][None]})["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def err(ddf_fn):
        tot = 0.0
        for b in test:
            ddf = ddf_fn(b)
            tot += float((warp(b["moving"][None], ddf) - b["fixed"][None]).abs().mean())
        return tot / len(test)

    before = err(lambda b: torch.zeros(1, 2, 32, 32))
    after = err(lambda b: model(b["moving"][None], b["fixed"][None]).detach())
    claims.check("held_out_error_ratio", after / before, "<", 0.6, "learned fields reduce the held-out image error")


def test_loss_is_computed_in_float32_under_autocast():
    # bfloat16 autocast on the CPU stands in for CUDA mixed precision: the loss must match float32 closely
    # (NCC computed in bfloat16 diverges to about -1e9).
    torch.manual_seed(0)
    model = VoxelMorph(dims=2)
    b = ShiftedBlobs(1)[0]
    batch = {"moving": b["moving"][None], "fixed": b["fixed"][None]}
    ref = model.loss(batch)["total"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model.loss(batch)["total"]
    assert amp.dtype == torch.float32
    assert abs(amp.item() - ref.item()) < 0.02
