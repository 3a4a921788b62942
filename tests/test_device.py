"""One device rule (the GPU when CUDA is available, else the CPU; ``--device cpu`` forces the CPU) and float32 by
default (mixed precision only with ``--amp`` / ``TrainConfig.amp``)."""

from __future__ import annotations

import pytest
import torch

import diffreg.device
import diffreg.train
from diffreg.cli import main
from diffreg.config import get_config, methods


@pytest.fixture
def cuda_available(monkeypatch, real_default_device):
    """A machine that reports a GPU (CUDA availability mocked; nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_default_device_is_the_gpu_when_cuda_is_available(cuda_available, monkeypatch):
    assert diffreg.train.default_device() == torch.device("cuda")
    # under torchrun: the local rank's GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert diffreg.train.default_device() == torch.device("cuda", 1)


def test_default_device_is_the_cpu_without_cuda(real_default_device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert diffreg.train.default_device() == torch.device("cpu")


class _Called(Exception):
    """Raised by the stand-ins below to stop a command once the device it chose is known."""


def _capture(monkeypatch, module, name):
    """Replace ``module.name`` by a function that records its ``device`` keyword and stops the command."""
    seen = {}

    def stand_in(*args, **kwargs):
        seen.clear()
        seen.update(kwargs, args=args)
        raise _Called

    monkeypatch.setattr(module, name, stand_in)
    return seen


def test_every_command_uses_the_gpu_without_device_and_the_cpu_with_device_cpu(cuda_available, monkeypatch,
                                                                               tmp_path):
    import diffreg.bench
    import diffreg.speed

    commands = {
        "train": (diffreg.train, "fit", ["train", "--method", "voxelmorph", "--out", str(tmp_path / "r"),
                                         "--steps", "1", "--size", "32", "32"]),
        "evaluate": (diffreg.train, "load_run", ["evaluate", "--run", str(tmp_path / "r")]),
        "synthesize": (diffreg.train, "load_run", ["synthesize", "--run", str(tmp_path / "r"), "--data",
                                                   f"acdc:{tmp_path}", "--out", str(tmp_path.parent / "syn-out")]),
        "speed": (diffreg.speed, "measure_speed", ["speed", "--method", "voxelmorph"]),
        "bench": (diffreg.bench, "run_bench", ["bench", "--runs", str(tmp_path / "runs"), "--out",
                                               str(tmp_path / "b")]),
    }
    for name, (module, fn, argv) in commands.items():
        for extra, expected in (([], "cuda"), (["--device", "cpu"], "cpu")):
            seen = _capture(monkeypatch, module, fn)
            with pytest.raises(_Called):
                main(argv + extra)
            device = seen.get("device")
            if name == "speed":  # measure_speed resolves the default itself (tested below)
                assert device == (None if not extra else "cpu"), name
            else:
                assert torch.device(device).type == expected, (name, extra, device)


def test_library_functions_use_the_default_device(monkeypatch):
    """``fit``, ``evaluate``, ``run_bench`` and ``measure_speed`` ask :func:`default_device` when given none."""
    from diffreg.evaluate import evaluate
    from diffreg.models import VoxelMorph
    from diffreg.speed import measure_speed
    from tests.helpers import ShiftedBlobs

    calls = []

    def recorded():
        calls.append(1)
        return torch.device("cpu")

    monkeypatch.setattr(diffreg.device, "default_device", recorded)   # the rule (diffreg.device)
    cfg = get_config("voxelmorph", "quick", 2)
    cfg.train.steps = 1
    model = VoxelMorph(dims=2)
    diffreg.train.fit(model, ShiftedBlobs(2), cfg, progress=False)
    assert len(calls) == 1
    evaluate(model, ShiftedBlobs(1))
    assert len(calls) == 2
    measure_speed("voxelmorph", "quick", steps=1, size=(32, 32), inference=False)
    assert len(calls) == 3
    # an explicit device is used as given
    diffreg.train.fit(model, ShiftedBlobs(2), cfg, device="cpu", progress=False)
    assert len(calls) == 3


def test_runs_say_which_device_and_precision_they_use(tmp_path, capsys):
    assert main(["train", "--method", "voxelmorph", "--out", str(tmp_path / "r"), "--steps", "1", "--size", "32",
                 "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and "float32" in out


def test_paper_profiles_train_in_float32_and_amp_is_opt_in(monkeypatch, tmp_path):
    for m in methods():
        assert get_config(m, "paper").train.amp is False, m
        assert get_config(m, "quick").train.amp is False, m
    seen = _capture(monkeypatch, diffreg.train, "fit")
    for extra, amp in (([], False), (["--amp"], True)):
        with pytest.raises(_Called):
            main(["train", "--method", "voxelmorph", "--profile", "paper", "--out", str(tmp_path / "r"),
                  "--size", "32", "32", "--dims", "2", "--device", "cpu"] + extra)
        assert seen["args"][2].train.amp is amp
