"""Training throughput and peak memory of a method at a profile, on whatever device is present.

    python benchmarks/train_throughput.py --method voxelmorph --profile paper --dims 3 --steps 300 [--amp]

Trains on the phantom (3D short-axis stacks at the profile's size) through :func:`diffreg.train.fit`, then prints one
table row: device, AMP, median seconds per step after warm-up, samples per second, peak GPU memory, and the loss at the
first and last log row (so a GPU run also shows the training is healthy), plus held-out Dice before/after.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffreg.config import get_config
from diffreg.data import open_dataset
from diffreg.evaluate import evaluate
from diffreg.models import build
from diffreg.train import fit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="voxelmorph")
    p.add_argument("--profile", default="paper")
    p.add_argument("--dims", type=int, default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    cfg = get_config(args.method, args.profile, args.dims)
    cfg.train.steps, cfg.train.epochs, cfg.train.amp = args.steps, None, args.amp
    cfg.train.log_every, cfg.train.checkpoint_every = 10, 10**9
    if args.lr:
        cfg.train.lr = args.lr
    t0 = time.perf_counter()
    train = open_dataset("phantom", split="train", dims=cfg.data.dims, profile=args.profile, size=cfg.data.size,
                         n_subjects=args.subjects, frames="all")
    test = open_dataset("phantom", split="test", dims=cfg.data.dims, profile=args.profile, size=cfg.data.size,
                        n_subjects=args.subjects)
    print(f"data: {len(train)} train / {len(test)} test pairs of {tuple(train[0]['moving'].shape)} "
          f"in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(0)
    model = build(cfg).to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, train, cfg, out=tmp, device=args.device, progress=False)
        rows = list(csv.DictReader(open(Path(tmp) / "log.csv")))
    secs = [float(r["seconds"]) for r in rows]
    per_step = [(b - a) / 10 for a, b in zip(secs[1:], secs[2:])]  # skip the first 10 steps (warm-up)
    med = statistics.median(per_step)
    mem = max(float(r.get("gpu_mem_gb", 0) or 0) for r in rows)
    table = evaluate(model, test)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print("| method | profile | dims | size | device | amp | s/step | samples/s | peak GPU GiB | loss first -> last |"
          " Dice initial -> registered (test) | folding % |")
    print(f"| {args.method} | {args.profile} | {cfg.data.dims} | {tuple(cfg.data.size)} | {name} | {args.amp} | "
          f"{med:.4f} | {cfg.train.batch_size / med:.1f} | {mem:.2f} | {float(rows[0]['total']):.4f} -> "
          f"{float(rows[-1]['total']):.4f} | {table.mean('dice_initial'):.3f} -> {table.mean('dice'):.3f} | "
          f"{table.mean('folding_percent'):.3f} |")


if __name__ == "__main__":
    main()
