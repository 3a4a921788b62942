"""Which CPU settings change a training trajectory, and at what cost: ``kernels.md``.

One small training (the VoxelMorph unit test's: 16 shifted-blob pairs, one thread) is run in a fresh process per
setting of torch's kernel level (``ATEN_CPU_CAPABILITY``), oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA``) and MKL's
code path (``MKL_CBWR``), and the held-out error ratio it reaches and its seconds are recorded. Two training
settings: the unit test's old one (Adam 2e-3, 250 steps) and its current one (1e-3, 400 steps).

    python benchmarks/claims/kernels.py            # writes benchmarks/claims/kernels.md

A setting that gives the same figure on every CPU would let tests and the book reproduce bit for bit; the table
shows how far each knob alone moves the figure, which is what an assertion about a learned result must survive.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SETTINGS = {
    "native (torch's choice)": {},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2"},
    "all three at AVX2 (an AVX2-only CPU)": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                             "MKL_CBWR": "AVX2"},
    "default + SSE41 + COMPATIBLE (lowest common)": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                                     "MKL_CBWR": "COMPATIBLE"},
}
TRAINING = {"old (2e-3, 250 steps)": (2e-3, 250), "current (1e-3, 400 steps)": (1e-3, 400)}

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
from diffreg.models import VoxelMorph
from diffreg.spatial import warp
from tests.helpers import ShiftedBlobs
torch.set_num_threads(1)
lr, steps, seed = {lr}, {steps}, {seed}
torch.manual_seed(seed)
train, test = ShiftedBlobs(16, seed=0), ShiftedBlobs(6, seed=1)
model = VoxelMorph(dims=2, smooth_weight=0.1)
opt = torch.optim.Adam(model.parameters(), lr=lr)
t0 = time.perf_counter()
for step in range(steps):
    b = train[step % len(train)]
    loss = model.loss({{"moving": b["moving"][None], "fixed": b["fixed"][None]}})["total"]
    opt.zero_grad(); loss.backward(); opt.step()
sec = time.perf_counter() - t0
err = lambda f: sum(float((warp(b["moving"][None], f(b)) - b["fixed"][None]).abs().mean()) for b in test) / len(test)
before = err(lambda b: torch.zeros(1, 2, 32, 32))
after = err(lambda b: model(b["moving"][None], b["fixed"][None]).detach())
print(torch.backends.cpu.get_cpu_capability(), after / before, sec)
"""


def run(env: dict, lr: float, steps: int, seed: int = 0) -> tuple[str, float, float]:
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), lr=lr, steps=steps, seed=seed)],
                         env=full, capture_output=True, text=True, check=True).stdout.split()
    return out[0], float(out[1]), float(out[2])


def main() -> int:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = ["# One training trajectory under different CPU kernel settings", "",
             f"Made by `python benchmarks/claims/kernels.py` on {time.strftime('%Y-%m-%d')}, {cpu} "
             f"({os.cpu_count()} cores), torch {__import__('torch').__version__}, one thread, seed 0. Figure: the "
             "held-out error ratio (after / before) of the VoxelMorph unit test's training; seconds: its training "
             "loop (timed while another single-threaded job shared the machine, so read the ratios, not the "
             "absolute times).", "",
             "| setting | torch kernel | " + " | ".join(f"{t}: ratio | s" for t in TRAINING) + " |",
             "|---|---|" + "---|---|" * len(TRAINING)]
    for name, env in SETTINGS.items():
        cells, level = [], ""
        for lr, steps in TRAINING.values():
            level, ratio, sec = run(env, lr, steps)
            cells += [f"{ratio:.4f}", f"{sec:.1f}"]
        lines.append(f"| {name} | {level} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    (HERE / "kernels.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
