"""Registration metrics: Dice, Jacobian determinant statistics, HD95, end-point error, and a per-case report.

Explained in chapter 01 (``notebooks/01_registration.md``). Every table in the book uses these definitions:

* **Dice** per label, ``2|P ∩ T| / (|P| + |T|)``, NaN when the label is absent from both maps.
* **ACDC overall Dice** (DiffuseMorph / FSDiffReg / DiffuseReg code): the mean of five columns per case — LV cavity
  (label 3), Myo (2), LV cavity + Myo (2 ∪ 3), RV (1), whole heart (all foreground) — averaged over cases.
  LDM-Morph's ACDC number is the mean of LV and Myo; on CAMUS it reports the LV Dice.
* ``jacobian_determinant``: ``det(I + grad u)`` with ``numpy.gradient`` differences (central in the interior,
  one-sided first order at the border), voxel units.
* ``folding_percent`` = 100 x fraction of voxels with ``det <= 0`` over the whole field;
  ``jacobian_std`` = population SD (``ddof=0``) of ``det``; ``sdlogj`` = population SD of
  ``log(max(det, 1e-9))``.
* ``hd95``: MONAI's 95th-percentile symmetric Hausdorff distance between label surfaces, in physical units.

Inputs may be torch tensors or numpy arrays; results are torch tensors (float64) on the CPU unless noted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ACDC_LABELS", "CAMUS_LABELS", "dice", "acdc_dice", "camus_dice", "jacobian_determinant", "folding_percent",
    "jacobian_std", "sdlogj", "jacobian_statistics", "hd95", "label_volume", "ejection_fraction",
    "ejection_fraction_report", "LV_LABEL", "endpoint_error", "registration_report", "warped_dice", "psnr", "nmse",
]

ArrayLike = Union[Tensor, np.ndarray]

#: ACDC label names (1 = RV, 2 = Myo, 3 = LV cavity).
ACDC_LABELS: dict[str, int] = {"rv": 1, "myo": 2, "lv": 3}
#: CAMUS label names (1 = LV cavity, 2 = Myo, 3 = LA).
CAMUS_LABELS: dict[str, int] = {"lv": 1, "myo": 2, "la": 3}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")


def _label_maps(pred: ArrayLike, target: ArrayLike) -> tuple[Tensor, Tensor]:
    """Integer maps ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> two ``(B, *spatial)`` tensors."""
    p, t = _as_tensor(pred, "pred"), _as_tensor(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} must have the same shape.")
    for name, x in (("pred", p), ("target", t)):
        if x.is_floating_point() and not bool(torch.all(x == torch.round(x))):
            raise ValueError(f"{name} must be an integer label map, got non-integer values (dtype {x.dtype}).")
    if p.ndim in (4, 5) and p.shape[1] == 1:
        p, t = p[:, 0], t[:, 0]
    if p.ndim not in (3, 4):
        raise ValueError(
            f"label maps must be (B, 1, *spatial) or (B, *spatial) with 2 or 3 spatial dims, got {tuple(p.shape)}."
        )
    return p.detach().cpu().long(), t.detach().cpu().long()


def _check_ddf(ddf: ArrayLike, name: str = "ddf") -> Tensor:
    u = _as_tensor(ddf, name)
    ndim = u.ndim - 2
    if ndim not in (2, 3) or u.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (B, ndim, *spatial) with ndim in (2, 3), got {tuple(u.shape)}.")
    if any(s < 2 for s in u.shape[2:]):
        raise ValueError(f"{name} needs at least 2 voxels along every spatial axis, got {tuple(u.shape)}.")
    return u


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * ndim
    sp = tuple(float(s) for s in np.asarray(spacing).reshape(-1))
    if len(sp) != ndim or any(s <= 0 for s in sp):
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers, got {spacing}.")
    return sp


def _dice_masks(p: Tensor, t: Tensor) -> Tensor:
    """Dice of boolean masks ``(B, *spatial)`` -> ``(B,)`` float64, NaN when both are empty."""
    dims = tuple(range(1, p.ndim))
    inter = (p & t).sum(dims).double()
    total = (p.sum(dims) + t.sum(dims)).double()
    out = 2 * inter / total
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


# ----------------------------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------------------------

def dice(pred: ArrayLike, target: ArrayLike, labels: Sequence[int]) -> Tensor:
    """Dice overlap per label, ``2|P_l ∩ T_l| / (|P_l| + |T_l|)``.

    Explained in chapter 01.

    Args:
        pred: integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)`` (tensor or array).
        target: integer label map, same shape.
        labels: label values to score.

    Returns:
        ``(B, len(labels))`` float64; NaN where a label is absent from both maps.

    Raises:
        ValueError: on mismatched or non-integer maps, or an empty ``labels``.
    """
    p, t = _label_maps(pred, target)
    labels = [int(v) for v in labels]
    if len(labels) == 0:
        raise ValueError("labels must contain at least one label value.")
    return torch.stack([_dice_masks(p == v, t == v) for v in labels], dim=1)


def acdc_dice(pred: ArrayLike, target: ArrayLike) -> dict[str, Tensor]:
    """ACDC Dice columns and the flat "overall" mean used by DiffuseMorph / FSDiffReg / DiffuseReg.

    Explained in chapter 01. ACDC labels: 1 = RV, 2 = Myo, 3 = LV cavity.

    Args:
        pred: integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        target: integer label map, same shape.

    Returns:
        dict of ``(B,)`` float64 tensors: ``lv`` (label 3), ``myo`` (2), ``lv_myo`` (2 ∪ 3 as one region),
        ``rv`` (1), ``whole`` (all labels > 0 as one region) and ``overall`` = NaN-ignoring mean of those five
        per case (the papers then average ``overall`` over cases). LDM-Morph's ACDC number is
        ``(lv + myo) / 2`` instead.

    Raises:
        ValueError: on mismatched or non-integer maps.
    """
    p, t = _label_maps(pred, target)
    out = {
        "lv": _dice_masks(p == 3, t == 3),
        "myo": _dice_masks(p == 2, t == 2),
        "lv_myo": _dice_masks((p == 2) | (p == 3), (t == 2) | (t == 3)),
        "rv": _dice_masks(p == 1, t == 1),
        "whole": _dice_masks(p > 0, t > 0),
    }
    out["overall"] = _nanmean(torch.stack(list(out.values()), dim=1), dim=1)
    return out


def camus_dice(pred: ArrayLike, target: ArrayLike) -> dict[str, Tensor]:
    """CAMUS Dice columns. CAMUS labels: 1 = LV cavity, 2 = Myo, 3 = LA.

    Explained in chapter 01; used for LDM-Morph (chapter 07), which reports the LV Dice on CAMUS.

    Args:
        pred: integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        target: integer label map, same shape.

    Returns:
        dict of ``(B,)`` float64 tensors: ``lv`` (1), ``myo`` (2), ``la`` (3), ``lv_myo`` (1 ∪ 2 as one region) and
        ``overall`` = the LV Dice (what LDM-Morph reports on CAMUS).

    Raises:
        ValueError: on mismatched or non-integer maps.
    """
    p, t = _label_maps(pred, target)
    out = {
        "lv": _dice_masks(p == 1, t == 1),
        "myo": _dice_masks(p == 2, t == 2),
        "la": _dice_masks(p == 3, t == 3),
        "lv_myo": _dice_masks((p == 1) | (p == 2), (t == 1) | (t == 2)),
    }
    out["overall"] = out["lv"].clone()
    return out


def _nanmean(x: Tensor, dim: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nanmean(x, dim=dim)


# ----------------------------------------------------------------------------------------------------------------
# Jacobian determinant statistics
# ----------------------------------------------------------------------------------------------------------------

def jacobian_determinant(ddf: ArrayLike) -> Tensor:
    """Jacobian determinant of the deformation ``phi(p) = p + u(p)``: ``det(I + grad u)``.

    ``(grad u)[i, j] = d u_i / d x_j`` where ``i`` is the channel and ``j`` the spatial axis (array order), computed
    with ``numpy.gradient`` semantics (``torch.gradient``, ``edge_order=1``): central differences in the interior,
    one-sided first-order differences on the border; voxel units (unit spacing). A displacement in voxel units
    gives the same determinant as the same field in mm with the matching spacing, so no spacing is needed.

    Explained in chapter 01.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement (tensor or array), ``ndim`` in {2, 3}, at least 2 voxels per axis.

    Returns:
        ``(B, *spatial)`` determinant, float64, on the device of ``ddf``.

    Raises:
        ValueError: on a bad field shape.
    """
    u = _check_ddf(ddf).double()
    ndim = u.shape[1]
    spatial_dims = tuple(range(2, 2 + ndim))
    # grads[j] = d u / d x_j, shape (B, ndim_i, *spatial)
    grads = torch.gradient(u, dim=spatial_dims, edge_order=1)
    jac = torch.stack(grads, dim=2)  # (B, i, j, *spatial)
    eye = torch.eye(ndim, dtype=u.dtype, device=u.device).view(1, ndim, ndim, *([1] * ndim))
    jac = jac + eye
    if ndim == 2:
        return jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
    a = jac
    return (a[:, 0, 0] * (a[:, 1, 1] * a[:, 2, 2] - a[:, 1, 2] * a[:, 2, 1])
            - a[:, 0, 1] * (a[:, 1, 0] * a[:, 2, 2] - a[:, 1, 2] * a[:, 2, 0])
            + a[:, 0, 2] * (a[:, 1, 0] * a[:, 2, 1] - a[:, 1, 1] * a[:, 2, 0]))


def folding_percent(ddf: ArrayLike) -> Tensor:
    """Percentage of voxels where the deformation folds: ``100 * mean(det(I + grad u) <= 0)`` over the whole field.

    Explained in chapter 01.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement, voxel units.

    Returns:
        ``(B,)`` float64 percentage in [0, 100].

    Raises:
        ValueError: on a bad field shape.
    """
    return _folding_from_det(jacobian_determinant(ddf))


def jacobian_statistics(det: ArrayLike) -> dict[str, Tensor]:
    """The Jacobian statistics of a determinant map, one value per batch item.

    Args:
        det: ``(B, *spatial)`` determinants (:func:`jacobian_determinant`, or a world-space determinant).

    Returns:
        a dict of ``(B,)`` tensors: ``folding_percent`` (100 x the fraction of ``det <= 0``), ``jacobian_std`` (the
        SD of ``det``) and ``sdlogj`` (the SD of ``log(max(det, 1e-9))``): the quantities of :func:`folding_percent`,
        :func:`jacobian_std` and :func:`sdlogj`, from one determinant.
    """
    det = _as_tensor(det, "det")
    return {"folding_percent": _folding_from_det(det), "jacobian_std": _std_from_det(det),
            "sdlogj": _sdlogj_from_det(det)}


def _folding_from_det(det: Tensor) -> Tensor:
    return 100.0 * (det <= 0).flatten(1).double().mean(1)


def _std_from_det(det: Tensor) -> Tensor:
    return det.flatten(1).std(dim=1, correction=0)


def _sdlogj_from_det(det: Tensor) -> Tensor:
    return torch.log(det.clamp(min=1e-9)).flatten(1).std(dim=1, correction=0)


def jacobian_std(ddf: ArrayLike) -> Tensor:
    """Standard deviation of ``det(I + grad u)`` over voxels (population SD, ``ddof=0``), the "SD|J|" column.

    Explained in chapter 01.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement, voxel units.

    Returns:
        ``(B,)`` float64.

    Raises:
        ValueError: on a bad field shape.
    """
    return _std_from_det(jacobian_determinant(ddf))


def sdlogj(ddf: ArrayLike) -> Tensor:
    """Standard deviation of the log Jacobian determinant, ``SD(log(max(det, 1e-9)))`` (population SD, ``ddof=0``).

    Explained in chapter 01.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement, voxel units.

    Returns:
        ``(B,)`` float64.

    Raises:
        ValueError: on a bad field shape.
    """
    return _sdlogj_from_det(jacobian_determinant(ddf))


# ----------------------------------------------------------------------------------------------------------------
# Surface distance and end-point error
# ----------------------------------------------------------------------------------------------------------------

def hd95(pred: ArrayLike, target: ArrayLike, labels: Sequence[int],
         spacing: float | Sequence[float] | None = None) -> Tensor:
    """95th-percentile symmetric Hausdorff distance between label surfaces, in physical units.

    Computed with :func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``, ``include_background=True``
    on one binary channel per label, Euclidean metric): the surface of a mask is its voxels removed by one binary
    erosion (face connectivity, outside the image counts as background); for each surface voxel the distance to
    the nearest surface voxel of the other mask is taken (voxel coordinates scaled by ``spacing``); the 95th
    percentile (linear interpolation) is taken in each direction and the **larger** of the two is returned.

    Explained in chapter 01.

    Args:
        pred: integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        target: integer label map, same shape.
        labels: label values to score.
        spacing: voxel size along the spatial axes (array order), a number or one per axis; default 1.

    Returns:
        ``(B, len(labels))`` float64; NaN where a label is absent from either map.

    Raises:
        ValueError: on mismatched or non-integer maps, empty ``labels`` or a bad ``spacing``.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = _label_maps(pred, target)
    labels = [int(v) for v in labels]
    if len(labels) == 0:
        raise ValueError("labels must contain at least one label value.")
    sp = _spacing(spacing, p.ndim - 1)
    out = torch.full((p.shape[0], len(labels)), float("nan"), dtype=torch.float64)
    for b in range(p.shape[0]):
        for k, v in enumerate(labels):
            pm, tm = p[b] == v, t[b] == v
            if not bool(pm.any()) or not bool(tm.any()):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                val = compute_hausdorff_distance(pm[None, None], tm[None, None], include_background=True,
                                                 percentile=95, spacing=list(sp))
            out[b, k] = float(val.reshape(-1)[0])
    return out


