"""Where things run: the device rule and the ``torchrun`` environment.

The bottom floor of the package's execution side: it imports nothing of :mod:`diffreg`, and every module that
chooses a device itself (:mod:`diffreg.train`, :mod:`diffreg.evaluate`, :mod:`diffreg.bench`, :mod:`diffreg.speed`,
:mod:`diffreg.apply`, the command line) asks :func:`default_device`. Explained in chapter 02
(``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["cpu_conv3d_fast_path", "default_device", "distributed_info", "resolve_device"]


def distributed_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment (``(0, 0, 1)`` when not distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def default_device() -> torch.device:
    """The device used wherever none is named (:func:`diffreg.train.fit`, :func:`diffreg.evaluate.evaluate`,
    :func:`diffreg.bench.run_bench`, :func:`diffreg.speed.measure_speed`, every ``python -m diffreg`` command).

    Returns:
        ``cuda:LOCAL_RANK`` under ``torchrun`` (``WORLD_SIZE > 1``) when CUDA is available, ``cuda`` (the current
        GPU) when CUDA is available otherwise, else ``cpu``. Pass ``device="cpu"`` (``--device cpu``) to force the
        CPU on a machine with a GPU.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    _, local_rank, world = distributed_info()
    return torch.device("cuda", local_rank) if world > 1 else torch.device("cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device`, or :func:`default_device` when it is ``None``."""
    import diffreg.device as rule   # looked up at call time, so a test can replace the rule

    return torch.device(device) if device is not None else rule.default_device()


# -- small 3D convolutions on the CPU -------------------------------------------------------------------------------
#
# PyTorch's CPU convolution picks oneDNN only when the batch has more than one sample, or when
# batch x channels x depth x height exceeds 20,480 (``ConvParams::use_mkldnn`` in ATen's ``Convolution.cpp``: "for
# some case, native is faster"). For a quick 3D volume (16 x 64 x 64) at batch 1 most 3 x 3 x 3 convolutions fall
# below that and run ``slow_conv3d``, forward and backward, which is several times slower per sample than oneDNN at
# batch 2 (``benchmarks/conv3d_fast_path.md``). Padding the batch with one zero sample moves the call to oneDNN; the
# zero sample's output is dropped, so it adds nothing to the result or to the gradients.

FAST_PATH_VARIABLE = "DIFFREG_CPU_CONV3D_FAST"
_MKLDNN_THRESHOLD = 20480


def _takes_slow_path(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ATen would run ``conv`` on ``x`` with its native kernel although oneDNN is available (batch 1)."""
    k = conv.kernel_size
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and x.shape[0] == 1
            and conv.groups == 1 and tuple(k[-2:]) != (1, 1) and not (k[-1] > 3 and k[-2] > 3)
            and x.shape[1] * x.shape[2] * x.shape[3] <= _MKLDNN_THRESHOLD
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _pad_batch(conv: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    conv._diffreg_padded = _takes_slow_path(conv, x)
    if conv._diffreg_padded:
        return (torch.cat((x, x.new_zeros(x.shape))),) + tuple(args[1:])
    return None


def _drop_padding(conv: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    if getattr(conv, "_diffreg_padded", False):
        conv._diffreg_padded = False
        return out[:1]
    return None


def cpu_conv3d_fast_path(model: nn.Module) -> nn.Module:
    """Run the 3D convolutions of ``model`` through oneDNN on the CPU at batch 1, and return ``model``.

    Registers a forward pre-hook and a forward hook on every :class:`~torch.nn.Conv3d` and
    :class:`~torch.nn.ConvTranspose3d` of ``model``: when a call would take ATen's native kernel (a float32 CPU input
    of batch 1 whose ``channels x depth x height`` is at most 20,480, the rule of ``ConvParams::use_mkldnn``; kernels
    ending in 1 x 1 and grouped convolutions excepted, where the native kernel is ATen's choice for other reasons),
    the input is padded with one zero sample and the output of that sample is dropped. Results and gradients equal
    the native kernel's up to float rounding (``tests/test_device.py``); the weights and the state dict are unchanged.
    Other devices, dtypes and batch sizes pass through untouched. The cost is memory: a padded layer keeps the padded
    input for its backward pass, twice the activation of the native call. The training step of every quick 3D
    profile at batch 1 is measured before and after in ``benchmarks/speed_cpu.md``.

    :func:`diffreg.models.build` and :func:`diffreg.train.fit` apply it; calling it again does nothing. Set the
    environment variable ``DIFFREG_CPU_CONV3D_FAST=0`` before a model is built to leave it as PyTorch runs it (to
    measure the difference). The hooks keep a flag on each convolution between its pre-hook and its hook, so one
    model must not run forward passes in several threads at once.
    """
    if os.environ.get(FAST_PATH_VARIABLE, "1").strip() == "0":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and not getattr(module, "_diffreg_fast_path", False):
            module.register_forward_pre_hook(_pad_batch)
            module.register_forward_hook(_drop_padding)
            module._diffreg_fast_path = True
    return model
