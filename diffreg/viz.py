"""Figures and static players for the book (matplotlib only; not imported by ``import diffreg``).

Every function returns the Figure or Axes it drew (no ``plt.show()``). Inputs may be torch tensors or numpy
arrays; images are accepted as ``(B, C, *spatial)``, ``(C, *spatial)`` or ``(*spatial)`` and displacement fields as
``(B, ndim, *spatial)`` or ``(ndim, *spatial)``, always the first item of a batch and channel. For 3D inputs a 2D slice
is shown: ``axis`` (default 0, the slice axis of short-axis stacks) at ``index`` (default the middle).

Players (:func:`player`, :func:`player_html`) are :meth:`matplotlib.animation.FuncAnimation.to_jshtml` animations
with embedded PNG frames: they play in the static HTML book, from disk, without a kernel.

Explained in chapter 01 (``notebooks/01_registration.md``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import animation
from matplotlib.colors import ListedColormap, TwoSlopeNorm, hsv_to_rgb
from matplotlib.figure import Figure

__all__ = [
    "set_style", "LABEL_NAMES", "LABEL_COLORS", "to_numpy", "image2d", "field2d", "show_pair", "overlay_labels",
    "plot_grid", "flow_rgb", "plot_flow", "plot_quiver", "plot_jacobian", "registration_figure", "small_multiples",
    "player", "player_html", "training_curve", "boxplot_table",
]

#: structure names per label set (label value -> name)
LABEL_NAMES = {
    "acdc": {1: "RV", 2: "Myo", 3: "LV"},
    "camus": {1: "LV", 2: "Myo", 3: "LA"},
}
#: contour colours per label value (colour-blind friendly: Okabe-Ito)
LABEL_COLORS = {1: "#56B4E9", 2: "#E69F00", 3: "#CC79A7"}


def set_style() -> None:
    """The book's figure style: small fonts, no grid, compact layout, dpi 90."""
    matplotlib.rcParams.update({
        "figure.dpi": 90,
        "savefig.dpi": 90,
        "font.size": 9,
        "axes.titlesize": 9,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "axes.grid": False,
        "image.cmap": "gray",
        "image.interpolation": "nearest",
        "figure.constrained_layout.use": False,
        "animation.embed_limit": 64.0,
    })


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a tensor (detached, on the CPU) or an array-like."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _slice3d(a: np.ndarray, axis: int, index: int | None) -> np.ndarray:
    index = a.shape[axis] // 2 if index is None else index
    return np.take(a, index, axis=axis)


def image2d(x: Any, axis: int = 0, index: int | None = None) -> np.ndarray:
    """A 2D view of an image: drops batch/channel axes of size 1 and slices 3D volumes (``axis``, ``index``)."""
    a = to_numpy(x)
    while a.ndim > 3 or (a.ndim == 3 and a.shape[0] == 1):
        a = a[0]
    if a.ndim == 3:
        a = _slice3d(a, axis, index)
    if a.ndim != 2:
        raise ValueError(f"cannot show an array of shape {to_numpy(x).shape} as an image")
    return a


def field2d(ddf: Any, axis: int = 0, index: int | None = None) -> np.ndarray:
    """A 2D in-plane field ``(2, H, W)`` from ``(B, ndim, *spatial)`` or ``(ndim, *spatial)``.

    For 3D fields the slice ``index`` along ``axis`` is taken and the two in-plane components are kept.
    """
    a = to_numpy(ddf)
    if a.ndim in (4, 5) and a.shape[1] == a.ndim - 2:
        a = a[0]
    ndim = a.shape[0]
    if ndim == 2 and a.ndim == 3:
        return a
    if ndim == 3 and a.ndim == 4:
        keep = [i for i in range(3) if i != axis]
        return np.stack([_slice3d(a[i], axis, index) for i in keep])
    raise ValueError(f"expected a field (B, ndim, *spatial) or (ndim, *spatial), got shape {a.shape}")


def _axes(ax: plt.Axes | None, figsize=(3.2, 3.2)) -> plt.Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _clean(ax: plt.Axes, title: str | None = None) -> plt.Axes:
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return ax


