"""Tests of diffreg.viz: figures on 2D/3D torch/numpy inputs, flow colours, fold marking, players."""

import functools
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffreg import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _n_frames(html: str) -> int:
    return len(re.findall(r"frames\[\d+\] = ", html))


def _panel_axes(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def _case(ndim, numpy=False, size=12):
    g = torch.Generator().manual_seed(0)
    spatial = (size,) * ndim
    img = torch.rand(1, 1, *spatial, generator=g)
    lab = torch.zeros(1, 1, *spatial, dtype=torch.long)
    lab[(0, 0) + (slice(2, 6),) * ndim] = 1
    lab[(0, 0) + (slice(6, 10),) * ndim] = 3
    ddf = torch.randn(1, ndim, *spatial, generator=g) * 0.5
    if numpy:
        img, lab, ddf = img.numpy(), lab.numpy(), ddf.numpy()
    return img, lab, ddf


CASES = [(2, False), (2, True), (3, False), (3, True)]


@pytest.mark.parametrize("ndim,numpy", CASES)
def test_panels_and_composites(ndim, numpy):
    img, lab, ddf = _case(ndim, numpy)
    assert len(viz.show_pair(img, img, warped=img).axes) == 5
    assert len(viz.show_pair(img[0, 0], img).axes) == 3          # (*spatial) and (B, C, *spatial) mixed
    assert len(viz.show_pair(img, img, diff=False).axes) == 2
    fig = viz.registration_figure(img, img, img, ddf, moving_label=lab, fixed_label=lab)
    assert len(_panel_axes(fig)) == 6 and len(fig.axes) == 7   # + the Jacobian colour bar
    assert len(_panel_axes(viz.registration_figure(img, img, img, ddf[0]))) == 6
    ax = viz.overlay_labels(None, img, lab, label_set="camus")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == (["LV", "LA"] if ndim == 2 else ["LA"])    # 3D: the structures of the middle slice only
    grid = viz.plot_grid(None, ddf, step=4)
    assert len(grid.lines) == 2 * 4                            # rows 0, 4, 8, 11 and columns alike
    assert viz.plot_flow(None, ddf, wheel=True).images
    assert viz.plot_quiver(None, ddf, step=3, background=img).collections
    assert viz.plot_jacobian(None, ddf).images
    fig = viz.small_multiples([img, img[0], viz.flow_rgb(ddf)], titles=["a", "b", "c"], ncols=2)
    assert len(fig.axes) == 4 and not fig.axes[3].axison
    assert viz.flow_rgb(ddf).shape == (12, 12, 3)


def test_slices_of_3d_inputs():
    vol = np.zeros((5, 6, 7))
    vol[4] = 1.0
    assert viz.image2d(vol).shape == (6, 7)
    assert viz.image2d(vol, slice_index=4).max() == 1.0
    assert viz.image2d(vol[None, None], axis=2, slice_index=0).shape == (5, 6)
    u = np.zeros((3, 5, 6, 7))
    u[0] = 9.0                                                 # out-of-plane component for axis 0: dropped
    u[2] = 1.0
    u2 = viz.field2d(u)
    assert u2.shape == (2, 6, 7) and u2[0].max() == 0 and u2[1].min() == 1
    assert viz.field2d(u, axis=2).shape == (2, 5, 6)
    with pytest.raises(ValueError):
        viz.image2d(np.zeros(5))
    with pytest.raises(ValueError):
        viz.field2d(np.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError):
        viz.overlay_labels(None, vol, vol, label_set="brats")


def test_flow_rgb_zero_is_black_and_direction_is_hue():
    assert viz.flow_rgb(torch.zeros(1, 2, 8, 8)).max() == 0
    assert viz.flow_rgb(np.zeros((3, 4, 8, 8))).shape == (8, 8, 3)
    u = torch.zeros(2, 8, 8)
    u[1] = 1.0                                                 # uniform shift along columns: one colour
    rgb = viz.flow_rgb(u)
    assert np.allclose(rgb, rgb[0, 0]) and rgb.max() == pytest.approx(1.0)
    assert viz.flow_rgb(u, max_magnitude=4.0).max() == pytest.approx(0.25)
    assert not np.allclose(viz.flow_rgb(-u)[0, 0], rgb[0, 0])  # opposite direction, another hue


def _fold_field(n=10):
    """u_row = -2 (y - 3) for y >= 3: central differences give det = 0 at row 3, -1 below -> 7 folded rows."""
    u = torch.zeros(1, 2, n, n)
    u[0, 0] = -2.0 * (torch.arange(n, dtype=torch.float32) - 3).clamp(min=0)[:, None]
    return u


def test_plot_jacobian_marks_folds_and_reports_percent():
    ax = viz.plot_jacobian(None, _fold_field())
    assert "folds 70.00 %" in ax.get_title()
    assert len(ax.images) == 2                                 # det map + fold overlay
    fold = ax.images[-1].get_array()
    assert int((~np.ma.getmaskarray(fold)).sum()) == 70
    assert not np.ma.getmaskarray(fold)[3:].any() and np.ma.getmaskarray(fold)[:3].all()
    ax = viz.plot_jacobian(None, torch.zeros(1, 2, 10, 10))
    assert "folds 0.00 %" in ax.get_title() and len(ax.images) == 1
    det = viz.jacobian_map(_fold_field())
    assert viz.plot_jacobian(None, det, colorbar=False).get_title() == "det J (folds 70.00 %)"
    # 3D: the title reports the whole volume, the overlay the slice
    u3 = torch.zeros(1, 3, 4, 10, 10)
    u3[0, 1] = _fold_field()[0, 0]
    ax = viz.plot_jacobian(None, u3, slice_index=1)
    assert "folds 70.00 %" in ax.get_title()
    assert int((~np.ma.getmaskarray(ax.images[-1].get_array())).sum()) == 70


def test_player_embeds_frames_and_subsamples():
    frames = np.random.default_rng(0).random((40, 16, 16))
    html = viz.player_html(frames, titles=[str(i) for i in range(40)], max_frames=10)
    assert _n_frames(html) == 10
    assert "<script" in html and "data:image/png;base64" in html
    assert viz._subsample(40, 10)[0] == 0 and viz._subsample(40, 10)[-1] == 39
    out = viz.player(list(frames[:3]))
    assert _n_frames(out.data) == 3 and plt.get_fignums() == []   # figure closed: no static duplicate
    u = torch.randn(1, 2, 16, 16)
    panels = [[f, viz.flow_rgb(u), functools.partial(viz.plot_grid, ddf=u)] for f in frames[:4]]
    html = viz.player_html(panels, panel_titles=["image", "flow", "grid"], overlays=[np.eye(16, dtype=int)] * 4)
    assert _n_frames(html) == 4
    with pytest.raises(ValueError):
        viz.player_html([frames[0], [frames[0], frames[1]]])
    with pytest.raises(ValueError):
        viz.player_html(list(frames[:3]), titles=["a"])


def test_player_of_25_noise_frames_64x64_is_small():
    frames = np.random.default_rng(0).random((30, 64, 64))   # noise: the worst case for PNG compression
    html = viz.player_html(frames, suptitle="sequence")
    assert _n_frames(html) == 25
    assert len(html) < 1_500_000


def test_training_curve_and_boxplot(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,total,val\n10,1.0,\n20,0.5,0.7\n")
    fig = viz.training_curve(log, keys=("total", "val"))
    assert fig.axes[0].lines[0].get_ydata().tolist() == [1.0, 0.5]
    assert fig.axes[1].lines[0].get_xdata().tolist() == [20.0]
    assert len(viz.training_curve([{"step": 1, "total": 2.0, "sim": 1.0}], keys=None).axes) == 2
    with pytest.raises(ValueError):
        viz.training_curve(log, keys=("nope",))
    rows = [{"dice": 0.5, "hd": torch.tensor(3.0)}, {"dice": 0.7, "hd": 2.0}, {"dice": float("nan"), "hd": 1.0}]
    fig = viz.boxplot_table(rows, ["dice", "hd"])
    assert len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["dice\n(n=2)", "hd\n(n=3)"]


def test_style_and_label_colours():
    with matplotlib.rc_context():
        viz.set_style()
        assert matplotlib.rcParams["figure.dpi"] == 90 and not matplotlib.rcParams["axes.grid"]
    assert viz.label_colors("acdc")[3] == viz.label_colors("camus")[1] == viz.COLORS["LV"]
    assert viz.label_cmap("camus").N == 4


def test_player_needs_no_network():
    """The player's HTML embeds its frames and links nothing external (it must work from disk, offline)."""
    html = viz.player_html([np.zeros((8, 8)), np.ones((8, 8))])
    assert "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