def endpoint_error(ddf: ArrayLike, true_ddf: ArrayLike, mask: ArrayLike | None = None,
                   spacing: float | Sequence[float] | None = None) -> Tensor:
    """Mean end-point error: mean over voxels of ``|| (ddf - true_ddf) * spacing ||_2``.

    Explained in chapter 01 (the phantom data knows the true displacement; real data does not).

    Args:
        ddf: ``(B, ndim, *spatial)`` estimated displacement, voxel units.
        true_ddf: ``(B, ndim, *spatial)`` true displacement, voxel units.
        mask: optional boolean ``(B, 1, *spatial)`` or ``(B, *spatial)``; the mean is over masked voxels
            (NaN for an empty mask).
        spacing: voxel size per spatial axis (array order) to report in physical units; default 1 (voxels).

    Returns:
        ``(B,)`` float64.

    Raises:
        ValueError: on mismatched shapes or a bad ``spacing``.
    """
    u, v = _check_ddf(ddf), _check_ddf(true_ddf, "true_ddf")
    if u.shape != v.shape:
        raise ValueError(f"ddf {tuple(u.shape)} and true_ddf {tuple(v.shape)} must have the same shape.")
    ndim = u.shape[1]
    sp = torch.tensor(_spacing(spacing, ndim), dtype=torch.float64, device=u.device).view(1, ndim, *([1] * ndim))
    err = ((u.double() - v.double().to(u.device)) * sp).pow(2).sum(1).sqrt()  # (B, *spatial)
    if mask is None:
        return err.flatten(1).mean(1)
    m = _as_tensor(mask, "mask").to(u.device)
    if m.ndim == err.ndim + 1 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != err.shape:
        raise ValueError(f"mask must be (B, 1, *spatial) or (B, *spatial) matching {tuple(err.shape)}, "
                         f"got {tuple(m.shape)}.")
    m = m.bool().flatten(1)
    e = err.flatten(1)
    return (e * m).sum(1) / m.sum(1).double()  # 0/0 -> NaN for an empty mask


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def _warp_labels(ddf: ArrayLike, moving_label: ArrayLike, fixed_label: ArrayLike):
    """``(ddf, warped moving label (B, *spatial) on the CPU, moving label, fixed label)`` after the shape checks."""
    from diffreg.spatial import warp

    u = _check_ddf(ddf)
    ml, fl = _label_maps(moving_label, fixed_label)
    if ml.shape[0] != u.shape[0] or tuple(ml.shape[1:]) != tuple(u.shape[2:]):
        raise ValueError(f"label maps {tuple(ml.shape)} do not match ddf {tuple(u.shape)} (batch and spatial shape).")
    uf = u if u.is_floating_point() else u.float()
    warped = warp(ml[:, None].to(uf.device), uf, mode="nearest").cpu()[:, 0]
    return u, warped, ml, fl


