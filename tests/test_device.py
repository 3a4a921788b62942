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


# -- the 3D convolution fast path on the CPU (diffreg.device.cpu_conv3d_fast_path) --------------------------------

def _conv_ops(fn) -> set[str]:
    """The convolution operators ``fn`` calls; ATen's native ones as ``"name kernel"`` with the weight's kernel size."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return {e.key + (f" {tuple(e.input_shapes[1][2:])}" if "slow" in e.key else "")
            for e in prof.key_averages(group_by_input_shape=True) if "conv" in e.key}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("method", ["voxelmorph", "corrmlp"])
def test_the_3d_fast_path_gives_the_native_result_through_onednn(method, monkeypatch):
    """A quick 3D model at batch 1: the fast path runs oneDNN instead of ATen's slow_conv3d, and the displacement and
    the gradients of the training loss equal the native kernel's up to float rounding (same weights, same pair)."""
    from diffreg.device import FAST_PATH_VARIABLE, cpu_conv3d_fast_path
    from diffreg.models import build

    monkeypatch.setenv(FAST_PATH_VARIABLE, "0")
    torch.manual_seed(0)
    native = build(method, "quick", dims=3)
    fast = build(method, "quick", dims=3)
    fast.load_state_dict(native.state_dict())
    monkeypatch.delenv(FAST_PATH_VARIABLE)
    assert cpu_conv3d_fast_path(fast) is fast and cpu_conv3d_fast_path(fast) is fast   # idempotent
    g = torch.Generator().manual_seed(1)
    batch = {"moving": torch.rand(1, 1, 16, 64, 64, generator=g), "fixed": torch.rand(1, 1, 16, 64, 64, generator=g)}

    def step(model):
        model.zero_grad()
        with torch.no_grad():
            ddf = model.register(batch["moving"], batch["fixed"]).ddf
        model.loss(batch)["total"].backward()
        return ddf, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    native_ops = _conv_ops(lambda: step(native))
    fast_ops = _conv_ops(lambda: step(fast))
    native_slow = {op for op in native_ops if op.startswith("aten::slow_conv")}
    fast_slow = {op for op in fast_ops if op.startswith("aten::slow_conv")}
    assert any(not op.endswith("(1, 1, 1)") for op in native_slow)   # layers below ATen's oneDNN threshold...
    assert all(op.endswith("(1, 1, 1)") for op in fast_slow)         # ...run oneDNN, 1 x 1 x 1 kernels excepted
    assert "aten::mkldnn_convolution" in fast_ops
    (ddf_n, grads_n), (ddf_f, grads_f) = step(native), step(fast)
    assert ddf_f.shape == ddf_n.shape == (1, 3, 16, 64, 64)
    assert ddf_n.abs().max() > 0
    torch.testing.assert_close(ddf_f, ddf_n, rtol=1e-4, atol=1e-5 * float(ddf_n.abs().max()))
    assert len(grads_f) == len(grads_n) > 0
    for gf, gn in zip(grads_f, grads_n):
        torch.testing.assert_close(gf, gn, rtol=1e-3, atol=1e-4 * float(gn.abs().max()) + 1e-12)


def test_the_3d_fast_path_leaves_other_calls_alone():
    """Batch 2, 2D and float64 inputs take no padding (the hook returns nothing); batch 1 in 3D is padded."""
    from diffreg.device import _takes_slow_path

    conv3, conv2 = torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.zeros(1, 4, 8, 32, 32)
    assert _takes_slow_path(conv3, x) == torch.backends.mkldnn.is_available()
    assert not _takes_slow_path(conv3, torch.zeros(2, 4, 8, 32, 32))
    assert not _takes_slow_path(conv3, x.double())
    assert not _takes_slow_path(conv3, torch.zeros(1, 4, 160, 160, 8))    # above ATen's threshold: oneDNN already
    assert not _takes_slow_path(torch.nn.Conv3d(4, 4, 1), x)              # 1 x 1 x 1: the native kernel is faster
    assert not _takes_slow_path(conv2, torch.zeros(1, 4, 32, 32))
