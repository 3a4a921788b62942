"""Command line: ``python -m diffreg {phantom,train,evaluate,register,synthesize,speed,bench}``.

Examples::

    python -m diffreg phantom --layout acdc --out /tmp/acdc-phantom --patients 8
    python -m diffreg train --method voxelmorph --profile quick --data phantom --out runs/vm
    python -m diffreg train --method diffusereg --data acdc:/data/ACDC/training --split-scheme official --out runs/dr
    python -m diffreg evaluate --run runs/vm --data phantom --out runs/vm/test.csv
    python -m diffreg evaluate --run runs/dr --option sampler=ddim --option steps=20
    python -m diffreg evaluate --run runs/dr --option eta=1.0 --option samples=10
    python -m diffreg register --run runs/vm --moving es.nii.gz --fixed ed.nii.gz --out reg
    python -m diffreg speed --method voxelmorph --profile paper --dims 3 --steps 20 --out speed.csv
    python -m diffreg bench --methods all --profile quick --data phantom --runs runs --out bench

``--data`` takes the same strings as the ``DIFFREG_DATA`` environment variable: ``phantom``, ``phantom:echo``,
``acdc:PATH``, ``acdc-h5:PATH``, ``camus:PATH``. Without ``--device`` every command uses the GPU when CUDA is
available (the local rank's under ``torchrun``), else the CPU (:func:`diffreg.device.default_device`), and says which;
``--device cpu`` forces the CPU. Training is in float32 unless ``--amp`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _cmd_phantom(args: argparse.Namespace) -> int:
    from diffreg.data.phantom import write_phantom

    root = write_phantom(args.out, layout=args.layout, n_patients=args.patients, seed=args.seed,
                         first_id=args.first_id)
    print(f"wrote {args.patients} phantom patients in the {args.layout} layout to {root}")
    return 0


def _dataset(spec: str, split: str, cfg) -> object:
    from diffreg.data import open_configured

    return open_configured(spec, split, cfg.data, cfg.profile)  # "phantom": the profile's kind (echo for LDM-Morph)


def _device(args: argparse.Namespace):
    """``--device`` as a :class:`torch.device`, or :func:`diffreg.device.default_device` without it."""
    import torch

    from diffreg.device import default_device

    return torch.device(args.device) if args.device else default_device()


def _device_line(device) -> str:
    from diffreg.speed import device_name

    try:
        name = device_name(device)
    except Exception:  # e.g. a CUDA device named on a machine without one: fit reports that error itself
        name = "unavailable here"
    return f"device: {device} ({name})"


def _folder(path: str, flag: str) -> Path:
    """``path`` as a folder to write into: refused with a clear message when it names an existing file.

    Raises:
        ValueError: ``path`` exists and is not a folder.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is an existing file, not a folder: name a folder (it is created)")
    return p


def _apply_protocol(cfg, args: argparse.Namespace) -> None:
    """``--direction``, ``--view`` and ``--split-scheme`` into ``cfg.data`` (when given)."""
    for name in ("direction", "view", "split_scheme"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg.data, name, value)


