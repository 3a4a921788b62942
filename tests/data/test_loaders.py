"""ACDC (NIfTI, HDF5) and CAMUS (NIfTI, MetaImage) loaders on phantom patients written to a temporary folder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffreg.data import (
    ACDCPairs,
    CAMUSPairs,
    PhantomPairs,
    open_dataset,
    split_indices,
    write_acdc,
    write_acdc_h5,
    write_camus,
)
from diffreg.data.acdc import find_acdc, load_acdc_frame
from diffreg.data.io import load_image, load_mhd, read_cfg
from diffreg.data.pairs import pad_or_crop

ACDC_SIZE = (8, 40, 48)  # D, H, W all different: catches axis-order mistakes


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size, mtime and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("phantom-data")
    return {
        "acdc": write_acdc(base / "acdc", n_patients=5, size=ACDC_SIZE, n_frames=3),
        "acdc-h5": write_acdc_h5(base / "acdc-h5", n_patients=5, size=ACDC_SIZE, n_frames=3),
        "camus": write_camus(base / "camus", n_patients=3, size=(64, 80), n_frames=3),
    }


def test_written_layouts(roots):
    p1 = roots["acdc"] / "patient001"
    cfg = read_cfg(p1 / "Info.cfg", required=("ED", "ES", "Group", "Height", "NbFrame", "Weight"))
    assert cfg["ED"] == 1 and cfg["NbFrame"] == 3
    es = cfg["ES"]
    names = {p.name for p in p1.iterdir()}
    assert {f"patient001_frame01.nii.gz", f"patient001_frame01_gt.nii.gz", f"patient001_frame{es:02d}.nii.gz",
            f"patient001_frame{es:02d}_gt.nii.gz", "patient001_4d.nii.gz", "Info.cfg"} <= names
    img = nib.load(str(p1 / "patient001_frame01.nii.gz"))
    assert img.shape == ACDC_SIZE[::-1]  # NIfTI (X, Y, Z)
    zooms = img.header.get_zooms()
    assert zooms[2] >= 8.0 and 1.3 < zooms[0] < 1.8 and np.allclose(np.diag(img.affine)[:3], zooms)
    assert np.asarray(img.dataobj).max() > 100  # MR-like intensities, not [0, 1]
    assert nib.load(str(p1 / "patient001_4d.nii.gz")).shape == (*ACDC_SIZE[::-1], 3)
    h5_names = sorted(p.name for p in roots["acdc-h5"].iterdir())
    assert h5_names[:2] == ["patient001_frame01.h5", f"patient001_frame{es:02d}.h5"]
    c1 = roots["camus"] / "patient0001"
    for view in ("2CH", "4CH"):
        for s in ("ED", "ES", "ED_gt", "ES_gt", "half_sequence"):
            assert (c1 / f"patient0001_{view}_{s}.nii.gz").is_file()
        assert set(read_cfg(c1 / f"Info_{view}.cfg")) >= {"ED", "ES", "NbFrame", "Sex", "Age", "ImageQuality", "EF",
                                                          "FrameRate"}
    assert nib.load(str(c1 / "patient0001_2CH_ED.nii.gz")).shape == (80, 64)  # (X, Y)


def test_acdc_nifti_3d_paper(roots):
    ds = ACDCPairs(roots["acdc"], layout="nifti", dims=3, split="all", profile="paper")
    assert len(ds) == 5 and ds.cases[0] == "patient001" and ds.direction == "es->ed"
    item = ds[0]
    assert item["moving"].shape == (1, 32, 128, 128) and item["fixed_label"].shape == (1, 32, 128, 128)
    assert item["moving"].dtype == torch.float32 and item["moving_label"].dtype == torch.int64
    assert np.allclose(item["spacing"].numpy(), (3.15, 1.5, 1.5), atol=0.1)
    assert float(item["moving"].min()) == pytest.approx(-1.0) and float(item["moving"].max()) <= 1.0
    assert set(torch.unique(item["fixed_label"]).tolist()) == {0, 1, 2, 3}
    assert (item["moving_label"] == 3).sum() < (item["fixed_label"] == 3).sum()  # moving = ES
    # physical volumes survive the resampling (spacing handled, axes not mixed up)
    patient = find_acdc(roots["acdc"], "nifti")[0]
    _, lab, sp = load_acdc_frame(patient, "ed")
    assert lab.shape == ACDC_SIZE
    for value in (1, 2, 3):
        before = (lab == value).sum() * np.prod(sp)
        after = (item["fixed_label"] == value).sum().item() * np.prod(item["spacing"].numpy())
        assert after == pytest.approx(before, rel=0.1)


def test_acdc_3d_quick_and_direction(roots):
    ds = ACDCPairs(roots["acdc"], dims=3, split="all", profile="quick", direction="ed->es", patients=["patient002"])
    assert len(ds) == 1 and ds[0]["moving"].shape == (1, 16, 64, 64)
    assert np.allclose(ds[0]["spacing"].numpy(), (6.3, 3.0, 3.0), atol=0.2)
    assert (ds[0]["moving_label"] == 3).sum() > (ds[0]["fixed_label"] == 3).sum()  # moving = ED


def test_acdc_nifti_2d_slices(roots):
    ds = ACDCPairs(roots["acdc"], dims=2, split="all")
    expected = 0
    for patient in find_acdc(roots["acdc"]):
        ed, es = load_acdc_frame(patient, "ed")[1], load_acdc_frame(patient, "es")[1]
        expected += int(((ed > 0).any((1, 2)) & (es > 0).any((1, 2))).sum())
    assert len(ds) == expected > 5
    assert all(re.fullmatch(r"patient00\d_z\d\d", c) for c in ds.cases)
    item = ds[0]
    assert item["moving"].shape == (1, 64, 64) and item["spacing"].shape == (2,)
    assert (item["fixed_label"] > 0).any() and (item["moving_label"] > 0).any()
    full = ACDCPairs(roots["acdc"], dims=2, split="all", slice_filter="all")
    assert len(full) == 5 * ACDC_SIZE[0]
    ldm = ACDCPairs(roots["acdc"], dims=2, split="all", profile="ldm")
    x = ldm[0]["moving"]
    assert x.shape == (1, 128, 128) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x[0, :8].abs().max()) == 0.0  # 112 -> 128 zero padding


def test_acdc_h5(roots):
    ds = ACDCPairs(roots["acdc-h5"], layout="h5", dims=2, split="all")
    assert len(ds) > 5 and ds[0]["moving"].shape == (1, 64, 64)
    patients = find_acdc(roots["acdc-h5"], "h5")
    assert all(p.ed == 1 and p.es > 1 for p in patients)
    d3 = ACDCPairs(roots["acdc-h5"], layout="h5", dims=3, split="all", profile="paper")
    item = d3[1]
    assert item["moving"].shape == (1, 32, 128, 128)
    assert np.allclose(item["spacing"].numpy(), (3.15, 1.5, 1.5), atol=0.1)  # from the assumed 10 x 1.5 x 1.5 mm
    assert (item["moving_label"] == 3).sum() < (item["fixed_label"] == 3).sum()
    d3b = ACDCPairs(roots["acdc-h5"], layout="h5", dims=3, split="all", h5_spacing=(5.0, 1.5, 1.5))
    assert d3b[0]["fixed_label"].count_nonzero() < item["fixed_label"].count_nonzero() * 1.5


def test_camus_nifti(roots):
    for view, n in (("2CH", 3), ("4CH", 3), ("both", 6)):
        ds = CAMUSPairs(roots["camus"], view=view, split="all", size=64)
        assert len(ds) == n and ds.labels == "camus" and ds.direction == "ed->es"
        item = ds[0]
        assert item["moving"].shape == (1, 64, 64) and float(item["moving"].min()) >= 0.0
        assert set(torch.unique(item["moving_label"]).tolist()) == {0, 1, 2, 3}
        assert (item["moving_label"] == 1).sum() > (item["fixed_label"] == 1).sum()  # moving = ED
    assert CAMUSPairs(roots["camus"], view="2CH", split="all").cases == [f"patient000{i}_2CH" for i in (1, 2, 3)]
    # image orientation: the (64, 80) image keeps its axes; the label map is not transposed against the image
    img, sp = load_image(roots["camus"] / "patient0001" / "patient0001_2CH_ED.nii.gz")
    lab, _ = load_image(roots["camus"] / "patient0001" / "patient0001_2CH_ED_gt.nii.gz")
    assert img.shape == lab.shape == (64, 80)
    assert img[lab == 1].mean() < img[lab == 2].mean()  # dark cavity, bright myocardium


def test_camus_mhd_copy(roots, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    src = roots["camus"]
    for d in src.iterdir():
        (tmp_path / d.name).mkdir()
        for f in d.glob("*_E[DS]*.nii.gz"):
            arr, spacing = load_image(f)
            im = sitk.GetImageFromArray(arr.astype(np.uint8))
            im.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            sitk.WriteImage(im, str(tmp_path / d.name / f.name.replace(".nii.gz", ".mhd")),
                            useCompression=f.name.endswith("ES.nii.gz"))
    assert (tmp_path / "patient0001" / "patient0001_2CH_ED.raw").is_file()
    a = CAMUSPairs(src, view="both", split="all", size=64)
    b = CAMUSPairs(tmp_path, view="both", split="all", size=64)
    assert a.cases == b.cases
    for i in range(len(a)):
        for k in ("moving", "fixed", "moving_label", "fixed_label", "spacing"):
            assert torch.allclose(a[i][k].float(), b[i][k].float(), atol=1e-5), k
    # the built-in MetaImage reader (no SimpleITK) agrees, raw and zlib-compressed
    for name in ("patient0002_4CH_ED.mhd", "patient0002_4CH_ES.mhd"):
        x, sx, _ = load_mhd(tmp_path / "patient0002" / name, backend="sitk")
        y, sy, _ = load_mhd(tmp_path / "patient0002" / name, backend="builtin")
        assert np.array_equal(x, y) and np.allclose(sx, sy)


def test_splits_disjoint_and_deterministic(roots):
    for n in (1, 2, 3, 4, 10, 20, 32, 100):
        parts = [split_indices(n, s) for s in ("train", "val", "test")]
        assert sorted(sum(parts, [])) == list(range(n))
        assert parts == [split_indices(n, s) for s in ("train", "val", "test")]
        if n >= 3:
            assert all(parts)
    assert len(split_indices(100, "test")) == 20 and len(split_indices(100, "val")) == 10
    # ACDC's blocks of 20 patients per pathology: 4 test patients in every block
    test = split_indices(100, "test")
    assert [sum(20 * g <= i < 20 * (g + 1) for i in test) for g in range(5)] == [4] * 5
    cases = {s: set(PhantomPairs("sax", n_subjects=10, split=s).cases) for s in ("train", "val", "test")}
    assert not (cases["train"] & cases["test"]) and not (cases["train"] & cases["val"])
    assert len(set().union(*cases.values())) == 10
    again = PhantomPairs("sax", n_subjects=10, split="test")
    assert again.cases == sorted(cases["test"])
    assert torch.equal(again[0]["moving"], PhantomPairs("sax", n_subjects=10, split="test")[0]["moving"])
    pids = {s: {p.pid for p in ACDCPairs(roots["acdc"], dims=3, split=s).patients} for s in ("train", "val", "test")}
    assert not (pids["train"] & pids["test"]) and not (pids["val"] & pids["test"])
    assert len(set().union(*pids.values())) == 5


def test_dataloader_collate(roots):
    for ds in (PhantomPairs("sax", n_subjects=4, split="all"), ACDCPairs(roots["acdc"], dims=2, split="all"),
               CAMUSPairs(roots["camus"], view="both", split="all", size=32)):
        batch = next(iter(DataLoader(ds, batch_size=2)))
        assert batch["moving"].shape[:2] == (2, 1) and batch["spacing"].shape == (2, ds.dims)
        assert isinstance(batch["case"], list)


def test_open_dataset(roots):
    ds = open_dataset("phantom", split="test", n_subjects=10)
    assert isinstance(ds, PhantomPairs) and ds.kind == "sax" and ds[0]["moving"].shape == (1, 64, 64)
    assert open_dataset("phantom:echo", split="test", n_subjects=5).labels == "camus"
    with pytest.raises(ValueError, match="dims=3"):
        open_dataset("phantom:echo", dims=3)
    d3 = open_dataset("phantom", dims=3, split="test", n_subjects=5, size=(8, 32, 32))
    assert d3.kind == "sax3d" and d3[0]["moving"].shape == (1, 8, 32, 32)
    a = open_dataset(f"acdc:{roots['acdc']}", split="all", dims=2)
    assert isinstance(a, ACDCPairs) and a[0]["moving"].shape == (1, 64, 64)
    p = open_dataset(f"acdc:{roots['acdc']}", split="all", dims=3, profile="paper", patients=["patient001"])
    assert p[0]["moving"].shape == (1, 32, 128, 128)
    h = open_dataset(f"acdc-h5:{roots['acdc-h5']}", split="all", dims=2, size=(32, 32))
    assert h.layout == "h5" and h[0]["moving"].shape == (1, 32, 32)
    c = open_dataset(f"camus:{roots['camus']}", split="all")
    assert isinstance(c, CAMUSPairs) and c[0]["moving"].shape == (1, 64, 64)


def test_data_folder_not_modified(roots):
    before = {k: tree_state(r) for k, r in roots.items()}
    for dims in (2, 3):
        for ds in (ACDCPairs(roots["acdc"], dims=dims, split="all"),
                   ACDCPairs(roots["acdc-h5"], layout="h5", dims=dims, split="all")):
            [ds[i] for i in range(len(ds))]
    CAMUSPairs(roots["camus"], view="both", split="all")
    assert {k: tree_state(r) for k, r in roots.items()} == before


def test_pad_or_crop_matches_monai_semantics():
    x = np.arange(7 * 6).reshape(7, 6).astype(np.float32)
    y = pad_or_crop(x, (4, 9))
    assert y.shape == (4, 9)
    assert np.array_equal(y[:, 1:7], x[7 // 2 - 4 // 2: 7 // 2 - 4 // 2 + 4])  # crop from n // 2 - s // 2, pad (1, 2)
    assert not y[:, 0].any() and not y[:, 7:].any()
