"""Synthetic cardiac phantoms with a known (true) motion, and writers of the real on-disk dataset layouts.

Explained in chapter 01 (``notebooks/01_registration.md``): real data never tells us the true displacement
between two frames; a phantom does, so the end-point error of a registration can be measured.

Three kinds of sequences, each a :class:`PhantomSequence`:

* :func:`make_sax_2d` -- a short-axis cine-MR-like slice: bright LV blood pool, dark-grey myocardium, bright RV
  crescent with a thin free wall, papillary muscles, a textured body with lungs and chest wall, Rician noise.
  ACDC labels (1 = RV, 2 = Myo, 3 = LV cavity).
* :func:`make_sax_3d` -- the same anatomy as a short-axis stack (a truncated half-ellipsoid LV tapering to the
  apex, a shorter RV) with ACDC-like anisotropic slices; the motion adds the descent of the base.
* :func:`make_echo_2d` -- an apical two- or four-chamber echocardiography-like view: fan-shaped field of view,
  dark bullet-shaped LV cavity, bright myocardium, dark LA below the mitral plane, multiplicative Rayleigh
  speckle bound to the tissue. CAMUS labels (1 = LV cavity, 2 = Myo, 3 = LA).

**Motion model.** Every frame ``t`` is defined by pulling the analytic end-diastolic (ED) anatomy through a smooth,
invertible map: ``frame_t(p) = ED(p + u_t(p))`` (``u_0 = 0``), where the anatomy is *rendered analytically* at the
points ``p + u_t(p)`` (no resampling blur, slightly anti-aliased edges). The labels are rendered the same way, so
they are exactly consistent with the images. For the short axis, ``p + u_t(p)`` is the composition of

0. an in-plane shift of the whole heart by 5-9 mm, fading to zero in the body (``shift``: in cine short-axis
   slices through-plane motion and breathing displace the heart between ED and ES),
1. a local contraction of the RV about its centre (``rv_beta``),
2. an LV map in polar coordinates about the LV centre: the cavity is scaled, the myocardium follows the
   area-preserving (incompressible) map ``R = sqrt(r^2 + k)`` -- so it thickens as the cavity shrinks -- with a
   small twist; both fade smoothly to zero in the body,
3. (3D) the descent of the base towards the apex (through-plane),
4. a random smooth low-frequency perturbation of under a millimetre.

Each step is invertible with a positive Jacobian, so is ``u_t``. The end-systolic (ES) LV cavity area is 40-60 % of
the ED area (``area_ratio``), as in real hearts. For the echo view the map combines longitudinal shortening (the
apex stays, the mitral plane moves towards it by 10-20 % of the LV length, the LA grows) and a radial inward motion.

**True displacement.** For a registration pair (moving frame ``a``, fixed frame ``b``) :meth:`PhantomSequence.pair`
returns the field ``d`` with ``moving(p + d(p)) = fixed(p)``: since ``frame_a(q) = ED(q + u_a(q))``, ``d`` solves
``d(p) = u_b(p) - u_a(p + d(p))`` (for ``b`` = ED: ``d`` is the inverse of ``u_a``), computed by fixed-point iteration
with linear interpolation of ``u_a``.

**Writers.** :func:`write_acdc`, :func:`write_acdc_h5` and :func:`write_camus` write phantom patients in the official
ACDC NIfTI layout, the common preprocessed ACDC HDF5 layout and the CAMUS NIfTI layout, so that the real loaders
(:mod:`diffreg.data.pairs`) are exercised on a fresh machine. They only write inside the given root and refuse to
overwrite existing files. Each layout's files are written by the writer beside its reader
(:func:`diffreg.data.acdc.write_acdc_patient`, :func:`diffreg.data.acdc.write_acdc_h5_frame`,
:func:`diffreg.data.camus.write_camus_view`), which DRDM's synthesis (:mod:`diffreg.synthesize`) uses too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffreg.data.acdc import write_acdc_h5_frame, write_acdc_patient
from diffreg.data.camus import write_camus_view
from diffreg.data.io import prepare_root

__all__ = [
    "PhantomSequence",
    "make_sax_2d",
    "make_sax_3d",
    "make_echo_2d",
    "make_phantom",
    "pair_ddf",
    "warp_array",
    "write_acdc",
    "write_acdc_h5",
    "write_camus",
    "write_phantom",
    "ACDC_LABELS",
    "CAMUS_LABELS",
]

#: ACDC label values (name -> value).
ACDC_LABELS = {"rv": 1, "myo": 2, "lv": 3}
#: CAMUS label values (name -> value).
CAMUS_LABELS = {"lv": 1, "myo": 2, "la": 3}


# ----------------------------------------------------------------------------------------------------------------
# numpy warping helpers (same pull convention as diffreg.spatial.warp: linear, border padding)
# ----------------------------------------------------------------------------------------------------------------


def _identity(shape: Sequence[int]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def warp_array(array: np.ndarray, ddf: np.ndarray, order: int = 1) -> np.ndarray:
    """Pull ``array`` through ``ddf``: ``warped(p) = array(p + ddf(p))`` (scipy, border padding).

    Args:
        array: ``(*spatial)`` or ``(C, *spatial)``.
        ddf: ``(ndim, *spatial)`` displacement in voxels, channel ``i`` along spatial axis ``i``.
        order: 1 (linear, images) or 0 (nearest, labels).

    Returns:
        The warped array, same shape and dtype as ``array``.
    """
    ddf = np.asarray(ddf, dtype=np.float64)
    ndim = ddf.shape[0]
    spatial = ddf.shape[1:]
    coords = _identity(spatial) + ddf
    arr = np.asarray(array)
    if arr.shape == spatial:
        return ndimage.map_coordinates(arr, coords, order=order, mode="nearest").astype(arr.dtype, copy=False)
    if arr.shape[1:] != spatial or len(spatial) != ndim:
        raise ValueError(f"array shape {arr.shape} does not match ddf shape {ddf.shape}.")
    return np.stack([ndimage.map_coordinates(a, coords, order=order, mode="nearest") for a in arr]).astype(
        arr.dtype, copy=False)


def pair_ddf(u_moving: np.ndarray, u_fixed: np.ndarray, iterations: int = 30) -> np.ndarray:
    """The displacement ``d`` that registers frame ``a`` (pull field ``u_moving``) to frame ``b`` (``u_fixed``).

    Frames are ``frame(q) = ED(q + u(q))``; ``d`` solves ``d(p) = u_fixed(p) - u_moving(p + d(p))`` so that
    ``moving(p + d(p)) = fixed(p)``. Fixed-point iteration (converges because ``|grad u| < 1``), with linear
    interpolation and border padding of ``u_moving`` (``torch.nn.functional.grid_sample``).

    Args:
        u_moving, u_fixed: ``(ndim, *spatial)`` pull fields in voxels.
        iterations: fixed-point iterations.

    Returns:
        ``(ndim, *spatial)`` float32 ``d`` in voxels.
    """
    import torch
    import torch.nn.functional as F

    u_moving = np.asarray(u_moving, dtype=np.float64)
    u_fixed = np.asarray(u_fixed, dtype=np.float64)
    if not np.any(u_moving):
        return u_fixed.astype(np.float32)
    ndim = u_moving.shape[0]
    shape = u_moving.shape[1:]
    um = torch.from_numpy(u_moving.astype(np.float32))[None]
    uf = torch.from_numpy(u_fixed.astype(np.float32))
    grid = torch.from_numpy(_identity(shape).astype(np.float32))
    # grid_sample wants (x, y[, z]) coordinates in [-1, 1] (align_corners=True: -1 and 1 are the border voxels)
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=torch.float32).reshape((ndim,) + (1,) * ndim)
    d = uf - um[0]
    for _ in range(iterations):
        pos = ((grid + d) * scale - 1.0).flip(0).movedim(0, -1)[None]
        d = uf - F.grid_sample(um, pos, mode="bilinear", padding_mode="border", align_corners=True)[0]
    return d.numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# the sequence container
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PhantomSequence:
    """A phantom cine sequence with labels and the true motion of every frame.

    Attributes:
        frames: ``(T, *spatial)`` float32 images in [0, 1].
        labels: ``(T, *spatial)`` uint8 label maps (ACDC or CAMUS values, see ``label_set``).
        motion: ``(T, ndim, *spatial)`` float32 pull fields ``u_t`` in voxels: ``frame_t(p) = ED(p + u_t(p))``;
            ``u_ed = 0``.
        spacing: voxel size in mm, array order.
        ed: index of the end-diastolic frame (0).
        es: index of the end-systolic frame.
        kind: ``"sax"``, ``"sax3d"`` or ``"echo"``.
        label_set: ``"acdc"`` or ``"camus"``.
        params: the random anatomy and motion parameters (mm, radians) the sequence was drawn with.
    """

    frames: np.ndarray
    labels: np.ndarray
    motion: np.ndarray
    spacing: tuple[float, ...]
    ed: int = 0
    es: int = 1
    kind: str = "sax"
    label_set: str = "acdc"
    params: dict = field(default_factory=dict, repr=False)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return self.frames.ndim - 1

    @property
    def n_frames(self) -> int:
        """Number of frames ``T``."""
        return self.frames.shape[0]

    def true_ddf(self, moving_index: int, fixed_index: int, iterations: int = 30) -> np.ndarray:
        """``(ndim, *spatial)`` float32 ``d`` in voxels with ``frames[moving](p + d(p)) = frames[fixed](p)``."""
        for i in (moving_index, fixed_index):
            if not -self.n_frames <= i < self.n_frames:
                raise IndexError(f"frame index {i} out of range for {self.n_frames} frames.")
        return pair_ddf(self.motion[moving_index], self.motion[fixed_index], iterations)

    def pair(self, moving_index: int, fixed_index: int) -> dict[str, np.ndarray]:
        """A registration pair as numpy arrays: ``moving``, ``fixed`` (``*spatial`` float32), ``moving_label``,
        ``fixed_label`` (uint8) and ``true_ddf`` (``(ndim, *spatial)`` float32, voxels)."""
        return {
            "moving": self.frames[moving_index],
            "fixed": self.frames[fixed_index],
            "moving_label": self.labels[moving_index],
            "fixed_label": self.labels[fixed_index],
            "true_ddf": self.true_ddf(moving_index, fixed_index),
        }


# ----------------------------------------------------------------------------------------------------------------
# analytic shapes
# ----------------------------------------------------------------------------------------------------------------


def _soft(sd: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased indicator of ``sd > 0`` (``sd`` a signed distance in mm, positive inside)."""
    return 0.5 * (1.0 + np.tanh(sd / (2.0 * width)))


