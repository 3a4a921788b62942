"""3D convolutions at batch 1 on the CPU: the options, and each 3D quick profile's training step before and after.

PyTorch's CPU convolution runs ATen's native ``slow_conv3d`` instead of oneDNN for a batch of one sample whose
``channels x depth x height`` is at most 20,480 (``ConvParams::use_mkldnn``), which is the case for most layers of the
quick 3D profiles (16 x 64 x 64). This script measures, in one process and alternately:

1. one 3 x 3 x 3 convolution, forward and backward, at three layer shapes, for the options: as PyTorch runs it;
   ``channels_last_3d`` memory format (input and weight); the input layout permuted so that the two largest spatial
   axes come first (the weight permuted alike); the batch padded with a zero sample (what
   :func:`diffreg.device.cpu_conv3d_fast_path` does);
2. the training step of every 3D quick profile at batch 1 (:func:`diffreg.speed.measure_speed`, training only) with
   the fast path off (``DIFFREG_CPU_CONV3D_FAST=0``) and on, and the ratio.

Usage::

    python benchmarks/conv3d_fast_path.py --threads 1 --steps 3 --out benchmarks/conv3d_fast_path.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffreg.device import FAST_PATH_VARIABLE  # noqa: E402
from diffreg.speed import measure_speed  # noqa: E402

METHODS = ["voxelmorph", "voxelmorph-diff", "diffusemorph", "fsdiffreg", "diffusereg", "ldm-morph", "corrmlp",
           "flowreg"]
SHAPES = [(16, 16, 64, 64), (32, 8, 32, 32), (16, 32, 32, 32)]


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_options(repeats: int) -> list[dict]:
    """Seconds of one convolution's forward and backward per sample, for each option and layer shape."""
    rows = []
    for c, d, h, w in SHAPES:
        x = torch.randn(1, c, d, h, w)
        weight = torch.randn(c, c, 3, 3, 3)

        def run(inp, wt, batch=1):
            inp, wt = inp.clone().requires_grad_(), wt.clone().requires_grad_()
            F.conv3d(inp, wt, padding=1)[:batch].sum().backward()

        order = sorted(range(2, 5), key=lambda i: -x.shape[i])   # the two largest spatial axes first
        perm = (0, 1, *order)
        options = {
            "as PyTorch runs it": lambda: run(x, weight),
            "channels_last_3d": lambda: run(x.to(memory_format=torch.channels_last_3d),
                                            weight.to(memory_format=torch.channels_last_3d)),
            "axes permuted": lambda: run(x.permute(perm).contiguous(), weight.permute(perm).contiguous()),
            "batch padded to 2": lambda: run(torch.cat((x, torch.zeros_like(x))), weight),
        }
        row = {"layer (C, D, H, W)": f"{c}, {d}, {h}, {w}"}
        row.update({name: _median_time(fn, repeats) for name, fn in options.items()})
        rows.append(row)
    return rows


def profile_steps(methods: list[str], steps: int, profile: str = "quick") -> list[dict]:
    """Median s/step of each 3D ``profile`` (at its own size) at batch 1 with the fast path off and on
    (alternating)."""
    rows = []
    for method in methods:
        times = {}
        for label, flag in (("off", "0"), ("on", "1"), ("off2", "0"), ("on2", "1")):
            os.environ[FAST_PATH_VARIABLE] = flag
            r = measure_speed(method, profile=profile, dims=3, steps=steps, device="cpu", batch_size=1,
                              inference=False)
            times.setdefault(label.rstrip("2"), []).extend(r["train_times"])
        os.environ.pop(FAST_PATH_VARIABLE)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        rows.append({"method": method, "size": r["size"], "s/step before": off, "s/step after": on,
                     "speed-up": off / on})
        print(rows[-1], flush=True)
    return rows


def _table(rows: list[dict], fmt: str = "{:.4f}") -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(v) if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per measurement (two measurements)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per layer option")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--profile", default="quick", choices=["quick", "paper"],
                    help="the profiles whose training step is measured (paper: 32 x 128 x 128)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = layer_options(args.repeats)
    print(_table(layers), flush=True)
    steps = profile_steps(args.methods, args.steps, args.profile)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    text = "\n".join([
        "# 3D convolutions at batch 1 on the CPU",
        "",
        f"`python benchmarks/conv3d_fast_path.py --threads {args.threads} --steps {args.steps}"
        + (f" --profile {args.profile} --methods {' '.join(args.methods)}" if args.profile != "quick" else "")
        + "`, recorded "
        f"{datetime.date.today()} on {cpu} ({args.threads} thread), torch {torch.__version__}, commit {commit}.",
        "",
        "## One 3 x 3 x 3 convolution, forward and backward (seconds per sample, median)",
        "",
        _table(layers),
        "",
        f"## Training step of each 3D {args.profile} profile at batch 1 (median s/step, fast path off and on, "
        "alternating)",
        "",
        _table(steps, "{:.3f}"),
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
