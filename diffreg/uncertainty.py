"""Registration uncertainty from sampled fields, and its calibration against a known true motion.

A model whose ``register`` is stochastic (DiffuseReg with DDPM, or DDIM with ``eta > 0``) draws a different field
for every seed: ``n`` draws are samples of ``p(phi | m, f)`` as the model learnt it. A deep ensemble (one-pass
networks trained from different seeds) gives one field per member instead. This module turns such a stack of
fields into per-voxel statistics and asks whether their spread predicts the error of their mean:

* :func:`sample_fields`, :func:`ensemble_fields`: the stacks ``(n, B, ndim, *spatial)``;
* :func:`field_statistics`: mean field, spread (``sqrt`` of the trace of the displacement covariance, voxels), SD of
  ``det J`` across samples and the per-voxel probability of folding;
* :func:`calibration`: Spearman correlation of spread and error, a binned calibration curve and the expected
  calibration error (ECE, voxels);
* :func:`leave_one_out`: the reference a calibration curve needs: each sample in turn as the "truth" of the others,
  which is what a *perfectly* calibrated model looks like through the same binning (binning on a spread estimated
  from few samples tilts the curve by itself);
* :func:`coverage` and :func:`calibrated_coverage`: the fraction of voxels whose error is within ``k`` predicted
  errors, against the value a calibrated Gaussian gives; :func:`calibrated_mean_error`: the mean error that a mean
  spread predicts;
* :func:`mean_vs_single`: does the mean of the samples register better than one sample?
* :func:`spread_columns`: the per-case columns ``python -m diffreg evaluate --option samples=N`` adds.

Fields follow the book's convention: ``(B, ndim, *spatial)`` displacements in voxels, channel ``i`` along spatial
axis ``i``. Explained in chapter 11 (``notebooks/11_uncertainty.md``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from diffreg import metrics

__all__ = ["sample_fields", "ensemble_fields", "field_statistics", "endpoint_error_map", "calibration", "mean_vs_single",
           "spread_columns", "leave_one_out", "coverage", "calibrated_coverage", "calibrated_mean_error"]


@torch.no_grad()
def sample_fields(model: torch.nn.Module, moving: Tensor, fixed: Tensor, n: int, seed: int = 0,
                  **sampler_options: Any) -> Tensor:
    """Draw ``n`` fields for each pair from a model whose ``register`` is stochastic.

    Draw ``k`` is ``model.register(moving, fixed, seed=seed + k, **sampler_options).ddf``: the draws are
    reproducible, and draw 0 is the model's usual registration with that seed (e.g. DiffuseReg:
    ``sample_fields(model, m, f, 10, sampler="ddim", steps=20, eta=1.0)``; with ``eta=0`` DDIM is deterministic
    given its starting noise ``phi_T``, but every seed draws another ``phi_T``, so the fields still differ). The noise
    of a draw covers the whole batch, so a pair's samples depend on the other pairs of its batch. A model whose
    ``register`` takes no ``seed`` is called without one.

    Explained in chapter 11.

    Args:
        model: a registration model whose ``register`` takes a ``seed`` keyword.
        moving, fixed: ``(B, 1, *spatial)`` images.
        n: number of draws, at least 2 (a spread needs two).
        seed: seed of the first draw.
        **sampler_options: passed to ``model.register`` (sampler, steps, eta, ...).

    Returns:
        ``(n, B, ndim, *spatial)`` fields in voxels, float32, on the model's output device.

    Raises:
        ValueError: ``n < 2``, or the first two draws are identical: the model (e.g. a one-pass network such as
            VoxelMorph) is deterministic and its samples carry no spread.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2 (a spread needs two draws), got {n}")
    seeded = True

    def draw(k: int) -> Tensor:
        nonlocal seeded
        if seeded:
            try:
                return model.register(moving, fixed, seed=int(seed) + k, **sampler_options).ddf.float()
            except (TypeError, ValueError) as exc:  # a register without a ``seed`` keyword
                if "'seed'" not in str(exc):
                    raise
                seeded = False
        return model.register(moving, fixed, **sampler_options).ddf.float()

    fields = []
    for k in range(int(n)):
        fields.append(draw(k))
        if k == 1 and torch.equal(fields[0], fields[1]):
            opts = ", ".join(f"{key}={v!r}" for key, v in sampler_options.items()) or "default options"
            raise ValueError(f"{type(model).__name__}.register ({opts}) returned identical fields for two draws "
                             f"(seeds {seed} and {seed + 1}): it is deterministic, so its samples have no spread "
                             f"(a one-pass network: use ensemble_fields with several trained models)")
    return torch.stack(fields)


