"""Check a GPU workstation end to end and write the report ``benchmarks/gpu_<date>.md`` (date and hardware).

    python benchmarks/gpu_check.py                      # on a machine with CUDA: about 8 minutes on one GPU
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/check   # the same steps on the CPU, tiny (about a minute)

Steps (each one reported, a failing one does not stop the others):

1. **unit tests on CUDA**: ``DIFFREG_TEST_DEVICE=cuda pytest`` on the tests of the trainer, the models and the
   numerics (``tests/conftest.py``: the ``device`` fixture, and every default device, is then the GPU);
2. **every method's paper profile** for a few hundred steps (and at most ``--run-seconds`` of training each) on
   phantoms written in the real on-disk layouts: 3D ACDC NIfTI for VoxelMorph, VoxelMorph-diff, DiffuseMorph,
   FSDiffReg and DiffuseReg, 2D CAMUS for LDM-Morph, 2D ACDC slices for DRDM. Per run: steps reached, s/step (median
   over the log rows after the first), samples/s, peak GPU memory (``torch.cuda.max_memory_allocated``), the loss
   first -> last and the held-out Dice initial -> registered (DRDM registers no pairs). The first stages trained by
   ``model.prepare`` (DiffuseReg's teacher, LDM-Morph's autoencoder and latent U-Net) get ``--stage-steps`` steps
   instead of the profile's tens of thousands;
3. **float32 against bfloat16 autocast** (``--amp``) for VoxelMorph and DiffuseReg: the same runs with mixed precision;
4. **kill and resume on CUDA** (``benchmarks/resume_check.py``): a run killed with ``SIGKILL`` after its first
   checkpoint and resumed, against the uninterrupted run, plus a run stopped and resumed in one process.

``--cpu-smoke`` (automatic without CUDA) runs the same steps on the CPU with the quick profiles at tiny sizes, 2-3
steps per run and one held-out pair, and names its report ``cpu-smoke_<date>.md``: it checks that the script works
(``tests/test_gpu_check.py`` runs it), not how fast anything is. The exit status is 0 when every step passed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffreg.config import get_config  # noqa: E402
from diffreg.data import open_configured, write_acdc, write_camus  # noqa: E402
from diffreg.evaluate import evaluate  # noqa: E402
from diffreg.models import DeformationGenerator, build  # noqa: E402
from diffreg.speed import device_name  # noqa: E402
from diffreg.train import fit, seed_everything, set_stage_steps  # noqa: E402

#: (method, data layout) in the order of the report: 3D ACDC for the ACDC papers, CAMUS for LDM-Morph, 2D ACDC
#: slices for DRDM
RUNS = (("voxelmorph", "acdc"), ("voxelmorph-diff", "acdc"), ("diffusemorph", "acdc"), ("fsdiffreg", "acdc"),
        ("diffusereg", "acdc"), ("ldm-morph", "camus"), ("drdm", "acdc-2d"))
#: methods also trained with bfloat16 autocast
AMP_METHODS = ("voxelmorph", "diffusereg")
#: register options of the held-out evaluation (the paper's DDPM over 2000 steps takes minutes per volume)
EVAL_OPTIONS = {"diffusereg": {"sampler": "ddim", "steps": 20}}
#: the unit tests run on CUDA (trainer, models, numerics); the CPU smoke runs two of them
GPU_TESTS = ("tests/test_device.py", "tests/test_train.py", "tests/models", "tests/test_spatial.py",
             "tests/test_losses.py", "tests/test_metrics.py", "tests/test_diffusion.py", "tests/test_evaluate.py")
SMOKE_TESTS = ("tests/test_device.py::test_default_device_is_the_gpu_when_cuda_is_available",
               "tests/test_train.py::test_resume_continues_identically")


@dataclass
class Settings:
    """How big the check is: the GPU check or the CPU smoke run."""

    device: torch.device
    profile: str
    steps: int
    run_seconds: float
    stage_steps: int
    patients: int
    eval_pairs: int
    tests: tuple[str, ...]
    tests_timeout: float
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # method -> size override (CPU smoke)
    dims: dict[str, int] = field(default_factory=dict)  # method -> dims override (CPU smoke)
    resume: dict[str, int] = field(default_factory=dict)

    @property
    def smoke(self) -> bool:
        return self.device.type != "cuda"


def settings_for(cpu_smoke: bool, steps: int | None, run_seconds: float | None) -> Settings:
    """The settings of the GPU check (``cpu_smoke=False``, needs CUDA) or of the CPU smoke run."""
    if not cpu_smoke:
        return Settings(torch.device("cuda"), "paper", steps or 300, run_seconds or 20.0, 50, 15, 3, GPU_TESTS,
                        300.0, resume=dict(steps=400, checkpoint_every=20, size=64))
    sizes = {m: (16, 32, 32) for m, layout in RUNS if layout == "acdc"}
    # DiffuseReg's Swin-UNETR needs 32 voxels per axis and more than one at its bottleneck: 2D at 64 x 64 is the
    # smallest that costs seconds on a CPU (3D at (32, 64, 64) takes half a minute per run)
    sizes.update({"diffusereg": (64, 64), "ldm-morph": (32, 32), "drdm": (32, 32)})
    return Settings(torch.device("cpu"), "quick", steps or 2, run_seconds or 30.0, 2, 5, 1, SMOKE_TESTS, 120.0,
                    sizes=sizes, dims={"diffusereg": 2}, resume=dict(steps=30, checkpoint_every=5, size=32))


# ----------------------------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------------------------


def run_unit_tests(s: Settings) -> dict[str, Any]:
    """``pytest`` on ``s.tests`` with ``DIFFREG_TEST_DEVICE`` set to the check's device; counts from its summary."""
    env = {**os.environ, "DIFFREG_TEST_DEVICE": s.device.type, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *s.tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=s.tests_timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", out.splitlines()[-1]
                                               if out.strip() else "")}
    failed = [ln.split(" - ")[0] for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"command": f"DIFFREG_TEST_DEVICE={s.device.type} " + " ".join(cmd[1:]), "rc": rc, "counts": counts,
            "failed": failed, "seconds": time.perf_counter() - t0, "ok": rc == 0}