def show_pair(moving: Any, fixed: Any, warped: Any = None, titles: Sequence[str] | None = None, diff: bool = True,
              axis: int = 0, index: int | None = None) -> Figure:
    """Moving, fixed and ``|fixed - moving|``; with ``warped``, also the warped image and ``|fixed - warped|``."""
    m, f = image2d(moving, axis, index), image2d(fixed, axis, index)
    panels = [(m, "moving"), (f, "fixed")]
    if diff:
        panels.append((np.abs(f - m), "|fixed - moving|"))
    if warped is not None:
        w = image2d(warped, axis, index)
        panels.append((w, "warped"))
        if diff:
            panels.append((np.abs(f - w), "|fixed - warped|"))
    if titles:
        panels = [(p, titles[i] if i < len(titles) else t) for i, (p, t) in enumerate(panels)]
    n_diff = [k for k, (_, t) in enumerate(panels) if diff and k >= 2 and k % 2 == 0]
    dmax = max([float(panels[k][0].max()) for k in n_diff] + [1e-6])
    lo, hi = min(m.min(), f.min()), max(m.max(), f.max())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for k, (ax, (p, t)) in enumerate(zip(axes, panels)):
        if k in n_diff:
            ax.imshow(p, cmap="magma", vmin=0, vmax=dmax)
        else:
            ax.imshow(p, cmap="gray", vmin=lo, vmax=hi)
        _clean(ax, t)
    fig.tight_layout()
    return fig


def overlay_labels(ax: plt.Axes | None, image: Any, label: Any, label_set: str = "acdc", contour: bool = True,
                   axis: int = 0, index: int | None = None, legend: bool = True) -> plt.Axes:
    """The image in grey with one coloured contour (or filled overlay) per structure of ``label``."""
    ax = _axes(ax)
    img, lab = image2d(image, axis, index), image2d(label, axis, index).astype(int)
    ax.imshow(img, cmap="gray")
    names = LABEL_NAMES.get(label_set, {})
    handles = []
    for value, color in LABEL_COLORS.items():
        mask = lab == value
        if not mask.any():
            continue
        if contour:
            ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.2)
        else:
            ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([color]), alpha=0.45, vmin=0, vmax=1)
        handles.append(matplotlib.lines.Line2D([], [], color=color, lw=2, label=names.get(value, str(value))))
    if legend and handles:
        ax.legend(handles=handles, loc="lower right", frameon=True, framealpha=0.7, handlelength=1.0)
    return _clean(ax)


def plot_grid(ax: plt.Axes | None, ddf: Any, step: int = 4, color: str = "#1f77b4", background: Any = None,
              axis: int = 0, index: int | None = None, linewidth: float = 0.8) -> plt.Axes:
    """The deformed grid: the lines of a regular grid (every ``step`` voxels) mapped through ``p + u(p)``.

    Coordinates follow ``imshow``: x is the column (axis 1 of the 2D view), y the row (axis 0), y pointing down.
    """
    ax = _axes(ax)
    u = field2d(ddf, axis, index)
    h, w = u.shape[1:]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = yy + u[0], xx + u[1]
    if background is not None:
        ax.imshow(image2d(background, axis, index), cmap="gray", alpha=0.6)
    for r in range(0, h, step):
        ax.plot(px[r, :], py[r, :], color=color, lw=linewidth)
    for c in range(0, w, step):
        ax.plot(px[:, c], py[:, c], color=color, lw=linewidth)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    return _clean(ax, "deformation grid" if ax.get_title() == "" else None)


def flow_rgb(ddf: Any, max_magnitude: float | None = None, axis: int = 0, index: int | None = None) -> np.ndarray:
    """Displacement as colour ``(H, W, 3)`` in [0, 1]: hue = direction, value = magnitude / ``max_magnitude``
    (default: the field's maximum); a zero field is black."""
    u = field2d(ddf, axis, index)
    mag = np.hypot(u[0], u[1])
    top = float(max_magnitude) if max_magnitude else float(mag.max())
    ang = (np.arctan2(u[0], u[1]) + np.pi) / (2 * np.pi)
    val = np.clip(mag / top, 0, 1) if top > 0 else np.zeros_like(mag)
    hsv = np.stack([ang, np.ones_like(ang), val], axis=-1)
    return hsv_to_rgb(hsv)


def plot_flow(ax: plt.Axes | None, ddf: Any, max_magnitude: float | None = None, axis: int = 0,
              index: int | None = None) -> plt.Axes:
    """:func:`flow_rgb` as an image, titled with the maximum displacement in voxels."""
    ax = _axes(ax)
    u = field2d(ddf, axis, index)
    ax.imshow(flow_rgb(u, max_magnitude))
    return _clean(ax, f"displacement (max {np.hypot(u[0], u[1]).max():.1f} vx)")


