"""Checked loading of medical image files: every error names the file and says what is wrong.

Explained in chapter 01 (data) and ``book/reproducing.md`` (real data). The loaders never write; the three small
helpers at the end (``prepare_root``, ``new_file``, ``write_nifti``, ``write_nifti_folder``) serve the layouts' writers
(:func:`diffreg.data.acdc.write_acdc_patient`, :func:`diffreg.data.acdc.write_acdc_h5_frame`,
:func:`diffreg.data.camus.write_camus_view`), which never overwrite a file unless asked.

* :func:`read_image_file` -- **the** checked reader of an image or label file (NIfTI or MetaImage): voxels in array
  order, the grid (spacing, origin, direction) and content checks; the datasets (:mod:`diffreg.data.acdc`,
  :mod:`diffreg.data.camus`) and :func:`diffreg.apply.register_files` read every image and label through it, and
  :func:`check_label_grid` checks that a label map lies on its image's grid;
* :func:`load_nifti` -- NIfTI (``.nii``/``.nii.gz``) with nibabel, in the file's own axis order ``(X, Y, Z[, T])``;
* :func:`load_mhd` -- MetaImage (``.mhd`` + ``.raw``, the older CAMUS release) with SimpleITK when installed, else
  with a small built-in reader; array order ``(..., Y, X)``;
* :func:`load_image` -- either of them, always in array order (``(Y, X)`` / ``(Z, Y, X)``);
* :func:`load_h5` -- datasets of an HDF5 file;
* :func:`read_cfg` -- ``key: value`` files such as ACDC ``Info.cfg`` and CAMUS ``Info_2CH.cfg``;
* :func:`check_image`, :func:`check_label`, :func:`check_same_shape` -- content checks.

Errors raised by all functions:

* ``FileNotFoundError`` -- a file does not exist (the message names it);
* ``ValueError`` -- a file is unreadable, corrupt or truncated, a key is missing, voxels are NaN/Inf, an image is
  constant (e.g. all zeros), labels are outside the expected set or not integers, or an image and its mask differ
  in shape, spacing, origin or direction (the message names the file(s)).

NIfTI voxels are always read with nibabel, also where SimpleITK supplies the world geometry: SimpleITK's NIfTI reader
replaces NaN/Inf voxels by 0 and fills the missing part of a truncated file with zeros without an error, so a damaged
file would otherwise pass as a valid image.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ImageFile",
    "read_image_file",
    "check_label_grid",
    "image_suffix",
    "IMAGE_SUFFIXES",
    "load_nifti",
    "load_mhd",
    "load_image",
    "load_h5",
    "read_cfg",
    "check_image",
    "check_label",
    "check_same_shape",
    "prepare_root",
    "new_file",
    "write_nifti",
    "write_nifti_folder",
]

PathLike = str | Path
#: File name endings :func:`read_image_file` reads (NIfTI and MetaImage).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha")
_KIND = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".mhd": "MetaImage", ".mha": "MetaImage"}


def _existing(path: PathLike, what: str = "file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def check_mhd_data_file(path: PathLike) -> None:
    """A MetaImage header's raw data file must exist: SimpleITK reports a missing one as a generic error, so this
    check comes first, for a message that names the file.

    Raises:
        ValueError: the header cannot be read.
        FileNotFoundError: the data file it names does not exist.
    """
    path = Path(path)
    try:
        head = path.read_bytes()[:4096].decode("latin-1")
    except OSError as e:
        raise ValueError(f"{path}: unreadable MetaImage header ({e})") from e
    for line in head.splitlines():
        if line.strip().startswith("ElementDataFile") and "=" in line:
            name = line.split("=", 1)[1].strip()
            if name != "LOCAL" and "%" not in name and " " not in name:
                if not (path.parent / name).is_file():
                    raise FileNotFoundError(f"MetaImage data file not found: {path.parent / name} (named by {path})")


def load_nifti(path: PathLike) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Read a NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(array, spacing, affine)``: the float32 array in the file's axis order (NIfTI ``(X, Y, Z[, T])``), the
        voxel size per array axis from the header (``pixdim``; mm, and the time step for a 4th axis), the 4 x 4
        affine.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable NIfTI image (corrupt bytes, truncated gzip, wrong format).
    """
    import nibabel as nib

    path = _existing(path, "NIfTI file")
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types for corrupt data (ImageFileError, EOFError, zlib.error, ...)
        raise ValueError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from e
    return arr, zooms, affine


