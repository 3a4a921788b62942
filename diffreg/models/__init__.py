"""Registration models with one interface (:class:`RegistrationModel`), the deformation generator DRDM
(:class:`DeformationGenerator`), :func:`build` and :func:`is_generator`.

``from diffreg.models import VoxelMorph`` — each paper's model lives in one file of this package and reads top to
bottom like the paper's method section. The interfaces are in :mod:`diffreg.models.base` (chapters 02 and 08).
"""

from __future__ import annotations

from typing import Any

from diffreg.config import MethodConfig, get_config
from diffreg.device import cpu_conv3d_fast_path
from diffreg.models.base import BaseModel, DeformationGenerator, RegistrationModel, RegistrationResult
from diffreg.models.classical import ANTsSyN
from diffreg.models.corrmlp import CorrMLP
from diffreg.models.diffusemorph import DiffuseMorph
from diffreg.models.diffusereg import DiffuseReg
from diffreg.models.drdm import DRDM
from diffreg.models.flowreg import FlowReg
from diffreg.models.fsdiffreg import FSDiffReg
from diffreg.models.ldm_morph import LDMMorph
from diffreg.models.voxelmorph import VoxelMorph, VoxelMorphDiff

__all__ = [
    "BaseModel", "RegistrationModel", "DeformationGenerator", "RegistrationResult", "VoxelMorph", "VoxelMorphDiff",
    "DiffuseMorph", "DiffuseReg",
    "FSDiffReg", "LDMMorph", "DRDM", "CorrMLP", "FlowReg", "ANTsSyN", "build", "is_generator", "MODELS",
]

#: registry name -> model class (a :class:`RegistrationModel` or a :class:`DeformationGenerator`)
MODELS: dict[str, type[BaseModel]] = {
    "voxelmorph": VoxelMorph,
    "voxelmorph-diff": VoxelMorphDiff,
    "diffusemorph": DiffuseMorph,
    "diffusereg": DiffuseReg,
    "drdm": DRDM,
    "fsdiffreg": FSDiffReg,
    "ldm-morph": LDMMorph,
    "corrmlp": CorrMLP,
    "flowreg": FlowReg,
}


def build(name: str | MethodConfig, profile: str = "quick", dims: int | None = None, **overrides: Any) -> BaseModel:
    """Build a model from its profile.

    Args:
        name: a registry name (see :data:`MODELS`) or a :class:`~diffreg.config.MethodConfig`.
        profile: ``"quick"`` or ``"paper"`` (ignored when ``name`` is a config).
        dims: 2 or 3 (``None``: the profile's default).
        **overrides: model keyword arguments replacing the profile's.

    Example:
        >>> build("voxelmorph", profile="paper", dims=3).num_parameters()
        327331

    Raises:
        ValueError: unknown model name or profile.
    """
    cfg = name if isinstance(name, MethodConfig) else get_config(name, profile, dims)
    if cfg.method not in MODELS:
        raise ValueError(f"unknown model {cfg.method!r}; known: {', '.join(sorted(MODELS))}")
    kwargs = {**cfg.model, **overrides}
    return cpu_conv3d_fast_path(MODELS[cfg.method](dims=cfg.data.dims, **kwargs))


def is_generator(method: str) -> bool:
    """Whether ``method`` (a registry name of :data:`MODELS`) is a :class:`DeformationGenerator`, which draws
    deformations of one image and registers no pairs (DRDM, chapters 08-09), asked of its class without building it.

    Example:
        >>> is_generator("drdm"), is_generator("voxelmorph"), is_generator("syn")
        (True, False, False)

    Returns:
        ``False`` for registration models and for names outside :data:`MODELS` (e.g. ``"syn"``).
    """
    cls = MODELS.get(method)
    return cls is not None and issubclass(cls, DeformationGenerator)
