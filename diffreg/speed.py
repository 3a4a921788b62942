"""Speed and memory of one method at one profile: ``python -m diffreg speed`` and :func:`measure_speed`.

Explained in chapter 10 (``notebooks/10_benchmark.md``).

    python -m diffreg speed --method voxelmorph --profile paper --dims 3 --steps 20 [--amp] [--batch-size B]
    python -m diffreg speed --method diffusereg --profile paper --sampler-steps 10 50 --out speed.csv

What is measured, on the device given (default ``cuda`` when available, else ``cpu``), at the profile's
architecture, data size and batch size (unless overridden):

* **training step**: forward + ``model.loss(batch)`` + backward + optimizer step (the profile's Adam / AdamW, gradient
  clipping when configured), as :func:`diffreg.train.fit` does it, on one batch of phantom pairs at the profile's
  size (``B`` items of ``open_dataset("phantom:KIND", ...)`` stacked; every key a model's ``loss`` reads is there:
  ``moving``, ``fixed``, the labels, ``true_ddf``). The median over ``steps`` timed steps after the warm-up steps
  (1 on a CPU, 2 on a GPU), and ``batch / median`` samples per second. Data loading is not timed.
* **first stages are not trained**: the :meth:`~diffreg.models.RegistrationModel.stages` (DiffuseReg's VoxelMorph
  teacher, LDM-Morph's autoencoder and latent U-Net) and ``prepare`` (DiffuseReg's field statistics) are skipped;
  the frozen parts keep their
  initial weights and are marked ready, which costs the same time per step as trained weights. A DiffuseReg
  teacher trains at the speed of the ``voxelmorph`` row of the same size.
* **inference per pair**: the median of ``model.register(moving, fixed)`` on one pair (batch 1) after one warm-up
  call, with up to ``repeats`` timed calls (fewer when one call takes longer than ``repeat_budget_s``). DiffuseReg:
  one entry per sampler step count ``S`` of ``sampler_steps``, ``register(sampler="ddim", steps=S)``, ``S``
  denoiser evaluations (``S = T`` evaluations cost what the paper's DDPM over all ``T`` steps costs); default: the
  profile's sampler steps (``T`` for DDPM). A deformation generator (:class:`~diffreg.models.DeformationGenerator`,
  DRDM) registers no pairs: its entry is ``deform(image, level)`` for each level of ``sampler_steps`` (default its
  ``max_level``); for DRDM ``deform(image, T')`` (Alg. 2, ``T'`` recovery steps, default ``T``). The other methods
  register in one pass and ignore ``sampler_steps``.
* **peak memory** of the timed calls (after the warm-up), separately for training and inference: on CUDA
  ``torch.cuda.max_memory_allocated`` (every tensor: weights, gradients, optimizer state, the batch, activations;
  not the caching allocator's reserve). On a CPU the same quantity is estimated as the bytes of the tensors that
  persist across the calls (weights and buffers, gradients, optimizer state, the batch) plus the growth of the
  process's peak resident set size during the timed calls over the resident size just before them (``VmHWM`` of
  ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``; ``ru_maxrss`` where that is
  unavailable). Library code and one-time workspaces loaded by the warm-up are left out; the CPU kernels' own
  scratch memory is in, so the figure estimates rather than equals what the step takes on a GPU.
* **AMP** (``amp=True``): ``torch.autocast`` with the profile's ``amp_dtype`` (``bfloat16``; ``float16`` with a
  ``GradScaler``) around the loss in training and around ``register`` in inference. CUDA only, like
  :func:`diffreg.train.fit`, which never uses mixed precision on a CPU: ``amp=True`` on a CPU raises ``ValueError``.

Running out of memory (``torch.OutOfMemoryError``, a ``RuntimeError`` saying "out of memory" or "can't allocate
memory", ``MemoryError``) in a phase is reported as ``"OOM"`` in that phase's fields instead of raising.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import math
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["measure_speed", "format_row", "table_header", "append_csv", "device_name", "tensor_bytes", "COLUMNS"]

OOM = "OOM"

#: (key of the :func:`measure_speed` dict, column title) of the markdown row and the CSV file
COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "method"),
    ("profile", "profile"),
    ("dims", "dims"),
    ("size", "size"),
    ("batch", "batch"),
    ("device", "device"),
    ("amp", "AMP"),
    ("train_s_per_step", "train s/step (median)"),
    ("samples_per_s", "samples/s"),
    ("inference", "inference s/pair"),
    ("peak_train_gb", "peak GB train"),
    ("peak_infer_gb", "peak GB inference"),
    ("date", "date"),
)


# ----------------------------------------------------------------------------------------------------------------
# device and memory
# ----------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for CUDA; for a CPU its model name, core count and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device (or the host) ran out of memory."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _status_kb(key: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``; ``None`` where there is none."""
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensors in ``objects`` (modules: parameters, their gradients and buffers; optimizers:
    their state; dicts, lists and tuples: their values, recursively)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    def visit(o: Any) -> None:
        if isinstance(o, torch.nn.Module):
            for prm in o.parameters():
                add(prm)
                add(prm.grad)
            for buf in o.buffers():
                add(buf)
        elif isinstance(o, torch.optim.Optimizer):
            visit(list(o.state.values()))
        elif isinstance(o, dict):
            visit(list(o.values()))
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)
        else:
            add(o)

    for o in objects:
        visit(o)
    return total


