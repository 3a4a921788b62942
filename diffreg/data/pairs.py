"""Registration pair datasets (ED/ES), subject-level splits and the papers' preprocessing.

Explained in chapter 01 (phantoms) and ``book/reproducing.md`` (ACDC, CAMUS).

Every dataset is a :class:`PairDataset`: a map-style :class:`torch.utils.data.Dataset` whose items are dicts

* ``moving``, ``fixed``: float32 ``(1, *spatial)`` in the dataset's ``intensity`` range;
* ``moving_label``, ``fixed_label``: int64 ``(1, *spatial)``;
* ``case``: str, e.g. ``"patient001"`` (3D), ``"patient001_z05"`` (2D slice), ``"patient0001_2CH"``,
  ``"phantom007"`` or ``"phantom007_t02"``;
* ``spacing``: float32 ``(ndim,)``, the voxel size in mm after preprocessing (array order);
* ``true_ddf``: float32 ``(ndim, *spatial)``, phantoms only: ``moving(p + true_ddf(p)) = fixed(p)``, voxels.

and whose attributes ``labels`` (``"acdc"`` or ``"camus"``), ``structures`` (name -> label value), ``dims``,
``direction`` and ``intensity`` describe it. The default ``DataLoader`` collate works (no ``None`` values).

**Direction.** ``direction="es->ed"`` registers end-systole (moving) to end-diastole (fixed), as the DiffuseReg
text ("we used the end-diastolic volumes as fixed images and end-systolic as moving", sec. 3, datasets and
metrics) and the FSDiffReg text (sec. 3, dataset and preprocessing) do on ACDC (default for ACDC and the short-axis
phantoms); ``"ed->es"`` (moving = ED, fixed = ES) is DiffuseMorph's ("the end-diastolic images aligned with the
end-systolic images", sec. 4.2, and its official code) and LDM-Morph's CAMUS setting, "registering the end-diastolic
images to their corresponding end-systolic images" (sec. 4.1; default for CAMUS and the echo phantom). The paper
profiles of :mod:`diffreg.config` set each paper's direction.

**Splits** are by subject (patient), deterministic, and interleaved over the sorted subject list
(:func:`split_indices`: 70 % train, 10 % val, 20 % test): ACDC's 100 training patients are stored in blocks of 20
per pathology group, so every group lands in every split (4 test and 2 validation patients per group). ACDC also
offers ``split_scheme="official"``: train and val (90 / 10 %, interleaved the same way) from the given folder, test =
the patients of the sibling ``testing/`` folder of the official release (DiffuseReg's protocol: 100 training, 50
testing volumes, sec. 3, datasets and metrics).

**Preprocessing** (``profile``):

* ACDC 3D ``"paper"`` (DiffuseMorph, FSDiffReg, DiffuseReg): resample to 3.15 x 1.5 x 1.5 mm (slice, row,
  column), centre crop/pad to ``(32, 128, 128)``, intensities to [-1, 1]. ``"quick"``: the same field of view at half
  resolution, ``(16, 64, 64)`` at 6.3 x 3 x 3 mm.
* ACDC 2D ``"quick"``: every slice with foreground in both frames, a square region around the heart (the ED and
  ES masks' bounding box, x 1.8) resized to 64 x 64, intensities [-1, 1]. ``"paper"``/``"ldm"`` (LDM-Morph): the
  whole slice, padded to a square, resized to 112 x 112 and padded to 128 x 128, intensities [0, 1].
* CAMUS: the whole image resized to ``size x size`` (128, quick 64), intensities [0, 1].

Intensities are first clipped at the 99.5th percentile (``clip_percentile``) and min-max scaled to [0, 1] per
volume, then mapped linearly to ``intensity`` (MONAI ``ScaleIntensity`` semantics). Resampling uses linear
interpolation (with anti-aliasing when shrinking 2D slices); labels are resampled by interpolating their one-hot
maps and taking the arg-max (nearest-like, without aliasing). Crop/pad is centred like MONAI
``ResizeWithPadOrCrop``. The steps are the functions of :mod:`diffreg.data.preprocess`, which
:func:`diffreg.apply.register_files` calls too; files are read with :func:`diffreg.data.io.read_image_file`.
Preprocessed arrays are cached in memory only: nothing is ever written to the data folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffreg.data import acdc as _acdc
from diffreg.data import camus as _camus
from diffreg.data.phantom import ACDC_LABELS, CAMUS_LABELS, _subject_seed, make_phantom
from diffreg.data.preprocess import (  # noqa: F401  (resize, resample, pad_or_crop: also importable from here)
    fit_resize,
    fit_square,
    fit_volume,
    normalize_intensity,
    pad_or_crop,
    resample,
    resize,
    square_box,
    to_range,
)

__all__ = [
    "PairDataset",
    "PhantomPairs",
    "ACDCPairs",
    "CAMUSPairs",
    "split_indices",
    "SPLITS",
    "DIRECTIONS",
    "SPLIT_SCHEMES",
    "official_roots",
    "PAPER_SPACING",
    "PAPER_SIZE",
]

SPLITS = ("train", "val", "test", "all")
DIRECTIONS = ("es->ed", "ed->es")
#: ACDC split schemes: ``"diffreg"`` (70/10/20 % of one folder), ``"official"`` (training/ and testing/ folders)
SPLIT_SCHEMES = ("diffreg", "official")
#: DiffuseMorph / FSDiffReg / DiffuseReg ACDC preprocessing: spacing (slice, row, column) mm and size (D, H, W).
PAPER_SPACING = (3.15, 1.5, 1.5)
PAPER_SIZE = (32, 128, 128)
_STRUCTURES = {"acdc": dict(ACDC_LABELS), "camus": dict(CAMUS_LABELS)}


# ----------------------------------------------------------------------------------------------------------------
# splits and preprocessing
# ----------------------------------------------------------------------------------------------------------------


def split_indices(n: int, split: str, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> list[int]:
    """Positions ``0..n-1`` (subjects sorted by id) that belong to ``split``.

    Test positions are spread evenly (the last of every block of ``1 / test_fraction``: 4, 9, 14, ... for 20 %),
    validation positions evenly over the rest; there is at least one test subject when ``n >= 2`` and one
    validation subject when ``n >= 3``. The result depends only on ``n``.

    Args:
        n: number of subjects.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        fractions: train, val, test fractions.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}.")
    if split == "all":
        return list(range(n))
    _, f_val, f_test = fractions
    n_test = int(round(f_test * n))
    n_test = max(n_test, 1) if n >= 2 else 0
    rest = n - n_test
    n_val = int(round(f_val * n))
    n_val = min(max(n_val, 1), rest - 1) if n >= 3 else 0
    test = sorted({int(math.floor((k + 1) * n / n_test)) - 1 for k in range(n_test)}) if n_test else []
    remaining = [i for i in range(n) if i not in set(test)]
    val = sorted({remaining[int(math.floor((k + 0.5) * len(remaining) / n_val))] for k in range(n_val)})
    if split == "test":
        return test
    if split == "val":
        return val
    return [i for i in remaining if i not in set(val)]


