"""A classical, optimisation-based reference: ANTs SyN (Avants et al., Med. Image Anal. 2008) through ``antspyx``.

Explained in chapter 10 (``notebooks/10_benchmark.md``).

DiffuseMorph (brain MR, Table 3) and LDM-Morph (Table 1, Fig. 4) compare with SyN. :class:`ANTsSyN` wraps
``ants.registration(type_of_transform="SyN")`` behind the interface of :class:`~diffreg.models.base.RegistrationModel`,
so :func:`diffreg.evaluate.evaluate` and the benchmark (:mod:`diffreg.bench`) treat it like the learned models; it
has nothing to train. ``antspyx`` is optional and imported only when a pair is registered (``requirements.txt`` says
how to install it next to the pinned stack).

**From an ANTs transform to a diffreg field.** ``ants.registration(fixed, moving)`` returns the forward transforms
(an affine ``.mat`` and a ``Warp.nii.gz``) that map points of the fixed image into the moving image, which is what
pulling the moving image onto the fixed grid needs. ``ants.apply_transforms(..., compose=prefix)`` composes them
into one displacement field sampled on the fixed grid: ``d(x)`` in physical units (mm), such that
``warped(x) = moving(x + d(x))`` for every physical point ``x`` of the fixed image. That is diffreg's pull
convention; what is left is the units and the axis order:

* ``ants.from_numpy`` keeps the array axes as the ITK image axes (axis ``k`` of the numpy array is ITK index ``k``,
  no transposition, unlike SimpleITK's ``GetArrayFromImage``), and the images are built with origin 0 and identity
  direction, so the physical point of voxel ``p`` is ``p * spacing`` and component ``k`` of ``d`` moves along
  array axis ``k``;
* diffreg's ``ddf`` is therefore ``d`` with the components moved first and divided by the spacing of their axis:
  ``ddf[k] = d[..., k] / spacing[k]``, ``(B, ndim, *spatial)`` in voxels.

``tests/test_bench.py`` checks this: ``diffreg.spatial.warp(moving, ddf)`` equals ``ants.apply_transforms(fixed,
moving, fwdtransforms)`` inside the image (2D and 3D, unit and anisotropic spacing, and not with the components
swapped), and on a pair made with a known smooth warp the recovered field matches the inverse of that warp component
by component.

**Parameters** (:data:`SYN_DEFAULTS`; each can be overridden per model or per call,
``register(..., reg_iterations=(40, 20, 10))``):

* ``type_of_transform="SyN"``: ANTsPy's "SyN", an affine stage (Mattes mutual information, 32 bins, regular
  sampling of 20 % of the voxels, shrink factors 4-2-2-1) initialised by aligning the centres of mass, followed by
  symmetric normalisation;
* the SyN stage as LDM-Morph configured it (sec. 4.4: ``-m CC[fixed,moving,1,2] -t SyN[0.25] -r Gauss[3,0.25]
  -i 160x80x40``): local cross-correlation over ``(2 * 2 + 1)^n`` windows (``syn_metric="CC"``,
  ``syn_sampling=2``), ``reg_iterations=(160, 80, 40)`` at shrink factors 4, 2, 1, gradient step 0.25, update
  field smoothing 3 and total field smoothing 0.25 (variances in voxels: ``SyN[0.25, 3, 0.25]``);
* ``seed=1``: passed as ``--random-seed``, which makes the random metric sampling of the affine stage
  reproducible. ANTs seeds from the clock for seed 0, so it must be non-zero (``None``: not reproducible);
* ``threads=1``: sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, which ITK reads once, when the first ANTs
  registration of the process starts; with the seed, repeated runs on one machine give identical fields.

With these settings a 64 x 64 phantom pair takes 0.5-1 s on one CPU thread (held-out phantom pairs: Dice
0.71 -> 0.97, no folding); a 16 x 64 x 64 volume about 40 s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffreg.models.base import RegistrationModel, RegistrationResult, check_pair
from diffreg.spatial import warp

__all__ = ["ANTsSyN", "ants_available", "SYN_DEFAULTS"]

#: the ``ants.registration`` keyword arguments :class:`ANTsSyN` uses (see the module docstring)
SYN_DEFAULTS: dict[str, Any] = dict(
    type_of_transform="SyN",
    syn_metric="CC",
    syn_sampling=2,
    reg_iterations=(160, 80, 40),
    grad_step=0.25,
    flow_sigma=3.0,
    total_sigma=0.25,
)


def ants_available() -> bool:
    """Whether ``antspyx`` can be imported (``import ants``)."""
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ants():
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("ANTsSyN needs antspyx (pip install -r requirements.txt installs it)") \
            from exc
    return ants


class ANTsSyN(RegistrationModel):
    """ANTs SyN registration of one pair at a time (no training), with diffreg's interface.

    ``register(moving, fixed)`` registers every batch item on the CPU with ``ants.registration`` and returns the
    forward transform as a diffreg displacement (module docstring). The module holds no weights; one empty,
    non-trainable parameter records its device, so ``model.to(device)``, ``next(model.parameters())`` and
    :func:`diffreg.evaluate.evaluate` work as for the learned models (results come back on the inputs' device).

    Args:
        dims: 2 or 3.
        spacing: voxel size per spatial axis in array order (e.g. mm); ANTs then smooths and steps in physical
            units. ``None``: 1 per axis.
        seed: random seed of ``antsRegistration`` (non-zero; ``None``: seeded from the clock, not reproducible).
        threads: ITK threads (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; only effective before the process's first
            ANTs registration); ``None``: leave the environment alone.
        **ants_options: ``ants.registration`` keyword arguments replacing :data:`SYN_DEFAULTS`.

    Raises:
        ValueError: bad ``dims``, ``spacing`` or ``seed``.

    Example::

        syn = ANTsSyN(dims=2)
        result = syn.register(moving, fixed)    # moving, fixed: (B, 1, H, W)
        result.ddf                              # (B, 2, H, W) in voxels: warp(moving, result.ddf) ~ fixed
    """

    def __init__(self, dims: int = 2, spacing: Sequence[float] | None = None, seed: int | None = 1,
                 threads: int | None = 1, **ants_options: Any) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims!r}")
        if spacing is not None and (len(spacing) != dims or any(float(s) <= 0 for s in spacing)):
            raise ValueError(f"spacing must hold {dims} positive values (array order), got {spacing!r}")
        if seed is not None and int(seed) == 0:
            raise ValueError("seed must be non-zero (antsRegistration seeds from the clock for 0) or None")
        self.dims = dims
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * dims
        self.seed = None if seed is None else int(seed)
        self.threads = threads
        self.ants_options = {**SYN_DEFAULTS, **ants_options}
        # records the device for evaluate(); holds no weights (num_parameters() is 0)
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.ants_options.items())
        return f"dims={self.dims}, spacing={self.spacing}, seed={self.seed}, threads={self.threads}, {opts}"

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SyN optimises each pair on its own: there is nothing to train.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("ANTsSyN is not trained: it optimises every pair in register()")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, **options: Any) -> torch.Tensor:
        """The SyN displacement ``(B, dims, *spatial)`` in voxels (see :meth:`register`)."""
        return self.register(moving, fixed, **options).ddf

    @torch.no_grad()
    def register(self, moving: torch.Tensor, fixed: torch.Tensor, transforms_dir: str | Path | None = None,
                 **options: Any) -> RegistrationResult:
        """Register every pair of the batch with ANTs SyN.

        Args:
            moving, fixed: ``(B, 1, *spatial)`` images (any intensity range).
            transforms_dir: keep the ANTs forward transforms of item ``b`` in ``transforms_dir / f"{b}"`` (their
                paths in ``extras["fwdtransforms"]``, the list ``ants.apply_transforms`` takes); default: deleted.
            **options: ``ants.registration`` keyword arguments for this call (override the constructor's).

        Returns:
            :class:`RegistrationResult` with ``ddf`` ``(B, dims, *spatial)`` in voxels (pull convention, on the
            inputs' device, float32), ``warped`` = ``diffreg.spatial.warp(moving, ddf)``, and ``extras``:
            ``"warped_ants"`` (ANTs' own linear resampling of ``moving``, zero outside the image), ``"options"``
            (the ``ants.registration`` arguments used) and, with ``transforms_dir``, ``"fwdtransforms"``.

        Raises:
            ValueError: bad shapes (see :func:`~diffreg.models.base.check_pair`) or non-finite images.
        """
        check_pair(moving, fixed, self.dims)
        for name, x in (("moving", moving), ("fixed", fixed)):
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} holds NaN or Inf values")
        if self.threads is not None:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(self.threads))
        ants = _import_ants()
        kwargs = {**self.ants_options, **options}
        fields, warped_ants, transforms = [], [], []
        previous_seed = ants.config._random_seed
        # ANTsPy passes --random-seed only from this module-level setting (ants.set_ants_deterministic also sets
        # it, but then refuses the non-"Repro" transforms such as "SyN")
        ants.config._random_seed = self.seed
        try:
            for b in range(moving.shape[0]):
                m = moving[b, 0].detach().float().cpu().numpy()
                f = fixed[b, 0].detach().float().cpu().numpy()
                keep = Path(transforms_dir) / str(b) if transforms_dir is not None else None
                u, w, tx = self._register_one(ants, m, f, kwargs, keep)
                fields.append(u)
                warped_ants.append(w)
                transforms.append(tx)
        finally:
            ants.config._random_seed = previous_seed
        ddf = torch.from_numpy(np.stack(fields)).to(device=moving.device, dtype=torch.float32)
        extras: dict[str, Any] = {
            "warped_ants": torch.from_numpy(np.stack(warped_ants))[:, None].to(moving.device),
            "options": {**kwargs, "seed": self.seed, "spacing": self.spacing},
        }
        if transforms_dir is not None:
            extras["fwdtransforms"] = transforms
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf.to(moving.dtype)), extras=extras)

    def _register_one(self, ants, moving: np.ndarray, fixed: np.ndarray, kwargs: dict[str, Any],
                      keep: Path | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """One pair of ``*spatial`` arrays -> (ddf ``(dims, *spatial)`` in voxels, ANTs-warped moving, kept
        transform paths)."""
        spacing = self.spacing
        f_img = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=spacing)
        m_img = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=spacing)
        with tempfile.TemporaryDirectory(prefix="diffreg-syn-") as tmp:
            prefix = os.path.join(tmp, "syn_")
            out = ants.registration(f_img, m_img, outprefix=prefix, **kwargs)
            fwd = list(out["fwdtransforms"])
            # one displacement field on the fixed grid, physical units (x + d(x) is where moving is read)
            composed = ants.apply_transforms(f_img, m_img, fwd, compose=prefix + "total_")
            if composed is None or not os.path.isfile(composed):
                raise RuntimeError(f"ants.apply_transforms did not write the composed field for {fwd}")
            field = ants.image_read(composed).numpy()  # (*spatial, dims), component k along array axis k
            kept: list[str] = []
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for path in fwd:
                    kept.append(str(keep / Path(path).name))
                    shutil.copy(path, kept[-1])
            warped_ants = out["warpedmovout"].numpy().astype(np.float32)
        if field.shape != (*fixed.shape, self.dims):
            raise RuntimeError(f"ANTs displacement field has shape {field.shape}, expected {(*fixed.shape, self.dims)}")
        ddf = np.moveaxis(field, -1, 0).astype(np.float32)
        ddf /= np.asarray(spacing, dtype=np.float32).reshape(-1, *([1] * self.dims))
        return ddf, warped_ants, kept
