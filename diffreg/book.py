"""What every chapter of the book sets up first: :func:`chapter_setup`.

A chapter reads its settings from the environment, so the same notebook runs on a laptop (``quick`` profile,
built-in phantom) and on a GPU workstation (``paper`` profile, real data):

* ``DIFFREG_PROFILE``: ``"quick"`` (CPU, minutes; default) or ``"paper"`` (each paper's architecture and budget);
* ``DIFFREG_DATA``: ``"phantom"`` (default; built in), ``"acdc:PATH"``, ``"acdc-h5:PATH"``, ``"camus:PATH"``;
* ``DIFFREG_RUNS``: where trained runs are kept (default ``<tmp>/diffreg-runs``; a chapter reuses finished runs);
* ``DIFFREG_SEED``: the seed of every training run, data order and noise (default 0; :func:`diffreg.claims.chapter_seed`).

Explained in the book's introduction (``book/intro.md``) and used by every chapter in ``notebooks/``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from diffreg.claims import Claims, chapter_seed
from diffreg.device import default_device

__all__ = ["Chapter", "chapter_setup"]


@dataclass(frozen=True)
class Chapter:
    """The settings of one chapter run.

    Attributes:
        name: the chapter's stem (``"02_voxelmorph"``).
        profile: ``DIFFREG_PROFILE``.
        data: ``DIFFREG_DATA`` (or the chapter's default).
        runs: ``DIFFREG_RUNS``, the folder of trained runs.
        seed: ``DIFFREG_SEED``.
        device: :func:`diffreg.device.default_device` (the GPU when CUDA is available, else the CPU).
        claims: the chapter's :class:`~diffreg.claims.Claims` (every learned result it asserts).
        processes: the worker processes in which a chapter may train several runs side by side
            (:func:`diffreg.train.map_in_workers`, one thread each): 2, or 1 where this process may use one core.
    """

    name: str
    profile: str
    data: str
    runs: Path
    seed: int
    device: torch.device
    claims: Claims
    processes: int = 2

    def describe(self, data: bool = True) -> str:
        """``"profile=quick, data=phantom, device=cpu, runs in /tmp/diffreg-runs"`` (``data=False`` leaves the data
        out, for a chapter that always uses the phantom)."""
        parts = [f"profile={self.profile}"] + ([f"data={self.data}"] if data else [])
        return ", ".join(parts + [f"device={self.device}"]) + f", runs in {self.runs}"


def chapter_setup(name: str, default_data: str = "phantom", threads: int | None = 1, style: bool = True) -> Chapter:
    """Read a chapter's settings from the environment and prepare the session the same way in every chapter.

    Args:
        name: the chapter's stem, e.g. ``"02_voxelmorph"`` (names its claims).
        default_data: the data without ``DIFFREG_DATA``.
        threads: ``torch.set_num_threads`` (1: the book's small models run fastest on one thread, and a busy CPU is
            never oversubscribed; ``None``: leave torch's choice).
        style: apply the book's figure style (:func:`diffreg.viz.set_style`).

    Returns:
        The :class:`Chapter`.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    if style:
        from diffreg import viz

        viz.set_style()
    seed = chapter_seed()
    return Chapter(
        name=name,
        profile=os.environ.get("DIFFREG_PROFILE", "quick"),
        data=os.environ.get("DIFFREG_DATA", default_data),
        runs=Path(os.environ.get("DIFFREG_RUNS", Path(tempfile.gettempdir()) / "diffreg-runs")),
        seed=seed,
        device=default_device(),
        claims=Claims(name, seed),
        processes=min(2, _cores()),
    )


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1