def official_roots(root: str | Path) -> tuple[Path, Path]:
    """The ``(training, testing)`` folders of the official ACDC release for ``root``.

    ``root`` is either the training folder (``.../ACDC/training``, whose sibling ``.../ACDC/testing`` holds the
    test patients) or the folder holding both (``.../ACDC``).

    Raises:
        FileNotFoundError: no ``testing/`` folder next to (or inside) ``root``.
    """
    root = Path(root)
    if (root / "training").is_dir() and (root / "testing").is_dir():
        return root / "training", root / "testing"
    sibling = root.parent / "testing"
    if sibling.is_dir() and sibling.resolve() != root.resolve():
        return root, sibling
    raise FileNotFoundError(
        f"split_scheme='official' takes the test patients from ACDC's testing/ folder, but there is none next to "
        f"{root} (looked for {sibling}) nor inside it; point the data at .../ACDC/training with .../ACDC/testing "
        f"beside it, or use split_scheme='diffreg' (70/10/20 % of {root})")


def _train_val_indices(n: int, split: str, f_val: float = 0.1) -> list[int]:
    """Positions ``0..n-1`` of ``split`` (``"train"`` or ``"val"``) when the test set is elsewhere: validation is
    every ``1 / f_val``-th subject (the last of each block, at least one when ``n >= 2``), training the rest."""
    n_val = max(int(round(f_val * n)), 1) if n >= 2 else 0
    val = sorted({int(math.floor((k + 1) * n / n_val)) - 1 for k in range(n_val)}) if n_val else []
    if split == "val":
        return val
    return [i for i in range(n) if i not in set(val)]


