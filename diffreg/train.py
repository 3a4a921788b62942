"""One trainer for every model: :func:`fit`.

* any :class:`~diffreg.models.RegistrationModel` (it only calls ``model.loss(batch)["total"]``);
* Adam / AdamW, cosine or constant learning rate with optional warm-up, gradient clipping;
* float32 by default, as the papers train; mixed precision is opt-in (``TrainConfig.amp``, ``--amp``) and used on
  CUDA only (``bfloat16`` autocast, or ``float16`` with a gradient scaler);
* the GPU when one is available and no device is named (:func:`diffreg.device.default_device`);
* DDP when launched by ``torchrun`` (NCCL on CUDA, gloo on CPU); each process reads its own strided share of a
  seeded, per-epoch permutation of the dataset;
* tqdm progress, a CSV log (``log.csv``), ``config.json``;
* checkpoints written atomically (``checkpoint.pt.tmp`` then ``os.replace``) holding the weights, optimizer,
  scheduler, scaler, RNG states (torch, CUDA, numpy, python), the step and the config; loading uses
  ``torch.load(..., weights_only=True)``. The data order is a function of ``(seed, step)``, so a run resumed from a
  checkpoint continues exactly as the uninterrupted run would have (tested on CPU).

Explained in chapter 02 (``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from diffreg.config import MethodConfig, TrainConfig
from diffreg.device import cpu_conv3d_fast_path, default_device, distributed_info, resolve_device
from diffreg.runs import (CHECKPOINT, CONFIG, LOG, RunFolder, _check_same_run, _describe, check_run_dir,
                          load_checkpoint, load_run, save_checkpoint)

__all__ = ["fit", "train_step", "make_optimizer", "train_or_reuse", "train_or_reuse_many", "map_in_workers", "load_run", "load_checkpoint", "save_checkpoint", "seed_everything", "distributed_info",
           "default_device", "check_run_dir", "set_stage_steps", "stage_budgets", "train_stages"]



def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepSampler(Sampler[list[int]]):
    """Batches of indices as a pure function of ``(seed, step)``.

    Epoch ``e`` is ``randperm(len(dataset))`` drawn from a generator seeded with ``seed + e``; the global stream of
    indices is the concatenation of the epochs; step ``s`` of process ``rank`` (of ``world``) takes positions
    ``[(s * world + rank) * B, ... + B)``. Starting at ``start_step`` therefore resumes the data order exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int, rank: int = 0,
                 world: int = 1) -> None:
        if n < 1:
            raise ValueError("cannot train on an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps, self.rank, self.world = start_step, total_steps, rank, world
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perm_cache[epoch]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            first = (step * self.world + self.rank) * self.batch_size
            batch = []
            for pos in range(first, first + self.batch_size):
                batch.append(self._perm(pos // self.n)[pos % self.n])
            yield batch


class _LossModule(nn.Module):
    """Wraps ``model.loss`` as ``forward`` so DDP synchronises gradients of the loss computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


def _check_train_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for settings :func:`fit` cannot use."""
    if cfg.amp_dtype not in ("bfloat16", "float16"):
        raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {cfg.amp_dtype!r}")
    if cfg.scheduler not in ("cosine", "constant"):
        raise ValueError(f"scheduler must be 'cosine' or 'constant', got {cfg.scheduler!r}")
    for name in ("log_every", "checkpoint_every", "batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.epochs is None and cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")


def total_steps(cfg: TrainConfig, n_train: int, world: int = 1) -> int:
    """Optimizer steps of a full run: ``cfg.steps``, or ``cfg.epochs`` passes over ``n_train`` pairs in batches of
    ``cfg.batch_size`` per process on ``world`` processes."""
    return cfg.epochs * math.ceil(n_train / (cfg.batch_size * world)) if cfg.epochs else cfg.steps


def stage_budgets(config: MethodConfig) -> tuple:
    """The :class:`~diffreg.models.base.StageBudget` of each stage the method of ``config`` trains before its main
    loop (DiffuseReg's teacher; LDM-Morph's autoencoder and latent U-Net), asked of the model class (no model is
    built); empty for a method without stages or unknown to the registry."""
    from diffreg.models import MODELS

    cls = MODELS.get(config.method)
    return tuple(getattr(cls, "stage_budgets", ())) if cls is not None else ()


def set_stage_steps(config: MethodConfig, steps: int) -> list[str]:
    """Set the steps of every stage trained before the main loop (:func:`stage_budgets`) to ``steps``.

    Args:
        config: a method configuration (changed in place).
        steps: steps of each stage, >= 1.

    Returns:
        The model settings that were set (empty for a method without stages).

    Raises:
        ValueError: ``steps < 1``.
    """
    if int(steps) < 1:
        raise ValueError(f"stage steps must be >= 1, got {steps}")
    keys = [b.steps_key for b in stage_budgets(config) if b.steps_key in config.model]
    for k in keys:
        config.model[k] = int(steps)
    return keys


def train_stages(model: nn.Module, data: Dataset, out: str | Path | None = None,
                 device: str | torch.device | None = None, resume: bool = True, progress: bool = True,
                 seed: int = 0) -> list[str]:
    """Train the stages ``model`` declares before its main loop (:meth:`~diffreg.models.RegistrationModel.stages`),
    each with :func:`fit` in its own run folder ``out / stage.name``: checkpointed, resumed after a kill, with AMP and
    DDP like the main loop. Each trained stage is frozen (``requires_grad=False``) and its ``done`` is called with its
    log rows. :func:`fit` calls this before the main loop; call it yourself to look at the stages first (chapter 07).

    Args:
        model: a model; one without ``stages`` has none.
        data: the training pairs (a stage's ``dataset`` maps them to its own items).
        out: the model's run directory (``None``: nothing is kept and every stage trains from scratch).
        device: where to train (default :func:`diffreg.device.default_device`).
        resume: continue a stage from its checkpoint (a finished stage is restored without training).
        progress: show progress bars.
        seed: the run's seed, for stages without a seed of their own.

    Returns:
        The names of the stages trained or restored.
    """
    stages = getattr(model, "stages", None)
    todo = stages(seed=int(seed)) if callable(stages) else []
    if todo:
        model.to(resolve_device(device))
    for stage in todo:
        stage_out = Path(out) / stage.name if out is not None else None
        stage.module.requires_grad_(True)
        rows = fit(stage.module, stage.dataset(data) if stage.dataset is not None else data, stage.config,
                   out=stage_out, device=device, resume=resume, progress=progress)
        if stage.frozen:
            stage.module.requires_grad_(False)
        if stage_out is not None and (stage_out / LOG).is_file():  # every row, also those of an earlier call
            rows = RunFolder(stage_out).log()
        if stage.done is not None:
            stage.done(rows)
    return [stage.name for stage in todo]


def _lr_lambda(cfg: TrainConfig, total: int):
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos

    return fn


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of :class:`~diffreg.config.TrainConfig` ``cfg`` (Adam or AdamW) over the parameters of
    ``model`` that require gradients (frozen stages are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_step(loss_fn: Callable[[dict[str, Any]], dict[str, torch.Tensor]], batch: dict[str, Any],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None = None,
               parameters: Iterable[nn.Parameter] = (), autocast: tuple[str, torch.dtype, bool] = ("cpu", torch.bfloat16,
                                                                                          False),
               step: int = 0) -> dict[str, torch.Tensor]:
    """One optimisation step, as :func:`fit` takes it (and :func:`diffreg.speed.measure_speed` times it).

    ``loss_fn(batch)`` under ``torch.autocast(*autocast)``, a check that ``"total"`` is finite, backward through the
    (possibly scaled) loss, gradient-norm clipping of ``parameters`` to ``grad_clip`` (when set), the optimizer and
    scaler steps.

    Args:
        loss_fn: ``model.loss`` (or a module whose forward is it); returns a dict with ``"total"``.
        batch: the batch, already on the device.
        optimizer, scaler: the optimizer and the gradient scaler (disabled unless float16 autocast).
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        parameters: what is clipped.
        autocast: ``(device_type, dtype, enabled)``.
        step: the step number, for the error message.

    Returns:
        The loss terms of the step.

    Raises:
        FloatingPointError: the loss is NaN or Inf.
    """
    device_type, dtype, enabled = autocast
    with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):
        terms = loss_fn(batch)
    loss = terms["total"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(parameters), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return terms


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def fit(
    model: nn.Module,
    data: Dataset,
    config: MethodConfig | TrainConfig,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    validation: Dataset | None = None,
    val_every: int | None = None,
    val_pairs: int = 4,
    val_options: dict[str, Any] | None = None,
    max_seconds: float | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data`` and return the log rows (``step``, ``lr``, ``seconds`` and every loss term).

    Args:
        model: a registration model (``model.loss(batch)`` returns a dict with ``"total"``).
        data: a map-style dataset of dict items (e.g. :class:`diffreg.data.PhantomPairs`).
        config: a :class:`~diffreg.config.MethodConfig` (stored in the run) or just a :class:`TrainConfig`.
        out: run directory for ``config.json``, ``log.csv`` and ``checkpoint.pt`` (``None``: keep nothing).
        device: where to train; default :func:`default_device` (the GPU when CUDA is available, ``cuda:LOCAL_RANK``
            under torchrun; else the CPU). ``"cpu"`` forces the CPU.
        resume: continue from ``out/checkpoint.pt`` when it exists (it must be a run of the same method, profile,
            model and data settings).
        progress: show a tqdm bar (rank 0 only).
        max_steps: stop after this global step (the schedule still assumes the configured total; used to
            interrupt a run, e.g. to test resuming).
        validation: held-out pairs for a learning curve: every ``val_every`` steps (and at the last step) the
            first ``val_pairs`` of them are registered (no gradients, :func:`diffreg.evaluate.evaluate` with
            ``val_options`` as sampler options) and the row of that step gets ``val_dice`` (the dataset's aggregate
            Dice) and ``val_folding_percent``; the other rows carry NaN there. The validation does not touch the
            training's random streams (a run with and without it trains identically) and its time is not counted
            in ``seconds``. Explained in chapter 10.
        val_every: steps between validations (default ``log_every``); must be a multiple of ``log_every``.
        val_pairs: number of validation pairs (a fixed subset: the first ones).
        val_options: ``register`` options of the validation (e.g. ``{"steps": 20}`` for DiffuseReg).
        max_seconds: stop once this many seconds of training (``seconds``, validation excluded) have passed;
            the step reached is checkpointed and logged (a wall-clock budget, see :func:`diffreg.bench.run_bench`).

    Returns:
        The log rows written during this call (every ``log_every`` steps and the last step).

    Raises:
        ValueError: bad training settings, ``out`` is an existing file, or ``out`` holds a run of another method,
            profile, model or data (start fresh with ``resume=False`` in a new folder).
        FloatingPointError: the loss became NaN or Inf.
    """
    from tqdm.auto import tqdm

    tcfg = config.train if isinstance(config, MethodConfig) else config
    _check_train_config(tcfg)
    val_every = _check_fit_options(tcfg, validation, val_every, val_pairs, max_seconds)
    rank, _, world = distributed_info()
    distributed = world > 1
    device = _training_device(device)
    cpu_conv3d_fast_path(model.to(device))
    total = total_steps(tcfg, len(data), world)
    stop = min(total, max_steps) if max_steps is not None else total

    out_dir = Path(out) if out is not None else None
    cfg_dict = config.to_dict() if isinstance(config, MethodConfig) else {"train": vars(tcfg)}
    # before any work (a model's stages may take hours): refuse a file, or a run of another configuration
    ckpt = _resumable_checkpoint(out_dir, cfg_dict) if out_dir is not None and resume else None
    if out_dir is not None:
        check_run_dir(out_dir)
    seed_everything(tcfg.seed + rank)
    _before_main_loop(model, data, out_dir, device, resume, progress and rank == 0, tcfg.seed)

    optimizer = make_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tcfg, total))
    use_amp = bool(tcfg.amp) and device.type == "cuda"
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[tcfg.amp_dtype]
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start, resumed_rng, resumed_log = 0, None, {}
    if ckpt is not None:
        start, resumed_rng, resumed_log = _restore(ckpt, out_dir, model, optimizer, scheduler, scaler, rank)
    if out_dir is not None and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG).write_text(json.dumps(cfg_dict, indent=2, default=list))

    train_module: nn.Module = _LossModule(model)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_module = nn.parallel.DistributedDataParallel(train_module, device_ids=ids)
    batches = _batches(data, tcfg, start, stop, device, resumed_rng)

    rows: list[dict[str, float]] = []
    log = _LogFile(out_dir / LOG, start) if out_dir is not None and rank == 0 else None
    precision = f"{tcfg.amp_dtype} autocast" if use_amp else "float32"
    bar = tqdm(total=total, initial=start, disable=not progress or rank != 0, position=_BAR_LINE,
               desc=f"{type(model).__name__} on {device}, {precision}",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    model.train()
    t0 = time.perf_counter() - float(resumed_log.get("seconds", 0.0))
    step = start
    # running sums of the loss terms since the last log row (kept in checkpoints, so resumed logs are identical)
    running: dict[str, float] = dict(resumed_log.get("running", {}))
    n_running = int(resumed_log.get("n_running", 0))
    try:
        for batch in batches:
            terms = train_step(train_module, _to_device(batch, device), optimizer, scaler, tcfg.grad_clip,
                               model.parameters(), (device.type, amp_dtype, use_amp), step)
            scheduler.step()
            step += 1
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            n_running += 1
            bar.update(1)
            out_of_time = max_seconds is not None and _agree(time.perf_counter() - t0 >= max_seconds, device,
                                                                distributed)
            if step % tcfg.log_every == 0 or step == total or out_of_time:
                row = _log_row(step, optimizer, time.perf_counter() - t0, running, n_running, device)
                if validation is not None:   # its time is not training time
                    due = rank == 0 and (step % val_every == 0 or step == total or out_of_time)
                    t0 += _validation_columns(row, due, model, validation, val_pairs, val_options, device)
                running, n_running = {}, 0
                rows.append(row)
                bar.set_postfix(loss=f"{row['total']:.4f}")
                if log is not None:
                    log.write(row)
            if out_dir is not None and (step % tcfg.checkpoint_every == 0 or step == stop or out_of_time):
                log_state = {"running": dict(running), "n_running": n_running, "seconds": time.perf_counter() - t0}
                _checkpoint(out_dir, model, optimizer, scheduler, scaler, step, cfg_dict, distributed, rank, world,
                            log_state)
            if out_of_time:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    model.eval()
    return rows


def _batches(data: Dataset, tcfg: TrainConfig, start: int, stop: int, device: torch.device,
             resumed_rng: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """The batches of steps ``start .. stop - 1`` of this process (:class:`StepSampler`), with a checkpoint's random
    state restored: starting the loader draws its base seed from the global generator, and the checkpoint's state
    was taken after that draw, so it is restored after it (or a resumed run would draw once more than the straight
    one)."""
    rank, _, world = distributed_info()
    sampler = StepSampler(len(data), tcfg.batch_size, tcfg.seed, start, stop, rank, world)
    batches = iter(DataLoader(data, batch_sampler=sampler, num_workers=0, pin_memory=device.type == "cuda"))
    if resumed_rng is not None:
        _set_rng_state(resumed_rng)
    return batches


def _validation_columns(row: dict[str, float], due: bool, model: nn.Module, validation: Dataset, pairs: int,
                        options: dict[str, Any] | None, device: torch.device) -> float:
    """Add ``val_dice`` and ``val_folding_percent`` to ``row`` (NaN unless ``due``); returns the seconds spent."""
    row["val_dice"] = row["val_folding_percent"] = math.nan
    if not due:
        return 0.0
    v0 = time.perf_counter()
    row.update(_validate(model, validation, pairs, options, device))
    model.train()
    return time.perf_counter() - v0


def _resumable_checkpoint(out_dir: Path, cfg_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint of ``out_dir`` (loaded on the CPU: random states must be CPU byte tensors; the optimizer moves
    its state to the parameters), refused when it is a run of another configuration; ``None`` without one."""
    if not (out_dir / CHECKPOINT).is_file():
        return None
    ckpt = load_checkpoint(out_dir / CHECKPOINT, map_location="cpu")
    _check_same_run(out_dir, ckpt, cfg_dict)
    return ckpt


def _before_main_loop(model: nn.Module, data: Dataset, out_dir: Path | None, device: torch.device, resume: bool,
                      progress: bool, seed: int) -> None:
    """The model's stages (:func:`train_stages`: each a run of its own in a sub-folder of ``out_dir``, so a resumed
    run restores them instead of training them again), then its ``prepare`` (work that trains nothing)."""
    train_stages(model, data, out=out_dir, device=device, resume=resume, progress=progress, seed=seed)
    prepare = getattr(model, "prepare", None)
    if callable(prepare):
        import inspect

        takes_seed = "seed" in inspect.signature(prepare).parameters   # a user's model may predate the argument
        prepare(data, out=out_dir, device=device, progress=progress, **({"seed": seed} if takes_seed else {}))


def _log_row(step: int, optimizer, seconds: float, running: dict[str, float], n_running: int,
             device: torch.device) -> dict[str, float]:
    """A row of ``log.csv``: step, learning rate, training seconds, the mean of each loss term since the last row
    (and the peak GPU memory on CUDA)."""
    row = {"step": step, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
    row.update({k: v / n_running for k, v in running.items()})
    if device.type == "cuda":
        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _training_device(device: str | torch.device | None) -> torch.device:
    """The device of this process (under torchrun: the local rank's GPU), with the process group initialised."""
    _, local_rank, world = distributed_info()
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL initialisation, so each process talks from its own GPU
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def _check_fit_options(tcfg: TrainConfig, validation: Dataset | None, val_every: int | None, val_pairs: int,
                       max_seconds: float | None) -> int | None:
    """Raise ``ValueError`` for validation or time-budget options :func:`fit` cannot use; returns ``val_every``
    (default ``log_every`` when there is a validation)."""
    if validation is not None:
        val_every = int(val_every or tcfg.log_every)
        if val_every < 1 or val_every % tcfg.log_every:
            raise ValueError(f"val_every must be a positive multiple of log_every={tcfg.log_every}, got {val_every}")
        if int(val_pairs) < 1 or len(validation) == 0:
            raise ValueError(f"validation needs at least one pair (val_pairs={val_pairs}, {len(validation)} given)")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    return val_every


def _restore(ckpt: dict[str, Any], out_dir: Path, model: nn.Module, optimizer, scheduler, scaler,
             rank: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Load a checkpoint's weights, optimizer, scheduler and scaler; returns ``(step, random state of this process,
    log state)``. The random state is restored by the caller once the data loader has drawn its seed."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # e.g. fit() given a bare TrainConfig: no stored configuration to compare
        raise ValueError(f"{out_dir} holds a {_describe(ckpt.get('config') or {})} run whose weights do not "
                         f"fit this {type(model).__name__}: start fresh in a new folder (--out NEW_FOLDER "
                         f"--no-resume, or fit(..., out=NEW_FOLDER, resume=False)) ({exc})") from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if isinstance(rng, list):  # one state per DDP process
        rng = rng[rank] if rank < len(rng) else rng[0]
    return int(ckpt["step"]), rng, ckpt.get("log_state", {})


class _LogFile:
    """``log.csv`` of a run: the rows up to the checkpoint's step are kept (a crash may have logged more), then
    each new row is written and flushed; the columns are the kept rows', then any new ones (e.g. validation)."""

    def __init__(self, path: Path, start: int) -> None:
        self.kept: list[dict[str, str]] = []
        if start > 0 and path.exists():
            with open(path, newline="") as fh:
                self.kept = [r for r in csv.DictReader(fh) if float(r["step"]) <= start]
        self.file = open(path, "w", newline="")
        self.writer: csv.DictWriter | None = None

    def _start(self, fields: list[str]) -> None:
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        self.writer.writeheader()
        self.writer.writerows(self.kept)

    def write(self, row: dict[str, float]) -> None:
        if self.writer is None:
            fields = list(self.kept[0]) if self.kept else []
            self._start(fields + [k for k in row if k not in fields])
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.writer is None and self.kept:  # resumed at the end: no new row, keep the old ones
            self._start(list(self.kept[0]))
        self.file.close()


def _agree(flag: bool, device: torch.device, distributed: bool) -> bool:
    """``flag`` of any process (all processes stop at the same step under DDP)."""
    if not distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _validate(model: nn.Module, validation: Dataset, pairs: int, options: dict[str, Any] | None,
              device: torch.device) -> dict[str, float]:
    """``val_dice`` and ``val_folding_percent`` (means over the first ``pairs`` of ``validation``), leaving the
    random streams of the training as they were."""
    from diffreg.evaluate import evaluate

    state = _rng_state()
    try:
        with torch.no_grad():
            table = evaluate(model, validation, device=device, limit=int(pairs), **(options or {}))
    finally:
        _set_rng_state(state)
    return {"val_dice": table.mean("dice"), "val_folding_percent": table.mean("folding_percent")}


def _checkpoint(out_dir: Path, model: nn.Module, optimizer, scheduler, scaler, step: int, cfg_dict: dict[str, Any],
                distributed: bool, rank: int, world: int, log_state: dict[str, Any]) -> None:
    rng = _rng_state()
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rng)
        rng_all: Any = gathered
    else:
        rng_all = rng
    if rank == 0:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rng_all,
            "step": step,
            "log_state": log_state,
            "config": cfg_dict,
        }
        save_checkpoint(out_dir / CHECKPOINT, payload)
    if distributed:
        dist.barrier()


def train_or_reuse(config: MethodConfig, data: Dataset, out: str | Path, spec: str | None = None,
                   device: str | torch.device | None = None, progress: bool = False,
                   **fit_options: Any) -> tuple[nn.Module, str]:
    """The model of ``config`` trained in ``out``: the finished run there reused as it is, a partial run resumed,
    or a new run trained (the model initialised after ``seed_everything(config.train.seed)``).

    This is what the command line, the benchmark and the chapters do when they need a trained model: one rule, so a
    chapter re-run after a finished run costs a load, not a training.

    Args:
        config: the method configuration (its ``train`` section is the budget: :meth:`MethodConfig.set_budget`).
        data: the training pairs (its length decides when an epoch-based run is finished).
        out: the run directory.
        spec: the data string the pairs came from; recorded in ``data.json``, and a run trained on another one is
            refused.
        device: where to train or load (default :func:`diffreg.device.default_device`).
        progress: show progress bars.
        **fit_options: passed to :func:`fit` (``validation``, ``val_every``, ``max_seconds``, ...).

    Returns:
        ``(model, status)`` with the model in eval mode and ``status`` one of ``"reused"``, ``"resumed"``,
        ``"trained"``.

    Raises:
        ValueError: ``out`` holds a run of another configuration or data.
    """
    from diffreg.models import build

    run = RunFolder(Path(out))
    run.check(config, spec)
    step = run.step()
    if step and step >= total_steps(config.train, len(data)):
        return load_run(run.path, device=device)[0], "reused"
    seed_everything(config.train.seed)
    model = build(config)
    fit(model, data, config, out=run.path, device=device, progress=progress, **fit_options)
    if spec is not None:
        run.write_data_spec(spec, config.method)
    return model.eval(), "resumed" if step else "trained"


#: the terminal line of this process's progress bars: 0, or in a worker of :func:`map_in_workers` its own line, so
#: that workers side by side do not draw over each other
_BAR_LINE = 0


def _worker_start(lines: Any) -> None:
    """Initialiser of a :func:`map_in_workers` worker: one thread, and a progress-bar line of its own."""
    global _BAR_LINE
    torch.set_num_threads(1)
    _BAR_LINE = lines.get()


def map_in_workers(function: Callable[..., Any], jobs: Iterable[dict[str, Any]], processes: int = 2) -> list[Any]:
    """``[function(**job) for job in jobs]``, computed in ``processes`` worker processes (``spawn``), one thread each.

    The book's small models train fastest on one thread (:func:`diffreg.book.chapter_setup`), so a 2-core CPU trains
    two of them side by side in about the time of one. A run trained on one thread gives the same weights in a
    worker as in this process (a test), so only the wall time changes. ``function`` must be importable by name
    (defined at the top level of a module) and its arguments and result picklable; a script that calls this needs
    the ``if __name__ == "__main__":`` guard that ``spawn`` asks for. The first error of a job (or an interrupt)
    cancels the jobs not started, stops the workers and is raised here. Each worker draws the progress bars of
    :func:`fit` on a terminal line of its own. Under ``torchrun`` (``WORLD_SIZE > 1``) it
    raises ``RuntimeError``: the workers would inherit the rank and join the process group as this process.
    """
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    if distributed_info()[2] > 1:
        raise RuntimeError("map_in_workers cannot run under torchrun (WORLD_SIZE > 1): the worker processes would "
                           "inherit this process's rank; train with torchrun's processes instead")
    jobs = list(jobs)
    context, workers = multiprocessing.get_context("spawn"), max(1, min(processes, len(jobs)))
    lines = context.Queue()
    for line in range(workers):
        lines.put(line)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_start, initargs=(lines,))
    try:
        futures = [pool.submit(function, **job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in done if not f.cancelled() and f.exception() is not None]
        if failed:
            raise failed[0]
        results = [f.result() for f in futures]
    except BaseException:
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        raise
    pool.shutdown()
    return results


def _train_status(**job: Any) -> str:
    """The status of one :func:`train_or_reuse` (the model stays in the worker)."""
    return train_or_reuse(**job)[1]


def train_or_reuse_many(jobs: Iterable[dict[str, Any]], processes: int = 2) -> list[tuple[nn.Module, str]]:
    """:func:`train_or_reuse` for several runs, side by side in ``processes`` worker processes on the CPU.

    Each job is the keyword arguments of one :func:`train_or_reuse` call (``config``, ``data``, ``out``, ``spec``,
    ``device``, ...). On the CPU the runs are trained by :func:`map_in_workers` (one thread each, ``processes`` at a
    time; chapter 12 trains its three models this way on a 2-core machine) and the finished runs are then loaded
    here. With ``processes <= 1``, one job, a job on another device, or under ``torchrun`` (its processes already
    share the training), the jobs run one after the other in this process.

    Returns:
        ``[(model, status), ...]`` in the order of ``jobs``; ``status`` as :func:`train_or_reuse` (of the worker).
    """
    jobs = list(jobs)
    on_cpu = all(resolve_device(j.get("device")).type == "cpu" for j in jobs)
    if processes <= 1 or len(jobs) <= 1 or not on_cpu or distributed_info()[2] > 1:
        return [train_or_reuse(**j) for j in jobs]
    statuses = map_in_workers(_train_status, jobs, processes)
    return [(train_or_reuse(**j)[0], status) for j, status in zip(jobs, statuses)]
