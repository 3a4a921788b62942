"""Check that an interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one,
on whatever device is present (the unit tests do this on the CPU; on CUDA, run this script or
``benchmarks/gpu_check.py``, which calls :func:`kill_and_resume`).

    python benchmarks/resume_check.py [--device cuda] [--amp] [--mode interrupt|kill|both]

Two ways of interrupting a run:

* ``interrupt``: :func:`diffreg.train.fit` stopped at a step (``max_steps``) in this process, then resumed;
* ``kill``: the run trains in a child process that is killed with ``SIGKILL`` as soon as its first checkpoint is on
  disk (whatever step it has reached by then), then resumed here. This is what a crash, an out-of-memory kill or a
  pre-empted job does; the checkpoint is written atomically, so the resumed run starts from a complete one.

On the CPU the resumed weights equal the uninterrupted ones exactly. On CUDA, ``grid_sample``'s backward accumulates
with atomic additions, so the two may differ by rounding; the script reports the largest difference.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from diffreg.config import MethodConfig, TrainConfig, get_config  # noqa: E402
from diffreg.data import open_dataset  # noqa: E402
from diffreg.models import build  # noqa: E402
from diffreg.train import fit, load_checkpoint  # noqa: E402


def _setup(device: str, amp: bool, steps: int, checkpoint_every: int, size: int) -> tuple[MethodConfig, object]:
    """The run both sides train: quick VoxelMorph on 2D phantom pairs, and its training data."""
    if device.startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    cfg = get_config("voxelmorph", "quick", 2)
    cfg.data.size = (size, size)
    cfg.train = TrainConfig(steps=steps, lr=1e-3, log_every=10, checkpoint_every=checkpoint_every, amp=amp, seed=1)
    data = open_dataset("phantom", split="train", n_subjects=8, size=size)
    return cfg, data


def _train(cfg: MethodConfig, data, out: Path, device: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(cfg)
    fit(model, data, cfg, out=out, device=device, progress=False, **kwargs)
    return model


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.state_dict().values(),
                                                                           b.state_dict().values()))


def interrupt_and_resume(device: str, amp: bool = False, steps: int = 40, size: int = 64,
                         workdir: str | Path | None = None) -> dict:
    """Train ``steps`` steps straight, and stopped at half (``max_steps``) then resumed by a fresh model.

    Returns:
        ``{"mode": "interrupt", "stopped_at": step, "steps": steps, "max_abs_diff": float}``.
    """
    cfg, data = _setup(device, amp, steps, max(1, steps // 2), size)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        a = _train(cfg, data, Path(tmp) / "a", device)
        _train(cfg, data, Path(tmp) / "b", device, max_steps=steps // 2)
        c = _train(cfg, data, Path(tmp) / "b", device, seed=123)  # fresh weights: they must come from the checkpoint
    return {"mode": "interrupt", "stopped_at": steps // 2, "steps": steps, "max_abs_diff": _max_difference(a, c)}


def kill_and_resume(device: str, amp: bool = False, steps: int = 400, checkpoint_every: int = 20, size: int = 64,
                    workdir: str | Path | None = None, timeout: float = 300.0) -> dict:
    """Train ``steps`` steps straight here; train the same run in a child process, kill it (``SIGKILL``) once its
    first checkpoint exists, resume it here with a fresh model, and compare the final weights.

    Returns:
        ``{"mode": "kill", "killed": bool, "resumed_from": step of the checkpoint left by the killed process,
        "steps": steps, "max_abs_diff": float}``; ``killed`` is False when the child finished before it could be
        killed (then ``resumed_from == steps`` and the check says nothing about resuming).

    Raises:
        RuntimeError: the child failed, or wrote no checkpoint within ``timeout`` seconds.
    """
    cfg, data = _setup(device, amp, steps, checkpoint_every, size)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / "killed"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--device", device, "--steps",
               str(steps), "--checkpoint-every", str(checkpoint_every), "--size", str(size)] + (["--amp"] if amp else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        ckpt, start, killed = out / "checkpoint.pt", time.monotonic(), False
        while True:
            if ckpt.is_file():
                if child.poll() is None:
                    child.send_signal(signal.SIGKILL)
                    killed = True
                break
            if child.poll() is not None:
                break
            if time.monotonic() - start > timeout:
                child.kill()
                raise RuntimeError(f"the child run wrote no checkpoint within {timeout:.0f} s")
            time.sleep(0.005)
        output = child.communicate()[0]
        if not killed and child.returncode != 0:
            raise RuntimeError(f"the child run failed (exit status {child.returncode}):\n{output[-3000:]}")
        resumed_from = int(load_checkpoint(ckpt)["step"])
        straight = _train(cfg, data, Path(tmp) / "straight", device)
        resumed = _train(cfg, data, out, device, seed=123)
    return {"mode": "kill", "killed": killed, "resumed_from": resumed_from, "steps": steps,
            "max_abs_diff": _max_difference(straight, resumed)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--mode", choices=["interrupt", "kill", "both"], default="both")
    p.add_argument("--steps", type=int, default=None, help="default: 40 (interrupt), 400 (kill)")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # the process kill_and_resume kills
    args = p.parse_args(argv)
    if args.child:
        cfg, data = _setup(args.device, args.amp, args.steps, args.checkpoint_every, args.size)
        _train(cfg, data, Path(args.child), args.device)
        return
    results = []
    if args.mode in ("interrupt", "both"):
        results.append(interrupt_and_resume(args.device, args.amp, steps=args.steps or 40, size=args.size))
    if args.mode in ("kill", "both"):
        results.append(kill_and_resume(args.device, args.amp, steps=args.steps or 400,
                                       checkpoint_every=args.checkpoint_every, size=args.size))
    for r in results:
        where = f"stopped at step {r['stopped_at']}" if r["mode"] == "interrupt" else (
            f"killed, resumed from step {r['resumed_from']}" if r["killed"] else "finished before it could be killed")
        print(f"device={args.device} amp={args.amp} {r['mode']}: {where} of {r['steps']}; "
              f"max |weights(straight) - weights(resumed)| = {r['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
