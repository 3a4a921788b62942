"""Tests of diffreg.widgets: the viewers build without a frontend and their static forms are players."""

import re

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffreg import widgets  # noqa: E402


def _n_frames(html: str) -> int:
    return len(re.findall(r"frames\[\d+\] = ", html))


def test_field_viewer_2d_live_and_static():
    m = torch.rand(1, 1, 16, 16)
    u = torch.randn(1, 2, 16, 16) * 0.5
    lab = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    lab[0, 0, 4:12, 4:12] = 3
    w = widgets.field_viewer(m, m, u, label_set="acdc", moving_label=lab, fixed_label=lab)
    controls, out = w.children
    assert len(controls.children) == 2                        # eta and view; no slice slider in 2D
    for view in widgets.VIEWS:                                # every view draws
        controls.children[1].value = view
    controls.children[0].value = 0.5
    html = widgets.field_viewer(m, m, u, static=True, etas=[0.0, 0.5, 1.0], label_set="acdc", moving_label=lab)
    assert "data:image/png;base64" in html.data and _n_frames(html.data) == 3
    assert _n_frames(widgets.field_viewer(m[0, 0].numpy(), m, u[0].numpy(), static=True).data) == 11
    plt.close("all")


def test_field_viewer_3d_has_a_slice_slider():
    m = torch.rand(1, 1, 6, 8, 8)
    u = torch.randn(1, 3, 6, 8, 8) * 0.3
    controls, _ = widgets.field_viewer(m, m, u).children
    assert len(controls.children) == 3 and controls.children[2].max == 5
    controls.children[2].value = 1
    assert _n_frames(widgets.field_viewer(m, m, u, static=True, etas=[0, 1]).data) == 2


def test_sequence_viewer_and_kernel_detection():
    frames = [np.random.rand(8, 8) for _ in range(4)]
    w = widgets.sequence_viewer(frames)
    assert w.children[0].max == 3
    w.children[0].value = 2
    assert widgets.sequence_viewer([[f, f] for f in frames]).children
    assert "<script" in widgets.sequence_viewer(frames, static=True).data
    assert widgets.in_live_kernel() is False
    plt.close("all")


def test_live_kernel_is_false_when_executed_headless(monkeypatch):
    """A kernel run by nbval / jupyter-book (DIFFREG_STATIC=1, or a headless parent process) is not live; a kernel
    started by a Jupyter frontend is."""
    import IPython

    class ZMQInteractiveShell:  # the name ipykernel's shell has
        kernel = object()

    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    monkeypatch.delenv("DIFFREG_STATIC", raising=False)
    monkeypatch.setattr(widgets, "_parent_command", lambda: "/usr/bin/python3 /venv/bin/jupyter-lab --no-browser")
    assert widgets.in_live_kernel() is True
    for runner in ("/venv/bin/python /venv/bin/jupyter-book build .", "python -m pytest notebooks/04.md"):
        monkeypatch.setattr(widgets, "_parent_command", lambda runner=runner: runner)
        assert widgets.in_live_kernel() is False
    monkeypatch.setenv("DIFFREG_STATIC", "1")
    monkeypatch.setattr(widgets, "_parent_command", lambda: "jupyter-lab")
    assert widgets.in_live_kernel() is False
    monkeypatch.setenv("DIFFREG_STATIC", "0")
    assert widgets.in_live_kernel() is True


def test_jacobian_viewer_live_and_static():
    import torch

    from diffreg.spatial import random_smooth_field

    fields = [random_smooth_field(1, (16, 16), grids=(4,), scale=s, generator=torch.Generator().manual_seed(0))[0]
              for s in (0.5, 3.0)]
    live = widgets.jacobian_viewer(fields, titles=["small", "large"])
    assert live.children[0].max == 1
    live.children[0].value = 1
    html = widgets.jacobian_viewer(fields, titles=["small", "large"], static=True).data
    assert _n_frames(html) == 2
    with pytest.raises(ValueError):
        widgets.jacobian_viewer([])
    plt.close("all")
