"""The claims a chapter makes about learned results, recorded as numbers before they are asserted.

A chapter that says "FSDiffReg's score energy is concentrated where the images differ" trains a model and then
checks a number against a threshold. Such a number moves with the seed, the CPU's kernels and the GPU, so the book
states a learned result only where it holds at every seed *with margin* (``benchmarks/claims/`` runs every chapter
at five seeds and two CPU kernel levels and records each claim's spread). :class:`Claims` gives the chapters one way
to do that:

* ``claims.check(name, value, op, threshold)`` records ``value`` and, unless recording only, asserts
  ``value op threshold`` (``op`` is one of ``">"``, ``">="``, ``"<"``, ``"<="``);
* every check is appended to ``$DIFFREG_CLAIMS_DIR/<chapter>.json`` when that variable is set (the 5-seed runner
  sets it), with the seed, the CPU kernel level and the margin (the signed distance to the threshold, positive
  when the claim holds);
* ``claims.report(name, value)`` records a quantity the chapter shows but does not assert (its sign or size
  changed between seeds or CPUs in the recorded runs), so its spread over runs is still measured;
* ``DIFFREG_CLAIMS_MODE=record`` records without asserting, so one run gathers every claim of a chapter even where
  an early one fails (the default, ``assert``, is what ``pytest`` and the book build use).

The seed every chapter trains with comes from :func:`chapter_seed` (``DIFFREG_SEED``, default 0).
"""

from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path

__all__ = ["Claims", "ClaimFailed", "chapter_seed", "kernel_level", "OPS"]

#: The comparisons a claim may make, by their symbol.
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class ClaimFailed(AssertionError):
    """A chapter's claim did not hold on this run (raised in ``assert`` mode)."""


def chapter_seed(default: int = 0) -> int:
    """The seed of a chapter's training runs: ``DIFFREG_SEED`` if set, else ``default``."""
    raw = os.environ.get("DIFFREG_SEED", "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"DIFFREG_SEED must be an integer, got {raw!r}") from None


def kernel_level() -> str:
    """The CPU kernel level torch dispatches to (e.g. ``AVX512``, ``AVX2``) and the oneDNN / MKL settings in force,
    as one string recorded beside each claim."""
    import torch

    parts = [torch.backends.cpu.get_cpu_capability()]
    for var in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    return " ".join(parts)


class Claims:
    """The learned claims of one chapter.

    Parameters
    ----------
    chapter : the chapter's file stem, e.g. ``"05_fsdiffreg"`` (the JSON file's name).
    seed : the seed the chapter trained with (recorded with each claim).
    mode : ``"assert"`` (raise :class:`ClaimFailed` when a claim fails) or ``"record"`` (never raise); default
        ``$DIFFREG_CLAIMS_MODE`` or ``"assert"``.
    out : folder of the JSON record; default ``$DIFFREG_CLAIMS_DIR``; ``None`` records in memory only.
    """

    def __init__(self, chapter: str, seed: int, *, mode: str | None = None, out: str | Path | None = None):
        self.chapter, self.seed = chapter, int(seed)
        self.mode = mode or os.environ.get("DIFFREG_CLAIMS_MODE", "assert")
        if self.mode not in ("assert", "record"):
            raise ValueError(f"claims mode must be 'assert' or 'record', got {self.mode!r}")
        out = out if out is not None else os.environ.get("DIFFREG_CLAIMS_DIR") or None
        self.path = Path(out) / f"{chapter}.json" if out else None
        self.rows: list[dict] = []
        self._kernel = kernel_level()

    def check(self, name: str, value, op: str, threshold: float, note: str = "") -> bool:
        """Record ``value`` and assert ``value op threshold`` (in ``assert`` mode); returns whether it holds.

        ``name`` identifies the claim across runs (keep it stable); ``note`` says in words what it means.
        """
        if op not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
        value, threshold = float(value), float(threshold)
        holds = bool(math.isfinite(value) and OPS[op](value, threshold))
        margin = value - threshold if op in (">", ">=") else threshold - value
        row = {"chapter": self.chapter, "claim": name, "seed": self.seed, "kernel": self._kernel, "value": value,
               "op": op, "threshold": threshold, "margin": margin, "holds": holds, "note": note}
        self.rows = [r for r in self.rows if r["claim"] != name] + [row]
        self._save()
        if not holds and self.mode == "assert":
            raise ClaimFailed(f"{self.chapter}: claim {name!r} does not hold: {value:.6g} {op} {threshold:.6g} is "
                              f"false (seed {self.seed}, {self._kernel}){': ' + note if note else ''}")
        return holds

    def report(self, name: str, value, note: str = "") -> float:
        """Record ``value`` without asserting anything (a quantity whose sign or size is not a property of the
        method at this budget); returns it as a float."""
        value = float(value)
        row = {"chapter": self.chapter, "claim": name, "seed": self.seed, "kernel": self._kernel, "value": value,
               "op": "report", "threshold": math.nan, "margin": math.nan, "holds": True, "note": note}
        self.rows = [r for r in self.rows if r["claim"] != name] + [row]
        self._save()
        return value

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        os.replace(tmp, self.path)

    def table(self) -> list[dict]:
        """The claims checked (and quantities reported) so far: name, value, comparison, threshold, margin and whether
        each holds."""
        return [{"claim": r["claim"], "value": round(r["value"], 4),
                 "must be": "(reported)" if r["op"] == "report" else f"{r['op']} {r['threshold']:g}",
                 "margin": round(r["margin"], 4), "holds": r["holds"]} for r in self.rows]
