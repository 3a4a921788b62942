"""Register your own images: NIfTI / MetaImage pairs in, fields that ITK, ANTs and 3D Slicer read out.

Explained in ``book/reproducing.md`` ("Registering your own images"); the command is
``python -m diffreg register --run RUN --moving M --fixed F --out DIR`` (``--pairs pairs.csv`` for many pairs).

**What happens to a pair** (:func:`register_files`):

1. Both files (and the labels) are read and checked by :func:`diffreg.data.io.read_image_file`, the datasets'
   reader (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mhd`` + raw or ``.mha``): a truncated or unreadable file, NaN/Inf
   voxels, a constant image, and a label that does not lie on its image's grid are refused with the file's name.
   SimpleITK gives every image its world geometry in ITK's LPS frame: ``x = origin + direction @ (spacing * k)``
   for the ITK index ``k = (i, j[, k])``. diffreg's array order ``(H, W)`` / ``(D, H, W)`` is SimpleITK's
   ``GetArrayFromImage`` order ``(y, x)`` / ``(z, y, x)``: array axis ``i`` is ITK index axis ``ndim - 1 - i``.
2. **Moving and fixed grids are reconciled first**: the moving image is resampled onto the fixed image's grid in
   world space (SimpleITK ``Resample`` with the fixed image as reference, the identity transform, linear
   interpolation, the moving image's minimum outside it). From there on both images share one grid and are
   preprocessed identically, so the network's field lives in one grid only.
3. Both are preprocessed as the run's profile preprocesses its training data (:class:`Preprocessing`, chosen by
   :func:`preprocessing_for` from the run's ``config.json`` and ``data.json``), with the functions of
   :mod:`diffreg.data.preprocess` that the datasets call: resampling to the profile's voxel size, centre crop/pad,
   intensity clipping and scaling. Every step is an axis-aligned affine map of voxel indices, so the network grid
   relates to the fixed grid by ``p = scale * r + offset`` per array axis (:class:`GridMap`).
4. The run's model registers the pair (``model.register``, sampler options passed through): a displacement ``u`` in
   network voxels, pull convention ``warped(r) = moving(r + u(r))``.
5. The field is brought back to the fixed image's own grid: ``u`` is sampled (linear interpolation; outside the
   network's field of view, the nearest voxel inside it) at the network position of every fixed voxel, scaled to
   fixed voxels (``v(p) = scale * u((p - offset) / scale)``), and turned into a physical displacement in
   millimetres, ``d(x) = direction @ (spacing * v_itk)`` (LPS, ``v_itk`` = ``v`` in ITK index order).

**The output field means**: for each world point ``x`` of the fixed grid, the moving image sampled at ``x + d(x)``
is the warped moving image. This is the ITK convention of a displacement field transform (``T(x) = x + d(x)``, used
by ``SimpleITK.DisplacementFieldTransform`` + ``Resample`` and by ANTs ``antsApplyTransforms`` for a warp field), so
``displacement.nii.gz`` is the field those tools apply to move the moving image onto the fixed one. It is written
by SimpleITK as a vector NIfTI (intent ``VECTOR``, ``dim[5] = ndim``) with the fixed image's geometry; its vectors
are in ITK's LPS world frame (as ANTs writes its warps), not RAS. One exception: for a 3D image with a single slice
(registered by a 2D run) the field is written with that slice repeated once along the slice axis, because ITK's
NIfTI reader turns a vector image with a last axis of size 1 into a 2D image; ITK, ANTs and Slicer then read a 3D
field whose values on the image's slice are the displacement (the returned tensors keep the fixed grid).

**The Jacobian**: ``jacobian.nii.gz`` is ``det`` of the Jacobian of ``x -> x + d(x)`` in world space. The index to
world map is affine, so this equals ``det(I + grad v)`` of the voxel field on the fixed grid, which is what is
computed (:func:`diffreg.metrics.jacobian_determinant`, ``numpy.gradient`` differences).

The warped image (``warped.nii.gz``) is computed directly from the original moving image (one linear interpolation
at ``x + d(x)``, original intensities, coordinates outside the moving image clamped to its border like
:func:`diffreg.spatial.warp`), the warped label with nearest interpolation. Nothing is written but the files of the
output folder, and an output folder that holds an input file is refused: nothing in a user's input folder is ever
written.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffreg.data.io import ImageFile, check_label_grid, read_image_file
from diffreg.data.preprocess import GridMap, fit_resize, fit_square, fit_volume, normalize_intensity, to_range

__all__ = [
    "register_files",
    "register_pairs",
    "RegisteredFiles",
    "Run",
    "open_run",
    "Preprocessing",
    "GridMap",
    "preprocessing_for",
    "read_image",
    "OUTPUT_FILES",
]

PathLike = str | Path
#: The files :func:`register_files` writes into its output folder (``warped_label`` only with a moving label).
OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "warped_label": "warped_label.nii.gz",
    "displacement": "displacement.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "metrics": "metrics.json",
}
#: spacing ratio above which a 3D image whose first array axis is not the coarse one is refused
_SLICE_AXIS_RATIO = 1.5


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK is in requirements.txt
        raise ImportError("registering image files needs SimpleITK: pip install SimpleITK") from exc
    return sitk


# ----------------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------------


def _read(path: PathLike, role: str = "image") -> ImageFile:
    """A 2D or 3D scalar image or label file, read and checked by :func:`diffreg.data.io.read_image_file` with its
    SimpleITK image (:attr:`~diffreg.data.io.ImageFile.itk`, geometry in LPS)."""
    _sitk()
    file = read_image_file(path, role, itk=True)
    img = file.itk
    if img.GetDimension() not in (2, 3):
        raise ValueError(f"{file.path}: a {img.GetDimension()}D image of size {img.GetSize()}; registration takes 2D "
                         "or 3D images (for a time series, extract one frame first)")
    return file


def read_image(path: PathLike, what: str = "image"):
    """Read a 2D or 3D scalar image with :func:`diffreg.data.io.read_image_file`, with checks whose errors name the
    file, and return its SimpleITK image.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.mhd`` (+ its raw file) or ``.mha``.
        what: ``"image"`` (finite, not constant) or ``"label"`` (non-negative integers).

    Returns:
        The ``SimpleITK.Image`` (geometry in LPS: origin, spacing, direction).

    Raises:
        FileNotFoundError: the file (or a MetaImage's raw data file) does not exist.
        ValueError: unknown extension, unreadable, corrupt or truncated file, a vector (multi-component) image, a
            dimension other than 2 or 3, NaN/Inf voxels or a constant image, labels that are not non-negative
            integers.
    """
    return _read(path, what).itk


def _geometry(img) -> tuple[np.ndarray, np.ndarray]:
    """``(origin, L)`` of an image: world ``x = origin + L @ k`` for the ITK index ``k`` (LPS, mm)."""
    n = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(n, n)
    return np.asarray(img.GetOrigin(), dtype=np.float64), direction * np.asarray(img.GetSpacing(), np.float64)[None]


def _same_grid(a, b, tol: float = 1e-4) -> bool:
    """Same size, and origin / spacing / direction equal up to ``tol`` (relative to the spacing for lengths)."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    sp = np.asarray(a.GetSpacing())
    return (np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol * sp.min())
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol))


