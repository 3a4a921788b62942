"""ipywidgets viewers for live kernels, each with a static fallback from :mod:`diffreg.viz`.

Not imported by ``import diffreg``. In the rendered (static) book a widget would show as an empty box, so every
viewer takes ``static=True`` and then returns the equivalent :func:`diffreg.viz.player_html` player instead; chapters
call the static form, and readers running the notebook can call the live one.

Explained in chapter 01 (``notebooks/01_registration.md``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["in_live_kernel", "field_viewer", "sequence_viewer"]


def in_live_kernel() -> bool:
    """True inside a running IPython kernel (a Jupyter frontend may display widgets).

    A heuristic: an ``IPKernelApp`` is configured in the current IPython shell. Chapters executed by nbval or the
    book build also run in a kernel, so the book always calls the static forms explicitly.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _scaled_warp(moving: Any, ddf: Any, eta: float):
    import torch

    from diffreg.spatial import warp

    m = torch.as_tensor(np.asarray(moving) if not hasattr(moving, "dim") else moving).float()
    u = torch.as_tensor(np.asarray(ddf) if not hasattr(ddf, "dim") else ddf).float()
    while m.dim() < u.dim():
        m = m[None]
    return warp(m, eta * u), eta * u


def field_viewer(moving: Any, fixed: Any, ddf: Any, label_set: str | None = None, static: bool = False,
                 etas: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11))):
    """Explore a registration: the displacement scaled by ``eta`` in [0, 1] (0 = identity, 1 = the full field),
    showing the warped image, the grid, the displacement colour or the Jacobian determinant; a slice slider for 3D.

    Args:
        moving, fixed: images ``(B, 1, *spatial)`` (first item shown).
        ddf: displacement ``(B, ndim, *spatial)`` in voxels.
        static: return the static player (warped image, ``|fixed - warped|``, displacement colour over ``etas``)
            instead of a widget.

    Returns:
        an ``ipywidgets.VBox`` or, with ``static=True``, an ``IPython.display.HTML`` player.
    """
    from diffreg import viz

    if static:
        from IPython.display import HTML

        f2 = viz.image2d(fixed)
        frames = []
        for eta in etas:
            w, u = _scaled_warp(moving, ddf, float(eta))
            w2 = viz.image2d(w)
            frames.append([w2, np.abs(w2 - f2), viz.flow_rgb(u, max_magnitude=float(np.abs(viz.to_numpy(ddf)).max()) or 1)])
        return HTML(viz.player_html(frames, titles=[f"eta = {e:.1f}" for e in etas],
                                    panel_titles=["warped", "|fixed - warped|", "displacement"]))

    import ipywidgets as W
    import matplotlib.pyplot as plt

    depth = viz.to_numpy(fixed).shape[-3] if viz.to_numpy(ddf).shape[1] == 3 else 1
    eta = W.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="eta")
    view = W.Dropdown(options=["warped", "grid", "flow", "jacobian"], value="warped", description="show")
    sl = W.IntSlider(value=depth // 2, min=0, max=max(depth - 1, 0), description="slice", disabled=depth == 1)
    out = W.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            w, u = _scaled_warp(moving, ddf, eta.value)
            fig, ax = plt.subplots(figsize=(3.6, 3.6))
            idx = sl.value if depth > 1 else None
            if view.value == "warped":
                ax.imshow(viz.image2d(w, index=idx), cmap="gray")
                ax.set_title(f"warped, eta={eta.value:.2f}")
            elif view.value == "grid":
                viz.plot_grid(ax, u, index=idx)
            elif view.value == "flow":
                viz.plot_flow(ax, u, index=idx)
            else:
                viz.plot_jacobian(ax, u, index=idx)
            plt.show()

    for wdg in (eta, view, sl):
        wdg.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([eta, view, sl]), out])


def sequence_viewer(frames: Sequence[Any], titles: Sequence[str] | None = None, static: bool = False):
    """A slider over a sequence of 2D frames (or panel lists, as :func:`diffreg.viz.player` takes).

    Returns an ``ipywidgets.VBox`` or, with ``static=True``, the :func:`diffreg.viz.player_html` player.
    """
    from diffreg import viz

    if static:
        from IPython.display import HTML

        return HTML(viz.player_html(frames, titles=titles))

    import ipywidgets as W
    import matplotlib.pyplot as plt

    k = W.IntSlider(value=0, min=0, max=len(frames) - 1, description="frame")
    out = W.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            panels = viz._panels(frames[k.value])
            fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), squeeze=False)
            for ax, p in zip(axes[0], panels):
                ax.imshow(p, cmap="gray")
                ax.set_xticks([]), ax.set_yticks([])
            fig.suptitle(titles[k.value] if titles else f"frame {k.value}")
            plt.show()

    k.observe(draw, names="value")
    draw()
    return W.VBox([k, out])
