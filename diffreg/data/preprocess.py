"""Preprocessing of images and label maps, written once for the datasets and for registering files.

Explained in chapter 01 (data) and ``book/reproducing.md`` ("Preprocessing", "Registering your own images"). The
datasets (:class:`diffreg.data.ACDCPairs`, :class:`diffreg.data.CAMUSPairs`, :class:`diffreg.data.PhantomPairs`)
and :class:`diffreg.apply.Preprocessing` (used by :func:`diffreg.apply.register_files`) call these functions; none
of them reads or writes a file.

* intensities: :func:`normalize_intensity` (clip at a percentile, min-max to [0, 1]) and :func:`to_range` (linear
  map of [0, 1] to the dataset's range, e.g. [-1, 1]);
* single steps: :func:`resize`, :func:`resample`, :func:`pad_or_crop`, :func:`square_box`, :func:`crop_box`;
* whole geometries, which return the arrays together with their :class:`GridMap` (where the output grid lies in
  the input grid) from the same code: :func:`fit_volume` (resample to a voxel size, centre crop/pad; ACDC volumes),
  :func:`fit_square` (a square region resized and padded; ACDC slices) and :func:`fit_resize` (the whole image
  resized; CAMUS).

All arrays are in array order (``(H, W)`` or ``(D, H, W)``), spacings in mm in the same order. Images are float32,
label maps integers (uint8 after any resizing: one-hot maps are interpolated and the arg-max taken).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "normalize_intensity",
    "to_range",
    "resize",
    "resample",
    "pad_or_crop",
    "square_box",
    "crop_box",
    "GridMap",
    "Prepared",
    "fit_volume",
    "fit_square",
    "fit_resize",
]


# ----------------------------------------------------------------------------------------------------------------
# intensities
# ----------------------------------------------------------------------------------------------------------------


def normalize_intensity(arr: np.ndarray, clip_percentile: float | None = 99.5) -> np.ndarray:
    """Clip at the ``clip_percentile``-th percentile (upper) and min-max scale to [0, 1] (float32, same shape).

    ``clip_percentile=None``: no clipping. A constant array gives zeros.
    """
    arr = np.asarray(arr, dtype=np.float32)
    if clip_percentile is not None:
        arr = np.minimum(arr, np.percentile(arr, clip_percentile))
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-8:
        return np.zeros_like(arr)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def to_range(arr: np.ndarray, intensity: tuple[float, float]) -> np.ndarray:
    """Map [0, 1] linearly to ``intensity = (lo, hi)`` (MONAI ``ScaleIntensity`` semantics; float32, same shape)."""
    lo, hi = intensity
    return (arr * (hi - lo) + lo).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# single steps
# ----------------------------------------------------------------------------------------------------------------


def resize(arr: np.ndarray, shape: Sequence[int], label: bool = False) -> np.ndarray:
    """Resize a 2D or 3D array to ``shape`` (linear, ``align_corners=False``; anti-aliased when shrinking in 2D).

    Labels (``label=True``) are resized through their one-hot maps and an arg-max; returns uint8 for labels,
    float32 for images (a copy, also when the shape is already ``shape``).
    """
    shape = tuple(int(s) for s in shape)
    if tuple(arr.shape) == shape:
        return arr.astype(np.uint8 if label else np.float32, copy=True)
    nd = arr.ndim
    mode = "bilinear" if nd == 2 else "trilinear"
    antialias = nd == 2 and any(s < a for s, a in zip(shape, arr.shape))
    if label:
        lab = torch.from_numpy(np.asarray(arr, dtype=np.int64))
        k = int(lab.max()) + 1
        onehot = F.one_hot(lab, max(k, 2)).movedim(-1, 0).float()[None]
        out = F.interpolate(onehot, size=shape, mode=mode, align_corners=False, antialias=antialias)
        return out[0].argmax(0).numpy().astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=shape, mode=mode, align_corners=False, antialias=antialias)
    return out[0, 0].numpy()


def _resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The shape that covers ``shape`` voxels of ``spacing`` mm with voxels of ``target`` mm (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(arr: np.ndarray, spacing: Sequence[float], target: Sequence[float],
             label: bool = False) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resample to voxel size ``target`` (mm, array order) with :func:`resize`. Returns the array and its actual
    spacing (``spacing * old_shape / new_shape``, equal to ``target`` up to rounding of the shape)."""
    new = _resampled_shape(arr.shape, spacing, target)
    actual = tuple(float(n * s / m) for n, s, m in zip(arr.shape, spacing, new))
    return resize(arr, new, label=label), actual