class _PeakMemory:
    """Peak memory of the calls between :meth:`reset` and :meth:`peak`, in bytes: CUDA ``max_memory_allocated``,
    or on a CPU the persistent tensor bytes plus the peak-RSS growth (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_rss = 0
        self.method = ("cuda max_memory_allocated" if device.type == "cuda"
                       else "persistent tensor bytes + peak RSS growth (VmHWM)")

    @staticmethod
    def _trim() -> None:
        gc.collect()
        try:  # give freed heap pages back to the OS, so the reset peak starts from what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def _rss(self) -> int:
        kb = _status_kb("VmRSS")
        return 1024 * kb if kb is not None else 0

    def reset(self) -> None:
        """Start measuring: reset the peak counters (CPU: to the resident size now)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.method = "persistent tensor bytes + peak RSS growth (ru_maxrss, not resettable)"
        self.start_rss = self._rss()

    def peak(self, persistent: int = 0) -> int:
        """Peak bytes since :meth:`reset`; ``persistent``: bytes of the tensors alive throughout (CPU only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _status_kb("VmHWM")
        if hwm is None or "ru_maxrss" in self.method:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return int(persistent) + max(0, 1024 * int(hwm) - self.start_rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# the model, the batch, the phases
# ----------------------------------------------------------------------------------------------------------------


def _skip_prepare(model: torch.nn.Module) -> bool:
    """Mark a model's stages and preparation as done without running them (see the module docstring): each of its
    :meth:`~diffreg.models.RegistrationModel.stages` is declared done with an empty log, and the statistics of a
    ``prepare`` keep their initial values. ``True`` when the model has stages or a :meth:`prepare` of its own."""
    from diffreg.models.base import BaseModel

    stages = model.stages() if callable(getattr(model, "stages", None)) else []
    for stage in stages:
        if stage.done is not None:
            stage.done([])
    own = bool(stages) or type(model).prepare is not BaseModel.prepare
    flag = getattr(model, "stats_ready", None)
    if isinstance(flag, torch.Tensor):
        flag.fill_(True)
    return own


def _phantom_batch(cfg: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """``batch_size`` phantom pairs at the profile's size, stacked: ``moving``/``fixed`` ``(B, 1, *size)`` float32,
    ``moving_label``/``fixed_label`` ``(B, 1, *size)`` int64, ``true_ddf`` ``(B, dims, *size)``, ``spacing``
    ``(B, dims)``."""
    from diffreg.data import open_dataset

    n = max(1, min(batch_size, 2))
    data = open_dataset(f"phantom:{cfg.data.phantom}", split="all", dims=cfg.data.dims, profile=cfg.profile,
                        size=tuple(cfg.data.size), n_subjects=n, intensity=tuple(cfg.data.intensity))
    items = [data[i % len(data)] for i in range(batch_size)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
           budget_s: float | None = None, after_warmup: Callable[[], None] | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (stopping early, after at least one
    timed call, once ``budget_s`` seconds of timed calls are spent); ``after_warmup()`` runs between the two."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) > budget_s:
            break
    return times


def _inference_runs(model: torch.nn.Module, method: str, sampler_steps: Sequence[int] | None
                    ) -> list[tuple[str, Callable[[torch.Tensor, torch.Tensor], Any]]]:
    """``(label, fn(moving, fixed))`` for every inference entry of ``method`` (see the module docstring)."""
    from diffreg.models.base import DeformationGenerator

    if method == "diffusereg":
        T = model.schedule.num_timesteps
        default = model.default_steps if model.default_sampler == "ddim" and model.default_steps else T
        steps = list(sampler_steps) if sampler_steps else [default]
        return [(f"S={s}", lambda m, f, s=int(s): model.register(m, f, sampler="ddim", steps=s)) for s in steps]
    if isinstance(model, DeformationGenerator):
        steps = list(sampler_steps) if sampler_steps else [model.max_level]
        return [(f"{model.level_symbol}={s}", lambda m, f, s=int(s): model.deform(m, s)) for s in steps]
    return [("", lambda m, f: model.register(m, f))]


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def measure_speed(method: str, profile: str = "paper", dims: int | None = None, steps: int = 5, amp: bool = False,
                  device: str | torch.device | None = None, batch_size: int | None = None,
                  sampler_steps: Sequence[int] | None = None, size: Sequence[int] | None = None, *,
                  warmup: int | None = None, repeats: int = 3, repeat_budget_s: float = 30.0,
                  train: bool = True, inference: bool = True, seed: int = 0) -> dict[str, Any]:
    """Training-step time, inference time per pair and peak memory of ``method`` at ``profile`` on ``device``.

    Args:
        method: a name from :func:`diffreg.config.methods`.
        profile: ``"quick"`` or ``"paper"``.
        dims: 2 or 3 (``None``: the profile's default).
        steps: timed training steps (the median is reported).
        amp: mixed precision (CUDA only; the profile's ``amp_dtype``).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...; default ``cuda`` when available, else ``cpu``.
        batch_size: pairs per training step (default: the profile's).
        sampler_steps: DiffuseReg sampler step counts / deformation levels of a generator (DRDM: ``T'``) timed at
            inference (see the module docstring); ignored by the one-pass methods.
        size: spatial size in array order, ``(H, W)`` or ``(D, H, W)`` (default: the profile's).
        warmup: untimed training steps first (default 2 on CUDA, 1 on a CPU).
        repeats: timed inference calls per entry (at most).
        repeat_budget_s: stop repeating an inference entry after this many seconds of timed calls.
        train: time training steps.
        inference: time inference.
        seed: seeds the weights and the training randomness.

    Returns:
        A dict with the :data:`COLUMNS` keys (``size`` as ``"32x128x128"``, ``inference`` a display string) and
        ``train_times`` (seconds per timed step), ``inference_s`` (label -> median seconds per pair; ``""`` for the
        one-pass methods), ``peak_train_bytes``, ``peak_infer_bytes``, ``memory_method``, ``parameters``
        (trainable), ``prepare`` (whether a first stage was skipped), ``steps``, ``torch``. Seconds and GB are
        floats, or ``"OOM"`` for a phase that ran out of memory (``None``: not measured).

    Raises:
        ValueError: unknown method / profile / dims, ``steps < 1``, or ``amp`` on a device other than CUDA.
    """
    from diffreg.config import get_config
    from diffreg.models import build
    from diffreg.device import resolve_device
    from diffreg.train import make_optimizer, train_step

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = get_config(method, profile, dims)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if amp and dev.type != "cuda":
        raise ValueError(f"--amp needs a CUDA device (got {dev}): diffreg.train.fit uses mixed precision on CUDA "
                         "only, so a CPU timing with autocast would describe no training run")
    if batch_size is not None:
        cfg.train.batch_size = int(batch_size)
    if size is not None:
        cfg.data.size = tuple(int(s) for s in size)
    if len(cfg.data.size) != cfg.data.dims:
        raise ValueError(f"size {tuple(cfg.data.size)} must have {cfg.data.dims} entries for {cfg.data.dims}D")
    B = int(cfg.train.batch_size)
    warmup = (2 if dev.type == "cuda" else 1) if warmup is None else int(warmup)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.train.amp_dtype]

    result: dict[str, Any] = {
        "method": method, "profile": profile, "dims": cfg.data.dims, "size": "x".join(map(str, cfg.data.size)),
        "batch": B, "device": device_name(dev), "amp": (cfg.train.amp_dtype if amp else "no"),
        "train_s_per_step": None, "samples_per_s": None, "inference": "", "peak_train_gb": None,
        "peak_infer_gb": None, "date": datetime.date.today().isoformat(), "train_times": [], "inference_s": {},
        "peak_train_bytes": None, "peak_infer_bytes": None, "steps": int(steps), "torch": torch.__version__,
    }
    mem = _PeakMemory(dev)

    batch = _phantom_batch(cfg, B)
    torch.manual_seed(seed)
    model = build(cfg).to(dev)
    result["parameters"] = model.num_parameters()
    result["prepare"] = "skipped" if _skip_prepare(model) else "none"
    batch = {k: v.to(dev) for k, v in batch.items()}

    # ---- training -------------------------------------------------------------------------------------------
    if train:
        optimizer = make_optimizer(model, cfg.train)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp and amp_dtype == torch.float16)

        def one_step() -> None:   # the trainer's step on the fixed batch
            train_step(model.loss, batch, optimizer, scaler, cfg.train.grad_clip, model.parameters(),
                       (dev.type, amp_dtype, amp))

        model.train()
        try:
            times = _timed(one_step, dev, warmup, steps, after_warmup=mem.reset)
            med = statistics.median(times)
            result.update(train_times=times, train_s_per_step=med, samples_per_s=B / med)
            result["peak_train_bytes"] = mem.peak(tensor_bytes(model, optimizer, batch))
            result["peak_train_gb"] = result["peak_train_bytes"] / 1e9
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are reported, the rest re-raised
            if not is_oom(exc):
                raise
            result.update(train_s_per_step=OOM, samples_per_s=OOM, peak_train_gb=OOM, peak_train_bytes=OOM)
        optimizer.zero_grad(set_to_none=True)
        del optimizer, scaler
        for p in model.parameters():
            p.grad = None

    # ---- inference ------------------------------------------------------------------------------------------
    if inference:
        model.eval()
        moving, fixed = batch["moving"][:1].clone(), batch["fixed"][:1].clone()
        del batch
        labels = []
        peak = 0
        try:
            for label, fn in _inference_runs(model, method, sampler_steps):
                def call(fn=fn) -> None:
                    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=amp):
                        torch.manual_seed(seed)
                        fn(moving, fixed)

                t = statistics.median(_timed(call, dev, 1, repeats, repeat_budget_s, after_warmup=mem.reset))
                peak = max(peak, mem.peak(tensor_bytes(model, moving, fixed)))
                result["inference_s"][label] = t
                labels.append(f"{label}: {_fmt(t)}" if label else _fmt(t))
            result["peak_infer_bytes"] = peak
            result["peak_infer_gb"] = result["peak_infer_bytes"] / 1e9
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            labels.append(OOM)
            result.update(peak_infer_gb=OOM, peak_infer_bytes=OOM)
        result["inference"] = "; ".join(labels)
    else:
        result["inference"] = None
    result["memory_method"] = mem.method
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------


def table_header() -> str:
    """The markdown header (two lines) of :func:`format_row`."""
    titles = [t for _, t in COLUMNS]
    return "| " + " | ".join(titles) + " |\n|" + "|".join("---" for _ in titles) + "|"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("peak_train_gb", "peak_infer_gb") and isinstance(value, float):
        return f"{value:.2f}" if value >= 1 else f"{value:.2g}"
    if key == "samples_per_s" and isinstance(value, float):
        return f"{value:.3g}"
    return _fmt(value)


def format_row(result: dict[str, Any]) -> str:
    """One markdown table row of a :func:`measure_speed` result (columns :data:`COLUMNS`)."""
    return "| " + " | ".join(_cell(k, result.get(k)) for k, _ in COLUMNS) + " |"


def append_csv(result: dict[str, Any], path: str | Path) -> Path:
    """Append a :func:`measure_speed` result as one CSV row to ``path`` (the header is written when the file is new);
    the columns are :data:`COLUMNS`' keys, then ``memory_method``, ``parameters``, ``prepare``, ``steps``,
    ``torch``."""
    path = Path(path)
    keys = [k for k, _ in COLUMNS] + ["memory_method", "parameters", "prepare", "steps", "torch"]
    new = not path.is_file() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if result.get(k) is None else result.get(k)) for k in keys})
    return path
