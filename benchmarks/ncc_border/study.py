"""Does the NCC's treatment of the image border change what VoxelMorph learns? Four definitions, several seeds.

An earlier record of chapter 10's investigation had VoxelMorph (quick, phantom, 600 training pairs) at 0.925 Dice
with the zero-padded local NCC the package used before and 0.875 with the padding-free one
(:func:`diffreg.losses.ncc_map`, windows clipped to the image); those two rows came from two invocations. Re-run in
one invocation at seeds 0-2 (``benchmarks/investigation``), the zero padding changes VoxelMorph's Dice by -0.006 on
average (per seed -0.023 to +0.008). The hypothesis this study tested: the clipped windows of the border band (as few as 25 pixels in a
corner for a 9 x 9 window) correlate background noise and inject large, uninformative gradients. This study trains
VoxelMorph (quick profile, phantom, one CPU thread) with each definition of the local NCC:

* ``padding-free``: :func:`diffreg.losses.ncc_map` (the package's);
* ``zero-padded``: MONAI's ``LocalNormalizedCrossCorrelationLoss`` (rectangular 9 x 9) on both images in [-1, 1];
* ``padding-free, border 0``: the padding-free map with the band of clipped windows (``window // 2`` pixels from the
  border) weighted 0, the rest rescaled so the loss keeps its scale;
* ``official one-sided``: the form of DiffuseMorph's and FSDiffReg's official ``crossCorrelation3D``: zero-padded,
  with only the fixed image mapped from [-1, 1] to [0, 1] and the warped moving image left in [-1, 1];

at every seed, evaluated on the phantom's held-out pairs after 600 and after 1,500 training pairs (one run per seed
and definition; the quick schedule is constant, so the checkpoint after 600 pairs is the 600-pair run). Recorded
per run: Dice, folding, the RMS gradient of the similarity with respect to the field in the border band and in the
interior (on training pairs, with the model after 600 pairs), and, per definition, how much the similarity of one
pair changes under an intensity offset and under the map [0, 1] -> [-1, 1] (a similarity must not change).

    python benchmarks/ncc_border/study.py --seeds 0 1 2 --out benchmarks/ncc_border

Resumes: a (definition, seed) row already in ``results.csv`` of the same commit is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
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
from diffreg.train import fit, seed_everything

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 9
_padding_free = losses.ncc_map


def _monai_lncc(a, b, window):
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=a.ndim - 2, kernel_size=int(window),
                                               kernel_type="rectangular", reduction="none")
    return -lncc(a.float(), b.float())


def zero_padded(a, b, window=WINDOW):
    return _monai_lncc(a, b, window)


def official_one_sided(a, b, window=WINDOW):
    # ncc_loss(warped, fixed): the official loss maps its target (the fixed image) from [-1, 1] to [0, 1] only
    return _monai_lncc(a, (b + 1) / 2, window)


def border_band(shape, window=WINDOW, device=None) -> torch.Tensor:
    """True on the pixels whose window is clipped by the border (within ``window // 2`` of an edge)."""
    r = int(window) // 2
    inner = torch.zeros(shape, dtype=torch.bool, device=device)
    inner[(...,) + tuple(slice(r, s - r) for s in shape[2:])] = True
    return ~inner


def border_zero(a, b, window=WINDOW):
    cc = _padding_free(a, b, window)
    band = border_band(cc.shape, window, cc.device)
    keep = (~band).float()
    return cc * keep * (keep.numel() / keep.sum())


DEFINITIONS = {"padding-free": _padding_free, "zero-padded": zero_padded, "padding-free, border 0": border_zero,
               "official one-sided": official_one_sided}


@contextlib.contextmanager
def ncc_definition(name: str):
    original = losses.ncc_map
    losses.ncc_map = DEFINITIONS[name]
    try:
        yield
    finally:
        losses.ncc_map = original


def gradient_split(model, data, n: int = 8) -> tuple[float, float]:
    """RMS gradient of the similarity term with respect to the predicted field, border band and interior."""
    border, interior = [], []
    for i in range(min(n, len(data))):
        b = data[i]
        m, f = b["moving"][None], b["fixed"][None]
        with torch.no_grad():
            ddf = model(m, f)
        ddf.requires_grad_(True)
        from diffreg.spatial import warp

        sim = losses.ncc_loss(warp(m, ddf), f, window=WINDOW)
        (g,) = torch.autograd.grad(sim, ddf)
        mag = g.pow(2).sum(1)
        band = border_band(mag.shape[:1] + (1,) + mag.shape[1:], WINDOW)[:, 0]
        border.append(mag[band].mean())
        interior.append(mag[~band].mean())
    return float(torch.stack(border).mean().sqrt()), float(torch.stack(interior).mean().sqrt())


def invariance(name: str, pair) -> tuple[float, float]:
    """|change| of the similarity of one pair under an intensity offset (+0.5) and under [0, 1] -> [-1, 1]."""
    a, b = pair["moving"][None], pair["fixed"][None]
    with torch.no_grad(), ncc_definition(name):
        base = float(losses.ncc(a, b, WINDOW))
        offset = float(losses.ncc(a + 0.5, b + 0.5, WINDOW))
        unit = float(losses.ncc((a + 1) / 2, (b + 1) / 2, WINDOW))
    return abs(offset - base), abs(unit - base)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=int, nargs=2, default=[600, 1500], help="training pairs: first, second")
    p.add_argument("--limit", type=int, default=8, help="held-out test pairs")
    p.add_argument("--definitions", nargs="+", default=list(DEFINITIONS), choices=list(DEFINITIONS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ncc_border")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    sha = commit()
    path = a.out / "results.csv"
    rows = [r for r in csv.DictReader(open(path))] if path.is_file() else []
    rows = [r for r in rows if r.get("commit") == sha]
    done = {(r["definition"], r["seed"], r["pairs"]) for r in rows}
    cfg0 = get_config("voxelmorph", "quick", 2)
    train = open_configured("phantom", "train", cfg0.data, "quick")
    test = open_configured("phantom", "test", cfg0.data, "quick")
    inv = {name: invariance(name, test[0]) for name in a.definitions}
    first, second = a.budgets
    for seed in a.seeds:
        for name in a.definitions:
            if (name, str(seed), str(second)) in done:
                continue
            cfg = get_config("voxelmorph", "quick", 2)
            cfg.train.seed = seed
            seed_everything(seed)
            model = build(cfg)
            t0 = time.perf_counter()
            grads = None
            for pairs in (first, second):
                cfg.train.steps = pairs   # batch 1: steps = pairs; fit resumes from the state reached so far
                with ncc_definition(name):
                    fit(model, train, cfg, out=a.out / "runs" / f"{name.replace(' ', '_').replace(',', '')}_s{seed}",
                        device="cpu", progress=False, resume=True)
                    if pairs == first:
                        grads = gradient_split(model.eval(), train)
                        model.train()
                table = evaluate(model.eval(), test, device="cpu", limit=a.limit)
                model.train()
                rows.append({"definition": name, "seed": seed, "pairs": pairs, "dice_initial": table.mean("dice_initial"),
                             "dice": table.mean("dice"), "folding_percent": table.mean("folding_percent"),
                             "grad_border_rms": grads[0], "grad_interior_rms": grads[1],
                             "grad_ratio": grads[0] / max(grads[1], 1e-30), "offset_change": inv[name][0],
                             "range_change": inv[name][1], "seconds": time.perf_counter() - t0, "commit": sha})
                print(f"{name:24s} seed {seed} pairs {pairs}: dice {rows[-1]['dice']:.3f}, grad border/interior "
                      f"{rows[-1]['grad_ratio']:.2f}", flush=True)
            Table(rows).to_csv(path)
    table = Table(rows)
    table.to_csv(path)
    lines = [f"# The NCC at the image border: VoxelMorph (quick, phantom) with four definitions", "",
             f"Recorded {datetime.date.today().isoformat()} on {platform.processor() or platform.machine()} (CPU, one "
             f"thread), torch {torch.__version__}, commit {sha}; seeds {', '.join(map(str, a.seeds))}; "
             f"{a.limit} held-out pairs.", "",
             f"Command: `python benchmarks/ncc_border/study.py --seeds {' '.join(map(str, a.seeds))}`", "",
             "| definition | pairs | Dice mean | Dice min | Dice max | folding % | grad border / interior | "
             "offset change | [0,1] vs [-1,1] change |", "|---|---|---|---|---|---|---|---|---|"]
    for name in a.definitions:
        for pairs in (first, second):
            rs = [r for r in table if r["definition"] == name and int(r["pairs"]) == pairs]
            if not rs:
                continue
            d = [float(r["dice"]) for r in rs]
            lines.append(f"| {name} | {pairs} | {sum(d) / len(d):.3f} | {min(d):.3f} | {max(d):.3f} | "
                         f"{sum(float(r['folding_percent']) for r in rs) / len(rs):.3f} | "
                         f"{sum(float(r['grad_ratio']) for r in rs) / len(rs):.2f} | {float(rs[0]['offset_change']):.2g} | "
                         f"{float(rs[0]['range_change']):.2g} |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
