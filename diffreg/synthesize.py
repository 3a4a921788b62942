"""DRDM data synthesis (Alg. 3): deformed copies of a dataset on disk, with their labels and the fields used.

Explained in chapter 09 (``notebooks/09_drdm_downstream.md``, "Writing an augmented dataset"); the generator, DRDM,
in chapter 08 (``notebooks/08_drdm.md``). ``python -m diffreg synthesize`` calls :func:`synthesize_dataset`.

A dataset in one of the on-disk layouts of :mod:`diffreg.data` (``acdc:PATH``, ``acdc-h5:PATH``, ``camus:PATH``;
CAMUS in NIfTI only) gets ``copies`` deformed copies of every patient (CAMUS: of every view), written in the same
layout by the layout's writer (:func:`diffreg.data.acdc.write_acdc_patient`,
:func:`diffreg.data.acdc.write_acdc_h5_frame`, :func:`diffreg.data.camus.write_camus_view`) so that any code base
that reads the layout can train on them. The input folder is never written to. For every copy of every patient:

1. **one field** from the ED image, by the generator's :meth:`~diffreg.models.DeformationGenerator.deform` at the
   next level ``T'`` of ``levels`` (cycled over the copies in the order written; one random generator seeded with
   ``seed`` for the whole run). The image (for a 2D model on a volume: its middle slice along the smallest axis,
   the slice axis) is scaled to ``[-1, 1]`` between its 0.5th and 99.5th percentiles and resized (linear, without
   antialiasing) to the generator's ``work_size``, or without one to its size rounded to a multiple of 8 (what
   DRDM's recovery U-Net needs); the field is resized back to the image's size, its vectors rescaled;
2. a 2D field on a volume is the same for every slice and zero through the slices;
3. the ED and ES images are warped by the field (linear; integer images rounded, the file's dtype kept) and the
   labels too (nearest, so every value stays a label); NIfTI files keep their affine and header;
4. **the field** is written with them, in voxels of the file's array axes (channel ``i`` along axis ``i``, pull
   convention ``warped(p) = source(p + ddf(p))``): ``{pid}_ddf.nii.gz`` (ACDC) or ``{pid}_{view}_ddf.nii.gz``
   (CAMUS) with the channels last, the ``ddf`` dataset of both HDF5 frame files with the channels first.

Copy ``k`` (0-based) of patient number ``n`` is ``patient{(k + 1) * 1000 + n:03d}`` (ACDC) or
``patient{(k + 1) * 10000 + n:04d}`` (CAMUS). ``out/drdm_synthesis.json`` records the source, the run, the copies,
the levels, the seed and the field convention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["synthesize_dataset", "Synthesis", "SOURCES"]

#: the ``data`` forms :func:`synthesize_dataset` reads (folders on disk)
SOURCES = ("acdc:PATH", "acdc-h5:PATH", "camus:PATH")


@dataclass
class Synthesis:
    """What :func:`synthesize_dataset` returns.

    Attributes:
        out: the output folder.
        written: deformed patients (ACDC) or views (CAMUS) written.
        unit: ``"patients"`` or ``"views"``.
        copies: copies per patient or view.
        levels: the deformation levels cycled through.
        generator: the generator's class name (``"DRDM"``).
        level_symbol: the paper's symbol of the level (``"T'"``).
    """

    out: Path
    written: int
    unit: str
    copies: int
    levels: list[int]
    generator: str
    level_symbol: str


def _source(data: str) -> tuple[str, Path]:
    """``(scheme, folder)`` of ``data`` (one of :data:`SOURCES`).

    Raises:
        ValueError: another form. FileNotFoundError: the folder does not exist.
    """
    scheme, _, rest = data.partition(":")
    scheme = scheme.strip().lower()
    if scheme not in ("acdc", "acdc-h5", "camus") or not rest:
        raise ValueError(f"--data must be acdc:PATH, acdc-h5:PATH or camus:PATH (a folder on disk), got {data!r}; "
                         "write phantom data first with `python -m diffreg phantom`")
    root = Path(rest).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{scheme} data folder not found: {root}")
    return scheme, root


def _output(out: str | Path, root: Path) -> Path:
    """``out`` resolved, checked to be a new or empty folder outside ``root``.

    Raises:
        ValueError: ``out`` lies inside ``root``, is an existing file or a folder that is not empty.
    """
    out = Path(out).expanduser().resolve()
    if out == root or root in out.parents:
        raise ValueError(f"--out {out} lies inside the input folder {root}; the input folder is never written to")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder: name a folder (it is created)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty")
    return out


def _generator(run: Any, device: torch.device | str | None):
    """The deformation generator of ``run`` (a run directory or a model) on ``device``.

    Raises:
        ValueError: the run or model is not a deformation generator's.
    """
    from diffreg.models import DeformationGenerator

    if isinstance(run, DeformationGenerator):
        return run.to(device) if device is not None else run
    if isinstance(run, torch.nn.Module):
        raise ValueError(f"a {type(run).__name__} is not a deformation generator (DRDM)")
    from diffreg import train

    model, cfg = train.load_run(run, device=torch.device(device) if device is not None else train.default_device())
    if not isinstance(model, DeformationGenerator):
        raise ValueError(f"{run} is a {cfg.method!r} run, not a DRDM run (a deformation generator)")
    return model


def _spatial_axes(dims: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of an array of ``shape`` a ``dims``-D generator deforms: all of them, or for a 2D generator on a
    volume the two besides the smallest (slice) axis."""
    if dims == len(shape):
        return tuple(range(len(shape)))
    if dims == 2 and len(shape) == 3:
        slice_axis = int(np.argmin(shape))
        return tuple(a for a in range(3) if a != slice_axis)
    raise ValueError(f"a {dims}D DRDM cannot deform {len(shape)}D images of shape {shape}")


