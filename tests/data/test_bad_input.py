"""Bad input gives a clear error that names the file and what is wrong (diffreg.data.io and the loaders)."""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from diffreg.data import ACDCPairs, CAMUSPairs, PhantomPairs, open_dataset, write_acdc, write_acdc_h5, write_camus
from diffreg.data.io import check_label, load_h5, load_mhd, load_nifti, read_cfg, read_image_file

SIZE = (4, 24, 28)


@pytest.fixture
def acdc(tmp_path) -> Path:
    return write_acdc(tmp_path / "acdc", n_patients=1, size=SIZE, n_frames=2)


@pytest.fixture
def acdc_h5(tmp_path) -> Path:
    return write_acdc_h5(tmp_path / "h5", n_patients=2, size=SIZE, n_frames=2)


@pytest.fixture
def camus(tmp_path) -> Path:
    return write_camus(tmp_path / "camus", n_patients=1, size=(32, 32), n_frames=2, half_sequence=False)


P = "patient001"


def _replace_nifti(path: Path, array: np.ndarray) -> None:
    ref = nib.load(str(path))
    nib.save(nib.Nifti1Image(array, ref.affine), str(path))


def _load_all(root: Path, **kwargs) -> None:
    ds = ACDCPairs(root, split="all", **kwargs)
    [ds[i] for i in range(len(ds))]


def test_missing_es_frame(acdc):
    es = acdc / P / f"{P}_frame02.nii.gz"
    es.unlink()
    with pytest.raises(FileNotFoundError, match=r"ES frame 2 image.*patient001_frame02\.nii\.gz"):
        ACDCPairs(acdc, dims=2, split="all")


def test_missing_es_mask(acdc):
    (acdc / P / f"{P}_frame02_gt.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient001_frame02_gt\.nii\.gz"):
        ACDCPairs(acdc, dims=3, split="all")


def test_missing_h5_es_frame(acdc_h5):
    (acdc_h5 / "patient002_frame02.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient002.*patient002_frame01\.h5.*missing"):
        ACDCPairs(acdc_h5, layout="h5", dims=2, split="all")


def test_missing_info_cfg_key(acdc):
    cfg = acdc / P / "Info.cfg"
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("ES")))
    with pytest.raises(ValueError, match=r"Info\.cfg: missing key\(s\) ES"):
        ACDCPairs(acdc, dims=2, split="all")


def test_missing_info_cfg(acdc):
    (acdc / P / "Info.cfg").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient001/Info\.cfg"):
        ACDCPairs(acdc, dims=2, split="all")


def test_bad_cfg_values(acdc, tmp_path):
    cfg = acdc / P / "Info.cfg"
    cfg.write_text(cfg.read_text().replace("ES: 2", "ES: two"))
    with pytest.raises(ValueError, match=r"Info\.cfg: ES must be a frame number"):
        ACDCPairs(acdc, dims=2, split="all")
    bad = tmp_path / "bad.cfg"
    bad.write_text("ED: 1\nthis line has no colon\n")
    with pytest.raises(ValueError, match=r"bad\.cfg, line 2"):
        read_cfg(bad)


def test_image_mask_shape_mismatch(acdc):
    gt = acdc / P / f"{P}_frame01_gt.nii.gz"
    lab = np.asarray(nib.load(str(gt)).dataobj)
    _replace_nifti(gt, lab[:, :-2, :])
    match = r"shape mismatch.*patient001_frame01\.nii\.gz.*patient001_frame01_gt\.nii\.gz"
    with pytest.raises(ValueError, match=match):
        _load_all(acdc, dims=2)


