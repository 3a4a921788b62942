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
from collections.abc import Sequence
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
        amp: mixed precision on CUDA devices (never on CPU). Off by default and in every profile: the papers train
            in float32, and DiffuseReg's eq. 3 amplifies the noise-prediction error by about 1 / sqrt(abar_t)
            (~150x near t = T), so a precision change is a fidelity risk. Opt in with ``--amp``.
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
    amp: bool = False
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
        direction: ``"es->ed"`` (moving = end-systole, fixed = end-diastole), ``"ed->es"``, or ``None`` for the
            dataset's default (``es->ed`` for ACDC and short-axis phantoms, ``ed->es`` for CAMUS and the echo
            phantom). Paper profiles set the paper's, with the source line.
        view: CAMUS view, ``"2CH"``, ``"4CH"`` or ``"both"`` (ignored by the other datasets).
        split_scheme: ACDC only: ``"diffreg"`` (70/10/20 % of the given folder's patients, by patient) or
            ``"official"`` (train/val 90/10 % from the given folder, test = the patients of the sibling
            ``testing/`` folder of the official release); see :class:`diffreg.data.ACDCPairs`.
    """

    dims: int = 2
    size: tuple[int, ...] = (64, 64)
    intensity: tuple[float, float] = (-1.0, 1.0)
    phantom: str = "sax"
    n_subjects: int = 40
    direction: str | None = None
    view: str = "2CH"
    split_scheme: str = "diffreg"


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

    def set_budget(self, steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
                   size: Sequence[int] | None = None, amp: bool | None = None,
                   seed: int | None = None) -> "MethodConfig":
        """Override the training budget in place (``None`` leaves a setting as it is) and return ``self``: the one
        way the command line, the benchmark and the chapters change a profile's budget.

        Args:
            steps: optimisation steps; an epoch-based profile becomes step-based (``epochs = None``).
            lr: peak learning rate.
            batch_size: samples per step.
            size: spatial size of the images, ``(H, W)`` or ``(D, H, W)``.
            amp: mixed precision on CUDA.
            seed: seed of the initialisation, data order and training noise; also of the stages trained before the
                main loop that have a seed of their own (LDM-Morph's ``stage1_seed``).

        Raises:
            ValueError: ``steps``, ``lr`` or ``batch_size`` not positive.
        """
        for name, value in (("steps", steps), ("lr", lr), ("batch_size", batch_size)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if steps is not None:
            self.train.steps, self.train.epochs = int(steps), None
        if lr is not None:
            self.train.lr = float(lr)
        if batch_size is not None:
            self.train.batch_size = int(batch_size)
        if size is not None:
            self.data.size = tuple(int(v) for v in size)
        if amp is not None:
            self.train.amp = bool(amp)
        if seed is not None:
            self.train.seed = int(seed)
            if "stage1_seed" in self.model:
                self.model["stage1_seed"] = int(seed)
        return self

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


#: ``source`` of every quick profile
QUICK_SOURCE = "quick profile: small enough for a 2-core CPU; same architecture as the paper profile"


def _cardiac_phantom(dims: int) -> str:
    """The short-axis phantom kind for ``dims``: ``"sax"`` (2D slices) or ``"sax3d"`` (3D stacks)."""
    return "sax" if dims == 2 else "sax3d"


def _cardiac_data(dims: int, size_2d: tuple[int, ...], size_3d: tuple[int, ...],
                  direction: str | None = None) -> DataConfig:
    """Short-axis cardiac data at ``size_2d`` or ``size_3d`` (array order) with the matching phantom, registered in
    ``direction`` (``None``: the dataset's default)."""
    return DataConfig(dims=dims, size=size_2d if dims == 2 else size_3d, phantom=_cardiac_phantom(dims),
                      direction=direction)


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
            # lr 1e-3: 1e-4 (the paper's) is far too slow for a budget of minutes on a CPU.
            train=TrainConfig(steps=1500 if dims == 2 else 300, lr=1e-3, batch_size=1, scheduler="constant",
                              log_every=50, checkpoint_every=500),
            data=DataConfig(dims=dims, size=size, phantom=_cardiac_phantom(dims)),
            source=QUICK_SOURCE,
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
        data=DataConfig(dims=dims, size=size, phantom=_cardiac_phantom(dims)),
        source="Balakrishnan et al. 2019 (VoxelMorph), Dalca et al. 2019 (VoxelMorph-diff)",
    )


@register_profile("voxelmorph")
def _voxelmorph_profile(profile: str, dims: int | None) -> MethodConfig:
    return _voxelmorph(profile, dims, diffeomorphic=False)


@register_profile("voxelmorph-diff")
def _voxelmorph_diff_profile(profile: str, dims: int | None) -> MethodConfig:
    return _voxelmorph(profile, dims, diffeomorphic=True)


# ----------------------------------------------------------------------------------------------------------------
# DiffuseMorph (Kim, Han, Ye, ECCV 2022); sections, equations and tables of the published paper
# ----------------------------------------------------------------------------------------------------------------


def _diffusemorph_model(dims: int) -> dict[str, Any]:
    """DiffuseMorph's architecture and loss weights (the same in both profiles but for lambda in 2D)."""
    return dict(
        # official 3D config: inner_channel 8, channel_multiplier [1, 2, 4, 4], res_blocks 1, attention at the
        # bottleneck only (the paper, sec. 4, implementation details: "the network architecture designed in
        # DDPM [14]")
        widths=(8, 16, 32, 32),
        norm_groups=4,
        # sec. 4, implementation details: "the backbone of VoxelMorph-1 [3] for the deformation network"
        vm_layout="vm1",
        # sec. 4, implementation details: lambda = 20 (cardiac MR, 3D), lambda = 2 (faces, 2D); in 2D the paper
        # profile applies the face value to cardiac slices (see _diffusemorph_profile)
        lambda_reg=20.0 if dims == 3 else 2.0,
        lambda_smooth=1.0,  # sec. 3.2, eq. 9: "We set lambda_phi = 1"
        ncc_window=9,  # sec. 3.2, eq. 9: local NCC of VoxelMorph [3] (window 9)
        timesteps=2000,  # sec. 4, implementation details: T_train = 2000
        beta_start=1e-6,  # sec. 4, implementation details: noise level from 10^-6 ...
        beta_end=1e-2,  # sec. 4, implementation details: ... to 10^-2, linear schedule
    )


@register_profile("diffusemorph")
def _diffusemorph_profile(profile: str, dims: int | None) -> MethodConfig:
    if profile == "quick":
        dims = dims or 2
        return MethodConfig(
            method="diffusemorph",
            profile=profile,
            # lambda = 20, the paper's cardiac value (sec. 4, implementation details), also in 2D: our 2D data are
            # cardiac slices, not the faces for which the paper used lambda = 2. With lambda = 2 the 1500 quick
            # steps barely register (Dice 0.71 -> 0.77 against 0.89-0.92 with lambda = 20 on the held-out phantom
            # pairs).
            model={**_diffusemorph_model(dims), "lambda_reg": 20.0},
            # lr 1e-3: the paper's 2e-4 (3D) / 5e-6 (2D) is far too slow for a budget of minutes on a CPU;
            # Adam betas (0.5, 0.999) as in the official code.
            train=TrainConfig(steps=1500 if dims == 2 else 300, lr=1e-3, batch_size=1, betas=(0.5, 0.999),
                              scheduler="constant", log_every=50, checkpoint_every=500),
            data=_cardiac_data(dims, (64, 64), (16, 64, 64)),
            source=QUICK_SOURCE,
        )
    dims = dims or 3
    return MethodConfig(
        method="diffusemorph",
        profile=profile,
        model=_diffusemorph_model(dims),
        # sec. 4, implementation details: cardiac MR lr 2e-4 for 800 epochs (faces: 5e-6, 40 epochs); Adam; betas
        # (0.5, 0.999) and batch 1 from the official 3D training config.
        # dims=2 is not a paper experiment: the paper's only 2D experiment registers faces, and it has no 2D cardiac
        # one. This 2D profile combines the 3D network widths (the official face network is much wider: inner_channel
        # 64) with the face experiment's hyper-parameters (lambda 2, lr 5e-6, 40 epochs) and applies them to 2D
        # cardiac slices (see the DiffuseMorph docstring and chapter 04).
        train=TrainConfig(epochs=800 if dims == 3 else 40, lr=2e-4 if dims == 3 else 5e-6, batch_size=1,
                          betas=(0.5, 0.999), scheduler="constant", log_every=100, checkpoint_every=5000),
        # sec. 4, datasets: ACDC cropped to 128 x 128 x 32. sec. 4.2: "We tested the image registration of the
        # end-diastolic images aligned with the end-systolic images": moving = ED, fixed = ES (the official code's
        # direction too)
        data=_cardiac_data(dims, (128, 128), (32, 128, 128), direction="ed->es"),
        source="Kim, Han, Ye 2022 (DiffuseMorph, ECCV), sec. 3.2 and sec. 4 implementation details",
    )


# ----------------------------------------------------------------------------------------------------------------
# DiffuseReg (Zhuo & Shen, MICCAI 2024); sections (and their paragraph titles), equations and tables of the paper
# ----------------------------------------------------------------------------------------------------------------


def _diffusereg_model(dims: int) -> dict[str, Any]:
    """DiffuseReg at the paper's size (the official configuration where the paper is silent)."""
    return dict(
        # official train_3D.json "swin_unetR": feature_size 120 (the paper: SwinU-NetR, sec. 2, architecture for
        # denoising network)
        feature_size=120,
        depths=(2, 2, 2, 2),  # official: depths [2, 2, 2, 2]
        num_heads=(3, 6, 12, 24),  # official: num_heads [3, 6, 12, 24]
        window=(2, 4, 4) if dims == 3 else (4, 4),  # official 3D window [2, 4, 4]; 2D: ours (not in the paper)
        # sec. 2, attention mask with conditions, and Fig. 2d: locality mask, full attention to the time token
        mask="paper",
        # sec. 3, ablation study on denoising network, Table 2 "RT": time token in the ResBlocks
        time_in_resblocks=True,
        lambda_sim=1.0,  # sec. 3, implementation details: lambda_1 = 1
        lambda_reg=0.1,  # sec. 3, implementation details: lambda_2 = 0.1
        ssim_kernel=9,  # sec. 3, implementation details: "SSIM with kernel size 9"
        consistency_weighting="none",  # eq. 3: L_sim and L_reg on phi0_hat at every sampled t (official code too)
        # sec. 2, problem formulation and training objective: the denoising network predicts the noise
        parameterization="eps",
        diffusion_weighting="none",  # eq. 4 as written
        timesteps=2000,  # sec. 3, implementation details: T_train = 2000
        beta_start=1e-6,  # sec. 3, implementation details: noise schedule from 10^-6 ...
        beta_end=1e-2,  # sec. 3, implementation details: ... to 10^-2, linear
        # sec. 3, implementation details and results, Table 1: ancestral sampling from pure noise over all T steps
        # (333 s per volume)
        sampler="ddpm",
        sample_steps=None,
        # sec. 3, implementation details: phi_0 from a pre-trained VTN (ADDD); ours: a VoxelMorph-2 trained like
        # chapter 02's paper profile
        teacher=dict(layout="vm2", similarity="ncc", smooth_weight=1.0),
        teacher_steps=150_000,
        teacher_lr=1e-4,
    )


@register_profile("diffusereg")
def _diffusereg_profile(profile: str, dims: int | None) -> MethodConfig:
    if profile == "quick":
        dims = dims or 2
        model = _diffusereg_model(dims)
        model.update(
            # a denoiser of 0.80 M parameters in 2D (1.85 M in 3D) instead of the paper profile's 411 M in 3D
            # (feature size 8 instead of 120; heads keep the per-head width at 4-8 channels); counted with
            # build("diffusereg", profile=..., dims=...).num_parameters(). The official 3D code builds ~437 M, of
            # which 25.8 M are dead weights that ours leaves out (tests/models/test_diffusereg.py)
            feature_size=8,
            num_heads=(2, 2, 4, 8),
            # T = 200 instead of 2000 so that a full DDPM chain costs seconds on a CPU; betas 1e-5 ... 0.1 keep the
            # paper's end-point noise level (abar_T ~ e^-10 in both)
            timesteps=200,
            beta_start=1e-5,
            beta_end=0.1,
            sampler="ddim",  # 20 DDIM steps by default; the chapter also runs DDPM over all T
            sample_steps=20,
            teacher_steps=1000 if dims == 2 else 300,  # chapter 02's quick VoxelMorph, shorter
            # the network predicts the field phi_0 itself and eps_hat is derived from it (eq. 3-4 unchanged), and eq. 4
            # is weighted by (1 - abar_t) / abar_t (the MSE of phi0_hat): with direct eps prediction a training of
            # minutes leaves eps_hat poor near t = T, where eq. 3 amplifies it ~180x, and sampling from pure noise
            # diverges; with v-prediction the samples fold more with every sampler step (7 % at DDIM 20); with x0 they
            # do not (see DiffuseReg, chapter 06 and benchmarks/diffusereg_diagnosis)
            parameterization="x0",
            diffusion_weighting="x0",
            teacher_lr=1e-3,
        )
        return MethodConfig(
            method="diffusereg",
            profile=profile,
            model=model,
            # AdamW + cosine as the paper (sec. 3, implementation details); lr 2e-3: the paper's 1e-4 is far too
            # slow for minutes on a CPU
            train=TrainConfig(steps=1000 if dims == 2 else 150, lr=2e-3, optimizer="adamw", weight_decay=1e-4,
                              scheduler="cosine", min_lr_ratio=0.01, batch_size=1, log_every=25,
                              checkpoint_every=200),
            # sizes must be divisible by 32 (Swin-UNETR: patch 2 and four merges)
            data=_cardiac_data(dims, (64, 64), (32, 64, 64)),
            source=QUICK_SOURCE,
        )
    dims = dims or 3
    return MethodConfig(
        method="diffusereg",
        profile=profile,
        model=_diffusereg_model(dims),
        # sec. 3, implementation details: AdamW, weight decay 1e-4, batch 1, cosine annealing from 1e-4, 1200
        # epochs; the official config anneals to eta_min 1e-6 (min_lr_ratio 0.01)
        train=TrainConfig(epochs=1200, lr=1e-4, optimizer="adamw", weight_decay=1e-4, scheduler="cosine",
                          min_lr_ratio=0.01, batch_size=1, log_every=100, checkpoint_every=5000),
        # sec. 3, datasets and metrics: ACDC 3D; the official image_size [32, 128, 128] (the preprocessing of
        # DiffuseMorph / FSDiffReg); "we used the end-diastolic volumes as fixed images and end-systolic as moving":
        # ES -> ED
        data=_cardiac_data(dims, (128, 128), (32, 128, 128), direction="es->ed"),
        source="Zhuo & Shen 2024 (DiffuseReg, MICCAI), sec. 2-3 and the official configuration train_3D.json",
    )


# ----------------------------------------------------------------------------------------------------------------
# FSDiffReg (Qin & Li, MICCAI 2023); sections (and their paragraph titles), equations and tables of the paper
# ----------------------------------------------------------------------------------------------------------------


def _fsdiffreg_model() -> dict[str, Any]:
    """FSDiffReg's architecture and loss weights (the same in both profiles)."""
    return dict(
        # sec. 3, implementation details: "DDPM UNet's 3D encoder as our shared encoder and DDPM UNet's 3D decoder
        # as our diffusion decoder", the registration decoder of the same shape; widths from the official
        # train_3D.json (inner_channel 8, channel_multiplier [1, 2, 4, 4], res_blocks 1; GroupNorm 4 and 4
        # cross-attention heads in its U-Net)
        widths=(8, 16, 32, 32),
        num_res_blocks=1,
        norm_groups=4,
        heads=4,
        fdg=True,  # sec. 2.2, eq. 2-3: Feature-wise Diffusion-Guided module
        sdg=True,  # sec. 2.3, eq. 4: Score-wise Diffusion-Guided loss
        gamma=1.0,  # sec. 3, implementation details: gamma = 1
        lambda_sim=20.0,  # sec. 2.4 (loss function) and sec. 3 (implementation details): lambda = 20
        lambda_smooth=20.0,  # sec. 2.4 (loss function) and sec. 3 (implementation details): lambda_phi = 20
        ncc_window=9,  # official crossCorrelation3D kernel (9, 9, 9)
        timesteps=2000,  # sec. 3, implementation details: "over 2000 timesteps"
        beta_start=1e-6,  # sec. 3, implementation details: noise schedule from 10^-6 ...
        beta_end=1e-2,  # sec. 3, implementation details: ... to 10^-2 (linear in the official config)
    )


@register_profile("fsdiffreg")
def _fsdiffreg_profile(profile: str, dims: int | None) -> MethodConfig:
    if profile == "quick":
        dims = dims or 2
        return MethodConfig(
            method="fsdiffreg",
            profile=profile,
            # the paper's architecture at half its widths (4, 8, 16, 16): half the time per step on a CPU
            model={**_fsdiffreg_model(), "widths": (4, 8, 16, 16)},
            # lr 1e-3: the paper's 2e-4 is far too slow for a budget of minutes on a CPU;
            # Adam betas (0.5, 0.999) as in the official code.
            train=TrainConfig(steps=300 if dims == 2 else 100, lr=1e-3, batch_size=1, betas=(0.5, 0.999),
                              scheduler="constant", log_every=50, checkpoint_every=500),
            data=_cardiac_data(dims, (64, 64), (16, 64, 64)),
            source="quick profile: small enough for a 2-core CPU; the paper's architecture at half its widths",
        )
    dims = dims or 3
    return MethodConfig(
        method="fsdiffreg",
        profile=profile,
        model=_fsdiffreg_model(),
        # sec. 3, implementation details: Adam, lr 2e-4, batch size 1, at most 700 epochs; betas (0.5, 0.999) from
        # the official code
        train=TrainConfig(epochs=700, lr=2e-4, batch_size=1, betas=(0.5, 0.999), scheduler="constant",
                          log_every=100, checkpoint_every=5000),
        # sec. 3, dataset and preprocessing: ACDC resampled to 1.5 x 1.5 x 3.15 mm and cropped to 128 x 128 x 32
        # (array order D, H, W); "the 3D image at the end of the diastolic stage as the fixed image and the image at
        # the end of the systolic stage as the moving image": ES -> ED (the official code registers ED onto ES
        # instead)
        data=_cardiac_data(dims, (128, 128), (32, 128, 128), direction="es->ed"),
        source="Qin & Li 2023 (FSDiffReg, MICCAI), sec. 2.4 and 3 (implementation details), official train_3D.json",
    )


# ----------------------------------------------------------------------------------------------------------------
# LDM-Morph (Wu & Gong 2024); sections, equations and tables of the paper
# ----------------------------------------------------------------------------------------------------------------


@register_profile("ldm-morph")
def _ldm_morph_profile(profile: str, dims: int | None) -> MethodConfig:
    dims = dims or 2  # the paper is 2D (sec. 3.1); 3D builds the same network with 3D blocks
    if profile == "quick":
        return MethodConfig(
            method="ldm-morph",
            profile=profile,
            model=dict(
                # three levels instead of four and small widths: a 64 x 64 image has 2 x 2 tokens at a fourth level
                embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4, patch_size=4, mlp_ratio=4.0,
                qkv_bias=False, drop_path_rate=0.0, lgca_heads=2,
                use_ldm_features=True, use_lgca=True,
                beta=0.6,  # sec. 4.2
                lambda_smooth=0.01,  # sec. 4.2
                ae_channels=(8, 16), ae_res_layers=1, ae_embeddings=256, ae_embedding_dim=1,
                ldm_channels=(8, 16, 16), ldm_attention=(False, False, False), ldm_res_blocks=2,
                ldm_head_channels=8, ldm_norm_groups=8,
                timesteps=1000, beta_start=0.0015, beta_end=0.0195, feature_t=1, feature_noise="ddim",
                # stage 1 in a few hundred steps at lr 2e-3 (CPU minutes)
                ae_steps=100, ae_lr=2e-3, ae_batch=16, ldm_steps=150, ldm_lr=2e-3, ldm_batch=16, stage1_seed=0,
                cache_features=True,  # exact speed-up: stage 1 is frozen and DDIM inversion is deterministic
            ),
            # lr 1e-3 and batch 4: the paper's 1e-4 and batch 1 are far too slow for a budget of minutes on a CPU;
            # a batch of 4 costs less than twice a batch of 1 at this size.
            train=TrainConfig(steps=150, lr=1e-3, batch_size=4, scheduler="constant", log_every=15,
                              checkpoint_every=150),
            data=DataConfig(dims=dims, size=(64, 64) if dims == 2 else (32, 64, 64), intensity=(0.0, 1.0),
                            phantom="echo" if dims == 2 else "sax3d", n_subjects=50),
            source=QUICK_SOURCE,
        )
    return MethodConfig(
        method="ldm-morph",
        profile=profile,
        model=dict(
            # lower stream (sec. 3.3.1; official get_SelfAttention_config): patch 4, embedding 64, depths 2/2/4/2,
            # heads 4/4/8/8, window 7, MLP ratio 4, no qkv bias, stochastic depth 0.3
            embed_dim=64, depths=(2, 2, 4, 2), num_heads=(4, 4, 8, 8), window_size=7, patch_size=4, mlp_ratio=4.0,
            qkv_bias=False, drop_path_rate=0.3,
            lgca_heads=4,  # official get_CrossAttention_config: num_heads[0] = 4 in every LWCA module
            use_ldm_features=True, use_lgca=True,  # the full model (Table 3, last row)
            beta=0.6,  # sec. 4.2: beta = 0.6
            lambda_smooth=0.01,  # sec. 4.2: lambda = 0.01
            # sec. 4.2: VQGAN, one latent map at 1/4 resolution; official autoencoder_camus_vq16: ch 128,
            # ch_mult 1,2,4, num_res_blocks 2, z_channels 1, n_embed 16384
            ae_channels=(128, 256, 512), ae_res_layers=2, ae_embeddings=16384, ae_embedding_dim=1,
            # sec. 4.2: three layers per encoder level, 64 channels; official casmus-ldm-vq16-64ch: channel_mult
            # 1,2,3,4, num_res_blocks 2, attention_resolutions 8,4,2, num_head_channels 32
            ldm_channels=(64, 128, 192, 256), ldm_attention=(False, True, True, True), ldm_res_blocks=2,
            ldm_head_channels=32, ldm_norm_groups=32,
            timesteps=1000,  # sec. 3.2: T = 1000
            beta_start=0.0015, beta_end=0.0195,  # official LDM config: linear_start / linear_end
            feature_t=1,  # sec. 4.2: features extracted at t = 1
            feature_noise="ddim",  # sec. 3.2: DDIM inversion with t steps
            # stage 1 (not stated in the paper): official configs, lr = base_lr x batch x accumulation
            # (autoencoder 4.5e-6 x 10 x 2, LDM 1e-6 x 20); the number of steps is ours
            ae_steps=50_000, ae_lr=9e-5, ae_batch=20, ldm_steps=50_000, ldm_lr=2e-5, ldm_batch=20, stage1_seed=0,
            cache_features=False,
        ),
        # sec. 4.2: Adam, lr 1e-4, batch 1; 24,000 iterations in the official train.py (the paper keeps the best
        # validation checkpoint, sec. 4.2, which diffreg.train does not do)
        train=TrainConfig(steps=24_000, lr=1e-4, batch_size=1, scheduler="constant", log_every=100,
                          checkpoint_every=2000),
        # sec. 4.1: 112 x 112 resized and padded to 128 x 128, intensities [0, 1]; "registering the end-diastolic
        # images to their corresponding end-systolic images": ED -> ES (CAMUS-2CH and -4CH)
        data=DataConfig(dims=dims, size=(128, 128) if dims == 2 else (32, 128, 128), intensity=(0.0, 1.0),
                        phantom="echo" if dims == 2 else "sax3d", n_subjects=40, direction="ed->es"),
        source="Wu & Gong 2024 (LDM-Morph), sec. 3-4.2; official LDM-Morph configs and train.py",
    )


# ----------------------------------------------------------------------------------------------------------------
# DRDM (Zheng et al. 2024); sections, equations and tables of the paper
# ----------------------------------------------------------------------------------------------------------------


def _drdm_model(dims: int) -> dict[str, Any]:
    """DRDM's forward process, recovery network and loss weights at the paper's settings."""
    return dict(
        widths=(10, 20, 40),  # Appendix A / official RecResACNet: 10, 20, 40 channels (2D: 435,435 trainable)
        time_dim=100,  # official RecResACNet: time_emb_dim 100
        recursions=2,  # sec. 2.2.1: K = 2
        timesteps=80,  # sec. 3.3: T = 80
        alpha=0.6, beta=1.0,  # sec. 3.3: n_t = floor(t^0.6), alpha = 0.6, beta = 1
        cum_alpha=1.3, cum_beta=1.5,  # sec. 3.3: n_{t:1} = floor(t^1.3 / 1.5) in practice
        # ours: finest-scale SD as a fraction of the image size, for fresh fields at every composition (the official
        # v_scale 4e-5 is for one field composed with itself). Calibrated on Table 1 at the paper
        # geometry (256 x 256, fresh fields, T' = 70; tests/models/test_drdm.py measures it): max |psi| 12.5 % and
        # mean |psi| 5.1 % of the image size (16 fields), paper 14.8 % and 4.3 %. One sigma cannot hit both: our
        # fields are smoother (max / mean 2.5 against the paper's 3.4), so sigma balances the two errors (-16 %, +18 %)
        sigma=7e-4,
        scales=4,  # eq. 6, m = 3: official control grids 64, 32, 16, 8
        canvas=2.0,  # sec. 3.3: h, w, d twice H, W, D
        control_spacing=8 if dims == 2 else 4,  # official ctl_sz = 64 on the 512 (2D) / 256 (3D) canvas
        perturb=0.05,  # sec. 3.3: 5 % disturbance of the created DVF
        lambda_dist=1.0, lambda_ang=1.0, lambda_reg=10.0,  # sec. 3.3: lambda_1 = 1, lambda_2 = 1, lambda_3 = 10
        eps=1e-2,
        train_on=("moving", "fixed"),
        work_size=None,
        fields="fresh",  # eq. 2: a new random DVF at every composition
    )


@register_profile("drdm")
def _drdm_profile(profile: str, dims: int | None) -> MethodConfig:
    if profile == "quick":
        dims = dims or 2
        model = _drdm_model(dims)
        model.update(
            widths=(8, 16, 32),  # a smaller recovery U-Net (282,513 parameters in 2D)
            # DRDM works at half the data size and its fields are resized to 64 x 64 (the paper resizes generated
            # fields to the downstream size, sec. 3.2); the canvas is 64, the control grid 32 (16, 8 below it)
            work_size=(32, 32) if dims == 2 else (16, 32, 32),
            control_spacing=2,
            scales=3,
            # the official code's sampler (one field per sample composed with itself): with fresh fields (eq. 2) the
            # recovery network learned no direction in a CPU budget (held-out L_ang about 0 after 1200 steps), with
            # a shared field it does (L_ang about -0.25 after 600 steps); see the DRDM docstring and chapter 08.
            # sigma gives a mean displacement of about 11 % of the image at T' = 70 (paper Table 1: 4.3 %): at
            # 32 x 32 a 4 % motion is about one voxel, too little for the network to see
            fields="shared",
            sigma=2.5e-4,
        )
        return MethodConfig(
            method="drdm",
            profile=profile,
            model=model,
            # lr 1e-3: the paper's 1e-4 is far too slow for a budget of minutes on a CPU; each
            # step trains on 2 x batch_size images (moving and fixed of every pair)
            train=TrainConfig(steps=600 if dims == 2 else 100, lr=1e-3, batch_size=2, scheduler="constant",
                              log_every=25, checkpoint_every=100),
            data=_cardiac_data(dims, (64, 64), (16, 64, 64)),
            source=QUICK_SOURCE,
        )
    dims = dims or 2
    return MethodConfig(
        method="drdm",
        profile=profile,
        model=_drdm_model(dims),
        # sec. 3.3: Adam, lr 1e-4, batch 64 (2D) / 4 (3D) images, 1000 (2D) / 2000 (3D) epochs; a pair gives two
        # training images (moving and fixed), hence 32 / 2 pairs per batch
        train=TrainConfig(epochs=1000 if dims == 2 else 2000, lr=1e-4, batch_size=32 if dims == 2 else 2,
                          scheduler="constant", log_every=100, checkpoint_every=5000),
        # sec. 3.3: 256 x 256 (2D cardiac MRI), 128^3 (3D CT)
        data=_cardiac_data(dims, (256, 256), (128, 128, 128)),
        source="Zheng et al. 2024 (DRDM), sec. 2-3.3 and Appendix A; official def_diff_rec RecResACNet and configs",
    )


# ----------------------------------------------------------------------------------------------------------------
# CorrMLP (Meng et al., CVPR 2024) and FlowReg (Fu et al., arXiv 2603.01073, 2026): no full text in this project;
# the values come from FlowReg's official code (mathpluscode/FlowReg at commit 286411e: corrmlp/train.yaml,
# flowreg/train.yaml, flowreg/train.py, data/util.py)
# ----------------------------------------------------------------------------------------------------------------

#: FlowReg's ACDC volumes: data/util.py VOLUME_SHAPE (32, 128, 128) at SPACING (3.15, 1.5, 1.5) mm (z, y, x)
FLOWREG_SPACING = (3.15, 1.5, 1.5)


def _corrmlp_model(dims: int, profile: str) -> dict[str, Any]:
    """CorrMLP's network and loss: encoder 8 and decoder 16 channels, NCC window 9, regularisation weight 1.0
    (``corrmlp/train.yaml``), the smoothness in mm at the ACDC spacing (``utils/losses.py`` ``Grad``); the quick
    profile halves the widths (4, 8) for a 2-core CPU and uses unit spacing (the phantom)."""
    quick = profile == "quick"
    return dict(in_channels=1, enc_channels=4 if quick else 8, dec_channels=8 if quick else 16, ncc_window=9,
                reg_weight=1.0, spacing=None if quick or dims == 2 else list(FLOWREG_SPACING))


@register_profile("corrmlp")
def _corrmlp_profile(profile: str, dims: int | None) -> MethodConfig:
    if profile == "quick":
        dims = dims or 2
        return MethodConfig(
            method="corrmlp", profile=profile, model=_corrmlp_model(dims, profile),
            # lr 1e-3 (the official 1e-4 is far too slow for minutes on a CPU), as VoxelMorph's quick profile
            train=TrainConfig(steps=600 if dims == 2 else 150, lr=1e-3, batch_size=1, scheduler="constant",
                              log_every=50, checkpoint_every=200),
            # images in [0, 1]: the official code maps its [-1, 1] volumes with (x + 1) / 2 before the network
            data=DataConfig(dims=dims, size=(64, 64) if dims == 2 else (16, 64, 64), intensity=(0.0, 1.0),
                            phantom=_cardiac_phantom(dims), direction="ed->es"),
            source=QUICK_SOURCE)
    dims = dims or 3
    return MethodConfig(
        method="corrmlp", profile=profile, model=_corrmlp_model(dims, profile),
        # corrmlp/train.yaml: Adam, lr 1e-4, batch 1, 100 epochs (no schedule)
        train=TrainConfig(epochs=100, lr=1e-4, batch_size=1, scheduler="constant", log_every=100,
                          checkpoint_every=2000),
        # ACDC 3D, ED -> ES (train.py default direction "ed2es": fixed ES, moving ED), images in [0, 1]
        data=DataConfig(dims=dims, size=(128, 128) if dims == 2 else (32, 128, 128), intensity=(0.0, 1.0),
                        phantom=_cardiac_phantom(dims), direction="ed->es"),
        source="FlowReg's re-implementation of CorrMLP (mathpluscode/FlowReg corrmlp/, commit 286411e)")


@register_profile("flowreg")
def _flowreg_profile(profile: str, dims: int | None) -> MethodConfig:
    base = _corrmlp_profile(profile, dims)
    dims = base.data.dims
    quick = profile == "quick"
    model = dict(base.model, time_channels=64, ema_momentum=0.99, v_mse_weight=0.0, noise_factor=5.0,
                 sample_steps=5, initial_guess=False)
    if quick:
        # warmup 100 of 600 steps at batch 1 and lr 1e-3 (the CorrMLP quick budget, split as the official 2 of 100
        # epochs would leave too few warmup steps at this scale)
        model.update(warmup_steps=100, warmup_lr=1e-3, warmup_batch=1)
        train = TrainConfig(steps=500 if dims == 2 else 120, lr=1e-3, batch_size=1, scheduler="constant",
                            grad_clip=1.0, log_every=50, checkpoint_every=200)
    else:
        # flowreg/train.yaml: Adam, lr 1e-4, batch 4, 100 epochs of which 2 are warmup (warmup_epochs 2); the 90
        # training volumes of data/acdc.py in batches of 4 make 23 steps per epoch: warmup 46 steps, then 98 epochs
        # of reflow; EMA 0.99, 5 inference steps (num_inference_steps); gradient norm clipped at 1.0 in both phases
        # (train.py)
        model.update(warmup_steps=46, warmup_lr=1e-4, warmup_batch=4)
        train = TrainConfig(epochs=98, lr=1e-4, batch_size=4, scheduler="constant", grad_clip=1.0,
                            log_every=50, checkpoint_every=1000)
    return MethodConfig(method="flowreg", profile=profile, model=model, train=train, data=base.data,
                        source=QUICK_SOURCE if quick else
                        "FlowReg (Fu et al. 2026), official code mathpluscode/FlowReg flowreg/, commit 286411e")

