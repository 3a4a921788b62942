"""The interfaces the models of :mod:`diffreg.models` implement (DESIGN.md section 6).

Every model (:class:`BaseModel`, what the trainer :mod:`diffreg.train` uses):

* ``loss(batch) -> dict[str, Tensor]`` with a ``"total"`` key and every paper term by name;
* optionally ``prepare(data, out, device, progress, seed)``: a stage run once before training.

A **registration model** (:class:`RegistrationModel`; explained in chapter 02, ``notebooks/02_voxelmorph.md``)
registers pairs:

* ``forward(moving, fixed) -> ddf``: the registration field, ``(B, ndim, *spatial)`` in voxels (pull convention:
  ``warped(p) = moving(p + ddf(p))``);
* ``register(moving, fixed, **options) -> RegistrationResult(ddf, warped, extras)``.

The evaluator (:mod:`diffreg.evaluate`), the benchmark and :mod:`diffreg.apply` only use this interface.

A **deformation generator** (:class:`DeformationGenerator`; DRDM, explained in chapter 08,
``notebooks/08_drdm.md``) registers no pairs: it draws a random, plausible deformation of one image,

* ``deform(image, level, generator) -> (ddf, deformed)`` with ``level`` in ``0 ... max_level`` (the size of the
  deformation), and ``deform_labels(labels, ddf)``.

Its uses are downstream (data synthesis, :mod:`diffreg.synthesize`; chapter 09). The evaluator, the benchmark and
:mod:`diffreg.apply` refuse generators; ask :func:`diffreg.models.is_generator` (by method name, without building
the model) or ``isinstance(model, DeformationGenerator)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffreg.spatial import warp

__all__ = ["RegistrationResult", "BaseModel", "RegistrationModel", "DeformationGenerator", "check_pair"]


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


class BaseModel(nn.Module):
    """What every model of :mod:`diffreg.models` has for the trainer: ``dims`` (2 or 3, set by subclasses),
    :meth:`loss`, :meth:`prepare`, :attr:`device` and :meth:`num_parameters`."""

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

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class RegistrationModel(BaseModel):
    """Base class of registration models: subclasses set ``self.dims`` and implement :meth:`forward` and
    :meth:`loss`. Explained in chapter 02."""

    @torch.no_grad()
    def register(self, moving: torch.Tensor, fixed: torch.Tensor, **options: Any) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (both ``(B, 1, *spatial)``); the default runs :meth:`forward`."""
        check_pair(moving, fixed, self.dims)
        ddf = self(moving, fixed, **options)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={})


class DeformationGenerator(BaseModel):
    """Base class of deformation generators: models that draw random, plausible deformations of one image and
    register no pairs (DRDM, chapter 08). Subclasses set ``self.dims`` and implement :meth:`loss`, :meth:`deform`
    and :attr:`max_level`.

    The class attributes name the generator in messages: :attr:`level_symbol`, the paper's symbol of the
    deformation level (in labels such as ``T'=30``), and :attr:`downstream`, where its use is evaluated instead of a
    registration benchmark.
    """

    #: the size ``H x W (x D)`` the generator draws its fields at (``None``: the image's own size); :meth:`deform`
    #: resizes an image of another size to it and the field back to the image's size
    work_size: tuple[int, ...] | None = None
    #: the paper's symbol of the deformation level of :meth:`deform`
    level_symbol: str = "level"
    #: where the generator's use is evaluated instead of a registration benchmark (a sentence, or ``""``)
    downstream: str = ""

    @property
    def max_level(self) -> int:  # pragma: no cover - abstract
        """The largest deformation level :meth:`deform` accepts (levels ``0 ... max_level``; 0: no deformation)."""
        raise NotImplementedError

    def deform(self, image: torch.Tensor, level: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """A random deformation of ``image`` ``(B, C, *spatial)`` whose size grows with ``level``: ``(ddf,
        deformed)``, ``ddf`` ``(B, dims, *spatial)`` in voxels (pull convention), ``deformed = warp(image, ddf)``;
        the same ``generator`` state gives the same field."""
        raise NotImplementedError

    @staticmethod
    def deform_labels(labels: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Warp integer label maps ``(B, 1, *spatial)`` by ``ddf`` ``(B, dims, *spatial)`` (voxels) with nearest
        interpolation: every output value is one of the input's labels (DRDM Alg. 3, chapter 09)."""
        return warp(labels, ddf, mode="nearest")

    @classmethod
    def refusal(cls) -> str:
        """Why this generator cannot register pairs, in the words the evaluator, the benchmark, :mod:`diffreg.apply`
        and the command line give."""
        return f"{cls.__name__} generates deformations of one image and does not register pairs"
