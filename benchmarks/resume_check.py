"""Check that an interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one,
on whatever device is present (the unit test does this on the CPU; on CUDA, run this script).

    python benchmarks/resume_check.py [--device cuda] [--amp]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffreg.config import TrainConfig, get_config
from diffreg.data import open_dataset
from diffreg.models import build
from diffreg.train import fit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    cfg = get_config("voxelmorph", "quick", 2)
    cfg.train = TrainConfig(steps=40, lr=1e-3, log_every=10, checkpoint_every=20, amp=args.amp, seed=1)
    data = open_dataset("phantom", split="train", n_subjects=8)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        a = build(cfg)
        fit(a, data, cfg, out=Path(tmp) / "a", device=args.device, progress=False)
        torch.manual_seed(0)
        b = build(cfg)
        fit(b, data, cfg, out=Path(tmp) / "b", device=args.device, progress=False, max_steps=20)
        torch.manual_seed(123)
        c = build(cfg)  # a fresh model: the weights must come from the checkpoint
        fit(c, data, cfg, out=Path(tmp) / "b", device=args.device, progress=False)
    diff = max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    print(f"device={args.device} amp={args.amp}: max |weights(straight) - weights(resumed)| = {diff:.3g}")


if __name__ == "__main__":
    main()