def write_phantoms(root: Path, s: Settings) -> dict[str, str]:
    """Phantom patients in the real layouts: ACDC NIfTI (``ACDC/training``) and CAMUS; returns ``DIFFREG_DATA``
    strings per layout of :data:`RUNS`."""
    acdc = write_acdc(root / "ACDC" / "training", n_patients=s.patients, size=(10, 96, 96) if not s.smoke else
                      (6, 48, 48), n_frames=10 if not s.smoke else 4)
    camus = write_camus(root / "CAMUS", n_patients=s.patients, size=(128, 128) if not s.smoke else (48, 48),
                        n_frames=8 if not s.smoke else 4, half_sequence=False)
    return {"acdc": f"acdc:{acdc}", "acdc-2d": f"acdc:{acdc}", "camus": f"camus:{camus}"}


def _per_step(rows: list[dict[str, float]]) -> float:
    """Median seconds per step between log rows, skipping the first row (warm-up: cuDNN autotuning, allocations)."""
    pairs = list(zip(rows, rows[1:]))
    steps = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in pairs[1:] or pairs
             if b["step"] > a["step"]]
    if steps:
        return statistics.median(steps)
    return rows[-1]["seconds"] / max(rows[-1]["step"], 1) if rows else math.nan


def run_method(method: str, layout: str, spec: str, amp: bool, s: Settings) -> dict[str, Any]:
    """Train ``method`` at the check's profile on ``spec`` and evaluate it on held-out pairs; one report row."""
    dims = s.dims.get(method, 3 if layout == "acdc" else 2)
    row: dict[str, Any] = {"method": method, "data": f"{layout.replace('-2d', '')} {dims}D", "amp": amp}
    t0 = time.perf_counter()
    model = None
    try:
        cfg = get_config(method, s.profile, dims)
        if method in s.sizes:
            cfg.data.size = s.sizes[method]
        cfg.train.steps, cfg.train.epochs, cfg.train.amp = s.steps, None, amp
        cfg.train.log_every = 1 if s.smoke else 10
        cfg.train.checkpoint_every = 10**9
        stages = set_stage_steps(cfg, s.stage_steps)
        row["size"] = tuple(cfg.data.size)
        row["batch"] = cfg.train.batch_size
        row["notes"] = [f"first stages ({', '.join(stages)}) {s.stage_steps} steps"] if stages else []
        if amp and s.device.type != "cuda":
            row["notes"].append("mixed precision is CUDA only: this run is float32 too")
        train = open_configured(spec, "train", cfg.data, cfg.profile)
        test = open_configured(spec, "test", cfg.data, cfg.profile)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(s.device)
        seed_everything(0)
        model = build(cfg)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        rows = fit(model, train, cfg, out=None, device=s.device, progress=False, max_seconds=s.run_seconds)
        per_step = _per_step(rows)
        row.update(steps=int(rows[-1]["step"]), s_per_step=per_step, samples_per_s=cfg.train.batch_size / per_step,
                   loss_first=rows[0]["total"], loss_last=rows[-1]["total"],
                   peak_gib=torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None)
        if isinstance(model, DeformationGenerator):
            row["notes"].append(f"{type(model).__name__} registers no pairs (a generative model of deformations): "
                                "no Dice")
        else:
            opts = EVAL_OPTIONS.get(method, {})
            if opts:
                row["notes"].append("evaluated with " + ", ".join(f"{k}={v}" for k, v in opts.items()))
            table = evaluate(model, test, device=s.device, limit=s.eval_pairs, **opts)
            row.update(pairs=len(table), dice_initial=table.mean("dice_initial"), dice=table.mean("dice"),
                       folding=table.mean("folding_percent"))
        row["ok"] = math.isfinite(row["loss_last"])
    except Exception as exc:  # report it (an out-of-memory error is a result too) and go on with the next run
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                   trace=traceback.format_exc(limit=3))
    finally:
        del model
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_resume(s: Settings, workdir: Path) -> list[dict[str, Any]]:
    """Stop-and-resume and kill-and-resume on the check's device (``benchmarks/resume_check.py``)."""
    import resume_check

    out = []
    device = str(s.device)
    for fn, kwargs in ((resume_check.interrupt_and_resume, dict(steps=2 * s.resume["checkpoint_every"])),
                       (resume_check.kill_and_resume, dict(steps=s.resume["steps"],
                                                           checkpoint_every=s.resume["checkpoint_every"]))):
        t0 = time.perf_counter()
        try:
            r = fn(device, size=s.resume["size"], workdir=workdir, **kwargs)
            tol = 0.0 if s.device.type == "cpu" else 1e-3  # CUDA: grid_sample's backward accumulates atomically
            r["ok"] = r["max_abs_diff"] <= tol and r.get("killed", True)
        except Exception as exc:
            r = {"mode": fn.__name__.split("_")[0], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        r["wall_s"] = time.perf_counter() - t0
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def hardware(device: torch.device) -> list[str]:
    """Lines describing the machine: device, GPU memory and driver, CPU, torch / CUDA / Python versions."""
    lines = [f"device: {device} ({device_name(device)})"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU memory: {props.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} GPU(s) visible")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            lines += [f"nvidia-smi: {ln}" for ln in smi.splitlines()]
        except (OSError, subprocess.SubprocessError):
            pass
    lines.append(f"CPU: {device_name(torch.device('cpu'))}")
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, cuDNN "
                 f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}); "
                 f"Python {platform.python_version()}; {platform.platform()}")
    try:
        import monai

        lines[-1] += f"; MONAI {monai.__version__}"
    except ImportError:
        pass
    return lines


