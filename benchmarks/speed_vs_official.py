"""One training step of diffreg's models against the official code, side by side in one process, on the CPU.

For each model the official network and loss and diffreg's are built at the paper configuration (the official
widths; a smaller 3D volume than ACDC's 32 x 128 x 128 so that a CPU step takes seconds), the same batch is fed to
both, and a training step (forward, loss, backward, optimiser step, and what the official loop does besides:
gradient clipping, the EMA teacher) is timed alternately, ours then theirs, ``--steps`` times after two warm-up
steps each. The ratio is diffreg's median over the official median: above 1.0, diffreg is slower, and the script
prints a profile of both steps (the operators that take the time).

The official code is not part of this project: give the path of a checkout that you provide. Nothing of it is
copied or committed; it is imported from that path at run time (a missing ``huggingface_hub`` is stubbed, it is only
used for the hub mix-in). Its networks make no CUDA calls at construction or in forward, so nothing needs patching
on the CPU.

Usage::

    git clone https://github.com/mathpluscode/FlowReg /path/to/FlowReg   # commit 286411e was timed
    python benchmarks/speed_vs_official.py --flowreg /path/to/FlowReg --out benchmarks/speed_vs_official.md

Models: CorrMLP and FlowReg (``mathpluscode/FlowReg``, which re-implements CorrMLP). DiffuseReg and LDM-Morph are
not timed yet (see ``benchmarks/speed_vs_official.md``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffreg.config import get_config  # noqa: E402
from diffreg.models import build  # noqa: E402
from diffreg.train import make_optimizer, train_step  # noqa: E402


def official_modules(path: Path) -> dict[str, types.ModuleType]:
    """The official ``corrmlp.networks``, ``flowreg.networks`` and ``utils.losses`` imported from ``path``."""
    if "huggingface_hub" not in sys.modules:
        try:
            importlib.import_module("huggingface_hub")
        except ImportError:   # only the hub mix-in class is used
            hub = types.ModuleType("huggingface_hub")
            hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
            sys.modules["huggingface_hub"] = hub
    sys.path.insert(0, str(path))
    try:
        return {name: importlib.import_module(name)
                for name in ("corrmlp.networks", "flowreg.networks", "utils.losses")}
    finally:
        sys.path.remove(str(path))


def _official_corrmlp_step(mods, size, steps_budget):
    net = mods["corrmlp.networks"].CorrMLP(1, 8, 16, use_checkpoint=False)
    ncc, grad = mods["utils.losses"].NCC(win=9), mods["utils.losses"].Grad("l2")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step(fixed, moving):
        warped, flow = net(fixed, moving)
        loss = ncc.loss(fixed, warped) + grad.loss(None, flow) * 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()

    return net, step


def _official_flowreg_step(mods, size, steps_budget):
    nets = mods["flowreg.networks"]
    net = nets.FlowReg(1, 8, 16, 64, use_checkpoint=False)
    teacher = copy.deepcopy(net).requires_grad_(False).eval()
    stn = nets.SpatialTransformer(mode="bilinear")
    ncc, grad = mods["utils.losses"].NCC(win=9), mods["utils.losses"].Grad("l2")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    sp = (3.15, 1.5, 1.5)
    scale = torch.tensor([min(sp) / s for s in sp]).view(1, 3, 1, 1, 1)

    def step(fixed, moving):   # one reflow step of flowreg/train.py (the phase of 98 of the 100 epochs)
        b = fixed.shape[0]
        noise = torch.randn(b, 3, *fixed.shape[2:]) * scale * 5
        with torch.no_grad():
            target = teacher(fixed, moving, noise, torch.zeros(b))
        t = torch.sigmoid(torch.randn(b))
        te = t[:, None, None, None, None]
        pred = net(fixed, moving, (te * target + (1 - te) * noise).detach(), t)
        warped = stn(moving, pred)
        loss = ncc.loss(fixed, warped) + grad.loss(None, pred) * 1.0
        F.mse_loss(pred - noise, (target - noise).detach())   # computed and logged, not optimised
        ncc.loss(stn(fixed, pred), warped)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        opt.step()
        with torch.no_grad():
            for tp, sp_ in zip(teacher.parameters(), net.parameters()):
                tp.mul_(0.99).add_(sp_, alpha=0.01)

    return net, step


def _diffreg_step(method, size):
    cfg = get_config(method, "paper")
    cfg.data.size = tuple(size)
    model = build(cfg)
    if method == "flowreg":
        model.warmup_done.fill_(True)   # time the reflow step
    model.train()
    opt = make_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(fixed, moving):
        train_step(model.loss, {"moving": moving, "fixed": fixed}, opt, scaler, cfg.train.grad_clip,
                   model.parameters())

    return model, step


OFFICIAL = {"corrmlp": _official_corrmlp_step, "flowreg": _official_flowreg_step}


def time_pair(method, mods, size, steps, batch):
    torch.manual_seed(0)
    fixed, moving = torch.rand(batch, 1, *size), torch.rand(batch, 1, *size)
    ours_model, ours = _diffreg_step(method, size)
    theirs_model, theirs = OFFICIAL[method](mods, size, steps)
    times = {"diffreg": [], "official": []}
    for i in range(steps + 2):
        for name, fn in (("diffreg", ours), ("official", theirs)):
            t0 = time.perf_counter()
            fn(fixed, moving)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    params = (sum(p.numel() for p in ours_model.net.parameters()),
              sum(p.numel() for p in theirs_model.parameters()))
    return times, params, (ours, theirs, fixed, moving)


def profile(fn, fixed, moving, rows=8) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(fixed, moving)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flowreg", type=Path, required=True, help="a checkout of mathpluscode/FlowReg")
    ap.add_argument("--size", type=int, nargs=3, default=[16, 64, 64], help="volume size (D H W), divisible by 8")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mods = official_modules(a.flowreg.resolve())
    try:
        commit = subprocess.run(["git", "-C", str(a.flowreg), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    rows, profiles = [], []
    for method in ("corrmlp", "flowreg"):
        times, (p_ours, p_theirs), (ours, theirs, fixed, moving) = time_pair(method, mods, a.size, a.steps, a.batch)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["diffreg"] / med["official"]
        rows.append(f"| {method} | {p_ours:,} | {p_theirs:,} | {med['diffreg']:.3f} | {med['official']:.3f} | "
                    f"{ratio:.2f} |")
        print(rows[-1], flush=True)
        if ratio > 1.0:
            profiles.append(f"### {method}: diffreg\n\n```\n{profile(ours, fixed, moving)}\n```\n\n"
                            f"### {method}: official\n\n```\n{profile(theirs, fixed, moving)}\n```\n")
    cpu = platform.processor() or platform.machine()
    text = (f"# One training step against the official code\n\n"
            f"`python benchmarks/speed_vs_official.py --flowreg PATH --size {' '.join(map(str, a.size))} "
            f"--steps {a.steps} --batch {a.batch} --threads {a.threads}` with `mathpluscode/FlowReg` at commit "
            f"{commit}; recorded {datetime.date.today().isoformat()} on {cpu} ({a.threads} thread), torch "
            f"{torch.__version__}. Paper widths, a {tuple(a.size)} volume at batch {a.batch}; the median of "
            f"{a.steps} steps of each, alternating; ratio = diffreg / official (above 1: diffreg is slower).\n\n"
            "| model | parameters (diffreg) | parameters (official) | diffreg s/step | official s/step | ratio |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if profiles:
        text += "\n## Profiles of the steps where diffreg is slower\n\n" + "\n".join(profiles)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