@torch.no_grad()
def ensemble_fields(models: Sequence[torch.nn.Module], moving: Tensor, fixed: Tensor, **options: Any) -> Tensor:
    """One field per member of a deep ensemble (models of one architecture trained from different seeds).

    Explained in chapter 11.

    Args:
        models: at least two registration models.
        moving, fixed: ``(B, 1, *spatial)`` images.
        **options: passed to every ``register`` call.

    Returns:
        ``(len(models), B, ndim, *spatial)`` fields in voxels, float32.

    Raises:
        ValueError: fewer than two models.
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least two models, got {len(models)}")
    return torch.stack([m.register(moving, fixed, **options).ddf.float() for m in models])


def _check_fields(fields: Tensor) -> Tensor:
    if not isinstance(fields, torch.Tensor) or fields.ndim < 4:
        raise ValueError("fields must be a tensor (n, B, ndim, *spatial), got "
                         f"{tuple(fields.shape) if isinstance(fields, torch.Tensor) else type(fields).__name__}")
    ndim = fields.shape[2]
    if ndim not in (2, 3) or fields.ndim != 3 + ndim:
        raise ValueError(f"fields must be (n, B, ndim, *spatial) with ndim in (2, 3) spatial axes, got "
                         f"{tuple(fields.shape)}")
    if fields.shape[0] < 2:
        raise ValueError(f"statistics need at least two samples, got {fields.shape[0]}")
    return fields


def field_statistics(fields: Tensor) -> dict[str, Tensor]:
    """Per-voxel statistics of ``n`` sampled fields.

    With ``u_1 .. u_n`` the samples at a voxel and ``Sigma`` their sample covariance (``n - 1`` in the denominator):

    * ``mean``: ``(B, ndim, *spatial)``, the mean field (voxels);
    * ``spread``: ``(B, *spatial)``, ``sqrt(trace Sigma)`` in voxels: the RMS distance of a sample from the mean.
      If the true field were one more draw of the same distribution, the expected squared end-point error of the
      mean field would be ``spread^2 (1 + 1/n)``;
    * ``jacobian_std``: ``(B, *spatial)``, SD of ``det J`` (:func:`diffreg.metrics.jacobian_determinant`) across
      the samples (``n - 1`` in the denominator);
    * ``fold_probability``: ``(B, *spatial)``, fraction of samples with ``det J <= 0``;
    * ``n``: the number of samples (a 0-d tensor).

    Explained in chapter 11.

    Args:
        fields: ``(n, B, ndim, *spatial)``, ``n >= 2``, voxels.

    Returns:
        dict of float32 tensors on the device of ``fields`` (the Jacobian statistics in float64).

    Raises:
        ValueError: on a bad shape or a single sample.
    """
    fields = _check_fields(fields).float()
    n, b = fields.shape[:2]
    mean = fields.mean(0)
    spread = fields.var(0, correction=1).sum(1).sqrt()
    det = metrics.jacobian_determinant(fields.reshape(n * b, *fields.shape[2:])).view(n, b, *fields.shape[3:])
    return {"mean": mean, "spread": spread, "jacobian_std": det.std(0, correction=1),
            "fold_probability": (det <= 0).double().mean(0), "n": torch.tensor(n)}


def endpoint_error_map(ddf: Tensor, true_ddf: Tensor) -> Tensor:
    """Per-voxel end-point error ``|| ddf - true_ddf ||_2`` in voxels, ``(B, *spatial)``.

    Explained in chapter 11 (its mean over voxels is :func:`diffreg.metrics.endpoint_error`).
    """
    if ddf.shape != true_ddf.shape:
        raise ValueError(f"ddf {tuple(ddf.shape)} and true_ddf {tuple(true_ddf.shape)} must have the same shape")
    return (ddf.float() - true_ddf.float().to(ddf.device)).pow(2).sum(1).sqrt()


def _voxels(spread, error, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Spread and error as flat float64 arrays of the (masked) voxels where both are finite."""
    s = torch.as_tensor(spread).detach().double().cpu()
    e = torch.as_tensor(error).detach().double().cpu()
    if s.shape != e.shape:
        raise ValueError(f"spread {tuple(s.shape)} and error {tuple(e.shape)} must have the same shape")
    if mask is not None:
        m = torch.as_tensor(mask).detach().bool().cpu().expand_as(s)
        s, e = s[m], e[m]
    s, e = s.flatten().numpy(), e.flatten().numpy()
    ok = np.isfinite(s) & np.isfinite(e)
    return s[ok], e[ok]


