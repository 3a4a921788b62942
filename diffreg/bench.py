"""The benchmark: every registration method of the book, and ANTs SyN, on the same held-out pairs.

Explained in chapter 10 (``notebooks/10_benchmark.md``).

:func:`run_bench` (and ``python -m diffreg bench``) does, for each method:

1. **a trained model**: the run directory ``RUNS/<method>`` is reused when it holds a finished run
   (:func:`diffreg.train.load_run`); otherwise the method is trained there by :func:`diffreg.train.fit` at the
   profile's budget (``steps`` overrides it, as ``python -m diffreg train --steps`` does; an interrupted run is
   resumed). ANTs SyN (``"syn"``, :class:`diffreg.models.classical.ANTsSyN`) has nothing to train: it optimises
   every pair;
2. **the same held-out pairs** for every method: one dataset (``split``, default ``"test"``, and ``limit``) opened
   once at the benchmark's data configuration, that of ``voxelmorph`` at the profile and ``dims`` (size, phantom
   kind and number of phantom subjects). Every method is trained on the ``"train"`` split of the same data at that
   size. A method whose profile scales images to another range (LDM-Morph: [0, 1]) sees the same pairs mapped
   linearly to its range (:class:`IntensityView`); labels, true motion and fields are unchanged;
3. :func:`diffreg.evaluate.evaluate` (per-case Dice, Jacobian statistics, HD95, EPE on phantoms, seconds per pair).

``"all"`` is every method of :func:`diffreg.config.methods` but the deformation generators (DRDM, which generates
deformations and does not register pairs: :func:`diffreg.models.is_generator`; chapters 08-09), plus ``"syn"``
when ``antspyx`` is installed. Outputs in ``out``: ``results.csv`` (one row per method and pair, ``method``
first), ``summary.md`` (mean ± std per column, paired Wilcoxon signed-rank p-values of the per-case Dice against
VoxelMorph from :func:`diffreg.evaluate.compare`, and per method the training budget, the inference options,
device and date), ``boxplot_dice.png`` and ``qualitative.png`` (:func:`make_figures`), ``examples.pt`` (the fields
of the qualitative pair, to redraw it with :func:`load_results`).

Example (a notebook; the command line is ``python -m diffreg bench --methods all --profile quick --data phantom
--runs runs --out bench``)::

    from diffreg.bench import run_bench, make_figures
    res = run_bench(["voxelmorph", "syn"], profile="quick", data="phantom", runs="runs", out="bench", limit=4)
    res["summary"]                       # a Table: renders as Markdown in a notebook
    figs = make_figures(res["tables"], res["examples"])
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from diffreg.config import DataConfig, MethodConfig, get_config, methods
from diffreg.evaluate import Table, compare, evaluate, read_csv

__all__ = ["run_bench", "run_bench_seeds", "seed_summary", "SEED_COLUMNS", "make_figures", "load_results", "bench_methods", "parse_options", "parse_budget", "bench_data",
           "learning_curves", "curves_figure",
           "IntensityView", "SUMMARY_COLUMNS", "SKIPPED", "CLASSICAL", "REFERENCE"]

#: the method every other is tested against (paired Wilcoxon signed-rank test of the per-case Dice)
REFERENCE = "voxelmorph"


def _skipped() -> dict[str, str]:
    """The deformation generators of :func:`diffreg.config.methods` (:func:`diffreg.models.is_generator`), each with
    the reason it is left out of the benchmark."""
    from diffreg.models import MODELS, is_generator

    return {m: f"{MODELS[m].refusal()} (a deformation generator, not a registration model); {MODELS[m].downstream}"
            for m in methods() if is_generator(m)}


#: methods of :func:`diffreg.config.methods` left out of the benchmark (the deformation generators), with the reason
#: written to ``summary.md``
SKIPPED: dict[str, str] = _skipped()
#: methods with nothing to train, optimised per pair
CLASSICAL: dict[str, str] = {"syn": "ANTs SyN (antspyx), diffreg.models.classical.ANTsSyN"}
#: summary columns in order (the per-structure Dice columns present in the tables are inserted after ``dice``)
SUMMARY_COLUMNS = ("dice_initial", "dice", "folding_percent", "jacobian_std", "sdlogj", "hd95", "epe_initial", "epe",
                   "ef_error", "seconds", "spread_mean", "spearman_spread_error")  # the last two: options samples=N (chapter 11)
#: the order of "all": the reference, its diffeomorphic variant, then the book's chapters (others after, sorted)
_ORDER = (REFERENCE, "voxelmorph-diff", "diffusemorph", "fsdiffreg", "diffusereg", "ldm-morph", "corrmlp", "flowreg")
#: methods beyond the book's five papers and their VoxelMorph baselines (left out of ``"papers"``)
BEYOND_PAPERS = ("corrmlp", "flowreg")
_AGGREGATE = {
    "acdc": "dice = flat mean of the LV, Myo, LV+Myo, RV and whole-heart Dice per pair (DiffuseMorph / FSDiffReg / "
            "DiffuseReg)",
    "camus": "dice = LV Dice (LDM-Morph on CAMUS)",
}


# ----------------------------------------------------------------------------------------------------------------
# methods, options, data
# ----------------------------------------------------------------------------------------------------------------


def bench_methods(names: str | Sequence[str] = "all") -> tuple[list[str], dict[str, str]]:
    """Expand a method selection into ``(methods to run, {skipped method: reason})``.

    ``"all"`` (alone or in a list) is every method of :func:`diffreg.config.methods` but those in :data:`SKIPPED`,
    plus ``"syn"`` when ``antspyx`` can be imported (otherwise ``"syn"`` is reported as skipped), in the order
    VoxelMorph (the reference), VoxelMorph-diff, the chapters' methods, SyN; ``"papers"`` is the same without the
    methods beyond the five papers (:data:`BEYOND_PAPERS`: CorrMLP, FlowReg), chapter 10's selection; explicitly
    named methods keep their order. A named method of :data:`SKIPPED` is skipped with its reason.

    Raises:
        ValueError: an unknown name or an empty selection.
    """
    from diffreg.models.classical import ants_available

    names = [names] if isinstance(names, str) else list(names)
    known = set(methods()) | set(CLASSICAL)
    unknown = [n for n in names if n not in ("all", "papers") and n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: all, papers, {', '.join(sorted(known))}")
    if not names:
        raise ValueError("no method selected")
    skipped: dict[str, str] = {}
    out: list[str] = []
    for n in names:
        if n in ("all", "papers"):
            trained = [m for m in methods() if m not in SKIPPED and (n == "all" or m not in BEYOND_PAPERS)]
            trained.sort(key=lambda m: (_ORDER.index(m) if m in _ORDER else len(_ORDER), m))
            skipped.update({m: r for m, r in SKIPPED.items() if m in methods()})
            expanded = trained + list(CLASSICAL)
            if not ants_available():
                expanded.remove("syn")
                skipped["syn"] = "antspyx is not installed (pip install -r requirements.txt installs it)"
        elif n in SKIPPED:
            skipped[n] = SKIPPED[n]
            expanded = []
        else:
            expanded = [n]
        out += [m for m in expanded if m not in out]
    return out, skipped


def parse_options(pairs: Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """``["diffusereg:steps=50", "syn:reg_iterations=(40, 20, 10)"]`` -> ``{"diffusereg": {"steps": 50}, "syn":
    {"reg_iterations": (40, 20, 10)}}`` (values as Python literals where they parse, strings otherwise).

    Raises:
        ValueError: an entry not of the form ``METHOD:KEY=VALUE``.
    """
    import ast

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        method, colon, rest = pair.partition(":")
        key, eq, value = rest.partition("=")
        if not colon or not eq or not method.strip() or not key.strip():
            raise ValueError(f"--option must be METHOD:KEY=VALUE (e.g. diffusereg:steps=50), got {pair!r}")
        try:
            parsed: Any = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method.strip(), {})[key.strip()] = parsed
    return out


def bench_data(profile: str = "quick", dims: int | None = None, size: Sequence[int] | None = None,
               direction: str | None = None, view: str | None = None, split_scheme: str | None = None) -> DataConfig:
    """The benchmark's data configuration: :data:`REFERENCE`'s at ``profile`` and ``dims``, ``size`` overriding
    its spatial size (array order), ``direction``, ``view`` (CAMUS) and ``split_scheme`` (ACDC) its data protocol
    (``None``: the reference's).

    Raises:
        ValueError: ``size`` without ``dims`` entries.
    """
    cfg = get_config(REFERENCE, profile, dims).data
    if direction is not None:
        cfg.direction = direction
    if view is not None:
        cfg.view = view
    if split_scheme is not None:
        cfg.split_scheme = split_scheme
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(size) != cfg.dims:
            raise ValueError(f"size {size} does not have {cfg.dims} entries (dims={cfg.dims})")
        cfg.size = size
    return cfg


def _open(spec: str, split: str, data: DataConfig, profile: str,
          intensity: tuple[float, float] | None = None) -> Dataset:
    """A pair dataset from a ``DIFFREG_DATA`` string at the benchmark's data configuration."""
    from diffreg.data import open_configured

    kwargs = {} if intensity is None else {"intensity": tuple(intensity)}
    return open_configured(spec, split, data, profile, **kwargs)


class IntensityView(Dataset):
    """The items of a pair dataset with ``moving`` and ``fixed`` mapped linearly from its ``intensity`` range to
    another; every other key (labels, ``true_ddf``, ``case``, ``spacing``) and attribute is the dataset's own.

    Args:
        base: a pair dataset with an ``intensity`` attribute ``(lo, hi)``.
        intensity: the target range ``(lo, hi)``.
    """

    def __init__(self, base: Dataset, intensity: tuple[float, float]) -> None:
        self.base = base
        self.intensity = (float(intensity[0]), float(intensity[1]))
        lo, hi = base.intensity
        self._scale = (self.intensity[1] - self.intensity[0]) / (hi - lo)
        self._shift = self.intensity[0] - lo * self._scale

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        for k in ("moving", "fixed"):
            item[k] = item[k] * self._scale + self._shift
        return item

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)