_MET_TYPES = {
    "MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
    "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_ULONG_LONG": np.uint64, "MET_LONG_LONG": np.int64,
    "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}


def _read_mhd_builtin(path: Path) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Minimal MetaImage reader: one local raw data file, optionally zlib-compressed, no multi-component pixels.

    Returns ``(array, spacing, origin, direction)``: array and spacing in array order, origin (``Offset``) and
    direction (``TransformMatrix``, whose rows are the direction's columns, as ITK reads it) in ITK order.
    """
    header: dict[str, str] = {}
    try:
        text = path.read_bytes().decode("latin-1")
    except OSError as e:
        raise ValueError(f"{path}: unreadable MetaImage header ({e})") from e
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            header[k.strip()] = v.strip()
    for key in ("DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise ValueError(f"{path}: not a MetaImage header (missing '{key}')")
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        text_spacing = header.get("ElementSpacing", header.get("ElementSize", ""))
        spacing = [float(v) for v in text_spacing.split()] or [1.0] * len(dims)
        nd = len(dims)
        text_origin = next((header[k] for k in ("Offset", "Origin", "Position") if k in header), "")
        origin = [float(v) for v in text_origin.split()] or [0.0] * nd
        text_matrix = next((header[k] for k in ("TransformMatrix", "Rotation", "Orientation") if k in header), "")
        matrix = [float(v) for v in text_matrix.split()] or np.eye(nd).ravel().tolist()
        if len(origin) != nd or len(matrix) != nd * nd:
            raise ValueError(f"{len(origin)} origin and {len(matrix)} matrix values for {nd} dimensions")
    except ValueError as e:
        raise ValueError(f"{path}: bad DimSize/ElementSpacing/Offset/TransformMatrix in MetaImage header ({e})") from e
    if header["ElementType"] not in _MET_TYPES:
        raise ValueError(f"{path}: unsupported MetaImage ElementType {header['ElementType']}")
    if int(header.get("ElementNumberOfChannels", "1")) != 1:
        raise ValueError(f"{path}: multi-channel MetaImage files are not supported")
    dtype = np.dtype(_MET_TYPES[header["ElementType"]])
    msb = header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = dtype.newbyteorder(">" if msb else "<")
    data_file = header["ElementDataFile"]
    if data_file == "LOCAL":
        raise ValueError(f"{path}: MetaImage with embedded data (ElementDataFile = LOCAL) is not supported without "
                         f"SimpleITK; install SimpleITK")
    raw = _existing(path.parent / data_file, "MetaImage data file")
    blob = raw.read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        try:
            blob = zlib.decompress(blob)
        except zlib.error as e:
            raise ValueError(f"{raw}: corrupt compressed MetaImage data ({e})") from e
    n = int(np.prod(dims))
    if len(blob) != n * dtype.itemsize:
        raise ValueError(f"{raw}: expected {n * dtype.itemsize} bytes for DimSize {dims} of "
                         f"{header['ElementType']}, found {len(blob)}")
    arr = np.frombuffer(blob, dtype=dtype).reshape(dims[::-1]).astype(np.float32)
    direction = tuple(float(v) for v in np.asarray(matrix, np.float64).reshape(nd, nd).T.ravel())
    return arr, tuple(spacing[: len(dims)][::-1]), tuple(origin), direction


def load_mhd(path: PathLike, backend: str | None = None) -> tuple[np.ndarray, tuple[float, ...], None]:
    """Read a MetaImage (``.mhd`` header + ``.raw`` data, the older CAMUS release).

    nibabel cannot read MetaImage. SimpleITK is used when installed (``backend="sitk"``); otherwise (or with
    ``backend="builtin"``) a small reader handles the common case (one local raw file, optional zlib compression).

    Returns:
        ``(array, spacing, None)`` in array order ``(..., Y, X)`` (as ``SimpleITK.GetArrayFromImage``), spacing in
        the same order.

    Raises:
        FileNotFoundError: header or raw file missing.
        ValueError: unreadable or inconsistent file.
    """
    path = _existing(path, "MetaImage file")
    if backend is None:
        backend = "sitk" if _have_sitk() else "builtin"
    if backend == "builtin":
        arr, spacing, _, _ = _read_mhd_builtin(path)
        return arr, spacing, None
    if backend != "sitk":
        raise ValueError(f"backend must be 'sitk', 'builtin' or None, got {backend!r}.")
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise ImportError("reading MetaImage with backend='sitk' needs SimpleITK: pip install SimpleITK") from e
    check_mhd_data_file(path)
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        spacing = tuple(float(s) for s in img.GetSpacing())[::-1]
    except Exception as e:
        raise ValueError(f"{path}: unreadable MetaImage file ({type(e).__name__}: {e})") from e
    return arr, spacing[: arr.ndim], None


def load_image(path: PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a NIfTI or MetaImage file in array order (``(Y, X)``, ``(Z, Y, X)``; a time axis comes first), without
    content checks (:func:`read_image_file` reads and checks).

    NIfTI ``(X, Y[, Z][, T])`` is transposed to ``([T,] [Z,] Y, X)``. Returns ``(array float32, spacing)`` with the
    spacing in the same order.
    """
    name = Path(path).name.lower()
    if name.endswith(".mhd"):
        arr, spacing, _ = load_mhd(path)
        return arr, spacing
    if name.endswith((".nii", ".nii.gz")):
        arr, spacing, _, _, _ = _read_voxels(_existing(path, "NIfTI file"), image_suffix(path), itk=False)
        return arr, spacing
    raise ValueError(f"{path}: unknown image format (expected .nii, .nii.gz or .mhd)")


def image_suffix(path: PathLike) -> str:
    """The format ending of an image file name (one of :data:`IMAGE_SUFFIXES`, lower case).

    Raises:
        ValueError: another ending (the message names the file and the endings read).
    """
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unknown image format (expected {', '.join(IMAGE_SUFFIXES)})")


@dataclass(frozen=True)
class ImageFile:
    """An image or label file read and checked by :func:`read_image_file` (chapter 01; ``book/reproducing.md``).

    Attributes:
        path: the file.
        array: the voxels in array order (``(Y, X)``, ``(Z, Y, X)``; a 4th NIfTI axis comes first): float32 for an
            image; for a label map uint8 (a label set was given) or int64.
        spacing: voxel size per array axis, mm (a 4th axis: its step), array order.
        origin: world position of the first voxel, mm, ITK order ``(x, y[, z])``, LPS frame.
        direction: direction cosines, ``n x n`` row-major in ITK order (``n = len(origin)``), LPS frame.
        itk: the ``SimpleITK.Image`` of the file (``read_image_file(..., itk=True)``), else ``None``.
    """

    path: Path
    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    itk: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape (array order)."""
        return tuple(self.array.shape)


def _sitk_read(path: Path, suffix: str):
    """``SimpleITK.ReadImage`` with errors that name the file; a scalar image only."""
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise ImportError(f"reading {path} needs SimpleITK: pip install SimpleITK") from e
    if suffix == ".mhd":
        check_mhd_data_file(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK trace: keep its last line
        first = " ".join(str(e).strip().splitlines()[-1:]).strip()[:300]
        raise ValueError(f"{path}: unreadable {_KIND[suffix]} file ({type(e).__name__}: {first}); the file may be "
                         "damaged or truncated") from e
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: has {img.GetNumberOfComponentsPerPixel()} components per voxel (a vector or "
                         "colour image); give a scalar image")
    return img


def _nifti_geometry(affine: np.ndarray, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(origin, direction)`` of a NIfTI affine (RAS) in ITK's LPS convention, first ``n`` axes."""
    flip = np.array([-1.0, -1.0, 1.0])
    m = np.asarray(affine, np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    direction = flip[:, None] * m / np.where(norms > 0, norms, 1.0)[None]
    origin = flip * np.asarray(affine, np.float64)[:3, 3]
    return tuple(float(v) + 0.0 for v in origin[:n]), tuple(float(v) + 0.0 for v in direction[:n, :n].ravel())


def _read_voxels(path: Path, suffix: str, itk: bool):
    """``(array, spacing, origin, direction, itk_image)`` of a file, unchecked (array and spacing in array order)."""
    if suffix in (".nii", ".nii.gz"):
        arr, zooms, affine = load_nifti(path)
        arr = np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1]))
        spacing = tuple(zooms[::-1])
        origin, direction = _nifti_geometry(affine, min(arr.ndim, 3))
        if not itk:
            return arr, spacing, origin, direction, None
        # the world geometry as ITK reads it; the voxels stay nibabel's, since SimpleITK's NIfTI reader replaces
        # NaN/Inf by 0 and reads a truncated file as zeros without an error
        img = _sitk_read(path, suffix)
        shape = tuple(img.GetSize()[::-1])
        if arr.size != int(np.prod(shape)) or [s for s in arr.shape if s > 1] != [s for s in shape if s > 1]:
            raise ValueError(f"{path}: nibabel reads shape {arr.shape} but SimpleITK {shape}: damaged header?")
        arr = arr.reshape(shape)
    elif itk or suffix == ".mha" or _have_sitk():
        img = _sitk_read(path, suffix)
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(img)
    else:
        arr, spacing, origin, direction = _read_mhd_builtin(path)
        return arr, spacing, origin, direction, None
    return (arr, tuple(float(s) for s in img.GetSpacing())[::-1], tuple(float(v) for v in img.GetOrigin()),
            tuple(float(v) for v in img.GetDirection()), img)


