"""Figures and static players for the book (matplotlib only; not imported by ``import diffreg``).

Chapters import it explicitly (``from diffreg import viz; viz.set_style()``). Every function returns the Figure or
Axes it drew (never ``plt.show()``); functions taking ``ax`` draw into it, or into a new figure when ``ax`` is None.

Input conventions (see ``book/notation.md``):

* Images: torch tensors or numpy arrays ``(B, C, *spatial)``; for convenience also ``(C, *spatial)`` with ``C = 1``
  and bare ``(*spatial)``. Only the first batch item and channel are shown. ``spatial`` is ``(H, W)`` in 2D and
  ``(D, H, W)`` in 3D (array order). A 3-axis array whose first axis is not 1 is read as a 3D volume.
* Displacements ``ddf``: ``(B, ndim, *spatial)`` or ``(ndim, *spatial)`` in voxel units, channel ``i`` moves along
  spatial axis ``i``; warping pulls, ``warped(p) = moving(p + ddf(p))``.
* 3D inputs are shown as one 2D slice: ``axis`` (default 0) at ``slice_index`` (default the middle). For fields the
  two in-plane components are kept (the out-of-plane one is dropped).
* Plots use ``imshow`` coordinates: x is the column (last axis), y the row, pointing down.

Players (:func:`player`, :func:`player_html`) are :meth:`matplotlib.animation.FuncAnimation.to_jshtml` animations
with embedded PNG frames: they play in the static HTML book, opened from disk, without a kernel.

Explained in chapter 01 (``notebooks/01_registration.md``).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import animation
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, TwoSlopeNorm, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "set_style", "COLORS", "LABEL_NAMES", "LABEL_COLORS", "label_colors", "label_cmap", "to_numpy", "image2d",
    "field2d", "jacobian_map", "show_pair", "overlay_labels", "plot_grid", "flow_rgb", "plot_flow", "plot_quiver",
    "plot_jacobian", "registration_figure", "small_multiples", "player", "player_html", "player_animation",
    "training_curve", "boxplot_table", "METHOD_COLORS", "boxplot_methods", "methods_figure", "learning_curves_figure",
]

#: book colours: one per cardiac structure (the same structure has the same colour in ACDC and CAMUS; Okabe-Ito,
#: colour-blind friendly) and a few roles used across chapters.
COLORS: dict[str, str] = {
    "LV": "#D55E00",       # LV cavity: vermillion
    "Myo": "#009E73",      # myocardium: bluish green
    "RV": "#56B4E9",       # right ventricle: sky blue
    "LA": "#F0E442",       # left atrium: yellow
    "grid": "#0072B2",     # deformation grid
    "quiver": "#D55E00",   # displacement arrows
    "fold": "#000000",     # det J <= 0
    "ours": "#0072B2",     # our runs in comparisons
    "paper": "#999999",    # the papers' reported numbers
}
#: structure names per label set (label value -> name); ACDC: 1 RV, 2 Myo, 3 LV cavity; CAMUS: 1 LV, 2 Myo, 3 LA.
LABEL_NAMES: dict[str, dict[int, str]] = {
    "acdc": {1: "RV", 2: "Myo", 3: "LV"},
    "camus": {1: "LV", 2: "Myo", 3: "LA"},
}
#: contour colour per label value, per label set (derived from :data:`COLORS` by structure).
LABEL_COLORS: dict[str, dict[int, str]] = {
    name: {value: COLORS[struct] for value, struct in names.items()} for name, names in LABEL_NAMES.items()
}

_EMBED_LIMIT_MB = 100.0


def set_style() -> None:
    """Apply the book's figure style (small fonts, no grid, grey nearest-neighbour images, dpi 90).

    Chapters call it once after importing :mod:`diffreg.viz`; it changes ``matplotlib.rcParams`` globally.
    """
    matplotlib.rcParams.update({
        "figure.dpi": 90,
        "savefig.dpi": 90,
        "figure.figsize": (4.0, 3.0),
        "font.size": 9,
        "axes.titlesize": 9,
        "axes.labelsize": 9,
        "figure.titlesize": 10,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "axes.grid": False,
        "image.cmap": "gray",
        "image.interpolation": "nearest",
        "animation.embed_limit": _EMBED_LIMIT_MB,
        "animation.frame_format": "png",
    })


def label_colors(label_set: str = "acdc") -> dict[int, str]:
    """``{label value: colour}`` of ``label_set`` (``"acdc"`` or ``"camus"``).

    Raises:
        ValueError: on an unknown label set.
    """
    if label_set not in LABEL_COLORS:
        raise ValueError(f"label_set must be one of {sorted(LABEL_COLORS)}, got {label_set!r}.")
    return LABEL_COLORS[label_set]


def label_cmap(label_set: str = "acdc") -> ListedColormap:
    """A 4-colour map for label maps with values 0..3 (0 = background, transparent), e.g.
    ``ax.imshow(label, cmap=label_cmap("acdc"), vmin=0, vmax=3, interpolation="nearest")``."""
    colors = label_colors(label_set)
    return ListedColormap([(0, 0, 0, 0)] + [colors[v] for v in (1, 2, 3)], name=f"labels_{label_set}")


# --------------------------------------------------------------------------------------------- input handling

def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a torch tensor (detached, on the CPU; floats as float32) or any array-like."""
    if hasattr(x, "detach"):
        x = x.detach()
        x = x.float() if x.is_floating_point() else x
        return x.cpu().numpy()
    return np.asarray(x)


