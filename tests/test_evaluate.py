import math

import pytest
import torch

from diffreg.evaluate import Table, compare, evaluate, read_csv, summarize
from diffreg.models.base import RegistrationModel, RegistrationResult
from diffreg.spatial import warp
from tests.helpers import ShiftedBlobs


class Identity(RegistrationModel):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.dims = 2

    def forward(self, moving, fixed):
        return torch.zeros(moving.shape[0], 2, *moving.shape[2:])


class Oracle(Identity):
    """Knows the integer shift: finds it by brute force on the images."""

    def forward(self, moving, fixed):
        best = None
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                ddf = torch.zeros(1, 2, *moving.shape[2:])
                ddf[:, 0], ddf[:, 1] = dy, dx
                err = float((warp(moving, ddf) - fixed).abs().mean())
                if best is None or err < best[0]:
                    best = (err, ddf)
        return best[1]


def test_evaluate_columns_and_values(tmp_path):
    data = ShiftedBlobs(5)
    ident = evaluate(Identity(), data)
    oracle = evaluate(Oracle(), data)
    assert len(ident) == 5
    for col in ("case", "dice_initial", "dice", "dice_lv", "dice_myo", "folding_percent", "jacobian_std", "sdlogj",
                "hd95", "seconds"):
        assert col in ident.columns(), col
    # the identity changes nothing; the oracle aligns the interior of the blobs
    assert ident.values("dice") == pytest.approx(ident.values("dice_initial"))
    assert oracle.mean("dice") > ident.mean("dice") + 0.05
    assert oracle.mean("folding_percent") == 0.0
    path = oracle.to_csv(tmp_path / "t.csv")
    back = read_csv(path)
    assert back.mean("dice") == pytest.approx(oracle.mean("dice"))
    assert "| case |" in oracle.to_markdown()


def test_compare_wilcoxon_and_summary():
    data = ShiftedBlobs(8)
    tables = {"identity": evaluate(Identity(), data), "oracle": evaluate(Oracle(), data)}
    summary = compare(tables, reference="identity")
    assert [r["method"] for r in summary] == ["identity", "oracle"]
    assert math.isnan(summary[0]["p_dice_vs_identity"])
    assert summary[1]["p_dice_vs_identity"] < 0.05  # 8 cases, all improved: exact p = 2/256
    s = summarize(tables["oracle"])
    assert s["dice"][0] == pytest.approx(tables["oracle"].mean("dice"))
    with pytest.raises(ValueError):
        compare({})
    with pytest.raises(ValueError, match="reference"):
        compare(tables, reference="nope")
    assert isinstance(Table([{"a": 1.0}]).mean("a"), float)


def test_markdown_escapes_pipes_in_cells():
    # "|J|<0" in a header or cell must not split the column (rendered by markdown-it, as MyST does in the book)
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").enable("table").render(Table([{"|J|<0 (%)": 0.5, "note": "a|b"}]).to_markdown())
    assert html.count("<th>") == 2 and html.count("<td>") == 2
    assert "<th>|J|&lt;0 (%)</th>" in html and "<td>a|b</td>" in html


def test_a_deformation_generator_is_refused_with_a_clear_message():
    from diffreg.models import DRDM

    with pytest.raises(ValueError, match="DRDM generates deformations of one image and does not register pairs"):
        evaluate(DRDM(widths=(4, 8, 8), time_dim=16), ShiftedBlobs(1), device="cpu")
