"""Spatial transforms on dense displacement fields: identity grids, warping, composition, scaling and squaring,
and resampling of fields.

Explained in chapter 01 (``notebooks/01_registration.md``).

Conventions (``book/notation.md``):

* images are ``(B, C, *spatial)`` with ``spatial = (H, W)`` in 2D and ``(D, H, W)`` in 3D (array order);
* a displacement field ``ddf`` is ``(B, ndim, *spatial)`` in **voxel units**; channel ``i`` moves along spatial
  axis ``i`` (array order: channel 0 is the first spatial axis, ``H`` in 2D and ``D`` in 3D);
* warping **pulls**: ``warped(p) = moving(p + ddf(p))``, with linear (or nearest) interpolation and border padding
  (coordinates outside the image are clamped to the nearest border voxel).

This is exactly the convention of :class:`monai.networks.blocks.Warp`: MONAI adds the ddf to a reference grid
built with ``meshgrid(arange(H), arange(W)[, arange(D)], indexing="ij")``, so its channel ``i`` is also the
displacement along spatial axis ``i`` (MONAI reverses the channels to x, y, z only internally, for
``torch.nn.functional.grid_sample``). No conversion is therefore needed; ``tests/test_spatial.py`` checks this
against :func:`scipy.ndimage.map_coordinates`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["identity_grid", "warp", "compose", "integrate", "resize_field", "random_smooth_field", "float32"]


def float32(fn):
    """Decorator: run ``fn`` in float32 with autocast disabled.

    Under mixed precision (``torch.autocast`` with bfloat16/float16) the network's outputs are half precision.
    Displacements, warps and local statistics such as NCC's windowed variances lose too much precision there (NCC in
    bfloat16 diverges to values of -1e9), so every function of :mod:`diffreg.spatial` and :mod:`diffreg.losses`
    casts its floating-point tensor arguments to float32 and computes outside autocast. The cast is unconditional:
    a half-precision tensor passed without autocast (e.g. from a model cast with ``.to(torch.bfloat16)``) is
    upcast too. float64 tensors stay float64 and integer tensors (label maps) are left as they are.

    Output dtype: the function's results are therefore float32 for half-precision or float32 floating inputs (float64
    where the inputs are float64); they are not cast back to the input's half precision.
    """
    import functools

    def cast(x):
        return x.float() if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64 else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [cast(a) for a in args]
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        device_type = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper

_MODES = ("bilinear", "nearest")
_PADDINGS = ("border", "zeros", "reflection")


def _check_field(ddf: Tensor, name: str = "ddf") -> int:
    """Validate a ``(B, ndim, *spatial)`` field with ``ndim`` in {2, 3}; return ``ndim``."""
    if not isinstance(ddf, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ddf).__name__}.")
    ndim = ddf.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(
            f"{name} must have shape (B, ndim, *spatial) with 2 or 3 spatial dimensions, got shape {tuple(ddf.shape)}."
        )
    if ddf.shape[1] != ndim:
        raise ValueError(
            f"{name} has {ddf.shape[1]} channels but {ndim} spatial dimensions; expected shape "
            f"(B, {ndim}, *spatial), got {tuple(ddf.shape)}."
        )
    if not ddf.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {ddf.dtype}.")
    return ndim


def _monai_warp(mode: str, padding_mode: str) -> torch.nn.Module:
    """A fresh :class:`monai.networks.blocks.Warp` (it caches its reference grid by shape only, not by device or
    dtype, so a shared instance would break when devices change; construction is cheap)."""
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
        return Warp(mode=mode, padding_mode=padding_mode)


def identity_grid(shape: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Voxel coordinates of a grid: ``grid[i, *p] = p_i``.

    Explained in chapter 01. The deformation of a displacement ``ddf`` is ``phi(p) = grid(p) + ddf(p)``.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)`` (any number of dimensions >= 1).
        device: device of the result.
        dtype: floating point dtype of the result.

    Returns:
        Tensor of shape ``(ndim, *shape)`` holding voxel coordinates (0 ... n-1 along each axis, array order).

    Raises:
        ValueError: if ``shape`` is empty or has a non-positive entry.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive sizes, got {shape}.")
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


@float32
def warp(image: Tensor, ddf: Tensor, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Pull-warp an image with a displacement field: ``warped(p) = image(p + ddf(p))``.

    Explained in chapter 01. Built on :class:`monai.networks.blocks.Warp` (``grid_sample`` with
    ``align_corners=True``, i.e. voxel centres at integer coordinates 0 ... n-1); MONAI's channel order is the one
    used here (channel ``i`` moves along spatial axis ``i``), so no conversion is done.

    Args:
        image: ``(B, C, *spatial)`` image, any ``C``. Integer images (label maps) are allowed with
            ``mode="nearest"``; they are warped as floats and returned in their own dtype.
        ddf: ``(B, ndim, *spatial)`` displacement in voxel units, same ``B`` and spatial shape as ``image``.
        mode: ``"bilinear"`` (linear in 2D, trilinear in 3D; differentiable in ``image`` and ``ddf``) or
            ``"nearest"`` (for label maps; gradients are zero almost everywhere).
        padding_mode: ``"border"`` (default: out-of-image samples take the nearest border value), ``"zeros"`` or
            ``"reflection"``.

    Returns:
        Warped image, same shape as ``image``; same dtype as ``image`` (for integer images, values are taken from
        the input's label set because nearest interpolation never mixes values).

    Raises:
        ValueError: on bad shapes, an unknown mode or padding, or an integer image with ``mode="bilinear"``.
    """
    ndim = _check_field(ddf)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}.")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if padding_mode not in _PADDINGS:
        raise ValueError(f"padding_mode must be one of {_PADDINGS}, got {padding_mode!r}.")
    if image.ndim != ddf.ndim:
        raise ValueError(
            f"image must be (B, C, *spatial) with {ndim} spatial dims to match ddf {tuple(ddf.shape)}, "
            f"got {tuple(image.shape)}."
        )
    if image.shape[0] != ddf.shape[0] or image.shape[2:] != ddf.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} must share batch size and spatial shape."
        )
    is_float = image.is_floating_point()
    if not is_float and mode != "nearest":
        raise ValueError(f"integer image (dtype {image.dtype}) can only be warped with mode='nearest'.")
    work = image if is_float else image.to(ddf.dtype)
    if work.dtype != ddf.dtype:  # grid_sample needs one dtype; compute in the wider one
        common = torch.promote_types(work.dtype, ddf.dtype)
        work, field = work.to(common), ddf.to(common)
    else:
        field = ddf
    out = _monai_warp(mode, padding_mode)(work, field)
    if not is_float:
        return out.round().to(image.dtype)
    return out.to(image.dtype)


