"""Image similarity and regularisation losses for registration.

Explained in chapters 01 and 02 (``notebooks/01_registration.md``, ``notebooks/02_voxelmorph.md``).

Functional layer (``ncc``, ``ncc_map``, ``ncc_loss``, ``ssim``, ``ssim_loss``, ``mse``, ``gradient_smoothness``) plus
thin :class:`torch.nn.Module` wrappers (:class:`NCCLoss`, :class:`GradientSmoothness`). Scores (``ncc``, ``ssim``)
are "higher is better"; ``*_loss`` functions are "lower is better".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffreg.spatial import float32

__all__ = [
    "box_mean", "ncc_map", "ncc", "ncc_loss", "NCCLoss", "ssim", "ssim_loss", "mse", "gradient_smoothness", "GradientSmoothness",
]


def _check_pair(a: Tensor, b: Tensor) -> int:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError("a and b must be torch tensors.")
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape.")
    ndim = a.ndim - 2
    if ndim not in (1, 2, 3):
        raise ValueError(f"images must be (B, C, *spatial) with 1-3 spatial dims, got {tuple(a.shape)}.")
    return ndim


def _check_weight(weight: Tensor | None, ref: Tensor) -> None:
    if weight is None:
        return
    if weight.ndim != ref.ndim or weight.shape[0] != ref.shape[0] or weight.shape[2:] != ref.shape[2:] or \
            weight.shape[1] not in (1, ref.shape[1]):
        raise ValueError(
            f"weight must be (B, 1 or C, *spatial) matching {tuple(ref.shape)}, got {tuple(weight.shape)}."
        )


# ----------------------------------------------------------------------------------------------------------------
# Local normalised cross-correlation
# ----------------------------------------------------------------------------------------------------------------

def _check_window(window: int) -> int:
    if int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}.")
    return int(window)


def box_mean(x: Tensor, window: int) -> Tensor:
    """Mean of ``x`` over the ``window**ndim`` box around every voxel, counting only the voxels inside the image.

    Separable: per axis, a zero-padded box sum (:func:`torch.nn.functional.avg_pool1d/2d/3d` over the padded axis)
    divided by the number of voxels of the window inside the image along that axis (the count of an axis-aligned
    box is the product of the per-axis counts, so the per-axis means compose to the box mean exactly). Works for
    images smaller than the window.

    Args:
        x: ``(B, C, *spatial)`` tensor with 1-3 spatial dims.
        window: odd box size in voxels.

    Returns:
        Tensor of the shape of ``x``.
    """
    ndim = x.ndim - 2
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[ndim - 1]
    r = window // 2
    for axis in range(ndim):
        kernel = [1] * ndim
        kernel[axis] = window
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = r  # F.pad lists the last axis first
        n = x.shape[2 + axis]
        ones = torch.ones((1, 1) + (1,) * axis + (n,) + (1,) * (ndim - 1 - axis), dtype=x.dtype, device=x.device)
        count = pool(F.pad(ones, pad), kernel_size=tuple(kernel), stride=1)  # fraction of the window inside
        x = pool(F.pad(x, pad), kernel_size=tuple(kernel), stride=1) / count
    return x


#: the variance floor of :func:`ncc_map`, relative to each image's own variance
NCC_EPS = 1e-5


@float32
def ncc_map(a: Tensor, b: Tensor, window: int = 9) -> Tensor:
    """Voxel-wise squared local normalised cross-correlation over the part of each window inside the image.

    For each voxel ``p``, with ``W(p)`` the ``window**ndim`` box around ``p`` **clipped to the image** and ``E``
    the mean over ``W(p)``::

        cross = E[a b] - E[a] E[b],   var_a = E[a^2] - E[a]^2,   var_b likewise
        cc(p) = cross^2 / (max(var_a, eps_a) * max(var_b, eps_b))

    i.e. the squared Pearson correlation of ``a`` and ``b`` over the window (VoxelMorph's LNCC before the mean).
    ``eps_a = NCC_EPS * Var(a)`` (the variance of the whole image ``a``, per batch item and channel) keeps flat
    windows at ``cc = 0``; being relative, it keeps ``cc`` exactly invariant to positive and negative affine
    intensity changes of either image, ``cc(s a + t, s' b + t') = cc(a, b)``, **also at the border**: images may
    be in [-1, 1] or [0, 1] without changing a value. Each image is first shifted so that its first voxel (a
    corner, background in medical images) is 0: exact by the invariance, and the float32 moments of flat
    background windows then vanish instead of cancelling to rounding noise.

    Relation to the usual implementations: in the interior (window entirely inside the image) this is MONAI's
    :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` (``kernel_type="rectangular"``; its output is
    ``-cc``) and VoxelMorph's ``NCC``, up to the stabiliser (VoxelMorph adds 1e-5 to ``var_a * var_b`` in sum units,
    MONAI clamps each variance at 1e-5). At the border those **zero-pad**: windows see zeros outside the image, so
    for images whose background is -1 every border window sees an artificial edge that is the same in both images
    and scores ``cc`` near 1 for any pair (offsets change the value). VoxelMorph's official code works on [0, 1]
    images, where the zero padding resembles the background. The official ``crossCorrelation3D`` of DiffuseMorph
    and FSDiffReg takes images in [-1, 1] and rescales only the fixed image (``target``) to [0, 1], leaving the
    warped moving image in [-1, 1] (a one-sided shift): the padding then resembles the fixed image's background
    but sits mid-range for the warped image, so border windows see a step in the warped image only. This map drops
    the padding instead: it agrees with all of them wherever the window is not clipped (up to the stabiliser), and
    has no border band for any intensity range.

    Explained in chapter 01.

    Args:
        a: ``(B, C, *spatial)`` image.
        b: ``(B, C, *spatial)`` image.
        window: odd box size in voxels (same along every axis).

    Returns:
        ``(B, C, *spatial)`` map of ``cc`` in [0, 1] (1 where ``b`` is an affine function of ``a`` in the window).

    Raises:
        ValueError: on mismatched shapes or an even/non-positive ``window``.
    """
    _check_pair(a, b)
    window = _check_window(window)
    axes = tuple(range(2, a.ndim))
    first = (slice(None), slice(None)) + (slice(0, 1),) * (a.ndim - 2)
    a = a - a[first].detach()  # the first voxel's value becomes 0: a flat background (at the border) is exactly 0
    b = b - b[first].detach()
    floor_a = NCC_EPS * a.var(axes, keepdim=True, unbiased=False).detach() + 1e-12
    floor_b = NCC_EPS * b.var(axes, keepdim=True, unbiased=False).detach() + 1e-12
    mean_a, mean_b = box_mean(a, window), box_mean(b, window)
    cross = box_mean(a * b, window) - mean_a * mean_b
    var_a = box_mean(a * a, window) - mean_a * mean_a
    var_b = box_mean(b * b, window) - mean_b * mean_b
    return cross * cross / (torch.maximum(var_a, floor_a) * torch.maximum(var_b, floor_b))


@float32
def ncc(a: Tensor, b: Tensor, window: int = 9, weight: Tensor | None = None) -> Tensor:
    """Local normalised cross-correlation score (higher is better): ``mean(weight * cc)`` over voxels and channels.

    ``cc`` is :func:`ncc_map` (squared local correlation, VoxelMorph definition, windows clipped to the image, so
    invariant to affine intensity changes everywhere).
    A voxel-wise ``weight`` (``(B, 1, *spatial)``) gives the score-weighted NCC of FSDiffReg (chapter 05):
    ``ncc(a, b, window, weight=w) = mean(w * cc)``.

    Explained in chapter 01.

    Args:
        a: ``(B, C, *spatial)`` image (e.g. the warped moving image).
        b: ``(B, C, *spatial)`` image (e.g. the fixed image).
        window: odd box size.
        weight: optional ``(B, 1 or C, *spatial)`` non-negative voxel weights.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: on mismatched shapes, bad ``window`` or ``weight``.
    """
    cc = ncc_map(a, b, window)
    if weight is None:
        return cc.mean()
    _check_weight(weight, cc)
    return (weight * cc).mean()


def ncc_loss(a: Tensor, b: Tensor, window: int = 9, weight: Tensor | None = None) -> Tensor:
    """LNCC loss (lower is better): ``-ncc(a, b, window, weight)``, in [-1, 0] for weights in [0, 1].

    Explained in chapter 01; VoxelMorph's similarity term (chapter 02).
    """
    return -ncc(a, b, window, weight)


class NCCLoss(nn.Module):
    """Module wrapper of :func:`ncc_loss`: ``NCCLoss(window=9)(a, b, weight=None) = -ncc``."""

    def __init__(self, window: int = 9) -> None:
        super().__init__()
        self.window = _check_window(window)

    def forward(self, a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
        return ncc_loss(a, b, self.window, weight)

    def extra_repr(self) -> str:
        return f"window={self.window}"


# ----------------------------------------------------------------------------------------------------------------
# SSIM and MSE
# ----------------------------------------------------------------------------------------------------------------

@float32
def ssim(a: Tensor, b: Tensor, kernel: int = 9, data_range: float | None = None, kernel_type: str = "gaussian",
         sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004), mean over the valid windows, channels and batch.

    Computed by ``monai.metrics.regression.compute_ssim_and_cs`` (the function behind :class:`monai.metrics.SSIMMetric`
    and :class:`monai.losses.SSIMLoss`: windows without padding, ``k1 = 0.01``, ``k2 = 0.03``, float32).

    Explained in chapter 01.

    Args:
        a: ``(B, C, *spatial)`` image, 2D or 3D; every spatial size >= ``kernel``.
        b: ``(B, C, *spatial)`` reference image.
        kernel: window size.
        data_range: intensity range ``L`` in the constants ``(k L)^2``; default ``max(b) - min(b)`` (detached).
        kernel_type: ``"gaussian"`` (sigma ``sigma``) or ``"uniform"``.
        sigma: Gaussian window SD in voxels.

    Returns:
        Scalar tensor, 1 for identical images.

    Raises:
        ValueError: on mismatched shapes, 1D images, windows larger than the image or a non-positive range.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    ndim = _check_pair(a, b)
    if ndim not in (2, 3):
        raise ValueError(f"ssim needs 2D or 3D images, got shape {tuple(a.shape)}.")
    if any(s < kernel for s in a.shape[2:]):
        raise ValueError(f"every spatial size must be >= kernel={kernel}, got {tuple(a.shape)}.")
    if kernel_type not in ("gaussian", "uniform"):
        raise ValueError(f"kernel_type must be 'gaussian' or 'uniform', got {kernel_type!r}.")
    if data_range is None:
        data_range = float((b.max() - b.min()).detach())
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}.")
    ssim_map, _ = compute_ssim_and_cs(a, b, spatial_dims=ndim, kernel_size=(int(kernel),) * ndim,
                                      kernel_sigma=(float(sigma),) * ndim, data_range=float(data_range),
                                      kernel_type=kernel_type, k1=0.01, k2=0.03)
    return ssim_map.mean()


def ssim_loss(a: Tensor, b: Tensor, kernel: int = 9, data_range: float | None = None,
              kernel_type: str = "gaussian", sigma: float = 1.5) -> Tensor:
    """``1 - ssim(a, b, ...)`` (lower is better); see :func:`ssim`."""
    return 1 - ssim(a, b, kernel, data_range, kernel_type, sigma)


@float32
def mse(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error ``mean(weight * (a - b)^2)`` over all elements (``weight`` optional, broadcastable).

    Explained in chapter 01.

    Raises:
        ValueError: on mismatched shapes.
    """
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape.")
    d = (a - b) ** 2
    if weight is None:
        return d.mean()
    return (weight * d).mean()


# ----------------------------------------------------------------------------------------------------------------
# Regularisation
# ----------------------------------------------------------------------------------------------------------------

@float32
def gradient_smoothness(ddf: Tensor, penalty: str = "l2") -> Tensor:
    """Diffusion regulariser of a displacement field, exactly VoxelMorph's ``Grad(penalty)``.

    With forward differences ``D_j u = u[..., x_j + 1, ...] - u[..., x_j, ...]`` along each spatial axis ``j``::

        L = (1 / ndim) * sum_j mean_{b, i, voxels}( |D_j u_i|^2 )      (penalty "l2"; |D_j u_i| for "l1")

    i.e. the mean over axes of the per-axis means over batch, channels and voxels. The papers write
    ``sum_p ||grad u(p)||^2``; the implementations use this mean, which is ``1 / (ndim^2)`` times the
    voxel-average of ``||grad u||_F^2`` (up to the border). Not MONAI's ``BendingEnergyLoss`` (second derivatives).
    A linear field ``u_0 = a x_0`` (other channels zero) in 2D gives ``a^2 / 4`` ("l2").

    Explained in chapter 01; VoxelMorph's regulariser (chapter 02).

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement or velocity, ``ndim`` in {1, 2, 3}, >= 2 voxels per axis.
        penalty: ``"l2"`` (squared differences) or ``"l1"`` (absolute differences).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: on a bad shape or unknown penalty.
    """
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}.")
    if not isinstance(ddf, torch.Tensor) or ddf.ndim < 3 or ddf.shape[1] != ddf.ndim - 2:
        shape = tuple(ddf.shape) if isinstance(ddf, torch.Tensor) else type(ddf).__name__
        raise ValueError(f"ddf must be a tensor (B, ndim, *spatial) with ndim channels, got {shape}.")
    ndim = ddf.ndim - 2
    if any(s < 2 for s in ddf.shape[2:]):
        raise ValueError(f"ddf needs >= 2 voxels along every axis, got {tuple(ddf.shape)}.")
    total = ddf.new_zeros(())
    for j in range(ndim):
        d = torch.diff(ddf, dim=2 + j)
        total = total + (d * d if penalty == "l2" else d.abs()).mean()
    return total / ndim


class GradientSmoothness(nn.Module):
    """Module wrapper of :func:`gradient_smoothness`."""

    def __init__(self, penalty: str = "l2") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}.")
        self.penalty = penalty

    def forward(self, ddf: Tensor) -> Tensor:
        return gradient_smoothness(ddf, self.penalty)

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}"
