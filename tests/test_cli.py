import csv

import pytest

from diffreg.cli import _options, main


def test_phantom_train_evaluate_round_trip(tmp_path, capsys):
    root = tmp_path / "acdc"
    assert main(["phantom", "--layout", "acdc", "--out", str(root), "--patients", "5"]) == 0
    assert (root / "patient001" / "Info.cfg").is_file()
    run = tmp_path / "run"
    assert main(["train", "--method", "voxelmorph", "--data", f"acdc:{root}", "--out", str(run), "--steps", "6",
                 "--size", "32", "32"]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "log.csv").is_file()
    out = tmp_path / "table.csv"
    assert main(["evaluate", "--run", str(run), "--data", f"acdc:{root}", "--split", "all", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert rows and {"case", "dice_initial", "dice", "folding_percent"} <= set(rows[0])
    assert "dice" in capsys.readouterr().out
    # without --data, the run is evaluated on the data it was trained on (RUN/data.json)
    assert main(["evaluate", "--run", str(run), "--split", "all", "--limit", "2"]) == 0
    assert f"acdc:{root}" in capsys.readouterr().out
    # a complete run is not trained again
    assert main(["train", "--method", "voxelmorph", "--data", f"acdc:{root}", "--out", str(run), "--steps", "6",
                 "--size", "32", "32"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert main(["train", "--method", "voxelmorph", "--data", f"acdc:{tmp_path / 'missing'}", "--out",
                 str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--method", "not-a-method", "--out", "x"])


def test_register_options_are_parsed_as_literals():
    assert _options(["steps=20", "sampler=ddim", "guidance=None", "eta=0.5"]) == {
        "steps": 20, "sampler": "ddim", "guidance": None, "eta": 0.5}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _options(["steps"])


def test_drdm_synthesize_writes_a_readable_dataset_and_leaves_the_input_alone(tmp_path):
    from diffreg.data import open_dataset

    root = tmp_path / "acdc-h5"
    assert main(["phantom", "--layout", "acdc-h5", "--out", str(root), "--patients", "3"]) == 0
    before = sorted((p.name, p.stat().st_size) for p in root.rglob("*"))
    run = tmp_path / "drdm"
    assert main(["train", "--method", "drdm", "--data", f"acdc-h5:{root}", "--out", str(run), "--steps", "2"]) == 0
    out = tmp_path / "augmented"
    assert main(["synthesize", "--run", str(run), "--data", f"acdc-h5:{root}", "--out", str(out), "--copies", "1",
                 "--levels", "30"]) == 0
    assert sorted((p.name, p.stat().st_size) for p in root.rglob("*")) == before      # input untouched
    synthetic = open_dataset(f"acdc-h5:{out}", split="all", dims=2)
    assert len(synthetic) > 0 and set(synthetic[0]["moving_label"].unique().tolist()) <= {0, 1, 2, 3}
    # an output folder inside the input is refused
    assert main(["synthesize", "--run", str(run), "--data", f"acdc-h5:{root}", "--out", str(root / "x")]) == 2