class _Recorder(nn.Module):
    """Wraps a model for :func:`evaluate`: records the scalar ``extras`` of its first registration (sampler,
    steps, ...) and the field of one given pair, without an extra registration."""

    def __init__(self, model: nn.Module, example: dict[str, torch.Tensor] | None) -> None:
        super().__init__()
        self.model = model
        self.example = example
        self.extras: dict[str, Any] | None = None
        self.example_ddf: torch.Tensor | None = None

    def register(self, moving: torch.Tensor, fixed: torch.Tensor, **options: Any):
        result = self.model.register(moving, fixed, **options)
        if self.extras is None:
            self.extras = {k: v for k, v in result.extras.items() if isinstance(v, (str, int, float, bool))}
        ex = self.example
        if (ex is not None and self.example_ddf is None and moving.shape == ex["moving"].shape
                and torch.equal(moving.detach().cpu(), ex["moving"])
                and torch.equal(fixed.detach().cpu(), ex["fixed"])):
            self.example_ddf = result.ddf.detach().float().cpu()
        return result


# ----------------------------------------------------------------------------------------------------------------
# models: reuse, train, or build the classical one
# ----------------------------------------------------------------------------------------------------------------


def _stage_budget(cfg: MethodConfig) -> str:
    """Budgets of the stages trained before the main loop (DiffuseReg's teacher, LDM-Morph's stage 1), as the
    model class declares them (:func:`diffreg.train.stage_budgets`)."""
    from diffreg.train import stage_budgets

    parts = [b.describe(cfg.model) for b in stage_budgets(cfg) if b.steps_key in cfg.model]
    return f"; before it: {', '.join(parts)}" if parts else ""


