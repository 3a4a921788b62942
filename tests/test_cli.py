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


def test_out_naming_an_existing_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for argv in (["train", "--method", "voxelmorph", "--out", str(f), "--steps", "1", "--size", "32", "32"],
                 ["bench", "--methods", "voxelmorph", "--runs", str(tmp_path / "runs"), "--out", str(f)],
                 ["phantom", "--out", str(f), "--patients", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{f} is an existing file" in err and "Traceback" not in err, argv
    assert f.read_text() == "keep me"
    assert main(["evaluate", "--run", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 2
    assert "existing folder" in capsys.readouterr().err


def test_a_run_directory_of_another_method_profile_or_data_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--out", str(run), "--steps", "2", "--size", "32", "32", "--device", "cpu"]
    assert main(base + ["--method", "voxelmorph"]) == 0
    capsys.readouterr()
    before = (run / "checkpoint.pt").read_bytes()
    for extra, what in ((["--method", "voxelmorph-diff"], "model.int_steps"),
                        (["--method", "voxelmorph", "--profile", "paper", "--dims", "2"], "profile"),
                        (["--method", "voxelmorph", "--data", "phantom:echo"], "phantom:echo"),
                        (["--method", "voxelmorph", "--direction", "ed->es"], "data.direction")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert "holds a voxelmorph" in err and what in err and "--no-resume" in err, (extra, err)
        assert "Traceback" not in err and "state_dict" not in err
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing was overwritten
    # the way out the message names: a new folder with --no-resume
    assert main(base[:2] + [str(tmp_path / "new")] + base[3:] + ["--method", "voxelmorph-diff", "--no-resume"]) == 0
    # more steps for the same run are fine: it resumes
    assert main(["train", "--out", str(run), "--steps", "3", "--size", "32", "32", "--device", "cpu",
                 "--method", "voxelmorph"]) == 0
