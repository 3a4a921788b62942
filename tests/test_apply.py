"""``diffreg.apply`` and ``python -m diffreg register``: own NIfTI / MetaImage pairs, ITK-convention outputs.

The field file is checked independently: SimpleITK (and ANTs when installed) read ``displacement.nii.gz`` and warp
the moving image themselves, which must give diffreg's ``warped.nii.gz``. The geometry chain (resampling, crop/pad,
voxels to world millimetres) is checked exactly with models whose field is known.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

sitk = pytest.importorskip("SimpleITK")

from diffreg.apply import open_run, preprocessing_for, register_files  # noqa: E402
from diffreg.cli import main  # noqa: E402
from diffreg.config import get_config  # noqa: E402
from diffreg.data.phantom import make_sax_2d, make_sax_3d  # noqa: E402
from diffreg.models.base import RegistrationModel, RegistrationResult  # noqa: E402
from diffreg.spatial import warp  # noqa: E402

SIZE_2D = (32, 32)
SIZE_3D = (16, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _rotation(axis, degrees: float) -> np.ndarray:
    """3 x 3 rotation about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    a = math.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


OBLIQUE_3D = _rotation((1.0, 2.0, 3.0), 25.0)
OBLIQUE_2D = np.array([[math.cos(0.5), -math.sin(0.5)], [math.sin(0.5), math.cos(0.5)]])