def registration_report(ddf: ArrayLike, moving_label: ArrayLike, fixed_label: ArrayLike,
                        labels: str | Sequence[int] = "acdc", spacing: float | Sequence[float] | None = None,
                        true_ddf: ArrayLike | None = None, direction: str | None = None) -> dict[str, Tensor]:
    """All per-case metrics of one registration, as a dict of ``(B,)`` tensors.

    ``moving_label`` is warped with nearest interpolation by :func:`diffreg.spatial.warp` (pull, border padding)
    and compared with ``fixed_label``.

    Explained in chapter 01; used by :func:`diffreg.evaluate.evaluate` for every table.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement, voxel units.
        moving_label: integer map ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        fixed_label: integer map, same shape.
        labels: ``"acdc"``, ``"camus"`` or a list of label values.
        spacing: voxel size per spatial axis (array order) for HD95 (EPE is reported in voxels); default 1.
        true_ddf: optional true displacement for the end-point error.
        direction: ``"ed->es"`` or ``"es->ed"`` when the pair is an ED/ES pair: adds the ejection-fraction columns
            of :func:`ejection_fraction_report` (``acdc`` and ``camus`` label sets).

    Returns:
        dict of ``(B,)`` float64 tensors:

        * ``dice_initial`` / ``dice``: the aggregate Dice before / after registration — ``acdc``: the "overall"
          flat mean of :func:`acdc_dice`; ``camus``: LV Dice (:func:`camus_dice`); a list: NaN-ignoring mean over
          the listed labels;
        * ``dice_<structure>`` after registration (``acdc``: lv, myo, lv_myo, rv, whole; ``camus``: lv, myo, la,
          lv_myo; list: ``dice_<label>``);
        * ``folding_percent``, ``jacobian_std``, ``sdlogj`` of ``ddf``;
        * ``hd95``: NaN-ignoring mean over the individual labels (1, 2, 3 for acdc/camus) of :func:`hd95`, plus
          ``hd95_<structure>`` per label;
        * ``epe_initial`` / ``epe`` (:func:`endpoint_error` over all voxels, in voxels) of the identity / of
          ``ddf`` when ``true_ddf`` is given;
        * ``ef_true``, ``ef``, ``ef_error`` (:func:`ejection_fraction_report`) when ``direction`` is given.

    Raises:
        ValueError: on inconsistent shapes or an unknown label set.
    """
    u, warped, ml, fl = _warp_labels(ddf, moving_label, fixed_label)
    if isinstance(labels, str):
        if labels == "acdc":
            fn, names = acdc_dice, ACDC_LABELS
        elif labels == "camus":
            fn, names = camus_dice, CAMUS_LABELS
        else:
            raise ValueError(f"labels must be 'acdc', 'camus' or a list of label values, got {labels!r}.")
        before, after = fn(ml, fl), fn(warped, fl)
        report = {"dice_initial": before["overall"], "dice": after["overall"]}
        report.update({f"dice_{k}": v for k, v in after.items() if k != "overall"})
    else:
        values = [int(v) for v in labels]
        names = {str(v): v for v in values}
        before, after = dice(ml, fl, values), dice(warped, fl, values)
        report = {"dice_initial": _nanmean(before, 1), "dice": _nanmean(after, 1)}
        report.update({f"dice_{v}": after[:, k] for k, v in enumerate(values)})

    det = jacobian_determinant(u)  # once for the three Jacobian statistics
    report.update({k: v.cpu() for k, v in jacobian_statistics(det).items()})
    hd = hd95(warped, fl, list(names.values()), spacing=spacing)
    report["hd95"] = _nanmean(hd, 1)
    report.update({f"hd95_{name}": hd[:, k] for k, name in enumerate(names)})
    if true_ddf is not None:
        # in voxels (like the fields themselves); before registration the error is the true motion itself
        report["epe_initial"] = endpoint_error(torch.zeros_like(u), true_ddf).cpu()
        report["epe"] = endpoint_error(u, true_ddf).cpu()
    if direction is not None and isinstance(labels, str):
        report.update(ejection_fraction_report(ml, fl, warped, direction, labels, spacing))
    return report