def _slice(a: np.ndarray, axis: int, slice_index: int | None) -> np.ndarray:
    index = a.shape[axis] // 2 if slice_index is None else int(slice_index)
    if not -a.shape[axis] <= index < a.shape[axis]:
        raise ValueError(f"slice_index {index} out of range for axis {axis} of size {a.shape[axis]}.")
    return np.take(a, index, axis=axis)


def _is_rgb(a: np.ndarray) -> bool:
    return a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4


def image2d(x: Any, axis: int = 0, slice_index: int | None = None) -> np.ndarray:
    """A 2D view ``(H, W)`` of an image.

    Args:
        x: ``(B, C, *spatial)``, ``(1, *spatial)`` or ``(*spatial)``, tensor or array; the first batch item and
            channel are kept.
        axis, slice_index: for 3D volumes, the slice shown (default: the middle slice along axis 0).

    Raises:
        ValueError: when no 2D image can be made of ``x``.
    """
    a = to_numpy(x)
    shape = a.shape
    while a.ndim > 3 or (a.ndim == 3 and a.shape[0] == 1):
        a = a[0]
    if a.ndim == 3:
        a = _slice(a, axis, slice_index)
    if a.ndim != 2:
        raise ValueError(f"cannot show an array of shape {shape} as a 2D image.")
    return a


def _field_nd(ddf: Any) -> np.ndarray:
    """``(ndim, *spatial)`` numpy field from ``(B, ndim, *spatial)`` or ``(ndim, *spatial)``."""
    a = to_numpy(ddf)
    if a.ndim in (4, 5) and a.shape[1] == a.ndim - 2:
        return a[0]
    if a.ndim in (3, 4) and a.shape[0] == a.ndim - 1:
        return a
    raise ValueError(f"expected a field (B, ndim, *spatial) or (ndim, *spatial) with ndim in {{2, 3}}, got {a.shape}.")


def field2d(ddf: Any, axis: int = 0, slice_index: int | None = None) -> np.ndarray:
    """The in-plane field ``(2, H, W)`` (row, column components) of a 2D or 3D displacement.

    Args:
        ddf: ``(B, ndim, *spatial)`` or ``(ndim, *spatial)``.
        axis, slice_index: for 3D fields, the slice (default: middle along axis 0); the component along ``axis``
            is dropped.

    Raises:
        ValueError: on a bad field shape.
    """
    u = _field_nd(ddf)
    if u.shape[0] == 2:
        return u
    keep = [i for i in range(3) if i != axis % 3]
    return np.stack([_slice(u[i], axis, slice_index) for i in keep])


def jacobian_map(ddf_or_det: Any) -> np.ndarray:
    """The Jacobian determinant ``(*spatial)`` (numpy, full volume) of a field, or a given determinant map.

    Args:
        ddf_or_det: a field ``(B, ndim, *spatial)`` / ``(ndim, *spatial)`` (its determinant is computed with
            :func:`diffreg.metrics.jacobian_determinant`, first batch item) or a determinant ``(B, *spatial)`` /
            ``(*spatial)``. A 4D array ``(3, D, H, W)`` is read as a 3D field; pass batched inputs to be unambiguous.
    """
    a = to_numpy(ddf_or_det)
    try:
        u = _field_nd(a)
    except ValueError:
        return a[0] if a.ndim in (3, 4) and a.shape[0] == 1 else a
    from diffreg.metrics import jacobian_determinant

    return to_numpy(jacobian_determinant(u[None].astype(np.float64)))[0]


def _axes(ax: Axes | None, figsize: tuple[float, float] = (3.2, 3.2)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _clean(ax: Axes, title: str | None = None) -> Axes:
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return ax


# --------------------------------------------------------------------------------------------- single panels

def show_pair(moving: Any, fixed: Any, warped: Any = None, titles: Sequence[str] | None = None, diff: bool = True,
              axis: int = 0, slice_index: int | None = None) -> Figure:
    """A row of panels: moving, fixed, ``|fixed - moving|`` and, with ``warped``, warped and ``|fixed - warped|``.

    Args:
        moving, fixed, warped: images (see the module doc), same spatial shape.
        titles: titles replacing the defaults, in panel order (a shorter list replaces the first ones).
        diff: show the absolute differences (one shared colour scale, ``magma``).
        axis, slice_index: the slice of 3D images.

    Returns:
        The Figure: 3 axes (5 with ``warped``); without ``diff`` 2 (3).
    """
    m, f = image2d(moving, axis, slice_index), image2d(fixed, axis, slice_index)
    panels: list[tuple[np.ndarray, str, bool]] = [(m, "moving", False), (f, "fixed", False)]
    if diff:
        panels.append((np.abs(f - m), "|fixed - moving|", True))
    if warped is not None:
        w = image2d(warped, axis, slice_index)
        panels.append((w, "warped", False))
        if diff:
            panels.append((np.abs(f - w), "|fixed - warped|", True))
    if titles:
        panels = [(p, titles[i] if i < len(titles) else t, d) for i, (p, t, d) in enumerate(panels)]
    dmax = max([float(p.max()) for p, _, d in panels if d] + [1e-6])
    images = [p for p, _, d in panels if not d]
    lo, hi = min(float(p.min()) for p in images), max(float(p.max()) for p in images)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.7), squeeze=False)
    for ax, (p, t, d) in zip(axes[0], panels):
        if d:
            ax.imshow(p, cmap="magma", vmin=0, vmax=dmax)
        else:
            ax.imshow(p, cmap="gray", vmin=lo, vmax=hi)
        _clean(ax, t)
    fig.tight_layout()
    return fig


