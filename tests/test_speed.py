"""``python -m diffreg speed`` and :func:`diffreg.speed.measure_speed` at the quick profile (seconds on a CPU)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from diffreg.cli import main
from diffreg.speed import format_row, measure_speed, table_header, tensor_bytes


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("method", ["voxelmorph", "fsdiffreg"])
def test_measure_speed_quick(method):
    r = measure_speed(method, profile="quick", steps=2, device="cpu", size=(32, 32))
    assert r["method"] == method and r["profile"] == "quick" and r["dims"] == 2 and r["size"] == "32x32"
    assert len(r["train_times"]) == 2 and all(_positive(t) for t in r["train_times"])
    assert _positive(r["train_s_per_step"]) and _positive(r["samples_per_s"])
    assert list(r["inference_s"]) == [""] and _positive(r["inference_s"][""])
    # the weights alone are a lower bound of the training peak (gradients and Adam state come on top)
    assert r["peak_train_bytes"] >= 4 * r["parameters"] and r["peak_infer_bytes"] > 0
    row = format_row(r)
    assert row.startswith(f"| {method} | quick | 2 | 32x32 |") and row.count("|") == table_header().count("|") // 2


def test_sampler_steps_give_one_entry_each():
    r = measure_speed("diffusereg", profile="quick", device="cpu", sampler_steps=[1, 2], repeats=1, train=False)
    assert list(r["inference_s"]) == ["S=1", "S=2"] and all(_positive(t) for t in r["inference_s"].values())
    assert r["prepare"] == "skipped" and "S=1: " in r["inference"]
    assert r["train_s_per_step"] is None and "| - | - | S=1: " in format_row(r)


def test_training_only():
    r = measure_speed("drdm", profile="quick", steps=1, device="cpu", size=(32, 32), batch_size=1, inference=False)
    assert _positive(r["train_s_per_step"]) and r["inference"] is None and r["peak_infer_gb"] is None


def test_cli_prints_a_row_and_appends_csv(tmp_path, capsys):
    out = tmp_path / "speed.csv"
    for _ in range(2):
        assert main(["speed", "--method", "voxelmorph", "--profile", "quick", "--steps", "2", "--device", "cpu",
                     "--size", "32", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method | profile |" in printed and "| voxelmorph | quick | 2 | 32x32 | 1 |" in printed
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and float(rows[0]["train_s_per_step"]) > 0 and rows[0]["method"] == "voxelmorph"


def test_amp_on_cpu_is_rejected(capsys):
    """Mixed precision is CUDA only, as in ``diffreg.train.fit``: a CPU timing with autocast would describe no
    training run, so ``--amp`` on a CPU is an error (exit status 2) with a message saying so."""
    with pytest.raises(ValueError, match="CUDA"):
        measure_speed("voxelmorph", profile="quick", steps=1, amp=True, device="cpu")
    assert main(["speed", "--method", "voxelmorph", "--profile", "quick", "--steps", "1", "--amp",
                 "--device", "cpu"]) == 2
    assert "--amp needs a CUDA device" in capsys.readouterr().err


def test_tensor_bytes_counts_weights_gradients_and_optimizer_state():
    net = torch.nn.Linear(10, 10)  # 110 float32 parameters
    opt = torch.optim.Adam(net.parameters())
    assert tensor_bytes(net) == 440
    net(torch.ones(1, 10)).sum().backward()
    opt.step()
    assert tensor_bytes(net, opt) == 4 * 440 + 2 * 4  # weights, gradients, two moments, two step counters


def test_a_generator_is_timed_by_deform_at_each_level():
    from diffreg.models import DRDM
    from diffreg.speed import _inference_runs

    model = DRDM(widths=(4, 8, 8), time_dim=16).eval()
    runs = _inference_runs(model, "drdm", [0, 2])
    assert [label for label, _ in runs] == ["T'=0", "T'=2"]
    assert [label for label, _ in _inference_runs(model, "drdm", None)] == ["T'=80"]
    image = torch.zeros(1, 1, 32, 32)
    ddf, deformed = runs[0][1](image, image)
    assert ddf.shape == (1, 2, 32, 32) and torch.equal(ddf, torch.zeros_like(ddf))
