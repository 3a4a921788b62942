"""The ANTs SyN reference (diffreg.models.classical) and the benchmark (diffreg.bench, ``python -m diffreg bench``)."""

import csv
import math

import numpy as np
import pytest
import torch

from diffreg.bench import IntensityView, bench_methods, load_results, make_figures, parse_options
from diffreg.cli import main
from diffreg.data import PhantomPairs, make_sax_2d, make_sax_3d
from diffreg.evaluate import evaluate
from diffreg.spatial import identity_grid, warp


def _known_field(shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth ``(1, ndim, *shape)`` field; channel ``k`` varies along axis ``k + 1`` with its own amplitude, so a
    swap of channels or a wrong sign cannot go unnoticed."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    comps = [(2.0 - 0.5 * k) * torch.sin(2 * math.pi * grids[(k + 1) % len(shape)] / shape[(k + 1) % len(shape)] + k)
             for k in range(len(shape))]
    return torch.stack(comps)[None]


@pytest.mark.parametrize("dims, spacing", [(2, None), (2, (2.0, 1.0)), (3, (3.0, 1.0, 1.5))])
def test_syn_field_is_a_diffreg_pull_field_in_voxels(tmp_path, dims, spacing):
    ants = pytest.importorskip("ants")
    from diffreg.models.classical import ANTsSyN

    size = (64, 64) if dims == 2 else (12, 32, 32)
    seq = make_sax_2d(size, n_frames=2, seed=3) if dims == 2 else make_sax_3d(size, n_frames=2, seed=3)
    fixed = torch.from_numpy(seq.frames[0])[None, None]
    true = _known_field(size)
    moving = warp(fixed, true)  # moving(p) = fixed(p + true(p))
    syn = ANTsSyN(dims=dims, spacing=spacing, **({} if dims == 2 else {"reg_iterations": (20, 10, 5)}))
    result = syn.register(moving, fixed, transforms_dir=tmp_path)
    assert result.ddf.shape == (1, dims, *size) and result.ddf.dtype == torch.float32
    assert syn.num_parameters() == 0 and not list(tmp_path.glob("diffreg-syn-*"))

    # diffreg's warp with the converted field == ANTs' own resampling with its transforms (where the sample point
    # lies inside the image: ANTs pads with 0, diffreg with the border value)
    f_img = ants.from_numpy(fixed[0, 0].numpy(), spacing=syn.spacing)
    m_img = ants.from_numpy(moving[0, 0].numpy(), spacing=syn.spacing)
    reference = ants.apply_transforms(f_img, m_img, result.extras["fwdtransforms"][0]).numpy()
    pos = identity_grid(size)[None] + result.ddf
    inside = torch.ones(size, dtype=torch.bool)
    for k, s in enumerate(size):
        inside &= (pos[0, k] >= 0) & (pos[0, k] <= s - 1)
    inside = inside.numpy()
    assert inside.mean() > 0.7
    ours = warp(moving, result.ddf)[0, 0].numpy()
    np.testing.assert_allclose(ours[inside], reference[inside], atol=1e-4)
    assert np.abs(warp(moving, result.ddf.flip(1))[0, 0].numpy() - reference)[inside].max() > 0.1  # order matters
    np.testing.assert_allclose(result.extras["warped_ants"][0, 0].numpy(), reference, atol=1e-4)
    assert torch.allclose(result.warped, warp(moving, result.ddf))
    # registered: closer to fixed than the input
    assert ((result.warped - fixed) ** 2).mean() < 0.5 * ((moving - fixed) ** 2).mean()

    if dims == 2:  # the field is the inverse of the known warp: fixed(p) = moving(p + inv(p))
        inv = -true.clone()
        for _ in range(30):
            inv = -warp(true, inv)
        grad = np.gradient(fixed[0, 0].numpy())
        mask = np.hypot(*grad) > 0.05  # where the image constrains the field
        u, v = result.ddf[0].numpy(), inv[0].numpy()
        for k in range(2):
            assert np.corrcoef(u[k][mask], v[k][mask])[0, 1] > 0.6
            assert abs(np.corrcoef(u[k][mask], v[1 - k][mask])[0, 1]) < 0.3
            assert np.abs(u[k] - v[k])[mask].mean() < 0.6 * np.abs(v[k])[mask].mean()