def overlay_labels(ax: Axes | None, image: Any, label: Any, label_set: str = "acdc", contour: bool = True,
                   axis: int = 0, slice_index: int | None = None, legend: bool = True, linestyle: str = "-",
                   linewidth: float = 1.2, show_image: bool = True) -> Axes:
    """The image in grey with one coloured contour (or a filled overlay) per structure of ``label``.

    Args:
        ax: the Axes to draw into (None: a new figure).
        image: image (see the module doc); ``label``: integer label map of the same spatial shape.
        label_set: ``"acdc"`` (1 RV, 2 Myo, 3 LV) or ``"camus"`` (1 LV, 2 Myo, 3 LA): names and colours.
        contour: contours (True) or filled semi-transparent regions (False).
        legend: a legend of the structures present in the slice.
        linestyle, linewidth: contour style (e.g. ``"--"`` to compare two label maps on one image).
        show_image: draw the image (False: only add contours to an existing panel).

    Returns:
        The Axes.
    """
    colors, names = label_colors(label_set), LABEL_NAMES[label_set]
    ax = _axes(ax)
    lab = np.rint(image2d(label, axis, slice_index)).astype(int)
    if show_image:
        ax.imshow(image2d(image, axis, slice_index), cmap="gray")
    handles = []
    for value, color in colors.items():
        mask = lab == value
        if not mask.any():
            continue
        if contour:
            ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=linewidth,
                       linestyles=linestyle)
        else:
            ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([color]), alpha=0.45, vmin=0, vmax=1)
        handles.append(Line2D([], [], color=color, lw=2, ls=linestyle, label=names[value]))
    if legend and handles:
        ax.legend(handles=handles, loc="lower right", frameon=True, framealpha=0.7, handlelength=1.0,
                  borderpad=0.3, labelspacing=0.2)
    return _clean(ax)


def plot_grid(ax: Axes | None, ddf: Any, step: int = 4, color: str = COLORS["grid"], background: Any = None,
              axis: int = 0, slice_index: int | None = None, linewidth: float = 0.8) -> Axes:
    """The deformation grid: the lines of a regular grid (every ``step`` voxels) mapped through ``p + ddf(p)``.

    Each grid point ``p`` of the fixed image is drawn where the warp reads the moving image (pull convention), so
    crossing lines mean folding. Coordinates follow ``imshow``: x = column (``ddf`` channel -1), y = row (channel
    -2), y pointing down; the limits are the image's.

    Args:
        ddf: ``(B, ndim, *spatial)`` or ``(ndim, *spatial)`` displacement in voxels (3D: in-plane components of
            the slice).
        step: grid spacing in voxels.
        background: an optional image drawn underneath (grey, semi-transparent).

    Returns:
        The Axes (one ``Line2D`` per grid line).
    """
    ax = _axes(ax)
    u = field2d(ddf, axis, slice_index)
    h, w = u.shape[1:]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = yy + u[0], xx + u[1]
    if background is not None:
        ax.imshow(image2d(background, axis, slice_index), cmap="gray", alpha=0.6)
    rows = list(range(0, h, step)) + ([h - 1] if (h - 1) % step else [])
    cols = list(range(0, w, step)) + ([w - 1] if (w - 1) % step else [])
    for r in rows:
        ax.plot(px[r, :], py[r, :], color=color, lw=linewidth)
    for c in cols:
        ax.plot(px[:, c], py[:, c], color=color, lw=linewidth)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    return _clean(ax, "deformation grid" if not ax.get_title() else None)


def flow_rgb(ddf: Any, max_magnitude: float | None = None, axis: int = 0, slice_index: int | None = None) -> np.ndarray:
    """The displacement as colour: hue = direction, value = magnitude / ``max_magnitude``, full saturation.

    Args:
        ddf: ``(B, ndim, *spatial)`` or ``(ndim, *spatial)`` (3D: in-plane components of the slice).
        max_magnitude: magnitude shown at full brightness (default: the slice's maximum); larger ones are clipped,
            so a fixed value gives comparable colours across frames.

    Returns:
        ``(H, W, 3)`` float array in [0, 1]; a zero field is black. The hue is ``(atan2(u_row, u_col) + pi) / 2pi``
        (see :func:`plot_flow` with ``wheel=True`` for the key).
    """
    u = field2d(ddf, axis, slice_index).astype(np.float64)
    mag = np.hypot(u[0], u[1])
    top = float(max_magnitude) if max_magnitude else float(mag.max())
    hue = (np.arctan2(u[0], u[1]) + np.pi) / (2 * np.pi)
    val = np.clip(mag / top, 0.0, 1.0) if top > 0 else np.zeros_like(mag)
    return hsv_to_rgb(np.stack([np.clip(hue, 0, 1), np.ones_like(hue), val], axis=-1))