def _protocol_text(data) -> str:
    """``"moving = ES, fixed = ED; split diffreg"`` (plus the CAMUS view) of a dataset."""
    direction = getattr(data, "direction", "")
    moving, _, fixed = direction.partition("->")
    text = f"moving = {moving.upper()}, fixed = {fixed.upper()}" if direction else ""
    if getattr(data, "view", None):
        text += f"; view {data.view}"
    if getattr(data, "split_scheme", None):
        text += f"; {data.split_scheme} split"
    return text


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from diffreg.config import get_config
    from diffreg.models import build
    from diffreg.device import distributed_info
    from diffreg.runs import RunFolder
    from diffreg.train import fit, set_stage_steps

    cfg = get_config(args.method, args.profile, args.dims)
    cfg.set_budget(steps=args.steps, lr=args.lr, batch_size=args.batch_size, size=args.size, amp=args.amp,
                   seed=args.seed)
    if args.stage_steps is not None and not set_stage_steps(cfg, args.stage_steps):
        print(f"note: {cfg.method} has no first stage; --stage-steps ignored")
    _apply_protocol(cfg, args)
    run = RunFolder(_folder(args.out, "--out"))
    out = run.path
    # a run directory of another method, profile, model or data is refused before anything is trained
    run.check(None if args.no_resume else cfg, None if args.no_resume else args.data)
    device = _device(args)
    rank = distributed_info()[0]
    torch.manual_seed(args.seed)
    data = _dataset(args.data, "train", cfg)
    model = build(cfg)
    if rank == 0:
        precision = f"{cfg.train.amp_dtype} autocast (--amp)" if cfg.train.amp and device.type == "cuda" else \
            "float32" + (" (--amp applies on CUDA only)" if cfg.train.amp else "")
        print(f"{cfg.method} ({cfg.profile}, {cfg.data.dims}D): {model.num_parameters():,} parameters; "
              f"{len(data)} training pairs from {args.data} ({_protocol_text(data)})")
        print(f"{_device_line(device)}; {precision}")
        run.write_data_spec(args.data, cfg.method)
    rows = fit(model, data, cfg, out=out, device=device, resume=not args.no_resume)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if not rows:
        print(f"nothing to do: the run in {out} is already complete (use --no-resume to start again)")
        return 0
    last = rows[-1]
    if rank == 0:
        print(f"done: step {int(last.get('step', 0))}, loss {last.get('total', float('nan')):.4f}, "
              f"{last.get('seconds', 0):.1f} s; run in {out}")
    return 0