def pad_or_crop(arr: np.ndarray, shape: Sequence[int], value: float = 0.0) -> np.ndarray:
    """Centre crop or pad to ``shape`` (MONAI ``ResizeWithPadOrCrop``: pad ``(d // 2, d - d // 2)``, crop from
    ``n // 2 - s // 2``)."""
    out = np.asarray(arr)
    for ax, s in enumerate(shape):
        n = out.shape[ax]
        if n > s:
            start = n // 2 - s // 2
            out = np.take(out, np.arange(start, start + s), axis=ax)
        elif n < s:
            d = s - n
            pad = [(0, 0)] * out.ndim
            pad[ax] = (d // 2, d - d // 2)
            out = np.pad(out, pad, constant_values=value)
    return np.ascontiguousarray(out)


def square_box(mask2d: np.ndarray | None, shape: tuple[int, int], margin: float = 1.0) -> tuple[int, int, int]:
    """``(row0, col0, side)`` of a square box in a 2D grid of ``shape``: centred on ``mask2d``'s bounding box with
    side ``margin`` x its larger side (at least 16 pixels), or, without a mask (or an empty one), the whole image
    padded to a centred square."""
    if mask2d is None or not mask2d.any():
        side = max(shape)
        return (shape[0] - side) // 2, (shape[1] - side) // 2, side
    rows, cols = np.nonzero(mask2d)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(16, int(math.ceil(max(r1 - r0, c1 - c0) * margin)))
    cy, cx = (r0 + r1) / 2, (c0 + c1) / 2
    return int(round(cy - side / 2)), int(round(cx - side / 2)), side


def crop_box(arr: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """Crop the last two axes to the square ``box`` (:func:`square_box`), zero-padding where it leaves the image."""
    r0, c0, side = box
    H, W = arr.shape[-2:]
    out = np.zeros(arr.shape[:-2] + (side, side), dtype=arr.dtype)
    rs, re_ = max(r0, 0), min(r0 + side, H)
    cs, ce = max(c0, 0), min(c0 + side, W)
    if rs < re_ and cs < ce:
        out[..., rs - r0:re_ - r0, cs - c0:ce - c0] = arr[..., rs:re_, cs:ce]
    return out


# ----------------------------------------------------------------------------------------------------------------
# whole geometries: arrays and their grid map from one code path
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridMap:
    """Where the output (network) grid lies in an input image's grid: ``p = scale * r + offset`` per array axis.

    Attributes:
        shape: the output grid's shape, array order.
        scale: input voxels per output voxel, per array axis.
        offset: the input's (continuous) array index of output voxel 0, per array axis.
        spacing: the output grid's voxel size in mm, array order (``input spacing * scale``).
    """

    shape: tuple[int, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    spacing: tuple[float, ...]

    def to_image(self, r: np.ndarray) -> np.ndarray:
        """Output (network) indices ``(ndim, ...)`` -> input image indices (array order)."""
        a, b = np.asarray(self.scale), np.asarray(self.offset)
        shape = (-1,) + (1,) * (np.ndim(r) - 1)
        return np.asarray(r) * a.reshape(shape) + b.reshape(shape)

    def to_network(self, p: np.ndarray) -> np.ndarray:
        """Input image indices ``(ndim, ...)`` -> output (network) indices (array order)."""
        a, b = np.asarray(self.scale), np.asarray(self.offset)
        shape = (-1,) + (1,) * (np.ndim(p) - 1)
        return (np.asarray(p) - b.reshape(shape)) / a.reshape(shape)


@dataclass
class Prepared:
    """What :func:`fit_volume`, :func:`fit_square` and :func:`fit_resize` return.

    Attributes:
        images: the images, float32 of the output shape (intensities unchanged: map them with :func:`to_range`).
        labels: the label maps, uint8 of the output shape.
        grid: the :class:`GridMap` of the output grid in the input grid.
        spacing: the output voxel size in mm (array order), ``spacing * n / m`` at each resizing from ``n`` to
            ``m`` voxels: the spacing the datasets report (equal to ``grid.spacing`` up to rounding).
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    grid: GridMap
    spacing: tuple[float, ...]


class _Steps:
    """Geometric steps applied to images and labels on one grid, keeping the index map ``old = a * new + b``."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], images: Sequence[np.ndarray],
                 labels: Sequence[np.ndarray]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.spacing0 = tuple(float(s) for s in spacing)
        if len(self.spacing0) != len(self.shape):
            raise ValueError(f"{len(self.shape)} axes need {len(self.shape)} spacings, got {self.spacing0}")
        for x in (*images, *labels):
            if tuple(np.shape(x)) != self.shape:
                raise ValueError(f"every array must have the shape {self.shape}, got {tuple(np.shape(x))}")
        self.spacing = self.spacing0
        self.a, self.b = np.ones(len(self.shape)), np.zeros(len(self.shape))
        self.images, self.labels = list(images), list(labels)

    def _resized(self, new: tuple[int, ...]) -> None:  # align_corners=False: old = (new + 0.5) * n / m - 0.5
        r = np.asarray(self.shape, np.float64) / np.asarray(new, np.float64)
        self.b = self.a * (0.5 * r - 0.5) + self.b
        self.a = self.a * r
        self.spacing = tuple(float(s * n / m) for s, n, m in zip(self.spacing, self.shape, new))
        self.shape = new

    def _shifted(self, off: Sequence[float], new: tuple[int, ...]) -> None:  # old = new + off
        self.b = self.b + self.a * np.asarray(off, np.float64)
        self.shape = new

    def resize(self, new: Sequence[int]) -> None:
        new = tuple(int(s) for s in new)
        self.images = [resize(x, new) for x in self.images]
        self.labels = [resize(x, new, label=True) for x in self.labels]
        self._resized(new)

    def resample(self, target: Sequence[float]) -> None:
        self.resize(_resampled_shape(self.shape, self.spacing, target))

    def crop_box(self, box: tuple[int, int, int]) -> None:
        self.images = [crop_box(x, box) for x in self.images]
        self.labels = [crop_box(x, box) for x in self.labels]
        self._shifted(box[:2], (box[2], box[2]))

    def pad_or_crop(self, size: Sequence[int]) -> None:  # MONAI ResizeWithPadOrCrop's centring
        size = tuple(int(s) for s in size)
        self.images = [pad_or_crop(x, size, 0.0) for x in self.images]
        self.labels = [pad_or_crop(x, size, 0) for x in self.labels]
        self._shifted([m // 2 - s // 2 if m > s else -((s - m) // 2) for m, s in zip(self.shape, size)], size)

    def result(self) -> Prepared:
        grid = GridMap(shape=self.shape, scale=tuple(float(v) for v in self.a),
                       offset=tuple(float(v) for v in self.b),
                       spacing=tuple(float(s * v) for s, v in zip(self.spacing0, self.a)))
        return Prepared(self.images, self.labels, grid, self.spacing)


def fit_volume(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float], size: Sequence[int],
               images: Sequence[np.ndarray] = (), labels: Sequence[np.ndarray] = ()) -> Prepared:
    """Resample to the voxel size ``target`` (:func:`resample`), then centre crop/pad to ``size``
    (:func:`pad_or_crop`, images and labels padded with 0): the ACDC volumes of the papers (3.15 x 1.5 x 1.5 mm,
    ``(32, 128, 128)``) and 3D runs.

    Args:
        shape: the input shape (array order); every array has it. No arrays: only the grid map is computed.
        spacing: the input voxel size, mm (array order).
        target: the output voxel size, mm (array order).
        size: the output shape.
        images: float arrays (e.g. :func:`normalize_intensity`'s output).
        labels: integer label maps.

    Returns:
        A :class:`Prepared`.
    """
    steps = _Steps(shape, spacing, images, labels)
    steps.resample(target)
    steps.pad_or_crop(size)
    return steps.result()


def fit_square(shape: Sequence[int], spacing: Sequence[float], inner: Sequence[int], size: Sequence[int],
               images: Sequence[np.ndarray] = (), labels: Sequence[np.ndarray] = (),
               box: tuple[int, int, int] | None = None, square_pixels: bool = False) -> Prepared:
    """A square region of a 2D grid resized to ``inner`` and centre padded/cropped to ``size``: ACDC slices (a
    square around the heart at the ``quick`` profile; the whole slice padded to a square, resized to 112 x 112 and
    padded to 128 x 128 for LDM-Morph) and 2D runs.

    Args:
        shape, spacing: the input grid (array order, mm); every array has the shape ``shape``.
        inner: the size the square is resized to.
        size: the output shape.
        images, labels: as :func:`fit_volume`.
        box: ``(row0, col0, side)`` from :func:`square_box`; ``None``: the whole image padded to a centred square.
        square_pixels: first resample to square pixels (the finest spacing) when the pixel spacing differs by more
            than 1 % between the axes.

    Returns:
        A :class:`Prepared`.

    Raises:
        ValueError: a ``box`` together with a resampling to square pixels (the box would be on the wrong grid).
    """
    steps = _Steps(shape, spacing, images, labels)
    fine = min(steps.spacing)
    if square_pixels and max(steps.spacing) / fine > 1.01:
        if box is not None:
            raise ValueError(f"a box {box} is given on a grid of pixels {steps.spacing} mm that are resampled to "
                             "square pixels first")
        steps.resample((fine, fine))
    steps.crop_box(square_box(None, steps.shape) if box is None else box)
    steps.resize(inner)
    steps.pad_or_crop(size)
    return steps.result()


def fit_resize(shape: Sequence[int], spacing: Sequence[float], size: Sequence[int],
               images: Sequence[np.ndarray] = (), labels: Sequence[np.ndarray] = ()) -> Prepared:
    """The whole image resized to ``size`` (aspect ratio not kept): CAMUS, the echo phantom and their runs.

    Arguments as :func:`fit_volume`; returns a :class:`Prepared`.
    """
    steps = _Steps(shape, spacing, images, labels)
    steps.resize(size)
    return steps.result()
