"""Evaluation on held-out pairs: :func:`evaluate` -> per-case :class:`Table`; :func:`compare` -> summary with
paired Wilcoxon signed-rank tests.

Columns of the per-case table (metric definitions in :mod:`diffreg.metrics`, stated in ``book/notation.md``):

* ``case``; ``dice_initial`` and ``dice``: the dataset's aggregate Dice before / after registration (ACDC:
  the flat mean of LV, Myo, LV+Myo, RV and whole heart as DiffuseMorph / FSDiffReg / DiffuseReg report it;
  CAMUS: the LV Dice as LDM-Morph reports it);
* ``dice_<structure>`` per structure after registration;
* ``folding_percent`` (100 x fraction of voxels with det J <= 0), ``jacobian_std`` (SD of det J), ``sdlogj``;
* ``hd95`` (mean over structures, in mm when the dataset gives a spacing);
* ``epe`` and ``epe_initial`` (mean end-point error in voxels against the true motion after / before
  registration, phantoms only);
* ``seconds`` (wall time of ``model.register`` for the pair, after one untimed warm-up registration);
* with ``samples=N`` (N > 1) for a stochastic model: the spread statistics of N sampled fields,
  :func:`diffreg.uncertainty.spread_columns` (``spread_mean``, ``spearman_spread_error``, ...; chapter 11).

Explained in chapter 02 (``notebooks/02_voxelmorph.md``).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffreg import metrics

__all__ = ["Table", "evaluate", "compare", "summarize", "read_csv"]


class Table(list):
    """A list of row dicts with a readable notebook display, ``mean``/``std``, CSV and Markdown output."""

    def columns(self) -> list[str]:
        """Column names in first-seen order."""
        cols: list[str] = []
        for row in self:
            cols += [k for k in row if k not in cols]
        return cols

    def values(self, column: str) -> np.ndarray:
        """The column as a float array (non-numeric or missing -> NaN)."""
        out = []
        for row in self:
            try:
                out.append(float(row.get(column, math.nan)))
            except (TypeError, ValueError):
                out.append(math.nan)
        return np.asarray(out, dtype=float)

    def mean(self, column: str) -> float:
        """NaN-ignoring mean of a column."""
        v = self.values(column)
        return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan

    def std(self, column: str) -> float:
        """NaN-ignoring population SD of a column."""
        v = self.values(column)
        return float(np.nanstd(v)) if np.isfinite(v).any() else math.nan

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns())
            w.writeheader()
            w.writerows(self)
        return path

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table (numbers rounded to ``digits``; a ``|`` inside a cell, as in ``|J|<0``, is escaped)."""
        cols = self.columns()

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return "nan" if math.isnan(v) else f"{v:.{digits}f}"
            return str(v).replace("|", "\\|")

        lines = ["| " + " | ".join(fmt(c) for c in cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in self]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def read_csv(path: str | Path) -> Table:
    """Read a table written by :meth:`Table.to_csv` (numbers parsed as floats)."""
    rows = Table()
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    parsed[k] = v
            rows.append(parsed)
    return rows


def _label_set(dataset: Dataset) -> str:
    return getattr(dataset, "labels", "acdc")


@torch.no_grad()
def timed_register(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor, **options: Any):
    """``(model.register(moving, fixed, **options), seconds)``: wall time of one registration, the GPU synchronised
    before and after so that the time covers the work, not only its launch."""
    device = moving.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = model.register(moving, fixed, **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    device: str | torch.device | None = None,
    progress: bool = False,
    limit: int | None = None,
    **register_options: Any,
) -> Table:
    """Register every pair of ``dataset`` with ``model.register`` and measure it.

    Args:
        model: any :class:`~diffreg.models.RegistrationModel`.
        dataset: a pair dataset (items with ``moving``, ``fixed``, ``moving_label``, ``fixed_label``, ``case`` and
            optionally ``spacing`` and ``true_ddf``); its ``labels`` attribute (``"acdc"`` or ``"camus"``) picks the
            structures and the aggregate Dice.
        device: default :func:`diffreg.device.default_device` (the GPU when CUDA is available, else the CPU); the
            model is moved there.
        progress: show a tqdm bar.
        limit: evaluate only the first ``limit`` pairs.
        **register_options: passed to ``model.register`` (e.g. sampler steps). ``samples=N`` (N > 1) is not: it
            draws N fields per pair with :func:`diffreg.uncertainty.sample_fields` (seeds ``seed ... seed + N - 1``)
            and adds their spread columns; the other columns stay those of the one registration (chapter 11).

    Returns:
        A :class:`Table` with one row per pair (columns in the module docstring).

    Raises:
        ValueError: ``model`` is a deformation generator (:class:`~diffreg.models.DeformationGenerator`, DRDM),
            which registers no pairs.
    """
    from tqdm.auto import tqdm

    from diffreg.models.base import DeformationGenerator

    if isinstance(model, DeformationGenerator):
        raise ValueError(f"{model.refusal()}: evaluate a registration model; {model.downstream}".rstrip("; "))
    if device is None:
        from diffreg.device import default_device

        device = default_device()
    device = torch.device(device)
    model.to(device).eval()
    label_set = _label_set(dataset)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    samples = int(register_options.pop("samples", 1) or 1)  # > 1: spread statistics of sampled fields (chapter 11)
    rows = Table()
    if n:  # one untimed registration first, so ``seconds`` excludes one-time start-up costs
        warm = dataset[0]
        model.register(warm["moving"][None].to(device), warm["fixed"][None].to(device), **register_options)
    for i in tqdm(range(n), disable=not progress, desc="evaluate"):
        item = dataset[i]
        moving = item["moving"][None].to(device)
        fixed = item["fixed"][None].to(device)
        result, seconds = timed_register(model, moving, fixed, **register_options)
        spacing = item.get("spacing")
        spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        true_ddf = item.get("true_ddf")
        report = metrics.registration_report(
            result.ddf.float().cpu(),
            item["moving_label"][None],
            item["fixed_label"][None],
            labels=label_set,
            spacing=spacing,
            true_ddf=true_ddf[None] if true_ddf is not None else None,
            direction=getattr(dataset, "direction", None) if label_set in ("acdc", "camus") else None,
        )
        row: dict[str, Any] = {"case": item.get("case", str(i))}
        for k, v in report.items():
            row[k] = float(v[0]) if isinstance(v, torch.Tensor) else float(v)
        row["seconds"] = seconds
        if samples > 1:
            from diffreg.uncertainty import spread_columns

            row.update(spread_columns(model, moving, fixed, samples, true_ddf, **register_options))
        rows.append(row)
    return rows


def summarize(table: Sequence[dict], columns: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
    """``{column: (mean, std)}`` over the numeric columns (NaN-ignoring)."""
    t = Table(table)
    cols = [c for c in (columns or t.columns()) if c != "case"]
    return {c: (t.mean(c), t.std(c)) for c in cols if np.isfinite(t.values(c)).any()}


def compare(
    tables: dict[str, Sequence[dict]],
    reference: str | None = None,
    columns: Sequence[str] = ("dice_initial", "dice", "folding_percent", "jacobian_std", "sdlogj", "hd95",
                              "epe_initial", "epe", "seconds"),
    test_column: str = "dice",
) -> Table:
    """One summary row per method: ``mean +- std`` of ``columns`` and the paired Wilcoxon signed-rank p-value of
    ``test_column`` against ``reference`` (matched by ``case``).

    Args:
        tables: method name -> per-case table from :func:`evaluate` (same pairs).
        reference: method the others are tested against (default: the first).
        columns: columns to summarise (missing ones are skipped).
        test_column: the column the test compares.

    Raises:
        ValueError: empty ``tables`` or an unknown ``reference``.
    """
    from scipy.stats import wilcoxon

    if not tables:
        raise ValueError("compare needs at least one table")
    names = list(tables)
    reference = reference or names[0]
    if reference not in tables:
        raise ValueError(f"reference {reference!r} is not one of {names}")
    ref = {r["case"]: r for r in tables[reference]}
    out = Table()
    for name in names:
        t = Table(tables[name])
        row: dict[str, Any] = {"method": name, "n": len(t)}
        for c, (mean, std) in summarize(t, columns).items():
            row[c] = f"{mean:.3f} ± {std:.3f}"
        p = math.nan
        if name != reference:
            pairs = [(float(r[test_column]), float(ref[r["case"]][test_column])) for r in t if r["case"] in ref]
            a = np.array([x for x, _ in pairs])
            b = np.array([y for _, y in pairs])
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.sum() >= 2 and np.any(a[ok] != b[ok]):
                p = float(wilcoxon(a[ok], b[ok]).pvalue)
        row[f"p_{test_column}_vs_{reference}"] = p
        out.append(row)
    return out
