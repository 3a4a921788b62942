"""Stages trained before the main loop (DiffuseReg's teacher, LDM-Morph's stage 1, FlowReg's warmup) are runs of the
trainer: killed in the middle of a stage, a run resumes there and ends exactly where the uninterrupted run ends (on
the CPU)."""

from __future__ import annotations

import csv

import pytest
import torch

from diffreg.config import MethodConfig, TrainConfig, get_config
from diffreg.models import DiffuseReg, FlowReg, LDMMorph
from diffreg.models.flowreg import _Warmup
from diffreg.models.ldm_morph import _LatentStage
from diffreg.models.voxelmorph import VoxelMorph
from diffreg.train import fit, load_checkpoint, set_stage_steps, stage_budgets
from tests.helpers import ShiftedBlobs
from tests.models.test_diffusereg import SMALL as DIFFUSEREG_SMALL
from tests.models.test_ldm_morph import TINY as LDM_TINY


class _Killed(Exception):
    """Stands for the process being killed."""


def _kill_at(monkeypatch, cls, call: int) -> None:
    """Make ``cls.loss`` raise :class:`_Killed` on its ``call``-th call."""
    original, count = cls.loss, {"n": 0}

    def loss(self, batch, *args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise _Killed
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(cls, "loss", loss)


def _run(make, data, cfg, out):
    torch.manual_seed(0)
    model = make()
    fit(model, data, cfg, out=out, device="cpu", progress=False)
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("method", ["diffusereg", "ldm-morph", "flowreg"])
def test_a_stage_killed_midway_resumes_like_the_main_loop(method, tmp_path, monkeypatch):
    if method == "diffusereg":
        settings = {**DIFFUSEREG_SMALL, "teacher_steps": 8}
        make, stage, killed, size = (lambda: DiffuseReg(dims=2, **settings)), "teacher", VoxelMorph, (32, 64)
    elif method == "flowreg":   # the warmup pre-trains the network the main loop goes on training
        settings = {**get_config("flowreg", "quick").model, "warmup_steps": 8, "warmup_batch": 1}
        make, stage, killed, size = (lambda: FlowReg(dims=2, **settings)), "warmup", _Warmup, (32, 32)
    else:
        settings = {**LDM_TINY, "ae_steps": 4, "ldm_steps": 8}
        make, stage, killed, size = (lambda: LDMMorph(dims=2, **settings)), "latent_unet", _LatentStage, (32, 32)
    data = ShiftedBlobs(n=4, size=size)
    cfg = MethodConfig(method, "quick", model=dict(settings), train=TrainConfig(steps=2, log_every=1))
    straight = _run(make, data, cfg, tmp_path / "straight")

    _kill_at(monkeypatch, killed, 6)   # in the stage's 6th step: after its checkpoint at step 4
    with pytest.raises(_Killed):
        _run(make, data, cfg, tmp_path / "killed")
    assert load_checkpoint(tmp_path / "killed" / stage / "checkpoint.pt")["step"] == 4
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()   # the main loop had not started
    monkeypatch.undo()
    resumed = _run(make, data, cfg, tmp_path / "killed")

    _same_weights(straight, resumed)
    def log(run):
        with open(tmp_path / run / stage / "log.csv", newline="") as fh:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]

    assert log("straight") == log("killed") and log("straight")[-1]["step"] == "8"


def test_stage_budgets_are_asked_of_the_model():
    assert [b.steps_key for b in stage_budgets(MethodConfig("diffusereg", "quick"))] == ["teacher_steps"]
    cfg = MethodConfig("ldm-morph", "quick", model={"ae_steps": 10, "ldm_steps": 10, "ae_batch": 4})
    assert set_stage_steps(cfg, 3) == ["ae_steps", "ldm_steps"] and cfg.model["ae_steps"] == 3
    assert stage_budgets(MethodConfig("voxelmorph", "quick")) == () and set_stage_steps(MethodConfig("voxelmorph", "quick"), 3) == []