@float32
def compose(a: Tensor, b: Tensor) -> Tensor:
    """Compose two displacement fields, ``a`` applied first (DRDM eq. 5).

    ``compose(a, b)(p) = b(p + a(p)) + a(p)``, i.e. the point map ``p -> p + a(p) -> (p + a(p)) + b(p + a(p))``.
    ``b`` is sampled at ``p + a(p)`` by linear interpolation with border padding (the same :func:`warp`).

    With pull warping the *image* operations come in the reverse order::

        warp(warp(x, b), a)(p) = warp(x, b)(p + a(p)) = x(p + a(p) + b(p + a(p))) = warp(x, compose(a, b))(p)

    (exact in the continuum; interpolation makes it approximate on a grid, best in the interior).

    Explained in chapter 01; used by DRDM (chapter 08).

    Args:
        a: ``(B, ndim, *spatial)`` first displacement, voxel units.
        b: ``(B, ndim, *spatial)`` second displacement, same shape as ``a``.

    Returns:
        ``(B, ndim, *spatial)`` composed displacement.

    Raises:
        ValueError: if the shapes differ or are not fields.
    """
    _check_field(a, "a")
    _check_field(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape.")
    return warp(b, a) + a


@float32
def integrate(svf: Tensor, steps: int = 7) -> Tensor:
    """Integrate a stationary velocity field by scaling and squaring: ``ddf = exp(svf)``.

    ``u_0 = svf / 2**steps`` and ``u_{k+1} = compose(u_k, u_k) = u_k + u_k(p + u_k(p))``; after ``steps``
    squarings ``u`` is the displacement of the time-1 flow of ``svf``. Same as
    :class:`monai.networks.blocks.DVF2DDF` with ``num_steps=steps, mode="bilinear", padding_mode="border"``
    (MONAI's default padding is ``"zeros"``; we use border padding as VoxelMorph does at the image edge).

    Explained in chapter 01; used by VoxelMorph-diff (chapter 02).

    Args:
        svf: ``(B, ndim, *spatial)`` velocity, voxel units (same layout as a ddf).
        steps: number of squarings (>= 0; 0 returns ``svf`` itself).

    Returns:
        ``(B, ndim, *spatial)`` displacement field, voxel units.

    Raises:
        ValueError: on a bad field shape or negative ``steps``.
    """
    _check_field(svf, "svf")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}.")
    ddf = svf / (2 ** int(steps))
    for _ in range(int(steps)):
        ddf = ddf + warp(ddf, ddf, mode="bilinear", padding_mode="border")
    return ddf


