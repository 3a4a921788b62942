"""Finding, reading and writing ACDC patients (official NIfTI layout and the preprocessed HDF5 layout).

Explained in ``book/reproducing.md``. The dataset class is :class:`diffreg.data.ACDCPairs` (``pairs.py``); this
module finds files and reads one frame of one patient, with every error naming the file, and writes one patient
(:func:`write_acdc_patient`) or one frame file (:func:`write_acdc_h5_frame`) in each layout: the writers of the
phantoms (:mod:`diffreg.data.phantom`, chapter 01) and of DRDM-deformed copies (:mod:`diffreg.synthesize`,
chapter 09).

* **NIfTI** (the official release): ``root/patientXXX/Info.cfg`` (``ED``, ``ES`` frame numbers, 1-based) and
  ``patientXXX_frameNN.nii.gz`` / ``patientXXX_frameNN_gt.nii.gz``; the patient folders may also sit one level down
  (``root/training/patient001``). Arrays are NIfTI ``(X, Y, Z)`` and are returned as ``(Z, Y, X)``.
* **HDF5** (used by many ACDC segmentation code bases): ``root/patientXXX_frameYY.h5`` with ``image`` (float32,
  ``(Z, Y, X)``, usually scaled to [0, 1]) and ``label`` (uint8); two files per patient, the lower frame number is
  ED. No spacing is stored, so it is an argument (default :data:`H5_SPACING`, an assumption).

ACDC labels: 0 = background, 1 = RV, 2 = Myo, 3 = LV cavity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffreg.data.io import (
    check_image,
    check_label,
    check_label_grid,
    check_same_shape,
    load_h5,
    new_file,
    read_cfg,
    read_image_file,
    write_nifti_folder,
)

__all__ = ["ACDCPatient", "find_acdc", "load_acdc_frame", "write_acdc_patient", "write_acdc_h5_frame", "H5_SPACING",
           "ACDC_LABEL_VALUES"]

#: Voxel spacing (slice, row, column) in mm assumed for the HDF5 layout, which stores none. ACDC is 5-10 mm between
#: slices (mostly 10) and 1.2-1.9 mm in plane.
H5_SPACING = (10.0, 1.5, 1.5)
ACDC_LABEL_VALUES = (0, 1, 2, 3)

_PATIENT_DIR = re.compile(r"patient(\d+)$")
_H5_NAME = re.compile(r"(patient\d+)_frame(\d+)\.h5$")


@dataclass
class ACDCPatient:
    """Files of one ACDC patient's ED and ES frames.

    Attributes:
        pid: ``"patient001"``.
        ed, es: frame numbers (as in the file names, 1-based).
        ed_image, es_image: image files. ed_label, es_label: mask files (``None`` for HDF5: same file).
        layout: ``"nifti"`` or ``"h5"``.
        info: the parsed ``Info.cfg`` (NIfTI layout) or ``{}``.
    """

    pid: str
    ed: int
    es: int
    ed_image: Path
    es_image: Path
    ed_label: Path | None = None
    es_label: Path | None = None
    layout: str = "nifti"
    info: dict = field(default_factory=dict)


def _nifti_file(folder: Path, stem: str, what: str) -> Path:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what} not found: {folder / (stem + '.nii.gz')}")


def _patient_dirs(root: Path) -> list[Path]:
    """``patientN`` folders directly under ``root``, else one level down (e.g. ``training/``)."""
    dirs = [d for d in root.iterdir() if d.is_dir() and _PATIENT_DIR.match(d.name)]
    if not dirs:
        dirs = [d for sub in sorted(root.iterdir()) if sub.is_dir()
                for d in sub.iterdir() if d.is_dir() and _PATIENT_DIR.match(d.name)]
    return sorted(dirs, key=lambda d: d.name)


def _frame_number(cfg: dict, key: str, path: Path) -> int:
    v = cfg[key]
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"{path}: {key} must be a frame number >= 1, got {v!r}")
    return v


def find_acdc(root: str | Path, layout: str = "nifti") -> list[ACDCPatient]:
    """All patients under ``root``, sorted by id.

    Raises:
        FileNotFoundError: ``root`` missing, no patients found, a patient without ``Info.cfg``, or a missing ED/ES
            image or mask (the message names the expected file).
        ValueError: ``Info.cfg`` without ``ED``/``ES``; HDF5 patients with more than two frames; unknown layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ACDC root folder not found: {root}")
    if layout == "nifti":
        patients = []
        for d in _patient_dirs(root):
            cfg_path = d / "Info.cfg"
            if not cfg_path.is_file():
                raise FileNotFoundError(f"ACDC Info.cfg not found: {cfg_path}")
            cfg = read_cfg(cfg_path, required=("ED", "ES"))
            ed, es = _frame_number(cfg, "ED", cfg_path), _frame_number(cfg, "ES", cfg_path)
            pid = d.name
            files = {}
            for name, n in (("ed", ed), ("es", es)):
                files[f"{name}_image"] = _nifti_file(d, f"{pid}_frame{n:02d}", f"{name.upper()} frame {n} image")
                files[f"{name}_label"] = _nifti_file(d, f"{pid}_frame{n:02d}_gt", f"{name.upper()} frame {n} mask")
            patients.append(ACDCPatient(pid, ed, es, layout="nifti", info=cfg, **files))
        if not patients:
            raise FileNotFoundError(f"no ACDC patient folders (patientXXX/Info.cfg) under {root}")
        return patients
    if layout == "h5":
        files = [p for p in root.iterdir() if p.is_file() and _H5_NAME.match(p.name)]
        if not files:
            files = [p for sub in root.iterdir() if sub.is_dir() for p in sub.iterdir()
                     if p.is_file() and _H5_NAME.match(p.name)]
        if not files:
            raise FileNotFoundError(f"no ACDC HDF5 files (patientXXX_frameYY.h5) under {root}")
        by_patient: dict[str, dict[int, Path]] = {}
        for p in files:
            m = _H5_NAME.match(p.name)
            by_patient.setdefault(m.group(1), {})[int(m.group(2))] = p
        patients = []
        for pid in sorted(by_patient):
            frames = by_patient[pid]
            if len(frames) == 1:
                (n, p), = frames.items()
                raise FileNotFoundError(f"{pid}: only {p.name} found in {p.parent}; the second frame file "
                                        f"({pid}_frameYY.h5, ES) is missing")
            if len(frames) > 2:
                raise ValueError(f"{pid}: {len(frames)} frame files in {root} "
                                 f"({', '.join(sorted(q.name for q in frames.values()))}); expected exactly two "
                                 f"(ED = lower frame number, ES)")
            ed, es = sorted(frames)
            patients.append(ACDCPatient(pid, ed, es, frames[ed], frames[es], layout="h5"))
        return patients
    raise ValueError(f"unknown ACDC layout {layout!r}; valid: 'nifti', 'h5'.")


