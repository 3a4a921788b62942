"""diffreg.synthesize: DRDM-deformed copies of a dataset, in the layout it was read from (chapter 09)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from diffreg.data import open_dataset, write_acdc, write_camus
from diffreg.data.acdc import find_acdc
from diffreg.data.camus import find_camus
from diffreg.models import DRDM, VoxelMorph
from diffreg.synthesize import synthesize_dataset

SMALL = dict(widths=(4, 8, 8), time_dim=16, control_spacing=2, scales=3)  # tiny recovery U-Net for CPU tests


@pytest.fixture(scope="module")
def drdm():
    torch.manual_seed(0)
    return DRDM(**SMALL).eval()


def test_camus_copies_keep_the_layout_and_level_zero_keeps_the_images(tmp_path, drdm):
    root = write_camus(tmp_path / "camus", n_patients=2, size=(32, 32), n_frames=2, half_sequence=False)
    res = synthesize_dataset(drdm, f"camus:{root}", tmp_path / "out", copies=2, levels=(0, 3), views=("2CH", "4CH"))
    assert (res.written, res.unit, res.levels, res.generator, res.level_symbol) == (8, "views", [0, 3], "DRDM", "T'")
    views = find_camus(res.out, views=("2CH", "4CH"))
    assert [v.pid for v in views[:2]] == ["patient10001", "patient10001"] and views[-1].pid == "patient20002"
    info = "Info_2CH.cfg"
    assert (res.out / "patient10001" / info).read_text() == (root / "patient0001" / info).read_text()
    # levels cycle over the copies in the order written: patient10001 2CH is at T' = 0, its 4CH at T' = 3
    source = nib.load(str(root / "patient0001" / "patient0001_2CH_ES.nii.gz"))
    same = nib.load(str(res.out / "patient10001" / "patient10001_2CH_ES.nii.gz"))
    assert np.array_equal(np.asarray(same.dataobj), np.asarray(source.dataobj))
    assert np.array_equal(same.affine, source.affine) and same.get_data_dtype() == source.get_data_dtype()
    ddf = np.asarray(nib.load(str(res.out / "patient10001" / "patient10001_4CH_ddf.nii.gz")).dataobj)
    assert ddf.shape == (32, 32, 2) and np.abs(ddf).max() > 0
    labels = np.asarray(nib.load(str(res.out / "patient10001" / "patient10001_4CH_ED_gt.nii.gz")).dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    record = json.loads((res.out / "drdm_synthesis.json").read_text())
    assert record["copies"] == 2 and record["levels"] == [0, 3] and record["run"] == "DRDM"
    assert len(open_dataset(f"camus:{res.out}", split="all", dims=2)) > 0


def test_a_2d_generator_deforms_acdc_volumes_slice_by_slice(tmp_path, drdm):
    root = write_acdc(tmp_path / "acdc", n_patients=1, size=(4, 32, 32), n_frames=2)
    res = synthesize_dataset(drdm, f"acdc:{root}", tmp_path / "out", copies=1, levels=(3,))
    (patient,) = find_acdc(res.out)
    assert patient.pid == "patient1001" and res.unit == "patients"
    ddf = np.asarray(nib.load(str(res.out / "patient1001" / "patient1001_ddf.nii.gz")).dataobj)
    assert ddf.shape == (32, 32, 4, 3)  # NIfTI (X, Y, Z), channels last
    assert np.all(ddf[..., 2] == 0) and np.abs(ddf[..., :2]).max() > 0  # zero through the slices
    assert np.array_equal(ddf[:, :, 0], ddf[:, :, 3])  # one field for every slice
    assert (res.out / "patient1001" / "Info.cfg").read_text() == (root / "patient001" / "Info.cfg").read_text()


def test_refusals(tmp_path, drdm):
    root = write_camus(tmp_path / "camus", n_patients=1, size=(32, 32), n_frames=2, half_sequence=False)
    with pytest.raises(ValueError, match="acdc:PATH, acdc-h5:PATH or camus:PATH"):
        synthesize_dataset(drdm, "phantom", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        synthesize_dataset(drdm, f"camus:{tmp_path / 'missing'}", tmp_path / "out")
    with pytest.raises(ValueError, match="inside the input folder"):
        synthesize_dataset(drdm, f"camus:{root}", root / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        synthesize_dataset(drdm, f"camus:{root}", tmp_path / "full")
    with pytest.raises(ValueError, match=r"levels must be in \[0, 80\]"):
        synthesize_dataset(drdm, f"camus:{root}", tmp_path / "out", levels=(81,))
    with pytest.raises(ValueError, match="not a deformation generator"):
        synthesize_dataset(VoxelMorph(dims=2), f"camus:{root}", tmp_path / "out")
    assert not (tmp_path / "out").exists()