# ----------------------------------------------------------------------------------------------------------------
# preprocessing of a run's profile, as an index map
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How a run's training data were preprocessed, applied to one image (:meth:`apply`).

    Intensities are clipped at the ``clip_percentile``-th percentile and min-max scaled to [0, 1]
    (:func:`diffreg.data.preprocess.normalize_intensity`) before any resampling, padded with 0, and finally mapped
    to ``intensity`` (:func:`diffreg.data.preprocess.to_range`). The geometry (``mode``) is one of the functions of
    :mod:`diffreg.data.preprocess` that the datasets call, which give the array and its :class:`GridMap` together:

    * ``"resample"`` (3D; ACDC volumes and 3D phantoms; :func:`~diffreg.data.preprocess.fit_volume`): resample to
      the voxel size ``spacing`` (mm, array order), then centre crop/pad to ``size``;
    * ``"square"`` (2D; ACDC slices and short-axis phantoms; :func:`~diffreg.data.preprocess.fit_square`): resample
      to square pixels when the pixel spacing is anisotropic (finest spacing), pad the whole slice to a centred
      square, resize it to ``inner`` and pad/crop to ``size`` (LDM-Morph's 112 in 128). The ACDC ``quick`` profile
      trains on a square around the heart found from the masks; a pair of files has no masks, so the whole slice is
      used: crop your images around the heart to match that field of view;
    * ``"resize"`` (2D; CAMUS and the echo phantom; :func:`~diffreg.data.preprocess.fit_resize`): the whole image
      resized to ``size`` (aspect not kept).

    The ACDC 2D datasets clip and scale the intensities of a whole volume before cutting it into slices; here each
    image is scaled on its own.

    Attributes:
        dims: 2 or 3.
        size: network input size, array order.
        intensity: range the images are mapped to (the run's ``DataConfig.intensity``).
        mode: ``"resample"``, ``"square"`` or ``"resize"``.
        spacing: ``"resample"``: target voxel size in mm (array order).
        inner: ``"square"``: size of the resized square before padding to ``size``.
        clip_percentile: upper intensity clip (``None``: none).
        source: what the training data were (for the report).
    """

    dims: int
    size: tuple[int, ...]
    intensity: tuple[float, float]
    mode: str
    spacing: tuple[float, ...] | None = None
    inner: tuple[int, ...] | None = None
    clip_percentile: float | None = 99.5
    source: str = ""

    def describe(self) -> str:
        """One line: what :meth:`apply` does."""
        if self.mode == "resample":
            geo = (f"resample to {' x '.join(f'{s:.3g}' for s in self.spacing)} mm, centre crop/pad to "
                   f"{tuple(self.size)}")
        elif self.mode == "square":
            geo = f"square pixels, pad to a square, resize to {tuple(self.inner)}, pad/crop to {tuple(self.size)}"
        else:
            geo = f"resize to {tuple(self.size)}"
        clip = f"clip at the {self.clip_percentile:g}th percentile, " if self.clip_percentile is not None else ""
        lo, hi = self.intensity
        return f"{self.source}: {geo}; {clip}min-max to [{lo:g}, {hi:g}]"

    def plan(self, shape: Sequence[int], spacing: Sequence[float]) -> GridMap:
        """The :class:`GridMap` of an image of ``shape`` and ``spacing`` (mm, array order), without the image."""
        return self._run(None, shape, spacing)[1]

    def apply(self, image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, GridMap]:
        """Preprocess ``image`` (array order, ``dims`` axes) with voxel size ``spacing`` (mm, array order).

        Returns:
            ``(array, grid)``: float32 ``size`` array in ``intensity``, and its :class:`GridMap`.

        Raises:
            ValueError: ``image`` has the wrong number of axes, or ``spacing`` the wrong length.
        """
        return self._run(np.asarray(image, dtype=np.float32), np.shape(image), spacing)

    def _run(self, x: np.ndarray | None, shape: Sequence[int], spacing: Sequence[float]):
        """The preprocessed image (``None`` without one) and the :class:`GridMap`, both from the functions of
        :mod:`diffreg.data.preprocess` that the datasets call."""
        shape = tuple(int(s) for s in shape)
        spacing = tuple(float(s) for s in spacing)
        if len(shape) != self.dims or len(spacing) != self.dims:
            raise ValueError(f"a {self.dims}D preprocessing needs {self.dims} axes, got shape {shape} and spacing "
                             f"{spacing}")
        images = [] if x is None else [normalize_intensity(x, self.clip_percentile)]
        if self.mode == "resample":
            fit = fit_volume(shape, spacing, self.spacing, self.size, images)
        elif self.mode == "square":
            fit = fit_square(shape, spacing, self.inner, self.size, images, square_pixels=True)
        elif self.mode == "resize":
            fit = fit_resize(shape, spacing, self.size, images)
        else:
            raise ValueError(f"unknown preprocessing mode {self.mode!r}; valid: resample, square, resize")
        if x is None:
            return None, fit.grid
        return to_range(fit.images[0], self.intensity), fit.grid


def _phantom_spacing_3d(size: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size of :func:`diffreg.data.phantom.make_sax_3d` at ``size`` (its default: 140 mm in plane, 100 mm deep
    with 3-10 mm between slices)."""
    d, h, w = (int(s) for s in size)
    return float(np.clip(100.0 / d, 3.0, 10.0)), 140.0 / h, 140.0 / w


def preprocessing_for(config, data: str | None = None) -> Preprocessing:
    """The :class:`Preprocessing` of a run: its training data's, applied to files.

    Args:
        config: the run's :class:`diffreg.config.MethodConfig` (``data.dims``, ``data.size``, ``data.intensity``,
            ``data.phantom``, ``profile``).
        data: the ``DIFFREG_DATA`` string it was trained on (``RUN/data.json``); ``None`` or ``"phantom"``: the
            configuration's phantom kind.

    Returns:
        3D: ``"resample"`` to ACDC's paper voxel size scaled to the run's size (3.15 x 1.5 x 1.5 mm at
        ``(32, 128, 128)``, :class:`diffreg.data.ACDCPairs`), or to the 3D phantom's voxel size at that size for a
        phantom run. 2D: ``"resize"`` for CAMUS / echo runs (no clipping, as :class:`diffreg.data.CAMUSPairs`),
        ``"square"`` otherwise (``inner`` = 112/128 of the size for an ACDC ``paper`` run, LDM-Morph's).

    Raises:
        ValueError: ``config.data.dims`` is not 2 or 3.
    """
    from diffreg.data.pairs import PAPER_SIZE, PAPER_SPACING

    dc = config.data
    dims, size = int(dc.dims), tuple(int(s) for s in dc.size)
    intensity = (float(dc.intensity[0]), float(dc.intensity[1]))
    spec = (data or "phantom").strip()
    scheme, _, rest = spec.partition(":")
    scheme = scheme.lower()
    kind = (rest or dc.phantom) if scheme == "phantom" else None
    source = f"{config.method} {config.profile} run trained on {spec}"
    if dims == 3:
        if scheme == "phantom":
            spacing = _phantom_spacing_3d(size)
        else:
            spacing = tuple(sp * ps / s for sp, ps, s in zip(PAPER_SPACING, PAPER_SIZE, size))
        return Preprocessing(3, size, intensity, "resample", spacing=spacing, source=source)
    if dims != 2:
        raise ValueError(f"run configuration has dims={dims}; expected 2 or 3")
    if scheme == "camus" or kind == "echo":
        return Preprocessing(2, size, intensity, "resize", clip_percentile=None, source=source)
    ldm = scheme in ("acdc", "acdc-h5") and config.profile == "paper"
    inner = tuple(int(round(s * 112 / 128)) for s in size) if ldm else size
    return Preprocessing(2, size, intensity, "square", inner=inner, source=source)


# ----------------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A loaded registration run.

    Attributes:
        model: the registration model (eval mode).
        config: its :class:`diffreg.config.MethodConfig`.
        data: the ``DIFFREG_DATA`` string it was trained on (``None``: unknown, the configuration's phantom).
        name: the run directory, or a label for an in-memory model.
    """

    model: torch.nn.Module
    config: Any
    data: str | None = None
    name: str = "<model>"

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (the CPU for a model without any)."""
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")


def _refuse_generator(run: Run) -> None:
    """Raise ``ValueError`` when ``run`` is a deformation generator's (its method or its model), which registers no
    pairs."""
    from diffreg.models import MODELS, DeformationGenerator, is_generator

    if is_generator(run.config.method):
        cls = MODELS[run.config.method]
    elif isinstance(run.model, DeformationGenerator):
        cls = type(run.model)
    else:
        return
    raise ValueError(f"{run.name} is a {cls.__name__} run: {cls.refusal()}; train a registration method "
                     "(e.g. --method voxelmorph)")


def open_run(run: PathLike | Run | tuple, device: str | torch.device | None = None) -> Run:
    """A :class:`Run` from a run directory (:func:`diffreg.train.load_run`), a :class:`Run`, or a tuple
    ``(model, config)`` / ``(model, config, data)``.

    Args:
        run: the run.
        device: where the model goes; default :func:`diffreg.device.default_device` for a run directory, and the
            model's own device for a model given in memory.

    Raises:
        FileNotFoundError: a run directory without ``config.json`` or ``checkpoint.pt``.
        ValueError: a run of a deformation generator (DRDM: it generates deformations and does not register pairs;
            :func:`diffreg.models.is_generator`), or a ``run`` of another type.
    """
    from diffreg.device import resolve_device
    from diffreg.runs import RunFolder, load_run

    if isinstance(run, Run):
        out = run
    elif isinstance(run, tuple) and len(run) in (2, 3):
        out = Run(run[0], run[1], run[2] if len(run) == 3 else None)
    elif isinstance(run, (str, Path)):
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        model, cfg = load_run(run_dir, device=resolve_device(device or None))
        out = Run(model, cfg, RunFolder(run_dir).data_spec(), str(run_dir))
    else:
        raise ValueError(f"run must be a run directory, a Run or a (model, config) tuple, got {type(run).__name__}")
    _refuse_generator(out)
    if device is not None and out.device != torch.device(device):
        out.model.to(torch.device(device))
    out.model.eval()
    return out


# ----------------------------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RegisteredFiles:
    """What :func:`register_files` returns.

    Attributes:
        out: the output folder (``None``: nothing written).
        paths: output name (``warped``, ``warped_label``, ``displacement``, ``jacobian``, ``metrics``) -> file.
        metrics: the content of ``metrics.json``.
        displacement: ``(ndim, *spatial)`` float64 physical displacement ``d`` in mm on the fixed grid (array order
            ``spatial``), components ``(x, y[, z])`` in world LPS: the moving image sampled at ``x + d(x)`` is the
            warped image.
        ddf: ``(1, ndim, *spatial)`` float32 displacement in voxels of the fixed grid, diffreg's convention (channel
            ``i`` along array axis ``i``; ``warped(p) = moving_on_fixed_grid(p + ddf(p))``).
        warped: ``(*spatial)`` float32 warped moving image on the fixed grid, original intensities.
        warped_label: ``(*spatial)`` warped moving label (nearest), or ``None``.
        jacobian: ``(*spatial)`` float32 Jacobian determinant (see the module docstring).
        images: the SimpleITK images written (or that would be written), with the fixed image's geometry.
    """

    out: Path | None
    paths: dict[str, Path]
    metrics: dict[str, Any]
    displacement: torch.Tensor
    ddf: torch.Tensor
    warped: torch.Tensor
    warped_label: torch.Tensor | None
    jacobian: torch.Tensor
    images: dict[str, Any] = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# the geometry chain
# ----------------------------------------------------------------------------------------------------------------


def _sample(arr: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """``arr`` (``(*in)`` or ``(C, *in)``) at continuous array indices ``coords`` (``(n, *out)``); linear
    (``order=1``) or nearest (``order=0``) interpolation, coordinates outside clamped to the border."""
    import torch.nn.functional as F

    n = coords.shape[0]
    multi = arr.ndim == n + 1
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t[None] if multi else t[None, None]
    in_shape = t.shape[2:]
    norm = [np.zeros_like(coords[i]) if in_shape[i] == 1 else 2.0 * coords[i] / (in_shape[i] - 1) - 1.0
            for i in range(n)]
    grid = torch.from_numpy(np.stack(norm[::-1], axis=-1).astype(np.float32))[None]
    out = F.grid_sample(t, grid, mode="bilinear" if order else "nearest", padding_mode="border", align_corners=True)
    return out[0].numpy() if multi else out[0, 0].numpy()


def _plane_axes(img, path: Path, dims: int, run_name: str, role: str) -> tuple[int, ...]:
    """The array axes a ``dims``-D run registers over, or a ``ValueError`` naming the file."""
    size_itk = img.GetSize()
    shape = tuple(size_itk[::-1])  # array order
    n = len(shape)
    if any(s < 1 for s in shape):  # pragma: no cover - SimpleITK never returns these
        raise ValueError(f"{path}: empty {role} image of size {size_itk}")
    if dims == 2:
        if n == 2:
            axes = (0, 1)
        else:
            singles = [i for i, s in enumerate(shape) if s == 1]
            if len(singles) != 1:
                what = f"{size_itk[2]} slices" if not singles else "more than one axis of size 1"
                raise ValueError(f"{path}: a 3D {role} image of size {size_itk} (ITK x, y, z) with {what}, but the "
                                 f"run {run_name} registers 2D images: give a 2D image or a 3D image with a single "
                                 "slice")
            axes = tuple(i for i in range(3) if i != singles[0])
    else:
        if n == 2:
            raise ValueError(f"{path}: a 2D {role} image of size {size_itk}, but the run {run_name} registers 3D "
                             f"volumes: give a 3D image")
        axes = (0, 1, 2)
    small = [shape[i] for i in axes if shape[i] < 2]
    if small:
        raise ValueError(f"{path}: {role} image of size {size_itk} has fewer than 2 voxels along an axis the "
                         f"{dims}D run {run_name} registers over")
    if dims == 3 and role == "fixed":  # the moving image is resampled onto the fixed grid first
        spacing = np.asarray(img.GetSpacing(), np.float64)[::-1]  # array order
        coarse = int(np.argmax(spacing))
        if coarse != 0 and spacing[coarse] > _SLICE_AXIS_RATIO * spacing[0]:
            raise ValueError(
                f"{path}: its thickest voxel axis is ITK axis {n - 1 - coarse} (spacing {tuple(img.GetSpacing())} "
                f"mm), but the 3D run {run_name} was trained on stacks whose slices lie along the last ITK axis "
                "(NIfTI k, array axis 0); permute the image axes so the slice axis comes last in ITK order (e.g. "
                "SimpleITK.PermuteAxes) and register again")
    return axes


def _index_coords(moving, fixed_shape: tuple[int, ...], world: np.ndarray) -> np.ndarray:
    """Continuous array indices of ``moving`` at world points ``world`` (``(n, N)``) -> ``(n, *fixed_shape)``."""
    om, lm = _geometry(moving)
    k = np.linalg.solve(lm, world - om[:, None])
    return k[::-1].reshape((len(fixed_shape),) + fixed_shape)


def _dice_report(pred: np.ndarray, target: np.ndarray) -> dict[str, float | None]:
    """Dice per label value present in either map, their mean and the foreground (all labels > 0) Dice."""
    from diffreg.metrics import dice

    p = torch.from_numpy(np.asarray(pred, np.int64))[None, None]
    t = torch.from_numpy(np.asarray(target, np.int64))[None, None]
    values = sorted(v for v in {int(v) for v in np.unique(pred)} | {int(v) for v in np.unique(target)} if v > 0)
    out: dict[str, float | None] = {}
    if values:
        per = dice(p, t, values)[0]
        for v, d in zip(values, per.tolist()):
            out[str(v)] = None if math.isnan(d) else float(d)
        finite = [d for d in per.tolist() if not math.isnan(d)]
        out["mean"] = float(np.mean(finite)) if finite else None
    fg = float(dice(p > 0, t > 0, [1])[0, 0]) if values else float("nan")
    out["foreground"] = None if math.isnan(fg) else fg
    return out


def _check_out(out: Path, inputs: Sequence[Path]) -> None:
    """``out`` may be written: not an existing file, and no input file lies inside it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder: name a folder (it is created)")
    root = out.resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if root == rp.parent or root in rp.parents:
            raise ValueError(f"the output folder {out} holds the input file {p}; nothing in an input folder is ever "
                             "written: choose a new output folder")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer, int, bool, str)) or x is None:
        return x.item() if isinstance(x, np.generic) else x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _jsonable(x.item())
    return str(x)


#: what the outputs of :func:`register_files` mean (written into ``metrics.json``)
CONVENTIONS = {
    "displacement": "displacement.nii.gz: ITK displacement field (vector NIfTI), world LPS mm; the moving "
                    "image sampled at x + d(x) is the warped image (SimpleITK DisplacementFieldTransform, "
                    "ANTs antsApplyTransforms)",
    "jacobian": "det of the world-space Jacobian of x -> x + d(x) = det(I + grad v) of the voxel field on the "
                "fixed grid; folding_percent = 100 x fraction with det <= 0, sdlogj = SD of log(max(det, "
                "1e-9)), jacobian_std = SD of det, over the fixed grid",
    "dice": "per label value, their mean and the foreground (all labels > 0); dice_initial: the moving label "
            "on the fixed grid without deformation",
}


def _read_inputs(moving: Path, fixed: Path, moving_label: Path | None, fixed_label: Path | None, dims: int,
                 run_name: str) -> tuple[Any, Any, Any, Any, tuple[int, ...]]:
    """The images and labels of :func:`register_files` through the checked reader: ``(moving, fixed, moving label,
    fixed label, the fixed image's plane axes)`` as SimpleITK images (labels ``None`` when not given)."""
    fixed_file, moving_file = _read(fixed), _read(moving)
    fimg, mimg = fixed_file.itk, moving_file.itk
    faxes = _plane_axes(fimg, fixed, dims, run_name, "fixed")
    _plane_axes(mimg, moving, dims, run_name, "moving")
    if mimg.GetDimension() != fimg.GetDimension():
        raise ValueError(f"moving {moving} is {mimg.GetDimension()}D and fixed {fixed} is {fimg.GetDimension()}D: "
                         "give both images with the same number of dimensions")
    labels = []
    for path, image in ((moving_label, moving_file), (fixed_label, fixed_file)):
        label_file = _read(path, "label") if path is not None else None
        if label_file is not None:
            check_label_grid(image, label_file)
        labels.append(label_file.itk if label_file is not None else None)
    return mimg, fimg, labels[0], labels[1], faxes


def _warp_label(mlab: Any, flab: Any, mimg: Any, q: np.ndarray, q0: np.ndarray, shape: tuple[int, ...],
                world: np.ndarray, disp: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The moving label warped onto the fixed grid (nearest), and the Dice reports after (``dice``) and before
    (``dice_initial``) registration when the fixed label is given."""
    sitk = _sitk()
    ml_arr = sitk.GetArrayFromImage(mlab)
    qlab = q if _same_grid(mlab, mimg) else _index_coords(mlab, shape, world + disp)
    warped_label = np.rint(_sample(ml_arr.astype(np.float32), qlab, order=0)).astype(np.int64)
    reports: dict[str, Any] = {}
    if flab is not None:
        fl_arr = sitk.GetArrayFromImage(flab).astype(np.int64)
        q0lab = q0 if _same_grid(mlab, mimg) else _index_coords(mlab, shape, world)
        initial = np.rint(_sample(ml_arr.astype(np.float32), q0lab, order=0)).astype(np.int64)
        reports = {"dice": _dice_report(warped_label, fl_arr), "dice_initial": _dice_report(initial, fl_arr)}
    return warped_label, reports


def _output_images(fimg: Any, warped: np.ndarray, warped_label: np.ndarray | None, disp: np.ndarray,
                   jac: np.ndarray) -> dict[str, Any]:
    """The SimpleITK images of :func:`register_files` on the fixed grid: warped image, warped label (the smallest
    unsigned type that holds it), displacement (world LPS mm, ``disp`` is ``(n, *shape)``) and Jacobian."""
    sitk = _sitk()
    images: dict[str, Any] = {}
    wimg = sitk.GetImageFromArray(warped)
    wimg.CopyInformation(fimg)
    images["warped"] = wimg
    if warped_label is not None:
        top = int(warped_label.max()) if warped_label.size else 0
        ltype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
        limg = sitk.GetImageFromArray(warped_label.astype(ltype))
        limg.CopyInformation(fimg)
        images["warped_label"] = limg
    n, shape = disp.shape[0], disp.shape[1:]
    vectors = np.moveaxis(disp, 0, -1).astype(np.float64)
    single = [i for i, s in enumerate(shape) if s == 1]
    if n == 3 and single:  # ITK's NIfTI reader drops an axis of size 1 from vector images: repeat the slice
        vectors = np.concatenate([vectors, vectors], axis=single[0])
    dimg = sitk.GetImageFromArray(vectors, isVector=True)
    dimg.SetOrigin(fimg.GetOrigin())
    dimg.SetSpacing(fimg.GetSpacing())
    dimg.SetDirection(fimg.GetDirection())
    images["displacement"] = dimg
    jimg = sitk.GetImageFromArray(jac)
    jimg.CopyInformation(fimg)
    images["jacobian"] = jimg
    return images


def _write_outputs(out: Path, images: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Path]:
    """Write the images (compressed) and ``metrics.json`` into ``out``; returns their paths by key."""
    sitk = _sitk()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, img in images.items():
        paths[key] = out / OUTPUT_FILES[key]
        sitk.WriteImage(img, str(paths[key]), True)
    paths["metrics"] = out / OUTPUT_FILES["metrics"]
    paths["metrics"].write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    return paths


def _network_pair(mimg: Any, fimg: Any, m_arr: np.ndarray, plane_shape: tuple[int, ...], faxes: tuple[int, ...],
                  prep: "Preprocessing") -> tuple[np.ndarray, np.ndarray, GridMap]:
    """The network's moving and fixed images: the moving image resampled onto the fixed grid in world space
    (linear, the identity transform; the moving minimum outside it), then both preprocessed as the run's training
    data (:meth:`Preprocessing.apply`); with the map between the fixed grid's plane and the network grid."""
    sitk = _sitk()
    if _same_grid(mimg, fimg):
        mf_arr = m_arr
    else:
        mf = sitk.Resample(sitk.Cast(mimg, sitk.sitkFloat32), fimg, sitk.Transform(), sitk.sitkLinear,
                           float(m_arr.min()), sitk.sitkFloat32)
        mf_arr = sitk.GetArrayFromImage(mf)
    f_arr = sitk.GetArrayFromImage(fimg).astype(np.float32)
    spacing_arr = tuple(float(s) for s in fimg.GetSpacing()[::-1])
    plane_spacing = tuple(spacing_arr[i] for i in faxes)
    net_f, grid = prep.apply(f_arr.reshape(plane_shape), plane_spacing)
    net_m, _ = prep.apply(mf_arr.reshape(plane_shape), plane_spacing)
    return net_m, net_f, grid


def register_files(run: PathLike | Run | tuple, moving: PathLike, fixed: PathLike, out: PathLike | None = None,
                   moving_label: PathLike | None = None, fixed_label: PathLike | None = None,
                   device: str | torch.device | None = None, **options: Any) -> RegisteredFiles:
    """Register the image file ``moving`` to ``fixed`` with a trained run and write ITK-convention results.

    The module docstring describes the chain (moving resampled onto the fixed grid in world space, both preprocessed
    as the run's training data, the network's field brought back to the fixed grid and to world millimetres).
    Explained in ``book/reproducing.md`` ("Registering your own images").

    Args:
        run: a run directory (``python -m diffreg train --out RUN``), a :class:`Run`, or ``(model, config)`` /
            ``(model, config, data)`` with a registration model and its :class:`diffreg.config.MethodConfig`.
        moving: the image to move (``.nii``, ``.nii.gz``, ``.mhd`` + raw, ``.mha``); 2D for a 2D run (a 3D file with
            one slice counts as 2D), 3D for a 3D run.
        fixed: the reference image; every output lies on its grid.
        out: folder for the outputs (created; our own files in it are replaced); ``None``: write nothing. A folder
            holding an input file is refused.
        moving_label: optional integer label map on the moving image's grid (warped with nearest interpolation).
        fixed_label: optional label map on the fixed image's grid (Dice in ``metrics.json`` when both are given).
        device: where the model runs; default :func:`diffreg.device.default_device` (the GPU when CUDA is available)
            for a run directory, the model's device for a model given in memory.
        **options: passed to ``model.register`` (sampler options, e.g. ``steps=20``, ``sampler="ddim"``).

    Returns:
        A :class:`RegisteredFiles` with the output paths, the metrics (``metrics.json``: Dice per label, their mean
        and the foreground Dice after (``dice``) and before (``dice_initial``) registration when both labels are
        given, ``folding_percent``, ``jacobian_std``, ``sdlogj``, displacement statistics in mm, run, options,
        device, seconds, preprocessing and grids) and the field as tensors (mm in world LPS, and voxels).

    Raises:
        FileNotFoundError: a missing input file, run directory or MetaImage raw file.
        ValueError: an unreadable file, a dimension, orientation or size the run cannot take (named with the file),
            moving and fixed of different dimensions or without overlap in world space, a label that does not lie
            on its image's grid, an output folder that holds an input file, a DRDM run.
    """
    sitk = _sitk()
    t_start = time.perf_counter()
    r = open_run(run, device)
    dev = r.device
    cfg = r.config
    dims = int(cfg.data.dims)
    moving, fixed = Path(moving), Path(fixed)
    moving_label = Path(moving_label) if moving_label is not None else None
    fixed_label = Path(fixed_label) if fixed_label is not None else None
    inputs = [p for p in (moving, fixed, moving_label, fixed_label) if p is not None]
    if out is not None:
        out = Path(out)
        _check_out(out, inputs)

    mimg, fimg, mlab, flab, faxes = _read_inputs(moving, fixed, moving_label, fixed_label, dims, r.name)

    n = fimg.GetDimension()
    shape = tuple(fimg.GetSize()[::-1])  # array order
    prep = preprocessing_for(cfg, r.data)

    # 1. the world points of the fixed grid and where they fall in the moving image
    of, lf = _geometry(fimg)
    world = of[:, None] + lf @ np.indices(shape, dtype=np.float64).reshape(n, -1)[::-1]
    q0 = _index_coords(mimg, shape, world)
    inside = np.all([(q0[i] >= -0.5) & (q0[i] <= s - 0.5) for i, s in enumerate(mimg.GetSize()[::-1])], axis=0)
    overlap = float(inside.mean())
    if overlap == 0.0:
        raise ValueError(f"moving {moving} and fixed {fixed} do not overlap in world space (origins "
                         f"{mimg.GetOrigin()} and {fimg.GetOrigin()}): check their headers")

    # 2. moving resampled onto the fixed grid (world space, identity transform), then both preprocessed identically
    m_arr = sitk.GetArrayFromImage(mimg).astype(np.float32)
    plane_shape = tuple(shape[i] for i in faxes)
    net_m, net_f, grid = _network_pair(mimg, fimg, m_arr, plane_shape, faxes, prep)

    # 3. the network's field, in network voxels
    from diffreg.evaluate import timed_register

    model = r.model
    with torch.no_grad():
        mt = torch.from_numpy(net_m)[None, None].to(dev)
        ft = torch.from_numpy(net_f)[None, None].to(dev)
        result, seconds_model = timed_register(model, mt, ft, **options)
    u = result.ddf.detach().float().cpu()[0].numpy()  # (dims, *size)
    if u.shape != (dims, *prep.size):
        raise ValueError(f"the model of {r.name} returned a field of shape {u.shape}, expected {(dims, *prep.size)}")

    # 4. back to the fixed grid (voxels), then to world millimetres
    r_coords = grid.to_network(np.indices(plane_shape, dtype=np.float64))
    v_plane = _sample(u, r_coords, order=1) * np.asarray(grid.scale).reshape((dims,) + (1,) * dims)
    v = np.zeros((n, *shape), np.float64)
    for c, ax in enumerate(faxes):
        v[ax] = v_plane[c].reshape(shape)
    disp = lf @ v.reshape(n, -1)[::-1]  # (n, N), world LPS (x, y[, z]) mm
    q = _index_coords(mimg, shape, world + disp)

    # 5. outputs on the fixed grid
    warped = _sample(m_arr, q, order=1).astype(np.float32)
    from diffreg.metrics import jacobian_determinant, jacobian_statistics

    det = jacobian_determinant(torch.from_numpy(v_plane)[None])  # (1, *plane): equals the world-space determinant
    jac = det[0].numpy().astype(np.float32).reshape(shape)
    norms = np.sqrt((disp ** 2).sum(0))
    metrics: dict[str, Any] = {
        "run": r.name, "method": cfg.method, "profile": cfg.profile, "trained_on": r.data,
        "moving": str(moving), "fixed": str(fixed),
        "moving_label": str(moving_label) if moving_label else None,
        "fixed_label": str(fixed_label) if fixed_label else None,
        "options": dict(options), "device": str(dev),
        "seconds": None, "register_seconds": seconds_model,
        "preprocessing": prep.describe(),
        "network_grid": {"size": list(grid.shape), "spacing_mm": list(grid.spacing),
                         "scale": list(grid.scale), "offset": list(grid.offset), "axes": list(faxes)},
        "fixed_grid": {"size_itk": list(fimg.GetSize()), "spacing_mm": list(fimg.GetSpacing()),
                       "origin_lps_mm": list(fimg.GetOrigin()), "direction": list(fimg.GetDirection())},
        "overlap_percent": 100.0 * overlap,
        **{k: float(v[0]) for k, v in jacobian_statistics(det).items()},
        "displacement_mm": {"mean": float(norms.mean()), "max": float(norms.max())},
        "conventions": dict(CONVENTIONS),
    }
    warped_label = None
    if mlab is not None:
        warped_label, dice_reports = _warp_label(mlab, flab, mimg, q, q0, shape, world, disp)
        metrics.update(dice_reports)
    images = _output_images(fimg, warped, warped_label, disp.reshape((n, *shape)), jac)
    metrics["seconds"] = time.perf_counter() - t_start
    paths = _write_outputs(out, images, metrics) if out is not None else {}
    return RegisteredFiles(
        out=out, paths=paths, metrics=_jsonable(metrics),
        displacement=torch.from_numpy(disp.reshape((n, *shape))),
        ddf=torch.from_numpy(v.astype(np.float32))[None],
        warped=torch.from_numpy(warped),
        warped_label=torch.from_numpy(warped_label) if warped_label is not None else None,
        jacobian=torch.from_numpy(jac),
        images=images,
    )


# ----------------------------------------------------------------------------------------------------------------
# many pairs
# ----------------------------------------------------------------------------------------------------------------

#: columns of ``summary.csv`` written by :func:`register_pairs`
SUMMARY_COLUMNS = ("name", "status", "error", "moving", "fixed", "moving_label", "fixed_label", "dice",
                   "dice_initial", "folding_percent", "sdlogj", "jacobian_std", "max_displacement_mm", "seconds",
                   "out")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _read_pairs(csv_path: Path) -> list[dict[str, Any]]:
    """Rows of a pairs CSV with paths resolved against the CSV's folder (a ``row`` number, ``name`` filled in)."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"pairs file not found: {csv_path}")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: unreadable pairs file ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in ("moving", "fixed") if c not in cols]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)} (found: {', '.join(cols) or 'none'}); "
                         "the columns are moving, fixed and optionally moving_label, fixed_label, name")
    rows = []
    for k, raw in enumerate(reader, 1):
        row = {str(key).strip().lower(): (v or "").strip() for key, v in raw.items() if key is not None}
        if not any(row.values()):
            continue
        entry: dict[str, Any] = {"row": k}
        for key in ("moving", "fixed", "moving_label", "fixed_label"):
            value = row.get(key) or ""
            entry[key] = (csv_path.parent / Path(value).expanduser()) if value else None
        moving = entry["moving"]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", moving.name.split(".")[0]) if moving is not None else "pair"
        entry["name"] = row.get("name") or f"{k:03d}_{stem}"
        rows.append(entry)
    if not rows:
        raise ValueError(f"{csv_path}: no pairs (the file has a header and no rows)")
    return rows


def register_pairs(run: PathLike | Run | tuple, pairs: PathLike, out: PathLike,
                   device: str | torch.device | None = None, progress: bool = False,
                   **options: Any) -> list[dict[str, Any]]:
    """Register every pair of a CSV file with :func:`register_files`: one output folder per pair under ``out`` and
    ``out/summary.csv``.

    The CSV has a header with the columns ``moving``, ``fixed`` and optionally ``moving_label``, ``fixed_label``
    and ``name`` (the pair's folder; default ``NNN_<moving file stem>``); relative paths are relative to the CSV's
    folder. A pair that fails (missing or unreadable file, a dimension the run cannot take, ...) gets its error in
    the summary (``status`` = ``error``) and the other pairs still run.

    Args:
        run: as :func:`register_files` (loaded once).
        pairs: the CSV file.
        out: output folder (created); it must not hold the CSV or any input file.
        device: as :func:`register_files`.
        progress: print one line per pair.
        **options: passed to ``model.register``.

    Returns:
        The summary rows (dicts with :data:`SUMMARY_COLUMNS`).

    Raises:
        FileNotFoundError: the CSV or the run does not exist.
        ValueError: a CSV without the ``moving`` / ``fixed`` columns or without rows, an output folder that holds
            the CSV or an input file, a DRDM run.
    """
    csv_path = Path(pairs)
    out = Path(out)
    rows = _read_pairs(csv_path)
    inputs = [csv_path] + [p for row in rows for p in (row["moving"], row["fixed"], row["moving_label"],
                                                       row["fixed_label"]) if p is not None and p.exists()]
    _check_out(out, inputs)
    loaded = open_run(run, device)
    summary: list[dict[str, Any]] = []
    seen: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = row["name"]
        rec: dict[str, Any] = {c: "" for c in SUMMARY_COLUMNS}
        rec.update(name=name, **{k: str(row[k]) if row[k] is not None else ""
                                 for k in ("moving", "fixed", "moving_label", "fixed_label")})
        try:
            if not _NAME.match(name) or name in seen:
                raise ValueError(f"{csv_path}, row {row['row']}: pair name {name!r} is "
                                 + ("used twice" if name in seen else "not a plain folder name ([A-Za-z0-9._-])"))
            seen.add(name)
            for key in ("moving", "fixed"):
                if row[key] is None:
                    raise ValueError(f"{csv_path}, row {row['row']}: no {key} file")
            res = register_files(loaded, row["moving"], row["fixed"], out=out / name,
                                 moving_label=row["moving_label"], fixed_label=row["fixed_label"], **options)
            m = res.metrics
            rec.update(status="ok", out=str(out / name), folding_percent=m["folding_percent"], sdlogj=m["sdlogj"],
                       jacobian_std=m["jacobian_std"], max_displacement_mm=m["displacement_mm"]["max"],
                       seconds=m["seconds"])
            if "dice" in m:
                rec.update(dice=m["dice"].get("mean"), dice_initial=m["dice_initial"].get("mean"))
        except (OSError, ValueError, RuntimeError) as exc:
            rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
        summary.append(rec)
        if progress:
            print(f"{name}: {rec['status']}" + (f" ({rec['error']})" if rec["status"] == "error" else ""))
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        for rec in summary:
            writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return summary