@torch.no_grad()
def _field_for(model, ref: np.ndarray, level: int, generator: torch.Generator) -> np.ndarray:
    """A field (Alg. 2) for the array ``ref``: ``(ref.ndim, *ref.shape)`` float32 in voxels of ``ref``, drawn over
    the axes :func:`_spatial_axes` names and zero along the other one (a 2D field is shared by every slice)."""
    from diffreg.spatial import resize_field

    spatial_axes = _spatial_axes(model.dims, tuple(ref.shape))
    img, other = ref, None
    if len(spatial_axes) < ref.ndim:  # a 2D model on a volume: the middle slice along the remaining axis
        other = [a for a in range(ref.ndim) if a not in spatial_axes][0]
        img = np.take(ref, ref.shape[other] // 2, axis=other)
    lo, hi = np.percentile(img, 0.5), np.percentile(img, 99.5)
    x = torch.from_numpy(np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1) * 2 - 1).float()[None, None]
    size = tuple(x.shape[2:])
    work = model.work_size or tuple(max(8, int(round(s / 8)) * 8) for s in size)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    xw = torch.nn.functional.interpolate(x, size=work, mode=mode, align_corners=False)
    ddf, _ = model.deform(xw.to(model.device), level, generator=generator)
    ddf = resize_field(ddf.cpu().float(), size)[0].numpy()
    full = np.zeros((ref.ndim, *ref.shape), np.float32)
    for c, a in enumerate(spatial_axes):
        comp = ddf[c] if other is None else np.expand_dims(ddf[c], other)
        full[a] = np.broadcast_to(comp, ref.shape)
    return full


def _warp_array(arr: np.ndarray, ddf: np.ndarray, label: bool) -> np.ndarray:
    """``arr`` warped by ``ddf`` ``(arr.ndim, *arr.shape)`` (voxels): labels nearest, images linear (integer images
    rounded); the dtype of ``arr`` is kept."""
    from diffreg.spatial import warp

    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    t = t.long() if label else t.float()
    out = warp(t, torch.from_numpy(ddf)[None], mode="nearest" if label else "bilinear")[0, 0].numpy()
    if not label and np.issubdtype(arr.dtype, np.integer):
        out = np.round(out)
    return out.astype(arr.dtype)