def plot_flow(ax: Axes | None, ddf: Any, max_magnitude: float | None = None, axis: int = 0,
              slice_index: int | None = None, wheel: bool = False) -> Axes:
    """:func:`flow_rgb` as an image, titled with the maximum in-plane displacement in voxels.

    Args:
        wheel: add a small colour-wheel key (direction -> hue, radius -> magnitude) in the corner.

    Returns:
        The Axes.
    """
    ax = _axes(ax)
    u = field2d(ddf, axis, slice_index)
    ax.imshow(flow_rgb(u, max_magnitude))
    if wheel:
        n = 33
        yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
        key = np.dstack([flow_rgb(np.stack([yy, xx]), max_magnitude=1.0), np.hypot(yy, xx) <= 1])
        inset = ax.inset_axes([0.72, 0.72, 0.26, 0.26])
        inset.imshow(key)
        inset.axis("off")
    return _clean(ax, f"displacement (max {float(np.hypot(u[0], u[1]).max()):.1f} vx)")


def plot_quiver(ax: Axes | None, ddf: Any, step: int = 4, background: Any = None, axis: int = 0,
                slice_index: int | None = None, color: str = COLORS["quiver"]) -> Axes:
    """Arrows of the displacement every ``step`` voxels, drawn to scale (1 voxel of displacement = 1 pixel): each
    arrow goes from a fixed-image voxel to where the warp reads the moving image.

    Returns:
        The Axes.
    """
    ax = _axes(ax)
    u = field2d(ddf, axis, slice_index)
    h, w = u.shape[1:]
    if background is not None:
        ax.imshow(image2d(background, axis, slice_index), cmap="gray")
    yy, xx = np.meshgrid(np.arange(0, h, step), np.arange(0, w, step), indexing="ij")
    # angles="xy" with an inverted y axis: a positive row component points down, as in the image
    ax.quiver(xx, yy, u[1][::step, ::step], u[0][::step, ::step], angles="xy", scale_units="xy", scale=1,
              color=color, width=0.006)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    return _clean(ax, "displacement" if not ax.get_title() else None)


def plot_jacobian(ax: Axes | None, ddf_or_det: Any, folds: bool = True, axis: int = 0,
                  slice_index: int | None = None, colorbar: bool = True, vmax: float = 2.0,
                  fold_color: str = COLORS["fold"]) -> Axes:
    """The Jacobian determinant ``det(I + grad u)`` with folds marked.

    A diverging map (``RdBu_r``) centred at 1 (volume kept; red = expansion, blue = compression), clipped to
    ``[0, vmax]``; with ``folds``, voxels with ``det <= 0`` are painted ``fold_color`` (the overlay is the last
    image of ``ax.images``; its unmasked pixels are the folds of the slice). The title gives the folding
    percentage of the **whole** field (all slices in 3D), as :func:`diffreg.metrics.folding_percent` defines it.

    Args:
        ddf_or_det: a field or a determinant map (see :func:`jacobian_map`).
        colorbar: add a colour bar.

    Returns:
        The Axes.
    """
    ax = _axes(ax)
    det_full = jacobian_map(ddf_or_det)
    fold_pct = 100.0 * float((det_full <= 0).mean())
    det = _slice(det_full, axis, slice_index) if det_full.ndim == 3 else det_full
    im = ax.imshow(np.clip(det, 0.0, vmax), cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax))
    if folds:
        mask = det <= 0
        if mask.any():
            ax.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap=ListedColormap([fold_color]),
                      vmin=0, vmax=1, interpolation="nearest")
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_ticks([0.0, 0.5 * vmax, 1.0, vmax] if vmax != 2.0 else [0.0, 0.5, 1.0, 1.5, 2.0])
    return _clean(ax, f"det J (folds {fold_pct:.2f} %)")


# --------------------------------------------------------------------------------------------- composite figures

def _batched_tensor(x: Any, ndim_total: int):
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    while t.dim() < ndim_total:
        t = t[None]
    return t


