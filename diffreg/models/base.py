"""The interfaces the models of :mod:`diffreg.models` implement (explained in chapter 02).

Every model (:class:`BaseModel`, what the trainer :mod:`diffreg.train` uses):

* ``loss(batch) -> dict[str, Tensor]`` with a ``"total"`` key and every paper term by name;
* optionally ``stages(seed) -> list[Stage]``: networks trained before the main loop (DiffuseReg's teacher,
  LDM-Morph's autoencoder and latent U-Net), which :func:`diffreg.train.fit` trains like the main loop (checkpoints,
  resume, AMP, DDP) in sub-folders of the run; the class attribute ``stage_budgets`` names the configuration keys of
  their budgets;
* optionally ``prepare(data, out, device, progress, seed)``: work that trains nothing, done once before the main loop
  (e.g. data statistics).

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
from typing import Any, Callable

import torch
from torch import nn

from diffreg.spatial import warp

__all__ = ["RegistrationResult", "BaseModel", "RegistrationModel", "DeformationGenerator", "Stage", "StageBudget",
           "check_pair"]


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


@dataclass(frozen=True)
class StageBudget:
    """Where a model's configuration keeps the budget of one stage trained before its main loop.

    Attributes:
        name: the stage's name in tables (``"teacher"``, ``"autoencoder"``).
        steps_key: the model setting holding its optimisation steps (``"teacher_steps"``).
        batch: the model setting holding its batch size, or the batch size itself.
    """

    name: str
    steps_key: str
    batch: str | int = 1

    def describe(self, model_settings: dict[str, Any]) -> str:
        """``"teacher 1,500 steps × batch 1"`` for a configuration's ``model`` settings."""
        b = model_settings.get(self.batch, 1) if isinstance(self.batch, str) else self.batch
        return f"{self.name} {int(model_settings[self.steps_key]):,} steps × batch {b}"


@dataclass
class Stage:
    """A network a model trains before its main loop, as data: :func:`diffreg.train.fit` trains ``module`` on
    ``dataset(pairs)`` with ``config`` in the run's sub-folder ``name`` (so it is checkpointed, resumed, and run with
    AMP and DDP exactly like the main loop), freezes it (unless ``frozen`` is false), then calls ``done(log_rows)``.

    Attributes:
        name: sub-folder of the run directory (``"teacher"``, ``"autoencoder"``, ``"latent_unet"``).
        module: what is trained: ``module.loss(batch)`` returns a dict with ``"total"``; its parameters that require
            gradients are optimised.
        config: the stage's :class:`~diffreg.config.MethodConfig` (its ``train`` section is the stage's budget and
            seed; it is stored in the stage's folder, and a resumed stage must match it).
        dataset: maps the model's training pairs to the stage's dataset (default: the pairs themselves).
        done: called with the stage's log rows (every row of its ``log.csv`` when it has a folder) once it is trained
            or restored; it marks the model's stage as ready.
        frozen: freeze ``module`` after the stage (a teacher, a first stage); ``False`` for a stage that pre-trains
            the network the main loop goes on training (FlowReg's warmup).
    """

    name: str
    module: nn.Module
    config: Any
    dataset: Callable[[Any], Any] | None = None
    done: Callable[[list[dict[str, Any]]], None] | None = None
    frozen: bool = True


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
    :meth:`loss`, :meth:`stages`, :meth:`prepare`, :attr:`device` and :meth:`num_parameters`."""

    dims: int = 2

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Training losses for a batch from a pair dataset; ``"total"`` is optimised."""
        raise NotImplementedError

    #: where the configuration keeps the budgets of :meth:`stages` (read by ``--stage-steps`` and the benchmark)
    stage_budgets: tuple[StageBudget, ...] = ()

    def stages(self, seed: int = 0) -> list[Stage]:
        """The stages still to train before the main loop, in order (none by default; empty once they are trained
        or restored from a checkpoint).

        Args:
            seed: the training run's seed (:class:`~diffreg.config.TrainConfig` ``seed``), for a stage without a
                seed of its own.
        """
        return []

    def prepare(self, data: Any, out: Path | None = None, device: torch.device | None = None,
                progress: bool = False, seed: int = 0) -> None:
        """Work that trains nothing, done once before training (called by :func:`diffreg.train.fit` after the
        :meth:`stages`, before the optimizer is built): e.g. data statistics.

        Args:
            data: the training dataset.
            out: the run directory; products are cached there (e.g. ``out / "statistics.pt"``) so a resumed run reuses
                them. ``None``: cache nothing.
            device: the training device.
            progress: show progress bars.
            seed: the training run's seed (:class:`~diffreg.config.TrainConfig` ``seed``), for work that draws random numbers.

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