def _ellipse_sd(y, x, cy, cx, a, b, theta) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to the ellipse with semi-axis ``a`` along the direction
    ``(sin theta, cos theta)`` (in (y, x)) and ``b`` across it. ``a``/``b`` may be arrays (tapered shapes)."""
    dy, dx = y - cy, x - cx
    s, c = math.sin(theta), math.cos(theta)
    q1 = dy * s + dx * c
    q2 = dy * c - dx * s
    a = np.maximum(a, 1e-3)
    b = np.maximum(b, 1e-3)
    rho = np.sqrt((q1 / a) ** 2 + (q2 / b) ** 2)
    grad = np.sqrt((q1 / a**2) ** 2 + (q2 / b**2) ** 2)
    return np.where(rho > 1e-9, (1.0 - rho) * rho / np.maximum(grad, 1e-12), np.minimum(a, b))


def _fourier(rng: np.random.Generator, n_modes: int, ndim: int, wavelengths: tuple[float, float],
             amplitude: float) -> list[tuple[np.ndarray, float, float]]:
    modes = []
    for _ in range(n_modes):
        direction = rng.normal(size=ndim)
        direction /= np.linalg.norm(direction) + 1e-12
        k = 2 * math.pi / rng.uniform(*wavelengths) * direction
        modes.append((k, rng.uniform(0, 2 * math.pi), amplitude * rng.uniform(0.5, 1.0)))
    return modes


def _eval_fourier(modes, points: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros_like(points[0])
    for k, phase, amp in modes:
        arg = phase
        for ki, pi in zip(k, points):
            arg = arg + ki * pi
        out = out + amp * np.cos(arg)
    return out


def _taper(r: np.ndarray, r0, r1) -> np.ndarray:
    """1 for ``r <= r0``, cosine fall-off to 0 at ``r1``."""
    t = np.clip((r - r0) / np.maximum(np.asarray(r1) - r0, 1e-6), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(math.pi * t))


def _phases_cycle(n_frames: int) -> tuple[np.ndarray, int]:
    """Contraction phase ``s_t`` in [0, 1] over a cardiac cycle starting at ED; ES at ~40 % of the cycle."""
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2 (ED and ES), got {n_frames}.")
    es = max(1, int(round(0.4 * (n_frames - 1))))
    t = np.arange(n_frames, dtype=np.float64)
    s = np.where(t <= es, 0.5 * (1 - np.cos(math.pi * t / es)),
                 0.5 * (1 + np.cos(math.pi * (t - es) / max(n_frames - es, 1))))
    return s, es


def _phases_systole(n_frames: int) -> tuple[np.ndarray, int]:
    """ED -> ES half cycle (CAMUS half sequences): ES is the last frame."""
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2 (ED and ES), got {n_frames}.")
    t = np.arange(n_frames, dtype=np.float64)
    return 0.5 * (1 - np.cos(math.pi * t / (n_frames - 1))), n_frames - 1


def _grid_mm(shape: Sequence[int], spacing: Sequence[float], centred: Sequence[bool]) -> list[np.ndarray]:
    axes = []
    for n, sp, c in zip(shape, spacing, centred):
        i = np.arange(n, dtype=np.float64)
        axes.append((i - (n - 1) / 2) * sp if c else (i + 0.5) * sp)
    return list(np.meshgrid(*axes, indexing="ij"))


# ----------------------------------------------------------------------------------------------------------------
# short axis (2D slice and 3D stack)
# ----------------------------------------------------------------------------------------------------------------


def _sax_params(rng: np.random.Generator, fov: tuple[float, float], depth: float | None, sz: float | None) -> dict:
    p: dict = {}
    fy, fx = fov
    p["c"] = (rng.uniform(-0.05, 0.05) * fy, rng.uniform(-0.05, 0.05) * fx)
    r0 = rng.uniform(19.0, 25.0)
    ecc = rng.uniform(0.82, 1.0)
    p["a"], p["b"] = r0 / math.sqrt(ecc), r0 * math.sqrt(ecc)
    p["r0"] = r0
    p["theta"] = rng.uniform(0, math.pi)
    p["thick"] = rng.uniform(7.0, 11.0)
    repi = r0 + p["thick"]
    p["repi"] = repi
    psi = math.pi + rng.uniform(0.0, 0.5)  # RV to the image left, slightly up (radiological SAX view)
    p["psi"] = psi
    u = (math.sin(psi), math.cos(psi))
    d = repi * rng.uniform(0.7, 0.9)
    p["rv_c"] = (p["c"][0] + d * u[0], p["c"][1] + d * u[1])
    p["rv_a"], p["rv_b"] = repi * rng.uniform(0.75, 0.95), repi * rng.uniform(1.25, 1.55)
    p["rv_wall"] = rng.uniform(2.5, 3.5)
    p["rv_centre"] = (p["c"][0] + 1.15 * repi * u[0], p["c"][1] + 1.15 * repi * u[1])
    p["pap"] = [(psi + math.pi + sgn * rng.uniform(0.5, 0.8), 0.6 * r0, rng.uniform(2.5, 3.5)) for sgn in (-1, 1)]
    # intensities
    p["i_lv"] = rng.uniform(0.78, 0.95)
    p["i_rv"] = p["i_lv"] * rng.uniform(0.88, 1.0)
    p["i_myo"] = rng.uniform(0.18, 0.3)
    p["i_body"] = rng.uniform(0.38, 0.5)
    p["i_lung"] = rng.uniform(0.05, 0.12)
    p["i_air"] = 0.02
    p["body"] = (rng.uniform(0.1, 0.2) * fy, rng.uniform(-0.05, 0.05) * fx, 0.55 * fy, 0.75 * fx)
    p["lungs"] = [(rng.uniform(-0.05, 0.1) * fy, sgn * rng.uniform(0.45, 0.55) * fx, 0.25 * fy, 0.15 * fx)
                  for sgn in (-1, 1)]
    ndim = 2 if depth is None else 3
    p["texture"] = _fourier(rng, 4, ndim, (15.0, 60.0), 0.03)
    p["noise"] = rng.uniform(0.015, 0.03)
    # motion
    p["area_ratio"] = rng.uniform(0.4, 0.6)  # ES / ED LV cavity area
    p["twist"] = math.radians(rng.uniform(-8.0, 8.0))
    p["rv_beta"] = rng.uniform(0.3, 0.5)
    # in-plane shift of the whole heart between ED and ES (through-plane motion and breathing move the heart in
    # cine short-axis slices by several mm), fading to zero in the body
    ang_shift = rng.uniform(0, 2 * math.pi)
    mag_shift = rng.uniform(5.0, 9.0)
    p["shift"] = (mag_shift * math.sin(ang_shift), mag_shift * math.cos(ang_shift))
    p["pert"] = [_fourier(rng, 2, ndim, (50.0, 100.0), rng.uniform(0.3, 0.8)) for _ in range(ndim)]
    if depth is not None:
        p["zb"] = rng.uniform(0.3, 0.7) * sz
        p["L"] = float(np.clip(rng.uniform(0.62, 0.75) * depth, 40.0, 90.0))
        p["L_apex"] = p["L"] + 0.8 * p["thick"]
        p["L_rv"] = 0.8 * p["L"]
        p["descent"] = rng.uniform(6.0, 12.0)
    return p


def _extent(z: np.ndarray | None, p: dict, length_key: str) -> np.ndarray | float:
    """Radius scale of a half-ellipsoid (base at ``zb``, semi-length ``p[length_key]``) at depth ``z``."""
    if z is None:
        return 1.0
    t = (z - p["zb"]) / p[length_key]
    return np.where(t >= 0, np.sqrt(np.clip(1.0 - t**2, 0.0, 1.0)), 0.0)


def _render_sax(pts: list[np.ndarray], p: dict, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and ACDC labels of the ED anatomy at points ``pts`` (mm; ``[y, x]`` or ``[z, y, x]``)."""
    if len(pts) == 3:
        z, y, x = pts
        fe, fo, fr = _extent(z, p, "L"), _extent(z, p, "L_apex"), _extent(z, p, "L_rv")
    else:
        y, x = pts
        z = None
        fe = fo = fr = 1.0
    cy, cx = p["c"]
    sd_endo = _ellipse_sd(y, x, cy, cx, p["a"] * fe, p["b"] * fe, p["theta"])
    sd_epi = _ellipse_sd(y, x, cy, cx, (p["a"] + p["thick"]) * fo, (p["b"] + p["thick"]) * fo, p["theta"])
    sd_rv = _ellipse_sd(y, x, *p["rv_c"], p["rv_a"] * fr, p["rv_b"] * fr, p["psi"])
    sd_rvw = _ellipse_sd(y, x, *p["rv_c"], (p["rv_a"] + p["rv_wall"]) * fr, (p["rv_b"] + p["rv_wall"]) * fr, p["psi"])
    if z is not None:  # nothing of the ventricles above the base plane z = zb
        sd_endo, sd_epi, sd_rv, sd_rvw = (np.minimum(s, z - p["zb"]) for s in (sd_endo, sd_epi, sd_rv, sd_rvw))
    sd_pap = np.full_like(y, -1e3)
    for ang, dist, rad in p["pap"]:
        py, px = cy + dist * math.sin(ang) * fe, cx + dist * math.cos(ang) * fe
        sd_pap = np.maximum(sd_pap, _ellipse_sd(y, x, py, px, rad * fe, rad * fe, 0.0))
    sd_pap = np.minimum(sd_pap, sd_endo - 0.5)

    by, bx, ba, bb = p["body"]
    img = np.full_like(y, p["i_air"])
    body_val = p["i_body"] + _eval_fourier(p["texture"], pts)
    img = img + (body_val - img) * _soft(_ellipse_sd(y, x, by, bx, ba, bb, math.pi / 2), width)
    for ly, lx, la, lb in p["lungs"]:
        img = img + (p["i_lung"] - img) * _soft(_ellipse_sd(y, x, ly, lx, la, lb, math.pi / 2), width)
    img = img + (p["i_myo"] - img) * _soft(sd_rvw, width)
    img = img + (p["i_rv"] - img) * _soft(sd_rv, width)
    img = img + (p["i_myo"] - img) * _soft(sd_epi, width)
    img = img + (p["i_lv"] - img) * _soft(sd_endo, width)
    img = img + (p["i_myo"] - img) * _soft(sd_pap, width)

    lab = np.zeros(y.shape, np.uint8)
    lab[sd_rv > 0] = 1
    lab[sd_epi > 0] = 2
    lab[sd_endo > 0] = 3
    return img, lab