def test_syn_improves_dice_on_phantom_pairs_reproducibly():
    pytest.importorskip("ants")
    from diffreg.models.classical import ANTsSyN

    data = PhantomPairs("sax", n_subjects=10, split="test")
    assert len(data) == 2
    syn = ANTsSyN(dims=2)
    table = evaluate(syn, data)  # works without parameters to take the device from
    for row in table:
        assert row["dice"] > row["dice_initial"] + 0.1
        assert row["folding_percent"] < 0.1 and row["seconds"] > 0
        assert row["epe"] < row["epe_initial"]
    item = data[0]
    a = syn.register(item["moving"][None], item["fixed"][None]).ddf
    b = syn.register(item["moving"][None], item["fixed"][None]).ddf
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="non-zero"):
        ANTsSyN(dims=2, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        syn.register(item["moving"][None] * float("nan"), item["fixed"][None])
    with pytest.raises(NotImplementedError):
        syn.loss({})


def test_method_selection_and_options():
    from diffreg.models.classical import ants_available

    names, skipped = bench_methods("all")
    assert names[0] == "voxelmorph" and "drdm" not in names and "drdm" in skipped
    assert {"voxelmorph-diff", "diffusemorph", "fsdiffreg", "diffusereg", "ldm-morph"} <= set(names)
    assert ("syn" in names) == ants_available() and ("syn" in skipped) != ants_available()
    assert bench_methods(["syn", "voxelmorph", "drdm"])[0] == ["syn", "voxelmorph"]
    with pytest.raises(ValueError, match="unknown method"):
        bench_methods(["voxelmorph", "nope"])
    assert parse_options(["diffusereg:steps=50", "diffusereg:sampler=ddim", "syn:reg_iterations=(4, 2, 1)"]) == {
        "diffusereg": {"steps": 50, "sampler": "ddim"}, "syn": {"reg_iterations": (4, 2, 1)}}
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        parse_options(["steps=50"])


def test_intensity_view_is_the_same_pairs_in_another_range():
    base = PhantomPairs("sax", n_subjects=5, split="test")
    other = PhantomPairs("sax", n_subjects=5, split="test", intensity=(0.0, 1.0))
    view = IntensityView(base, (0.0, 1.0))
    assert len(view) == len(base) and view.labels == base.labels and view.intensity == (0.0, 1.0)
    a, b = view[0], other[0]
    torch.testing.assert_close(a["moving"], b["moving"], atol=1e-6, rtol=0)
    torch.testing.assert_close(a["fixed"], b["fixed"], atol=1e-6, rtol=0)
    assert torch.equal(a["moving_label"], base[0]["moving_label"]) and a["case"] == base[0]["case"]


def test_bench_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("ants")
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["bench", "--methods", "voxelmorph", "syn", "--steps", "5", "--limit", "2", "--runs", str(runs),
            "--out", str(out), "--option", "syn:reg_iterations=(40, 20, 10)"]
    assert main(args) == 0
    for name in ("results.csv", "summary.md", "boxplot_dice.png", "qualitative.png", "examples.pt"):
        assert (out / name).is_file(), name
    assert (runs / "voxelmorph" / "checkpoint.pt").is_file() and not (runs / "syn").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert list(rows[0])[:2] == ["method", "case"]
    pairs = {(r["method"], r["case"]) for r in rows}
    cases = {r["case"] for r in rows}
    assert len(cases) == 2 and pairs == {(m, c) for m in ("voxelmorph", "syn") for c in cases}
    assert all(math.isfinite(float(r["dice"])) and math.isfinite(float(r["seconds"])) for r in rows)
    summary = (out / "summary.md").read_text()
    for text in ("| voxelmorph |", "| syn |", "5 steps × batch 1", "p_dice_vs_voxelmorph", "dice_lv", "40x20x10",
                 "folding_percent", "epe"):
        assert text in summary, text
    # the same pairs for every method
    dice_initial = {(r["method"], r["case"]): float(r["dice_initial"]) for r in rows}
    assert all(dice_initial[("syn", c)] == dice_initial[("voxelmorph", c)] for c in cases)
    # figures can be made again from the folder
    tables, examples = load_results(out)
    assert set(tables) == {"voxelmorph", "syn"} and set(examples["fields"]) == {"voxelmorph", "syn"}
    figs = make_figures(tables, examples)
    assert set(figs) == {"boxplot_dice", "qualitative"}
    import matplotlib.pyplot as plt

    plt.close("all")
    # a second benchmark reuses the finished run instead of training again
    capsys.readouterr()
    assert main(["bench", "--methods", "voxelmorph", "--steps", "5", "--limit", "1", "--runs", str(runs), "--out",
                 str(tmp_path / "again")]) == 0
    assert "reused" in (tmp_path / "again" / "summary.md").read_text()
    assert "VoxelMorph" not in capsys.readouterr().err  # no training progress bar


def test_bench_clear_errors(tmp_path, capsys):
    base = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert main(["bench", "--methods", "nope", *base]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--methods", "voxelmorph", "--option", "fsdiffreg:steps=3", *base]) == 2
    assert "fsdiffreg" in capsys.readouterr().err
    assert main(["bench", "--methods", "drdm", *base]) == 2
    assert "skipped" in capsys.readouterr().err


def test_equal_budget_in_pairs_and_learning_curves(tmp_path):
    """--budget steps=N: a batch-1 and a batch-4 method see the same number of training pairs; --curve-every writes
    curves.csv and learning_curves.png with the validation Dice of both."""
    from diffreg.bench import parse_budget, run_bench

    res = run_bench(["voxelmorph", "ldm-morph"], profile="quick", data="phantom", runs=tmp_path / "runs",
                    out=tmp_path / "out", limit=1, device="cpu", budget="steps=8", curve_every=4, curve_pairs=1,
                    stage_steps=1)
    info = res["methods"]
    batches = {m: info[m]["config"].train.batch_size for m in info}
    assert batches["voxelmorph"] == 1 and batches["ldm-morph"] > 1
    seen = {m: info[m]["steps"] * batches[m] for m in info}
    assert seen == {"voxelmorph": 8, "ldm-morph": 8}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "equal budget of 8 training pairs per method" in summary and "pairs seen equal" in summary
    curves = res["curves"]
    assert {r["method"] for r in curves} == {"voxelmorph", "ldm-morph"}
    for m in ("voxelmorph", "ldm-morph"):
        assert [r["pairs_seen"] for r in curves if r["method"] == m] == [4, 8]
    assert all(0 <= r["val_dice"] <= 1 for r in curves)
    assert (tmp_path / "out" / "curves.csv").is_file() and (tmp_path / "out" / "learning_curves.png").is_file()
    assert parse_budget("seconds=2.5") == ("seconds", 2.5)
    for bad in ("steps=0", "steps=2.5", "pairs=10", "seconds", "seconds=-1"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)


def test_methods_trained_in_worker_processes_give_the_results_of_methods_trained_here(tmp_path, monkeypatch):
    """processes=2: the learned methods trained two at a time in worker processes (one thread each) give the
    held-out metrics and learning curves of the same benchmark trained one method after the other on one thread
    here, bit for bit; the status says trained. Run again, the finished runs are loaded here, not in workers."""
    import diffreg.train
    from diffreg.bench import run_bench

    calls = []

    def spy(function, jobs, processes=2):
        jobs = list(jobs)
        calls.append(sorted(j["name"] for j in jobs))
        return map_in_workers(function, jobs, processes)

    map_in_workers = diffreg.train.map_in_workers
    monkeypatch.setattr(diffreg.train, "map_in_workers", spy)
    kwargs = dict(profile="quick", data="phantom", limit=2, device="cpu", budget="steps=6", curve_every=3,
                  curve_pairs=1, stage_steps=1, figures=False, seed=2)
    methods = ["voxelmorph", "fsdiffreg", "ldm-morph"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' setting, for the registrations here too
    try:
        here = run_bench(methods, runs=tmp_path / "here", out=tmp_path / "here_out", **kwargs)
        apart = run_bench(methods, runs=tmp_path / "apart", out=tmp_path / "apart_out", processes=2, **kwargs)
        again = run_bench(methods, runs=tmp_path / "apart", out=tmp_path / "again_out", processes=2, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert calls == [sorted(methods)]   # the second call found every run finished
    assert [apart["methods"][m]["status"] for m in methods] == ["trained"] * 3
    assert [again["methods"][m]["status"] for m in methods] == ["reused"] * 3
    for m in methods:
        for other in (apart, again):
            for a, b in zip(other["tables"][m], here["tables"][m], strict=True):
                assert {k: v for k, v in a.items() if k != "seconds"} == \
                    {k: v for k, v in b.items() if k != "seconds"}
        assert apart["methods"][m]["steps"] == here["methods"][m]["steps"]
    strip = [{k: r[k] for k in ("method", "pairs_seen", "val_dice")} for r in apart["curves"]]
    assert strip == [{k: r[k] for k in ("method", "pairs_seen", "val_dice")} for r in here["curves"]]
    assert len(strip) == 6


def test_equal_budget_in_seconds(tmp_path):
    from diffreg.bench import run_bench

    res = run_bench(["voxelmorph"], profile="quick", data="phantom", runs=tmp_path / "runs", out=tmp_path / "out",
                    limit=1, device="cpu", budget="seconds=1", figures=False)
    info = res["methods"]["voxelmorph"]
    # the steps are estimated from a timing so that the schedule completes in about 1 s; the run stops at 1 s anyway
    assert info["steps"] >= 1 and 0 < info["seconds"] < 1.0 + 5.0
    assert "equal budget of 1 s of training per method" in (tmp_path / "out" / "summary.md").read_text()


def test_seed_summary_treats_seeds_as_the_unit():
    """Known answer: two pairs per seed, three seeds; a seed's value is its pair mean, the comparison is per seed."""
    from diffreg.bench import seed_summary

    rows = []
    vm = {0: (0.80, 0.82), 1: (0.70, 0.72), 2: (0.90, 0.92)}   # per-seed means 0.81, 0.71, 0.91
    dm = {0: (0.85, 0.85), 1: (0.70, 0.70), 2: (0.95, 0.93)}   # per-seed means 0.85, 0.70, 0.94
    for method, table in (("voxelmorph", vm), ("diffusemorph", dm)):
        for seed, values in table.items():
            rows += [{"method": method, "seed": seed, "case": c, "dice": v, "folding_percent": 0.1 * seed}
                     for c, v in enumerate(values)]
    rows += [{"method": "syn", "seed": "", "case": c, "dice": 0.8} for c in range(2)]
    s = {r["method"]: r for r in seed_summary(rows)}
    assert s["voxelmorph"]["seeds"] == 3 and s["voxelmorph"]["dice_mean"] == pytest.approx(0.81)
    assert s["voxelmorph"]["dice_sd"] == pytest.approx(0.1)              # SD of 0.81, 0.71, 0.91 (ddof 1)
    assert s["voxelmorph"]["folding_percent_mean"] == pytest.approx(0.1)
    d = np.array([0.04, -0.01, 0.03])
    assert s["diffusemorph"]["dice_diff_mean"] == pytest.approx(d.mean())
    assert (s["diffusemorph"]["dice_diff_min"], s["diffusemorph"]["dice_diff_max"]) == pytest.approx((-0.01, 0.04))
    assert s["diffusemorph"]["seeds_ahead"] == 2
    from scipy.stats import ttest_1samp

    assert s["diffusemorph"]["p_seeds"] == pytest.approx(ttest_1samp(d, 0).pvalue)
    # SyN runs once: compared with every seed's VoxelMorph
    assert s["syn"]["seeds"] == 1 and s["syn"]["seeds_ahead"] == 1
    assert s["syn"]["dice_diff_min"] == pytest.approx(0.8 - 0.91) and s["syn"]["dice_diff_max"] == pytest.approx(0.09)
    assert "p_seeds" not in s["voxelmorph"]


def test_bench_over_seeds_command(tmp_path):
    """--seeds trains every method once per seed (its own run folder and seed), rows carry the seed, and the summary
    is over seeds; an interrupted call resumes (finished runs are reused)."""
    pytest.importorskip("ants")
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["bench", "--methods", "voxelmorph", "fsdiffreg", "syn", "--steps", "3", "--limit", "2", "--seeds", "0",
            "1", "--runs", str(runs), "--out", str(out), "--option", "syn:reg_iterations=(20, 10, 5)"]
    assert main(args) == 0
    from diffreg.config import MethodConfig
    import json

    for s in (0, 1):
        for m in ("voxelmorph", "fsdiffreg"):
            cfg = MethodConfig.from_dict(json.loads((runs / f"seed{s}" / m / "config.json").read_text()))
            assert cfg.train.seed == s
        assert (out / f"seed{s}" / "results.csv").is_file()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["seed"]) for r in rows} == {("voxelmorph", "0"), ("voxelmorph", "1"), ("fsdiffreg", "0"),
                                                         ("fsdiffreg", "1"), ("syn", "")}
    # different seeds train different networks (after 3 steps the fields differ, if not yet the Dice)
    epe = {s: [float(r["epe"]) for r in rows if r["method"] == "voxelmorph" and r["seed"] == s] for s in ("0", "1")}
    assert epe["0"] != epe["1"]
    vm = {s: [float(r["dice"]) for r in rows if r["method"] == "voxelmorph" and r["seed"] == s] for s in ("0", "1")}
    summary = list(csv.DictReader(open(out / "seeds.csv")))
    by = {r["method"]: r for r in summary}
    assert by["voxelmorph"]["seeds"] == "2" and by["syn"]["seeds"] == "1"
    mean0 = np.mean(vm["0"]); mean1 = np.mean(vm["1"])
    assert float(by["voxelmorph"]["dice_mean"]) == pytest.approx((mean0 + mean1) / 2, abs=1e-6)
    assert float(by["voxelmorph"]["dice_sd"]) == pytest.approx(abs(mean0 - mean1) / math.sqrt(2), abs=1e-6)
    assert "seeds_ahead" in by["fsdiffreg"] and "p_seeds" in (out / "seeds.md").read_text()
    # run again: every run is reused, nothing is trained, the same numbers come back
    stamp = (runs / "seed1" / "fsdiffreg" / "checkpoint.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (runs / "seed1" / "fsdiffreg" / "checkpoint.pt").stat().st_mtime_ns == stamp
    again = list(csv.DictReader(open(out / "results.csv")))
    assert [r["dice"] for r in again if r["method"] != "syn"] == [r["dice"] for r in rows if r["method"] != "syn"]


def test_papers_is_all_without_the_methods_beyond_the_five_papers():
    from diffreg.bench import BEYOND_PAPERS

    everything, _ = bench_methods("all")
    papers, skipped = bench_methods("papers")
    assert set(BEYOND_PAPERS) <= set(everything) and not set(BEYOND_PAPERS) & set(papers)
    assert papers == [m for m in everything if m not in BEYOND_PAPERS] and "drdm" in skipped

