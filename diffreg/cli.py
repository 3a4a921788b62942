"""Command line: ``python -m diffreg {phantom,train,evaluate}``.

Examples::

    python -m diffreg phantom --layout acdc --out /tmp/acdc-phantom --patients 8
    python -m diffreg train --method voxelmorph --profile quick --data phantom --out runs/vm
    python -m diffreg evaluate --run runs/vm --data phantom --out runs/vm/test.csv
    python -m diffreg evaluate --run runs/dr --option sampler=ddim --option steps=20

``--data`` takes the same strings as the ``DIFFREG_DATA`` environment variable: ``phantom``, ``phantom:echo``,
``acdc:PATH``, ``acdc-h5:PATH``, ``camus:PATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _cmd_phantom(args: argparse.Namespace) -> int:
    from diffreg.data.phantom import write_phantom

    root = write_phantom(args.out, layout=args.layout, n_patients=args.patients, seed=args.seed)
    print(f"wrote {args.patients} phantom patients in the {args.layout} layout to {root}")
    return 0


def _dataset(spec: str, split: str, cfg) -> object:
    from diffreg.data import open_dataset

    extra = {"n_subjects": cfg.data.n_subjects} if spec.strip().lower().startswith("phantom") else {}
    return open_dataset(spec, split=split, dims=cfg.data.dims, profile=cfg.profile, size=cfg.data.size, **extra)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from diffreg.config import get_config
    from diffreg.models import build
    from diffreg.train import fit

    cfg = get_config(args.method, args.profile, args.dims)
    if args.steps is not None:
        cfg.train.steps, cfg.train.epochs = args.steps, None
    if args.lr is not None:
        cfg.train.lr = args.lr
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    if args.size is not None:
        cfg.data.size = tuple(args.size)
    cfg.train.seed = args.seed
    torch.manual_seed(args.seed)
    data = _dataset(args.data, "train", cfg)
    model = build(cfg)
    print(f"{cfg.method} ({cfg.profile}, {cfg.data.dims}D): {model.num_parameters():,} parameters; "
          f"{len(data)} training pairs from {args.data}")
    rows = fit(model, data, cfg, out=args.out, device=args.device, resume=not args.no_resume)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if not rows:
        print(f"nothing to do: the run in {args.out} is already complete (use --no-resume to start again)")
        return 0
    last = rows[-1]
    (Path(args.out) / "data.json").write_text(json.dumps({"data": args.data, "method": cfg.method}))
    print(f"done: step {int(last.get('step', 0))}, loss {last.get('total', float('nan')):.4f}, "
          f"{last.get('seconds', 0):.1f} s; run in {args.out}")
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

    model, cfg = load_run(args.run, device=args.device or "cpu")
    spec = args.data
    if spec is None:  # the data the run was trained on
        info = Path(args.run) / "data.json"
        spec = json.loads(info.read_text())["data"] if info.is_file() else "phantom"
        args.data = spec
    data = _dataset(spec, args.split, cfg)
    options = _options(args.option)
    table = evaluate(model, data, progress=True, limit=args.limit, **options)
    out = Path(args.out) if args.out else Path(args.run) / f"eval_{args.split}.csv"
    table.to_csv(out)
    s = summarize(table)
    cols = [c for c in ("dice_initial", "dice", "folding_percent", "jacobian_std", "hd95", "epe", "seconds") if c in s]
    print(f"{cfg.method} on {len(table)} {args.split} pairs of {args.data}:")
    print("  " + ", ".join(f"{c} {s[c][0]:.3f} ± {s[c][1]:.3f}" for c in cols))
    print(f"per-case table: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m diffreg``."""
    from diffreg.config import methods

    p = argparse.ArgumentParser(prog="python -m diffreg", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write phantom patients in a real on-disk layout")
    ph.add_argument("--layout", choices=["acdc", "acdc-h5", "camus"], default="acdc")
    ph.add_argument("--out", required=True, help="directory to write (created)")
    ph.add_argument("--patients", type=int, default=8)
    ph.add_argument("--seed", type=int, default=0)
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
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu, or cuda under torchrun)")
    tr.add_argument("--no-resume", action="store_true")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained run on held-out pairs")
    ev.add_argument("--run", required=True)
    ev.add_argument("--data", default=None, help="default: the data the run was trained on (RUN/data.json)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ev.add_argument("--out", default=None, help="CSV path (default RUN/eval_SPLIT.csv)")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword passed to model.register, e.g. --option steps=20 --option sampler=ddim")
    ev.set_defaults(func=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m diffreg`` and the ``diffreg`` script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
