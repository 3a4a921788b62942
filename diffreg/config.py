"""Profiles: the configuration of every method, ``quick`` (CPU, minutes) and ``paper`` (the paper's numbers).

A profile is a :class:`MethodConfig` made of plain dataclasses, so a notebook cell can print it and change one
field::

    cfg = get_config("voxelmorph", profile="quick", dims=2)
    cfg.train.steps = 3000

``quick`` is what CI and a laptop run: 2D phantom slices at 64 x 64, small networks, a few hundred to a few
thousand steps. ``paper`` reproduces the paper's sizes, widths, schedules and loss weights; each value carries a
comment naming its source. Explained in chapter 02 (``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["TrainConfig", "DataConfig", "MethodConfig", "get_config", "register_profile", "methods", "PROFILES"]

PROFILES = ("quick", "paper")


@dataclass
class TrainConfig:
    """How :func:`diffreg.train.fit` trains a model.

    Attributes:
        steps: optimisation steps (one batch each). Paper profiles that state epochs set ``epochs`` instead and
            the trainer converts ``epochs * ceil(len(dataset) / batch_size)`` into steps.
        epochs: optional number of epochs (overrides ``steps`` when set).
        batch_size: samples per step and per process (DDP multiplies it by the world size).
        lr: peak learning rate.
        optimizer: ``"adam"`` or ``"adamw"``.
        betas: Adam betas.
        weight_decay: AdamW weight decay (ignored by Adam when 0).
        scheduler: ``"cosine"`` (cosine decay to ``lr * min_lr_ratio`` over the run) or ``"constant"``.
        warmup_steps: linear warm-up steps before the schedule.
        min_lr_ratio: final learning rate of the cosine schedule as a fraction of ``lr``.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        amp: mixed precision on CUDA devices (never on CPU).
        amp_dtype: ``"bfloat16"`` or ``"float16"`` (the latter with a gradient scaler).
        seed: seeds the model initialisation order, the data order and the training randomness.
        log_every: steps between CSV log rows (and progress-bar updates of the loss).
        checkpoint_every: steps between checkpoints (one is always written at the end).
    """

    steps: int = 1500
    epochs: int | None = None
    batch_size: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: bool = True
    amp_dtype: str = "bfloat16"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500


@dataclass
class DataConfig:
    """The data a profile expects.

    Attributes:
        dims: 2 (slices) or 3 (volumes).
        size: spatial size in array order, ``(H, W)`` or ``(D, H, W)``.
        intensity: intensity range images are scaled to.
        phantom: the phantom kind used when ``DIFFREG_DATA=phantom`` (``"sax"``, ``"sax3d"`` or ``"echo"``).
        n_subjects: phantom subjects generated (split by subject into train/val/test).
    """

    dims: int = 2
    size: tuple[int, ...] = (64, 64)
    intensity: tuple[float, float] = (-1.0, 1.0)
    phantom: str = "sax"
    n_subjects: int = 40


@dataclass
class MethodConfig:
    """Everything needed to build and train one method at one profile.

    Attributes:
        method: registry name (``"voxelmorph"``, ``"voxelmorph-diff"``, ...).
        profile: ``"quick"`` or ``"paper"``.
        model: keyword arguments of the model class (``dims`` is added by :func:`diffreg.models.build`).
        train: the :class:`TrainConfig`.
        data: the :class:`DataConfig`.
        source: where the paper profile's numbers come from.
    """

    method: str
    profile: str
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (written to ``config.json`` of every run)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """Inverse of :meth:`to_dict` (tuples restored for the fields that hold them)."""
        train = dict(d.get("train", {}))
        if "betas" in train:
            train["betas"] = tuple(train["betas"])
        data = dict(d.get("data", {}))
        for k in ("size", "intensity"):
            if k in data and data[k] is not None:
                data[k] = tuple(data[k])
        return cls(
            method=d["method"],
            profile=d["profile"],
            model=dict(d.get("model", {})),
            train=TrainConfig(**train),
            data=DataConfig(**data),
            source=d.get("source", ""),
        )


_REGISTRY: dict[str, Callable[[str, int], MethodConfig]] = {}


def register_profile(name: str) -> Callable:
    """Decorator registering ``fn(profile, dims) -> MethodConfig`` as the profiles of method ``name``."""

    def deco(fn: Callable[[str, int], MethodConfig]) -> Callable[[str, int], MethodConfig]:
        _REGISTRY[name] = fn
        return fn

    return deco


def methods() -> list[str]:
    """Names of every method with registered profiles."""
    return sorted(_REGISTRY)


def get_config(method: str, profile: str = "quick", dims: int | None = None) -> MethodConfig:
    """The configuration of ``method`` at ``profile``.

    Args:
        method: a name from :func:`methods`.
        profile: ``"quick"`` or ``"paper"``.
        dims: 2 or 3; ``None`` takes the profile's default (quick: 2, paper: the paper's).

    Raises:
        ValueError: unknown method, profile or dims.
    """
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(methods())}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if dims not in (None, 2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return copy.deepcopy(_REGISTRY[method](profile, dims))


# ----------------------------------------------------------------------------------------------------------------
# VoxelMorph (Balakrishnan et al., IEEE TMI 2019) and VoxelMorph-diff (Dalca et al., MICCAI 2018 / MedIA 2019)
# ----------------------------------------------------------------------------------------------------------------


def _voxelmorph(profile: str, dims: int | None, diffeomorphic: bool) -> MethodConfig:
    name = "voxelmorph-diff" if diffeomorphic else "voxelmorph"
    int_steps = 7 if diffeomorphic else 0
    if profile == "quick":
        dims = dims or 2
        size = (64, 64) if dims == 2 else (16, 64, 64)
        return MethodConfig(
            method=name,
            profile=profile,
            model=dict(
                layout="vm2",
                similarity="ncc",
                ncc_window=9,
                smooth_weight=1.0,
                int_steps=int_steps,
                int_downsize=1,
            ),
            # lr 1e-3: 1e-4 (the paper's) is far too slow for a budget of minutes on a CPU (DESIGN.md sec. 4).
            train=TrainConfig(steps=1500 if dims == 2 else 300, lr=1e-3, batch_size=1, scheduler="constant",
                              log_every=50, checkpoint_every=500),
            data=DataConfig(dims=dims, size=size, phantom="sax" if dims == 2 else "sax3d"),
            source="quick profile: small enough for a 2-core CPU; same architecture as the paper profile",
        )
    dims = dims or 3
    size = (128, 128) if dims == 2 else (32, 128, 128)
    return MethodConfig(
        method=name,
        profile=profile,
        model=dict(
            layout="vm2",  # Balakrishnan 2019, Fig. 3: VoxelMorph-2 encoder 16,32,32,32; decoder 32,32,32,32,32,16,16
            similarity="ncc",  # Balakrishnan 2019 sec. III-C: local cross-correlation, window 9^n
            ncc_window=9,
            smooth_weight=1.0,  # Balakrishnan 2019 sec. IV-C: lambda = 1 for CC
            int_steps=int_steps,  # Dalca 2019: scaling and squaring with T = 7 steps
            int_downsize=2 if diffeomorphic else 1,  # voxelmorph library default: velocity at half resolution
        ),
        # Balakrishnan 2019 sec. IV-C: Adam, lr 1e-4, batch 1; trained to convergence (~150k iterations).
        train=TrainConfig(steps=150_000, lr=1e-4, batch_size=1, scheduler="constant", log_every=100,
                          checkpoint_every=5000),
        data=DataConfig(dims=dims, size=size, phantom="sax" if dims == 2 else "sax3d"),
        source="Balakrishnan et al. 2019 (VoxelMorph), Dalca et al. 2019 (VoxelMorph-diff)",
    )


@register_profile("voxelmorph")
def _voxelmorph_profile(profile: str, dims: int | None) -> MethodConfig:
    return _voxelmorph(profile, dims, diffeomorphic=False)


@register_profile("voxelmorph-diff")
def _voxelmorph_diff_profile(profile: str, dims: int | None) -> MethodConfig:
    return _voxelmorph(profile, dims, diffeomorphic=True)


# ----------------------------------------------------------------------------------------------------------------
# DiffuseMorph (Kim, Han, Ye, ECCV 2022); line numbers refer to the paper text in shared/papers (001_...txt)
# ----------------------------------------------------------------------------------------------------------------


def _diffusemorph_model(dims: int) -> dict[str, Any]:
    """DiffuseMorph's architecture and loss weights (the same in both profiles but for lambda in 2D)."""
    return dict(
        # official 3D config: inner_channel 8, channel_multiplier [1, 2, 4, 4], res_blocks 1, attention at the
        # bottleneck only (the paper, l. 200: "the network architecture designed in DDPM [14]")
        widths=(8, 16, 32, 32),
        norm_groups=4,
        vm_layout="vm1",  # l. 200-202: "the backbone of VoxelMorph-1 [3] for the deformation network"
        lambda_reg=20.0 if dims == 3 else 2.0,  # l. 202: lambda = 20 (cardiac MR, 3D), lambda = 2 (faces, 2D)
        lambda_smooth=1.0,  # l. 121: "We set lambda_phi = 1"
        ncc_window=9,  # l. 121: local NCC of VoxelMorph [3] (window 9)
        timesteps=2000,  # l. 200: T_train = 2000
        beta_start=1e-6,  # l. 200: noise level from 10^-6 ...
        beta_end=1e-2,  # l. 200: ... to 10^-2, linear schedule
    )


