"""A run folder and everything that reads or checks one.

What :func:`diffreg.train.fit` writes into ``out`` (and the command line, the benchmark and the chapters read):

* ``config.json``: the :class:`~diffreg.config.MethodConfig` of the run;
* ``checkpoint.pt``: weights, optimizer, scheduler, scaler, random states, step, configuration (written atomically,
  read with ``weights_only=True``);
* ``log.csv``: one row every ``log_every`` steps (step, lr, seconds, every loss term, validation columns);
* ``data.json``: the data string (``DIFFREG_DATA`` / ``--data``) the run was trained on, written by
  :func:`diffreg.train.train_or_reuse` and ``python -m diffreg train``, read by ``evaluate`` and ``register``;
* a sub-folder per stage trained before the main loop (``teacher/``, ``autoencoder/``, ``latent_unet/``), each a run
  folder of its own.

:class:`RunFolder` is the one object that knows these names; :func:`load_run` rebuilds the model of a run. Explained
in chapter 02 (``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffreg.config import MethodConfig
from diffreg.device import resolve_device

__all__ = ["RunFolder", "load_run", "check_run_dir", "load_checkpoint", "save_checkpoint",
           "CHECKPOINT", "CONFIG", "LOG", "DATA"]

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
CONFIG = "config.json"
DATA = "data.json"


@dataclass(frozen=True)
class RunFolder:
    """A run directory of :func:`diffreg.train.fit` (it may not exist yet).

    Attributes:
        path: the folder.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    def has_checkpoint(self) -> bool:
        """A ``checkpoint.pt`` is there."""
        return self.checkpoint_path.is_file()

    def config(self) -> MethodConfig | None:
        """The stored configuration (``config.json``), ``None`` without one."""
        path = self.path / CONFIG
        return MethodConfig.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def step(self) -> int:
        """The step of the checkpoint (0 without one)."""
        return int(load_checkpoint(self.checkpoint_path)["step"]) if self.has_checkpoint() else 0

    def data_spec(self) -> str | None:
        """The data string the run was trained on (``data.json``), ``None`` when it was not recorded.

        Raises:
            ValueError: ``data.json`` is unreadable.
        """
        path = self.path / DATA
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text()).get("data")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable run data file ({exc})") from exc

    def write_data_spec(self, spec: str, method: str) -> None:
        """Record the data string ``spec`` the run of ``method`` is trained on (``data.json``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DATA).write_text(json.dumps({"data": spec, "method": method}))

    def log(self) -> list[dict[str, float]]:
        """The rows of ``log.csv`` as numbers (empty cells left out; no rows without a log)."""
        if not self.log_path.is_file():
            return []
        with open(self.log_path, newline="") as fh:
            return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]

    def seconds(self) -> float | None:
        """Training seconds in the last row of the log (``None`` without one)."""
        rows = self.log()
        return rows[-1].get("seconds") if rows else None

    def check(self, config: MethodConfig | dict[str, Any] | None = None, data: str | None = None) -> None:
        """Refuse a folder that cannot hold a run of ``config`` trained on ``data`` (see :func:`check_run_dir`; a
        checkpoint trained on another recorded data string is refused too).

        Raises:
            ValueError: ``path`` is a file, or it holds a run of another configuration or data.
        """
        cfg = config.to_dict() if isinstance(config, MethodConfig) else config
        check_run_dir(self.path, cfg)
        stored = self.data_spec() if data is not None and self.has_checkpoint() else None
        if stored is not None and stored != data:
            method = (cfg or {}).get("method", "?")
            raise ValueError(f"{self.path} holds a {method} run trained on --data {stored}, not {data}: start fresh "
                             "in a new folder (--out NEW_FOLDER --no-resume), or repeat its --data to continue")


def _describe(cfg: dict[str, Any]) -> str:
    """``"voxelmorph (quick profile, 2D (64, 64))"`` from a stored configuration dictionary."""
    data = cfg.get("data", {}) or {}
    size = tuple(data.get("size", ()) or ())
    return f"{cfg.get('method', '?')} ({cfg.get('profile', '?')} profile, {data.get('dims', '?')}D {size})"


def _normalised(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration with the current defaults filled in and tuples as lists (comparable as JSON)."""
    try:
        cfg = MethodConfig.from_dict(cfg).to_dict()
    except (KeyError, TypeError):  # written by another version: compare what is there
        pass
    return json.loads(json.dumps(cfg, default=list))


#: configuration sections a resumed run must share with the stored one (the training budget may change)
_RUN_IDENTITY = ("method", "profile", "model", "data")


def check_run_dir(out: str | Path, config: dict[str, Any] | None = None) -> None:
    """Check that ``out`` can hold a run: it is a folder (or does not exist yet), and a checkpoint in it belongs to
    the same method, profile, model and data settings as ``config`` (a :meth:`MethodConfig.to_dict`).

    Args:
        out: the run directory.
        config: the configuration about to be trained (``None``: only check that ``out`` is not a file).

    Raises:
        ValueError: ``out`` is an existing file, or it holds a run of another method, profile, model or data
            (the message says what it holds and how to start fresh).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a run directory: name a folder (it is created)")
    ckpt_path = out / CHECKPOINT
    if config is not None and ckpt_path.is_file():
        _check_same_run(out, load_checkpoint(ckpt_path), config)


def _check_same_run(out: Path, ckpt: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the checkpoint ``ckpt`` of ``out`` is not a run of ``config`` (see
    :func:`check_run_dir`)."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        return
    old, new = _normalised(stored), _normalised(config)
    details: list[str] = []
    for k in _RUN_IDENTITY:
        if k not in old or k not in new or old[k] == new[k]:
            continue
        if isinstance(old[k], dict) and isinstance(new[k], dict):
            # settings both versions know (one added by a newer diffreg is not a different run)
            changed = [f"{k}.{j}: {old[k][j]!r} -> {new[k][j]!r}" for j in sorted(set(old[k]) & set(new[k]))
                       if old[k][j] != new[k][j]]
            details += changed[:4] + ([f"... ({len(changed) - 4} more)"] if len(changed) > 4 else [])
        else:
            details.append(f"{k}: {old[k]!r} -> {new[k]!r}")
    if not details:
        return
    raise ValueError(
        f"{out} holds a {_describe(old)} run at step {int(ckpt.get('step', 0))}, which this training cannot "
        f"resume ({'; '.join(details)}). Start fresh in a new folder (--out NEW_FOLDER --no-resume, or "
        f"fit(..., out=NEW_FOLDER, resume=False)), or repeat that run's settings to continue it.")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with ``torch.save`` atomically: to ``path + ".tmp"``, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable diffreg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"{path}: not a readable diffreg checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise ValueError(f"{path}: not a diffreg checkpoint (missing 'model' or 'step')")
    return ckpt


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, MethodConfig]:
    """Rebuild the model of a run directory written by :func:`diffreg.train.fit` and load its latest weights.

    Args:
        run_dir: a run directory (``config.json`` and ``checkpoint.pt``).
        device: where to put the model; default :func:`diffreg.device.default_device`.

    Returns:
        ``(model, config)`` with the model in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.json`` or ``checkpoint.pt``.
    """
    from diffreg.models import build

    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a diffreg run directory?")
    cfg = MethodConfig.from_dict(json.loads(cfg_path.read_text()))
    device = resolve_device(device)
    ckpt = load_checkpoint(run_dir / CHECKPOINT, map_location=device)
    model = build(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
