"""Measurements that look inside a trained model, for the chapters and ``benchmarks/`` (not needed to train or
register).

* :func:`denoiser_error_per_timestep`: DiffuseReg's denoiser at each noise level (chapter 06, "Why the samples
  fold"; ``benchmarks/diagnose_diffusereg.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffreg import losses
from diffreg.models.diffusereg import DiffuseReg

__all__ = ["denoiser_error_per_timestep"]


@torch.no_grad()
def denoiser_error_per_timestep(model: DiffuseReg, moving: Tensor, fixed: Tensor,
                                timesteps: Sequence[int] | None = None, seed: int = 0) -> list[dict[str, float]]:
    """The denoiser's error at each noise level on given pairs, against the truth the training uses (eq. 3-4).

    For each ``t``: ``phi_0`` = the teacher's field (normalised), ``phi_t = q_sample(phi_0, t, eps)`` with fresh
    noise (seeded, the same ``eps`` for every ``t``), the model's ``eps_hat`` and ``phi0_hat`` (eq. 3). Reported:

    * ``eps_mse``: ``mean (eps_hat - eps)^2`` (eq. 4, the training loss; 1 for a predictor of zeros);
    * ``v_mse``: ``mean (v_hat - v)^2 = eps_mse / abar_t`` (the v-prediction loss);
    * ``x0_rmse``: RMS of ``phi0_hat - phi_0`` in **voxels** (after undoing the normalisation): how far the
      estimate of the final field is from the teacher at that noise level;
    * ``x0_rmse_trivial``: the same for the estimate ``phi_t / sqrt(abar_t)`` (``eps_hat = 0``), which only rescales
      the noisy field. It grows without bound with ``t`` (about 280 voxels at ``t = T - 1`` of the quick schedule), so
      beating it says nothing at high noise;
    * ``x0_rmse_mean_field``: the same for the mean training field (``phi0_hat`` = ``field_mean``, whatever the
      images): the informative baseline, what a denoiser that learned nothing from the images would reach;
    * ``x0_sensitivity``: how much of a change of its input ``phi_t`` reaches the estimate: ``phi_t`` is redrawn with a
      second noise sample at the same ``t`` and ``RMS(phi0_hat' - phi0_hat)`` is divided by ``RMS`` of the same change
      of the trivial estimate (voxels / voxels). 0: the estimate ignores ``phi_t`` (the ideal denoiser when the
      target given the images is a single field, as with a deterministic teacher); 1: it passes the change on like
      the trivial estimate;
    * ``x0_hf``: the high-frequency energy of ``phi0_hat`` (mean squared forward difference, voxels^2, the
      :func:`diffreg.losses.gradient_smoothness` of the field) beside ``teacher_hf`` (the teacher's): roughness the
      estimate adds is what folds after sampling.

    Explained in chapter 06 ("Why the samples fold").

    Args:
        model: a :class:`DiffuseReg` with a trained (or given) teacher.
        moving, fixed: ``(B, 1, *spatial)`` pairs.
        timesteps: the ``t`` values (default: 20 values spread over ``0 ... T - 1``).
        seed: seeds the noise.

    Returns:
        One dict per ``t`` with ``t``, ``abar`` and the columns above (means over the batch).

    Raises:
        ValueError: bad inputs or a timestep outside ``[0, T - 1]``.
    """
    model._check(moving, fixed)
    T = model.schedule.num_timesteps
    ts = list(timesteps) if timesteps is not None else sorted({int(round(float(x))) for x in torch.linspace(0, T - 1, 20)})
    if any(int(t) != t or not 0 <= t < T for t in ts):
        raise ValueError(f"timesteps must be integers in [0, {T - 1}], got {ts}")
    teacher = model.teacher_field(moving, fixed)
    x0 = model.normalize(teacher)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    noise2 = torch.randn(x0.shape, generator=g).to(x0.device)   # a second phi_t at the same t: the sensitivity
    cond = model.denoiser.encode(moving, fixed)
    std = model._stat(model.field_std, x0)
    rows = []
    for t in ts:
        tb = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        x_t = model.schedule.q_sample(x0, tb, noise)
        eps_hat = model.predict_eps(x_t, tb, cond)
        abar = float(model.schedule.alphas_cumprod[int(t)])
        x0_hat = model.schedule.predict_x0(x_t, tb, eps_hat)
        trivial = x_t / math.sqrt(abar)
        phi0_hat = model.denormalize(x0_hat)
        eps_mse = float(((eps_hat - noise) ** 2).mean())
        x_t2 = model.schedule.q_sample(x0, tb, noise2)
        x0_hat2 = model.schedule.predict_x0(x_t2, tb, model.predict_eps(x_t2, tb, cond))
        moved = float((((x_t2 - x_t) / math.sqrt(abar) * std) ** 2).mean().sqrt())
        rows.append({
            "t": int(t), "abar": abar, "eps_mse": eps_mse, "v_mse": eps_mse / abar,
            "x0_rmse": float((((x0_hat - x0) * std) ** 2).mean().sqrt()),
            "x0_rmse_trivial": float((((trivial - x0) * std) ** 2).mean().sqrt()),
            "x0_rmse_mean_field": float(((x0 * std) ** 2).mean().sqrt()),
            "x0_sensitivity": float((((x0_hat2 - x0_hat) * std) ** 2).mean().sqrt()) / max(moved, 1e-12),
            "x0_hf": float(losses.gradient_smoothness(phi0_hat)),
            "teacher_hf": float(losses.gradient_smoothness(teacher)),
        })
    return rows