@register_profile("diffusemorph")
def _diffusemorph_profile(profile: str, dims: int | None) -> MethodConfig:
    if profile == "quick":
        dims = dims or 2
        return MethodConfig(
            method="diffusemorph",
            profile=profile,
            # lambda = 20, the paper's cardiac value (l. 202), also in 2D: our 2D data are cardiac slices, not the
            # faces for which the paper used lambda = 2. With lambda = 2 the 1500 quick steps barely register
            # (Dice 0.71 -> 0.77 against 0.89-0.92 with lambda = 20 on the held-out phantom pairs).
            model={**_diffusemorph_model(dims), "lambda_reg": 20.0},
            # lr 1e-3: the paper's 2e-4 (3D) / 5e-6 (2D) is far too slow for a budget of minutes on a CPU
            # (DESIGN.md sec. 4); Adam betas (0.5, 0.999) as in the official code.
            train=TrainConfig(steps=1500 if dims == 2 else 300, lr=1e-3, batch_size=1, betas=(0.5, 0.999),
                              scheduler="constant", log_every=50, checkpoint_every=500),
            data=DataConfig(dims=dims, size=(64, 64) if dims == 2 else (16, 64, 64),
                            phantom="sax" if dims == 2 else "sax3d"),
            source="quick profile: small enough for a 2-core CPU; same architecture as the paper profile",
        )
    dims = dims or 3
    return MethodConfig(
        method="diffusemorph",
        profile=profile,
        model=_diffusemorph_model(dims),
        # l. 202: cardiac MR lr 2e-4 for 800 epochs (faces: 5e-6, 40 epochs); Adam (l. 202); betas (0.5, 0.999) and
        # batch 1 from the official 3D training config.
        train=TrainConfig(epochs=800 if dims == 3 else 40, lr=2e-4 if dims == 3 else 5e-6, batch_size=1,
                          betas=(0.5, 0.999), scheduler="constant", log_every=100, checkpoint_every=5000),
        # l. 196: ACDC cropped to 128 x 128 x 32
        data=DataConfig(dims=dims, size=(128, 128) if dims == 2 else (32, 128, 128),
                        phantom="sax" if dims == 2 else "sax3d"),
        source="Kim, Han, Ye 2022 (DiffuseMorph, ECCV), sec. 3.2 and sec. 4 implementation details",
    )
