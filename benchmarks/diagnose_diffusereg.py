"""Why DiffuseReg's samples fold, and what its Dice is bounded by: one quick-profile training per variant.

For each variant (what the network predicts and how eq. 4 is weighted, the training length, the width) this
trains DiffuseReg on the phantom's training split and records, on the first held-out test pairs:

* the sampler table: Dice and folding % of DDIM with 5, 10, 20 and 50 steps and of DDPM over all T steps;
* the teacher's Dice on the same pairs (the field the denoiser learns to sample);
* the denoiser's error per timestep (:func:`diffreg.diagnostics.denoiser_error_per_timestep`): noise MSE,
  the error of the field estimate against the teacher (voxels) beside the trivial estimate, and the roughness of
  the estimate against the teacher's.

Chapter 06 shows the recorded result (``benchmarks/diffusereg_diagnosis/``). Usage (about 40 minutes on one CPU
thread; finished runs in ``--runs`` are reused)::

    python benchmarks/diagnose_diffusereg.py --runs /tmp/diffusereg-runs --out benchmarks/diffusereg_diagnosis
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from diffreg.config import get_config
from diffreg.data import open_configured
from diffreg.evaluate import Table, evaluate
from diffreg.models import build
from diffreg.diagnostics import denoiser_error_per_timestep
from diffreg.train import fit, seed_everything

#: (variant, model changes, training steps)
VARIANTS = [
    ("v-prediction, eq. 4 / abar (before)", {"parameterization": "v", "diffusion_weighting": "v"}, 1000),
    ("eps-prediction, eq. 4 as written (paper)", {"parameterization": "eps", "diffusion_weighting": "none"}, 1000),
    ("x0-prediction, x0 MSE (quick)", {"parameterization": "x0", "diffusion_weighting": "x0"}, 1000),
    ("x0-prediction, 3x longer", {"parameterization": "x0", "diffusion_weighting": "x0"}, 3000),
    ("x0-prediction, 2x wider", {"parameterization": "x0", "diffusion_weighting": "x0", "feature_size": 16}, 1000),
]


def run(out: Path, runs: Path, limit: int, only: list[str] | None) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    samplers, errors = Table(), Table()
    for name, changes, steps in VARIANTS:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        cfg = get_config("diffusereg", "quick", 2)
        cfg.model.update(changes)
        cfg.train.steps = steps
        train = open_configured("phantom", "train", cfg.data, "quick")
        test = open_configured("phantom", "test", cfg.data, "quick")
        seed_everything(cfg.train.seed)
        model = build(cfg)
        tag = "_".join(f"{k}-{v}" for k, v in changes.items()) + f"_{steps}"
        t0 = time.perf_counter()
        fit(model, train, cfg, out=runs / tag, device="cpu", progress=False)
        seconds = time.perf_counter() - t0
        teacher = evaluate(model.teacher, test, device="cpu", limit=limit).mean("dice")
        for sampler, n in (("ddim", 5), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddpm", None)):
            table = evaluate(model, test, device="cpu", limit=limit, sampler=sampler, steps=n)
            samplers.append({"variant": name, "steps_trained": steps, "sampler": sampler,
                             "sampler_steps": n or cfg.model["timesteps"], "dice": table.mean("dice"),
                             "folding_percent": table.mean("folding_percent"), "teacher_dice": teacher,
                             "dice_initial": table.mean("dice_initial"), "train_seconds": seconds})
        items = [test[i] for i in range(min(limit, len(test)))]
        moving = torch.stack([it["moving"] for it in items])
        fixed = torch.stack([it["fixed"] for it in items])
        for row in denoiser_error_per_timestep(model.eval(), moving, fixed):
            errors.append({"variant": name, **row})
        last = samplers[-1]
        print(f"{name:45s} teacher {teacher:.3f}, DDPM dice {last['dice']:.3f} fold {last['folding_percent']:.2f} "
              f"({seconds:.0f} s)", flush=True)
    samplers.to_csv(out / "samplers.csv")
    errors.to_csv(out / "errors.csv")
    (out / "README.md").write_text(
        f"# DiffuseReg diagnosis\n\nRecorded {datetime.date.today().isoformat()} on "
        f"{platform.processor() or platform.machine()} (CPU, 1 thread), torch {torch.__version__}; quick profile, "
        f"phantom, seed 0, the first {limit} held-out test pairs.\n\nCommand: `python benchmarks/diagnose_diffusereg.py "
        f"--runs RUNS --out {out}`\n\n`samplers.csv`: Dice and folding per variant and sampler; `errors.csv`: the "
        "denoiser's error per timestep (diffreg.diagnostics.denoiser_error_per_timestep).\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="folder for the training runs (reused when finished)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/diffusereg_diagnosis"))
    p.add_argument("--limit", type=int, default=8, help="held-out test pairs")
    p.add_argument("--only", nargs="*", default=None, help="run only the variants whose name contains one of these")
    a = p.parse_args()
    run(a.out, a.runs, a.limit, a.only)


if __name__ == "__main__":
    main()