def calibration(spread: Tensor | np.ndarray, error: Tensor | np.ndarray, bins: int = 10,
                mask: Tensor | np.ndarray | None = None, n_samples: int | None = None) -> dict[str, Any]:
    """Is the spread a calibrated estimate of the error? Rank correlation, calibration curve, ECE.

    A spread is *calibrated* when, among the voxels with predicted spread ``s``, the RMS end-point error of the
    mean field is ``s`` (times ``sqrt(1 + 1/n)`` for a mean of ``n`` samples, see :func:`field_statistics`; give
    ``n_samples`` to apply that factor). The voxels are sorted by spread and cut into ``bins`` bins of equal count
    (quantile bins; ties are split by sort order, so equal spreads never leave a bin empty). Per bin:

    * ``predicted``: the RMS of the (scaled) spread in the bin: the RMS error a calibrated spread predicts
      (within a narrow bin it is the bin's mean spread);
    * ``observed``: the RMS of the error in the bin.

    Explained in chapter 11.

    Args:
        spread: per-voxel predicted spread (voxels), any shape (e.g. ``(B, *spatial)``).
        error: per-voxel end-point error of the mean field (voxels), same shape (:func:`endpoint_error_map`).
        bins: number of quantile bins (at most the number of voxels).
        mask: optional boolean map of the voxels to use, broadcastable to ``spread``.
        n_samples: when given, the predicted error is ``spread * sqrt(1 + 1/n_samples)``.

    Returns:
        dict with ``spearman`` (Spearman rank correlation of spread and error, :func:`scipy.stats.spearmanr`;
        NaN when either is constant), ``spearman_p``, ``ece`` (expected calibration error in voxels:
        ``sum_b (count_b / N) |observed_b - predicted_b|``), ``curve`` (one dict per bin: ``bin``, ``count``,
        ``spread_low``, ``spread_high``, ``predicted``, ``observed``) and ``voxels`` (N).

    Raises:
        ValueError: mismatched shapes, no voxels, or bad ``bins``.
    """
    from scipy.stats import spearmanr

    s, e = _voxels(spread, error, mask)
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    if s.size < bins:
        raise ValueError(f"{s.size} voxels cannot fill {bins} bins")
    scale = math.sqrt(1.0 + 1.0 / n_samples) if n_samples else 1.0
    order = np.argsort(s, kind="stable")
    curve = []
    ece = 0.0
    for k, idx in enumerate(np.array_split(order, int(bins))):
        predicted = float(np.sqrt(np.mean((scale * s[idx]) ** 2)))
        observed = float(np.sqrt(np.mean(e[idx] ** 2)))
        curve.append({"bin": k, "count": int(idx.size), "spread_low": float(s[idx].min()),
                      "spread_high": float(s[idx].max()), "predicted": predicted, "observed": observed})
        ece += idx.size / s.size * abs(observed - predicted)
    if np.ptp(s) == 0 or np.ptp(e) == 0:
        rho, p = math.nan, math.nan
    else:
        res = spearmanr(s, e)
        rho, p = float(res[0]), float(res[1])
    return {"spearman": rho, "spearman_p": p, "ece": float(ece), "curve": curve, "voxels": int(s.size)}