def _warped_nifti(path: Path, ddf: np.ndarray, label: bool, squeeze: bool = False):
    """The NIfTI file ``path`` warped by ``ddf``, with its affine and header (``squeeze``: warp the array without
    its singleton axes, as CAMUS files may carry one)."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    warped = _warp_array(np.squeeze(arr), ddf, label).reshape(arr.shape) if squeeze else _warp_array(arr, ddf, label)
    return nib.Nifti1Image(warped, img.affine, img.header)


def _field_nifti(ddf: np.ndarray, affine: np.ndarray):
    """A field ``(ndim, *shape)`` as a NIfTI image ``(*shape, ndim)`` on ``affine``."""
    import nibabel as nib

    return nib.Nifti1Image(np.moveaxis(ddf, 0, -1), affine)


def _copy_acdc(model, patient, pid: str, level: int, out: Path, generator: torch.Generator) -> None:
    """One deformed copy of an ACDC NIfTI patient, as ``out/pid`` (:func:`~diffreg.data.acdc.write_acdc_patient`)."""
    import nibabel as nib

    from diffreg.data.acdc import write_acdc_patient

    ed = nib.load(str(patient.ed_image))
    ddf = _field_for(model, np.asarray(ed.dataobj, np.float32), level, generator)
    frames = [(number, _warped_nifti(getattr(patient, f"{which}_image"), ddf, False),
               _warped_nifti(getattr(patient, f"{which}_label"), ddf, True))
              for which, number in (("ed", patient.ed), ("es", patient.es))]
    info = (Path(patient.ed_image).parent / "Info.cfg").read_text()
    write_acdc_patient(out, pid, frames, info, extra={"ddf": _field_nifti(ddf, ed.affine)})


def _copy_acdc_h5(model, patient, pid: str, level: int, out: Path, generator: torch.Generator) -> None:
    """One deformed copy of an ACDC HDF5 patient, as two frame files with a ``ddf`` dataset
    (:func:`~diffreg.data.acdc.write_acdc_h5_frame`)."""
    import h5py

    from diffreg.data.acdc import write_acdc_h5_frame

    with h5py.File(patient.ed_image, "r") as f:
        ddf = _field_for(model, np.asarray(f["image"], np.float32), level, generator)
    for frame, src in ((patient.ed, patient.ed_image), (patient.es, patient.es_image)):
        with h5py.File(src, "r") as f:
            image, label = np.asarray(f["image"]), np.asarray(f["label"])
        write_acdc_h5_frame(out, pid, frame, _warp_array(image, ddf, False), _warp_array(label, ddf, True),
                            extra={"ddf": ddf})


def _copy_camus(model, view, pid: str, level: int, out: Path, generator: torch.Generator) -> None:
    """One deformed copy of a CAMUS view, in ``out/pid`` (:func:`~diffreg.data.camus.write_camus_view`)."""
    import nibabel as nib

    from diffreg.data.camus import write_camus_view

    ed = nib.load(str(view.ed_image))
    ddf = _field_for(model, np.squeeze(np.asarray(ed.dataobj, np.float32)), level, generator)
    phases = [(phase, _warped_nifti(getattr(view, f"{phase.lower()}_image"), ddf, False, squeeze=True),
               _warped_nifti(getattr(view, f"{phase.lower()}_label"), ddf, True, squeeze=True))
              for phase in ("ED", "ES")]
    cfg = Path(view.ed_image).parent / f"Info_{view.view}.cfg"
    write_camus_view(out, pid, view.view, phases, cfg.read_text() if cfg.is_file() else None,
                     extra={"ddf": _field_nifti(ddf, ed.affine)})


def _camus_pid(copy: int, number: int) -> str:
    return f"patient{(copy + 1) * 10000 + number:04d}"


def _acdc_pid(copy: int, number: int) -> str:
    return f"patient{(copy + 1) * 1000 + number:03d}"


def _sources(scheme: str, root: Path, views: Sequence[str]) -> tuple[list, Any, Any, str]:
    """``(patients or views, copy function, pid(copy, patient number), unit)`` of a dataset.

    Raises:
        ValueError: a CAMUS view stored as MetaImage (only NIfTI is written).
    """
    if scheme == "camus":
        from diffreg.data.camus import find_camus

        entries = find_camus(root, views=tuple(views))
        for v in entries:
            if not str(v.ed_image).endswith((".nii", ".nii.gz")):
                raise ValueError(f"{v.ed_image}: synthesize writes CAMUS NIfTI only (convert .mhd first)")
        return entries, _copy_camus, _camus_pid, "views"
    from diffreg.data.acdc import find_acdc

    entries = find_acdc(root, layout="h5" if scheme == "acdc-h5" else "nifti")
    return entries, (_copy_acdc_h5 if scheme == "acdc-h5" else _copy_acdc), _acdc_pid, "patients"


def synthesize_dataset(run: str | Path | Any, data: str, out: str | Path, copies: int = 4,
                       levels: Sequence[int] = (30, 45), views: Sequence[str] = ("2CH",), seed: int = 0,
                       device: str | torch.device | None = None) -> Synthesis:
    """Write ``copies`` DRDM-deformed copies of every patient (CAMUS: view) of ``data`` to ``out`` (Alg. 3).

    Each copy is written in the layout it was read from, with its labels and the field used (see the module
    docstring for the field, the file names and units). Explained in chapter 09.

    Args:
        run: a run directory of a deformation generator (``python -m diffreg train --method drdm``), or the
            generator itself (a :class:`~diffreg.models.DeformationGenerator`, e.g. a trained
            :class:`~diffreg.models.DRDM`).
        data: ``acdc:PATH``, ``acdc-h5:PATH`` or ``camus:PATH`` (a folder on disk, read only).
        out: a new or empty folder outside the input folder (created).
        copies: deformed copies per patient (or CAMUS view).
        levels: deformation levels ``T'`` in ``0 ... max_level``, cycled over the copies in the order written.
        views: CAMUS views (``"2CH"``, ``"4CH"``).
        seed: seeds the random generator of the fields.
        device: where the generator runs; default :func:`diffreg.train.default_device` for a run directory, the
            model's own device for a model.

    Returns:
        A :class:`Synthesis` (the folder, the number of patients or views written).

    Raises:
        ValueError: another ``data`` form, ``out`` inside the input folder, an existing file or a folder that is not
            empty, a run that is not a deformation generator's, a level out of range, a generator of the wrong
            dimension for the images, CAMUS MetaImage files.
        FileNotFoundError: the input folder, or a file of it, is missing.
    """
    scheme, root = _source(data)
    out = _output(out, root)
    model = _generator(run, device)
    levels = [int(v) for v in levels]
    if any(not 0 <= v <= model.max_level for v in levels):
        raise ValueError(f"--levels must be in [0, {model.max_level}], got {levels}")
    entries, copy, pid, unit = _sources(scheme, root, views)
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for k in range(copies):
        for entry in entries:
            copy(model, entry, pid(k, int(entry.pid[len("patient"):])), levels[written % len(levels)], out, generator)
            written += 1
    (out / "drdm_synthesis.json").write_text(json.dumps({
        "source": data, "run": str(run) if isinstance(run, (str, Path)) else type(run).__name__, "copies": copies,
        "levels": levels, "seed": seed,
        "fields": "displacement in voxels of the file's array axes, channel i along axis i; "
                  "warped(p) = source(p + ddf(p)); labels warped with nearest interpolation",
    }, indent=2))
    return Synthesis(out, written, unit, copies, levels, type(model).__name__, model.level_symbol)
