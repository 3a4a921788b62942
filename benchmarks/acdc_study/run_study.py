"""Does diffusion help? Every learned method on real ACDC at several seeds, budgets and in 2D and 3D (metrics only).

The study is a grid of *cells*, one per (dimensions, budget, seed): each cell is one :func:`diffreg.bench.run_bench`
call that trains (or reuses) every learned method of ``python -m diffreg bench --methods all`` at an equal budget of
training pairs (``--budget steps=N``) with that seed, and evaluates it on the held-out test patients. ANTs SyN does
not depend on a seed or a budget and runs once per dimensionality. Cells run in the order of ``--cells`` (default
:data:`PLAN`); a finished cell (its ``cell.json``) is skipped and an interrupted one resumes (finished runs are
reused, a partial run continues from its checkpoint), so the command can be stopped and restarted at any time, and
several processes may work on different cells.

Each cell's runs are trained from the start: the quick profiles decay their learning rate over the budget, so a
checkpoint at 600 pairs of a 3,000-pair run is not a 600-pair run.

Data: the 20 patients of ``acdc-dev`` (HDF5 layout, no spacing stored), split by patient with diffreg's 70/10/20
scheme (14 training, 2 validation, 4 test patients), ES registered to ED, the quick profile of each method.

* 2D: the short-axis slices, a square around the heart resized to 64 x 64 (:class:`diffreg.data.ACDCPairs`).
* 3D: whole stacks, resampled from the spacing assumed for the layout (10 x 1.5 x 1.5 mm, slice x row x column;
  ACDC's in-plane spacing is 1.2-1.9 mm and its slice distance 5-10 mm, so distances in mm are approximate) to
  3.15 x 3 x 3 mm (the papers' 3.15 x 1.5 x 1.5 mm with half the in-plane resolution) and cropped or padded
  around the centre to 32 x 64 x 64 (:data:`SIZE_3D`: DiffuseReg's Swin encoder needs sizes divisible by 32, and
  every method is trained and tested at the same size). The 6-18 slices of a stack become 19-57 interpolated
  slices of which the central 32 (100 mm) are kept; the in-plane grid is twice as coarse as the papers'. At the
  paper profile the profiles' own 3D size is used (32 x 128 x 128, the papers' 3.15 x 1.5 x 1.5 mm).
* 3D budget: 150 training pairs (about 11 passes over the 14 training volumes): the quick 3D steps take 0.4-1.9 s
  at batch 1 and 16 x 64 x 64 (``benchmarks/speed_cpu.md``), about twice that at 32 x 64 x 64, so one seed of
  every method takes about an hour of one CPU core (``summary.md`` records each cell's duration). The stages before
  the main loop (DiffuseReg's teacher, LDM-Morph's autoencoder and latent U-Net) keep their profile budgets.

Usage::

    python benchmarks/acdc_study/run_study.py --data PATH/acdc-dev --work PATH/study-runs          # everything
    python benchmarks/acdc_study/run_study.py --data ... --work ... --cells 2d:600:0 2d:600:1     # some cells
    python benchmarks/acdc_study/run_study.py --data ... --work ... --processes 2     # 2 methods at a time (2 cores)
    python benchmarks/acdc_study/run_study.py --work PATH/study-runs --summarise-only              # tables, figures
    # the same grid at the papers' profiles on a GPU, on ACDC NIfTI with its spacing (book/reproducing.md)
    python benchmarks/acdc_study/run_study.py --data acdc:/data/ACDC/training --profile paper --device cuda \
        --work runs-study-paper --out study-paper

Outputs (``--out``, default ``benchmarks/acdc_study``): ``results.csv`` (one row per method, dims, budget and seed:
the test-pair means), ``pairs.csv`` (every per-pair row), ``cells.json`` (the record of each finished cell; the
cells recorded in ``--out`` are kept in the summary next to those of ``--work``), ``summary.md`` (mean and SD over seeds, and the per-seed
difference of Dice against VoxelMorph), ``dice_vs_budget.png``, ``dims.png``; with ``--toy-nifti``,
``toy_nifti.csv`` (the two preprocessed NIfTI pairs registered by every 3D run through ``register --pairs``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffreg.bench import run_bench, seed_summary  # noqa: E402
from diffreg.evaluate import Table, read_csv  # noqa: E402

#: the default order of the cells: what the smallest machine can finish first comes first
PLAN = ["2d:600:0", "2d:600:1", "2d:600:2", "2d:syn", "2d:3000:0", "2d:3000:1", "2d:3000:2",
        "3d:150:0", "3d:150:1", "3d:syn", "2d:15000:0", "2d:15000:1", "2d:15000:2"]
STRUCTURES = ("lv", "myo", "lv_myo", "rv", "whole")
METRICS = ("dice_initial", "dice", *(f"dice_{s}" for s in STRUCTURES), "folding_percent", "sdlogj", "hd95",
           "ef_error", "seconds")
SIZE_3D = (32, 64, 64)
OPTIONS = {"diffusereg": {"sampler": "ddim", "steps": 20}}   # DiffuseReg registers with DDIM, 20 steps


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def parse_cell(text: str) -> tuple[int, int | None, int | None]:
    """``"2d:600:0"`` -> ``(2, 600, 0)``; ``"3d:syn"`` -> ``(3, None, None)``."""
    parts = text.lower().split(":")
    if len(parts) == 2 and parts[1] == "syn" and parts[0] in ("2d", "3d"):
        return int(parts[0][0]), None, None
    if len(parts) != 3 or parts[0] not in ("2d", "3d"):
        raise ValueError(f"a cell is DIMS:BUDGET:SEED (e.g. 2d:600:0) or DIMS:syn, got {text!r}")
    return int(parts[0][0]), int(parts[1]), int(parts[2])


def cell_name(dims: int, budget: int | None, seed: int | None) -> str:
    """The canonical name of a cell: ``2d:600:0``, ``3d:syn``."""
    return f"{dims}d:syn" if budget is None else f"{dims}d:{budget}:{seed}"


def cell_dir(work: Path, cell: str) -> Path:
    return work / cell_name(*parse_cell(cell)).replace(":", "_")


def data_spec(data: str) -> str:
    """A ``DIFFREG_DATA`` string: a bare folder is the HDF5 layout (``acdc-h5:FOLDER``)."""
    return data if data.split(":", 1)[0] in ("acdc", "acdc-h5", "camus", "phantom") else f"acdc-h5:{data}"


def run_cell(cell: str, data: str, work: Path, device: str | None, profile: str = "quick",
             processes: int = 1) -> None:
    """Train (or reuse) and evaluate one cell at ``profile``; writes ``cell.json`` when it is finished.

    ``processes > 1`` trains the cell's learned methods that many at a time on the CPU, one thread each
    (:func:`diffreg.bench.run_bench`); the weights are those of one-at-a-time training, only the wall time changes.
    """
    dims, budget, seed = parse_cell(cell)
    cell = cell_name(dims, budget, seed)
    folder = cell_dir(work, cell)
    if (folder / "cell.json").exists():
        print(f"{cell}: finished before, skipped", flush=True)
        return
    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    resumed = any((folder / "runs").glob("**/checkpoint.pt"))
    methods = ["syn"] if budget is None else _learned()
    run_bench(methods=methods, profile=profile, data=data_spec(data), runs=folder / "runs", out=folder / "bench",
              dims=dims, size=SIZE_3D if dims == 3 and profile == "quick" else None, device=device,
              options=None if budget is None else OPTIONS, budget=None if budget is None else f"steps={budget}",
              seed=seed, figures=False, progress=False, processes=processes)
    record = {"cell": cell, "dims": dims, "budget": budget, "seed": seed, "profile": profile,
              "data": Path(data_spec(data).split(":", 1)[1]).name, "commit": _commit(),
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.time() - t0, 1), "resumed": resumed, "cpu": _cpu(), "threads": _threads(),
              "processes": processes}
    (folder / "cell.json").write_text(json.dumps(record, indent=1))
    print(f"{cell}: finished in {record['seconds']:.0f} s", flush=True)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _learned() -> list[str]:
    from diffreg.bench import bench_methods

    return [m for m in bench_methods("all")[0] if m != "syn"]


def _key(dims: Any, budget: Any, seed: Any) -> tuple[int, int | str, int | str]:
    """A cell's (dims, budget, seed) as read from a record or a CSV row (SyN: no budget, no seed)."""
    return (int(dims), "" if budget in ("", None) else int(budget), "" if seed in ("", None) else int(seed))


