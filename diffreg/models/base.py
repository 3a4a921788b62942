"""The interface every registration model in :mod:`diffreg.models` implements (the model interface, chapter 02).

* ``forward(moving, fixed) -> ddf``: the registration field, ``(B, ndim, *spatial)`` in voxels (pull convention:
  ``warped(p) = moving(p + ddf(p))``);
* ``loss(batch) -> dict[str, Tensor]`` with a ``"total"`` key and every paper term by name;
* ``register(moving, fixed, **options) -> RegistrationResult(ddf, warped, extras)``;
* optionally ``prepare(data, out, device, progress, seed)``: a stage run once before training.

The trainer (:mod:`diffreg.train`), the evaluator (:mod:`diffreg.evaluate`) and the benchmark only use this
interface. Explained in chapter 02 (``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffreg.spatial import warp

__all__ = ["RegistrationResult", "RegistrationModel", "check_pair"]


@dataclass
class RegistrationResult:
    """What :meth:`RegistrationModel.register` returns.

    Attributes:
        ddf: displacement field ``(B, ndim, *spatial)`` in voxels.
        warped: the moving image warped by ``ddf``, ``(B, C, *spatial)``.
        extras: method-specific outputs (velocity field, score latent, intermediate states, ...).
    """

    ddf: torch.Tensor
    warped: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


def check_pair(moving: torch.Tensor, fixed: torch.Tensor, dims: int) -> None:
    """Raise ``ValueError`` unless ``moving`` and ``fixed`` are ``(B, 1, *spatial)`` images of one shape with
    ``len(spatial) == dims``."""
    for name, x in (("moving", moving), ("fixed", fixed)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != dims + 2:
            raise ValueError(f"{name} must be (B, C, *spatial) with {dims} spatial dims, got shape {tuple(x.shape)}")
    if moving.shape[1] != 1:
        raise ValueError(f"moving and fixed must have one channel, got {moving.shape[1]} (shape {tuple(moving.shape)})")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape")


class RegistrationModel(nn.Module):
    """Base class: subclasses set ``self.dims`` and implement :meth:`forward` and :meth:`loss`."""

    dims: int = 2

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Training losses for a batch from a pair dataset; ``"total"`` is optimised."""
        raise NotImplementedError

    def prepare(self, data: Any, out: Path | None = None, device: torch.device | None = None,
                progress: bool = False, seed: int = 0) -> None:
        """Work done once before training (called by :func:`diffreg.train.fit` after seeding, before the optimizer
        is built): e.g. train a teacher network or a frozen first stage, or compute data statistics.

        Args:
            data: the training dataset.
            out: the run directory; products are cached there (e.g. ``out / "stage1.pt"``) so a resumed run reuses
                them. ``None``: cache nothing.
            device: the training device.
            progress: show progress bars.
            seed: the training run's seed (:class:`~diffreg.config.TrainConfig` ``seed``), for a stage that trains.

        Parameters frozen here are left out of the optimizer. The default does nothing.
        """

    @torch.no_grad()
    def register(self, moving: torch.Tensor, fixed: torch.Tensor, **options: Any) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (both ``(B, 1, *spatial)``); the default runs :meth:`forward`."""
        check_pair(moving, fixed, self.dims)
        ddf = self(moving, fixed, **options)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={})

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