def _image(arr: np.ndarray, spacing, origin, direction):
    """A SimpleITK image of ``arr`` (array order) with ``spacing`` in array order, ``origin`` and ``direction`` in
    ITK (LPS) order."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return img


def _write(folder: Path, name: str, img) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(img, str(path))
    return path


def _write_pair(folder: Path, seq, spacing, origin, direction, ext: str) -> dict[str, Path]:
    """ES (moving) and ED (fixed) of a phantom sequence, images and labels, all on one grid."""
    out = {}
    for role, t in (("moving", seq.es), ("fixed", seq.ed)):
        img = (seq.frames[t] * 800).astype(np.int16)
        out[role] = _write(folder, f"{role}{ext}", _image(img, spacing, origin, direction))
        out[f"{role}_label"] = _write(folder, f"{role}_label{ext}",
                                      _image(seq.labels[t].astype(np.uint8), spacing, origin, direction))
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


OUTSIDE = -1e6  # SimpleITK's value where x + d(x) leaves the moving image (diffreg clamps to its border there)


def _sitk_warp(moving: Path, fixed: Path, displacement: Path) -> np.ndarray:
    """The moving image resampled onto the fixed grid by SimpleITK through the displacement-field file
    (:data:`OUTSIDE` where the displaced point leaves the moving image)."""
    field = sitk.ReadImage(str(displacement))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat32), sitk.ReadImage(str(fixed)), tx,
                        sitk.sitkLinear, OUTSIDE, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _heart_of(label: np.ndarray, grow: int = 2) -> np.ndarray:
    """The foreground of a label map, dilated by ``grow`` voxels."""
    from scipy import ndimage

    return ndimage.binary_dilation(np.asarray(label) > 0, iterations=grow)


def _heart(label_path: Path, grow: int = 2) -> np.ndarray:
    return _heart_of(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), grow)


def _corr(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> float:
    """Correlation inside ``mask`` where ``theirs`` sampled inside the moving image (at least 90 % of it)."""
    keep = mask & (theirs > OUTSIDE / 2)
    assert keep.sum() >= 0.9 * mask.sum(), (int(keep.sum()), int(mask.sum()))
    return float(np.corrcoef(ours[keep].ravel(), theirs[keep].ravel())[0, 1])


class KnownField(RegistrationModel):
    """A stand-in model whose ``register`` returns ``fn(moving, fixed)`` (network voxels)."""

    def __init__(self, dims: int, fn) -> None:
        super().__init__()
        self.dims = dims
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, moving, fixed):
        return self.fn(moving, fixed)

    @torch.no_grad()
    def register(self, moving, fixed, **options):
        self.options = options
        ddf = self.fn(moving, fixed).to(moving)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={})


def _config(dims: int):
    cfg = get_config("voxelmorph", "quick", dims)
    cfg.data.size = SIZE_2D if dims == 2 else SIZE_3D
    return cfg


def _smooth_field(dims: int, amplitude: float, seed: int = 0):
    """A smooth random field (network voxels) of about ``amplitude`` voxels."""
    g = torch.Generator().manual_seed(seed)
    size = SIZE_2D if dims == 2 else SIZE_3D
    coarse = torch.randn((1, dims) + tuple(max(2, s // 8) for s in size), generator=g)
    mode = "bilinear" if dims == 2 else "trilinear"
    field = torch.nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=True)
    return lambda moving, fixed: field * amplitude


# ----------------------------------------------------------------------------------------------------------------
# tiny trained runs (once per module)
# ----------------------------------------------------------------------------------------------------------------


def _train(out: Path, dims: int) -> Path:
    from diffreg.data import PhantomPairs
    from diffreg.models import build
    from diffreg.train import fit, seed_everything

    cfg = _config(dims)
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 30, 10, 30
    data = PhantomPairs(kind="sax" if dims == 2 else "sax3d", n_subjects=6, size=cfg.data.size, split="train")
    seed_everything(0)
    model = build(cfg)
    fit(model, data, cfg, out=out, device="cpu", progress=False)
    (out / "data.json").write_text(json.dumps({"data": "phantom", "method": cfg.method}))
    return out


@pytest.fixture(scope="module")
def run2d(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("run2d"), 2)


@pytest.fixture(scope="module")
def run3d(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("run3d"), 3)


@pytest.fixture(scope="module")
def pair2d(tmp_path_factory) -> dict[str, Path]:
    """A 2D MetaImage phantom pair: anisotropic pixels, rotated, shifted origin."""
    seq = make_sax_2d((48, 40), n_frames=2, seed=3, spacing=(2.9, 3.5))
    return _write_pair(tmp_path_factory.mktemp("in2d"), seq, seq.spacing, (12.5, -40.0), OBLIQUE_2D, ".mhd")


# ----------------------------------------------------------------------------------------------------------------
# the field means what its header says: SimpleITK and ANTs apply it
# ----------------------------------------------------------------------------------------------------------------


def test_3d_nifti_oblique_field_is_applied_by_simpleitk(run3d, tmp_path, device):
    seq = make_sax_3d((10, 40, 36), n_frames=2, seed=4, spacing=(9.0, 3.5, 3.9))
    inputs = _write_pair(tmp_path / "in", seq, seq.spacing, (-50.0, 30.0, 12.0), OBLIQUE_3D, ".nii.gz")
    before = _snapshot(tmp_path / "in")
    res = register_files(run3d, inputs["moving"], inputs["fixed"], out=tmp_path / "reg",
                         moving_label=inputs["moving_label"], fixed_label=inputs["fixed_label"], device=device)
    assert _snapshot(tmp_path / "in") == before  # inputs untouched
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == sorted(
        ["warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "metrics.json"])
    fixed = sitk.ReadImage(str(inputs["fixed"]))
    disp = sitk.ReadImage(str(res.paths["displacement"]))
    assert disp.GetNumberOfComponentsPerPixel() == 3 and disp.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(disp.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(disp.GetDirection(), fixed.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(disp.GetSpacing(), fixed.GetSpacing(), rtol=1e-6)
    assert res.metrics["displacement_mm"]["max"] > 1.0  # the trained run moves something
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(res.paths["warped"])))
    theirs = _sitk_warp(inputs["moving"], inputs["fixed"], res.paths["displacement"])
    mask = _heart(inputs["fixed_label"])
    assert _corr(ours, theirs, mask) > 0.99
    m = json.loads(res.paths["metrics"].read_text())
    for key in ("folding_percent", "sdlogj", "jacobian_std", "dice", "dice_initial", "run", "options", "device",
                "seconds", "preprocessing", "network_grid"):
        assert key in m, key
    assert m["network_grid"]["size"] == list(SIZE_3D) and m["device"] == str(device)
    assert set(m["dice"]) >= {"1", "2", "3", "mean", "foreground"}
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(res.paths["jacobian"])))
    assert jac.shape == ours.shape and abs(100 * float((jac <= 0).mean()) - m["folding_percent"]) < 1e-9


def test_large_known_field_is_applied_by_simpleitk_and_ants(tmp_path):
    """A large smooth field through an oblique, anisotropic 3D chain with resampling and crop/pad."""
    seq = make_sax_3d((10, 40, 36), n_frames=2, seed=6, spacing=(9.0, 3.5, 3.9))
    inputs = _write_pair(tmp_path / "in", seq, seq.spacing, (20.0, -7.5, 3.0), OBLIQUE_3D, ".nii.gz")
    run = (KnownField(3, _smooth_field(3, 2.0)), _config(3), "phantom")
    res = register_files(run, inputs["moving"], inputs["fixed"], out=tmp_path / "reg")
    assert res.metrics["displacement_mm"]["max"] > 8.0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(res.paths["warped"])))
    mask = _heart(inputs["fixed_label"], grow=3)
    assert _corr(ours, _sitk_warp(inputs["moving"], inputs["fixed"], res.paths["displacement"]), mask) > 0.99
    ants = pytest.importorskip("ants")
    out = ants.apply_transforms(fixed=ants.image_read(str(inputs["fixed"])),
                                moving=ants.image_read(str(inputs["moving"])),
                                transformlist=[str(res.paths["displacement"])], interpolator="linear",
                                defaultvalue=OUTSIDE)
    theirs = out.numpy().transpose(2, 1, 0)  # ANTs arrays are (x, y, z)
    assert _corr(ours, theirs, mask) > 0.99


def test_2d_mhd_pair_through_the_command(run2d, pair2d, tmp_path, device, capsys):
    before = _snapshot(pair2d["moving"].parent)
    rc = main(["register", "--run", str(run2d), "--moving", str(pair2d["moving"]), "--fixed", str(pair2d["fixed"]),
               "--moving-label", str(pair2d["moving_label"]), "--fixed-label", str(pair2d["fixed_label"]),
               "--out", str(tmp_path / "reg"), "--device", str(device)])
    text, err = capsys.readouterr()
    assert rc == 0, text + err
    assert "Dice" in text and "wrote" in text
    assert _snapshot(pair2d["moving"].parent) == before
    out = tmp_path / "reg"
    disp = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert disp.GetDimension() == 2 and disp.GetNumberOfComponentsPerPixel() == 2
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    theirs = _sitk_warp(pair2d["moving"], pair2d["fixed"], out / "displacement.nii.gz")
    assert _corr(ours, theirs, _heart(pair2d["fixed_label"])) > 0.99
    m = json.loads((out / "metrics.json").read_text())
    assert m["options"] == {} and m["displacement_mm"]["max"] > 0.5
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_label.nii.gz")))
    assert set(np.unique(label)) <= {0, 1, 2, 3}


def test_single_slice_3d_nifti_counts_as_2d(run2d, tmp_path):
    seq = make_sax_2d((36, 36), n_frames=2, seed=8)
    frames = seq.frames[:, None]  # (T, 1, H, W): one slice
    s = (7.0, *seq.spacing)
    inputs = {}
    for role, t in (("moving", seq.es), ("fixed", seq.ed)):
        inputs[role] = _write(tmp_path / "in", f"{role}.nii.gz",
                              _image((frames[t] * 500).astype(np.float32), s, (3.0, 4.0, 5.0), OBLIQUE_3D))
    res = register_files(run2d, inputs["moving"], inputs["fixed"], out=tmp_path / "reg", device="cpu")
    assert sitk.ReadImage(str(res.paths["warped"])).GetSize() == (36, 36, 1)
    # ITK reads a vector NIfTI with one slice as 2D, so the field's slice is written twice
    disp = sitk.ReadImage(str(res.paths["displacement"]))
    assert disp.GetDimension() == 3 and disp.GetSize() == (36, 36, 2) and disp.GetNumberOfComponentsPerPixel() == 3
    d = sitk.GetArrayFromImage(disp)
    np.testing.assert_array_equal(d[0], d[1])
    np.testing.assert_allclose(np.moveaxis(d[0], -1, 0), res.displacement.numpy()[:, 0], atol=1e-9)
    normal = OBLIQUE_3D[:, 2]  # the slice normal (ITK axis z) in world space
    assert np.abs(d @ normal).max() < 1e-6 and np.abs(d).max() > 0.1  # in-plane displacement only
    theirs = _sitk_warp(inputs["moving"], inputs["fixed"], res.paths["displacement"])
    mask = _heart_of(seq.labels[seq.ed][None])
    assert _corr(res.warped.numpy(), theirs, mask) > 0.99


# ----------------------------------------------------------------------------------------------------------------
# the geometry chain, exactly
# ----------------------------------------------------------------------------------------------------------------


def test_known_field_end_point_error_in_mm(tmp_path):
    """A phantom pair registered by its true field: world millimetres = direction @ (spacing * voxels), exactly;
    a known error of e voxels gives an end-point error of |spacing * e| mm."""
    from diffreg.metrics import endpoint_error

    seq = make_sax_3d(SIZE_3D, n_frames=2, seed=5)  # the 3D phantom's own voxel size: identity preprocessing
    spacing = np.asarray(seq.spacing)
    assert spacing.max() / spacing.min() > 1.4  # anisotropic
    inputs = _write_pair(tmp_path / "in", seq, seq.spacing, (-12.0, 40.0, -3.5), OBLIQUE_3D, ".nii.gz")
    true = torch.from_numpy(seq.true_ddf(seq.es, seq.ed))[None]  # moving(p + true(p)) = fixed(p), voxels
    expected = np.einsum("ij,j...->i...", OBLIQUE_3D, (true[0].numpy() * spacing[:, None, None, None])[::-1])
    error = torch.tensor([0.3, -0.5, 0.8]).view(1, 3, 1, 1, 1) * torch.linspace(0.5, 1.5, SIZE_3D[2])

    for e in (torch.zeros(1), error):
        run = (KnownField(3, lambda m, f, e=e: true + e), _config(3), "phantom")
        res = register_files(run, inputs["moving"], inputs["fixed"], out=tmp_path / f"reg{int(e.any())}",
                             moving_label=inputs["moving_label"], fixed_label=inputs["fixed_label"])
        g = res.metrics["network_grid"]
        np.testing.assert_allclose(g["scale"], 1.0, atol=1e-12)
        np.testing.assert_allclose(g["offset"], 0.0, atol=1e-12)
        got = np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(str(res.paths["displacement"]))), -1, 0)
        epe_mm = float(np.sqrt(((got - expected) ** 2).sum(0)).mean())
        in_grid = float(endpoint_error(true + e, true, spacing=tuple(spacing))[0])
        assert epe_mm == pytest.approx(in_grid, rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(res.ddf.numpy(), (true + e).numpy(), atol=1e-5)
    assert in_grid > 1.0
    # with the true field (first pass: e = 0) the warped moving image is the fixed image
    res0 = json.loads((tmp_path / "reg0" / "metrics.json").read_text())
    assert res0["dice"]["foreground"] > 0.9 > res0["dice_initial"]["foreground"]
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "reg0" / "warped.nii.gz")))
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs["fixed"])))
    assert _corr(warped, fixed, _heart(inputs["fixed_label"])) > 0.95


@pytest.mark.parametrize("dims", [2, 3])
def test_world_translation_through_resampling_and_crop(tmp_path, dims):
    """moving = fixed moved by t mm in world space (its origin shifted): a network field of t in network voxels
    comes back as exactly t mm everywhere, and the warped moving image is the fixed image."""
    if dims == 2:
        seq = make_sax_2d((50, 37), n_frames=2, seed=1, spacing=(2.6, 3.3))
        direction, origin, t = OBLIQUE_2D, np.array([5.0, -9.0]), np.array([4.2, -3.1])
    else:
        seq = make_sax_3d((10, 40, 36), n_frames=2, seed=1, spacing=(9.0, 3.5, 3.9))
        direction, origin, t = OBLIQUE_3D, np.array([5.0, -9.0, 2.0]), np.array([4.2, -3.1, 6.0])
    arr = (seq.frames[seq.ed] * 1000).astype(np.float32)
    fixed = _write(tmp_path / "in", "fixed.nii.gz", _image(arr, seq.spacing, origin, direction))
    moving = _write(tmp_path / "in", "moving.nii.gz", _image(arr, seq.spacing, origin + t, direction))
    cfg = _config(dims)
    grid = preprocessing_for(cfg, "phantom").plan(arr.shape, seq.spacing)
    assert not np.allclose(grid.scale, 1.0) and tuple(grid.shape) == tuple(cfg.data.size)
    u = (direction.T @ t)[::-1] / np.asarray(grid.spacing)  # world mm -> network voxels (array order)
    field = torch.tensor(u.copy(), dtype=torch.float32).view((1, dims) + (1,) * dims).expand((1, dims) + grid.shape)
    model = KnownField(dims, lambda m, f: field)
    res = register_files((model, cfg), moving, fixed, steps=3, sampler="ddim")
    assert res.out is None and res.paths == {} and not (tmp_path / "in" / "warped.nii.gz").exists()
    assert model.options == {"steps": 3, "sampler": "ddim"} == res.metrics["options"]
    got = res.displacement.numpy().reshape(dims, -1)
    np.testing.assert_allclose(got, np.broadcast_to(t[:, None], got.shape), atol=1e-4)
    np.testing.assert_allclose(res.warped.numpy(), arr, atol=1e-2)
    np.testing.assert_allclose(res.jacobian.numpy(), 1.0, atol=1e-5)
    assert res.metrics["folding_percent"] == 0.0


@pytest.mark.parametrize("dims", [2, 3])
def test_network_grid_is_where_the_plan_says(dims):
    """The preprocessed image equals SimpleITK's resampling of the image onto the network grid the plan states
    (origin = world position of the offset, spacing = image spacing x scale, the image's direction)."""
    if dims == 2:
        seq = make_sax_2d((50, 37), n_frames=2, seed=2, spacing=(2.6, 3.3))
        direction, origin = OBLIQUE_2D, (5.0, -9.0)
    else:
        seq = make_sax_3d((10, 40, 36), n_frames=2, seed=2, spacing=(9.0, 3.5, 3.9))
        direction, origin = OBLIQUE_3D, (5.0, -9.0, 2.0)
    img = _image(seq.frames[seq.ed].astype(np.float32), seq.spacing, origin, direction)
    prep = preprocessing_for(_config(dims), "phantom")
    net, grid = prep.apply(seq.frames[seq.ed], seq.spacing)
    lf = np.asarray(direction) * np.asarray(seq.spacing[::-1])[None]
    ref = sitk.Image(tuple(int(s) for s in grid.shape[::-1]), sitk.sitkFloat32)
    ref.SetSpacing(tuple(grid.spacing[::-1]))
    ref.SetDirection(tuple(np.asarray(direction).ravel()))
    ref.SetOrigin(tuple(np.asarray(origin) + lf @ np.asarray(grid.offset)[::-1]))
    theirs = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1.0))
    inside = theirs >= 0
    assert inside.mean() > 0.5
    assert _corr(net, theirs, inside) > (0.98 if dims == 2 else 0.999)  # 2D shrinks with anti-aliasing