#: the left-ventricle cavity's label value per label set (ACDC: 3; CAMUS: 1, the LV endocardium)
LV_LABEL = {"acdc": 3, "camus": 1}


def label_volume(label: ArrayLike, value: int, spacing: float | Sequence[float] | None = None) -> Tensor:
    """Volume of the voxels equal to ``value`` per batch item, ``(B,)`` float64: the voxel count times the voxel
    volume (the product of ``spacing``; default 1). In mm^3 with spacings in mm (mL = mm^3 / 1000); an area in 2D."""
    lab = _as_tensor(label, "label")
    if lab.ndim >= 3 and lab.shape[1] == 1:
        lab = lab[:, 0]
    dims = lab.ndim - 1
    voxel = float(np.prod(_spacing(spacing, dims)))
    return (lab == int(value)).flatten(1).sum(1).double() * voxel


def ejection_fraction(edv: ArrayLike, esv: ArrayLike) -> Tensor:
    """``100 (EDV - ESV) / EDV`` (%), NaN where ``EDV <= 0``."""
    edv, esv = _as_tensor(edv, "edv").double(), _as_tensor(esv, "esv").double()
    return torch.where(edv > 0, 100.0 * (edv - esv) / edv.clamp_min(1e-12), torch.full_like(edv, float("nan")))