def plot_quiver(ax: plt.Axes | None, ddf: Any, step: int = 4, background: Any = None, axis: int = 0,
                index: int | None = None) -> plt.Axes:
    """Arrows of the displacement every ``step`` voxels (pointing where each fixed voxel reads the moving image)."""
    ax = _axes(ax)
    u = field2d(ddf, axis, index)
    h, w = u.shape[1:]
    if background is not None:
        ax.imshow(image2d(background, axis, index), cmap="gray")
    yy, xx = np.meshgrid(np.arange(0, h, step), np.arange(0, w, step), indexing="ij")
    ax.quiver(xx, yy, u[1][::step, ::step], u[0][::step, ::step], angles="xy", scale_units="xy", scale=1,
              color="#d62728", width=0.006)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    return _clean(ax)


def plot_jacobian(ax: plt.Axes | None, ddf_or_det: Any, folds: bool = True, axis: int = 0, index: int | None = None,
                  colorbar: bool = True, vmax: float = 2.0) -> plt.Axes:
    """The Jacobian determinant (diverging map centred at 1, clipped to ``[0, vmax]``) with folds
    (``det <= 0``) in black, titled with the folding percentage of the whole field.

    ``ddf_or_det``: a field ``(B, ndim, *spatial)`` / ``(ndim, *spatial)`` (its determinant is computed with
    :func:`diffreg.metrics.jacobian_determinant`) or a determinant map ``(*spatial)`` / ``(B, *spatial)``.
    """
    from diffreg.metrics import jacobian_determinant

    ax = _axes(ax)
    a = to_numpy(ddf_or_det)
    is_field = (a.ndim in (4, 5) and a.shape[1] == a.ndim - 2) or (a.ndim in (3, 4) and a.shape[0] == a.ndim - 1)
    if is_field:
        field = a if a.ndim in (4, 5) and a.shape[1] == a.ndim - 2 else a[None]
        det_full = to_numpy(jacobian_determinant(field))[0]
    else:
        det_full = a[0] if a.ndim in (3, 4) and a.shape[0] == 1 else a
    fold_pct = 100.0 * float((det_full <= 0).mean())
    det = _slice3d(det_full, axis, index) if det_full.ndim == 3 else det_full
    im = ax.imshow(np.clip(det, 0, vmax), cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax))
    if folds and (det <= 0).any():
        mask = det <= 0
        ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap(["black"]), vmin=0, vmax=1)
    if colorbar:
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    return _clean(ax, f"det J (folds {fold_pct:.2f} %)")


def registration_figure(moving: Any, fixed: Any, warped: Any, ddf: Any, moving_label: Any = None,
                        fixed_label: Any = None, warped_label: Any = None, label_set: str = "acdc", step: int = 4,
                        axis: int = 0, index: int | None = None) -> Figure:
    """One row: moving, fixed, warped (with label contours: moving, fixed, and the fixed contours on the
    warped image, or ``warped_label`` when given), deformation grid, displacement colour, Jacobian determinant."""
    from diffreg.spatial import warp as _warp

    fig, axes = plt.subplots(1, 6, figsize=(15, 2.9))
    kw = dict(axis=axis, index=index)
    if moving_label is not None and fixed_label is not None:
        if warped_label is None:
            import torch

            ml = moving_label if hasattr(moving_label, "dim") else torch.as_tensor(np.asarray(moving_label))
            u = ddf if hasattr(ddf, "dim") else torch.as_tensor(np.asarray(ddf))
            while ml.dim() < u.dim():
                ml = ml[None]
            warped_label = _warp(ml.long(), u.float(), mode="nearest")
        overlay_labels(axes[0], moving, moving_label, label_set, legend=False, **kw)
        overlay_labels(axes[1], fixed, fixed_label, label_set, legend=False, **kw)
        overlay_labels(axes[2], warped, warped_label, label_set, **kw)
    else:
        for a, x in zip(axes[:3], (moving, fixed, warped)):
            a.imshow(image2d(x, **kw), cmap="gray")
            _clean(a)
    for a, t in zip(axes[:3], ("moving", "fixed", "warped moving")):
        a.set_title(t)
    plot_grid(axes[3], ddf, step=step, **kw)
    axes[3].set_title("deformation grid")
    plot_flow(axes[4], ddf, **kw)
    plot_jacobian(axes[5], ddf, **kw)
    fig.tight_layout()
    return fig