@float32
def resize_field(ddf: Tensor, size: Sequence[int]) -> Tensor:
    """Resample a displacement field to a new spatial size and rescale its vectors to the new voxel units.

    The field is resampled with (bi/tri)linear interpolation, ``align_corners=False`` (voxels are cells: voxel
    ``k`` of ``n`` covers ``[k/n, (k+1)/n)`` of the field of view, as in ``torch.nn.functional.interpolate`` and
    MONAI ``Resize``), and component ``i`` is multiplied by ``size[i] / old_size[i]`` so that the displacement in
    physical (field-of-view) units is unchanged: a uniform 2-voxel shift at 16 px becomes a 4-voxel shift at 32 px.

    Explained in chapter 01; used by VoxelMorph-diff (integration at half resolution) and multi-scale models.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement, voxel units of the old grid.
        size: new spatial size, ``ndim`` positive integers.

    Returns:
        ``(B, ndim, *size)`` displacement, voxel units of the new grid.

    Raises:
        ValueError: on a bad field or a ``size`` of the wrong length or with non-positive entries.
    """
    ndim = _check_field(ddf)
    size = tuple(int(s) for s in size)
    if len(size) != ndim or any(s <= 0 for s in size):
        raise ValueError(f"size must be {ndim} positive integers for a {ndim}D field, got {size}.")
    old = tuple(ddf.shape[2:])
    if size == old:
        return ddf
    mode = "bilinear" if ndim == 2 else "trilinear"
    out = F.interpolate(ddf, size=size, mode=mode, align_corners=False)
    scale = torch.tensor([n / o for n, o in zip(size, old)], device=ddf.device, dtype=ddf.dtype)
    return out * scale.view(1, ndim, *([1] * ndim))


def random_smooth_field(batch: int, size: Sequence[int], grids: Sequence[int] = (6,), scale: float = 1.0,
                        generator: torch.Generator | None = None) -> Tensor:
    """A random smooth displacement field: Gaussian noise on coarse grids, upsampled and summed.

    For the ``k``-th entry ``g`` of ``grids`` (0-based), noise ``N(0, (scale / (k + 1))^2)`` is drawn on a
    ``g**ndim`` grid per channel and interpolated to ``size`` (bicubic in 2D, trilinear in 3D, corners aligned);
    the fields of all grids are added. One grid gives a field whose smoothness is set by ``g``; several grids give
    a multi-resolution field like the random B-spline deformations of MRBS (chapter 09's baseline).

    Explained in chapters 01 and 09.

    Args:
        batch: number of fields.
        size: spatial size ``(H, W)`` or ``(D, H, W)``.
        grids: coarse grid sizes (points per axis, >= 2), coarse to fine.
        scale: standard deviation of the first grid's noise, in voxels.
        generator: random generator (the same state gives the same field).

    Returns:
        ``(batch, ndim, *size)`` float32 field in voxels.

    Raises:
        ValueError: a size that is not 2D or 3D, or a grid below 2 points.
    """
    size = tuple(int(s) for s in size)
    ndim = len(size)
    if ndim not in (2, 3):
        raise ValueError(f"size must be 2D or 3D, got {size}")
    if not grids or any(int(g) < 2 for g in grids):
        raise ValueError(f"every grid needs at least 2 points per axis, got {tuple(grids)}")
    mode = "bicubic" if ndim == 2 else "trilinear"
    field = torch.zeros(batch, ndim, *size)
    for k, g in enumerate(grids):
        coarse = torch.randn(batch, ndim, *(int(g),) * ndim, generator=generator) * (scale / (k + 1))
        field = field + F.interpolate(coarse, size=size, mode=mode, align_corners=True)
    return field