def _f(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def report(s: Settings, started: datetime.datetime, minutes: float, tests: dict[str, Any],
           runs: list[dict[str, Any]], resume: list[dict[str, Any]]) -> str:
    """The Markdown report."""
    title = "GPU check" if not s.smoke else "CPU smoke run of the GPU check (not GPU numbers)"
    lines = [f"# {title}, {started.date().isoformat()}", "",
             f"Written by `python benchmarks/gpu_check.py{' --cpu-smoke' if s.smoke else ''}` on "
             f"{started.isoformat(timespec='seconds')} ({minutes:.1f} min).", ""]
    lines += ["## Hardware", ""] + [f"* {ln}" for ln in hardware(s.device)] + [""]
    lines += ["## Unit tests", "", f"`{tests['command']}`: " + (", ".join(f"{v} {k}" for k, v in tests["counts"].items())
                                                                 or f"no summary (exit status {tests['rc']})")
              + f" in {tests['seconds']:.0f} s."]
    lines += [f"* {name}" for name in tests["failed"]] + [""]
    lines += ["## Training the profiles", "",
              f"Profile `{s.profile}`, at most {s.steps} steps and {s.run_seconds:.0f} s of training per run, float32 "
              "unless the AMP column says bf16; phantoms written in the real layouts (ACDC NIfTI, CAMUS), "
              f"{s.patients} patients each, split 70/10/20 % by patient; held-out Dice on at most {s.eval_pairs} test "
              "pair(s) (the dataset's aggregate Dice; s/step: median over the log rows after the first).", "",
              "| method | data | size | AMP | params | steps | s/step | samples/s | peak GPU GiB | loss first → last "
              "| held-out Dice initial → registered | folding % | wall s | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        notes = "; ".join(r.get("notes", []) + ([f"**failed**: {r['error']}"] if r.get("error") else []))
        dice = (f"{_f(r.get('dice_initial'))} → {_f(r.get('dice'))}" if "dice" in r else "—")
        size = " x ".join(str(v) for v in r.get("size", ()))
        lines.append(
            f"| {r['method']} | {r['data']} | {size} | {'bf16' if r['amp'] else 'off'} | "
            f"{_f(r.get('parameters'), ',')} | {r.get('steps', '—')} | {_f(r.get('s_per_step'), '.4f')} | "
            f"{_f(r.get('samples_per_s'), '.1f')} | {_f(r.get('peak_gib'), '.2f')} | "
            f"{_f(r.get('loss_first'), '.4f')} → {_f(r.get('loss_last'), '.4f')} | {dice} | "
            f"{_f(r.get('folding'), '.2f')} | {r['wall_s']:.0f} | {notes.replace('|', '/')} |")
    lines += ["", "## Resuming", ""]
    for r in resume:
        if "error" in r:
            lines.append(f"* {r['mode']}: **failed**: {r['error']}")
            continue
        how = (f"stopped at step {r['stopped_at']}" if r["mode"] == "interrupt" else
               f"killed with SIGKILL, resumed from step {r['resumed_from']}" if r["killed"] else
               "**finished before it could be killed** (nothing checked)")
        lines.append(f"* {r['mode']}: {how} of {r['steps']}; max |weights(straight) - weights(resumed)| = "
                     f"{r['max_abs_diff']:.3g} ({'ok' if r['ok'] else '**not ok**'}; {r['wall_s']:.0f} s)")
    ok = tests["ok"] and all(r.get("ok") for r in runs) and all(r.get("ok") for r in resume)
    lines += ["", f"**Result: {'every step passed' if ok else 'some steps failed (see above)'}.**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU (automatic without CUDA)")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder of the report (default: benchmarks/)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (GPU 300, CPU smoke 2)")
    p.add_argument("--run-seconds", type=float, default=None, help="training seconds per run at most (GPU 20)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the unit tests")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        print("no CUDA device: running the CPU smoke version (--cpu-smoke)")
    s = settings_for(smoke, args.steps, args.run_seconds)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is an existing file, not a folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print("\n".join(hardware(s.device)))

    tests = ({"command": "(skipped: --skip-tests)", "rc": 0, "counts": {}, "failed": [], "seconds": 0.0, "ok": True}
             if args.skip_tests else run_unit_tests(s))
    print(f"unit tests: {tests['counts'] or tests['rc']} in {tests['seconds']:.0f} s")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="diffreg-gpu-check-") as tmp:
        specs = write_phantoms(Path(tmp) / "data", s)
        for method, layout in RUNS:
            if args.methods and method not in args.methods:
                continue
            for amp in (False, True) if method in AMP_METHODS else (False,):
                r = run_method(method, layout, specs[layout], amp, s)
                runs.append(r)
                print(f"{method:16s} amp={'bf16' if amp else 'off'}: steps {r.get('steps', '-')}, "
                      f"{_f(r.get('s_per_step'), '.4f')} s/step, peak {_f(r.get('peak_gib'), '.2f')} GiB, "
                      f"Dice {_f(r.get('dice_initial'))} -> {_f(r.get('dice'))}"
                      + (f"  FAILED {r['error']}" if r.get("error") else ""), flush=True)
        resume = run_resume(s, Path(tmp))
    for r in resume:
        print(f"resume ({r['mode']}): max diff {r.get('max_abs_diff', '-')}, ok={r['ok']}")
    text = report(s, started, (time.perf_counter() - t0) / 60, tests, runs, resume)
    name = f"{'cpu-smoke' if s.smoke else 'gpu'}_{started.date().isoformat()}.md"
    (out / name).write_text(text)
    print(f"wrote {out / name}")
    ok = tests["ok"] and all(r.get("ok") for r in runs) and all(r.get("ok") for r in resume)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