def load_acdc_frame(patient: ACDCPatient, which: str,
                    h5_spacing: tuple[float, float, float] = H5_SPACING) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read and check one frame of a patient.

    Args:
        patient: from :func:`find_acdc`.
        which: ``"ed"`` or ``"es"``.
        h5_spacing: spacing reported for the HDF5 layout (not stored in the files).

    Returns:
        ``(image float32 (Z, Y, X), label uint8 (Z, Y, X), spacing (z, y, x) mm)``.

    NIfTI files are read with :func:`diffreg.data.io.read_image_file` (a mask must lie on its image's grid,
    :func:`diffreg.data.io.check_label_grid`); a 4th axis of length 1 is dropped.

    Raises:
        ValueError: unreadable or truncated file, NaN/Inf voxels, a constant image, labels outside {0, 1, 2, 3}, a
            mask whose shape, spacing, origin or direction differs from its image's, not a 3D volume.
    """
    if which not in ("ed", "es"):
        raise ValueError(f"which must be 'ed' or 'es', got {which!r}.")
    img_path = getattr(patient, f"{which}_image")
    if patient.layout == "h5":
        data = load_h5(img_path, ("image", "label"))
        img, lab = data["image"], data["label"]
        if img.ndim != 3:
            raise ValueError(f"{img_path}: expected a 3D volume, got shape {img.shape}")
        check_same_shape(img, lab, img_path, img_path)
        img = check_image(img, img_path)
        lab = check_label(lab, img_path, ACDC_LABEL_VALUES)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab), tuple(float(s) for s in h5_spacing)
    image = read_image_file(img_path, "image")
    label = read_image_file(getattr(patient, f"{which}_label"), "label", ACDC_LABEL_VALUES)
    check_label_grid(image, label)
    img, lab, spacing = image.array, label.array, image.spacing
    if img.ndim == 4 and img.shape[0] == 1:  # NIfTI (X, Y, Z, 1): array order (1, Z, Y, X)
        img, lab, spacing = img[0], lab[0], spacing[1:]
    if img.ndim != 3:
        raise ValueError(f"{img_path}: expected a 3D volume, got shape {img.shape}")
    return img, lab, spacing


def write_acdc_patient(root: str | Path, pid: str, frames: Sequence[tuple[int, Any, Any]], info: str,
                       extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write one patient in the official ACDC NIfTI layout that :func:`find_acdc` reads.

    ``root/pid/`` gets ``{pid}_frameNN.nii.gz`` and ``{pid}_frameNN_gt.nii.gz`` for every ``(NN, image, label)`` of
    ``frames``, ``{pid}_{name}.nii.gz`` for every ``name: image`` of ``extra`` (the phantoms' ``4d`` cine, DRDM's
    ``ddf``) and ``Info.cfg`` with the text ``info``.

    Args:
        root: the dataset folder (created with the patient folder).
        pid: ``"patient001"``.
        frames: ``(frame number (1-based), image, label)``; images and labels are ``nibabel`` NIfTI images (arrays
            ``(X, Y, Z)``, spacing in mm in the affine and header).
        info: the text of ``Info.cfg`` (``ED: N``, ``ES: N``, ...).
        extra: further NIfTI images by name.
        overwrite: allow replacing existing files.

    Returns:
        The patient folder ``root / pid``.

    Raises:
        FileExistsError: a file exists and ``overwrite`` is false.
    """
    return write_nifti_folder(Path(root) / pid, pid, [(f"frame{n:02d}", image, label) for n, image, label in frames],
                              extra, {"Info.cfg": info}, overwrite)


def write_acdc_h5_frame(root: str | Path, pid: str, frame: int, image: np.ndarray, label: np.ndarray,
                        extra: Mapping[str, np.ndarray] | None = None, overwrite: bool = False) -> Path:
    """Write one frame in the preprocessed ACDC HDF5 layout that :func:`find_acdc` reads (``layout="h5"``).

    ``root/{pid}_frame{frame:02d}.h5`` with the gzip-compressed datasets ``image`` and ``label`` (arrays
    ``(Z, Y, X)``, written in their own dtypes) and every ``name: array`` of ``extra`` (DRDM's ``ddf``). A patient
    is two such files; the lower frame number is ED.

    Returns:
        The file's path.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is false.
    """
    import h5py

    Path(root).mkdir(parents=True, exist_ok=True)
    path = new_file(Path(root) / f"{pid}_frame{frame:02d}.h5", overwrite)
    with h5py.File(path, "w") as f:
        for name, data in {"image": image, "label": label, **(extra or {})}.items():
            f.create_dataset(name, data=data, compression="gzip")
    return path