def _trained_model(name: str, profile: str, data: DataConfig, spec: str, run_dir: Path, steps: int | None,
                   device: str | torch.device | None, progress: bool, amp: bool = False,
                   stage_steps: int | None = None, max_seconds: float | None = None,
                   curve: dict[str, Any] | None = None, seed: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Reuse the finished run in ``run_dir`` or train ``name`` there; returns the model and what was done.

    ``seed`` (default: the profile's, 0) seeds the initialisation, the data order and the training noise, and the
    stages trained before the main loop where a model has a seed of its own for them (LDM-Morph's ``stage1_seed``).

    ``max_seconds`` caps the training time (a wall-clock budget); ``curve`` (``{"every": steps, "pairs": n,
    "options": register options}``) logs a validation Dice every ``every`` steps on the ``"val"`` split."""
    from diffreg.runs import RunFolder, load_run
    from diffreg.train import set_stage_steps, train_or_reuse

    cfg = get_config(name, profile, data.dims)
    paper_direction = cfg.data.direction
    cfg.data.direction, cfg.data.view, cfg.data.split_scheme = data.direction, data.view, data.split_scheme
    if stage_steps is not None:
        set_stage_steps(cfg, stage_steps)
    profile_size = tuple(cfg.data.size) if tuple(cfg.data.size) != tuple(data.size) else None
    cfg.set_budget(steps=steps, size=data.size, amp=amp, seed=seed)
    cfg.data.phantom, cfg.data.n_subjects = data.phantom, data.n_subjects
    info: dict[str, Any] = {"run": str(run_dir), "profile": profile, "seed": cfg.train.seed}
    notes: list[str] = []
    if profile_size is not None:
        notes.append(f"trained at the benchmark size {tuple(data.size)} (profile size {profile_size})")
    if paper_direction is not None and paper_direction != data.direction:
        notes.append(f"trained and evaluated in the benchmark's direction (the profile's is {paper_direction})")
    if amp:
        notes.append(f"mixed precision ({cfg.train.amp_dtype} autocast on CUDA)")

    run = RunFolder(run_dir)
    stored_cfg = run.config() if run.has_checkpoint() else None
    if stored_cfg is not None:
        if stored_cfg.method != name:
            raise ValueError(f"{run_dir} holds a {stored_cfg.method!r} run, not {name!r}; use another --runs folder")
        if stored_cfg.data.dims != data.dims or tuple(stored_cfg.data.size) != tuple(data.size):
            raise ValueError(f"{run_dir} was trained on {stored_cfg.data.dims}D images of size "
                             f"{tuple(stored_cfg.data.size)}, the benchmark uses {data.dims}D {tuple(data.size)}; "
                             "use another --runs folder")
        step = run.step()
        if _finished(run, stored_cfg, spec, data, profile):
            # finished (at whatever budget it was trained): reuse it as it is
            model, cfg = load_run(run_dir, device=device)
            info.update(status="reused", config=cfg, steps=step, seconds=run.seconds())
            info["notes"] = notes + _reuse_notes(run, cfg, spec, profile, seed, steps, step, curve)
            return model, info
    train_data = _open(spec, "train", data, profile, cfg.data.intensity)
    validation = None
    if curve is not None:
        validation = _open(spec, "val", data, profile, cfg.data.intensity)
        cfg.train.log_every = int(curve["every"])
    model, status = train_or_reuse(
        cfg, train_data, run_dir, spec=spec, device=device, progress=progress, resume=True, validation=validation,
        val_every=None if curve is None else int(curve["every"]),
        val_pairs=4 if curve is None else int(curve["pairs"]),
        val_options=None if curve is None else curve.get("options"), max_seconds=max_seconds)
    info.update(status="resumed" if stored_cfg is not None else "trained", config=cfg, steps=run.step(),
                seconds=run.seconds(), notes=notes)
    return model.eval(), info


def _finished(run: Any, cfg: MethodConfig, spec: str, data: DataConfig, profile: str) -> bool:
    """Whether the run of ``run`` (a :class:`~diffreg.runs.RunFolder` of config ``cfg``) has trained all its steps."""
    from diffreg.train import total_steps

    pairs = len(_open(spec, "train", data, profile, cfg.data.intensity)) if cfg.train.epochs else 0
    return run.step() >= total_steps(cfg.train, pairs)


def _trained_info(**kwargs: Any) -> dict[str, Any]:
    """What :func:`_trained_model` did, with its ``train_wall_seconds`` (the model stays in the worker process that
    trained it)."""
    t0 = time.perf_counter()
    info = _trained_model(**kwargs)[1]
    return {**info, "train_wall_seconds": time.perf_counter() - t0}


def _reuse_notes(run: Any, cfg: MethodConfig, spec: str, profile: str, seed: int | None, steps: int | None,
                 step: int, curve: dict[str, Any] | None) -> list[str]:
    """What differs between a reused finished run and what the benchmark asked for."""
    notes = []
    src = run.data_spec()
    if src is not None and src != spec:
        notes.append(f"the reused run was trained on {src!r}")
    if cfg.profile != profile:
        notes.append(f"the reused run is a {cfg.profile!r} run")
    if seed is not None and cfg.train.seed != int(seed):
        notes.append(f"the reused run was trained with seed {cfg.train.seed} (seed {seed} asked)")
    if steps is not None and step != steps:
        notes.append(f"the reused run was trained for {step:,} steps ({steps:,} asked)")
    if curve is not None and not any(isinstance(r.get("val_dice"), float) and r["val_dice"] == r["val_dice"]
                                     for r in run.log()):
        notes.append("the reused run logged no learning curve (train it in a new --runs folder for one)")
    return notes


def parse_budget(text: str | None) -> tuple[str, float] | None:
    """``"steps=600"`` -> ``("steps", 600)``, ``"seconds=90"`` -> ``("seconds", 90.0)``; ``None`` -> ``None``.

    ``steps=N`` gives every trained method **N training pairs** (N steps at batch 1, ``ceil(N / batch)`` steps at a
    larger batch, so batch sizes are normalised); ``seconds=S`` gives every method S seconds of training on the
    same device. Stages trained before the main loop (DiffuseReg's teacher, LDM-Morph's autoencoder and latent
    U-Net) are not part of the budget; the summary reports them separately.

    Raises:
        ValueError: another form, or a non-positive value.
    """
    if text is None:
        return None
    kind, eq, value = str(text).partition("=")
    kind = kind.strip()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not eq or kind not in ("steps", "seconds") or not number > 0 or (kind == "steps" and number != int(number)):
        raise ValueError(f"--budget must be steps=N (training pairs per method, an integer) or seconds=S, got "
                         f"{text!r}")
    return kind, (int(number) if kind == "steps" else number)


def _pairs_seen(info: dict[str, Any]) -> int | None:
    cfg: MethodConfig | None = info.get("config")
    return None if cfg is None else int(info["steps"]) * int(cfg.train.batch_size)


def _budget(info: dict[str, Any]) -> str:
    cfg: MethodConfig | None = info.get("config")
    if cfg is None:
        return info.get("budget", "")
    b = cfg.train.batch_size
    text = f"{info['steps']:,} steps × batch {b} = {info['steps'] * b:,} pairs{_stage_budget(cfg)}"
    if info.get("seconds") is not None:
        text += f"; {info['seconds']:.0f} s"
    return f"{text} ({info['status']}, {cfg.profile} profile)"


# ----------------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------------


def _device_text(device: torch.device) -> str:
    from diffreg.speed import device_name

    return f"{device} ({device_name(device)})"


def _summary_columns(tables: Mapping[str, Table]) -> list[str]:
    cols: list[str] = []
    for t in tables.values():
        cols += [c for c in t.columns() if c not in cols]
    structures = [c for c in cols if c.startswith("dice_") and c != "dice_initial"]
    order = ["dice_initial", "dice", *structures, *SUMMARY_COLUMNS[2:]]
    return [c for c in order if c in cols]


def _options_text(name: str, model: nn.Module, options: dict[str, Any], extras: dict[str, Any] | None) -> str:
    if name in CLASSICAL:
        o = {**model.ants_options, **options}
        its = "x".join(str(i) for i in o["reg_iterations"])
        text = (f"{o['type_of_transform']}; {o['syn_metric']} radius {o['syn_sampling']}; {its} iterations; "
                f"SyN[{o['grad_step']}, {o['flow_sigma']}, {o['total_sigma']}]; seed {model.seed}; "
                f"{model.threads} thread(s)")
        shown = ("type_of_transform", "syn_metric", "syn_sampling", "reg_iterations", "grad_step", "flow_sigma",
                 "total_sigma")
        rest = {k: v for k, v in options.items() if k not in shown}
        return text + (f"; {rest}" if rest else "")
    shown = {**(extras or {}), **options}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) if shown else "one forward pass"


def _method_options(options: Mapping[str, Mapping[str, Any]] | Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """Per-method ``register`` options from a mapping or the command line's ``METHOD:KEY=VALUE`` strings."""
    if options is not None and not isinstance(options, Mapping):
        return parse_options(options)
    return {k: dict(v) for k, v in (options or {}).items()}


def _method_budget(name: str, profile: str, data_cfg: DataConfig, steps: int | Mapping[str, int] | None,
                   limits: tuple[str, float] | None, amp: bool, dev: torch.device, curve_every: int | None,
                   curve_pairs: int, options: dict[str, Any]) -> tuple[int | None, float | None, dict | None]:
    """``(steps, max_seconds, curve)`` of one learned method in :func:`run_bench`: ``steps=N`` pairs become
    ``ceil(N / batch)`` steps; ``seconds=S`` becomes a wall-clock cap and the steps one training step (timed here
    with :func:`diffreg.speed.measure_speed`) fits into it; the learning curve's step interval from its pairs."""
    n_steps = steps.get(name) if isinstance(steps, Mapping) else steps
    batch = get_config(name, profile, data_cfg.dims).train.batch_size
    max_seconds = None
    if limits is not None and limits[0] == "steps":
        n_steps = math.ceil(limits[1] / batch)
    elif limits is not None:
        from diffreg.speed import measure_speed

        timing = measure_speed(name, profile, data_cfg.dims, steps=3, amp=amp, device=dev, size=data_cfg.size,
                               inference=False)
        max_seconds = float(limits[1])
        n_steps = max(1, int(max_seconds / float(timing["train_s_per_step"])))
    curve = None
    if curve_every is not None:
        curve = {"every": max(1, math.ceil(int(curve_every) / batch)), "pairs": int(curve_pairs), "options": options}
    return n_steps, max_seconds, curve


def _bench_outputs(tables: dict[str, Table], info: dict[str, dict[str, Any]], skipped: dict[str, str],
                   examples: dict[str, Any], context: dict[str, Any], out: Path, names: list[str],
                   figures: bool) -> tuple[Table, Table, Table, dict[str, Path], dict[str, Any]]:
    """Write what :func:`run_bench` reports into ``out``: ``results.csv``, ``curves.csv`` (when learning curves
    were logged), ``examples.pt``, ``summary.md`` (against :data:`REFERENCE`, or the first method) and the figures;
    returns ``(results, summary, curves, paths, figures)``. ``context["reference"]`` is set here."""
    results = Table({"method": name, **row} for name, table in tables.items() for row in table)
    paths = {"results": results.to_csv(out / "results.csv")}
    curves = learning_curves({name: meta for name, meta in info.items() if meta.get("config") is not None})
    if len(curves):
        paths["curves"] = curves.to_csv(out / "curves.csv")
    reference = REFERENCE if REFERENCE in tables else names[0]
    context["reference"] = reference
    summary = compare(tables, reference=reference, columns=_summary_columns(tables))
    torch.save(examples, out / "examples.pt")
    paths["examples"] = out / "examples.pt"
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(_summary_markdown(summary, info, skipped, context))
    figs: dict[str, Any] = {}
    if figures:
        figs = make_figures(tables, examples, out=out)
        if len(curves):
            figs["learning_curves"] = curves_figure(curves)
            figs["learning_curves"].savefig(out / "learning_curves.png", dpi=110, bbox_inches="tight")
        paths.update({k: out / f"{k}.png" for k in figs})
    return results, summary, curves, paths, figs


def run_bench(methods: str | Sequence[str] = "all", profile: str = "quick", data: str = "phantom",
              runs: str | Path = "runs", out: str | Path = "bench", dims: int | None = None,
              limit: int | None = None, device: str | torch.device | None = None,
              options: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
              steps: int | Mapping[str, int] | None = None,
              size: Sequence[int] | None = None, split: str = "test", example: int = 0, figures: bool = True,
              progress: bool = False, run_dirs: Mapping[str, str | Path] | None = None,
              direction: str | None = None, view: str | None = None, split_scheme: str | None = None,
              amp: bool = False, stage_steps: int | None = None, budget: str | None = None,
              curve_every: int | None = None, curve_pairs: int = 4, seed: int | None = None,
              processes: int = 1) -> dict[str, Any]:
    """Train (or reuse) and evaluate every selected method on the same held-out pairs; write the results.

    Args:
        methods: ``"all"`` or method names (:func:`bench_methods`), e.g. ``["voxelmorph", "syn"]``.
        profile: ``"quick"`` or ``"paper"``.
        data: a ``DIFFREG_DATA`` string (``"phantom"``, ``"acdc:PATH"``, ...).
        runs: folder of the run directories, one per method (``runs/<method>``).
        out: folder for ``results.csv``, ``summary.md``, the figures and ``examples.pt`` (created).
        dims: 2 or 3 (default: the reference's at ``profile``: quick 2, paper 3).
        limit: evaluate only the first ``limit`` held-out pairs.
        device: training and evaluation device (default :func:`diffreg.device.default_device`: the GPU when CUDA is
            available, else the CPU). SyN always runs on the CPU.
        options: per-method ``register`` options, ``{"diffusereg": {"steps": 50}}`` or the command line's
            ``["diffusereg:steps=50"]``.
        steps: training steps of every trained method, or ``{method: steps}`` for some of them (default: the
            profile's budget).
        size: spatial size of the benchmark data (default: the reference's profile size).
        split: the held-out split (``"test"``; ``"val"`` to tune).
        example: index of the held-out pair shown in ``qualitative.png``.
        figures: write ``boxplot_dice.png`` and ``qualitative.png``.
        progress: progress bars for training and evaluation.
        run_dirs: method -> run directory used instead of ``runs/<method>`` (e.g. the runs of the book's chapters,
            reused when finished; trained there otherwise).
        direction: ``"es->ed"`` or ``"ed->es"`` for every method (default: the dataset's); the methods whose paper
            profile registers the other way get a note.
        view: CAMUS view (``"2CH"``, ``"4CH"``, ``"both"``; default ``"2CH"``).
        split_scheme: ACDC split, ``"diffreg"`` (default) or ``"official"`` (see :class:`diffreg.data.ACDCPairs`).
        amp: train with mixed precision on CUDA (default float32, as the papers).
        stage_steps: steps of the stages trained before the main loop (DiffuseReg's teacher, LDM-Morph's
            autoencoder and latent U-Net; default: the profile's).
        budget: an equal budget for every trained method (:func:`parse_budget`): ``"steps=N"`` (N training pairs
            each, batch sizes normalised) or ``"seconds=S"`` (S seconds of training each on ``device``; the step
            count is estimated from a 3-step timing by :func:`diffreg.speed.measure_speed` so that each method's
            learning-rate schedule completes, and the run is stopped at S seconds in any case). Overrides ``steps``.
        curve_every: log a learning curve: every ``curve_every`` training pairs (rounded to whole steps) the first
            ``curve_pairs`` pairs of the ``"val"`` split are registered (with the method's ``options``) and their
            Dice logged (:func:`diffreg.train.fit` ``validation``); written to ``curves.csv`` and
            ``learning_curves.png`` (:func:`learning_curves`, :func:`curves_figure`). Runs reused from an earlier
            call contribute the curve their ``log.csv`` holds, if any.
        curve_pairs: validation pairs of the learning curves.
        seed: training seed of every method (default: the profile's, 0); :func:`run_bench_seeds` repeats the
            benchmark over several seeds.
        processes: on the CPU, train the learned methods ``processes`` at a time in worker processes, one thread
            each (:func:`diffreg.train.map_in_workers`: the same weights as one after the other on one thread, in
            less wall time; chapter 10 uses 2; a script needs the ``if __name__ == "__main__":`` guard). Finished
            runs are loaded here, and with one run to train it is trained here, on this process's threads; the
            evaluation stays in this process. Ignored with a ``seconds=`` budget (runs side by side would share
            the CPU's time), on other devices and under ``torchrun``.

    Returns:
        dict with ``"tables"`` (method -> per-case :class:`~diffreg.evaluate.Table`), ``"results"`` (all rows, the
        ``results.csv`` table), ``"summary"`` (the summary :class:`~diffreg.evaluate.Table`), ``"methods"`` (method
        -> training budget, inference options, notes), ``"skipped"`` (method -> reason), ``"examples"`` (the
        qualitative pair and every method's field on it), ``"paths"`` (name -> written file), ``"figures"`` and
        ``"curves"`` (the ``curves.csv`` table; empty without learning curves).

    Raises:
        ValueError: unknown methods, options for methods not run, a run directory of another method or size.
        ImportError: ``"syn"`` named explicitly without ``antspyx``.
    """
    from diffreg.models.classical import ANTsSyN, ants_available

    names, skipped = bench_methods(methods)
    if not names:
        raise ValueError(f"nothing to run: every selected method is skipped ({skipped})")
    if any(n in CLASSICAL for n in names) and not ants_available():
        raise ImportError("the 'syn' baseline needs antspyx (pip install -r requirements.txt installs it)")
    opts = _method_options(options)
    stray = sorted(set(opts) - set(names))
    if stray:
        raise ValueError(f"--option given for {stray}, which are not benchmarked ({names})")
    limits = parse_budget(budget)
    if curve_every is not None and int(curve_every) < 1:
        raise ValueError(f"curve_every must be >= 1 training pair, got {curve_every}")
    data_cfg = bench_data(profile, dims, size, direction=direction, view=view, split_scheme=split_scheme)
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from diffreg.device import distributed_info, resolve_device

    dev = resolve_device(device)
    test = _open(data, split, data_cfg, profile)
    n = len(test) if limit is None else min(int(limit), len(test))
    if n == 0:
        raise ValueError(f"no {split!r} pairs in {data!r}")
    example = min(max(int(example), 0), n - 1)
    pair = test[example]
    started = time.time()

    def run_dir(name: str) -> Path:
        return Path(run_dirs[name]) if run_dirs and name in run_dirs else runs / name

    def training(name: str) -> dict[str, Any]:
        """The arguments of :func:`_trained_model` for ``name``."""
        n_steps, max_seconds, curve = _method_budget(name, profile, data_cfg, steps, limits, amp, dev, curve_every,
                                                     curve_pairs, opts.get(name, {}))
        return dict(name=name, profile=profile, data=data_cfg, spec=data, run_dir=run_dir(name), steps=n_steps,
                    device=device, progress=progress, amp=amp, stage_steps=stage_steps, max_seconds=max_seconds,
                    curve=curve, seed=seed)

    def unfinished(name: str) -> bool:
        from diffreg.runs import RunFolder

        run = RunFolder(run_dir(name))
        return not run.has_checkpoint() or not _finished(run, run.config(), data, data_cfg, profile)

    trained_apart: dict[str, dict[str, Any]] = {}   # method -> what a worker process did
    side_by_side = dev.type == "cpu" and distributed_info()[2] == 1 and (limits is None or limits[0] == "steps")
    if processes > 1 and side_by_side:
        to_train = [n for n in names if n not in CLASSICAL and unfinished(n)]   # finished runs are only loaded
        if len(to_train) > 1:
            from diffreg.train import map_in_workers

            trained_apart = dict(zip(to_train, map_in_workers(_trained_info, map(training, to_train), processes)))

    tables: dict[str, Table] = {}
    info: dict[str, dict[str, Any]] = {}
    fields: dict[str, torch.Tensor] = {}
    for name in names:
        t0 = time.perf_counter()
        if name in CLASSICAL:
            model: nn.Module = ANTsSyN(dims=data_cfg.dims)
            meta: dict[str, Any] = {"budget": "none: optimised per pair", "notes": [
                "voxel units (spacing 1) like the learned methods; CPU"]}
            eval_device, intensity = torch.device("cpu"), None
        elif name in trained_apart:
            from diffreg.runs import load_run

            meta = trained_apart[name]
            t0 -= meta.pop("train_wall_seconds")
            model = load_run(meta["run"], device=dev)[0].eval()
            eval_device, intensity = dev, tuple(meta["config"].data.intensity)
        else:
            model, meta = _trained_model(**training(name))
            eval_device, intensity = dev, tuple(meta["config"].data.intensity)
        view = test if intensity is None or intensity == tuple(test.intensity) else IntensityView(test, intensity)
        if view is not test:
            meta.setdefault("notes", []).append(f"images mapped linearly to {intensity}")
        ex_item = view[example]
        rec = _Recorder(model, {"moving": ex_item["moving"][None], "fixed": ex_item["fixed"][None]})
        table = evaluate(rec, view, device=eval_device, progress=progress, limit=n, **opts.get(name, {}))
        if rec.example_ddf is None:  # the example pair was not among those registered
            ex = model.register(ex_item["moving"][None].to(eval_device), ex_item["fixed"][None].to(eval_device),
                                **opts.get(name, {}))
            rec.example_ddf = ex.ddf.detach().float().cpu()
        fields[name] = rec.example_ddf
        tables[name] = table
        meta["options"] = _options_text(name, model, opts.get(name, {}), rec.extras)
        meta["wall_seconds"] = time.perf_counter() - t0
        info[name] = meta
        del model, rec

    context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": _device_text(dev), "data": data, "split": split, "pairs": n, "profile": profile,
        "dims": data_cfg.dims, "size": tuple(data_cfg.size), "labels": getattr(test, "labels", "acdc"),
        "intensity": tuple(test.intensity), "direction": getattr(test, "direction", None),
        "minutes": (time.time() - started) / 60, "budget": _budget_text(limits, info),
    }
    examples = {"pair": {k: v for k, v in pair.items() if k in ("moving", "fixed", "moving_label", "fixed_label",
                                                                   "case")},
                "fields": fields, "labels": getattr(test, "labels", "acdc")}
    results, summary, curves, paths, figs = _bench_outputs(tables, info, skipped, examples, context, out, names,
                                                            figures)
    return {"tables": tables, "results": results, "summary": summary, "methods": info, "skipped": skipped,
            "examples": examples, "paths": paths, "figures": figs, "context": context, "curves": curves}


def _budget_text(limits: tuple[str, float] | None, info: Mapping[str, dict[str, Any]]) -> str:
    """The budget line of ``summary.md``: what was asked and whether the trained methods got the same."""
    seen = {name: _pairs_seen(meta) for name, meta in info.items() if meta.get("config") is not None}
    secs = {name: meta.get("seconds") for name, meta in info.items() if meta.get("config") is not None}
    if limits is None:
        equal = len(set(seen.values())) <= 1
        return ("each method's own budget (its profile's steps, or `steps`); training pairs "
                + ("equal" if equal else "NOT equal") + ": " + ", ".join(f"{m} {p:,}" for m, p in seen.items()))
    if limits[0] == "steps":
        equal = len(set(seen.values())) <= 1
        return (f"equal budget of {limits[1]:,} training pairs per method (batch sizes normalised); pairs seen "
                + ("equal" if equal else "NOT equal (reused runs or batch sizes that do not divide it)") + ": "
                + ", ".join(f"{m} {p:,}" for m, p in seen.items()))
    return (f"equal budget of {limits[1]:g} s of training per method on this device; seconds used: "
            + ", ".join(f"{m} {s:.0f}" if isinstance(s, float) else f"{m} ?" for m, s in secs.items())
            + "; pairs seen: " + ", ".join(f"{m} {p:,}" for m, p in seen.items()))


def learning_curves(info: Mapping[str, Mapping[str, Any]]) -> Table:
    """The validation rows of each method's ``log.csv``: one row per (method, step) with ``pairs_seen`` (steps x
    batch), ``seconds`` (training time), ``val_dice`` and ``val_folding_percent``.

    Args:
        info: method -> ``{"run": run directory, "config": MethodConfig}`` (:func:`run_bench`'s ``"methods"``).

    Returns:
        A :class:`~diffreg.evaluate.Table` (empty when no run logged a validation).
    """
    from diffreg.runs import RunFolder

    rows = Table()
    for name, meta in info.items():
        batch = int(meta["config"].train.batch_size)
        for r in RunFolder(meta["run"]).log():
            v = r.get("val_dice")
            if isinstance(v, float) and not math.isnan(v):
                rows.append({"method": name, "step": int(r["step"]), "pairs_seen": int(r["step"]) * batch,
                             "seconds": float(r["seconds"]), "val_dice": v,
                             "val_folding_percent": float(r.get("val_folding_percent", math.nan))})
    return rows


def curves_figure(curves: Sequence[Mapping[str, Any]]):
    """Validation Dice against training pairs seen and against training seconds, every method in one figure
    (:func:`diffreg.viz.learning_curves_figure`).

    Args:
        curves: rows of :func:`learning_curves` (or ``curves.csv`` read back with :func:`diffreg.evaluate.read_csv`).

    Returns:
        A matplotlib ``Figure`` with two panels.
    """
    from diffreg import viz

    return viz.learning_curves_figure(curves)


def _direction_text(direction: str | None) -> str:
    """``", moving = ES, fixed = ED"`` for ``"es->ed"`` (empty for ``None``)."""
    if not direction:
        return ""
    moving, _, fixed = direction.partition("->")
    return f", moving = {moving.upper()}, fixed = {fixed.upper()}"


def _summary_markdown(summary: Table, info: Mapping[str, dict[str, Any]], skipped: Mapping[str, str],
                      context: Mapping[str, Any]) -> str:
    ref = context["reference"]
    pcol = f"p_dice_vs_{ref}"
    shown = Table()
    for row in summary:
        r = dict(row)
        p = r.get(pcol)
        if r["method"] == ref:
            r[pcol] = "(reference)"
        else:  # NaN: fewer than two pairs, or the Dice equal to the reference's on every pair
            r[pcol] = "n/a" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.2g}"
        shown.append(r)
    lines = [
        "# Benchmark",
        "",
        f"{context['pairs']} held-out pair{'s' if context['pairs'] != 1 else ''} ({context['split']} split) of "
        f"`{context['data']}`, "
        f"{context['dims']}D {' x '.join(str(s) for s in context['size'])}, profile `{context['profile']}`"
        f"{_direction_text(context.get('direction'))}; "
        f"device {context['device']}; {context['date']} ({context['minutes']:.1f} min).",
        "",
        f"Training budget: {context['budget']}.",
        "",
        "## Results (mean ± std over pairs)",
        "",
        shown.to_markdown(),
        "",
        f"{_AGGREGATE.get(context['labels'], 'dice = mean over labels')}; `dice_initial` before registration; "
        "`dice_<structure>` after. `folding_percent` = 100 x fraction of voxels with det J <= 0, `jacobian_std` = "
        "SD of det J, `sdlogj` = SD of log det J (clipped at 1e-9); `hd95` mean over structures (mm when the data "
        "give a spacing); `epe` end-point error against the true motion in voxels (phantoms); `seconds` wall time "
        "of one registration after a warm-up. "
        f"`{pcol}`: paired Wilcoxon signed-rank test of the per-pair Dice against {ref}.",
        "",
        "## Methods",
        "",
        "| method | training budget | inference | notes |",
        "|---|---|---|---|",
    ]
    for name, meta in info.items():
        notes = "; ".join(meta.get("notes", [])) or ""
        lines.append(f"| {name} | {_budget(meta)} | {meta.get('options', '')} | {notes} |")
    if skipped:
        lines += ["", "## Not benchmarked", ""]
        lines += [f"* **{name}**: {reason}" for name, reason in skipped.items()]
    lines += ["", "Figures: `boxplot_dice.png` (Dice per structure and method), `qualitative.png` (one pair, "
              "every method); per-pair rows: `results.csv`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# figures and reloading
# ----------------------------------------------------------------------------------------------------------------


def make_figures(tables: Mapping[str, Sequence[Mapping[str, Any]]], examples: Mapping[str, Any] | None = None,
                 out: str | Path | None = None, dpi: int = 110) -> dict[str, Any]:
    """The benchmark figures from per-method tables (and the qualitative pair's fields).

    Args:
        tables: method -> per-case table (:func:`run_bench`'s ``"tables"`` or :func:`load_results`).
        examples: ``{"pair": {moving, fixed, moving_label, fixed_label, case}, "fields": {method: ddf},
            "labels": "acdc" | "camus"}`` (``run_bench(...)["examples"]``); ``None``: no qualitative figure.
        out: folder to save ``boxplot_dice.png`` and ``qualitative.png`` in (``None``: do not save).
        dpi: resolution of the saved PNGs.

    Returns:
        ``{"boxplot_dice": Figure, "qualitative": Figure}`` (the latter only with ``examples``).
    """
    from diffreg import viz

    figs: dict[str, Any] = {}
    cols: list[str] = []
    for t in tables.values():
        cols += [c for c in Table(t).columns() if c not in cols]
    groups = [c for c in cols if c == "dice" or (c.startswith("dice_") and c != "dice_initial")]
    labels = ["overall" if c == "dice" else c[len("dice_"):].replace("_", "+").replace("lv", "LV")
              .replace("myo", "Myo").replace("rv", "RV").replace("la", "LA") for c in groups]
    figs["boxplot_dice"] = viz.boxplot_methods(tables, groups, labels=labels, title="Dice per structure")
    if examples is not None and examples.get("fields"):
        pair = examples["pair"]
        notes = {}
        for name, t in tables.items():
            row = next((r for r in t if r.get("case") == pair.get("case")), None)
            if row is not None:
                notes[name] = f"Dice {float(row['dice']):.3f}"
        fig = viz.methods_figure(pair["moving"], pair["fixed"], examples["fields"], pair.get("moving_label"),
                                 pair.get("fixed_label"), label_set=examples.get("labels", "acdc"), notes=notes)
        fig.suptitle(f"{pair.get('case', '')}: warped moving, difference to fixed, deformation grid", y=1.0,
                     va="bottom")
        figs["qualitative"] = fig
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            fig.savefig(out / f"{name}.png", dpi=dpi, bbox_inches="tight")
    return figs


def load_results(out: str | Path) -> tuple[dict[str, Table], dict[str, Any] | None]:
    """Read a benchmark folder back: ``(method -> per-case Table, examples or None)`` for :func:`make_figures`.

    Raises:
        FileNotFoundError: no ``results.csv`` in ``out``.
    """
    out = Path(out)
    path = out / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out} a benchmark folder (python -m diffreg bench)?")
    tables: dict[str, Table] = {}
    for row in read_csv(path):
        row = dict(row)
        tables.setdefault(str(row.pop("method")), Table()).append(row)
    examples = None
    if (out / "examples.pt").is_file():
        examples = torch.load(out / "examples.pt", weights_only=True)
    return tables, examples


#: Columns summarised over seeds by :func:`seed_summary` (those present in the results).
SEED_COLUMNS = ("dice", "dice_lv", "dice_myo", "dice_rv", "folding_percent", "sdlogj", "hd95", "epe", "seconds")


def seed_summary(results: Sequence[Mapping[str, Any]], reference: str = REFERENCE,
                 columns: Sequence[str] = SEED_COLUMNS) -> Table:
    """Summarise a multi-seed benchmark with the *seed* as the unit of repetition.

    For each method and seed the per-pair rows are first averaged (one number per seed: what that training run
    achieved); the summary then gives, per method, the mean and SD over seeds of those per-seed means and, against
    ``reference``, the per-seed difference of mean Dice: its mean, minimum and maximum, how many seeds the method
    is ahead, and a paired t-test over seeds (``p_seeds``; NaN with fewer than 2 seeds). A method without a seed
    (ANTs SyN, run once) is compared with every seed's reference.

    Args:
        results: per-pair rows with ``method``, ``seed`` and the metric columns (``results.csv`` of
            :func:`run_bench_seeds`).
        reference: the method the others are compared with.
        columns: metric columns to summarise (missing ones are skipped).

    Returns:
        one row per method: ``method``, ``seeds`` (count), ``<col>_mean`` and ``<col>_sd`` (SD over seeds, ddof 1),
        ``dice_diff_mean``, ``dice_diff_min``, ``dice_diff_max``, ``seeds_ahead``, ``p_seeds``.
    """
    import numpy as np
    from scipy.stats import ttest_rel

    rows = Table(results)
    methods_ = list(dict.fromkeys(r["method"] for r in rows))
    cols = [c for c in columns if any(c in r for r in rows)]

    def per_seed(method: str) -> dict[Any, dict[str, float]]:
        out: dict[Any, dict[str, float]] = {}
        for s in dict.fromkeys(r.get("seed") for r in rows if r["method"] == method):
            t = Table(r for r in rows if r["method"] == method and r.get("seed") == s)
            out[s] = {c: t.mean(c) for c in cols}
        return out

    by = {m: per_seed(m) for m in methods_}
    ref = by.get(reference, {})
    out = Table()
    for m in methods_:
        seeds = by[m]
        row: dict[str, Any] = {"method": m, "seeds": len(seeds)}
        for c in cols:
            v = np.array([seeds[s][c] for s in seeds], dtype=float)
            row[f"{c}_mean"] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
            row[f"{c}_sd"] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else math.nan
        if m != reference and ref and "dice" in cols:
            common = [s for s in ref if s in seeds] or ([s for s in ref] if len(seeds) == 1 else [])
            mine = [seeds[s if s in seeds else next(iter(seeds))]["dice"] for s in common]
            theirs = [ref[s]["dice"] for s in common]
            d = np.array(mine) - np.array(theirs)
            row.update(dice_diff_mean=float(d.mean()) if len(d) else math.nan,
                       dice_diff_min=float(d.min()) if len(d) else math.nan,
                       dice_diff_max=float(d.max()) if len(d) else math.nan,
                       seeds_ahead=int((d > 0).sum()),
                       p_seeds=float(ttest_rel(mine, theirs).pvalue) if len(d) > 1 and np.ptp(d) > 0 else math.nan)
        out.append(row)
    return out


def run_bench_seeds(seeds: Sequence[int], methods: str | Sequence[str] = "all", runs: str | Path = "runs",
                    out: str | Path = "bench", **kwargs: Any) -> dict[str, Any]:
    """:func:`run_bench` once per seed, then a summary over seeds (:func:`seed_summary`).

    Each seed trains every learned method in ``runs/seed<s>/<method>`` (reused when finished, so an interrupted
    call resumes) and writes its own benchmark to ``out/seed<s>/``. ANTs SyN does not depend on the training seed:
    it runs with the first seed only and its rows carry an empty seed. Written to ``out``: ``results.csv`` (every
    per-pair row with its ``seed``), ``seeds.csv`` and ``seeds.md`` (the summary over seeds).

    Args:
        seeds: the training seeds, e.g. ``[0, 1, 2]``.
        methods, runs, out: as :func:`run_bench`; ``kwargs``: any other :func:`run_bench` argument but ``seed``.

    Returns:
        dict with ``"results"`` (all rows), ``"summary"`` (:func:`seed_summary`), ``"per_seed"`` (seed -> the
        :func:`run_bench` result) and ``"paths"``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    if "seed" in kwargs:
        raise ValueError("run_bench_seeds takes the seeds as its first argument, not seed=")
    names, _ = bench_methods(methods)
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    per_seed: dict[int, dict[str, Any]] = {}
    options = kwargs.pop("options", None)
    opts = _method_options(options)
    for k, s in enumerate(seeds):
        chosen = names if k == 0 else [n for n in names if n not in CLASSICAL]
        res = run_bench(chosen, runs=runs / f"seed{s}", out=out / f"seed{s}", seed=s,
                        options={m: o for m, o in opts.items() if m in chosen}, **kwargs)
        per_seed[s] = res
        for r in res["results"]:
            rows.append({"method": r["method"], "seed": "" if r["method"] in CLASSICAL else s,
                         **{c: v for c, v in r.items() if c != "method"}})
    results = Table(rows)
    summary = seed_summary(results)
    paths = {"results": results.to_csv(out / "results.csv"), "seeds": summary.to_csv(out / "seeds.csv")}
    text = (f"# Benchmark over seeds {', '.join(map(str, seeds))}\n\n"
            f"Each seed trains every learned method once; a seed's value is the mean over the held-out pairs. "
            f"`_mean` / `_sd`: mean and SD over seeds; `dice_diff_*`: per-seed difference of mean Dice against "
            f"{REFERENCE} (min, max over seeds), `seeds_ahead`: seeds where the method is ahead, `p_seeds`: paired "
            f"t-test over seeds. Per-seed benchmarks: `seed<s>/`.\n\n{summary.to_markdown()}\n")
    (out / "seeds.md").write_text(text)
    paths["summary"] = out / "seeds.md"
    return {"results": results, "summary": summary, "per_seed": per_seed, "paths": paths}
