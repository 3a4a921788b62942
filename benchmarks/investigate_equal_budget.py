"""Why do the diffusion methods trail VoxelMorph at an equal budget? One training run per candidate cause.

Every variant is trained for the same number of training pairs on the phantom's training split (quick profile,
one CPU thread) and evaluated on the first held-out pairs of its test split; the table says, per cause, how much
the held-out Dice moves. Chapter 10 shows the recorded result (``benchmarks/investigation/``).

Causes measured:

* the NCC border artefact: VoxelMorph and DiffuseMorph trained with the zero-padded local NCC that the package
  used before (MONAI's ``LocalNormalizedCrossCorrelationLoss`` on images in [-1, 1]) instead of
  :func:`diffreg.losses.ncc_map`'s windows clipped to the image;

* learning rate and Adam betas of DiffuseMorph (1e-3 with betas (0.5, 0.999) in ``quick``);
* the weight of the registration loss against the diffusion loss (DiffuseMorph's lambda, FSDiffReg's
  lambda_sim);
* what the diffusion branch adds: DiffuseMorph trained without its diffusion loss, FSDiffReg without FDG and SDG;
* DiffuseReg's teacher: the teacher's own Dice beside the student's, and the student of a teacher trained 3x longer.

Usage (about 15 minutes per seed on one CPU thread)::

    python benchmarks/investigate_equal_budget.py --pairs 600 --seeds 0 1 2 --out benchmarks/investigation

Every row records its seed and the commit it ran at; one invocation writes the whole table (rows of an earlier
invocation are never merged in, so a table never mixes runs of different code). The NCC question has its own study
at several seeds, ``benchmarks/ncc_border/study.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import subprocess
import time
from pathlib import Path

import torch

from diffreg import losses
from diffreg.config import get_config
from diffreg.data import open_configured
from diffreg.evaluate import Table, evaluate
from diffreg.models import build
from diffreg.models.diffusemorph import DiffuseMorph
from diffreg.train import fit, seed_everything


class DiffuseMorphWithoutDiffusion(DiffuseMorph):
    """DiffuseMorph trained on its registration loss only (the diffusion term of eq. 9 dropped): the diffusion
    network becomes a plain feature extractor trained through the deformation network."""

    def loss(self, batch):
        terms = super().loss(batch)
        terms["total"] = terms["total"] - terms["diffusion"]
        return terms


def zero_padded_ncc_map(a, b, window: int = 9):
    """The local NCC map with zero padding at the border (MONAI's LNCC, the package's definition before the
    padding-free one): on images in [-1, 1] every border window sees the padding as an edge in both images."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=a.ndim - 2, kernel_size=int(window),
                                               kernel_type="rectangular", reduction="none")
    return -lncc(a.float(), b.float())


@contextlib.contextmanager
def ncc_definition(padded: bool):
    """Swap :func:`diffreg.losses.ncc_map` for :func:`zero_padded_ncc_map` while training a variant."""
    original = losses.ncc_map
    if padded:
        losses.ncc_map = zero_padded_ncc_map
    try:
        yield
    finally:
        losses.ncc_map = original


