"""Shared fixtures of the unit tests: the device they run on.

The unit tests run on the CPU by default, also on a machine with a GPU, so their results do not depend on the
hardware. ``DIFFREG_TEST_DEVICE=cuda pytest tests`` runs them on the GPU (``benchmarks/gpu_check.py`` does): the
``device`` fixture returns that device, and wherever the package picks a device itself
(:func:`diffreg.device.default_device`: ``fit``, ``evaluate``, ``run_bench``, ``measure_speed``, the command line) it
picks that one. Tests of the device rule itself use the ``real_default_device`` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

import diffreg.device
import diffreg.train

_REAL_DEFAULT_DEVICE = diffreg.device.default_device


def test_device() -> torch.device:
    """``DIFFREG_TEST_DEVICE`` as a :class:`torch.device` (default ``cpu``).

    Raises:
        ValueError: the variable names CUDA on a machine without it, or is not a device string.
    """
    name = os.environ.get("DIFFREG_TEST_DEVICE", "cpu").strip() or "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"DIFFREG_TEST_DEVICE={name!r} is not a device ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DIFFREG_TEST_DEVICE={name!r} but CUDA is not available on this machine")
    return dev


test_device.__test__ = False  # a helper, not a test


@pytest.fixture
def seed() -> int:
    """The seed of the tests that assert a learning effect: ``DIFFREG_SEED`` (default 0). Such a test must pass at
    every seed (``benchmarks/claims/run_claims.py --tests`` records its figure at five seeds and two CPU kernel
    levels)."""
    from diffreg.claims import chapter_seed

    return chapter_seed()


@pytest.fixture
def claims(request, seed):
    """A :class:`diffreg.claims.Claims` for one test: ``claims.check`` asserts and, under the claims benchmark,
    records the figure (``DIFFREG_CLAIMS_DIR``)."""
    from diffreg.claims import Claims

    return Claims(f"{request.module.__name__.rsplit('.', 1)[-1]}.{request.node.name}", seed)


@pytest.fixture
def device() -> torch.device:
    """The device the test runs on (``DIFFREG_TEST_DEVICE``, default ``cpu``)."""
    return test_device()


@pytest.fixture(autouse=True)
def _default_device_is_the_test_device(monkeypatch):
    """Where the package chooses a device itself, it chooses the test device."""
    dev = test_device()
    for module in (diffreg.device, diffreg.train):   # the rule, and its name in the trainer's namespace
        monkeypatch.setattr(module, "default_device", lambda: dev)
    yield


@pytest.fixture
def real_default_device(monkeypatch):
    """:func:`diffreg.device.default_device` as the package defines it (undoes the test-device choice)."""
    for module in (diffreg.device, diffreg.train):
        monkeypatch.setattr(module, "default_device", _REAL_DEFAULT_DEVICE)
    return _REAL_DEFAULT_DEVICE