def _check_choice(value: Any, valid: Sequence, name: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}.")


def _size_tuple(size, ndim: int, name: str = "size") -> tuple[int, ...]:
    if isinstance(size, (int, np.integer)):
        return (int(size),) * ndim
    size = tuple(int(s) for s in size)
    if len(size) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} ints, got {size}.")
    return size


# ----------------------------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------------------------


class PairDataset(Dataset):
    """Base class of registration pair datasets (items and attributes in the module docstring).

    Subclasses fill ``self._records`` and implement ``_load(i)`` returning numpy arrays: ``moving``, ``fixed``
    (``*spatial`` float32), ``moving_label``, ``fixed_label`` (``*spatial`` integers), ``case``, ``spacing``
    and optionally ``true_ddf``.
    """

    def __init__(self, labels: str, dims: int, direction: str, intensity: tuple[float, float]) -> None:
        _check_choice(labels, tuple(_STRUCTURES), "label set")
        _check_choice(direction, DIRECTIONS, "direction")
        self.labels = labels
        self.structures = dict(_STRUCTURES[labels])
        self.dims = int(dims)
        self.direction = direction
        self.intensity = (float(intensity[0]), float(intensity[1]))
        self._records: list = []

    def __len__(self) -> int:
        return len(self._records)

    def _load(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def _orient(self, ed: tuple, es: tuple) -> dict[str, np.ndarray]:
        """``ed``/``es`` = (image, label) -> moving/fixed according to ``direction``."""
        (mv, ml), (fx, fl) = (es, ed) if self.direction == "es->ed" else (ed, es)
        return {"moving": mv, "fixed": fx, "moving_label": ml, "fixed_label": fl}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        raw = self._load(i % len(self))
        item = {
            "moving": torch.from_numpy(np.ascontiguousarray(raw["moving"], dtype=np.float32))[None],
            "fixed": torch.from_numpy(np.ascontiguousarray(raw["fixed"], dtype=np.float32))[None],
            "moving_label": torch.from_numpy(np.asarray(raw["moving_label"], dtype=np.int64))[None],
            "fixed_label": torch.from_numpy(np.asarray(raw["fixed_label"], dtype=np.int64))[None],
            "case": str(raw["case"]),
            "spacing": torch.tensor([float(s) for s in raw["spacing"]], dtype=torch.float32),
        }
        if raw.get("true_ddf") is not None:
            item["true_ddf"] = torch.from_numpy(np.ascontiguousarray(raw["true_ddf"], dtype=np.float32))
        return item

    @property
    def cases(self) -> list[str]:
        """Case names of all items, in order."""
        return [self._case(i) for i in range(len(self))]

    def _case(self, i: int) -> str:
        return str(self._load(i)["case"])

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return (f"{type(self).__name__}({len(self)} pairs, {self.dims}D, labels={self.labels!r}, "
                f"direction={self.direction!r}, intensity={self.intensity}{', ' + extra if extra else ''})")


# ----------------------------------------------------------------------------------------------------------------
# phantoms
# ----------------------------------------------------------------------------------------------------------------


class PhantomPairs(PairDataset):
    """Pairs of synthetic cardiac frames with their true displacement (:mod:`diffreg.data.phantom`).

    Explained in chapter 01. Subject ``i`` (0-based) is drawn with seed ``seed * 100003 + i``; subjects are split
    by :func:`split_indices` (70/10/20 %), so the splits are disjoint and do not depend on which split is asked for.
    Only the subjects of the split are generated, at construction (2D 64 x 64: about 15 ms per subject, 3D
    ``(16, 64, 64)``: about 0.2 s).

    Args:
        kind: ``"sax"`` (2D short axis, ACDC labels), ``"sax3d"`` (3D stack) or ``"echo"`` (2D apical echo, CAMUS
            labels).
        n_subjects: subjects in all splits together.
        size: ``int`` or a spatial shape; default 64 (2D) and ``(16, 64, 64)`` (3D). An int or ``(H, W)`` for
            ``"sax3d"`` gives ``(16, H, W)``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        seed: dataset seed.
        frames: ``"ed-es"`` (one pair per subject) or ``"all"`` (every frame ``t != ED`` paired with ED).
        intensity: range of the images (phantom frames are in [0, 1] and mapped linearly).
        direction: ``"es->ed"`` (default for ``sax``/``sax3d``) or ``"ed->es"`` (default for ``echo``); with
            ``frames="all"`` frame ``t`` plays the role of ES.
        n_frames: frames per generated sequence with ``frames="all"`` (``"ed-es"`` renders only ED and ES, the
            same anatomy and ES phase, so it is faster).
        noise: noise/speckle in the images.

    Raises:
        ValueError: unknown kind, split, frames or direction.
    """

    def __init__(self, kind: str = "sax", n_subjects: int = 32, size: int | Sequence[int] | None = None,
                 split: str = "train", seed: int = 0, frames: str = "ed-es",
                 intensity: tuple[float, float] = (-1.0, 1.0), direction: str | None = None,
                 n_frames: int = 5, noise: bool = True) -> None:
        _check_choice(kind, ("sax", "sax3d", "echo"), "phantom kind")
        _check_choice(split, SPLITS, "split")
        _check_choice(frames, ("ed-es", "all"), "frames")
        if direction is None:
            direction = "ed->es" if kind == "echo" else "es->ed"
        dims = 3 if kind == "sax3d" else 2
        super().__init__("camus" if kind == "echo" else "acdc", dims, direction, intensity)
        if size is None:
            size = (16, 64, 64) if dims == 3 else (64, 64)
        elif dims == 3 and isinstance(size, (int, np.integer)):
            size = (16, int(size), int(size))
        elif dims == 3 and len(size) == 2:
            size = (16, *size)
        self.size = _size_tuple(size, dims)
        self.kind, self.split, self.seed, self.frames = kind, split, seed, frames
        self.n_subjects = n_subjects
        self._noise = noise
        self.subjects = split_indices(n_subjects, split)
        for subj in self.subjects:
            seq = make_phantom(kind, size=self.size, n_frames=n_frames if frames == "all" else 2,
                               seed=_subject_seed(seed, subj), noise=noise)
            others = [seq.es] if frames == "ed-es" else [t for t in range(seq.n_frames) if t != seq.ed]
            for t in others:
                a, b = (t, seq.ed) if direction == "es->ed" else (seq.ed, t)
                pair = seq.pair(a, b)
                case = f"phantom{subj:03d}" if frames == "ed-es" else f"phantom{subj:03d}_t{t:02d}"
                self._records.append({
                    "moving": to_range(pair["moving"], self.intensity),
                    "fixed": to_range(pair["fixed"], self.intensity),
                    "moving_label": pair["moving_label"],
                    "fixed_label": pair["fixed_label"],
                    "true_ddf": pair["true_ddf"],
                    "case": case,
                    "spacing": seq.spacing,
                })

    def _load(self, i: int) -> dict[str, Any]:
        return self._records[i]

    def sequence(self, subject: int, n_frames: int = 10, noise: bool | None = None):
        """The whole cine sequence of one subject of this split, with its true motion and labels.

        The anatomy and motion are those of the subject's pairs (same seed); with more frames the sequence holds
        the intermediate phases between ED and ES, the ground truth of continuous deformation (chapter 04).

        Args:
            subject: a subject index from :attr:`subjects`.
            n_frames: frames over the cycle (ED is frame 0, ES at about 40 %).
            noise: image noise (default: as the dataset).

        Returns:
            A :class:`diffreg.data.phantom.PhantomSequence` with frames in [0, 1] (map them with the dataset's
            ``intensity`` to compare with its images).

        Raises:
            ValueError: ``subject`` is not in this split.
        """
        if subject not in self.subjects:
            raise ValueError(f"subject {subject} is not in the {self.split!r} split (subjects {self.subjects})")
        return make_phantom(self.kind, size=self.size, n_frames=n_frames, seed=_subject_seed(self.seed, subject),
                            noise=self._noise if noise is None else noise)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, split={self.split!r}, {len(self.subjects)} subjects, size={self.size}"


# ----------------------------------------------------------------------------------------------------------------
# ACDC
# ----------------------------------------------------------------------------------------------------------------


def _profile_name(profile: str | None, dims: int) -> str:
    if profile is None:
        return "paper" if dims == 3 else "quick"
    _check_choice(profile, ("quick", "paper", "ldm"), "profile")
    return profile


class ACDCPairs(PairDataset):
    """ACDC ED/ES pairs (official NIfTI layout or the preprocessed HDF5 layout), 3D volumes or 2D slices.

    See the module docstring for the preprocessing of each profile. ED and ES frames come from ``Info.cfg``
    (NIfTI) or from the two frame numbers of a patient (HDF5: lower = ED).

    Args:
        root: folder with ``patientXXX/`` folders (NIfTI) or ``patientXXX_frameYY.h5`` files.
        layout: ``"nifti"`` or ``"h5"``.
        dims: 3 (volumes) or 2 (slice pairs: the same ``z`` in ED and ES).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (patient level, :func:`split_indices` on the
            sorted patient ids).
        split_scheme: ``"diffreg"`` (70/10/20 % of ``root``'s patients) or ``"official"`` (train/val 90/10 % of
            ``root``'s patients, test = the patients of the official release's ``testing/`` folder beside ``root``,
            see :func:`official_roots`; ``"all"`` = both folders).
        profile: ``"quick"``, ``"paper"``, ``"ldm"`` (2D LDM-Morph) or ``None`` (``"paper"`` in 3D, ``"quick"`` in
            2D); sets the defaults of ``size``, ``spacing``, ``intensity``, ``roi``.
        size: output shape; 3D default ``(32, 128, 128)`` (paper) / ``(16, 64, 64)`` (quick); 2D ``(64, 64)``
            (quick) / ``(128, 128)`` (paper, ldm). An int means a cube/square (3D: ``(size // 4, size, size)``).
        spacing: 3D target spacing (slice, row, column) mm; default: the paper's 3.15 x 1.5 x 1.5 mm scaled by
            ``(32, 128, 128) / size`` so that the field of view stays the paper's.
        intensity: image range; default (-1, 1), (0, 1) for ``"ldm"``.
        direction: ``"es->ed"`` (default) or ``"ed->es"``.
        slice_filter: 2D: ``"foreground"`` (slices with labels in both frames), ``"any"`` (in either) or ``"all"``.
        roi: 2D: ``"heart"`` (square crop around the ED + ES masks' bounding box, the same for all slices of a
            patient), ``None`` (the whole slice padded to a square) or ``"auto"`` (``"heart"`` for ``"quick"``,
            ``None`` for ``"paper"``/``"ldm"``). The heart box uses the ground-truth masks, like the cropped
            data sets of many 2D papers; a deployed pipeline would use a detector instead.
        roi_margin: ``"heart"`` box side = ``roi_margin`` x the bounding box's larger side.
        h5_spacing: spacing (slice, row, column) assumed for the HDF5 layout, which stores none (default
            :data:`diffreg.data.acdc.H5_SPACING` = 10 x 1.5 x 1.5 mm, a typical ACDC value).
        clip_percentile: upper intensity clip before min-max scaling (``None``: none).
        patients: explicit patient ids (e.g. ``["patient001"]``); overrides ``split``.
        preload: 3D: load and preprocess every patient at construction (default: lazily on first access); 2D
            always loads at construction (slices must be counted). Both cache in memory only.
        ldm_slices: shorthand for ``profile="ldm"``.

    Raises:
        FileNotFoundError: missing root, patients, ``Info.cfg`` or ED/ES files; no ``testing/`` folder with
            ``split_scheme="official"``.
        ValueError: bad ``Info.cfg``, unreadable files, NaN/Inf or constant images, labels outside {0,1,2,3}, shape
            mismatches, bad arguments.
    """

    def __init__(self, root: str | Path, layout: str = "nifti", dims: int = 3, split: str = "train",
                 profile: str | None = None, size: int | Sequence[int] | None = None,
                 spacing: Sequence[float] | None = None, intensity: tuple[float, float] | None = None,
                 direction: str = "es->ed", slice_filter: str = "foreground", roi: str | None = "auto",
                 roi_margin: float = 1.8, h5_spacing: Sequence[float] = _acdc.H5_SPACING,
                 clip_percentile: float | None = 99.5, patients: Sequence[str] | None = None,
                 preload: bool | None = None, ldm_slices: bool = False, split_scheme: str = "diffreg") -> None:
        _check_choice(dims, (2, 3), "dims")
        _check_choice(layout, ("nifti", "h5"), "layout")
        _check_choice(split, SPLITS, "split")
        _check_choice(split_scheme, SPLIT_SCHEMES, "split_scheme")
        _check_choice(slice_filter, ("foreground", "any", "all"), "slice_filter")
        profile = _profile_name(profile, dims)
        if ldm_slices:
            profile = "ldm"
        ldm = dims == 2 and profile in ("paper", "ldm")
        if intensity is None:
            intensity = (0.0, 1.0) if ldm else (-1.0, 1.0)
        super().__init__("acdc", dims, direction, intensity)
        self.root, self.layout, self.split, self.profile = Path(root), layout, split, profile
        self.split_scheme = split_scheme
        self.h5_spacing = tuple(float(s) for s in h5_spacing)
        self.clip_percentile = clip_percentile
        self.slice_filter = slice_filter
        if split_scheme == "official":
            train_root, test_root = official_roots(root)
            training = _acdc.find_acdc(train_root, layout)
            testing = _acdc.find_acdc(test_root, layout) if split in ("test", "all") or patients is not None else []
            all_patients = training + testing
        else:
            all_patients = _acdc.find_acdc(root, layout)
        if patients is not None:
            wanted = set(patients)
            unknown = wanted - {p.pid for p in all_patients}
            if unknown:
                raise FileNotFoundError(f"patient(s) {', '.join(sorted(unknown))} not found under {root}")
            self.patients = [p for p in all_patients if p.pid in wanted]
        elif split_scheme == "official":
            if split == "all":
                self.patients = all_patients
            elif split == "test":
                self.patients = testing
            else:
                self.patients = [training[i] for i in _train_val_indices(len(training), split)]
        else:
            self.patients = [all_patients[i] for i in split_indices(len(all_patients), split)]
        if dims == 3:
            if size is None:
                size = PAPER_SIZE if profile == "paper" else (16, 64, 64)
            elif isinstance(size, (int, np.integer)):
                size = (max(int(size) // 4, 1), int(size), int(size))
            self.size = _size_tuple(size, 3)
            if spacing is None:
                spacing = tuple(sp * ps / s for sp, ps, s in zip(PAPER_SPACING, PAPER_SIZE, self.size))
            self.target_spacing = tuple(float(s) for s in spacing)
            self.roi, self.inner = None, self.size
        else:
            if size is None:
                size = (128, 128) if ldm else (64, 64)
            self.size = _size_tuple(size, 2)
            self.inner = tuple(int(round(s * 112 / 128)) for s in self.size) if ldm else self.size
            if roi == "auto":
                roi = None if ldm else "heart"
            _check_choice(roi, ("heart", None), "roi")
            self.roi = roi
            self.roi_margin = roi_margin
            self.target_spacing = None
        self._cache: dict[int, Any] = {}
        if dims == 3:
            self._records = list(range(len(self.patients)))
            if preload:
                for i in range(len(self.patients)):
                    self._volume(i)
        else:
            for j in range(len(self.patients)):
                self._records.extend(self._slices(j))

    # -- reading
    def _frames(self, patient: _acdc.ACDCPatient):
        ed = _acdc.load_acdc_frame(patient, "ed", self.h5_spacing)
        es = _acdc.load_acdc_frame(patient, "es", self.h5_spacing)
        if ed[0].shape != es[0].shape:
            raise ValueError(f"{patient.pid}: ED {patient.ed_image} {ed[0].shape} and ES {patient.es_image} "
                             f"{es[0].shape} differ in shape")
        return ed, es

    def _volume(self, i: int) -> dict[str, Any]:
        if i in self._cache:
            return self._cache[i]
        patient = self.patients[i]
        out = []
        for img, lab, sp in self._frames(patient):
            fit = fit_volume(img.shape, sp, self.target_spacing, self.size,
                             images=[normalize_intensity(img, self.clip_percentile)], labels=[lab])
            out.append((to_range(fit.images[0], self.intensity), fit.labels[0]))
        rec = {**self._orient(out[0], out[1]), "case": patient.pid, "spacing": fit.spacing}
        self._cache[i] = rec
        return rec

    def _slices(self, j: int) -> list[dict[str, Any]]:
        patient = self.patients[j]
        (ed_img, ed_lab, sp), (es_img, es_lab, _) = self._frames(patient)
        ed_img = normalize_intensity(ed_img, self.clip_percentile)
        es_img = normalize_intensity(es_img, self.clip_percentile)
        fg_ed, fg_es = ed_lab.reshape(len(ed_lab), -1).any(1), es_lab.reshape(len(es_lab), -1).any(1)
        keep = {"foreground": fg_ed & fg_es, "any": fg_ed | fg_es, "all": np.ones_like(fg_ed)}[self.slice_filter]
        union = ((ed_lab > 0) | (es_lab > 0)).any(0) if self.roi == "heart" else None
        box = square_box(union, ed_lab.shape[1:], self.roi_margin)
        recs = []
        for z in np.nonzero(keep)[0]:
            fit = fit_square(ed_img.shape[1:], sp[1:], self.inner, self.size, images=[ed_img[z], es_img[z]],
                             labels=[ed_lab[z], es_lab[z]], box=box)
            pair = [(to_range(img, self.intensity), lab) for img, lab in zip(fit.images, fit.labels)]
            recs.append({**self._orient(pair[0], pair[1]), "case": f"{patient.pid}_z{int(z):02d}",
                         "spacing": fit.spacing})
        return recs

    def _load(self, i: int) -> dict[str, Any]:
        if self.dims == 3:
            return self._volume(self._records[i])
        return self._records[i]

    def _case(self, i: int) -> str:
        if self.dims == 3:
            return self.patients[self._records[i]].pid
        return self._records[i]["case"]

    def extra_repr(self) -> str:
        scheme = f", split_scheme={self.split_scheme!r}" if self.split_scheme != "diffreg" else ""
        return (f"root='{self.root}', layout={self.layout!r}, split={self.split!r}{scheme}, "
                f"{len(self.patients)} patients, profile={self.profile!r}, size={self.size}")


# ----------------------------------------------------------------------------------------------------------------
# CAMUS
# ----------------------------------------------------------------------------------------------------------------


class CAMUSPairs(PairDataset):
    """CAMUS ED/ES pairs of apical 2- and/or 4-chamber views (NIfTI or MetaImage release), 2D.

    The whole image is resized to ``size`` (aspect ratio not kept, the common CAMUS practice), intensities
    min-max scaled to ``intensity``. Splits are by patient (both views of a patient stay together).

    Args:
        root: folder with ``patientXXXX/`` folders.
        view: ``"2CH"``, ``"4CH"`` or ``"both"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        size: output size, int or ``(H, W)``; default 128 (``profile="quick"``: 64).
        intensity: default (0, 1).
        direction: ``"ed->es"`` (default, LDM-Morph) or ``"es->ed"``.
        profile: ``"quick"`` (64) or ``"paper"``/``None`` (128) when ``size`` is not given.
        clip_percentile: upper intensity clip (default none: CAMUS is 8-bit).
        patients: explicit patient ids; overrides ``split``.

    Raises:
        FileNotFoundError: missing root, patients or files. ValueError: unreadable files, bad content, bad arguments.
    """

    def __init__(self, root: str | Path, view: str = "2CH", split: str = "train",
                 size: int | Sequence[int] | None = None, intensity: tuple[float, float] = (0.0, 1.0),
                 direction: str = "ed->es", profile: str | None = None, clip_percentile: float | None = None,
                 patients: Sequence[str] | None = None, dims: int = 2) -> None:
        if dims != 2:
            raise ValueError(f"CAMUS is 2D; dims must be 2, got {dims}.")
        _check_choice(view, ("2CH", "4CH", "both"), "view")
        _check_choice(split, SPLITS, "split")
        super().__init__("camus", 2, direction, intensity)
        if size is None:
            size = 64 if profile == "quick" else 128
        self.size = _size_tuple(size, 2)
        self.root, self.view, self.split, self.profile = Path(root), view, split, profile
        views = ("2CH", "4CH") if view == "both" else (view,)
        entries = _camus.find_camus(root, views)
        pids = sorted({e.pid for e in entries})
        if patients is not None:
            unknown = set(patients) - set(pids)
            if unknown:
                raise FileNotFoundError(f"patient(s) {', '.join(sorted(unknown))} not found under {root}")
            chosen = set(patients)
        else:
            chosen = {pids[i] for i in split_indices(len(pids), split)}
        self.patients = [p for p in pids if p in chosen]
        for e in entries:
            if e.pid not in chosen:
                continue
            frames = []
            for which in ("ed", "es"):
                img, lab, sp = _camus.load_camus_frame(e, which)
                fit = fit_resize(img.shape, sp, self.size, images=[normalize_intensity(img, clip_percentile)],
                                 labels=[lab])
                frames.append((to_range(fit.images[0], self.intensity), fit.labels[0]))
            self._records.append({**self._orient(frames[0], frames[1]), "case": f"{e.pid}_{e.view}",
                                  "spacing": fit.spacing})

    def _load(self, i: int) -> dict[str, Any]:
        return self._records[i]

    def extra_repr(self) -> str:
        return (f"root='{self.root}', view={self.view!r}, split={self.split!r}, {len(self.patients)} patients, "
                f"size={self.size}")
