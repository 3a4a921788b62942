"""The papers' data protocols: registration direction per paper profile, the CAMUS view, ACDC's official split."""

from __future__ import annotations

import pytest

from diffreg.config import get_config
from diffreg.data import ACDCPairs, open_configured, write_acdc, write_camus
from diffreg.data.pairs import official_roots

SIZE = (4, 24, 28)


@pytest.fixture(scope="module")
def acdc_release(tmp_path_factory):
    """A phantom of the official ACDC release: ``training/`` (patients 1-10) and ``testing/`` (101-103)."""
    root = tmp_path_factory.mktemp("ACDC")
    write_acdc(root / "training", n_patients=10, size=SIZE, n_frames=2)
    write_acdc(root / "testing", n_patients=3, size=SIZE, n_frames=2, first_id=101)
    return root


def test_paper_profiles_register_in_the_papers_direction():
    # DiffuseMorph sec. 4.2 (ED aligned with ES); FSDiffReg sec. 3, dataset and preprocessing, and DiffuseReg
    # sec. 3, datasets and metrics (fixed = ED, moving = ES); LDM-Morph sec. 4.1 (ED registered to ES)
    expected = {"diffusemorph": "ed->es", "fsdiffreg": "es->ed", "diffusereg": "es->ed", "ldm-morph": "ed->es"}
    for method, direction in expected.items():
        assert get_config(method, "paper").data.direction == direction, method
    # the quick profiles keep the dataset's default, so every chapter compares methods on the same pairs
    assert {get_config(m, "quick").data.direction for m in expected} == {None}


def test_open_configured_passes_direction_view_and_split_scheme(tmp_path, acdc_release):
    camus = write_camus(tmp_path / "camus", n_patients=3, size=(32, 32), n_frames=2, half_sequence=False)
    cfg = get_config("ldm-morph", "paper")
    cfg.data.size = (32, 32)
    ds = open_configured(f"camus:{camus}", "all", cfg.data, cfg.profile)
    assert ds.direction == "ed->es" and all(c.endswith("_2CH") for c in ds.cases)
    cfg.data.view = "4CH"
    ds = open_configured(f"camus:{camus}", "all", cfg.data, cfg.profile)
    assert all(c.endswith("_4CH") for c in ds.cases) and len(ds) == 3

    cfg = get_config("diffusemorph", "paper")
    cfg.data.size = (8, 32, 32)
    ds = open_configured(f"acdc:{acdc_release / 'training'}", "train", cfg.data, cfg.profile)
    assert ds.direction == "ed->es" and ds.split_scheme == "diffreg"
    cfg.data.split_scheme = "official"
    test = open_configured(f"acdc:{acdc_release / 'training'}", "test", cfg.data, cfg.profile)
    assert [p.pid for p in test.patients] == ["patient101", "patient102", "patient103"]
    assert test[0]["moving"].shape == (1, 8, 32, 32) and test[0]["case"] == "patient101"
    # the phantom follows the configured direction too
    assert open_configured("phantom", "test", cfg.data, cfg.profile).direction == "ed->es"


def test_official_split_takes_test_patients_from_the_testing_folder(acdc_release):
    training = acdc_release / "training"
    assert official_roots(training) == (training, acdc_release / "testing")
    assert official_roots(acdc_release) == (training, acdc_release / "testing")
    splits = {s: [p.pid for p in ACDCPairs(training, dims=3, split=s, split_scheme="official").patients]
              for s in ("train", "val", "test", "all")}
    assert splits["test"] == ["patient101", "patient102", "patient103"]
    assert splits["val"] == ["patient010"] and len(splits["train"]) == 9      # 90 / 10 % of training/
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(splits["all"])
    # the default scheme splits the given folder 70 / 10 / 20 and never looks at testing/
    default = ACDCPairs(training, dims=3, split="test")
    assert default.split_scheme == "diffreg" and [p.pid for p in default.patients] == ["patient005", "patient010"]


def test_official_split_without_a_testing_folder_is_a_clear_error(tmp_path):
    root = write_acdc(tmp_path / "training", n_patients=2, size=SIZE, n_frames=2)
    with pytest.raises(FileNotFoundError, match=r"testing/ folder.*split_scheme='diffreg'"):
        ACDCPairs(root, split="test", split_scheme="official")
    with pytest.raises(ValueError, match="unknown split_scheme 'paper'"):
        ACDCPairs(root, split="test", split_scheme="paper")
