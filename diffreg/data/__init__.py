"""Data: synthetic cardiac phantoms with true motion, ACDC and CAMUS loaders, ED/ES pair datasets.

Explained in chapter 01 (phantoms, pairs) and ``book/reproducing.md`` (real data). Real datasets are never
downloaded and never written to: point ``DIFFREG_DATA`` (or :func:`open_dataset`) at a copy you obtained. Image
and mask files are read by :func:`diffreg.data.io.read_image_file` and preprocessed by :mod:`diffreg.data.preprocess`,
both shared with :func:`diffreg.apply.register_files`.

``DIFFREG_DATA`` / ``spec`` strings:

* ``"phantom"`` -- short-axis phantom, 2D (``dims=2``) or 3D (``dims=3``);
* ``"phantom:sax"``, ``"phantom:sax3d"``, ``"phantom:echo"`` -- a given phantom kind;
* ``"acdc:PATH"`` -- ACDC, official NIfTI layout; ``"acdc-h5:PATH"`` -- ACDC, preprocessed HDF5 layout;
* ``"camus:PATH"`` -- CAMUS (NIfTI or MetaImage release).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffreg.data.pairs import (
    ACDCPairs,
    CAMUSPairs,
    PairDataset,
    PhantomPairs,
    split_indices,
)
from diffreg.data.phantom import (
    PhantomSequence,
    make_echo_2d,
    make_phantom,
    make_sax_2d,
    make_sax_3d,
    write_acdc,
    write_acdc_h5,
    write_camus,
    write_phantom,
)

__all__ = [
    "open_dataset",
    "open_configured",
    "SCHEMES",
    "PairDataset",
    "PhantomPairs",
    "ACDCPairs",
    "CAMUSPairs",
    "split_indices",
    "PhantomSequence",
    "make_sax_2d",
    "make_sax_3d",
    "make_echo_2d",
    "make_phantom",
    "write_acdc",
    "write_acdc_h5",
    "write_camus",
    "write_phantom",
]

#: Valid ``spec`` forms of :func:`open_dataset`.
SCHEMES = ("phantom", "phantom:sax", "phantom:sax3d", "phantom:echo", "acdc:PATH", "acdc-h5:PATH", "camus:PATH")


def open_dataset(spec: str, split: str = "train", dims: int = 2, profile: str | None = "quick",
                 size: int | Sequence[int] | None = None, **kwargs: Any) -> PairDataset:
    """Open a pair dataset from a ``DIFFREG_DATA``-style string.

    Args:
        spec: ``"phantom"``, ``"phantom:sax"``, ``"phantom:sax3d"``, ``"phantom:echo"``, ``"acdc:PATH"``,
            ``"acdc-h5:PATH"`` or ``"camus:PATH"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        dims: 2 or 3 (``"phantom"`` picks ``sax`` or ``sax3d``; ACDC volumes or slices; CAMUS is 2D only).
        profile: ``"quick"`` (2D 64 x 64; 3D ``(16, 64, 64)``) or ``"paper"`` (ACDC 3D ``(32, 128, 128)`` at
            3.15 x 1.5 x 1.5 mm, 2D LDM-Morph slices 128 x 128; CAMUS and phantoms 128); ``None``: each class's
            default.
        size: output size (overrides the profile's).
        **kwargs: passed to :class:`PhantomPairs`, :class:`ACDCPairs` or :class:`CAMUSPairs`.

    Raises:
        ValueError: unknown scheme or phantom kind (the message lists the valid ones), bad arguments.
        FileNotFoundError: the path does not exist (or holds no patients).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string; valid forms: {', '.join(SCHEMES)}.")
    spec = spec.strip()
    scheme, _, rest = spec.partition(":")
    scheme = scheme.lower()
    if scheme == "phantom":
        kind = rest or ("sax3d" if dims == 3 else "sax")
        if kind not in ("sax", "sax3d", "echo"):
            raise ValueError(f"unknown phantom kind {kind!r} in {spec!r}; valid forms: {', '.join(SCHEMES)}.")
        if (kind == "sax3d") != (dims == 3):
            raise ValueError(f"phantom kind {kind!r} is {'3D' if kind == 'sax3d' else '2D'} but dims={dims} was asked "
                             f"(use phantom:sax3d for 3D, phantom:sax or phantom:echo for 2D)")
        if size is None:
            big = profile == "paper"
            size = {"sax": 128 if big else 64, "sax3d": (32, 128, 128) if big else (16, 64, 64),
                    "echo": 128 if big else 64}[kind]
        return PhantomPairs(kind=kind, split=split, size=size, **kwargs)
    if scheme in ("acdc", "acdc-h5", "camus"):
        if not rest:
            raise ValueError(f"{spec!r}: missing path; write {scheme}:PATH (valid forms: {', '.join(SCHEMES)}).")
        root = Path(rest).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{scheme} data folder not found: {root} (from {spec!r})")
        if scheme == "camus":
            return CAMUSPairs(root, split=split, size=size, profile=profile, dims=dims, **kwargs)
        layout = "h5" if scheme == "acdc-h5" else "nifti"
        return ACDCPairs(root, layout=layout, dims=dims, split=split, profile=profile, size=size, **kwargs)
    raise ValueError(f"unknown dataset scheme {scheme!r} in {spec!r}; valid forms: {', '.join(SCHEMES)}.")


def open_configured(spec: str, split: str, data: Any, profile: str | None, **kwargs: Any) -> PairDataset:
    """:func:`open_dataset` at a configuration's data settings.

    Args:
        spec: a ``DIFFREG_DATA`` string; ``"phantom"`` means the configuration's phantom kind (``sax``, ``sax3d`` or
            ``echo``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        data: a :class:`diffreg.config.DataConfig`: ``dims``, ``size``, ``intensity``, ``direction`` (``None``: the
            dataset's default), for phantoms ``phantom`` and ``n_subjects``, for CAMUS ``view``, for ACDC
            ``split_scheme``.
        profile: the profile whose preprocessing is used (``"quick"`` or ``"paper"``).
        **kwargs: passed on (e.g. ``intensity``); they override the configuration's values.

    Raises:
        ValueError, FileNotFoundError: as :func:`open_dataset`.
    """
    scheme = spec.strip().lower().partition(":")[0]
    if spec.strip().lower() == "phantom":
        spec = f"phantom:{data.phantom}"
    if scheme == "phantom":
        kwargs.setdefault("n_subjects", data.n_subjects)
    if getattr(data, "direction", None) is not None:
        kwargs.setdefault("direction", data.direction)
    if getattr(data, "intensity", None) is not None:  # e.g. LDM-Morph's [0, 1]
        kwargs.setdefault("intensity", tuple(data.intensity))
    if scheme == "camus":
        kwargs.setdefault("view", getattr(data, "view", "2CH"))
    if scheme in ("acdc", "acdc-h5"):
        kwargs.setdefault("split_scheme", getattr(data, "split_scheme", "diffreg"))
    return open_dataset(spec, split=split, dims=data.dims, profile=profile, size=data.size, **kwargs)
