"""``benchmarks/acdc_study/run_study.py`` without training: the summary of finished cells (known answers), and cells
recorded in ``--out`` adding up with those of ``--work``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("run_study", ROOT / "benchmarks" / "acdc_study" / "run_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(study, work: Path, cell: str, dice: dict[str, tuple[float, float]], profile: str = "quick") -> None:
    """A finished cell whose bench evaluated two pairs per method with the given Dice values."""
    from diffreg.evaluate import Table

    dims, budget, seed = study.parse_cell(cell)
    folder = study.cell_dir(work, cell)
    cell = study.cell_name(dims, budget, seed)
    rows = Table({"method": m, "case": f"p{i}", "dice_initial": 0.5, "dice": d, "folding_percent": 0.0,
                  "seconds": 0.01} for m, values in dice.items() for i, d in enumerate(values))
    rows.to_csv(folder / "bench" / "results.csv")
    (folder / "cell.json").write_text(json.dumps({"cell": cell, "dims": dims, "budget": budget, "seed": seed,
                                                  "profile": profile, "data": "fake", "commit": "abc1234",
                                                  "finished": "2026-01-01T00:00:00+00:00", "seconds": 1.0,
                                                  "resumed": False, "cpu": "test", "threads": 1}))


def test_summary_over_seeds_and_recorded_cells_add_up(study, tmp_path):
    one, two, out = tmp_path / "work1", tmp_path / "work2", tmp_path / "out"
    _cell(study, one, "2d:600:0", {"voxelmorph": (0.70, 0.72), "flowreg": (0.80, 0.80)})   # gap +0.09
    _cell(study, one, "2d:600:1", {"voxelmorph": (0.80, 0.80), "flowreg": (0.78, 0.80)})   # gap -0.01
    _cell(study, one, "2d:syn", {"syn": (0.75, 0.77)})   # no budget, no seed: against every seed's VoxelMorph
    study.summarise(one, out)
    first = {n: (out / n).read_text() for n in ("results.csv", "pairs.csv", "cells.json", "summary.md")}
    line = next(ln for ln in first["summary.md"].splitlines() if ln.startswith("| flowreg |"))
    assert "+0.040 [-0.010, +0.090]" in line and "1 of 2" in line
    line = next(ln for ln in first["summary.md"].splitlines() if ln.startswith("| syn |"))
    assert "+0.005 [-0.040, +0.050]" in line and "1 of 2" in line

    # a cell finished elsewhere adds to the recorded ones; the recorded rows are read back unchanged
    _cell(study, two, "2d:600:2", {"voxelmorph": (0.60, 0.60), "flowreg": (0.70, 0.70)})   # gap +0.10
    _cell(study, two, "2d:15000:0", {"voxelmorph": (0.75, 0.75)})   # listed after 600 pairs: budgets are numbers
    study.summarise(two, out)
    means = [r for r in study.read_csv(out / "results.csv") if r["method"] == "flowreg"]
    assert sorted((r["seed"], round(r["dice"], 6)) for r in means) == [(0, 0.8), (1, 0.79), (2, 0.7)]
    assert [c["cell"] for c in json.loads((out / "cells.json").read_text())] == \
        ["2d:600:0", "2d:600:1", "2d:600:2", "2d:15000:0", "2d:syn"]
    study.summarise(tmp_path / "empty", out)   # the recorded cells alone give the same files again
    again = {n: (out / n).read_text() for n in first}
    study.summarise(tmp_path / "empty", out)
    assert {n: (out / n).read_text() for n in first} == again
    line = next(ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("| flowreg |"))
    assert "2 of 3" in line and "[-0.010, +0.100]" in line

    # a cell run again replaces its recorded rows, whatever the spelling of its name
    _cell(study, two, "2D:0600:0", {"voxelmorph": (0.70, 0.72), "flowreg": (0.60, 0.60)})
    study.summarise(two, out)
    means = {r["seed"]: r["dice"] for r in study.read_csv(out / "results.csv") if r["method"] == "flowreg"}
    assert means[0] == pytest.approx(0.60) and len(study.read_csv(out / "pairs.csv")) == 16

    # a cell of another profile belongs in another --out
    _cell(study, tmp_path / "paper", "2d:600:0", {"voxelmorph": (0.9, 0.9)}, profile="paper")
    with pytest.raises(SystemExit, match="another --out"):
        study.summarise(tmp_path / "paper", out)

    # nothing finished anywhere: a clear error
    with pytest.raises(SystemExit, match="no finished cell"):
        study.summarise(tmp_path / "empty", tmp_path / "nothing")


def test_a_cell_is_one_bench_call_recorded_once(study, tmp_path, monkeypatch):
    """``run_cell`` hands its budget, seed, size and ``processes`` to ``run_bench``, records the cell, and skips it
    when it is run again (a spy in place of the training)."""
    calls = []
    monkeypatch.setattr(study, "run_bench", lambda **kw: calls.append(kw))
    study.run_cell("3d:150:1", "/nowhere/acdc-dev", tmp_path, "cpu", processes=2)
    assert len(calls) == 1
    kw = calls[0]
    assert kw["budget"] == "steps=150" and kw["seed"] == 1 and kw["dims"] == 3 and kw["processes"] == 2
    assert kw["size"] == study.SIZE_3D and kw["data"] == "acdc-h5:/nowhere/acdc-dev"
    assert set(kw["methods"]) == set(study._learned()) and "syn" not in kw["methods"]
    record = json.loads((study.cell_dir(tmp_path, "3d:150:1") / "cell.json").read_text())
    assert (record["cell"], record["budget"], record["seed"], record["processes"]) == ("3d:150:1", 150, 1, 2)
    assert record["data"] == "acdc-dev" and record["resumed"] is False
    study.run_cell("3d:150:1", "/nowhere/acdc-dev", tmp_path, "cpu", processes=2)
    study.run_cell("2d:syn", "/nowhere/acdc-dev", tmp_path, "cpu")
    assert len(calls) == 2 and calls[1]["methods"] == ["syn"] and calls[1]["budget"] is None