def registration_figure(moving: Any, fixed: Any, warped: Any, ddf: Any, moving_label: Any = None,
                        fixed_label: Any = None, warped_label: Any = None, label_set: str = "acdc", step: int = 4,
                        axis: int = 0, slice_index: int | None = None) -> Figure:
    """One-row summary of a registration: moving, fixed, warped (with label contours), grid, flow, Jacobian.

    The warped panel shows the warped moving labels (``warped_label``, or ``moving_label`` warped with nearest
    interpolation by :func:`diffreg.spatial.warp`) as solid contours and the fixed labels dashed, so residual
    misalignment is visible.

    Args:
        moving, fixed, warped: images (see the module doc); ``ddf``: ``(B, ndim, *spatial)`` or
            ``(ndim, *spatial)`` displacement in voxels.
        moving_label, fixed_label, warped_label: optional integer label maps.
        label_set: ``"acdc"`` or ``"camus"``.
        step: grid spacing of the deformation grid panel.
        axis, slice_index: the slice of 3D inputs.

    Returns:
        The Figure: 6 panel axes (plus the Jacobian colour bar).
    """
    kw = dict(axis=axis, slice_index=slice_index)
    fig, axes = plt.subplots(1, 6, figsize=(14.5, 2.8))
    if warped_label is None and moving_label is not None:
        from diffreg.spatial import warp as _warp

        u = _field_nd(ddf)
        u_t = _batched_tensor(u, u.ndim + 1).float()
        ml = _batched_tensor(moving_label, u_t.dim())[:1, :1].long()
        warped_label = _warp(ml, u_t, mode="nearest")
    for a, x, lab, title in zip(axes[:3], (moving, fixed, warped), (moving_label, fixed_label, warped_label),
                                ("moving", "fixed", "warped moving")):
        if lab is not None:
            overlay_labels(a, x, lab, label_set, legend=title == "fixed", **kw)
        else:
            _clean(a).imshow(image2d(x, **kw), cmap="gray")
        a.set_title(title)
    if fixed_label is not None and warped_label is not None:
        overlay_labels(axes[2], warped, fixed_label, label_set, legend=False, linestyle="--", linewidth=0.8,
                       show_image=False, **kw)
        axes[2].set_title("warped (fixed dashed)")
    plot_grid(axes[3], ddf, step=step, **kw)
    plot_flow(axes[4], ddf, **kw)
    plot_jacobian(axes[5], ddf, **kw)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for a suptitle
    return fig


def small_multiples(images: Sequence[Any], titles: Sequence[str] | None = None, ncols: int = 4,
                    cmap: str = "gray", size: float = 2.4, vmin: float | None = None, vmax: float | None = None,
                    axis: int = 0, slice_index: int | None = None) -> Figure:
    """A grid of images (each through :func:`image2d`; RGB arrays ``(H, W, 3)`` as they are).

    Args:
        images: sequence of images (2D, 3D, tensors or arrays; may differ in size).
        titles: one per image.
        ncols: columns (rows follow); unused cells are switched off.
        vmin, vmax: a shared grey range (default: each image its own).

    Returns:
        The Figure with ``nrows * ncols`` axes (unused ones hidden).
    """
    n = len(images)
    if n == 0:
        raise ValueError("small_multiples needs at least one image.")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        a = to_numpy(images[k])
        a = a if _is_rgb(a) else image2d(a, axis, slice_index)
        ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
        _clean(ax, titles[k] if titles and k < len(titles) else None)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- players

def _panel(p: Any) -> np.ndarray | Callable[[Axes], Any]:
    if callable(p) and not hasattr(p, "shape"):
        return p
    a = to_numpy(p)
    return a if _is_rgb(a) else image2d(a)


def _panels(frame: Any) -> list:
    if isinstance(frame, (list, tuple)):
        return [_panel(p) for p in frame]
    return [_panel(frame)]


def _subsample(n: int, max_frames: int) -> list[int]:
    """At most ``max_frames`` indices of ``range(n)``, evenly spaced, always with the first and last."""
    if n <= max_frames:
        return list(range(n))
    max_frames = max(2, max_frames)
    return sorted(set(np.linspace(0, n - 1, max_frames).round().astype(int).tolist()))


def player_animation(frames: Sequence[Any], titles: Sequence[str] | None = None, interval: int = 200,
                     cmap: str | Sequence[str] = "gray", dpi: int = 72, max_frames: int = 25,
                     overlays: Sequence[Any] | None = None, suptitle: str | None = None,
                     panel_titles: Sequence[str] | None = None, label_set: str = "acdc", size: float = 2.0,
                     vlims: Sequence[tuple[float, float] | None] | None = None) -> animation.FuncAnimation:
    """The :class:`~matplotlib.animation.FuncAnimation` behind :func:`player` (same arguments); its figure is
    already closed, so a notebook shows no static copy."""
    if len(frames) == 0:
        raise ValueError("player needs at least one frame.")
    idx = _subsample(len(frames), max_frames)
    seq = [_panels(frames[i]) for i in idx]
    n_panels = len(seq[0])
    if any(len(f) != n_panels for f in seq):
        raise ValueError("every frame must have the same number of panels.")
    if titles is not None and len(titles) != len(frames):
        raise ValueError(f"got {len(titles)} titles for {len(frames)} frames.")
    labels = [titles[i] for i in idx] if titles is not None else [f"frame {i + 1}/{len(frames)}" for i in idx]
    if overlays is not None:
        if len(overlays) != len(frames):
            raise ValueError(f"got {len(overlays)} overlays for {len(frames)} frames.")
        ovl = []
        for i in idx:
            o = overlays[i]
            o = list(o) if isinstance(o, (list, tuple)) else [o]
            ovl.append(o + [None] * (n_panels - len(o)))
    else:
        ovl = [[None] * n_panels for _ in idx]
    cmaps = [cmap] * n_panels if isinstance(cmap, str) else list(cmap)
    if vlims is None:
        vlims = []
        for k in range(n_panels):
            arrays = [f[k] for f in seq if isinstance(f[k], np.ndarray) and not _is_rgb(f[k])]
            vlims.append((min(float(np.nanmin(a)) for a in arrays), max(float(np.nanmax(a)) for a in arrays))
                         if arrays else None)
    fig, axes = plt.subplots(1, n_panels, figsize=(size * n_panels, size + (0.75 if suptitle else 0.5)), dpi=dpi,
                             squeeze=False)
    axes = axes[0]
    head = fig.suptitle("")

    def draw(j: int):
        for k, ax in enumerate(axes):
            ax.clear()
            p = seq[j][k]
            if callable(p) and not isinstance(p, np.ndarray):
                p(ax)
            else:
                lim = vlims[k] or (None, None)
                ax.imshow(p, cmap=cmaps[k], vmin=lim[0], vmax=lim[1])
            if ovl[j][k] is not None:
                overlay_labels(ax, None, ovl[j][k], label_set, legend=False, show_image=False)
            _clean(ax, panel_titles[k] if panel_titles and k < len(panel_titles) else None)
        head.set_text(f"{suptitle}\n{labels[j]}" if suptitle else labels[j])
        return list(axes) + [head]

    draw(0)
    fig.tight_layout()
    anim = animation.FuncAnimation(fig, draw, frames=len(seq), interval=interval, blit=False, repeat=True)
    plt.close(fig)
    return anim