def ejection_fraction_report(moving_label: ArrayLike, fixed_label: ArrayLike, warped_label: ArrayLike,
                             direction: str, labels: str = "acdc",
                             spacing: float | Sequence[float] | None = None) -> dict[str, Tensor]:
    """The LV ejection fraction from labels propagated by a registration (FlowReg's clinical measure).

    The moving label is the one phase's segmentation; warped onto the other phase, it stands for that phase's
    segmentation. With ``direction="ed->es"`` (moving ED, fixed ES) the predicted EF is ``EF(V(ED), V(warped ED))``;
    with ``"es->ed"`` it is ``EF(V(warped ES), V(ES))``; the true EF is ``EF(V(ED), V(ES))`` from the two ground-truth
    labels, and ``ef_error = |ef - ef_true|`` in percentage points. On 2D slices the volumes are areas, and the
    "EF" is the slice's fractional area change, not the clinical (volumetric) EF. Explained in the book's FlowReg
    chapter.

    Args:
        moving_label, fixed_label, warped_label: integer maps ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        direction: ``"ed->es"`` or ``"es->ed"``.
        labels: ``"acdc"`` or ``"camus"`` (:data:`LV_LABEL`).
        spacing: voxel size per axis (it cancels in the EF).

    Returns:
        ``{"ef_true", "ef", "ef_error"}``, ``(B,)`` float64 tensors.

    Raises:
        ValueError: an unknown direction or label set.
    """
    if direction not in ("ed->es", "es->ed"):
        raise ValueError(f"direction must be 'ed->es' or 'es->ed', got {direction!r}")
    if labels not in LV_LABEL:
        raise ValueError(f"labels must be one of {sorted(LV_LABEL)} for the ejection fraction, got {labels!r}")
    lv = LV_LABEL[labels]
    vm, vf, vw = (label_volume(x, lv, spacing) for x in (moving_label, fixed_label, warped_label))
    ed, es, pred = (vm, vf, ejection_fraction(vm, vw)) if direction == "ed->es" else (vf, vm, ejection_fraction(vw, vm))
    true = ejection_fraction(ed, es)
    return {"ef_true": true, "ef": pred, "ef_error": (pred - true).abs()}