def _have_sitk() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def read_image_file(path: PathLike, role: str = "image", labels: Iterable[int] | None = None,
                    itk: bool = False) -> ImageFile:
    """Read and check an image or label file: the one reader of the datasets and of
    :func:`diffreg.apply.register_files` (chapter 01; ``book/reproducing.md``). Nothing is written.

    NIfTI voxels are read with nibabel (which refuses a truncated file and keeps NaN), MetaImage with SimpleITK when
    installed, else with the built-in reader (``.mhd`` + raw only). ``itk=True`` also reads the file with SimpleITK
    for its world geometry (then ``spacing``, ``origin`` and ``direction`` are SimpleITK's and ``array`` has its
    shape); without it a NIfTI file's geometry comes from its affine (nibabel), converted to ITK's LPS frame.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.mhd`` (+ its raw data file) or ``.mha``.
        role: ``"image"`` (non-empty, finite, not constant; float32) or ``"label"`` (integers from ``labels``,
            uint8; ``labels=None``: any non-negative integers, int64).
        labels: the label values allowed (``role="label"``).
        itk: also read with SimpleITK and keep the ``SimpleITK.Image`` (:attr:`ImageFile.itk`).

    Returns:
        An :class:`ImageFile`.

    Raises:
        FileNotFoundError: the file (or a MetaImage's raw data file) does not exist.
        ValueError: unknown ending; unreadable, corrupt or truncated file; a vector image; NaN/Inf voxels or a
            constant image; labels that are not integers, negative or outside ``labels`` (the message names the
            file and the problem).
    """
    if role not in ("image", "label"):
        raise ValueError(f"role must be 'image' or 'label', got {role!r}.")
    path = Path(path)
    suffix = image_suffix(path)
    path = _existing(path, f"{role} file")
    arr, spacing, origin, direction, img = _read_voxels(path, suffix, itk)
    if role == "image":
        arr = check_image(arr, path)
    else:
        arr = check_label(arr, path, labels)
    return ImageFile(path, np.ascontiguousarray(arr), tuple(float(s) for s in spacing), origin, direction, img)