def player_html(frames: Sequence[Any], titles: Sequence[str] | None = None, interval: int = 200,
                cmap: str | Sequence[str] = "gray", dpi: int = 72, max_frames: int = 25,
                overlays: Sequence[Any] | None = None, suptitle: str | None = None, *,
                embed_frames: bool = True, mode: str = "loop", **kwargs: Any) -> str:
    """The HTML + JavaScript of :func:`player` as a string (what ``player(...).data`` holds).

    ``mode`` is the initial loop mode of the player (``"loop"``, ``"once"`` or ``"reflect"``); other keyword
    arguments go to :func:`player_animation`.
    """
    anim = player_animation(frames, titles, interval=interval, cmap=cmap, dpi=dpi, max_frames=max_frames,
                            overlays=overlays, suptitle=suptitle, **kwargs)
    limit = max(float(matplotlib.rcParams["animation.embed_limit"]), _EMBED_LIMIT_MB)
    with matplotlib.rc_context({"animation.embed_limit": limit, "animation.frame_format": "png"}):
        html = anim.to_jshtml(embed_frames=embed_frames, default_mode=mode)
    # matplotlib links its button icons (font-awesome) from a CDN; the book theme ships the same icon font, and a
    # page opened from disk must not depend on the network.
    return re.sub(r'<link[^>]*font-awesome[^>]*>\s*', "", html)


def player(frames: Sequence[Any], titles: Sequence[str] | None = None, interval: int = 200,
           cmap: str | Sequence[str] = "gray", dpi: int = 72, max_frames: int = 25,
           overlays: Sequence[Any] | None = None, suptitle: str | None = None, **kwargs: Any):
    """A JavaScript player of a sequence of 2D frames that works in the static book (no kernel, from disk).

    Args:
        frames: a sequence (list, or array ``(T, H, W)``) of frames. A frame is one panel or a list/tuple of panels
            shown side by side (e.g. ``(image, grid)``); every frame has the same number of panels. A panel is an
            image (anything :func:`image2d` takes; 3D -> middle slice), an RGB array ``(H, W, 3)`` (e.g.
            :func:`flow_rgb`), or a callable ``f(ax)`` drawing into a cleared Axes (e.g.
            ``functools.partial(viz.plot_grid, ddf=u)``).
        titles: one label per frame (e.g. ``"step 100"``), shown under ``suptitle``.
        interval: milliseconds between frames.
        cmap: colour map of the image panels (one, or one per panel).
        dpi: resolution of the embedded PNG frames. With the default ``size`` (2 inches = 144 px per panel), a
            25-frame player of one 64 x 64 panel of pure noise (the worst case for PNG) is about 1.3 MB; three
            panels of smooth images about the same.
        max_frames: frames are subsampled evenly to at most this many, always keeping the first and the last.
        overlays: optional label maps, one item per frame: a label map (contoured on the first panel) or a list
            with one label map or None per panel.
        suptitle: a fixed heading above the frame labels.
        **kwargs: ``panel_titles`` (one fixed title per panel), ``label_set`` (for ``overlays``), ``size`` (inches
            per panel), ``vlims`` (per-panel ``(vmin, vmax)``; default: each panel's range over all frames, so
            intensities are comparable across frames), ``mode`` (``"loop"``, ``"once"``, ``"reflect"``),
            ``embed_frames``.

    Returns:
        ``IPython.display.HTML`` (displayed by a notebook cell; the raw string is :func:`player_html`).

    Raises:
        ValueError: on an empty sequence, frames with differing panel counts, or mismatched ``titles`` /
        ``overlays`` lengths.
    """
    from IPython.display import HTML

    return HTML(player_html(frames, titles, interval=interval, cmap=cmap, dpi=dpi, max_frames=max_frames,
                            overlays=overlays, suptitle=suptitle, **kwargs))


# --------------------------------------------------------------------------------------------- logs and tables