# ----------------------------------------------------------------------------------------------------------------
# many pairs, bad input
# ----------------------------------------------------------------------------------------------------------------


def test_pairs_csv_writes_a_folder_per_pair_and_a_summary(run2d, pair2d, tmp_path, capsys):
    folder = tmp_path / "in"
    seq = make_sax_2d((40, 40), n_frames=2, seed=11)
    other = _write_pair(folder, seq, seq.spacing, (0.0, 0.0), np.eye(2), ".nii.gz")
    vol = _write(folder, "volume.nii.gz", _image(np.random.default_rng(0).random((5, 20, 20)).astype(np.float32),
                                                   (5.0, 2.0, 2.0), (0, 0, 0), np.eye(3)))
    rows = [
        {"moving": str(pair2d["moving"]), "fixed": str(pair2d["fixed"]), "moving_label": str(pair2d["moving_label"]),
         "fixed_label": str(pair2d["fixed_label"]), "name": "mhd"},
        {"moving": "moving.nii.gz", "fixed": "fixed.nii.gz", "moving_label": "", "fixed_label": "", "name": ""},
        {"moving": "fixed.nii.gz", "fixed": "moving.nii.gz", "moving_label": "fixed_label.nii.gz",
         "fixed_label": "moving_label.nii.gz", "name": "reverse"},
        {"moving": "missing.nii.gz", "fixed": "fixed.nii.gz", "moving_label": "", "fixed_label": "", "name": "gone"},
        {"moving": "volume.nii.gz", "fixed": "fixed.nii.gz", "moving_label": "", "fixed_label": "", "name": "vol"},
    ]
    pairs = folder / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    before = _snapshot(folder)
    out = tmp_path / "reg"
    rc = main(["register", "--run", str(run2d), "--pairs", str(pairs), "--out", str(out), "--device", "cpu"])
    assert rc == 1  # some pairs failed
    assert _snapshot(folder) == before and other["moving"].is_file()
    summary = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert [r["name"] for r in summary] == ["mhd", "002_moving", "reverse", "gone", "vol"]
    assert [r["status"] for r in summary] == ["ok", "ok", "ok", "error", "error"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["002_moving", "mhd", "reverse"]
    for name in ("mhd", "002_moving", "reverse"):
        assert (out / name / "displacement.nii.gz").is_file() and (out / name / "metrics.json").is_file()
    assert float(summary[0]["dice"]) > 0 and summary[1]["dice"] == ""
    assert "missing.nii.gz" in summary[3]["error"] and "not found" in summary[3]["error"]
    assert "volume.nii.gz" in summary[4]["error"] and "2D" in summary[4]["error"]


def test_bad_inputs_name_the_file(run2d, pair2d, tmp_path, capsys):
    good_m, good_f = pair2d["moving"], pair2d["fixed"]
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        register_files(run2d, missing, good_f, device="cpu")
    volume = _write(tmp_path, "volume.nii.gz", _image(np.random.default_rng(0).random((4, 16, 16)).astype(np.float32),
                                                      (5.0, 2.0, 2.0), (0, 0, 0), np.eye(3)))
    with pytest.raises(ValueError, match=r"volume\.nii\.gz.*registers 2D images"):
        register_files(run2d, volume, good_f, device="cpu")
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"\x1f\x8b not really a gzip stream" * 10)
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: unreadable NIfTI"):
        register_files(run2d, good_m, garbage, device="cpu")
    header = tmp_path / "lonely.mhd"
    header.write_text("ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_FLOAT\n"
                      "ElementDataFile = lonely.raw\n")
    with pytest.raises(FileNotFoundError, match="lonely.raw"):
        register_files(run2d, header, good_f, device="cpu")
    with pytest.raises(ValueError, match="unknown image format"):
        register_files(run2d, tmp_path / "image.png", good_f, device="cpu")
    # a 2D image for a 3D run
    with pytest.raises(ValueError, match=r"fixed\.mhd.*registers 3D"):
        register_files((KnownField(3, _smooth_field(3, 0.0)), _config(3)), volume, good_f)
    # a 3D volume whose slices lie along ITK x for a run trained on stacks sliced along ITK z
    sideways = _write(tmp_path, "sideways.nii.gz", _image(np.random.default_rng(1).random((16, 16, 6)).astype(
        np.float32), (2.0, 2.0, 9.0), (0, 0, 0), np.eye(3)))
    with pytest.raises(ValueError, match=r"sideways\.nii\.gz: its thickest voxel axis is ITK axis 0"):
        register_files((KnownField(3, _smooth_field(3, 0.0)), _config(3)), sideways, sideways)
    # a label that does not fit its image, an output folder holding an input, no overlap, a DRDM run
    small = _write(tmp_path, "small_label.nii.gz", _image(np.ones((8, 8), np.uint8), (1.0, 1.0), (0, 0), np.eye(2)))
    with pytest.raises(ValueError, match=r"shape mismatch.*moving\.mhd.*small_label\.nii\.gz"):
        register_files(run2d, good_m, good_f, moving_label=small, device="cpu")
    with pytest.raises(ValueError, match="holds the input file"):
        register_files(run2d, good_m, good_f, out=good_m.parent, device="cpu")
    far = sitk.ReadImage(str(good_m))
    far.SetOrigin((5000.0, 5000.0))
    far_path = _write(tmp_path, "far.nii.gz", far)
    with pytest.raises(ValueError, match="do not overlap"):
        register_files(run2d, far_path, good_f, device="cpu")
    drdm = get_config("drdm", "quick", 2)
    with pytest.raises(ValueError, match="DRDM"):
        register_files((KnownField(2, _smooth_field(2, 0.0)), drdm), good_m, good_f)
    # the command: exit status 2 and the file in the message, nothing written
    rc = main(["register", "--run", str(run2d), "--moving", str(missing), "--fixed", str(good_f),
               "--out", str(tmp_path / "reg"), "--device", "cpu"])
    assert rc == 2 and "nope.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "reg").exists()
    rc = main(["register", "--run", str(run2d), "--moving", str(good_m), "--out", str(tmp_path / "reg")])
    assert rc == 2 and "--fixed" in capsys.readouterr().err