def _sax_pull(pts: list[np.ndarray], p: dict, s: float) -> list[np.ndarray]:
    """ED coordinates (mm) of the points ``pts`` of the frame at contraction phase ``s``."""
    if s == 0.0:
        return [q.copy() for q in pts]
    if len(pts) == 3:
        z, y, x = pts
        # 3. base descent (through plane): the ES base lies apical of the ED base -> pull towards the base
        r_ip = np.hypot(y - p["c"][0], x - p["c"][1])
        below = np.clip(1.0 - (z - p["zb"]) / p["L_apex"], 0.0, 1.0)
        above = np.clip(1.0 - (p["zb"] - z) / 20.0, 0.0, 1.0)
        prof = np.where(z >= p["zb"], below, above)
        lat = _taper(r_ip, p["repi"] + 5.0, p["repi"] + 35.0)
        z1 = z - s * p["descent"] * prof * lat
        fe, fo, fr = _extent(z1, p, "L"), _extent(z1, p, "L_apex"), _extent(z1, p, "L_rv")
    else:
        y, x = pts
        z1 = None
        fe = fo = fr = 1.0
    # 0. heart shift: a translation of the heart region, tapered to zero in the body
    if "shift" in p:
        wh = _taper(np.hypot(y - p["c"][0], x - p["c"][1]), p["repi"] + 15.0, p["repi"] + 55.0)
        y, x = y + s * p["shift"][0] * wh, x + s * p["shift"][1] * wh
    # 1. RV: local anisotropic contraction about the RV centre
    ry, rx = p["rv_centre"]
    su, cu = math.sin(p["psi"]), math.cos(p["psi"])
    dy, dx = y - ry, x - rx
    q1, q2 = dy * su + dx * cu, dy * cu - dx * su
    g = np.exp(-0.5 * ((q1 / (0.45 * p["repi"])) ** 2 + (q2 / (0.9 * p["repi"])) ** 2))
    beta = s * p["rv_beta"] * fr
    y1, x1 = y + beta * g * dy, x + beta * g * dx
    # 2. LV: cavity scaling + incompressible myocardium + twist, in polar coordinates about the LV centre
    cy, cx = p["c"]
    dy, dx = y1 - cy, x1 - cx
    r = np.hypot(dy, dx)
    r0f = p["r0"] * fe
    k = s * (1.0 - p["area_ratio"]) * r0f**2
    rc = np.sqrt(np.maximum(r0f**2 - k, 1e-12))
    scale_c = np.where(r0f > 1e-6, r0f / rc, 1.0)
    big = np.sqrt(r**2 + k)
    G = np.where(r < rc, r * scale_c, big)
    r_w0 = p["repi"] * fo + 3.0
    w = _taper(r, r_w0, r_w0 + max(1.2 * p["repi"], 25.0))
    R = r + w * (G - r)
    ratio = np.where(r > 1e-9, R / np.maximum(r, 1e-9), scale_c)
    ang = s * p["twist"] * w
    ca, sa = np.cos(ang), np.sin(ang)
    y2 = cy + ratio * (dx * sa + dy * ca)
    x2 = cx + ratio * (dx * ca - dy * sa)
    out = [y2, x2] if z1 is None else [z1, y2, x2]
    # 4. smooth low-frequency perturbation
    return [o + s * _eval_fourier(m, pts) for o, m in zip(out, p["pert"])]


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.normal(0, sigma, img.shape)
    n2 = rng.normal(0, sigma, img.shape)
    return np.sqrt((img + n1) ** 2 + n2**2)