def _float_or_none(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def training_curve(log: str | Path | Iterable[Mapping[str, Any]], keys: Sequence[str] | None = ("total",),
                   logy: bool = False, x: str = "step") -> Figure:
    """Loss curves, one panel per key, from a CSV log (``log.csv`` of :func:`diffreg.train.fit`) or row dicts.

    Args:
        log: path of a CSV file with a ``step`` column and one column per loss, or an iterable of dicts.
        keys: columns to plot (None: every numeric column but ``x``). Rows with an empty or non-numeric value for
            a key (e.g. validation columns logged less often) are skipped for that key.
        logy: logarithmic y axes.
        x: the x column.

    Returns:
        The Figure with ``len(keys)`` axes.

    Raises:
        ValueError: when a key (or ``x``) is not a column of the log.
    """
    if isinstance(log, (str, Path)):
        with open(log, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [dict(r) for r in log]
    columns = list(dict.fromkeys(c for r in rows for c in r))
    if keys is None:
        keys = [c for c in columns if c != x and any(_float_or_none(r.get(c)) is not None for r in rows)]
    missing = [k for k in [x, *keys] if k not in columns]
    if missing:
        raise ValueError(f"columns {missing} not in the log (columns: {columns}).")
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 2.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(_float_or_none(r.get(x)), _float_or_none(r.get(k))) for r in rows]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1.3, color=COLORS["ours"])
        ax.set_xlabel(x)
        ax.set_title(k)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _finish(fig: Figure, ax: Axes, ylabel: str | None, title: str | None) -> Figure:
    """Label the y axis and title a one-axes figure, tighten its layout and return it."""
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def boxplot_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str | None = None,
                  ylabel: str | None = None) -> Figure:
    """Box plots, one per column, of a per-case table (a list of row dicts, e.g. :func:`diffreg.evaluate.evaluate`).

    Non-numeric and NaN values are dropped (a Dice is NaN when the structure is absent); the triangle marks the
    mean, and each tick label gives the number of cases used.

    Returns:
        The Figure (one axes).
    """
    data, ticks = [], []
    for c in columns:
        v = np.array([_float_or_none(r.get(c)) for r in rows], dtype=float)
        v = v[np.isfinite(v)]
        data.append(v)
        ticks.append(f"{c}\n(n={v.size})")
    fig, ax = plt.subplots(figsize=(0.95 * len(columns) + 1.5, 2.9))
    ax.boxplot([d if d.size else [np.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(columns) + 1), ticks, rotation=30 if len(columns) > 4 else 0,
                  ha="right" if len(columns) > 4 else "center")
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig, ax, ylabel, title)


#: colours of methods in comparisons (Okabe-Ito order, then grey), assigned in the order the methods are given
METHOD_COLORS: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
                                  "#000000", "#999999")