def _cut(path: Path, keep: int | None) -> Path:
    """Keep the first ``keep`` bytes of a file (at most half of it; ``None``: half), as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: min(len(data) // 2, len(data) if keep is None else keep)])
    return path


@pytest.mark.parametrize("keep", [400, None])
def test_truncated_nifti_is_refused_by_register_files_and_the_command(run2d, tmp_path, capsys, keep):
    # SimpleITK alone reads a cut .nii.gz as a volume of mostly zeros; the reader refuses it
    seq = make_sax_3d((6, 40, 36), n_frames=2, seed=5, spacing=(9.0, 1.6, 1.6))
    inputs = _write_pair(tmp_path / "in", seq, seq.spacing, (0.0, 0.0, 0.0), np.eye(3), ".nii.gz")
    model3d = (KnownField(3, _smooth_field(3, 0.0)), _config(3))
    _cut(inputs["moving"], keep)
    _cut(inputs["fixed_label"], keep)
    before = _snapshot(tmp_path / "in")
    with pytest.raises(ValueError, match=r"moving\.nii\.gz: unreadable NIfTI"):
        register_files(model3d, inputs["moving"], inputs["fixed"], out=tmp_path / "reg")
    with pytest.raises(ValueError, match=r"fixed_label\.nii\.gz: unreadable NIfTI"):
        register_files(model3d, inputs["fixed"], inputs["fixed"], fixed_label=inputs["fixed_label"])
    # the command: exit status 2, the file and the problem in the message, nothing written
    seq2 = make_sax_2d((40, 36), n_frames=2, seed=6)
    pair = _write_pair(tmp_path / "in2d", seq2, seq2.spacing, (0.0, 0.0), np.eye(2), ".nii.gz")
    _cut(pair["fixed"], keep)
    rc = main(["register", "--run", str(run2d), "--moving", str(pair["moving"]), "--fixed", str(pair["fixed"]),
               "--out", str(tmp_path / "reg2d"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "fixed.nii.gz: unreadable NIfTI" in err, err
    assert not (tmp_path / "reg").exists() and not (tmp_path / "reg2d").exists()
    assert _snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("ext", [".nii.gz", ".mha"])
def test_nan_image_is_refused_by_register_files_and_the_command(run2d, tmp_path, capsys, ext):
    # SimpleITK's NIfTI reader turns NaN into 0; the reader reads the voxels with nibabel and refuses them
    seq = make_sax_2d((40, 36), n_frames=2, seed=7)
    pair = _write_pair(tmp_path / "in", seq, seq.spacing, (0.0, 0.0), np.eye(2), ext)
    arr = (seq.frames[seq.es] * 800).astype(np.float32)
    arr[10, 11] = np.nan
    nan = _write(tmp_path / "in", f"nan{ext}", _image(arr, seq.spacing, (0.0, 0.0), np.eye(2)))
    before = _snapshot(tmp_path / "in")
    with pytest.raises(ValueError, match=rf"nan{re.escape(ext)}: image has 1 NaN and 0 Inf voxels"):
        register_files(run2d, nan, pair["fixed"], device="cpu")
    rc = main(["register", "--run", str(run2d), "--moving", str(nan), "--fixed", str(pair["fixed"]),
               "--out", str(tmp_path / "reg"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"nan{ext}: image has 1 NaN" in err, err
    assert not (tmp_path / "reg").exists()
    assert _snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("change, what", [("origin", "origin"), ("spacing", "spacing"), ("direction", "direction"),
                                          ("size", "shape mismatch")])
def test_label_off_its_image_grid_is_refused(tmp_path, change, what):
    seq = make_sax_3d((6, 40, 36), n_frames=2, seed=8, spacing=(9.0, 1.6, 1.6))
    inputs = _write_pair(tmp_path / "in", seq, seq.spacing, (-5.0, 3.0, 1.0), OBLIQUE_3D, ".nii.gz")
    lab = seq.labels[seq.ed].astype(np.uint8)
    spacing, origin, direction = seq.spacing, (-5.0, 3.0, 1.0), OBLIQUE_3D
    if change == "origin":
        origin = (-5.0, 7.0, 1.0)
    elif change == "spacing":
        spacing = (9.0, 1.6, 2.0)
    elif change == "direction":
        direction = np.eye(3)
    else:
        lab = lab[:, :-3]
    bad = _write(tmp_path / "in", "off_grid_label.nii.gz", _image(lab, spacing, origin, direction))
    model3d = (KnownField(3, _smooth_field(3, 0.0)), _config(3))
    before = _snapshot(tmp_path / "in")
    match = (r"shape mismatch between image .*fixed\.nii\.gz .* and label .*off_grid_label\.nii\.gz"
             if what == "shape mismatch" else
             rf"label .*off_grid_label\.nii\.gz does not lie on the grid of its image .*fixed\.nii\.gz: {what}")
    with pytest.raises(ValueError, match=match):
        register_files(model3d, inputs["moving"], inputs["fixed"], fixed_label=bad, out=tmp_path / "reg")
    assert not (tmp_path / "reg").exists() and _snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("layout", ["acdc", "camus"])
def test_dataset_and_register_files_preprocess_a_file_identically(tmp_path, layout):
    """A training item of the dataset and the same two files through register_files' preprocessing are equal."""
    from diffreg.data import ACDCPairs, CAMUSPairs, write_acdc, write_camus

    seen = {}

    def record(moving, fixed):
        seen.update(moving=moving.clone(), fixed=fixed.clone())
        return torch.zeros((1, moving.ndim - 2, *moving.shape[2:]))

    if layout == "acdc":
        root = write_acdc(tmp_path / "acdc", n_patients=1, size=(6, 44, 40), n_frames=4)
        cfg = _config(3)
        data = ACDCPairs(root, dims=3, split="all", profile="quick", size=cfg.data.size,
                         intensity=tuple(cfg.data.intensity))
        folder, stem = root / "patient001", "patient001_frame"
        ed, es = sorted(p for p in folder.glob(f"{stem}??.nii.gz"))
        moving, fixed, spec = es, ed, "acdc:" + str(root)  # ACDC: ES -> ED
    else:
        root = write_camus(tmp_path / "camus", n_patients=1, size=(48, 40), n_frames=4, half_sequence=False)
        cfg = get_config("ldm-morph", "quick", 2)
        cfg.data.size = SIZE_2D
        data = CAMUSPairs(root, split="all", size=SIZE_2D, intensity=tuple(cfg.data.intensity))
        folder = root / "patient0001"
        moving, fixed, spec = folder / "patient0001_2CH_ED.nii.gz", folder / "patient0001_2CH_ES.nii.gz", "camus:x"
    before = _snapshot(root)
    item = data[0]
    res = register_files((KnownField(cfg.data.dims, record), cfg, spec), moving, fixed)
    assert torch.equal(seen["moving"][0], item["moving"]) and torch.equal(seen["fixed"][0], item["fixed"])
    assert res.metrics["network_grid"]["spacing_mm"] == pytest.approx(item["spacing"].tolist(), rel=1e-6)
    assert _snapshot(root) == before


def test_register_files_is_exported_lazily():
    import subprocess
    import sys

    import diffreg
    import diffreg.apply

    assert diffreg.register_files is diffreg.apply.register_files
    code = "import sys, diffreg; print('SimpleITK' in sys.modules or 'diffreg.apply' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_open_run_reads_the_training_data(run2d):
    run = open_run(run2d, device="cpu")
    assert run.data == "phantom" and run.config.method == "voxelmorph"
    assert preprocessing_for(run.config, run.data).mode == "square"
    cfg3 = get_config("voxelmorph", "paper", 3)
    prep = preprocessing_for(cfg3, "acdc:/data/ACDC/training")
    assert prep.mode == "resample" and prep.spacing == pytest.approx((3.15, 1.5, 1.5))
    assert preprocessing_for(get_config("ldm-morph", "quick", 2), "camus:/x").mode == "resize"
