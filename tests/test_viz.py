import re

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from diffreg import viz


def _field(ndim=2, size=16, scale=1.0):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, ndim, *([size] * ndim), generator=g) * scale


@pytest.mark.parametrize("ndim", [2, 3])
def test_figures_2d_and_3d(ndim):
    size = (16,) * ndim
    img = torch.rand(1, 1, *size)
    lab = torch.zeros(1, 1, *size, dtype=torch.long)
    lab[(0, 0) + (slice(4, 12),) * ndim] = 3
    ddf = _field(ndim, 16, 0.5)
    assert len(viz.show_pair(img, img.numpy(), warped=img).axes) == 5
    fig = viz.registration_figure(img, img, img, ddf, moving_label=lab, fixed_label=lab)
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 6
    assert viz.plot_grid(None, ddf).lines
    assert viz.flow_rgb(ddf).shape == (16, 16, 3)


def test_flow_rgb_zero_is_black_and_direction_is_hue():
    assert viz.flow_rgb(torch.zeros(1, 2, 8, 8)).max() == 0
    u = torch.zeros(2, 8, 8)
    u[1] = 1.0
    rgb = viz.flow_rgb(u)
    assert np.allclose(rgb, rgb[0, 0]) and rgb.max() == pytest.approx(1.0)


def test_plot_jacobian_marks_folds_and_reports_percent():
    # u_0 = -2 * y on the upper half: det = 1 - 2 = -1 there -> exactly half the rows fold
    u = torch.zeros(1, 2, 10, 10)
    u[0, 0] = -2.0 * torch.arange(10.0)[:, None]
    ax = viz.plot_jacobian(None, u)
    assert "folds 100.00 %" in ax.get_title()
    assert len(ax.images) == 2  # det map + fold overlay
    ax = viz.plot_jacobian(None, torch.zeros(1, 2, 10, 10))
    assert "folds 0.00 %" in ax.get_title() and len(ax.images) == 1


def test_player_embeds_frames_and_subsamples():
    frames = [np.random.rand(16, 16) for _ in range(40)]
    html = viz.player_html(frames, titles=[str(i) for i in range(40)], max_frames=10)
    n = len(re.findall(r"frames\[\d+\] = ", html))
    assert n == 10
    assert "<script" in html and "data:image/png;base64" in html
    two_panels = viz.player_html([[f, f] for f in frames[:3]])
    assert len(re.findall(r"frames\[\d+\] = ", two_panels)) == 3
    assert len(html) < 1_500_000


def test_training_curve_and_boxplot(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,total\n10,1.0\n20,0.5\n")
    assert viz.training_curve(log).axes[0].lines[0].get_ydata().tolist() == [1.0, 0.5]
    fig = viz.boxplot_table([{"dice": 0.5}, {"dice": 0.7}, {"dice": float("nan")}], ["dice"])
    assert len(fig.axes) == 1


def test_overlay_labels_draws_one_contour_per_structure():
    lab = np.zeros((16, 16), int)
    lab[2:6, 2:6], lab[8:12, 8:12] = 1, 3
    ax = viz.overlay_labels(None, np.random.rand(16, 16), lab)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["RV", "LV"]