def _options(pairs: list[str]) -> dict[str, object]:
    """``["steps=20", "sampler=ddim"]`` -> ``{"steps": 20, "sampler": "ddim"}`` (Python literals where they parse)."""
    import ast

    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option must be KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from diffreg.evaluate import evaluate, summarize
    from diffreg.train import load_run

    out = Path(args.out) if args.out else Path(args.run) / f"eval_{args.split}.csv"
    if out.is_dir():
        raise ValueError(f"--out {out} is an existing folder: name the CSV file to write (e.g. {out / 'test.csv'})")
    device = _device(args)
    model, cfg = load_run(args.run, device=device)
    print(_device_line(device))
    spec = args.data
    if spec is None:  # the data the run was trained on
        from diffreg.runs import RunFolder

        spec = RunFolder(args.run).data_spec() or "phantom"
        args.data = spec
    _apply_protocol(cfg, args)
    data = _dataset(spec, args.split, cfg)
    options = _options(args.option)
    table = evaluate(model, data, device=device, progress=True, limit=args.limit, **options)
    table.to_csv(out)
    s = summarize(table)
    cols = [c for c in ("dice_initial", "dice", "folding_percent", "jacobian_std", "hd95", "epe", "seconds",
                        "spread_mean", "spearman_spread_error") if c in s]  # the last two with --option samples=N
    print(f"{cfg.method} on {len(table)} {args.split} pairs of {args.data} ({_protocol_text(data)}):")
    print("  " + ", ".join(f"{c} {s[c][0]:.3f} ± {s[c][1]:.3f}" for c in cols))
    print(f"per-case table: {out}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    """Register image files (NIfTI / MetaImage) with a trained run; ITK-convention outputs (:mod:`diffreg.apply`)."""
    from diffreg.apply import open_run, register_files, register_pairs

    options = _options(args.option)
    single = args.moving is not None or args.fixed is not None
    if args.pairs is not None and single:
        raise ValueError("give either --pairs CSV or --moving and --fixed, not both")
    if args.pairs is None and (args.moving is None or args.fixed is None):
        raise ValueError("give --moving and --fixed (or --pairs CSV for many pairs)")
    if args.pairs is not None and (args.moving_label or args.fixed_label):
        raise ValueError("--moving-label / --fixed-label go with --moving / --fixed; with --pairs put them in the "
                         "CSV's moving_label and fixed_label columns")
    _folder(args.out, "--out")
    device = _device(args)
    print(_device_line(device))
    run = open_run(args.run, device=device)
    if args.pairs is not None:
        rows = register_pairs(run, args.pairs, args.out, progress=True, **options)
        failed = [r for r in rows if r["status"] != "ok"]
        print(f"registered {len(rows) - len(failed)} of {len(rows)} pairs; summary: {Path(args.out) / 'summary.csv'}")
        return 1 if failed else 0
    res = register_files(run, args.moving, args.fixed, out=args.out, moving_label=args.moving_label,
                         fixed_label=args.fixed_label, **options)
    m = res.metrics
    parts = [f"folding {m['folding_percent']:.3f} %", f"SD log J {m['sdlogj']:.3f}",
             f"max displacement {m['displacement_mm']['max']:.2f} mm", f"{m['seconds']:.2f} s"]
    if m.get("dice", {}).get("mean") is not None:
        before = m["dice_initial"].get("mean")
        parts.insert(0, f"Dice {before if before is not None else float('nan'):.3f} -> {m['dice']['mean']:.3f}")
    print(f"{m['method']}: " + ", ".join(parts))
    print("wrote " + ", ".join(str(p) for p in res.paths.values()))
    return 0


def _cmd_synthesize(args: argparse.Namespace) -> int:
    """DRDM data synthesis (Alg. 3): ``--copies`` deformed copies of every patient of a dataset, written in the layout
    it was read from with the labels and the fields used (:func:`diffreg.synthesize.synthesize_dataset`). Chapter
    09."""
    from diffreg.synthesize import synthesize_dataset

    device = _device(args)
    print(_device_line(device))
    res = synthesize_dataset(args.run, args.data, args.out, copies=args.copies, levels=args.levels,
                             views=args.views, seed=args.seed, device=device)
    print(f"wrote {res.written} {res.generator}-deformed {res.unit} ({res.copies} per source, "
          f"{res.level_symbol} in {res.levels}) to {res.out}")
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    """Training-step time, inference time per pair and peak memory of one method (:mod:`diffreg.speed`)."""
    from diffreg.speed import append_csv, format_row, measure_speed, table_header

    result = measure_speed(args.method, profile=args.profile, dims=args.dims, steps=args.steps, amp=args.amp,
                           device=args.device, batch_size=args.batch_size, sampler_steps=args.sampler_steps,
                           size=args.size, train=not args.no_train,
                           inference=not args.no_inference)
    print(table_header())
    print(format_row(result))
    if args.out:
        print(f"appended to {append_csv(result, args.out)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Every method (or the ones named) trained or reused from ``RUNS/<method>`` and evaluated on the same held-out
    pairs; results, summary and figures in ``--out`` (:mod:`diffreg.bench`)."""
    from diffreg.bench import run_bench

    _folder(args.out, "--out")
    _folder(args.runs, "--runs")
    device = _device(args)
    print(_device_line(device) + ("; bfloat16 autocast (--amp)" if args.amp else "; float32"))
    common = dict(profile=args.profile, data=args.data, dims=args.dims, limit=args.limit, device=device,
                  options=args.option, steps=args.steps, size=args.size, split=args.split, progress=True,
                  direction=args.direction, view=args.view, split_scheme=args.split_scheme, amp=args.amp,
                  stage_steps=args.stage_steps, budget=args.budget, curve_every=args.curve_every,
                  curve_pairs=args.curve_pairs, processes=args.processes)
    try:
        if args.seeds:
            from diffreg.bench import run_bench_seeds

            multi = run_bench_seeds(args.seeds, args.methods, runs=args.runs, out=args.out, **common)
            print(multi["summary"].to_markdown())
            print("wrote " + ", ".join(str(p) for p in multi["paths"].values()))
            return 0
        res = run_bench(args.methods, runs=args.runs, out=args.out, **common)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, reason in res["skipped"].items():
        print(f"skipped {name}: {reason}")
    for name, table in res["tables"].items():
        print(f"{name:16s} dice {table.mean('dice_initial'):.3f} -> {table.mean('dice'):.3f} "
              f"± {table.std('dice'):.3f}, folding {table.mean('folding_percent'):.3f} %, {table.mean('seconds'):.3f} s/pair")
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()))
    return 0


DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda when available, the local rank's GPU under torchrun; else cpu)"