def _finished_cells(work: Path, recorded: Path | None) -> list[tuple[dict, Table]]:
    """``(record, per-pair rows of its bench)`` of every finished cell: those in ``work`` and, for the cells not
    there, those recorded in ``recorded`` (its ``cells.json`` and ``pairs.csv``, written by :func:`summarise`), so
    that cells run on other machines or in other work folders add up.

    Raises:
        SystemExit: a recorded cell without rows in ``pairs.csv``, or cells of another profile or data set than the
            recorded ones (they belong in another ``--out``).
    """
    cells: dict[tuple, tuple[dict, Table]] = {}
    if recorded is not None and (recorded / "cells.json").is_file():
        rows = read_csv(recorded / "pairs.csv")
        for record in json.loads((recorded / "cells.json").read_text()):
            key = _key(record["dims"], record["budget"], record["seed"])
            mine = Table({k: v for k, v in r.items() if k not in ("dims", "budget", "seed", "commit")}
                         for r in rows if _key(r["dims"], r["budget"], r["seed"]) == key)
            if not mine:
                raise SystemExit(f"{recorded / 'pairs.csv'} has no row of the recorded cell {record['cell']}")
            cells[key] = (record, mine)
    kinds = {(r.get("profile", "quick"), r.get("data")) for r, _ in cells.values()}
    for record_path in work.glob("*/cell.json"):
        record = json.loads(record_path.read_text())
        kind = (record.get("profile", "quick"), record.get("data"))
        if kinds and not any(kind[0] == k[0] and None in (kind[1], k[1]) or kind == k for k in kinds):
            raise SystemExit(f"{record_path}: a cell of profile {kind[0]!r} on {kind[1]!r}, but {recorded} records "
                             f"{sorted(kinds, key=str)}; summarise it into another --out")
        kinds.add(kind)
        cells[_key(record["dims"], record["budget"], record["seed"])] = (
            record, read_csv(record_path.parent / "bench" / "results.csv"))
    return [cells[k] for k in sorted(cells, key=lambda k: (k[0], k[1] == "", k[1] or 0, k[2] or 0))]   # SyN last


