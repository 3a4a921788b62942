"""ipywidgets viewers for live kernels, each with a static fallback from :mod:`diffreg.viz`.

Not imported by ``import diffreg`` (it needs ipywidgets and matplotlib). In the rendered static book a widget would
show as an empty box, so every viewer takes ``static=True`` and then returns the equivalent :func:`diffreg.viz.player`
(an ``IPython.display.HTML`` JavaScript player) instead. Chapters call the static form (or ``viz.player`` directly);
a reader running the notebook can call the live one, e.g. ``field_viewer(m, f, u, static=not in_live_kernel())``.

Used by chapters 04 and 06 (``notebooks/04_diffusemorph.md``, ``notebooks/06_diffusereg.md``), whose live cells fall
back to the static players in the rendered book.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["in_live_kernel", "field_viewer", "sequence_viewer"]

VIEWS = ("warped", "difference", "grid", "flow", "jacobian")


#: programs that execute notebooks without a reader: a kernel started by one of them has no frontend to show widgets
HEADLESS_RUNNERS = ("jupyter-book", "jb ", "sphinx-build", "pytest", "nbval", "nbclient", "nbconvert", "papermill")


def _parent_command() -> str:
    """The command line of the process that started this kernel (empty where it cannot be read)."""
    import os

    try:
        import psutil  # a dependency of ipykernel

        parent = psutil.Process(os.getppid())
        return " ".join([*parent.cmdline(), *(parent.parent().cmdline() if parent.parent() else [])])
    except Exception:  # noqa: BLE001 - no psutil, no permission, a process that ended: assume a reader
        return ""


def in_live_kernel() -> bool:
    """True inside a Jupyter (ipykernel) kernel that a reader drives, where a frontend can display widgets.

    False in plain Python, a terminal IPython and pytest, and also in a kernel executed headless: under nbval and
    ``jupyter-book build`` (the environment variable ``DIFFREG_STATIC=1``, which the book's test collection sets,
    or a parent process whose command line names one of :data:`HEADLESS_RUNNERS`). Chapters show a live widget
    only when this is true and the static player of the same views otherwise, so the rendered book never carries
    an empty widget box. ``DIFFREG_STATIC=0`` forces a live kernel.
    """
    import os

    flag = os.environ.get("DIFFREG_STATIC")
    if flag in ("0", "1"):
        return flag == "0"
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of the book
        return False
    ip = get_ipython()
    if ip is None:
        return False
    if not (type(ip).__name__ == "ZMQInteractiveShell" and getattr(ip, "kernel", None) is not None):
        return False
    parent = _parent_command().lower()
    return not any(runner in parent for runner in HEADLESS_RUNNERS)


def _as_batched(moving: Any, ddf: Any):
    """``(1, C, *spatial)`` float image and ``(1, ndim, *spatial)`` float field tensors (first batch item)."""
    import torch

    from diffreg import viz

    u = torch.as_tensor(viz._field_nd(ddf)).float()[None]
    m = moving if isinstance(moving, torch.Tensor) else torch.as_tensor(np.asarray(moving))
    m = m.detach().cpu()
    while m.dim() < u.dim():
        m = m[None]
    if m.dim() != u.dim() or m.shape[2:] != u.shape[2:]:
        raise ValueError(f"image {tuple(m.shape)} and ddf {tuple(u.shape)} do not match.")
    return m[:1], u


def _scaled_warp(moving: Any, ddf: Any, eta: float, mode: str = "bilinear"):
    """``(warp(moving, eta * ddf), eta * ddf)`` as ``(1, C, *spatial)`` / ``(1, ndim, *spatial)`` tensors."""
    from diffreg.spatial import warp

    m, u = _as_batched(moving, ddf)
    m = m.long() if mode == "nearest" else m.float()
    return warp(m, eta * u, mode=mode), eta * u


def field_viewer(moving: Any, fixed: Any, ddf: Any, label_set: str | None = None, moving_label: Any = None,
                 fixed_label: Any = None, static: bool = False, etas: Sequence[float] | None = None, axis: int = 0,
                 step: int = 4):
    """Explore a registration with the displacement scaled by ``eta`` in [0, 1] (0 = identity, 1 = full field).

    Live: a dropdown chooses the view (warped image, ``|fixed - warped|``, deformation grid, displacement colour,
    Jacobian determinant), a slider sets ``eta`` and, for 3D inputs, a slider picks the slice along ``axis``. The
    moving image is warped with :func:`diffreg.spatial.warp` (``warped(p) = moving(p + eta * ddf(p))``).

    Args:
        moving, fixed: images ``(B, C, *spatial)`` (also ``(*spatial)``; the first item is used).
        ddf: displacement ``(B, ndim, *spatial)`` or ``(ndim, *spatial)`` in voxels.
        label_set: ``"acdc"`` or ``"camus"``; with ``moving_label`` (warped with nearest interpolation) the warped
            view shows its contours, and ``fixed_label`` dashed.
        static: return the static player instead: ``eta`` swept over ``etas`` (default 0, 0.1, ..., 1), panels
            warped | ``|fixed - warped|`` | grid | displacement colour (3D: the middle slice along ``axis``).
        etas: the ``eta`` values of the static player.
        step: grid spacing in voxels.

    Returns:
        an ``ipywidgets.VBox`` or, with ``static=True``, an ``IPython.display.HTML`` player.
    """
    from functools import partial

    from diffreg import viz

    m, u_full = _as_batched(moving, ddf)
    ndim = u_full.shape[1]
    labels_on = label_set is not None and moving_label is not None
    f2 = lambda idx: viz.image2d(fixed, axis, idx)  # noqa: E731

    if static:
        etas = list(np.linspace(0.0, 1.0, 11)) if etas is None else list(etas)
        top = float(np.hypot(*viz.field2d(u_full, axis)).max()) or 1.0
        frames, overlays = [], []
        for eta in etas:
            w, u = _scaled_warp(m, u_full, float(eta))
            w2 = viz.image2d(w, axis)
            frames.append([w2, np.abs(f2(None) - w2), partial(viz.plot_grid, ddf=u, step=step, axis=axis),
                           viz.flow_rgb(u, max_magnitude=top, axis=axis)])
            if labels_on:
                wl = _scaled_warp(moving_label, u_full, float(eta), mode="nearest")[0]
                overlays.append([viz.image2d(wl, axis)])
        return viz.player(frames, titles=[f"eta = {e:.2f}" for e in etas], overlays=overlays or None,
                          label_set=label_set or "acdc", suptitle="displacement scaled by eta",
                          panel_titles=["warped", "|fixed - warped|", "grid", "displacement"], mode="reflect")

    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    depth = u_full.shape[2 + axis] if ndim == 3 else 1
    eta_w = W.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="eta", continuous_update=False)
    view_w = W.Dropdown(options=list(VIEWS), value="warped", description="show")
    slice_w = W.IntSlider(value=depth // 2, min=0, max=max(depth - 1, 0), description="slice",
                          disabled=depth == 1, continuous_update=False)
    out = W.Output()

    def draw(*_):
        idx = slice_w.value if depth > 1 else None
        kw = dict(axis=axis, slice_index=idx)
        w, u = _scaled_warp(m, u_full, eta_w.value)
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        view = view_w.value
        if view == "warped":
            viz._clean(ax).imshow(viz.image2d(w, **kw), cmap="gray")
            if labels_on:
                wl = _scaled_warp(moving_label, u_full, eta_w.value, mode="nearest")[0]
                viz.overlay_labels(ax, None, wl, label_set, show_image=False, **kw)
                if fixed_label is not None:
                    viz.overlay_labels(ax, None, fixed_label, label_set, show_image=False, legend=False,
                                       linestyle="--", linewidth=0.8, **kw)
        elif view == "difference":
            viz._clean(ax).imshow(np.abs(f2(idx) - viz.image2d(w, **kw)), cmap="magma")
        elif view == "grid":
            viz.plot_grid(ax, u, step=step, **kw)
        elif view == "flow":
            viz.plot_flow(ax, u, **kw)
        else:
            viz.plot_jacobian(ax, u, **kw)
        ax.set_title(f"{view}, eta = {eta_w.value:.2f}")
        out.clear_output(wait=True)
        with out:
            display(fig)
        plt.close(fig)

    for wdg in (eta_w, view_w, slice_w):
        wdg.observe(draw, names="value")
    draw()
    controls = [eta_w, view_w] + ([slice_w] if depth > 1 else [])
    return W.VBox([W.HBox(controls), out])


def sequence_viewer(frames: Sequence[Any], titles: Sequence[str] | None = None, static: bool = False,
                    cmap: str = "gray", **player_kwargs: Any):
    """A slider over a sequence of frames (each one panel or a list of panels, as :func:`diffreg.viz.player`).

    Args:
        frames: list or array ``(T, H, W)``; panels may be images, RGB arrays or callables ``f(ax)``.
        titles: one label per frame.
        static: return :func:`diffreg.viz.player` (with ``player_kwargs``) instead of a widget.

    Returns:
        an ``ipywidgets.VBox`` or, with ``static=True``, an ``IPython.display.HTML`` player.
    """
    from diffreg import viz

    if static:
        return viz.player(frames, titles=titles, cmap=cmap, **player_kwargs)
    if len(frames) == 0:
        raise ValueError("sequence_viewer needs at least one frame.")

    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    k_w = W.IntSlider(value=0, min=0, max=len(frames) - 1, description="frame")
    out = W.Output()

    def draw(*_):
        panels = viz._panels(frames[k_w.value])
        fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.0), squeeze=False)
        for ax, p in zip(axes[0], panels):
            if callable(p) and not isinstance(p, np.ndarray):
                p(ax)
            else:
                ax.imshow(p, cmap=cmap)
            viz._clean(ax)
        fig.suptitle(titles[k_w.value] if titles else f"frame {k_w.value + 1}/{len(frames)}")
        out.clear_output(wait=True)
        with out:
            display(fig)
        plt.close(fig)

    k_w.observe(draw, names="value")
    draw()
    return W.VBox([k_w, out])


def jacobian_viewer(ddfs: Sequence[Any], titles: Sequence[str] | None = None, static: bool = False,
                    axis: int = 0, **player_kwargs: Any):
    """The Jacobian maps of a sequence of fields (pairs, sampler steps, scales) with a slider over them.

    Each frame shows three panels of one field: ``det J`` (:func:`diffreg.viz.plot_jacobian`, folds marked), the
    folding mask (``det J <= 0``, white) and the displacement magnitude in voxels (one colour scale for all frames).

    Explained in chapters 01 and 06.

    Args:
        ddfs: fields ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` in voxels, tensors or arrays.
        titles: one label per field.
        static: return the static player (:func:`diffreg.viz.player`) of the same frames instead of a widget.
        axis: for 3D fields, the axis of the middle slice shown.
        **player_kwargs: passed to the static player.

    Returns:
        an ``ipywidgets.VBox`` or, with ``static=True``, an ``IPython.display.HTML`` player.

    Raises:
        ValueError: no fields.
    """
    from functools import partial

    import torch

    from diffreg import metrics, viz

    if len(ddfs) == 0:
        raise ValueError("jacobian_viewer needs at least one field.")
    fields = [torch.as_tensor(viz._field_nd(u)).float()[None] for u in ddfs]
    dets = [metrics.jacobian_determinant(u)[0] for u in fields]
    mags = [viz.image2d(u[0].norm(dim=0), axis) for u in fields]
    top = max(float(m.max()) for m in mags) or 1.0
    frames = []
    for u, det, mag in zip(fields, dets, mags):
        frames.append([partial(viz.plot_jacobian, ddf_or_det=u, colorbar=False),
                       viz.image2d((det <= 0).float(), axis), np.clip(mag / top, 0.0, 1.0)])
    kwargs = {"panel_titles": ["det J", "folding (det J <= 0)", f"|u| (0 - {top:.1f} voxels)"], **player_kwargs}
    if static:
        return viz.player(frames, titles=titles, **kwargs)
    return sequence_viewer(frames, titles=titles)