def small_multiples(images: Sequence[Any], titles: Sequence[str] | None = None, ncols: int = 4,
                    cmap: str = "gray", size: float = 2.4, vmin: float | None = None,
                    vmax: float | None = None) -> Figure:
    """A grid of images (each shown with :func:`image2d`; RGB arrays ``(H, W, 3)`` as they are)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        a = to_numpy(images[k])
        if not (a.ndim == 3 and a.shape[-1] == 3):
            a = image2d(a)
        ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
        _clean(ax, titles[k] if titles else None)
    fig.tight_layout()
    return fig


def _panels(frame: Any) -> list[np.ndarray]:
    if isinstance(frame, (list, tuple)):
        out = []
        for p in frame:
            a = to_numpy(p)
            out.append(a if (a.ndim == 3 and a.shape[-1] == 3) else image2d(a))
        return out
    a = to_numpy(frame)
    return [a if (a.ndim == 3 and a.shape[-1] == 3) else image2d(a)]


def _subsample(n: int, max_frames: int) -> list[int]:
    if n <= max_frames:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_frames).round().astype(int).tolist()))


def player(frames: Sequence[Any], titles: Sequence[str] | None = None, interval: int = 300, cmap: str = "gray",
           dpi: int = 72, max_frames: int = 25, suptitle: str | None = None, panel_titles: Sequence[str] | None = None,
           size: float = 2.4, vlims: Sequence[tuple[float, float] | None] | None = None) -> animation.FuncAnimation:
    """A :class:`~matplotlib.animation.FuncAnimation` over ``frames`` (see :func:`player_html` for the HTML).

    Args:
        frames: a sequence of frames; each frame is one 2D image (or anything :func:`image2d` accepts, or an RGB
            ``(H, W, 3)`` array) or a list of such panels shown side by side.
        titles: one title per frame (e.g. the step).
        interval: milliseconds between frames.
        max_frames: frames are subsampled evenly to at most this many (the first and last are kept).
        panel_titles: one fixed title per panel.
        vlims: per-panel ``(vmin, vmax)``; default: the range of that panel over all frames.
    """
    idx = _subsample(len(frames), max_frames)
    seq = [_panels(frames[i]) for i in idx]
    labels = [titles[i] for i in idx] if titles else [f"{i + 1}/{len(frames)}" for i in idx]
    n_panels = len(seq[0])
    if vlims is None:
        vlims = [(min(float(f[k].min()) for f in seq), max(float(f[k].max()) for f in seq)) for k in range(n_panels)]
    fig, axes = plt.subplots(1, n_panels, figsize=(size * n_panels, size + 0.5), dpi=dpi, squeeze=False)
    axes = axes[0]
    ims = []
    for k, ax in enumerate(axes):
        lim = vlims[k] or (None, None)
        ims.append(ax.imshow(seq[0][k], cmap=cmap, vmin=lim[0], vmax=lim[1]))
        _clean(ax, panel_titles[k] if panel_titles else None)
    head = fig.suptitle(f"{suptitle + ': ' if suptitle else ''}{labels[0]}")
    fig.tight_layout()

    def update(j: int):
        for k, im in enumerate(ims):
            im.set_data(seq[j][k])
        head.set_text(f"{suptitle + ': ' if suptitle else ''}{labels[j]}")
        return ims + [head]

    anim = animation.FuncAnimation(fig, update, frames=len(seq), interval=interval, blit=False)
    plt.close(fig)
    return anim


def player_html(frames: Sequence[Any], titles: Sequence[str] | None = None, **kwargs: Any) -> str:
    """HTML + JavaScript of a :func:`player` with embedded PNG frames (plays without a kernel, from disk)."""
    anim = player(frames, titles, **kwargs)
    with matplotlib.rc_context({"animation.embed_limit": 64.0}):
        return anim.to_jshtml(default_mode="once")


def training_curve(log: str | Path | Iterable[dict], keys: Sequence[str] = ("total",), logy: bool = False) -> Figure:
    """Loss curves from a ``log.csv`` written by :func:`diffreg.train.fit` (or a list of row dicts)."""
    if isinstance(log, (str, Path)):
        with open(log, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = list(log)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 2.6), squeeze=False)
    steps = [float(r["step"]) for r in rows]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [float(r[k]) for r in rows], lw=1.4)
        ax.set_xlabel("step")
        ax.set_title(k)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def boxplot_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> Figure:
    """Box plots (one per column) of a per-case table (list of row dicts, e.g. from
    :func:`diffreg.evaluate.evaluate`); NaN values are dropped."""
    data = []
    for c in columns:
        v = np.array([float(r.get(c, np.nan)) for r in rows], dtype=float)
        data.append(v[np.isfinite(v)])
    fig, ax = plt.subplots(figsize=(0.9 * len(columns) + 1.5, 2.8))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(columns) + 1), columns, rotation=30, ha="right")
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
