"""Finding and reading CAMUS patients (NIfTI release and the older MetaImage ``.mhd``/``.raw`` release), and
writing one view in the NIfTI layout (:func:`write_camus_view`: the phantoms of :mod:`diffreg.data.phantom`,
chapter 01, and DRDM-deformed copies, :mod:`diffreg.synthesize`, chapter 09).

Explained in ``book/reproducing.md``. The dataset class is :class:`diffreg.data.CAMUSPairs` (``pairs.py``).

Layout: ``root/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}[_gt].{nii.gz,mhd}`` (the patient folders may also sit one
level down, e.g. ``root/training/patient0001``) with ``Info_2CH.cfg`` / ``Info_4CH.cfg``. Images are 2D, returned
in array order ``(H, W)`` (NIfTI ``(X, Y)`` is transposed; MetaImage is already ``(Y, X)``).

CAMUS labels: 0 = background, 1 = LV cavity, 2 = Myo, 3 = LA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffreg.data.acdc import _patient_dirs
from diffreg.data.io import check_label_grid, read_image_file, write_nifti_folder

__all__ = ["CAMUSView", "find_camus", "load_camus_frame", "write_camus_view", "CAMUS_LABEL_VALUES", "VIEWS"]

CAMUS_LABEL_VALUES = (0, 1, 2, 3)
VIEWS = ("2CH", "4CH")
_EXTS = (".nii.gz", ".nii", ".mhd")


@dataclass
class CAMUSView:
    """Files of one patient's view: ED and ES images and masks."""

    pid: str
    view: str
    ed_image: Path
    ed_label: Path
    es_image: Path
    es_label: Path


def _find(folder: Path, stem: str, what: str) -> Path:
    for ext in _EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what} not found: {folder / (stem + '.nii.gz')} (nor .nii / .mhd)")


def find_camus(root: str | Path, views: tuple[str, ...] = ("2CH",)) -> list[CAMUSView]:
    """All (patient, view) entries under ``root``, sorted by patient then view.

    Raises:
        FileNotFoundError: ``root`` missing, no patient folders, or a missing ED/ES image or mask.
        ValueError: unknown view.
    """
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"unknown CAMUS view {v!r}; valid: {', '.join(VIEWS)}.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CAMUS root folder not found: {root}")
    dirs = _patient_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"no CAMUS patient folders (patientXXXX/) under {root}")
    out = []
    for d in dirs:
        for v in views:
            files = {}
            for phase in ("ED", "ES"):
                stem = f"{d.name}_{v}_{phase}"
                files[f"{phase.lower()}_image"] = _find(d, stem, f"CAMUS {v} {phase} image")
                files[f"{phase.lower()}_label"] = _find(d, stem + "_gt", f"CAMUS {v} {phase} mask")
            out.append(CAMUSView(d.name, v, **files))
    return out


def load_camus_frame(entry: CAMUSView, which: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Read and check one frame: ``(image float32 (H, W), label uint8 (H, W), spacing (dy, dx) mm)``.

    Both files are read with :func:`diffreg.data.io.read_image_file`; the mask must lie on its image's grid
    (:func:`diffreg.data.io.check_label_grid`); singleton axes are dropped.

    Raises:
        ValueError: unreadable or truncated file, not 2D, NaN/Inf voxels, a constant image, labels outside
            {0, 1, 2, 3}, a mask whose shape, spacing, origin or direction differs from its image's.
    """
    if which not in ("ed", "es"):
        raise ValueError(f"which must be 'ed' or 'es', got {which!r}.")
    image = read_image_file(getattr(entry, f"{which}_image"), "image")
    label = read_image_file(getattr(entry, f"{which}_label"), "label", CAMUS_LABEL_VALUES)
    check_label_grid(image, label)
    img, lab = np.squeeze(image.array), np.squeeze(label.array)  # some files carry a singleton axis
    if img.ndim != 2:
        raise ValueError(f"{image.path}: expected a 2D image, got shape {img.shape}")
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), image.spacing[-2:]


def write_camus_view(root: str | Path, pid: str, view: str, phases: Sequence[tuple[str, Any, Any]],
                     info: str | None = None, extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write one view of one patient in the CAMUS NIfTI layout that :func:`find_camus` reads.

    ``root/pid/`` gets ``{pid}_{view}_{phase}.nii.gz`` and ``{pid}_{view}_{phase}_gt.nii.gz`` for every ``(phase,
    image, label)`` of ``phases`` (``"ED"``, ``"ES"``), ``{pid}_{view}_{name}.nii.gz`` for every ``name: image`` of
    ``extra`` (the phantoms' ``half_sequence``, DRDM's ``ddf``) and, when ``info`` is given, ``Info_{view}.cfg``
    with that text.

    Args:
        root: the dataset folder (created with the patient folder).
        pid: ``"patient0001"``.
        view: ``"2CH"`` or ``"4CH"``.
        phases: ``(phase, image, label)``; images and labels are ``nibabel`` NIfTI images (arrays ``(X, Y)``).
        info: the text of ``Info_{view}.cfg`` (``None``: no file).
        extra, overwrite: as for :func:`diffreg.data.acdc.write_acdc_patient`, and so are the result (the
            patient folder ``root / pid``) and the errors.
    """
    texts = {f"Info_{view}.cfg": info} if info is not None else {}
    return write_nifti_folder(Path(root) / pid, f"{pid}_{view}", phases, extra, texts, overwrite)