def boxplot_methods(tables: Mapping[str, Sequence[Mapping[str, Any]]], columns: Sequence[str],
                    labels: Sequence[str] | None = None, title: str | None = None, ylabel: str | None = "Dice",
                    figsize: tuple[float, float] | None = None) -> Figure:
    """Grouped box plots: one group per column (e.g. per structure), one coloured box per method in each group.

    The benchmark's ``boxplot_dice.png`` (LDM-Morph Fig. 4 shows DSC distributions per method this way). NaN and
    non-numeric values are dropped (a Dice is NaN when the structure is absent); the triangle marks the mean.

    Args:
        tables: method name -> per-case table (row dicts, e.g. :func:`diffreg.evaluate.evaluate`).
        columns: the columns compared (groups, left to right).
        labels: group labels (default: the column names).
        title, ylabel: axis texts.
        figsize: default: wide enough for every box.

    Returns:
        The Figure (one axes with a legend of the methods).

    Raises:
        ValueError: no tables or no columns.
    """
    names = list(tables)
    if not names or not columns:
        raise ValueError("boxplot_methods needs at least one table and one column.")
    k = len(names)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=figsize or (max(4.0, 0.3 * k * len(columns) + 1.8), 3.0))
    for j, name in enumerate(names):
        color = METHOD_COLORS[j % len(METHOD_COLORS)]
        data = []
        for c in columns:
            v = np.array([_float_or_none(r.get(c)) for r in tables[name]], dtype=float)
            v = v[np.isfinite(v)]
            data.append(v if v.size else [np.nan])
        positions = [g + (j - (k - 1) / 2) * width for g in range(len(columns))]
        ax.boxplot(data, positions=positions, widths=width * 0.85, showmeans=True, patch_artist=True,
                   boxprops=dict(facecolor=color, alpha=0.55, edgecolor=color),
                   medianprops=dict(color="black", lw=1.0), whiskerprops=dict(color=color),
                   capprops=dict(color=color), flierprops=dict(marker=".", markersize=3, markeredgecolor=color),
                   meanprops=dict(marker="^", markersize=4, markerfacecolor="white", markeredgecolor="black"))
    ax.set_xticks(range(len(columns)), list(labels) if labels else list(columns))
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.grid(alpha=0.3, axis="y")
    handles = [Line2D([], [], color=METHOD_COLORS[j % len(METHOD_COLORS)], lw=6, alpha=0.55, label=n)
               for j, n in enumerate(names)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _finish(fig, ax, ylabel, title)


def methods_figure(moving: Any, fixed: Any, fields: Mapping[str, Any], moving_label: Any = None,
                   fixed_label: Any = None, label_set: str = "acdc", notes: Mapping[str, str] | None = None,
                   step: int = 4, axis: int = 0, slice_index: int | None = None) -> Figure:
    """One pair registered by several methods: a row per method with the warped moving image, ``|fixed - warped|``
    and the deformation grid (FSDiffReg Fig. 3 shows its comparison this way), below a row with the inputs.

    Every method's ``warped`` is ``diffreg.spatial.warp(moving, ddf)`` of the same ``moving``, so the rows differ
    only by their fields. With labels, the warped moving labels are drawn solid and the fixed labels dashed.

    Args:
        moving, fixed: the pair (see the module doc); one shared grey scale.
        fields: method name -> ``(B, ndim, *spatial)`` or ``(ndim, *spatial)`` displacement in voxels.
        moving_label, fixed_label: optional integer label maps of the pair.
        label_set: ``"acdc"`` or ``"camus"``.
        notes: method name -> text added to its row title (e.g. the pair's Dice).
        step: grid spacing of the deformation grid, voxels.
        axis, slice_index: the slice of 3D inputs.

    Returns:
        The Figure with ``(1 + len(fields)) x 3`` axes.

    Raises:
        ValueError: no fields.
    """
    import torch

    from diffreg.spatial import warp as _warp

    if not fields:
        raise ValueError("methods_figure needs at least one field.")
    kw = dict(axis=axis, slice_index=slice_index)
    m_t = torch.as_tensor(to_numpy(moving)).float()
    nd = _field_nd(next(iter(fields.values()))).shape[0]
    while m_t.dim() < nd + 2:
        m_t = m_t[None]
    m_t = m_t[:1, :1]
    ml_t = None
    if moving_label is not None:
        ml_t = torch.as_tensor(to_numpy(moving_label)).long()
        while ml_t.dim() < nd + 2:
            ml_t = ml_t[None]
        ml_t = ml_t[:1, :1]
    f2, m2 = image2d(fixed, **kw), image2d(moving, **kw)
    lo, hi = min(float(f2.min()), float(m2.min())), max(float(f2.max()), float(m2.max()))
    rows = 1 + len(fields)
    fig, axes = plt.subplots(rows, 3, figsize=(7.2, 2.4 * rows), squeeze=False)

    def show(ax: Axes, img: np.ndarray, label: Any = None) -> None:
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        if label is not None:
            overlay_labels(ax, img, label, label_set, legend=False, show_image=False, **kw)
        if fixed_label is not None:
            overlay_labels(ax, img, fixed_label, label_set, legend=False, show_image=False, linestyle="--",
                           linewidth=0.8, **kw)
        _clean(ax)

    diffs = {"input": np.abs(f2 - m2)}
    warped: dict[str, tuple[np.ndarray, Any]] = {}
    for name, ddf in fields.items():
        u = torch.as_tensor(_field_nd(ddf)).float()[None]
        w = _warp(m_t, u)
        wl = _warp(ml_t, u, mode="nearest") if ml_t is not None else None
        warped[name] = (image2d(w, **kw), wl)
        diffs[name] = np.abs(f2 - warped[name][0])
    dmax = max(float(d.max()) for d in diffs.values()) or 1.0
    show(axes[0, 0], m2, moving_label)
    axes[0, 0].set_title("moving")
    show(axes[0, 1], f2)
    axes[0, 1].set_title("fixed")
    axes[0, 2].imshow(diffs["input"], cmap="magma", vmin=0, vmax=dmax)
    _clean(axes[0, 2], "|fixed - moving|")
    axes[0, 0].set_ylabel("input")
    for i, (name, ddf) in enumerate(fields.items(), start=1):
        w2, wl = warped[name]
        show(axes[i, 0], w2, wl)
        axes[i, 0].set_title("warped moving")
        axes[i, 1].imshow(diffs[name], cmap="magma", vmin=0, vmax=dmax)
        _clean(axes[i, 1], "|fixed - warped|")
        plot_grid(axes[i, 2], ddf, step=step, background=fixed, **kw)
        axes[i, 2].set_title("deformation grid")
        note = (notes or {}).get(name)
        axes[i, 0].set_ylabel(f"{name}\n{note}" if note else name)
    fig.tight_layout()
    return fig


def learning_curves_figure(curves: Sequence[Mapping[str, Any]]) -> Figure:
    """Learning curves of several methods: validation Dice against training pairs seen (left) and against training
    seconds (right), one colour per method.

    Explained in chapter 10.

    Args:
        curves: rows with ``method``, ``step``, ``pairs_seen``, ``seconds`` and ``val_dice``
            (:func:`diffreg.bench.learning_curves`, or a ``curves.csv`` read back).

    Returns:
        The figure.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(dict.fromkeys(r["method"] for r in curves))
    for k, name in enumerate(names):
        rows = sorted((r for r in curves if r["method"] == name), key=lambda r: r["step"])
        for ax, key in zip(axes, ("pairs_seen", "seconds")):
            ax.plot([r[key] for r in rows], [r["val_dice"] for r in rows], "o-", ms=3, color=f"C{k}", label=name)
    axes[0].set_xlabel("training pairs seen")
    axes[1].set_xlabel("training seconds (this device)")
    for ax in axes:
        ax.set_ylabel("validation Dice")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Learning curves on held-out validation pairs")
    fig.tight_layout()
    return fig