def _protocol_arguments(parser: argparse.ArgumentParser, default: str = "default: the profile's") -> None:
    """``--direction``, ``--view`` and ``--split-scheme`` (the data protocol of :class:`diffreg.config.DataConfig`)."""
    parser.add_argument("--direction", choices=["es->ed", "ed->es"], default=None,
                        help=f"moving->fixed phases ({default}; the dataset's when the profile sets none)")
    parser.add_argument("--view", choices=["2CH", "4CH", "both"], default=None,
                        help=f"CAMUS view ({default}: 2CH)")
    parser.add_argument("--split-scheme", choices=["diffreg", "official"], default=None,
                        help=f"ACDC split ({default}: diffreg, 70/10/20 %% of the folder's patients; official: "
                             "train/val from the folder, test = the sibling testing/ folder)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m diffreg``."""
    from diffreg.config import methods
    from diffreg.models import is_generator

    generators = [m for m in methods() if is_generator(m)]  # they register no pairs: left out of "bench all"
    p = argparse.ArgumentParser(prog="python -m diffreg", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write phantom patients in a real on-disk layout")
    ph.add_argument("--layout", choices=["acdc", "acdc-h5", "camus"], default="acdc")
    ph.add_argument("--out", required=True, help="directory to write (created)")
    ph.add_argument("--patients", type=int, default=8)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--first-id", type=int, default=1,
                    help="number of the first patient (e.g. 101 for a testing/ folder like ACDC's)")
    ph.set_defaults(func=_cmd_phantom)

    tr = sub.add_parser("train", help="train a method on a dataset")
    tr.add_argument("--method", required=True, choices=methods())
    tr.add_argument("--profile", default="quick", choices=["quick", "paper"])
    tr.add_argument("--dims", type=int, choices=[2, 3], default=None)
    tr.add_argument("--data", default="phantom", help="phantom | acdc:PATH | acdc-h5:PATH | camus:PATH")
    tr.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    tr.add_argument("--steps", type=int, default=None, help="override the profile's number of steps")
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--size", type=int, nargs="+", default=None, help="override the spatial size")
    tr.add_argument("--stage-steps", type=int, default=None,
                    help="steps of the stages trained before the main loop (DiffuseReg's teacher, LDM-Morph's "
                         "autoencoder and latent U-Net); default: the profile's")
    _protocol_arguments(tr)
    tr.add_argument("--amp", action="store_true",
                    help="mixed precision on CUDA (the profile's amp_dtype, bfloat16); default float32 as the papers")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None, help=DEVICE_HELP)
    tr.add_argument("--no-resume", action="store_true", help="start again instead of resuming from --out")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained run on held-out pairs")
    ev.add_argument("--run", required=True)
    ev.add_argument("--data", default=None, help="default: the data the run was trained on (RUN/data.json)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ev.add_argument("--out", default=None, help="CSV path (default RUN/eval_SPLIT.csv)")
    ev.add_argument("--limit", type=int, default=None)
    _protocol_arguments(ev, "default: the run's")
    ev.add_argument("--device", default=None, help=DEVICE_HELP)
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword passed to model.register, e.g. --option steps=20 --option sampler=ddim; "
                         "--option samples=N (a stochastic model, e.g. with --option eta=1.0) draws N fields per pair "
                         "and adds their spread columns (spread_mean, spearman_spread_error, ...)")
    ev.set_defaults(func=_cmd_evaluate)

    rg = sub.add_parser("register", help="register your own NIfTI / MetaImage pairs with a trained run")
    rg.add_argument("--run", required=True, help="a run directory (python -m diffreg train --out RUN)")
    rg.add_argument("--moving", default=None, help="image to move (.nii, .nii.gz, .mhd, .mha)")
    rg.add_argument("--fixed", default=None, help="reference image; every output lies on its grid")
    rg.add_argument("--moving-label", default=None, help="label map of the moving image (warped, nearest)")
    rg.add_argument("--fixed-label", default=None, help="label map of the fixed image (Dice in metrics.json)")
    rg.add_argument("--pairs", default=None, metavar="CSV",
                    help="many pairs: columns moving, fixed[, moving_label, fixed_label, name]; paths relative to "
                         "the CSV; one folder per pair under --out and --out/summary.csv")
    rg.add_argument("--out", required=True, help="output folder (created; must not hold an input file)")
    rg.add_argument("--device", default=None, help=DEVICE_HELP)
    rg.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword passed to model.register, e.g. --option steps=20 --option sampler=ddim")
    rg.set_defaults(func=_cmd_register)

    sy = sub.add_parser("synthesize", help="write DRDM-deformed copies of a dataset (images, labels, fields)")
    sy.add_argument("--data", required=True, help="acdc:PATH | acdc-h5:PATH | camus:PATH (read only)")
    sy.add_argument("--run", required=True, help="a DRDM run directory (python -m diffreg train --method drdm)")
    sy.add_argument("--out", required=True, help="new folder for the deformed copies, in the input's layout")
    sy.add_argument("--copies", type=int, default=4, help="deformed copies per patient (or CAMUS view)")
    sy.add_argument("--levels", type=int, nargs="+", default=[30, 45], help="deformation levels T' (cycled)")
    sy.add_argument("--views", nargs="+", default=["2CH"], help="CAMUS views")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--device", default=None, help=DEVICE_HELP)
    sy.set_defaults(func=_cmd_synthesize)

    sp = sub.add_parser("speed", help="time training steps and inference, and measure peak memory")
    sp.add_argument("--method", required=True, choices=methods())
    sp.add_argument("--profile", default="paper", choices=["quick", "paper"])
    sp.add_argument("--dims", type=int, choices=[2, 3], default=None)
    sp.add_argument("--steps", type=int, default=5, help="timed training steps (after 1 CPU / 2 GPU warm-up steps)")
    sp.add_argument("--amp", action="store_true", help="mixed precision (CUDA only, the profile's amp_dtype)")
    sp.add_argument("--batch-size", type=int, default=None, help="default: the profile's")
    sp.add_argument("--size", type=int, nargs="+", default=None, help="override the spatial size")
    sp.add_argument("--sampler-steps", type=int, nargs="+", default=None,
                    help="DiffuseReg: DDIM step counts timed at inference; DRDM: deformation levels T'")
    sp.add_argument("--no-inference", action="store_true", help="time training steps only")
    sp.add_argument("--no-train", action="store_true", help="time inference only")
    sp.add_argument("--device", default=None, help=DEVICE_HELP)
    sp.add_argument("--out", default=None, help="CSV file the row is appended to")
    sp.set_defaults(func=_cmd_speed)

    be = sub.add_parser("bench", help="train or reuse every method and compare them on the same held-out pairs")
    be.add_argument("--methods", nargs="+", default=["all"], metavar="NAME",
                    help=f"all (every registration method but {', '.join(generators)}, plus syn) or names: "
                         f"{', '.join(m for m in methods() if m not in generators)}, syn")
    be.add_argument("--profile", default="quick", choices=["quick", "paper"])
    be.add_argument("--data", default="phantom", help="phantom | acdc:PATH | acdc-h5:PATH | camus:PATH")
    be.add_argument("--runs", required=True, help="folder of run directories RUNS/<method> (reused when finished)")
    be.add_argument("--out", required=True, help="folder for results.csv, summary.md and the figures")
    be.add_argument("--dims", type=int, choices=[2, 3], default=None)
    be.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out pairs")
    be.add_argument("--steps", type=int, default=None, help="training steps of every method (default: profile's)")
    be.add_argument("--budget", default=None, metavar="steps=N|seconds=S",
                    help="equal budget for every method: steps=N (N training pairs each, batch sizes normalised) "
                         "or seconds=S (S seconds of training each on the device); overrides --steps")
    be.add_argument("--curve-every", type=int, default=None, metavar="PAIRS",
                    help="learning curves: validation Dice every PAIRS training pairs (curves.csv, "
                         "learning_curves.png)")
    be.add_argument("--curve-pairs", type=int, default=4, help="validation pairs of the learning curves")
    be.add_argument("--processes", type=int, default=1,
                    help="on the CPU, train N methods at a time in worker processes, one thread each (the same "
                         "weights as one after the other on one thread; not with --budget seconds=S)")
    be.add_argument("--size", type=int, nargs="+", default=None, help="override the spatial size of the data")
    be.add_argument("--split", default="test", choices=["test", "val"])
    be.add_argument("--stage-steps", type=int, default=None,
                    help="steps of the stages trained before the main loop (DiffuseReg's teacher, LDM-Morph's "
                         "autoencoder and latent U-Net); default: the profile's")
    _protocol_arguments(be)
    be.add_argument("--amp", action="store_true", help="train with mixed precision on CUDA (default float32)")
    be.add_argument("--device", default=None, help=DEVICE_HELP)
    be.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                    help="train and evaluate every method once per seed (runs in RUNS/seed<S>, results in "
                         "OUT/seed<S>); OUT/results.csv carries a seed column and OUT/seeds.md the summary over seeds")
    be.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="keyword passed to one method's register, e.g. --option diffusereg:steps=50")
    be.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m diffreg`` and the ``diffreg`` script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
