"""Every chapter's claims at several seeds and CPU kernel levels: ``claims.csv`` and ``summary.md``.

Each chapter checks what it states about learned results with :class:`diffreg.claims.Claims`. This script executes
the chapters (quick profile, phantom; through ``pytest`` and nbval, as CI does) once per seed and kernel level with
``DIFFREG_CLAIMS_MODE=record`` (a failing claim is recorded, not raised, so every later claim is measured too),
gathers the recorded claims into ``claims.csv`` (chapter, claim, seed, kernel, value, op, threshold, holds,
margin) and summarises each claim over the runs in ``summary.md`` (min / median / max of the value, the threshold,
the smallest margin and whether it holds in every run).

Kernel levels (environment of the chapter kernels):

* ``native``: what torch picks on this CPU (``AVX512`` on the machine the record was made on);
* ``avx2``: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2``, the kernels of a CPU with AVX2 but
  no AVX-512 (torch's own kernels, oneDNN's JIT and MKL's code path all limited to AVX2).

Usage (resumes: a (kernel, seed) run whose ``done`` file exists is not run again)::

    python benchmarks/claims/run_claims.py --seeds 0 1 2 3 4 --kernels native avx2 --jobs 2
    python benchmarks/claims/run_claims.py --tests --jobs 1      # the unit tests that assert learning, same grid
    python benchmarks/claims/run_claims.py --chapters 11_uncertainty --seeds 0 --tag=-ch11   # re-run one chapter
    python benchmarks/claims/run_claims.py --summarise-only      # re-read the runs, re-check today's thresholds

The summary re-reads each claim's threshold from the chapter's source where it is a number written in the
``claims.check`` call, so a threshold changed after the runs is checked against the recorded values.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}
#: The unit tests that assert a learning effect (they check it with the ``claims`` fixture of tests/conftest.py).
UNIT_TESTS = [
    "tests/models/test_voxelmorph.py::test_voxelmorph_learns_translations_on_held_out_pairs",
    "tests/models/test_fsdiffreg.py::test_starts_near_identity_and_learns_a_shift",
    "tests/models/test_drdm.py::test_training_reduces_the_recovery_loss",
]
#: A claim holds with margin when its worst run's margin is at least this fraction of the range its value covered.
MARGIN_RULE = 0.25
OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def chapters() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))


def run_one(kernel: str, seed: int, chosen: list, work: Path, timeout: float, tag: str = "") -> dict:
    """Execute the chosen chapters (or tests) once with ``DIFFREG_SEED=seed`` at ``kernel``; returns the record."""
    run = work / kernel / f"seed{seed}{tag}"
    done = run / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    base_runs = work / kernel / f"seed{seed}" / "runs"
    if tag and tag != "-unit" and base_runs.is_dir() and not (run / "runs").exists():
        # a re-run of some chapters starts from the training runs of the full run (same kernel and seed)
        shutil.copytree(base_runs, run / "runs")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env.update(KERNELS[kernel], DIFFREG_SEED=str(seed), DIFFREG_CLAIMS_MODE="record",
               DIFFREG_CLAIMS_DIR=str(run / "claims"), DIFFREG_RUNS=str(run / "runs"),
               DIFFREG_EXECUTED=str(run / "executed"), DIFFREG_PROFILE="quick", DIFFREG_DATA="phantom")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-rf", *map(str, chosen)]
    t0 = time.time()
    with open(run / "pytest.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = (run / "pytest.log").read_text(errors="replace")
    failed = sorted(set(re.findall(r"^FAILED (\S+)", text, flags=re.M)))
    record = {"kernel": kernel, "seed": seed, "target": "unit tests" if tag else "chapters", "rc": rc, "seconds": round(time.time() - t0, 1), "failed": failed,
              "chapters": [Path(str(p).split("::")[0]).stem for p in chosen]}
    done.write_text(json.dumps(record, indent=1))
    return record


def source_thresholds() -> list[tuple[str, re.Pattern, str, float | None]]:
    """What each chapter's source says of its claims today: ``(chapter, name pattern, op, threshold)`` per
    ``claims.check`` / ``claims.report`` call (an f-string name becomes a pattern; ``op`` is ``"report"`` for a
    report; the threshold is ``None`` where it is not a number written in the call)."""
    out = []
    for path in chapters():
        text = path.read_text()
        starts = [m.start() for m in re.finditer(r"claims\.(?:check|report)\(", text)] + [len(text)]
        for a, b in zip(starts, starts[1:]):
            call = text[a:b]
            m = re.match(r'claims\.(check|report)\(\s*(f?)"([^"]+)"', call)
            if not m:
                continue
            kind, is_f, name = m.groups()
            pattern = re.compile(re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(name)) if is_f else re.escape(name))
            if kind == "report":
                out.append((path.stem, pattern, "report", None))
                continue
            ops = re.findall(r'"(<=|>=|<|>)"\s*,\s*([-+]?[0-9][0-9_.eE+-]*)\s*[,)]', call)
            op_only = re.findall(r'"(<=|>=|<|>)"', call)
            thr = None
            if ops:
                try:
                    thr = float(ops[0][1].replace("_", ""))
                except ValueError:
                    thr = None
            out.append((path.stem, pattern, ops[0][0] if ops else (op_only[0] if op_only else ""), thr))
    return out


def _current(source, chapter: str, claim: str):
    """The op and threshold the chapter states today for ``claim``: a call naming it exactly wins over an f-string
    name that matches it."""
    exact = [(op, thr) for ch, pattern, op, thr in source if ch == chapter and pattern.pattern == re.escape(claim)]
    if exact:
        return exact[0]
    for ch, pattern, op, thr in source:
        if ch == chapter and pattern.fullmatch(claim):
            return op, thr
    return None


def gather(work: Path) -> list[dict]:
    rows = []
    current = source_thresholds()
    files = {}
    # a chapter's claims from the run that executed it last win (a tagged re-run replaces the full run's)
    for f in sorted(work.glob("*/seed*/claims/*.json"), key=lambda f: f.stat().st_mtime):
        run = f.parents[1].name
        base = run if run.endswith("-unit") else run.split("-")[0]
        files[(f.parents[2].name, base, f.stem)] = f
    for f in files.values():
        kernel = f.parents[2].name
        for r in json.loads(f.read_text()):
            now = _current(current, r["chapter"], r["claim"])
            in_source = not r["chapter"].startswith("test_")
            if in_source and now is None:   # the chapter no longer states it (replaced or dropped since the run)
                continue
            if r["op"] == "report" or (now is not None and now[0] == "report"):
                op, thr, holds, margin = "report", float("nan"), True, float("nan")
            else:
                op, thr = r["op"], r["threshold"]
                if now is not None and now[0] in OPS:
                    op = now[0]
                    thr = now[1] if now[1] is not None else thr
                holds = OPS[op](r["value"], thr) if r["value"] == r["value"] else False
                margin = r["value"] - thr if op in (">", ">=") else thr - r["value"]
            rows.append({"chapter": r["chapter"], "claim": r["claim"], "seed": r["seed"], "kernel": kernel,
                         "torch_kernel": r["kernel"], "value": r["value"], "op": op, "threshold": thr,
                         "holds": holds, "margin": margin, "note": r.get("note", "")})
    rows.sort(key=lambda r: (r["chapter"], r["claim"], r["kernel"], r["seed"]))
    return rows


def gather_bench(work: Path) -> list[dict]:
    """Chapter 10's per-pair benchmark rows of every run, with their seed and kernel level (``chapter10_results.csv``:
    the ranking over seeds that chapter 10 shows)."""
    rows = []
    for f in sorted(work.glob("*/seed*/runs/10_bench_*/results.csv")):
        if not f.parents[2].name.removeprefix("seed").isdigit():   # a re-run of other chapters: same runs copied
            continue
        kernel, seed = f.parents[3].name, int(f.parents[2].name.removeprefix("seed"))
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                rows.append({"kernel": kernel, "seed": seed, **r})
    return rows


def _what(run: dict) -> str:
    """What a run executed, from its folder name: the chapters, the unit tests or a re-run of some chapters."""
    folder = run.get("folder", "")
    if folder.endswith("-unit"):
        return "unit tests"
    if "-" in folder:   # a tagged run: a re-run of some chapters, or one part of a run split in parts
        return f"chapters {', '.join(run.get('chapters', []))} (tag {folder.split('-', 1)[1]})"
    return "chapters (all)"


def summarise(rows: list[dict], runs: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["chapter"], r["claim"]), []).append(r)
    chapter_runs = sorted({(r["kernel"], r["seed"]) for r in rows if not r["chapter"].startswith("test_")})
    test_runs = sorted({(r["kernel"], r["seed"]) for r in rows if r["chapter"].startswith("test_")})
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    lines = ["# Claims of every chapter over seeds and CPU kernel levels", "",
             "Made by `python benchmarks/claims/run_claims.py` (see its docstring): every chapter executed in the",
             "quick profile on the phantom, once per (kernel level, seed), with claims recorded and not raised.",
             f"Summarised {time.strftime('%Y-%m-%d')} at commit {sha} (thresholds as the chapters state them there) on "
             f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}.",
             f"Chapters: {len(chapter_runs)} runs ({', '.join(f'{k} seed {s}' for k, s in chapter_runs)}); a run "
             "may come in tagged parts, and a tagged re-run of a chapter replaces that chapter's claims in its run "
             "(chapters changed after their runs were re-run at seed 0; see the runs below).",
             f"Learning unit tests: {len(test_runs)} runs ({', '.join(f'{k} seed {s}' for k, s in test_runs)}).",
             "`margin` is the signed distance of the value to the threshold (positive: holds);",
             "`min margin` is the worst run's. The rule: a claim holds *with margin* when it holds in every run and",
             "the worst run's margin is at least a quarter of the range the value covered over the runs",
             f"(`margin/range` >= {MARGIN_RULE}), so the threshold lies outside the observed range, not at its edge.", "",
             "| chapter | claim | runs | min | median | max | must be | min margin | margin/range | with margin |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (ch, name), rs in groups.items():
        v = [r["value"] for r in rs]
        if rs[0]["op"] == "report":
            lines.append(f"| {ch} | {name} | {len(rs)} | {min(v):.4g} | {statistics.median(v):.4g} | {max(v):.4g} | "
                         "reported, not asserted | | | - |")
            continue
        worst = min(r["margin"] for r in rs)
        spread = max(v) - min(v)
        # the same value in every run (e.g. exactly no folds) and holding: nothing moves it, margin is not needed
        ratio = worst / spread if spread > 0 else (float("inf") if all(r["holds"] for r in rs) else float("-inf"))
        ok = all(r["holds"] for r in rs) and ratio >= MARGIN_RULE
        verdict = "yes" if ok else ("**no: fails in a run**" if not all(r["holds"] for r in rs) else "**no: at the edge**")
        lines.append(f"| {ch} | {name} | {len(rs)} | {min(v):.4g} | {statistics.median(v):.4g} | {max(v):.4g} | "
                     f"{rs[0]['op']} {rs[0]['threshold']:g} | {worst:.4g} | {ratio:.2f} | {verdict} |")
    lines += ["", "## Runs", "", "| what | kernel | seed | seconds | exit | failed cells (errors, not claims) |",
              "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (_what(r), r["kernel"], r["seed"])):
        lines.append(f"| {_what(r)} | {r['kernel']} | {r['seed']} | {r['seconds']} | {r['rc']} | "
                     f"{', '.join(r['failed']) or '-'} |")
    if any(r["failed"] for r in runs):
        lines += ["", "A failed cell is an error in a chapter, not a claim that failed (those are in the table above). "
                  "Cells after a failed one still run (nbval), so a run's later claims are recorded."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--kernels", nargs="+", default=["native", "avx2"], choices=sorted(KERNELS))
    ap.add_argument("--chapters", nargs="+", default=None, help="chapter stems (default: every chapter)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (each chapter kernel uses one thread; chapters 10 and "
                    "12 train in 2 worker processes of one thread)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/diffreg-claims"), help="runs, logs, executed notebooks")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--tests", action="store_true", help="run the unit tests that assert learning instead of chapters")
    ap.add_argument("--tag", default="", help="a re-run of --chapters in <kernel>/seed<s><tag>/, starting from the "
                    "full run's training runs; its claims replace that run's for those chapters")
    args = ap.parse_args(argv)
    chosen = [p for p in chapters() if args.chapters is None or p.stem in args.chapters]
    if not args.summarise_only:
        jobs = [(k, s) for s in args.seeds for k in args.kernels]
        targets, tag = (UNIT_TESTS, "-unit") if args.tests else (chosen, args.tag)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for rec in pool.map(lambda ks: run_one(ks[0], ks[1], targets, args.work, args.timeout, tag), jobs):
                print(f"{rec['kernel']} seed {rec['seed']}: exit {rec['rc']}, {rec['seconds']} s, failed {rec['failed']}",
                      flush=True)
    runs = [{**json.loads(f.read_text()), "folder": f.parent.name} for f in sorted(args.work.glob("*/seed*/done.json"))]
    runs = [r for r in runs if r.get("rc") != "skipped"]
    rows = gather(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "claims.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["chapter", "claim", "seed", "kernel", "torch_kernel", "value", "op",
                                          "threshold", "holds", "margin", "note"])
        w.writeheader()
        w.writerows(rows)
    (args.out / "summary.md").write_text(summarise(rows, runs))
    bench = gather_bench(args.work)
    if bench:
        keep = ["kernel", "seed", "method", "case", "dice_initial", "dice", "dice_lv", "dice_myo", "dice_rv",
                "folding_percent", "epe", "seconds"]
        with open(args.out / "chapter10_results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
            w.writeheader()
            w.writerows(bench)
    text = (args.out / "summary.md").read_text()
    weak = [line for line in text.splitlines() if "**no" in line]
    print(f"{len(rows)} claim values from {len(runs)} runs; claims without margin: {len(weak)}")
    for line in weak:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