def test_ed_es_shape_mismatch(acdc):
    for suffix in ("", "_gt"):
        f = acdc / P / f"{P}_frame02{suffix}.nii.gz"
        _replace_nifti(f, np.asarray(nib.load(str(f)).dataobj)[:-1])
    with pytest.raises(ValueError, match=r"patient001: ED .* and ES .* differ in shape"):
        _load_all(acdc, dims=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_voxels(acdc, bad):
    f = acdc / P / f"{P}_frame02.nii.gz"
    arr = np.asarray(nib.load(str(f)).dataobj).astype(np.float32)
    arr[3, 4, 1] = bad
    _replace_nifti(f, arr)
    with pytest.raises(ValueError, match=r"patient001_frame02\.nii\.gz: image has [01] NaN and [01] Inf voxels"):
        _load_all(acdc, dims=3)


def test_nan_in_h5(acdc_h5):
    f = acdc_h5 / "patient001_frame01.h5"
    with h5py.File(f, "r+") as h:
        img = h["image"][()]
        img[0, 0, 0] = np.nan
        h["image"][...] = img
    with pytest.raises(ValueError, match=r"patient001_frame01\.h5: image has 1 NaN"):
        ACDCPairs(acdc_h5, layout="h5", dims=2, split="all")


def test_labels_outside_set(acdc):
    gt = acdc / P / f"{P}_frame01_gt.nii.gz"
    lab = np.asarray(nib.load(str(gt)).dataobj).copy()
    lab[0, 0, 0] = 5
    _replace_nifti(gt, lab)
    with pytest.raises(ValueError, match=r"patient001_frame01_gt\.nii\.gz: labels outside the expected set .*: 5"):
        _load_all(acdc, dims=2)


def test_non_integer_labels(tmp_path):
    lab = np.zeros((4, 4), np.float32)
    lab[1, 1] = 1.5
    with pytest.raises(ValueError, match=r"mask\.nii\.gz: label map has 1 non-integer"):
        check_label(lab, tmp_path / "mask.nii.gz")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_nifti(acdc, damage):
    f = acdc / P / f"{P}_frame01.nii.gz"
    data = f.read_bytes()
    if damage == "garbage":
        f.write_bytes(b"this is not a NIfTI file" * 20)
    else:
        f.write_bytes(gzip.compress(gzip.decompress(data)[:400]))
    with pytest.raises(ValueError, match=r"patient001_frame01\.nii\.gz: unreadable NIfTI"):
        _load_all(acdc, dims=2)
    with pytest.raises(ValueError, match=r"patient001_frame01\.nii\.gz"):
        load_nifti(f)


def test_corrupt_h5(acdc_h5):
    f = acdc_h5 / "patient002_frame01.h5"
    f.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00garbage" * 50)
    with pytest.raises(ValueError, match=r"patient002_frame01\.h5: unreadable HDF5"):
        ACDCPairs(acdc_h5, layout="h5", dims=2, split="all")


def test_h5_missing_dataset(tmp_path):
    f = tmp_path / "patient001_frame01.h5"
    with h5py.File(f, "w") as h:
        h["image"] = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"patient001_frame01\.h5: missing dataset\(s\) label \(present: image\)"):
        load_h5(f)


def test_unknown_spec_scheme():
    match = r"unknown dataset scheme 'mnist'.*phantom.*acdc:PATH.*acdc-h5:PATH.*camus:PATH"
    with pytest.raises(ValueError, match=match):
        open_dataset("mnist:/tmp")
    with pytest.raises(ValueError, match=r"unknown phantom kind 'brain'"):
        open_dataset("phantom:brain")
    with pytest.raises(ValueError, match=r"missing path"):
        open_dataset("acdc:")


def test_non_existent_root(tmp_path):
    missing = tmp_path / "nowhere"
    for spec in (f"acdc:{missing}", f"acdc-h5:{missing}", f"camus:{missing}"):
        with pytest.raises(FileNotFoundError, match=r"nowhere"):
            open_dataset(spec)
    with pytest.raises(FileNotFoundError, match=r"ACDC root folder not found: .*nowhere"):
        ACDCPairs(missing)
    with pytest.raises(FileNotFoundError, match=r"CAMUS root folder not found: .*nowhere"):
        CAMUSPairs(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no ACDC patient folders"):
        ACDCPairs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no ACDC HDF5 files"):
        ACDCPairs(tmp_path / "empty", layout="h5")


def test_camus_missing_mask_and_bad_labels(camus):
    d = camus / "patient0001"
    (d / "patient0001_4CH_ES_gt.nii.gz").unlink()
    CAMUSPairs(camus, view="2CH", split="all")  # the 2CH view is complete
    with pytest.raises(FileNotFoundError, match=r"CAMUS 4CH ES mask not found: .*patient0001_4CH_ES_gt\.nii\.gz"):
        CAMUSPairs(camus, view="4CH", split="all")
    gt = d / "patient0001_2CH_ED_gt.nii.gz"
    lab = np.asarray(nib.load(str(gt)).dataobj).copy()
    lab[0, 0] = 7
    _replace_nifti(gt, lab)
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED_gt\.nii\.gz: labels outside"):
        CAMUSPairs(camus, view="2CH", split="all")


def test_mhd_missing_raw(tmp_path):
    (tmp_path / "a.mhd").write_text("ObjectType = Image\nNDims = 2\nDimSize = 4 3\nElementType = MET_UCHAR\n"
                                    "ElementDataFile = a.raw\n")
    for backend in ("builtin", None):
        with pytest.raises(FileNotFoundError, match=r"MetaImage data file not found: .*a\.raw"):
            load_mhd(tmp_path / "a.mhd", backend=backend)
    (tmp_path / "a.raw").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"a\.raw: expected 12 bytes"):
        load_mhd(tmp_path / "a.mhd", backend="builtin")


