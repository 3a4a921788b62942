import pytest

from diffreg.config import MethodConfig, get_config, methods


def test_every_method_has_both_profiles_and_round_trips():
    for name in methods():
        for profile in ("quick", "paper"):
            cfg = get_config(name, profile)
            assert cfg.method == name and cfg.profile == profile
            assert MethodConfig.from_dict(cfg.to_dict()) == cfg


def test_quick_is_2d_and_paper_cites_a_source():
    assert get_config("voxelmorph", "quick").data.dims == 2
    paper = get_config("voxelmorph", "paper")
    assert paper.data.dims == 3 and paper.data.size == (32, 128, 128) and "Balakrishnan" in paper.source


def test_get_config_returns_copies_and_rejects_unknowns():
    a = get_config("voxelmorph")
    a.train.steps = 1
    assert get_config("voxelmorph").train.steps != 1
    with pytest.raises(ValueError, match="unknown method"):
        get_config("morph")
    with pytest.raises(ValueError, match="unknown profile"):
        get_config("voxelmorph", "slow")
    with pytest.raises(ValueError, match="dims"):
        get_config("voxelmorph", dims=4)
