"""The numbers the five papers report for their own experiments, quoted from the paper texts.

These are *their* results, on *their* data splits, image sizes, metric code and GPUs; diffreg never mixes them
with its own measurements. Chapter 10 (``notebooks/10_benchmark.md``) shows them as a separate table next to the
benchmark, and ``book/reproducing.md`` lists them per paper as the target of a paper-profile run.

Columns: ``paper`` (short name), ``table`` (where in the paper), ``data`` (their dataset and dimensionality),
``method``, ``dice`` (each paper's own aggregate, see ``aggregate``), ``folding_percent`` (percent of voxels with
a non-positive Jacobian determinant; DRDM reports per mille, converted here), ``jacobian_std`` (SD of the Jacobian
determinant where reported) and ``seconds`` (per pair, on their GPU). NaN where the paper gives no value.

Note that the "initial" Dice differs between papers on the same ACDC data: each uses its own slices, crops and
aggregate, which is why diffreg defines its metrics once (``diffreg.metrics``, ``book/notation.md``).
"""

from __future__ import annotations

import math

__all__ = ["REPORTED", "AGGREGATES", "reported"]

_nan = math.nan

#: What each paper's ``dice`` aggregates.
AGGREGATES = {
    "DiffuseMorph": "ACDC 3D, mean of LV cavity, Myo, LV cavity + Myo, RV and whole heart over cases",
    "FSDiffReg": "ACDC 3D, same five-column mean as DiffuseMorph (official code)",
    "DiffuseReg": "ACDC 3D, same five-column mean as DiffuseMorph (official code)",
    "LDM-Morph": "CAMUS 2D, LV Dice",
    "DRDM": "Learn2Reg lung CT 3D, lung-mask Dice (Table 3)",
}


def _row(paper: str, table: str, data: str, method: str, dice: float, folding_percent: float = _nan,
         jacobian_std: float = _nan, seconds: float = _nan) -> dict:
    return {"paper": paper, "table": table, "data": data, "method": method, "dice": dice,
            "folding_percent": folding_percent, "jacobian_std": jacobian_std, "seconds": seconds}


#: One row per (paper, table, method), in the order the papers print them.
REPORTED: list[dict] = [
    # Kim, Han, Ye 2022 (DiffuseMorph), Table 2: 3D cardiac MR (ACDC); NJD column as folding %
    _row("DiffuseMorph", "Table 2", "ACDC 3D", "Initial", 0.642),
    _row("DiffuseMorph", "Table 2", "ACDC 3D", "VoxelMorph", 0.787, 0.169, seconds=0.219),
    _row("DiffuseMorph", "Table 2", "ACDC 3D", "VoxelMorph-diff", 0.794, 0.291, seconds=2.902),
    _row("DiffuseMorph", "Table 2", "ACDC 3D", "DiffuseMorph", 0.802, 0.161, seconds=0.456),
    # Qin & Li 2023 (FSDiffReg), Table 1: ACDC 3D; |J|<=0 in % and SD(|J|)
    _row("FSDiffReg", "Table 1", "ACDC 3D", "Initial", 0.655),
    _row("FSDiffReg", "Table 1", "ACDC 3D", "VoxelMorph", 0.799, 0.079, 0.183),
    _row("FSDiffReg", "Table 1", "ACDC 3D", "VoxelMorph-diff", 0.789, 0.083, 0.182),
    _row("FSDiffReg", "Table 1", "ACDC 3D", "DiffuseMorph", 0.805, 0.061, 0.178),
    _row("FSDiffReg", "Table 1", "ACDC 3D", "FSDiffReg", 0.823, 0.054, 0.176),
    # Zhuo & Shen 2024 (DiffuseReg), Table 1: ACDC 3D; NJD as folding %; DDPM with 2000 steps
    _row("DiffuseReg", "Table 1", "ACDC 3D", "Initial", 0.6887),
    _row("DiffuseReg", "Table 1", "ACDC 3D", "DiffuseMorph", 0.8286, 1.78, seconds=0.3),
    _row("DiffuseReg", "Table 1", "ACDC 3D", "FSDiffReg", 0.8230, 1.80, seconds=0.2),
    _row("DiffuseReg", "Table 1", "ACDC 3D", "DiffuseReg", 0.8362, 1.74, seconds=333.2),
    # Wu & Gong 2024 (LDM-Morph), Table 1: CAMUS 4CH, LV Dice
    _row("LDM-Morph", "Table 1", "CAMUS-4CH 2D", "Initial", 0.764),
    _row("LDM-Morph", "Table 1", "CAMUS-4CH 2D", "VoxelMorph", 0.858, 0.607),
    _row("LDM-Morph", "Table 1", "CAMUS-4CH 2D", "DiffuseMorph", 0.852, 0.728),
    _row("LDM-Morph", "Table 1", "CAMUS-4CH 2D", "LDM-Morph", 0.889, 0.441),
    # Zheng et al. 2024 (DRDM), Table 3: VoxelMorph on Learn2Reg lung CT, |J|<0 per mille -> %
    _row("DRDM", "Table 3", "lung CT 3D", "VoxelMorph, no pre-training", 0.9157, 0.538),
    _row("DRDM", "Table 3", "lung CT 3D", "VoxelMorph, MRBS pre-training", 0.9166, 0.496),
    _row("DRDM", "Table 3", "lung CT 3D", "VoxelMorph, DRDM pre-training", 0.9179, 0.495),
]


def reported(paper: str | None = None) -> list[dict]:
    """The rows of :data:`REPORTED`, all or those of one paper (``"DiffuseMorph"``, ``"FSDiffReg"``,
    ``"DiffuseReg"``, ``"LDM-Morph"``, ``"DRDM"``).

    Raises:
        ValueError: an unknown paper name.
    """
    if paper is None:
        return [dict(r) for r in REPORTED]
    if paper not in AGGREGATES:
        raise ValueError(f"unknown paper {paper!r}; one of {sorted(AGGREGATES)}")
    return [dict(r) for r in REPORTED if r["paper"] == paper]