def _as_size(size, ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(size, (int, np.integer)):
        size = (int(size),) * ndim
    size = tuple(int(s) for s in size)
    if len(size) != ndim or min(size[-2:]) < 8 or min(size) < 2:
        raise ValueError(f"{name}: size must be an int or {ndim} ints (>= 8 in plane, >= 2 slices), got {size}.")
    return size


def _make_sax(size: tuple[int, ...], n_frames: int, seed: int, spacing, noise: bool) -> PhantomSequence:
    ndim = len(size)
    rng = np.random.default_rng(seed)
    if spacing is None:
        inplane = (140.0 / size[-2], 140.0 / size[-1])
        spacing = inplane if ndim == 2 else (float(np.clip(100.0 / size[0], 3.0, 10.0)), *inplane)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing must have {ndim} values, got {spacing}.")
    fov = (size[-2] * spacing[-2], size[-1] * spacing[-1])
    depth = size[0] * spacing[0] if ndim == 3 else None
    p = _sax_params(rng, fov, depth, spacing[0] if ndim == 3 else None)
    pts = _grid_mm(size, spacing, [False] + [True, True] if ndim == 3 else [True, True])
    width = 0.4 * min(spacing[-2:])
    phases, es = _phases_cycle(n_frames)
    frames = np.empty((n_frames, *size), np.float32)
    labels = np.empty((n_frames, *size), np.uint8)
    motion = np.empty((n_frames, ndim, *size), np.float32)
    sp = np.asarray(spacing).reshape((ndim,) + (1,) * ndim)
    for t, s in enumerate(phases):
        q = _sax_pull(pts, p, float(s))
        img, lab = _render_sax(q, p, width)
        if noise:
            img = _rician(img, p["noise"], rng)
        frames[t] = np.clip(img, 0.0, 1.0)
        labels[t] = lab
        motion[t] = (np.stack(q) - np.stack(pts)) / sp
    motion[0] = 0.0
    return PhantomSequence(frames, labels, motion, spacing, 0, es, "sax" if ndim == 2 else "sax3d", "acdc", p)


def make_sax_2d(size: int | Sequence[int] = 64, n_frames: int = 5, seed: int = 0,
                spacing: Sequence[float] | None = None, noise: bool = True) -> PhantomSequence:
    """A 2D short-axis cine-MR-like phantom sequence with ACDC labels and its true motion.

    Explained in chapter 01.

    Args:
        size: ``H`` (square) or ``(H, W)``.
        n_frames: frames over one cardiac cycle (>= 2); ED is frame 0, ES at ~40 % of the cycle.
        seed: all anatomy, motion and noise are drawn from it.
        spacing: pixel size in mm, default a 140 mm field of view.
        noise: add Rician noise (independently per frame).

    Returns:
        A :class:`PhantomSequence` (``kind="sax"``).
    """
    return _make_sax(_as_size(size, 2, "make_sax_2d"), n_frames, seed, spacing, noise)


def make_sax_3d(size: Sequence[int] = (16, 64, 64), n_frames: int = 5, seed: int = 0,
                spacing: Sequence[float] | None = None, noise: bool = True) -> PhantomSequence:
    """A 3D short-axis stack (ACDC-like anisotropic slices) with ACDC labels and its true motion.

    Slice 0 is basal; the LV is a truncated half-ellipsoid tapering to the apex, the RV is shorter. The motion adds
    the descent of the base towards the apex (through plane, channel 0 of ``motion``).

    Args:
        size: ``(D, H, W)``, ``D`` slices along the long axis.
        n_frames: frames over one cycle (>= 2).
        seed: random seed.
        spacing: ``(slice spacing, dy, dx)`` mm; default ``100 / D`` mm between slices (clipped to [3, 10]) and a
            140 mm in-plane field of view.
        noise: add Rician noise.

    Returns:
        A :class:`PhantomSequence` (``kind="sax3d"``).
    """
    return _make_sax(_as_size(size, 3, "make_sax_3d"), n_frames, seed, spacing, noise)


# ----------------------------------------------------------------------------------------------------------------
# apical echo view
# ----------------------------------------------------------------------------------------------------------------


def _echo_params(rng: np.random.Generator, depth: float, view: str) -> dict:
    p: dict = {"view": view}
    p["origin"] = (-rng.uniform(0.0, 3.0), rng.uniform(-3.0, 3.0))
    p["half_angle"] = math.radians(rng.uniform(36.0, 42.0))
    p["r_max"] = depth * rng.uniform(0.92, 1.0)
    tau = math.radians(rng.uniform(-12.0, 12.0))
    p["ea"] = (math.cos(tau), math.sin(tau))  # apex -> base, (y, x)
    p["ew"] = (-math.sin(tau), math.cos(tau))
    d_apex = rng.uniform(0.12, 0.2) * depth
    p["A"] = (p["origin"][0] + d_apex * p["ea"][0], p["origin"][1] + d_apex * p["ea"][1] + rng.uniform(-6, 6))
    p["L"] = rng.uniform(0.42, 0.5) * depth
    p["W"] = p["L"] * rng.uniform(0.28, 0.36)
    p["tw"], p["ta"] = rng.uniform(7.0, 10.0), rng.uniform(6.0, 9.0)
    p["h_la"] = rng.uniform(0.12, 0.16) * depth
    p["W_la"] = p["W"] * rng.uniform(0.85, 1.1)
    p["W_rv"] = 0.7 * p["W"]
    p["i_tissue"] = rng.uniform(0.22, 0.32)
    p["i_myo"] = rng.uniform(0.55, 0.7)
    p["i_peri"] = rng.uniform(0.8, 0.95)
    p["i_blood"] = rng.uniform(0.04, 0.08)
    p["texture"] = _fourier(rng, 4, 2, (10.0, 40.0), 0.04)
    # motion
    p["eps"] = rng.uniform(0.12, 0.2)  # longitudinal shortening of the LV
    p["rho"] = rng.uniform(0.7, 0.8)  # ES / ED cavity half-width
    p["pert"] = [_fourier(rng, 2, 2, (50.0, 100.0), rng.uniform(0.3, 0.8)) for _ in range(2)]
    return p


def _local(y, x, p):
    dy, dx = y - p["A"][0], x - p["A"][1]
    return dy * p["ea"][0] + dx * p["ea"][1], dy * p["ew"][0] + dx * p["ew"][1]


def _render_echo(pts: list[np.ndarray], p: dict, width: float, speckle_at) -> tuple[np.ndarray, np.ndarray]:
    y, x = pts
    a, w = _local(y, x, p)
    L, W, tw, ta, h, Wla = p["L"], p["W"], p["tw"], p["ta"], p["h_la"], p["W_la"]
    zero = np.zeros_like(a)
    sd_cav = np.minimum(_ellipse_sd(a, w, L, 0.0, L, W, math.pi / 2), L - a)
    sd_myo = np.minimum(_ellipse_sd(a, w, L, 0.0, L + ta, W + tw, math.pi / 2), L - a)
    sd_peri = np.minimum(_ellipse_sd(a, w, L, 0.0, L + ta + 2.5, W + tw + 2.5, math.pi / 2), L + 2 - a)
    sd_la = np.minimum(_ellipse_sd(a, w, L + h, 0.0, h, Wla, math.pi / 2), a - L)
    sd_law = _ellipse_sd(a, w, L + h, 0.0, h + 2.5, Wla + 2.5, math.pi / 2)
    img = p["i_tissue"] + _eval_fourier(p["texture"], pts) + zero
    img = img + (0.5 - img) * _soft(sd_law, width)
    img = img + (p["i_peri"] - img) * _soft(sd_peri, width)
    if p["view"] == "4CH":
        wc = -(W + tw + 3.0 + p["W_rv"])
        sd_rvw = np.minimum(_ellipse_sd(a, w, 0.55 * L, wc, 0.55 * L + 3, p["W_rv"] + 3, math.pi / 2), 0.98 * L - a)
        sd_rv = np.minimum(_ellipse_sd(a, w, 0.55 * L, wc, 0.55 * L, p["W_rv"], math.pi / 2), 0.98 * L - a)
        sd_raw = _ellipse_sd(a, w, L + 0.9 * h, wc, 0.9 * h + 2.5, 1.1 * p["W_rv"] + 2.5, math.pi / 2)
        sd_ra = np.minimum(_ellipse_sd(a, w, L + 0.9 * h, wc, 0.9 * h, 1.1 * p["W_rv"], math.pi / 2), a - L - 1)
        img = img + (0.5 - img) * _soft(np.maximum(sd_rvw, sd_raw), width)
        img = img + (p["i_blood"] - img) * _soft(np.maximum(sd_rv, sd_ra), width)
    img = img + (p["i_myo"] - img) * _soft(sd_myo, width)
    img = img + (p["i_blood"] - img) * _soft(np.maximum(sd_cav, sd_la), width)
    img = img * speckle_at(pts)
    lab = np.zeros(y.shape, np.uint8)
    lab[sd_la > 0] = 3
    lab[sd_myo > 0] = 2
    lab[sd_cav > 0] = 1
    return img, lab


def _echo_pull(pts: list[np.ndarray], p: dict, s: float) -> list[np.ndarray]:
    if s == 0.0:
        return [q.copy() for q in pts]
    y, x = pts
    a, w = _local(y, x, p)
    L, W, tw, h = p["L"], p["W"], p["tw"], p["h_la"]
    # longitudinal: the apex stays, the mitral plane moves towards it, the LA stretches
    m_es = L * (1.0 - s * p["eps"])
    a_far = L + 2.0 * h + 10.0
    lam = np.where(a <= 0, a, np.where(a <= m_es, a * L / m_es,
                                       np.where(a <= a_far, L + (a - m_es) * (a_far - L) / (a_far - m_es), a)))
    lat = _taper(np.abs(w), W + tw + 6.0, W + tw + 36.0)
    a1 = a + lat * (lam - a)
    # radial: the cavity scales, the wall moves inwards by the same amount, fading outside
    rho = 1.0 - s * (1.0 - p["rho"])
    wloc = np.where(a1 <= L, W * np.sqrt(np.clip(1.0 - ((L - a1) / L) ** 2, 0.0, 1.0)),
                    W * np.clip(1.0 - (a1 - L) / 10.0, 0.0, 1.0))
    aw = np.abs(w)
    G = np.where(aw <= rho * wloc, aw / rho, aw + (1.0 - rho) * wloc)
    t0 = rho * wloc + tw + 3.0
    tr = _taper(aw, t0, t0 + 25.0)
    w1 = np.sign(w) * (aw + tr * (G - aw))
    y1 = p["A"][0] + a1 * p["ea"][0] + w1 * p["ew"][0]
    x1 = p["A"][1] + a1 * p["ea"][1] + w1 * p["ew"][1]
    return [y1 + s * _eval_fourier(p["pert"][0], pts), x1 + s * _eval_fourier(p["pert"][1], pts)]


def make_echo_2d(size: int | Sequence[int] = 128, n_frames: int = 5, seed: int = 0, view: str = "4CH",
                 spacing: float | Sequence[float] | None = None, noise: bool = True) -> PhantomSequence:
    """A 2D apical echocardiography-like phantom sequence (ED -> ES, CAMUS half sequence) with CAMUS labels.

    Explained in chapter 01. The transducer sits at the top centre; the sector is fixed in the image while the
    tissue (and its speckle) moves.

    Args:
        size: ``H`` (square) or ``(H, W)``.
        n_frames: frames from ED (0) to ES (last), >= 2.
        seed: random seed.
        view: ``"4CH"`` (with the right heart, unlabelled) or ``"2CH"``.
        spacing: pixel size in mm, default a 190 mm deep, 190 mm wide image.
        noise: multiplicative speckle (tissue-bound) and a little additive noise.

    Returns:
        A :class:`PhantomSequence` (``kind="echo"``, ``label_set="camus"``, ``es = n_frames - 1``).
    """
    size = _as_size(size, 2, "make_echo_2d")
    if view not in ("2CH", "4CH"):
        raise ValueError(f"view must be '2CH' or '4CH', got {view!r}.")
    if spacing is None:
        spacing = (190.0 / size[0], 190.0 / size[1])
    elif isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 2
    spacing = tuple(float(s) for s in spacing)
    rng = np.random.default_rng(seed)
    p = _echo_params(rng, size[0] * spacing[0], view)
    pts = _grid_mm(size, spacing, [False, True])
    width = 0.4 * min(spacing)
    if noise:  # correlated complex Gaussian -> Rayleigh amplitude with mean 1, defined on the ED pixel grid
        re = ndimage.gaussian_filter(rng.normal(size=size), (0.6, 1.1))
        im = ndimage.gaussian_filter(rng.normal(size=size), (0.6, 1.1))
        speckle = np.hypot(re, im)
        speckle /= speckle.mean()
        sp = np.asarray(spacing).reshape(2, 1, 1)
        off = np.array([0.5, -(size[1] - 1) / 2]).reshape(2, 1, 1)

        def speckle_at(q):
            idx = np.stack(q) / sp - off
            return ndimage.map_coordinates(speckle, idx, order=1, mode="mirror")
    else:
        def speckle_at(q):
            return 1.0
    y, x = pts
    dy, dx = y - p["origin"][0], x - p["origin"][1]
    r = np.hypot(dy, dx)
    ang = np.arctan2(dx, dy)
    sector = _soft((p["half_angle"] - np.abs(ang)) * r, width) * _soft(p["r_max"] - r, width) * (dy > 0)
    gain = 1.0 - 0.3 * np.clip(r / p["r_max"], 0, 1)
    phases, es = _phases_systole(n_frames)
    frames = np.empty((n_frames, *size), np.float32)
    labels = np.empty((n_frames, *size), np.uint8)
    motion = np.empty((n_frames, 2, *size), np.float32)
    spc = np.asarray(spacing).reshape(2, 1, 1)
    for t, s in enumerate(phases):
        q = _echo_pull(pts, p, float(s))
        img, lab = _render_echo(q, p, width, speckle_at)
        img = img * gain
        if noise:
            img = img + rng.normal(0, 0.01, size)
        frames[t] = np.clip(img * sector, 0.0, 1.0)
        labels[t] = np.where(sector > 0.5, lab, 0)
        motion[t] = (np.stack(q) - np.stack(pts)) / spc
    motion[0] = 0.0
    return PhantomSequence(frames, labels, motion, spacing, 0, es, "echo", "camus", p)


def make_phantom(kind: str = "sax", size=None, n_frames: int = 5, seed: int = 0, **kwargs) -> PhantomSequence:
    """Dispatch to :func:`make_sax_2d` (``"sax"``), :func:`make_sax_3d` (``"sax3d"``) or :func:`make_echo_2d`
    (``"echo"``); ``size=None`` takes the function's default."""
    makers = {"sax": make_sax_2d, "sax3d": make_sax_3d, "echo": make_echo_2d}
    if kind not in makers:
        raise ValueError(f"unknown phantom kind {kind!r}; valid: {', '.join(makers)}.")
    if size is not None:
        kwargs["size"] = size
    return makers[kind](n_frames=n_frames, seed=seed, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# writers of the on-disk layouts
# ----------------------------------------------------------------------------------------------------------------


def _subject_seed(seed: int, subject: int) -> int:
    return seed * 100003 + subject


def _patient_ids(n_patients: int, first_id: int) -> range:
    """Patient numbers ``first_id ... first_id + n_patients - 1``.

    Raises:
        ValueError: ``n_patients < 1`` or ``first_id < 1``.
    """
    if int(n_patients) < 1 or int(first_id) < 1:
        raise ValueError(f"n_patients and first_id must be >= 1, got {n_patients} and {first_id}")
    return range(int(first_id), int(first_id) + int(n_patients))


def _nifti(array: np.ndarray, zooms: Sequence[float]):
    """A NIfTI image of ``array`` with a diagonal affine of the spacing ``zooms`` (mm; a trailing 1.0 for time)."""
    import nibabel as nib

    affine = np.diag([*[float(z) for z in zooms[:3]], *([1.0] * (4 - min(len(zooms), 3)))])
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(float(z) for z in zooms))
    img.header.set_xyzt_units("mm", "sec")
    return img


def _mr_intensity(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[0, 1] phantom frames -> MR-like int16 values (scanner scale differs per patient)."""
    return np.round(frames * rng.uniform(250.0, 900.0)).astype(np.int16)


def write_acdc(root: str | Path, n_patients: int = 4, seed: int = 0, size: Sequence[int] = (10, 96, 96),
               n_frames: int = 10, overwrite: bool = False, first_id: int = 1) -> Path:
    """Write phantom patients in the official ACDC NIfTI layout.

    ``root/patientXXX/`` holds ``Info.cfg`` (``ED: 1``, ``ES: N``, ``Group``, ``Height``, ``NbFrame``, ``Weight``),
    ``patientXXX_frame01.nii.gz`` (ED) and ``_gt``, ``patientXXX_frameNN.nii.gz`` (ES) and ``_gt``, and
    ``patientXXX_4d.nii.gz``. Arrays are NIfTI ``(X, Y, Z[, T])`` = the phantom's ``(D, H, W)`` transposed; the
    affine and pixdim hold the spacing (about 1.4-1.7 mm in plane and 10 mm between slices); intensities are int16
    MR-like values, labels uint8.

    Args:
        root: folder to write into (created); existing files are never overwritten unless ``overwrite``.
        n_patients: patients ``patient001`` ... (subject ``i`` uses seed ``seed * 100003 + i``).
        seed: random seed.
        size: ``(D, H, W)`` of each volume.
        n_frames: frames of the cine (``NbFrame``); ES at ~40 % of the cycle.
        overwrite: allow replacing existing files.
        first_id: number of the first patient (e.g. 101 for a ``testing/`` folder like the official release's).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = prepare_root(root)
    groups = ("NOR",)
    for i in _patient_ids(n_patients, first_id):
        rng = np.random.default_rng(_subject_seed(seed, i) + 7)
        inplane = rng.uniform(1.4, 1.7)
        spacing = (float(rng.choice([10.0, 10.0, 10.0, 8.0])), inplane, inplane)
        seq = make_sax_3d(size, n_frames=n_frames, seed=_subject_seed(seed, i), spacing=spacing)
        zooms = (spacing[2], spacing[1], spacing[0])
        frames = _mr_intensity(seq.frames, rng)
        written = [(idx + 1, _nifti(frames[idx].transpose(2, 1, 0), zooms),
                    _nifti(seq.labels[idx].transpose(2, 1, 0), zooms)) for idx in (seq.ed, seq.es)]
        cfg = (f"ED: {seq.ed + 1}\nES: {seq.es + 1}\nGroup: {groups[(i - 1) % len(groups)]}\n"
               f"Height: {rng.uniform(150, 195):.1f}\nNbFrame: {seq.n_frames}\nWeight: {rng.uniform(50, 100):.1f}\n")
        write_acdc_patient(root, f"patient{i:03d}", written, cfg,
                           extra={"4d": _nifti(frames.transpose(3, 2, 1, 0), (*zooms, 1.0))}, overwrite=overwrite)
    return root


def write_acdc_h5(root: str | Path, n_patients: int = 4, seed: int = 0, size: Sequence[int] = (10, 96, 96),
                  n_frames: int = 10, overwrite: bool = False, first_id: int = 1) -> Path:
    """Write phantom patients in the common preprocessed ACDC HDF5 layout (as ``../shared/data/acdc-dev``).

    ``root/patientXXX_frameYY.h5`` for ED (``frame01``, the lower number) and ES, each with ``image`` (float32,
    ``(Z, Y, X)``, clipped at its 99th percentile and scaled to [0, 1]) and ``label`` (uint8). No spacing is
    stored in this layout. Arguments as :func:`write_acdc`.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = prepare_root(root)
    for i in _patient_ids(n_patients, first_id):
        rng = np.random.default_rng(_subject_seed(seed, i) + 7)
        inplane = rng.uniform(1.4, 1.7)
        seq = make_sax_3d(size, n_frames=n_frames, seed=_subject_seed(seed, i), spacing=(10.0, inplane, inplane))
        for idx in (seq.ed, seq.es):
            img = seq.frames[idx].astype(np.float32)
            img = np.clip(img, 0, np.percentile(img, 99))
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
            write_acdc_h5_frame(root, f"patient{i:03d}", idx + 1, img.astype(np.float32), seq.labels[idx],
                                overwrite=overwrite)
    return root


def write_camus(root: str | Path, n_patients: int = 4, seed: int = 0, size: Sequence[int] = (128, 128),
                n_frames: int = 8, half_sequence: bool = True, overwrite: bool = False, first_id: int = 1) -> Path:
    """Write phantom patients in the CAMUS NIfTI layout.

    ``root/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.nii.gz`` and ``_gt.nii.gz``, ``Info_2CH.cfg`` /
    ``Info_4CH.cfg`` (``ED``, ``ES``, ``NbFrame``, ``Sex``, ``Age``, ``ImageQuality``, ``EF``, ``FrameRate``) and, if
    ``half_sequence``, ``patientXXXX_{2CH,4CH}_half_sequence.nii.gz``. Arrays are NIfTI ``(X, Y[, T])`` (the image
    ``(H, W)`` transposed), uint8 intensities 0-255, uint8 labels (1 = LV, 2 = Myo, 3 = LA). ``first_id`` is the
    number of the first patient (``patient0001`` by default).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = prepare_root(root)
    for i in _patient_ids(n_patients, first_id):
        rng = np.random.default_rng(_subject_seed(seed, i) + 11)
        sex, age = str(rng.choice(["F", "M"])), int(rng.integers(20, 90))
        for v, view in enumerate(("2CH", "4CH")):
            sp = rng.uniform(0.6, 0.8) * 256.0 / size[0]
            seq = make_echo_2d(size, n_frames=n_frames, seed=_subject_seed(seed, i) * 2 + v, view=view,
                               spacing=(sp, sp))
            frames = np.round(seq.frames * 255.0).astype(np.uint8)
            zooms = (seq.spacing[1], seq.spacing[0])
            phases = [(name, _nifti(frames[idx].T, zooms), _nifti(seq.labels[idx].T, zooms))
                      for name, idx in (("ED", seq.ed), ("ES", seq.es))]
            extra = {"half_sequence": _nifti(frames.transpose(2, 1, 0), (*zooms, 1.0))} if half_sequence else {}
            ed_area = float((seq.labels[seq.ed] == 1).sum())
            es_area = float((seq.labels[seq.es] == 1).sum())
            ef = 100.0 * (1.0 - (es_area / max(ed_area, 1.0)) ** 1.5)
            cfg = (f"ED: {seq.ed + 1}\nES: {seq.es + 1}\nNbFrame: {seq.n_frames}\nSex: {sex}\nAge: {age}\n"
                   f"ImageQuality: {rng.choice(['Good', 'Medium', 'Poor'])}\nEF: {ef:.1f}\n"
                   f"FrameRate: {rng.uniform(30, 60):.1f}\n")
            write_camus_view(root, f"patient{i:04d}", view, phases, cfg, extra, overwrite=overwrite)
    return root


def write_phantom(root: str | Path, layout: str = "acdc", n_patients: int = 4, seed: int = 0, **kwargs) -> Path:
    """Write phantom patients in one of the layouts ``"acdc"`` (NIfTI), ``"acdc-h5"`` or ``"camus"``.

    Keyword arguments go to :func:`write_acdc`, :func:`write_acdc_h5` or :func:`write_camus`.
    """
    writers = {"acdc": write_acdc, "acdc-nifti": write_acdc, "acdc-h5": write_acdc_h5, "camus": write_camus}
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}; valid: acdc, acdc-h5, camus.")
    return writers[layout](root, n_patients=n_patients, seed=seed, **kwargs)