def check_label_grid(image: ImageFile, label: ImageFile, tol: float = 1e-3) -> None:
    """Check that a label map lies on its image's grid: same shape, and spacing, origin and direction equal up to
    ``tol`` (relative for the spacing, times the smallest spacing for the origin, absolute for the direction).

    Raises:
        ValueError: a different shape, spacing, origin or direction (names both files and the values).
    """
    if image.shape != label.shape:
        raise ValueError(f"shape mismatch between image {image.path} {image.shape} and label {label.path} "
                         f"{label.shape} (array order)")
    sp = np.asarray(image.spacing, np.float64)
    checks = (
        ("spacing", image.spacing, label.spacing, dict(rtol=tol, atol=0.0), "mm, array order"),
        ("origin", image.origin, label.origin, dict(rtol=0.0, atol=tol * float(np.abs(sp).min())), "mm, ITK LPS"),
        ("direction", image.direction, label.direction, dict(rtol=0.0, atol=tol), "ITK LPS"),
    )
    for name, a, b, kw, unit in checks:
        if len(a) != len(b) or not np.allclose(a, b, **kw):
            raise ValueError(f"label {label.path} does not lie on the grid of its image {image.path}: {name} "
                             f"{_fmt(b)} vs {_fmt(a)} ({unit}); give the label on its image's grid")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def load_h5(path: PathLike, keys: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
    """Read datasets ``keys`` of an HDF5 file into numpy arrays.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable HDF5 file, or a key is missing (the message lists the keys present).
    """
    import h5py

    path = _existing(path, "HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise KeyError(missing, sorted(f.keys()))
            return {k: np.asarray(f[k][()]) for k in keys}
    except KeyError as e:
        missing, present = e.args
        raise ValueError(f"{path}: missing dataset(s) {', '.join(missing)} (present: {', '.join(present) or 'none'})"
                         ) from None
    except Exception as e:
        raise ValueError(f"{path}: unreadable HDF5 file ({type(e).__name__}: {e})") from e


def _parse_value(v: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def read_cfg(path: PathLike, required: Iterable[str] = ()) -> dict[str, int | float | str]:
    """Read a ``key: value`` file (ACDC ``Info.cfg``, CAMUS ``Info_2CH.cfg``); values become int/float if they
    parse, else str. Blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not ``key: value``, or a ``required`` key is missing (names key and file).
    """
    path = _existing(path, "config file")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable config file ({e})") from e
    out: dict[str, int | float | str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if ":" not in line:
            raise ValueError(f"{path}, line {n}: expected 'key: value', got {line!r}")
        k, v = line.split(":", 1)
        out[k.strip()] = _parse_value(v.strip())
    missing = [k for k in required if k not in out]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (found: {', '.join(out) or 'none'})")
    return out


def check_image(arr: np.ndarray, path: PathLike) -> np.ndarray:
    """Return ``arr`` as float32 after checking it is non-empty, finite and not constant.

    A constant image (e.g. all zeros: an export that wrote no data) has no structure to register and would train
    silently on nothing after min-max scaling, so it is refused like NaN voxels.

    Raises:
        ValueError: empty array, NaN/Inf voxels (names the file and counts them), or every voxel equal (names the
            file and the value).
    """
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ValueError(f"{path}: empty image (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{path}: image has non-real dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise ValueError(f"{path}: image has {n_nan} NaN and {n_inf} Inf voxels")
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        raise ValueError(f"{path}: image is constant (every one of its {arr.size} voxels is {lo:g}): nothing to "
                         "register; replace or remove this file")
    return arr


def check_label(arr: np.ndarray, path: PathLike, allowed: Iterable[int] | None = (0, 1, 2, 3)) -> np.ndarray:
    """Return ``arr`` as uint8 after checking it holds integers from ``allowed`` only (``allowed=None``: any
    non-negative integers, returned as int64).

    Raises:
        ValueError: NaN/Inf or non-integer values, negative values, or values outside ``allowed`` (names the file
            and the values).
    """
    arr = np.asarray(arr)
    expected = "non-negative integer labels" if allowed is None else f"integer labels {sorted(int(a) for a in allowed)}"
    if arr.size == 0:
        raise ValueError(f"{path}: empty label map (shape {arr.shape})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: label map has NaN/Inf values")
        frac = arr != np.round(arr)
        if frac.any():
            raise ValueError(f"{path}: label map has {int(frac.sum())} non-integer values "
                             f"(e.g. {float(arr[frac].flat[0]):g}); expected {expected}")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{path}: label map has non-numeric dtype {arr.dtype}")
    if allowed is None:
        low = arr.min()
        if low < 0:
            raise ValueError(f"{path}: label map has negative values (min {float(low):g}); expected {expected}")
        return arr.astype(np.int64)
    allowed = sorted(int(a) for a in allowed)
    values = np.unique(arr)
    extra = [v for v in values.tolist() if int(v) not in allowed]
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:10]) + (" ..." if len(extra) > 10 else "")
        raise ValueError(f"{path}: labels outside the expected set {allowed}: {shown}")
    return arr.astype(np.uint8)


def check_same_shape(img: np.ndarray, lab: np.ndarray, img_path: PathLike, lab_path: PathLike) -> None:
    """Raise ``ValueError`` naming both files if an image and its mask differ in shape."""
    if np.shape(img) != np.shape(lab):
        raise ValueError(f"shape mismatch between image {img_path} {tuple(np.shape(img))} and mask {lab_path} "
                         f"{tuple(np.shape(lab))}")


# ----------------------------------------------------------------------------------------------------------------
# helpers of the layouts' writers (acdc.py, camus.py)
# ----------------------------------------------------------------------------------------------------------------


def prepare_root(root: PathLike) -> Path:
    """``root`` as a folder to write a dataset into (created).

    Raises:
        ValueError: ``root`` is an existing file.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is an existing file: the dataset writers need a folder (it is created)")
    root.mkdir(parents=True, exist_ok=True)
    return root


def new_file(path: Path, overwrite: bool) -> Path:
    """``path``, checked to be new unless ``overwrite``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; the dataset writers never overwrite files (pass overwrite=True).")
    return path


def write_nifti(image, path: Path, overwrite: bool) -> Path:
    """Save a ``nibabel`` NIfTI image to ``path`` (:func:`new_file` checks it first); returns ``path``."""
    import nibabel as nib

    nib.save(image, str(new_file(path, overwrite)))
    return path


def write_nifti_folder(folder: Path, stem: str, frames: Sequence[tuple[str, object, object]],
                       extra: Mapping[str, object] | None, texts: Mapping[str, str], overwrite: bool) -> Path:
    """The files of one case of the ACDC and CAMUS NIfTI layouts, in ``folder`` (created).

    ``{stem}_{key}.nii.gz`` and ``{stem}_{key}_gt.nii.gz`` for every ``(key, image, label)`` of ``frames``,
    ``{stem}_{name}.nii.gz`` for every ``name: image`` of ``extra`` (``nibabel`` NIfTI images) and the file ``name``
    with the text ``text`` for every ``name: text`` of ``texts``; no file is overwritten unless ``overwrite``.

    Returns:
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for key, image, label in frames:
        write_nifti(image, folder / f"{stem}_{key}.nii.gz", overwrite)
        write_nifti(label, folder / f"{stem}_{key}_gt.nii.gz", overwrite)
    for name, image in (extra or {}).items():
        write_nifti(image, folder / f"{stem}_{name}.nii.gz", overwrite)
    for name, text in texts.items():
        new_file(folder / name, overwrite).write_text(text)
    return folder
