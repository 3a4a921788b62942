"""Where things run: the device rule and the ``torchrun`` environment.

The bottom floor of the package's execution side: it imports nothing of :mod:`diffreg`, and every module that
chooses a device itself (:mod:`diffreg.train`, :mod:`diffreg.evaluate`, :mod:`diffreg.bench`, :mod:`diffreg.speed`,
:mod:`diffreg.apply`, the command line) asks :func:`default_device`. Explained in chapter 02
(``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

import os

import torch

__all__ = ["default_device", "distributed_info", "resolve_device"]


def distributed_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment (``(0, 0, 1)`` when not distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def default_device() -> torch.device:
    """The device used wherever none is named (:func:`diffreg.train.fit`, :func:`diffreg.evaluate.evaluate`,
    :func:`diffreg.bench.run_bench`, :func:`diffreg.speed.measure_speed`, every ``python -m diffreg`` command).

    Returns:
        ``cuda:LOCAL_RANK`` under ``torchrun`` (``WORLD_SIZE > 1``) when CUDA is available, ``cuda`` (the current
        GPU) when CUDA is available otherwise, else ``cpu``. Pass ``device="cpu"`` (``--device cpu``) to force the
        CPU on a machine with a GPU.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    _, local_rank, world = distributed_info()
    return torch.device("cuda", local_rank) if world > 1 else torch.device("cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device`, or :func:`default_device` when it is ``None``."""
    import diffreg.device as rule   # looked up at call time, so a test can replace the rule

    return torch.device(device) if device is not None else rule.default_device()
