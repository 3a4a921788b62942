import matplotlib

matplotlib.use("Agg")

import torch

from diffreg import widgets


def test_widgets_build_without_a_frontend_and_have_static_players():
    m = torch.rand(1, 1, 16, 16)
    u = torch.randn(1, 2, 16, 16) * 0.5
    w = widgets.field_viewer(m, m, u)
    assert w.children  # a VBox with controls and an output
    html = widgets.field_viewer(m, m, u, static=True, etas=[0.0, 0.5, 1.0])
    assert "data:image/png;base64" in html.data
    assert widgets.sequence_viewer([m[0, 0], m[0, 0]]).children
    assert "<script" in widgets.sequence_viewer([m[0, 0]] * 2, static=True).data
    assert widgets.in_live_kernel() is False