def collect(work: Path, recorded: Path | None = None) -> tuple[Table, Table, list[dict]]:
    """Every finished cell's per-pair rows (with dims, budget, seed, commit) and the per-(method, cell) means
    (the cells of ``work`` and those recorded in ``recorded``: :func:`_finished_cells`)."""
    pairs, means, cells = Table(), Table(), []
    for record, rows in _finished_cells(work, recorded):
        cells.append(record)
        for r in rows:
            pairs.append({"dims": record["dims"], "budget": record["budget"] or "", "seed": record["seed"]
                          if record["seed"] is not None else "", **r, "commit": record["commit"]})
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["method"] == method]
            row = {"method": method, "dims": record["dims"], "budget": record["budget"] or "",
                   "seed": record["seed"] if record["seed"] is not None else "", "pairs": len(sel)}
            for m in METRICS:
                vals = [float(r[m]) for r in sel if m in r and r[m] not in ("", None) and float(r[m]) == float(r[m])]
                row[m] = sum(vals) / len(vals) if vals else float("nan")
            row["commit"] = record["commit"]
            means.append(row)
    return pairs, means, cells


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a process reading ``path`` meanwhile sees the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def summarise(work: Path, out: Path) -> None:
    """Write ``results.csv``, ``pairs.csv``, ``cells.json``, ``summary.md`` and the figures from the finished cells
    of ``work`` and those already recorded in ``out`` (a cell in ``work`` replaces its recorded rows)."""
    pairs, means, cells = collect(work, recorded=out)
    if not cells:
        raise SystemExit(f"no finished cell in {work} or {out}")
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / "results.csv", means.to_csv)
    _replace(out / "pairs.csv", pairs.to_csv)
    _replace(out / "cells.json", lambda path: path.write_text(json.dumps(cells, indent=1) + "\n"))
    lines = ["# Does diffusion help? The ACDC study (recorded)", "",
             f"Metrics only; data {', '.join(sorted({c.get('data', '?') for c in cells}))}, profile "
             f"{', '.join(sorted({c.get('profile', 'quick') for c in cells}))}. Made by "
             "`benchmarks/acdc_study/run_study.py` (its docstring: data, split, sizes, what a cell is).", "",
             "## Cells finished", "",
             "`seconds`: wall time of the call that finished the cell (of its last part where it `resumed` from "
             "checkpoints of an interrupted call); `processes`: methods trained at a time, `threads` each.", "",
             "| cell | commit | finished | seconds | resumed | CPU | threads | processes |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        resumed = {True: "yes", False: "no"}.get(c.get("resumed"), "")
        lines.append(f"| {c['cell']} | {c['commit']} | {c['finished']} | {c['seconds']:.0f} | {resumed} | "
                     f"{c['cpu']} | {c['threads']} | {c.get('processes', 1)} |")
    groups = sorted({(r["dims"], r["budget"]) for r in means if r["budget"] != ""})
    for dims, budget in groups:
        rows = [r for r in pairs if r["dims"] == dims and r["budget"] == budget]
        seeds = sorted({r["seed"] for r in rows})
        summary = seed_summary([*rows, *[{**r, "seed": ""} for r in pairs if r["dims"] == dims
                                         and r["method"] == "syn"]], columns=METRICS)
        lines += ["", f"## {dims}D, {budget:,} training pairs, seeds {', '.join(map(str, seeds))}", "",
                  "Mean ± SD over seeds of the per-seed test means; `dice - VM` is the per-seed difference of mean "
                  "Dice against VoxelMorph (mean [min, max] over seeds) and `ahead` the seeds at which the method is "
                  "ahead of VoxelMorph.", "",
                  "| method | seeds | Dice | LV | Myo | RV | folding % | SD log J | HD95 | EF error | s / pair | "
                  "dice - VM | ahead |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summary:
            def ms(col, fmt="{:.3f}"):
                m, s = r.get(f"{col}_mean", float("nan")), r.get(f"{col}_sd", float("nan"))
                return fmt.format(m) + ("" if s != s else " ± " + fmt.format(s))
            diff = ("(reference)" if r["method"] == "voxelmorph" else
                    f"{r['dice_diff_mean']:+.3f} [{r['dice_diff_min']:+.3f}, {r['dice_diff_max']:+.3f}]")
            compared = len(seeds) if r["method"] == "syn" else r["seeds"]   # SyN (no seed) against every seed's VM
            ahead = "" if r["method"] == "voxelmorph" else f"{r['seeds_ahead']} of {compared}"
            lines.append(f"| {r['method']} | {r['seeds']} | {ms('dice')} | {ms('dice_lv')} | {ms('dice_myo')} | "
                         f"{ms('dice_rv')} | {ms('folding_percent')} | {ms('sdlogj')} | {ms('hd95', '{:.2f}')} | "
                         f"{ms('ef_error', '{:.1f}')} | {ms('seconds')} | {diff} | {ahead} |")
    _replace(out / "summary.md", lambda path: path.write_text("\n".join(lines) + "\n"))
    _figures(means, out)
    print(f"wrote {out}/summary.md ({len(cells)} cells)")


def _figures(means: Table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [r for r in means if r["budget"] != ""]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, dims in zip(axes, (2, 3)):
        rows = [r for r in learned if r["dims"] == dims]
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            budgets = sorted({r["budget"] for r in rows if r["method"] == method})
            vals = [[r["dice"] for r in rows if r["method"] == method and r["budget"] == b] for b in budgets]
            mean = [sum(v) / len(v) for v in vals]
            ax.plot(budgets, mean, "o-", color=f"C{i}", label=method)
            ax.fill_between(budgets, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.15)
        for r in means:
            if r["method"] == "syn" and r["dims"] == dims:
                ax.axhline(r["dice"], color="k", ls="--", lw=1, label="ANTs SyN")
        ax.set_xscale("log"), ax.set_title(f"{dims}D"), ax.set_xlabel("training pairs (log)"), ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Dice (band: min-max over seeds)")
    labelled = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.tight_layout()
    if labelled:   # beside the panels, where it hides no curve
        fig.legend(labelled.values(), labelled.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(out / "dice_vs_budget.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    # 2D against 3D: the gain over the initial alignment (the initial Dice differs between slices and stacks)
    groups = sorted({(r["dims"], r["budget"]) for r in learned})
    methods = list(dict.fromkeys(r["method"] for r in learned))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / max(1, len(groups))
    for j, (dims, budget) in enumerate(groups):
        for i, method in enumerate(methods):
            gains = [r["dice"] - r["dice_initial"] for r in learned
                     if r["method"] == method and r["dims"] == dims and r["budget"] == budget]
            if gains:
                mean = sum(gains) / len(gains)
                ax.bar(i + (j - (len(groups) - 1) / 2) * width, mean, width, color=f"C{j}",
                       yerr=[[mean - min(gains)], [max(gains) - mean]], capsize=2,
                       label=f"{dims}D, {budget:,} pairs" if i == 0 else None)
    ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
    ax.set_ylabel("Dice gain over initial\n(bar: mean, whisker: min-max over seeds)")
    ax.legend(fontsize=7), ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "dims.png", dpi=110)
    plt.close(fig)


def toy_nifti_check(work: Path, toy: Path, out: Path, device: str | None = None) -> Table:
    """Register the NIfTI pairs of ``toy`` (``PatientN/{fixed,moving}.nii.gz`` and ``_gt`` labels, with spacing)
    with every 3D run of the finished cells, through :func:`diffreg.apply.register_pairs` (what
    ``python -m diffreg register --pairs`` calls), and write ``toy_nifti.csv``.

    The pair is oriented by anatomy, as the cells: the frame with the smaller LV cavity (ES) is moved onto the other
    (ED), whatever the file names say. Outputs go to ``work/toy_nifti``; nothing is written next to the inputs.
    """
    import csv

    import nibabel as nib
    import numpy as np

    from diffreg.apply import register_pairs

    rows = []
    for patient in sorted(p for p in toy.iterdir() if p.is_dir()):
        lv = {n: int((np.asarray(nib.load(patient / f"{n}_gt.nii.gz").dataobj) == 3).sum())
              for n in ("fixed", "moving")}
        es, ed = sorted(lv, key=lv.get)
        rows.append({"name": patient.name, "moving": patient / f"{es}.nii.gz", "fixed": patient / f"{ed}.nii.gz",
                     "moving_label": patient / f"{es}_gt.nii.gz", "fixed_label": patient / f"{ed}_gt.nii.gz"})
    folder = work / "toy_nifti"
    folder.mkdir(parents=True, exist_ok=True)
    pairs_csv = folder / "pairs.csv"
    with open(pairs_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = Table()
    for record_path in sorted(work.glob("3d_*/cell.json")):
        record = json.loads(record_path.read_text())
        if record["budget"] is None:
            continue
        for run in sorted((record_path.parent / "runs").iterdir()):
            if not (run / "checkpoint.pt").is_file():
                continue
            opts = OPTIONS.get(run.name, {})
            results = register_pairs(run, pairs_csv, folder / record_path.parent.name / run.name, device=device,
                                     **opts)
            for r in results:
                table.append({"method": run.name, "dims": 3, "budget": record["budget"], "seed": record["seed"],
                              "pair": r["name"], "status": r["status"], "dice_initial": r.get("dice_initial"),
                              "dice": r.get("dice"), "folding_percent": r.get("folding_percent"),
                              "seconds": r.get("seconds"), "commit": record["commit"]})
    table.to_csv(out / "toy_nifti.csv")
    print(f"wrote {out}/toy_nifti.csv ({len(table)} rows)")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("ACDC_DEV"),
                    help="the acdc-dev folder (HDF5 layout), or a DIFFREG_DATA string such as acdc:PATH (NIfTI)")
    ap.add_argument("--profile", default="quick", choices=["quick", "paper"],
                    help="every method's profile (paper: the papers' networks; for a GPU)")
    ap.add_argument("--work", type=Path, required=True, help="runs and per-cell benchmarks (resumed)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "acdc_study")
    ap.add_argument("--cells", nargs="+", default=PLAN, help=f"cells to run, in order (default: {' '.join(PLAN)})")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when there is one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--processes", type=int, default=1,
                    help="on the CPU, train this many methods of a cell at a time, one thread each (e.g. the cores)")
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--toy-nifti", type=Path, default=None,
                    help="after the cells: register the NIfTI pairs of this folder (acdc-toy-nifti) with every 3D run")
    args = ap.parse_args()
    if not args.summarise_only:
        if not args.data:
            ap.error("--data is required (or ACDC_DEV)")
        import torch

        torch.set_num_threads(args.threads)
        for cell in args.cells:
            parse_cell(cell)
        for cell in args.cells:
            run_cell(cell, args.data, args.work, args.device, args.profile, args.processes)
            summarise(args.work, args.out)
    else:
        summarise(args.work, args.out)
    if args.toy_nifti is not None:
        toy_nifti_check(args.work, args.toy_nifti, args.out, args.device)


if __name__ == "__main__":
    main()