def test_bad_arguments(acdc):
    with pytest.raises(ValueError, match=r"unknown split 'training'"):
        PhantomPairs(split="training")
    with pytest.raises(ValueError, match=r"unknown direction 'es-ed'"):
        PhantomPairs(direction="es-ed")
    with pytest.raises(ValueError, match=r"unknown layout 'png'"):
        ACDCPairs(acdc, layout="png")
    with pytest.raises(FileNotFoundError, match=r"patient\(s\) patient999 not found"):
        ACDCPairs(acdc, patients=["patient999"])


def test_writers_never_overwrite(acdc):
    with pytest.raises(FileExistsError, match=r"never overwrite"):
        write_acdc(acdc, n_patients=1, size=SIZE, n_frames=2)


@pytest.mark.parametrize("value", [0.0, 17.0])
def test_constant_image_is_refused(acdc, camus, acdc_h5, value):
    f = acdc / P / f"{P}_frame02.nii.gz"
    arr = np.asarray(nib.load(str(f)).dataobj)
    _replace_nifti(f, np.full(arr.shape, value, dtype=np.float32))
    with pytest.raises(ValueError, match=rf"patient001_frame02\.nii\.gz: image is constant .* {value:g}"):
        _load_all(acdc, dims=3)
    with pytest.raises(ValueError, match=r"patient001_frame02\.nii\.gz: image is constant"):
        ACDCPairs(acdc, dims=2, split="all")  # 2D slices: refused at construction too
    img = camus / "patient0001" / "patient0001_2CH_ES.nii.gz"
    _replace_nifti(img, np.zeros(nib.load(str(img)).shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"patient0001_2CH_ES\.nii\.gz: image is constant"):
        CAMUSPairs(camus, view="2CH", split="all")
    with h5py.File(acdc_h5 / "patient002_frame01.h5", "r+") as h:
        h["image"][...] = value
    with pytest.raises(ValueError, match=r"patient002_frame01\.h5: image is constant"):
        ACDCPairs(acdc_h5, layout="h5", dims=2, split="all")


def test_writers_refuse_a_file_as_root(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file is an existing file"):
        write_acdc(tmp_path / "file", n_patients=1, size=SIZE, n_frames=2)


# ----------------------------------------------------------------------------------------------------------------
# one checked reader (diffreg.data.io.read_image_file): truncated files, NaN voxels, masks off their image's grid
# ----------------------------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path, keep: int | None = None) -> None:
    """Keep the first ``keep`` bytes of a file (at most half of it; default: half), as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: min(len(data) // 2, len(data) if keep is None else keep)])


@pytest.mark.parametrize("keep", [400, None])
def test_truncated_gzip_nifti_is_refused(tmp_path, acdc, camus, keep):
    # a small real volume written with nibabel, then cut: its gzip stream ends early
    f = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 800, (28, 24, 4)).astype(np.int16), np.eye(4)),
             str(f))
    _truncate(f, keep)
    with pytest.raises(ValueError, match=r"volume\.nii\.gz: unreadable NIfTI"):
        read_image_file(f)
    # the same damage in a dataset, for an image and for a mask; the data folders are never written
    _truncate(acdc / P / f"{P}_frame01.nii.gz", keep)
    _truncate(camus / "patient0001" / "patient0001_2CH_ES_gt.nii.gz", keep)
    before = {**_tree(acdc), **_tree(camus)}
    with pytest.raises(ValueError, match=r"patient001_frame01\.nii\.gz: unreadable NIfTI"):
        _load_all(acdc, dims=3)
    with pytest.raises(ValueError, match=r"patient001_frame01\.nii\.gz: unreadable NIfTI"):
        ACDCPairs(acdc, dims=2, split="all")
    with pytest.raises(ValueError, match=r"patient0001_2CH_ES_gt\.nii\.gz: unreadable NIfTI"):
        CAMUSPairs(camus, view="2CH", split="all")
    assert {**_tree(acdc), **_tree(camus)} == before


def test_nan_image_is_refused_in_every_layout(acdc, camus):
    f = camus / "patient0001" / "patient0001_2CH_ED.nii.gz"
    arr = np.asarray(nib.load(str(f)).dataobj).astype(np.float32)
    arr[5, 7] = np.nan
    _replace_nifti(f, arr)
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED\.nii\.gz: image has 1 NaN and 0 Inf voxels"):
        CAMUSPairs(camus, view="2CH", split="all")
    with pytest.raises(ValueError, match=r"patient0001_2CH_ED\.nii\.gz: image has 1 NaN"):
        read_image_file(f)
    img = acdc / P / f"{P}_frame01.nii.gz"
    arr = np.asarray(nib.load(str(img)).dataobj).astype(np.float32)
    arr[0, 0, 0] = np.nan
    _replace_nifti(img, arr)
    with pytest.raises(ValueError, match=r"patient001_frame01\.nii\.gz: image has 1 NaN"):
        ACDCPairs(acdc, dims=2, split="all")


def _moved_affine(path: Path, shift=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> None:
    """Rewrite a NIfTI file with the same voxels, its origin shifted by ``shift`` mm and its voxel size scaled."""
    ref = nib.load(str(path))
    affine = ref.affine.copy()
    affine[:3, :3] = affine[:3, :3] * np.asarray(scale)[None]
    affine[:3, 3] += np.asarray(shift)
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), affine), str(path))


@pytest.mark.parametrize("change, what", [(dict(shift=(0.0, 4.0, 0.0)), "origin"),
                                          (dict(scale=(1.0, 1.0, 1.3)), "spacing")])
def test_mask_off_its_image_grid_is_refused(acdc, camus, change, what):
    _moved_affine(acdc / P / f"{P}_frame02_gt.nii.gz", **change)
    match = rf"label .*patient001_frame02_gt\.nii\.gz does not lie on the grid of its image .*patient001_frame02" \
            rf"\.nii\.gz: {what}"
    with pytest.raises(ValueError, match=match):
        _load_all(acdc, dims=3)
    with pytest.raises(ValueError, match=match):
        ACDCPairs(acdc, dims=2, split="all")
    _moved_affine(camus / "patient0001" / "patient0001_2CH_ED_gt.nii.gz",
                  shift=change.get("shift", (0.0, 0.0, 0.0))[::-1], scale=change.get("scale", (1.0, 1.0, 1.0))[::-1])
    with pytest.raises(ValueError, match=rf"patient0001_2CH_ED_gt\.nii\.gz does not lie on the grid .*: {what}"):
        CAMUSPairs(camus, view="2CH", split="all")


def test_rotated_mask_is_refused(acdc):
    gt = acdc / P / f"{P}_frame01_gt.nii.gz"
    ref = nib.load(str(gt))
    c, s = np.cos(0.2), np.sin(0.2)
    affine = ref.affine.copy()
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), affine), str(gt))
    with pytest.raises(ValueError, match=r"patient001_frame01_gt\.nii\.gz does not lie on the grid .*: direction"):
        _load_all(acdc, dims=3)


def test_reader_geometry_agrees_with_simpleitk(tmp_path, acdc):
    sitk = pytest.importorskip("SimpleITK")
    from diffreg.data.io import _read_mhd_builtin

    img = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 12, 10)).astype(np.float32))
    img.SetSpacing((1.2, 1.7, 9.0))
    img.SetOrigin((-50.0, 30.0, 12.0))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    files = [acdc / P / f"{P}_frame01.nii.gz"]
    for name in ("oblique.nii.gz", "oblique.mhd"):
        sitk.WriteImage(img, str(tmp_path / name))
        files.append(tmp_path / name)
    for f in files:
        a, b = read_image_file(f), read_image_file(f, itk=True)
        assert a.shape == b.shape and np.array_equal(a.array, b.array)
        assert np.allclose(a.spacing, b.spacing) and np.allclose(a.origin, b.origin, atol=1e-4)
        assert np.allclose(a.direction, b.direction, atol=1e-5)
    arr, spacing, origin, direction = _read_mhd_builtin(tmp_path / "oblique.mhd")  # without SimpleITK
    b = read_image_file(tmp_path / "oblique.mhd", itk=True)
    assert np.array_equal(arr, b.array) and np.allclose(spacing, b.spacing)
    assert np.allclose(origin, b.origin) and np.allclose(direction, b.direction)
