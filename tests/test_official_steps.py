"""The helpers of ``benchmarks/speed_vs_official.py`` that run an official training step from the text of its script
(the loop body of a script that trains when imported), checked on a small script written here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''
import torch

def ema_update(teacher, student, momentum=0.99):
    for t_p, s_p in zip(teacher, student):
        t_p.mul_(momentum).add_(s_p, alpha=1 - momentum)

def train():
    for i, data in enumerate(train_loader):
        if i >= 3:
            break
        x = data.cuda().float()
        y = (x * weight).sum()
        log.append(float(y))
        ema_update(teacher, [weight], 0.5)
        print("never run")
'''


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_vs_official", ROOT / "benchmarks" / "speed_vs_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_loop_body_runs_from_its_first_statement_to_its_last_without_cuda(speed, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    body = speed.official_loop_body(script, "train_loader", "ema_update(teacher, [weight], 0.5)",
                                    first="x = data")
    ema = speed.official_function(script, "ema_update", {"torch": torch})
    teacher, log = [torch.zeros(2)], []
    names = {"weight": torch.tensor([1.0, 2.0]), "teacher": teacher, "log": log, "ema_update": ema}
    exec(body, {**names, "data": torch.tensor([3.0, 4.0])})   # a CPU tensor: .cuda() was removed
    assert log == [11.0]
    torch.testing.assert_close(teacher[0], torch.tensor([0.5, 1.0]))   # the official EMA, momentum 0.5


def test_a_missing_last_statement_is_an_error(speed, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with pytest.raises(ValueError, match="no statement"):
        speed.official_loop_body(script, "train_loader", "optimizer.step()")