def leave_one_out(fields: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample in turn as the truth of the others: the spread and error a perfectly calibrated model would give.

    For ``j = 1..n`` the other ``n - 1`` samples give a mean and a spread (:func:`field_statistics`), and the error
    is the distance of their mean to sample ``j``. If the samples are exchangeable draws, sample ``j`` is exactly
    "one more draw", which is what calibration asks of the truth; passing these to :func:`calibration` (with
    ``n_samples = n - 1``) or :func:`coverage` shows what the curve of a calibrated model looks like at this number of
    samples. With few samples the spread of a voxel is itself a noisy estimate, so binning voxels by it puts the voxels
    whose spread came out low by chance in the low bins (observed above predicted there) and the reverse in the top
    bins: a tilt that is an artefact of the estimate, not a property of the model. Explained in chapter 11.

    Args:
        fields: ``(n, B, ndim, *spatial)``, ``n >= 3``.

    Returns:
        ``(spread, error)``, each ``(n, B, *spatial)`` (voxels), pooled over the ``n`` choices of the held-out sample.

    Raises:
        ValueError: on a bad shape or fewer than 3 samples.
    """
    fields = _check_fields(fields).float()
    n = fields.shape[0]
    if n < 3:
        raise ValueError(f"leave_one_out needs at least 3 samples (2 left to estimate a spread), got {n}")
    spreads, errors = [], []
    for j in range(n):
        rest = torch.cat([fields[:j], fields[j + 1:]])
        spreads.append(rest.var(0, correction=1).sum(1).sqrt())
        errors.append(endpoint_error_map(rest.mean(0), fields[j]))
    return torch.stack(spreads), torch.stack(errors)


def calibrated_coverage(k: float | np.ndarray, dims: int) -> float | np.ndarray:
    """``P(e <= k * predicted)`` for a calibrated isotropic Gaussian: the reference of :func:`coverage`.

    With per-component variance ``sigma^2`` the spread is ``s = sqrt(dims) sigma`` and the error of the mean of ``n``
    samples against one more draw has per-component variance ``sigma^2 (1 + 1/n)``; with the predicted error
    ``s sqrt(1 + 1/n)``, ``e^2 / (sigma^2 (1 + 1/n))`` is chi-square with ``dims`` degrees of freedom, so the
    coverage is ``chi2.cdf(dims k^2, dims)``: ``1 - exp(-k^2)`` in 2D.
    """
    from scipy.stats import chi2

    k = np.asarray(k, dtype=float)
    out = chi2.cdf(dims * k ** 2, dims)
    return float(out) if out.ndim == 0 else out


def calibrated_mean_error(mean_spread: float, dims: int, n_samples: int | None = None) -> float:
    """The mean end-point error that a calibrated isotropic Gaussian with spread ``mean_spread`` predicts.

    ``E[e] = sigma sqrt(2) Gamma((d + 1) / 2) / Gamma(d / 2) sqrt(1 + 1/n)`` with ``sigma = s / sqrt(d)``: in 2D
    ``(sqrt(pi) / 2) s sqrt(1 + 1/n)``, about ``0.886 s`` for large ``n``. Comparing a mean spread with a mean error
    needs this factor (the spread is an RMS, the error's mean is not). Without ``n_samples``: ``n`` infinite.
    """
    factor = math.sqrt(2.0 / dims) * math.exp(math.lgamma((dims + 1) / 2) - math.lgamma(dims / 2))
    return float(mean_spread) * factor * (math.sqrt(1.0 + 1.0 / n_samples) if n_samples else 1.0)


def coverage(spread: Tensor | np.ndarray, error: Tensor | np.ndarray, ks: Sequence[float],
             n_samples: int | None = None, mask: Tensor | np.ndarray | None = None) -> np.ndarray:
    """Fraction of voxels whose error is at most ``k`` times the predicted error, for each ``k`` in ``ks``.

    The predicted error of a voxel is its spread times ``sqrt(1 + 1/n_samples)`` (see :func:`field_statistics`).
    Compare with :func:`calibrated_coverage`: below it, errors exceed what the spread promises (overconfident).
    Unlike the binned curve of :func:`calibration`, no voxel is sorted by its own noisy spread. Explained in
    chapter 11.

    Args:
        spread, error: per-voxel spread and end-point error (voxels), same shape.
        ks: multiples of the predicted error.
        n_samples: the number of samples behind the spread (``None``: no ``sqrt(1 + 1/n)`` factor).
        mask: optional boolean map of the voxels to use, broadcastable to ``spread``.

    Returns:
        ``(len(ks),)`` array of fractions in ``[0, 1]``.
    """
    s, e = _voxels(spread, error, mask)
    if s.size == 0:
        raise ValueError("no voxels to measure")
    pred = s * (math.sqrt(1.0 + 1.0 / n_samples) if n_samples else 1.0)
    return np.array([float(np.mean(e <= float(k) * pred)) for k in ks])


def mean_vs_single(fields: Tensor, true_ddf: Tensor | None = None, moving_label: Tensor | None = None,
                   fixed_label: Tensor | None = None, labels: str | Sequence[int] = "acdc") -> dict[str, Tensor]:
    """Does averaging the samples register better than one sample? Per pair, the mean field against the samples.

    Explained in chapter 11.

    Args:
        fields: ``(n, B, ndim, *spatial)`` samples, voxels.
        true_ddf: ``(B, ndim, *spatial)`` true displacement (voxels) for the end-point errors.
        moving_label, fixed_label: integer maps ``(B, 1, *spatial)`` for the Dice (both or neither).
        labels: the label set of :func:`diffreg.metrics.registration_report` (``"acdc"``, ``"camus"`` or a list).

    Returns:
        dict of ``(B,)`` float64 tensors: with ``true_ddf``, ``epe_mean_field`` (EPE of the mean field) and
        ``epe_single`` (the mean over samples of each sample's EPE); with labels, ``dice_mean_field`` and
        ``dice_single`` likewise (the aggregate Dice of the label set); always ``folding_mean_field`` and
        ``folding_single`` (folding %).

    Raises:
        ValueError: bad shapes, or only one of the two label maps.
    """
    fields = _check_fields(fields).float().cpu()
    n, b = fields.shape[:2]
    mean = fields.mean(0)
    flat = fields.reshape(n * b, *fields.shape[2:])
    out: dict[str, Tensor] = {
        "folding_mean_field": metrics.folding_percent(mean),
        "folding_single": metrics.folding_percent(flat).view(n, b).mean(0)}
    if true_ddf is not None:
        true_ddf = torch.as_tensor(true_ddf).float().cpu()
        out["epe_mean_field"] = metrics.endpoint_error(mean, true_ddf)
        out["epe_single"] = metrics.endpoint_error(flat, true_ddf.repeat(n, *[1] * (true_ddf.ndim - 1))).view(n, b).mean(0)
    if (moving_label is None) != (fixed_label is None):
        raise ValueError("give both moving_label and fixed_label, or neither")
    if moving_label is not None:
        ml, fl = torch.as_tensor(moving_label).cpu(), torch.as_tensor(fixed_label).cpu()
        reps = [n] + [1] * (ml.ndim - 1)
        out["dice_mean_field"] = _dice(mean, ml, fl, labels)
        out["dice_single"] = _dice(flat, ml.repeat(*reps), fl.repeat(*reps), labels).view(n, b).mean(0)
    return out


def _dice(ddf: Tensor, moving_label: Tensor, fixed_label: Tensor, labels: str | Sequence[int]) -> Tensor:
    """The aggregate Dice of :func:`diffreg.metrics.registration_report` (labels warped with nearest
    interpolation), without its other metrics; ``(B,)``."""
    from diffreg.spatial import warp

    ml = moving_label if moving_label.ndim == ddf.ndim else moving_label[:, None]
    warped = warp(ml.float(), ddf, mode="nearest").round().long()[:, 0]
    fl = fixed_label[:, 0] if fixed_label.ndim == ddf.ndim else fixed_label
    if labels == "acdc":
        return metrics.acdc_dice(warped, fl)["overall"]
    if labels == "camus":
        return metrics.camus_dice(warped, fl)["overall"]
    d = metrics.dice(warped, fl, [int(v) for v in labels])
    return torch.where(torch.isnan(d), torch.zeros_like(d), d).sum(1) / (~torch.isnan(d)).sum(1).clamp_min(1)


@torch.no_grad()
def spread_columns(model: torch.nn.Module, moving: Tensor, fixed: Tensor, n: int, true_ddf: Tensor | None = None,
                   bins: int = 10, **sampler_options: Any) -> dict[str, float]:
    """The spread statistics of one pair as table columns (what ``evaluate(..., samples=n)`` adds per case).

    Draws ``n`` fields with :func:`sample_fields` (from ``seed``, default 0, of ``sampler_options``) and returns
    ``samples`` (n), ``spread_mean`` and ``spread_max`` (voxels, over the voxels of the pair),
    ``fold_probability_mean`` (mean over voxels of the per-voxel probability of folding) and, with ``true_ddf``
    (``(1, ndim, *spatial)`` or ``(ndim, *spatial)``, voxels): ``epe_mean_field`` and ``epe_single`` (see
    :func:`mean_vs_single`), ``spearman_spread_error`` and ``ece_spread`` (:func:`calibration` of the spread against
    the error of the mean field, ``n_samples=n``, ``bins`` quantile bins, voxels).

    Explained in chapter 11.

    Raises:
        ValueError: as :func:`sample_fields` (e.g. a deterministic model), or a batch of more than one pair.
    """
    if moving.shape[0] != 1:
        raise ValueError(f"spread_columns takes one pair (batch 1), got a batch of {moving.shape[0]}")
    seed = sampler_options.pop("seed", 0)
    fields = sample_fields(model, moving, fixed, n, seed=0 if seed is None else int(seed), **sampler_options)
    stats = field_statistics(fields)
    spread = stats["spread"].cpu()
    row = {"samples": float(n), "spread_mean": float(spread.mean()), "spread_max": float(spread.max()),
           "fold_probability_mean": float(stats["fold_probability"].mean())}
    if true_ddf is not None:
        true_ddf = torch.as_tensor(true_ddf).float().cpu()
        true_ddf = true_ddf[None] if true_ddf.ndim == fields.ndim - 2 else true_ddf
        err = endpoint_error_map(stats["mean"].cpu(), true_ddf)
        cal = calibration(spread, err, bins=bins, n_samples=n)
        both = mean_vs_single(fields, true_ddf)
        row.update({"epe_mean_field": float(both["epe_mean_field"][0]), "epe_single": float(both["epe_single"][0]),
                    "spearman_spread_error": cal["spearman"], "ece_spread": cal["ece"]})
    return row