def warped_dice(ddf: ArrayLike, moving_label: ArrayLike, fixed_label: ArrayLike,
                labels: str = "acdc") -> dict[str, Tensor]:
    """Dice after warping ``moving_label`` with ``ddf`` (nearest), without the rest of :func:`registration_report`.

    The light-weight version for loops over many fields (a trajectory, a sweep): the same Dice values as the report's
    ``dice`` and ``dice_<structure>`` columns, no HD95 or Jacobian.

    Explained in chapter 01; used in chapters 04 and 06.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement, voxel units.
        moving_label, fixed_label: integer maps ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        labels: ``"acdc"`` (:func:`acdc_dice`) or ``"camus"`` (:func:`camus_dice`).

    Returns:
        The dict of :func:`acdc_dice` / :func:`camus_dice`: ``(B,)`` tensors per structure and ``"overall"`` (the
        aggregate of the table's ``dice`` column).

    Raises:
        ValueError: on inconsistent shapes or an unknown label set.
    """
    if labels not in ("acdc", "camus"):
        raise ValueError(f"labels must be 'acdc' or 'camus', got {labels!r}.")
    _, warped, _, fl = _warp_labels(ddf, moving_label, fixed_label)
    return (acdc_dice if labels == "acdc" else camus_dice)(warped, fl.cpu())


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / mean((a - b)^2))`` in dB over all elements.

    Used by DiffuseMorph's Table 2 (continuous deformation against the true intermediate frames; chapter 04).

    Raises:
        ValueError: on mismatched shapes or a non-positive range.
    """
    a, b = _as_tensor(a, "a").double(), _as_tensor(b, "b").double()
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape.")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}.")
    return 10 * torch.log10(data_range ** 2 / ((a - b) ** 2).mean())


def nmse(a: ArrayLike, b: ArrayLike) -> Tensor:
    """Normalised mean squared error ``sum((a - b)^2) / sum(b^2)`` of ``a`` against the reference ``b`` (chapter 04).

    Raises:
        ValueError: on mismatched shapes.
    """
    a, b = _as_tensor(a, "a").double(), _as_tensor(b, "b").double()
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape.")
    return ((a - b) ** 2).sum() / (b ** 2).sum()