#: (cause, variant name, method, model changes, train changes)
VARIANTS = [
    ("reference", "VoxelMorph", "voxelmorph", {}, {}),
    ("reference", "DiffuseMorph (quick: lr 1e-3, betas 0.5/0.999, lambda 20)", "diffusemorph", {}, {}),
    ("reference", "FSDiffReg (quick: lambda_sim 20)", "fsdiffreg", {}, {}),
    ("reference", "DiffuseReg (DDIM 20)", "diffusereg", {}, {}),
    ("learning rate", "DiffuseMorph lr 2e-3", "diffusemorph", {}, {"lr": 2e-3}),
    ("learning rate", "DiffuseMorph lr 5e-4", "diffusemorph", {}, {"lr": 5e-4}),
    ("Adam betas", "DiffuseMorph betas 0.9/0.999", "diffusemorph", {}, {"betas": (0.9, 0.999)}),
    ("loss weight", "DiffuseMorph lambda 5", "diffusemorph", {"lambda_reg": 5.0}, {}),
    ("loss weight", "DiffuseMorph lambda 80", "diffusemorph", {"lambda_reg": 80.0}, {}),
    ("loss weight", "FSDiffReg lambda_sim 80", "fsdiffreg", {"lambda_sim": 80.0}, {}),
    ("diffusion branch", "DiffuseMorph without the diffusion loss", "diffusemorph-nodiff", {}, {}),
    ("diffusion branch", "FSDiffReg without FDG and SDG", "fsdiffreg", {"fdg": False, "sdg": False}, {}),
    ("teacher", "DiffuseReg, teacher 3x longer", "diffusereg", {"teacher_steps": 3000}, {}),
    ("NCC border artefact", "VoxelMorph, zero-padded NCC", "voxelmorph", {}, {}),
    ("NCC border artefact", "DiffuseMorph, zero-padded NCC", "diffusemorph", {}, {}),
]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(pairs: int, out: Path, limit: int, only: list[str] | None, seeds: list[int] = (0,)) -> Table:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rows = Table()
    sha = _commit()
    for seed, (cause, name, method, model_changes, train_changes) in (
            (s, v) for s in seeds for v in VARIANTS):
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        base = "diffusemorph" if method == "diffusemorph-nodiff" else method
        cfg = get_config(base, "quick", 2)
        cfg.model.update(model_changes)
        for k, v in train_changes.items():
            setattr(cfg.train, k, v)
        cfg.train.steps, cfg.train.epochs = -(-pairs // cfg.train.batch_size), None
        cfg.train.seed = int(seed)
        train = open_configured("phantom", "train", cfg.data, "quick")
        test = open_configured("phantom", "test", cfg.data, "quick")
        seed_everything(cfg.train.seed)
        model = DiffuseMorphWithoutDiffusion(dims=2, **cfg.model) if method == "diffusemorph-nodiff" else build(cfg)
        t0 = time.perf_counter()
        with ncc_definition(padded="zero-padded" in name):
            fit(model, train, cfg, out=None, device="cpu", progress=False)
        seconds = time.perf_counter() - t0
        options = {"sampler": "ddim", "steps": 20} if base == "diffusereg" else {}
        table = evaluate(model, test, device="cpu", limit=limit, **options)
        row = {"cause": cause, "variant": name, "seed": int(seed), "commit": sha,
               "pairs": cfg.train.steps * cfg.train.batch_size,
               "dice_initial": table.mean("dice_initial"), "dice": table.mean("dice"),
               "dice_sd": table.std("dice"), "folding_percent": table.mean("folding_percent"),
               "train_seconds": seconds}
        if base == "diffusereg":  # the teacher it learned from, on the same pairs
            teacher = evaluate(model.teacher, test, device="cpu", limit=limit)
            row["teacher_dice"] = teacher.mean("dice")
        rows.append(row)
        print(f"{name:55s} dice {row['dice']:.3f} (initial {row['dice_initial']:.3f}) in {seconds:.0f} s",
              flush=True)
    rows.to_csv(out / "results.csv")
    header = (f"# Equal-budget investigation\n\n{pairs} training pairs per variant (quick profile, phantom, seeds "
              f"{', '.join(map(str, seeds))}, commit {sha}), "
              f"evaluated on the first {limit} held-out test pairs. Recorded {datetime.date.today().isoformat()} on "
              f"{platform.processor() or platform.machine()} (CPU, 1 thread), torch {torch.__version__}; "
              f"`train_seconds` is the training time of each variant.\n\nCommand: `python benchmarks/investigate_equal_budget.py "
              f"--pairs {pairs} --limit {limit} --seeds {' '.join(map(str, seeds))} --out {out}`\n\n")
    (out / "summary.md").write_text(header + rows.to_markdown() + "\n")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=600, help="training pairs per variant")
    p.add_argument("--limit", type=int, default=8, help="held-out test pairs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/investigation"))
    p.add_argument("--only", nargs="*", default=None, help="run only the variants whose name contains one of these "
                   "(the table then holds only those: write it to another --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; every variant runs at each")
    a = p.parse_args()
    run(a.pairs, a.out, a.limit, a.only, a.seeds)


if __name__ == "__main__":
    main()
