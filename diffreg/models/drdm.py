"""DRDM (Zheng et al. 2024): deformation-recovery diffusion, instance deformation synthesis and its downstream uses.

Explained in chapter 08 (``notebooks/08_drdm.md``); the downstream uses (few-shot segmentation, synthetic
registration pre-training) in chapter 09 (``notebooks/09_drdm_downstream.md``). References (sec., eq., Alg.,
Table) are to the paper (2024 preprint).

DRDM turns diffusion around: the "noise" is a random *deformation* and the model learns to undo it. No image pairs
and no labels are needed to train it; what it produces is a displacement field for one given image, so labels
deformed with the same field stay valid.

Method, top to bottom (paper sec. 2):

1. **Multi-scale random DVF** (sec. 2.1.2, eq. 6, :func:`sample_velocity`): a deformation velocity field is the sum
   of independent Gaussian fields at scales ``1, 1/2, ..., 1/2^m`` with standard deviations
   ``sigma, 2 sigma, ..., 2^m sigma``, each interpolated to the full grid. Its per-voxel variance is about
   ``(4^(m+1) - 1) / 3 * sigma^2`` (eq. 7).
2. **Noise levels** (sec. 2.1.3-2.1.4, eq. 9-11, :func:`noise_level`, :func:`cumulative_noise_level`): the DVF of step
   ``t``, ``psi_t``, is the composition of ``n_t = floor(t^alpha / beta)`` such fields (``alpha = 0.6``,
   ``beta = 1``, sec. 3.3), and the diffused DDF ``psi_{t:1}`` is the composition of ``n_{t:1}`` fields, in practice
   ``n_{t:1} = floor(t^1.3 / 1.5)`` (sec. 3.3). The variance therefore grows linearly with the number of composed
   fields (eq. 7, 10): the standard deviation of ``psi_{t:1}`` grows like ``sqrt(n_{t:1})``.
3. **Integration by composition** (eq. 2, 5, :func:`diffreg.spatial.compose`): ``<a o b>[x] = b[x + a[x]] + a[x]``
   and ``psi_{t:1} = psi_t o psi_{t-1:1}``, so the image ``I_t = psi_{t:1}(I_0)`` is ``psi_t`` applied to
   ``I_{t-1}`` (pull warping: ``warp(I, compose(a, b)) = warp(warp(I, b), a)``). Fields are composed on a canvas
   twice the image size and cropped at its centre (sec. 3.3), so displacements near the image border
   keep growing instead of being held back by the padding.
4. **Recovery network** ``D_theta`` (sec. 2.2.1, Appendix A, :class:`RecoveryUNet`): a three-level U-Net of ACNN-II
   atrous residual blocks (Table .5, :class:`AtrousBlock`) with a sinusoidal time embedding added at every level,
   applied recursively ``K = 2`` times inside one step (eq. 12): ``psi_hat_t = psi_hat^(2) o psi_hat^(1)`` where
   ``psi_hat^(2)`` is predicted from the image already warped by ``psi_hat^(1)``.
5. **Loss** (eq. 13-14, :func:`distance_loss`, :func:`angle_loss`, :func:`regularisation_loss`)::

       L = lambda_1 L_dist + lambda_2 L_ang + lambda_3 L_reg,          lambda = (1, 1, 10)  (sec. 3.3)
       L_dist = mean_x (||<psi_t o psi_hat_t>[x]|| + eps) / (||psi_t[x]|| + eps)
       L_ang  = mean_x  psi_t[x] . psi_hat_t[x + psi_t[x]] / (||psi_t[x]|| ||psi_hat_t[x + psi_t[x]]|| + eps^2)
       L_reg  = mean ||grad psi_hat_t||_1 + mean relu(-det(I + grad psi_hat_t))

   with ``t ~ U{1, ..., T}`` (sec. 2.2.2), ``T = 80`` (sec. 3.3), and the image deformed by a DVF perturbed by 5 %
   (sec. 3.3) while the target stays the unperturbed ``psi_t``.
6. **Instance deformation** (Alg. 2, :meth:`DRDM.deform`): sample ``psi_{T':1}`` (``T' <= T`` sets the magnitude),
   then for ``t = T', ..., 1``: ``phi <- psi_hat_t o phi`` and ``I_hat_{t-1} = phi(I_0)`` (each image is resampled
   once from ``I_0``, sec. 2.2.1, so it never blurs).
7. **Data synthesis** (Alg. 3, 4, :meth:`DRDM.deform_labels` of
   :class:`~diffreg.models.base.DeformationGenerator`, :meth:`DRDM.synthesize_pairs`): deformed images with their
   labels (few-shot segmentation; a whole dataset on disk: :func:`diffreg.synthesize.synthesize_dataset`), and
   pairs ``(moving, fixed, ddf)`` with ``fixed = warp(moving, ddf)`` for supervised registration pre-training.

Deviations and choices (each also in the box of chapter 08; the downstream experiments' in that of chapter 09):

* **Fresh random fields at every composition**, as eq. 2 and eq. 7 / 10 say (variances add, so the size grows like
  ``sqrt(n)``). The official code samples *one* DVF per training sample and composes it with itself ``n`` times
  (a stationary flow, size growing like ``n``); it also takes the target ``psi_t`` as ``n_t`` self-compositions of
  that same field. Our ``sigma`` is therefore larger than the official ``v_scale`` for a similar final size; the
  ``paper`` profile's ``sigma = 7e-4`` is calibrated on Table 1 at 256 x 256 and ``T' = 70`` (max 12.5 %, mean
  5.1 % of the image size against the paper's 14.8 % and 4.3 %: our fields are smoother, max / mean 2.5 against
  3.4, so no single ``sigma`` matches both columns).
  ``fields="shared"`` runs the official variant. The two differ in what the recovery network can learn: with fresh
  fields, ``psi_t`` is ``n_t`` of the ``n_{t:1}`` independent fields the image shows, so even an oracle that knows
  the whole diffused DDF ``psi_{t:1}`` predicts only its share ``n_t / n_{t:1}`` (``L_ang`` about -0.24 at
  ``t = 40``, ``L_dist`` about 1); with a shared field ``psi_t`` points along ``psi_{t:1}`` and the same oracle
  reaches ``L_ang`` about -0.96. The ``quick`` profile uses ``"shared"``: with fresh fields its recovery network
  learned no direction in a CPU budget (held-out ``L_ang`` about 0 after 1200 steps), with the shared field it
  does (chapter 08). The ``paper`` profile keeps eq. 2.
* **Control grid**: the official code composes the fields on a 64-point control grid of the canvas and interpolates
  to the image (``ctl_sz = 64``, four scales 64, 32, 16, 8); eq. 6 writes the finest scale at the canvas
  resolution. We follow the code: ``control_spacing`` canvas voxels per control point (paper 2D: 512 / 64 = 8,
  3D: 256 / 64 = 4) and ``scales = m + 1`` levels (4 in the code).
* **Units**: fields are in voxels (diffreg convention, :mod:`diffreg.spatial`, chapter 01); ``sigma`` is a
  fraction of the image size along each axis, so one profile works at any resolution. The official code works in
  normalised coordinates.
* **Negative-Jacobian term**: the paper writes ``relu(-det(grad psi_hat))``; we use the Jacobian of the
  transformation ``x + psi_hat(x)``, ``det(I + grad psi_hat)`` (numpy-gradient differences, as
  :func:`diffreg.metrics.jacobian_determinant`), which is negative exactly where the field folds. The official
  ``Grad(penalty=['negdetj'])`` takes the determinant of the displacement gradient without the identity, which is
  close to zero for any small field and does not detect folding (tested in ``tests/models/test_drdm.py``).
* **Angle term sign**: the paper's ``-psi . psi_hat(x + psi) / ...`` would be *minimised* by ``psi_hat = +psi``
  (the wrong direction for an inverse); the official code minimises the positive cosine (its ``NCC`` loss), which
  is ``-1`` at the exact inverse. We do the same.
* **Norms in L_dist**: the plain (not squared) norms of eq. 14; the official ``MRSE`` squares both. ``eps`` is in
  voxels (1e-2 by default).
* **Activations**: LeakyReLU(1e-6) inside the ACNN-II blocks (Table .5) and LeakyReLU(0.01) in the time MLPs
  ("act" of Table .4); the official code uses ReLU in the time MLPs. Table .4 itself is not in the text we have;
  widths (10, 20, 40), the time-embedding size 100, the 4 x 4 stride-2 (transposed) convolutions, instance
  normalisation in the encoder only and the multiplicative time embedding at the bottleneck are from the official
  ``RecResACNet``. 2D paper profile: 435,435 trainable parameters plus the frozen 81 x 100 time table; the official
  ~0.443 M counts its frozen 80 x 100 table as parameters (435,435 + 8,000 = 443,435).
* Warps use border padding for images and fields (the official code pads images with zeros); the official output
  clamp to the image extent is not used.
* The paper trains with rotation / translation / flip / crop augmentation of the source images (sec. 3.2);
  :meth:`DRDM.loss` does not augment (the phantom subjects already vary).
* ``quick`` profile (:mod:`diffreg.config`): the shared-field sampler (above) with ``sigma = 2.5e-4`` (a mean
  displacement of about 11 % of the image at ``T' = 70``, paper Table 1: 4.3 %); DRDM works at half the data size
  (32 x 32 for 64 x 64 images; canvas 64, control grid 32, 16, 8) and its fields are resized to the data size
  (the paper resizes generated fields to the downstream size, sec. 3.2, but its experiments use one size); a narrower
  recovery network (widths 8, 16, 32: 282,513 parameters in 2D); lr 1e-3 and 600 steps of 2 pairs.
* **Not a pair registration model**: DRDM is a :class:`~diffreg.models.base.DeformationGenerator`, not a
  :class:`~diffreg.models.base.RegistrationModel`. :meth:`DRDM.loss` trains on ``batch["moving"]`` and
  ``batch["fixed"]`` as two independent images, so ``python -m diffreg train --method drdm`` works on every pair
  dataset; :meth:`DRDM.forward` is the recovery network ``D_theta(I, t)`` (eq. 12), and there is no ``register``
  (the evaluator, the benchmark and ``python -m diffreg register`` refuse DRDM runs; use
  :meth:`DRDM.synthesize_pairs` to train a registration model, or :func:`diffreg.synthesize.synthesize_dataset`
  to write a deformed copy of a dataset, chapter 09).
* **Alg. 4, line 9** writes the fixed image as ``<phi_syn o phi_syn>(I_0)``, a typo: :meth:`DRDM.synthesize_pairs`
  warps ``I_0`` by ``phi_syn o phi_aug``.
* **Downstream experiments** (chapter 09's code, not this module; listed in its box): 2D phantom slices instead of
  ACDC (segmentation) and 3D lung CT (registration); few-shot segmentation with 3 labelled subjects (6 images) and
  8 augmented copies per image (the paper: 5 to 100 subjects, 32 copies), a MONAI ``UNet`` (strided and transposed
  convolutions, residual units, channels 16/32/64) instead of the paper's plain U-Net, batch 8, 250 steps at a
  constant lr 1e-3 (the paper: batch 64, exponential decay), a "BigAug-lite" of MONAI transforms instead of
  BigAug, and Dice only; synthetic pre-training of the ``quick`` VoxelMorph with eq. 20's two terms
  (``lambda_4 = lambda_5 = 1``) computed as the mean squared error of the field (the paper's
  ``E_x ||phi - phi~||_2`` is the mean norm, not squared) and VoxelMorph's L1 ``Grad`` (the mean of the absolute
  forward differences, ``1 / dims^2`` of the paper's ``E_x ||grad phi~||_1``), batch 4 instead of 12, lr 1e-3
  instead of 1e-4, 250 steps; a two-level bicubic random field scaled to the DRDM fields' mean size instead of
  MRBS; fine-tuning with chapter 02's unsupervised VoxelMorph loss for 200 steps.

Shapes: images ``(B, C, *spatial)`` with ``dims`` spatial axes, every size divisible by 8 (three stride-2 levels);
fields ``(B, dims, *spatial)`` in voxels, pull convention ``warped(p) = image(p + ddf(p))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffreg import losses
from diffreg.metrics import jacobian_determinant
from diffreg.models.base import DeformationGenerator
from diffreg.spatial import compose, float32, resize_field, warp

__all__ = [
    "DRDM", "RecoveryUNet", "AtrousBlock", "noise_level", "cumulative_noise_level", "sample_velocity",
    "distance_loss", "angle_loss", "negative_jacobian", "regularisation_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Forward process: multi-scale random DVFs (eq. 6), noise levels (eq. 9, 11)
# ----------------------------------------------------------------------------------------------------------------

def noise_level(t: int | Tensor, alpha: float = 0.6, beta: float = 1.0) -> int | Tensor:
    """``n_t = floor(t^alpha / beta)``, the number of unit DVFs composed into ``psi_t`` (eq. 9; sec. 3.3:
    ``alpha = 0.6``, ``beta = 1``). Works on ints and integer tensors."""
    if isinstance(t, Tensor):
        return torch.floor(t.double() ** alpha / beta).long()
    return int(math.floor(float(t) ** alpha / beta))


def cumulative_noise_level(t: int | Tensor, alpha: float = 1.3, beta: float = 1.5) -> int | Tensor:
    """``n_{t:1}``, the number of unit DVFs composed into ``psi_{t:1}`` (eq. 11).

    The theory gives ``floor(t^(alpha+1) / ((alpha+1) beta)) = floor(t^1.6 / 1.6)``; the paper uses
    ``floor(t^1.3 / 1.5)`` in practice (sec. 3.3), the default here.
    """
    if isinstance(t, Tensor):
        return torch.floor(t.double() ** alpha / beta).long()
    return int(math.floor(float(t) ** alpha / beta))


def _randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype) -> Tensor:
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    return torch.randn(*shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_velocity(batch: int, grid: Sequence[int], sigma: float | Sequence[float] | Tensor, scales: int = 4,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """A multi-scale random DVF (eq. 6): ``psi = psi^(0) + intrp(psi^(1)) + ... + intrp(psi^(m))``.

    ``psi^(i)`` lives on the grid halved ``i`` times (at least 2 points per axis), has i.i.d. ``N(0, (2^i sigma)^2)``
    components and is interpolated (bi/trilinear, ``align_corners=False``) to ``grid``. Variance per component:
    ``(4^(m+1) - 1) / 3 * sigma^2`` at the grid nodes of every scale (eq. 7; less between them).

    Explained in chapter 08.

    Args:
        batch: number of fields.
        grid: spatial size ``(H, W)`` or ``(D, H, W)`` of the finest scale.
        sigma: standard deviation of the finest scale, in voxels of ``grid``: a number, one per axis, or a tensor
            ``(batch,)`` / ``(batch, ndim)`` (per-sample scales, e.g. zero to switch a sample off).
        scales: ``m + 1`` (4 in the official code: 64, 32, 16, 8 points).
        generator: random generator (reproducible fields).
        device, dtype: of the result.

    Returns:
        ``(batch, ndim, *grid)`` velocity in voxels of ``grid``.
    """
    grid = tuple(int(s) for s in grid)
    ndim = len(grid)
    if ndim not in (2, 3) or any(s < 1 for s in grid):
        raise ValueError(f"grid must be 2 or 3 positive sizes, got {grid}")
    if int(scales) != scales or scales < 1:
        raise ValueError(f"scales must be a positive integer, got {scales}")
    sig = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sig.ndim == 0:
        sig = sig.expand(batch, ndim)
    elif sig.ndim == 1 and sig.shape[0] == ndim and batch != ndim:
        sig = sig.view(1, ndim).expand(batch, ndim)
    elif sig.ndim == 1:
        sig = sig.view(batch, 1).expand(batch, ndim)
    sig = sig.reshape(batch, ndim, *([1] * ndim))
    mode = "bilinear" if ndim == 2 else "trilinear"
    out = torch.zeros(batch, ndim, *grid, device=device, dtype=dtype)
    for i in range(int(scales)):
        size = tuple(max(2, math.ceil(s / 2 ** i)) for s in grid)
        comp = _randn((batch, ndim, *size), generator, device, dtype) * (2.0 ** i)
        if size != grid:
            comp = F.interpolate(comp, size=grid, mode=mode, align_corners=False)
        out = out + comp
    return out * sig


def _grid_compose(a: Tensor, b: Tensor) -> Tensor:
    """:func:`diffreg.spatial.compose` (``b(p + a(p)) + a(p)``, linear, border padding, ``align_corners=True``)
    written directly on :func:`torch.nn.functional.grid_sample`: the forward process composes hundreds of small
    fields per sample, where the per-call set-up of MONAI ``Warp`` dominates. Tested equal to ``compose``."""
    spatial = a.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, s, device=a.device, dtype=a.dtype) if s > 1 else
            torch.zeros(1, device=a.device, dtype=a.dtype) for s in spatial]
    ident = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in spatial], device=a.device, dtype=a.dtype)
    pos = ident + a * scale.view(1, -1, *([1] * len(spatial)))
    grid = pos.flip(1).movedim(1, -1)  # grid_sample wants (x, y[, z]) = reversed array axes, last
    return F.grid_sample(b, grid, mode="bilinear", padding_mode="border", align_corners=True) + a


# ----------------------------------------------------------------------------------------------------------------
# Recovery network (sec. 2.2.1, Appendix A)
# ----------------------------------------------------------------------------------------------------------------

def sinusoidal_table(n: int, dim: int) -> Tensor:
    """``(n, dim)`` sinusoidal embeddings of the integers ``0 ... n-1`` (the official ``sinusoidal_embedding``:
    ``sin`` on even, ``cos`` on odd channels, frequencies ``1 / 10000^(2j / dim)``)."""
    wk = torch.tensor([1.0 / 10_000 ** (2 * j / dim) for j in range(dim)]).view(1, dim)
    t = torch.arange(n, dtype=torch.float32).view(n, 1)
    emb = torch.zeros(n, dim)
    emb[:, ::2] = torch.sin(t * wk[:, ::2])
    emb[:, 1::2] = torch.cos(t * wk[:, ::2])
    return emb


class AtrousBlock(nn.Module):
    """ACNN-II block (Zhou et al. 2020; DRDM Table .5): ``r = norm(conv3(x))``, then two LeakyReLU + convolutions
    with dilation 1 and 3, and ``act(f + r)``.

    Args:
        dims: 2 or 3.
        in_channels, out_channels: ``c_i``, ``c_{i+1}``.
        normalize: instance normalisation (affine) after the first convolution (encoder and bottleneck blocks).
        dilations: dilation rates of the two inner convolutions (Table .5: 1, 3).
        slope: LeakyReLU negative slope (Table .5: 1e-6).
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, normalize: bool = True,
                 dilations: Sequence[int] = (1, 3), slope: float = 1e-6) -> None:
        super().__init__()
        Conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
        Norm = (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2]
        self.conv0 = Conv(in_channels, out_channels, 3, 1, 1)
        self.norm = Norm(out_channels, affine=True) if normalize else nn.Identity()
        self.convs = nn.ModuleList([Conv(out_channels, out_channels, 3, 1, d, dilation=d) for d in dilations])
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: Tensor) -> Tensor:
        r = self.norm(self.conv0(x))
        f = r
        for conv in self.convs:
            f = conv(self.act(f))
        return self.act(f + r)


class RecoveryUNet(nn.Module):
    """``D_theta``: the recursive atrous U-Net of DRDM (Appendix A; eq. 12), image and step -> recovery DVF.

    Three encoder levels of three :class:`AtrousBlock` each (widths ``w1, w2, w3``; instance norm), 4 x 4 stride-2
    convolutions down, a bottleneck ``w3 -> w2 -> w2 -> w3``, 4 x 4 stride-2 transposed convolutions up with skip
    concatenations, decoder blocks without normalisation, and a 3 x 3 convolution to ``dims`` channels. The
    step ``t`` enters through a frozen sinusoidal table (``time_dim``) and one MLP per level (``Linear, LeakyReLU,
    Linear``) whose output is added to that level's input (multiplied at the bottleneck, as in the official code).

    Explained in chapter 08.

    Args:
        dims: 2 or 3.
        widths: ``(w1, w2, w3)`` (paper/official: 10, 20, 40).
        time_dim: size of the sinusoidal embedding (official: 100).
        timesteps: ``T``; the table covers ``t = 0 ... T``.
        in_channels: image channels.
    """

    def __init__(self, dims: int = 2, widths: Sequence[int] = (10, 20, 40), time_dim: int = 100,
                 timesteps: int = 80, in_channels: int = 1) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        w1, w2, w3 = (int(w) for w in widths)
        self.dims = dims
        Conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
        ConvT = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2]
        self.register_buffer("time_table", sinusoidal_table(timesteps + 1, time_dim), persistent=False)

        def te(c: int) -> nn.Module:
            return nn.Sequential(nn.Linear(time_dim, c), nn.LeakyReLU(0.01), nn.Linear(c, c))

        def blocks(chs: Sequence[int], normalize: bool) -> nn.Module:
            return nn.Sequential(*[AtrousBlock(dims, a, b, normalize) for a, b in zip(chs[:-1], chs[1:])])

        self.te1, self.b1, self.down1 = te(in_channels), blocks((in_channels, w1, w1, w1), True), Conv(w1, w1, 4, 2, 1)
        self.te2, self.b2, self.down2 = te(w1), blocks((w1, w2, w2, w2), True), Conv(w2, w2, 4, 2, 1)
        self.te3, self.b3, self.down3 = te(w2), blocks((w2, w3, w3, w3), True), Conv(w3, w3, 4, 2, 1)
        self.te_mid, self.b_mid = te(w3), blocks((w3, w2, w2, w3), True)
        self.up1, self.te4, self.b4 = ConvT(w3, w3, 4, 2, 1), te(2 * w3), blocks((2 * w3, w3, w2, w2), False)
        self.up2, self.te5, self.b5 = ConvT(w2, w2, 4, 2, 1), te(2 * w2), blocks((2 * w2, w2, w1, w1), False)
        self.up3, self.te_out, self.b_out = ConvT(w1, w1, 4, 2, 1), te(2 * w1), blocks((2 * w1, w1, w1, w1), False)
        self.conv_out = Conv(w1, dims, 3, 1, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """One pass: ``(B, C, *spatial)`` image and ``(B,)`` integer steps -> ``(B, dims, *spatial)`` DVF (voxels)."""
        emb = self.time_table[t.long()]
        shape = (x.shape[0], -1) + (1,) * self.dims
        o1 = self.b1(x + self.te1(emb).view(shape))
        o2 = self.b2(self.down1(o1) + self.te2(emb).view(shape))
        o3 = self.b3(self.down2(o2) + self.te3(emb).view(shape))
        mid = self.b_mid(self.down3(o3) * self.te_mid(emb).view(shape))
        o4 = self.b4(torch.cat([o3, self.up1(mid)], 1) + self.te4(emb).view(shape))
        o5 = self.b5(torch.cat([o2, self.up2(o4)], 1) + self.te5(emb).view(shape))
        out = self.b_out(torch.cat([o1, self.up3(o5)], 1) + self.te_out(emb).view(shape))
        return self.conv_out(out)


# ----------------------------------------------------------------------------------------------------------------
# Loss (eq. 14)
# ----------------------------------------------------------------------------------------------------------------

@float32
def distance_loss(psi: Tensor, psi_hat: Tensor, eps: float = 1e-2) -> Tensor:
    """``L_dist`` of eq. 14: ``mean_x (||<psi o psi_hat>[x]|| + eps) / (||psi[x]|| + eps)``, ``0``-ish (``eps /
    (||psi|| + eps)``) when ``psi_hat`` is the inverse of ``psi``; ``<a o b>`` is :func:`diffreg.spatial.compose`.

    Args:
        psi: ``(B, ndim, *spatial)`` forward DVF ``psi_t`` (voxels).
        psi_hat: ``(B, ndim, *spatial)`` estimated recovery DVF.
        eps: stabiliser in voxels.
    """
    residual = compose(psi, psi_hat)
    return ((residual.norm(dim=1) + eps) / (psi.norm(dim=1) + eps)).mean()


@float32
def angle_loss(psi: Tensor, psi_hat: Tensor, eps: float = 1e-2) -> Tensor:
    """``L_ang`` of eq. 14: the cosine between ``psi[x]`` and ``psi_hat[x + psi[x]]``, averaged; ``-1`` when
    ``psi_hat`` undoes ``psi`` (sign as in the official code, see the module docstring)."""
    moved = warp(psi_hat, psi)  # psi_hat[x + psi[x]]
    cos = (psi * moved).sum(1) / (psi.norm(dim=1) * moved.norm(dim=1) + eps ** 2)
    return cos.mean()


@float32
def negative_jacobian(ddf: Tensor) -> Tensor:
    """``mean relu(-det(I + grad ddf))``: positive exactly when the deformation folds (eq. 14, second part of
    ``L_reg``; differences as :func:`diffreg.metrics.jacobian_determinant`)."""
    return F.relu(-jacobian_determinant(ddf).to(ddf.dtype)).mean()


def regularisation_loss(psi_hat: Tensor) -> Tensor:
    """``L_reg`` of eq. 14: ``||grad psi_hat||_1`` (mean absolute forward differences,
    :func:`diffreg.losses.gradient_smoothness` with ``penalty="l1"``) plus :func:`negative_jacobian`."""
    return losses.gradient_smoothness(psi_hat, penalty="l1") + negative_jacobian(psi_hat)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

class DRDM(DeformationGenerator):
    """Deformation-Recovery Diffusion Model: random deformation diffusion + a learned recovery network.

    Explained in chapters 08 and 09. See the module docstring for the method, equations and deviations. A
    :class:`~diffreg.models.base.DeformationGenerator`: :meth:`deform` takes levels ``T'`` in ``0 ... T``
    (:attr:`max_level` is ``T``); it registers no pairs.

    Args:
        dims: 2 or 3.
        widths: recovery U-Net widths (10, 20, 40).
        time_dim: sinusoidal embedding size (100).
        recursions: ``K`` of eq. 12 (2, sec. 2.2.1).
        timesteps: ``T`` (80, sec. 3.3).
        alpha, beta: ``n_t = floor(t^alpha / beta)`` (0.6, 1; sec. 3.3).
        cum_alpha, cum_beta: ``n_{t:1} = floor(t^cum_alpha / cum_beta)`` (1.3, 1.5; sec. 3.3).
        sigma: standard deviation of the finest DVF scale as a fraction of the image size along each axis.
        scales: ``m + 1`` scales of eq. 6.
        canvas: canvas size / image size (2, sec. 3.3).
        control_spacing: canvas voxels per control-grid point (see the module docstring).
        perturb: relative size of the DVF perturbation during training (0.05, sec. 3.3).
        lambda_dist, lambda_ang, lambda_reg: ``lambda_1..3`` of eq. 14 (1, 1, 10; sec. 3.3).
        eps: stabiliser of ``L_dist`` / ``L_ang`` in voxels.
        train_on: batch keys used as training images by :meth:`loss`.
        work_size: the size ``H x W (x D)`` DRDM works at (``None``: the input's size). Inputs of another size are
            resized to it (linear), and the generated fields are resized back to the input's size (and their
            vectors rescaled), as the paper does for downstream sizes ``H' x W' x D'`` (sec. 3.2).
        fields: ``"fresh"``: a new random DVF at every composition (eq. 2; the size of ``psi_{t:1}`` grows like
            ``sqrt(n_{t:1})``); ``"shared"``: one random DVF per sample, composed with itself (the official code;
            the size grows like ``n_{t:1}`` and ``psi_t`` points along ``psi_{t:1}``, a far stronger training signal,
            see the module docstring and chapter 08).

    Raises:
        ValueError: on bad arguments.
    """

    _CHUNK = 16  # unit DVFs sampled per call in the forward process
    level_symbol = "T'"
    downstream = "chapter 09 evaluates it downstream, through VoxelMorph trained on DRDM pairs."

    def __init__(
        self,
        dims: int = 2,
        widths: Sequence[int] = (10, 20, 40),
        time_dim: int = 100,
        recursions: int = 2,
        timesteps: int = 80,
        alpha: float = 0.6,
        beta: float = 1.0,
        cum_alpha: float = 1.3,
        cum_beta: float = 1.5,
        sigma: float = 7e-4,
        scales: int = 4,
        canvas: float = 2.0,
        control_spacing: int = 8,
        perturb: float = 0.05,
        lambda_dist: float = 1.0,
        lambda_ang: float = 1.0,
        lambda_reg: float = 10.0,
        eps: float = 1e-2,
        train_on: Sequence[str] = ("moving", "fixed"),
        work_size: Sequence[int] | None = None,
        fields: str = "fresh",
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if int(recursions) != recursions or recursions < 1:
            raise ValueError(f"recursions must be a positive integer, got {recursions}")
        if int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"timesteps must be a positive integer, got {timesteps}")
        if canvas < 1:
            raise ValueError(f"canvas must be >= 1 (a multiple of the image size), got {canvas}")
        if fields not in ("fresh", "shared"):
            raise ValueError(f"fields must be 'fresh' (eq. 2) or 'shared' (the official code), got {fields!r}")
        if len(tuple(widths)) != 3:
            raise ValueError(f"widths must have three entries, got {tuple(widths)}")
        self.dims = dims
        self.recursions = int(recursions)
        self.timesteps = int(timesteps)
        self.alpha, self.beta, self.cum_alpha, self.cum_beta = float(alpha), float(beta), float(cum_alpha), float(cum_beta)
        self.sigma, self.scales, self.canvas = float(sigma), int(scales), float(canvas)
        self.control_spacing, self.perturb = int(control_spacing), float(perturb)
        self.lambda_dist, self.lambda_ang, self.lambda_reg = float(lambda_dist), float(lambda_ang), float(lambda_reg)
        self.eps = float(eps)
        self.fields = fields
        self.train_on = tuple(train_on)
        self.work_size = None if work_size is None else tuple(int(s) for s in work_size)
        if self.work_size is not None and (len(self.work_size) != dims or any(s % 8 for s in self.work_size)):
            raise ValueError(f"work_size must be {dims} sizes divisible by 8, got {work_size}")
        #: D_theta (sec. 2.2.1, Appendix A)
        self.net = RecoveryUNet(dims, widths, time_dim, self.timesteps)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, T={self.timesteps}, K={self.recursions}, sigma={self.sigma}, "
                f"scales={self.scales}, canvas={self.canvas}, control_spacing={self.control_spacing}, "
                f"work_size={self.work_size}, fields={self.fields!r}")

    @property
    def max_level(self) -> int:
        """The largest level ``T'`` of :meth:`deform`: ``T`` (:attr:`timesteps`)."""
        return self.timesteps

    def _to_work(self, image: Tensor) -> Tensor:
        """Resize an image to :attr:`work_size` (identity when unset or equal)."""
        if self.work_size is None or tuple(image.shape[2:]) == self.work_size:
            return image
        mode = "bilinear" if self.dims == 2 else "trilinear"
        return F.interpolate(image, size=self.work_size, mode=mode, align_corners=False,
                             antialias=self.dims == 2)

    # ------------------------------------------------------------------------------------------------------------
    # Forward process (sec. 2.1)
    # ------------------------------------------------------------------------------------------------------------
    def n_t(self, t: int | Tensor) -> int | Tensor:
        """Eq. 9: unit DVFs composed into ``psi_t``."""
        return noise_level(t, self.alpha, self.beta)

    def n_cum(self, t: int | Tensor) -> int | Tensor:
        """Eq. 11 (practical): unit DVFs composed into ``psi_{t:1}``, at least ``n_t`` (so ``psi_{t:1}`` contains
        ``psi_t``; the official code clamps it to >= 1)."""
        n = cumulative_noise_level(t, self.cum_alpha, self.cum_beta)
        return torch.maximum(n, self.n_t(t)) if isinstance(n, Tensor) else max(n, self.n_t(t))

    def _canvas(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], Tensor]:
        """Canvas size, control-grid size and the finest-scale sigma in control-grid voxels, per axis."""
        canvas = tuple(int(round(self.canvas * s)) for s in spatial)
        grid = tuple(max(2, math.ceil(c / self.control_spacing)) for c in canvas)
        sig = torch.tensor([self.sigma * s * g / c for s, g, c in zip(spatial, grid, canvas)])
        return canvas, grid, sig

    def _to_image(self, field: Tensor, spatial: Sequence[int]) -> Tensor:
        """Control-grid field -> canvas (voxels of the image) -> the centred image region (sec. 3.3)."""
        canvas, _, _ = self._canvas(spatial)
        full = resize_field(field, canvas)
        idx = tuple(slice((c - s) // 2, (c - s) // 2 + s) for c, s in zip(canvas, spatial))
        return full[(slice(None), slice(None)) + idx].contiguous()

    def _shared_unit(self, batch: int, grid: Sequence[int], sig: Tensor, generator, device) -> Tensor | None:
        """The one unit DVF per sample of ``fields="shared"`` (``None`` for ``"fresh"``)."""
        if self.fields != "shared":
            return None
        return sample_velocity(batch, grid, sig.to(device).view(1, -1).expand(batch, -1), self.scales, generator,
                               device)

    def _compose_units(self, counts: Tensor, grid: Sequence[int], sig: Tensor, generator, device,
                       ddf: Tensor | None = None, trajectory: list | None = None,
                       unit: Tensor | None = None) -> Tensor:
        """Compose ``counts[b]`` unit DVFs (eq. 6) onto ``ddf`` (newest first: ``ddf <- u o ddf``, eq. 2): fresh
        ones, or ``unit`` ``(B, dims, *grid)`` every time when given (``fields="shared"``)."""
        B = counts.shape[0]
        if ddf is None:
            ddf = torch.zeros(B, self.dims, *grid, device=device)
        total = int(counts.max()) if B else 0
        if unit is not None:
            for k in range(total):
                on = (counts > k).to(ddf.dtype).to(device).view(B, *([1] * (self.dims + 1)))
                ddf = _grid_compose(unit * on, ddf)
                if trajectory is not None:
                    trajectory.append(ddf)
            return ddf
        sig = sig.to(device).view(1, 1, -1)
        for start in range(0, total, self._CHUNK):  # unit fields drawn a chunk of steps at a time
            n = min(self._CHUNK, total - start)
            on = (counts.view(1, B) > torch.arange(start, start + n).view(n, 1)).to(ddf.dtype).to(device)
            units = sample_velocity(n * B, grid, (sig * on.unsqueeze(-1)).reshape(n * B, -1), self.scales,
                                    generator, device).view(n, B, self.dims, *grid)
            for u in units:
                ddf = _grid_compose(u, ddf)
                if trajectory is not None:
                    trajectory.append(ddf)
        return ddf

    def diffuse(self, images: Tensor, t: Tensor | int, generator: torch.Generator | None = None,
                perturb: float | None = None) -> dict[str, Tensor]:
        """The forward process of one training step (Alg. 1): ``psi_t``, ``psi_{t:1}`` and ``I_t``.

        ``psi_{t-1:1}`` composes ``n_{t:1} - n_t`` fresh unit DVFs and ``psi_t`` another ``n_t`` (eq. 2, 9-11);
        the image is deformed by ``psi~_{t:1} = psi~_t o psi_{t-1:1}`` where ``psi~_t = psi_t o delta`` carries a
        perturbation ``delta`` of relative size ``perturb`` (5 %, sec. 3.3; ``delta`` has the eq. 6 form with sigma
        ``perturb * sqrt(n_t) * sigma``, i.e. ``perturb`` times the size of ``psi_t`` by eq. 7; ``perturb * n_t *
        sigma`` with ``fields="shared"``).

        Args:
            images: ``(B, C, *spatial)``.
            t: steps in ``1 ... T`` (an int or ``(B,)``).
            generator: random generator.
            perturb: override of ``self.perturb`` (0: none).

        Returns:
            ``{"dvf": psi_t, "ddf": psi~_{t:1}, "deformed": I_t, "t": t}``, fields ``(B, dims, *spatial)``.
        """
        B, spatial, device = images.shape[0], tuple(images.shape[2:]), images.device
        t = torch.full((B,), int(t), dtype=torch.long) if not isinstance(t, Tensor) else t.long().cpu()
        if t.min() < 1 or t.max() > self.timesteps:
            raise ValueError(f"t must be in [1, {self.timesteps}], got {t.tolist()}")
        _, grid, sig = self._canvas(spatial)
        n_t, n_cum = self.n_t(t), self.n_cum(t)
        unit = self._shared_unit(B, grid, sig, generator, device)
        prev = self._compose_units(n_cum - n_t, grid, sig, generator, device, unit=unit)
        step = self._compose_units(n_t, grid, sig, generator, device, unit=unit)
        p = self.perturb if perturb is None else float(perturb)
        noisy = step
        if p > 0:  # the size of psi_t: sqrt(n_t) unit sizes for fresh fields (eq. 7), n_t for a shared one
            size = n_t.double().sqrt() if unit is None else n_t.double()
            scale = (p * size).float().to(device).view(B, 1)
            delta = sample_velocity(B, grid, sig.to(device).view(1, -1) * scale, self.scales, generator, device)
            noisy = compose(step, delta)
        ddf = self._to_image(compose(noisy, prev), spatial)
        return {"dvf": self._to_image(step, spatial), "ddf": ddf, "deformed": warp(images, ddf), "t": t.to(device)}

    def sample_ddf(self, shape: Sequence[int], level: int, batch: int = 1, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, trajectory: bool = False) -> Tensor | list[Tensor]:
        """A random diffused DDF ``psi_{T':1}`` (Alg. 2 line 3; eq. 6, 10): ``n_{T':1}`` fresh unit DVFs composed.

        Args:
            shape: image spatial size.
            level: ``T'`` in ``0 ... T`` (0: the zero field).
            batch: number of fields.
            generator: random generator (the same generator state gives the same field).
            device: of the result.
            trajectory: also return the nested fields ``psi_{t:1}`` for ``t = 1 ... T'`` (``n_{t:1}`` fields each).

        Returns:
            ``(batch, dims, *shape)`` field in voxels, or the list ``[psi_{1:1}, ..., psi_{T':1}]`` when
            ``trajectory`` (its last entry is the field itself).
        """
        spatial = tuple(int(s) for s in shape)
        if len(spatial) != self.dims:
            raise ValueError(f"shape must have {self.dims} entries, got {spatial}")
        if int(level) != level or not 0 <= level <= self.timesteps:
            raise ValueError(f"level must be an integer in [0, {self.timesteps}], got {level}")
        level = int(level)
        _, grid, sig = self._canvas(spatial)
        total = self.n_cum(level) if level > 0 else 0
        chain: list[Tensor] = []
        unit = self._shared_unit(batch, grid, sig, generator, device)
        ddf = self._compose_units(torch.full((batch,), total), grid, sig, generator, device, trajectory=chain,
                                  unit=unit)
        if not trajectory:
            return self._to_image(ddf, spatial)
        zero = torch.zeros(batch, self.dims, *grid, device=device)
        return [self._to_image(chain[self.n_cum(t) - 1] if chain else zero, spatial) for t in range(1, level + 1)]

    # ------------------------------------------------------------------------------------------------------------
    # Recovery network (eq. 12) and training (eq. 13-14)
    # ------------------------------------------------------------------------------------------------------------
    def recover_step(self, image: Tensor, t: Tensor | int, recursions: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Eq. 12: ``psi_hat_t = psi_hat^(K) o ... o psi_hat^(1)``, ``psi_hat^(k) = D(I^(k), t)`` with
        ``I^(k) = warp(I, psi_hat^(k-1) o ... o psi_hat^(1))`` (one resampling of ``I`` each time).

        Returns:
            ``(psi_hat_t, [psi_hat^(1), ..., psi_hat^(K)])``, each ``(B, dims, *spatial)``.
        """
        if image.ndim != self.dims + 2:
            raise ValueError(f"image must be (B, C, *spatial) with {self.dims} spatial dims, got {tuple(image.shape)}")
        if any(s % 8 for s in image.shape[2:]):
            raise ValueError(f"DRDM needs spatial sizes divisible by 8, got {tuple(image.shape[2:])}")
        B = image.shape[0]
        t = torch.full((B,), int(t), dtype=torch.long, device=image.device) if not isinstance(t, Tensor) \
            else t.long().to(image.device).expand(B)
        K = self.recursions if recursions is None else int(recursions)
        parts: list[Tensor] = []
        total: Tensor | None = None
        current = image
        for _ in range(K):
            part = self.net(current, t).float()
            parts.append(part)
            total = part if total is None else compose(part, total)
            current = warp(image, total)
        return total, parts

    def forward(self, image: Tensor, t: Tensor | int) -> Tensor:  # type: ignore[override]
        """``psi_hat_t = D_theta(I_t, t)`` with ``K`` recursions (eq. 12), ``(B, dims, *spatial)`` voxels.

        DRDM is not a pair registration model: ``forward`` is its recovery network (see the module docstring).
        """
        return self.recover_step(image, t)[0]

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"total", "dist", "ang", "reg"}`` of eq. 14 for one random step per image (Alg. 1).

        The training images are ``batch[k]`` for ``k`` in ``train_on`` (default both ``moving`` and ``fixed``, two
        independent images of each pair); ``t ~ U{1, ..., T}`` per image (global torch RNG, seeded by the trainer).
        """
        present = [batch[k] for k in self.train_on if k in batch]
        if not present:
            raise ValueError(f"batch has none of the keys {self.train_on}")
        images = self._to_work(torch.cat(present, 0))
        t = torch.randint(1, self.timesteps + 1, (images.shape[0],))
        with torch.no_grad():
            d = self.diffuse(images, t)
        psi_hat = self(d["deformed"], d["t"])
        dist = distance_loss(d["dvf"], psi_hat, self.eps)
        ang = angle_loss(d["dvf"], psi_hat, self.eps)
        reg = regularisation_loss(psi_hat)
        total = self.lambda_dist * dist + self.lambda_ang * ang + self.lambda_reg * reg
        return {"total": total, "dist": dist, "ang": ang, "reg": reg}

    # ------------------------------------------------------------------------------------------------------------
    # Instance deformation (Alg. 2) and data synthesis (Alg. 3, 4)
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def deform(self, image: Tensor, level: int, generator: torch.Generator | None = None,
               return_trajectory: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, list]]:
        """Alg. 2: a plausible random deformation of ``image`` whose size is set by ``level = T'``.

        ``phi <- psi_{T':1}`` (random, :meth:`sample_ddf`), then for ``t = T', ..., 1``: ``psi_hat_t = D(I_hat_t,
        t)`` (eq. 12), ``phi <- psi_hat_t o phi`` (eq. 1), ``I_hat_{t-1} = warp(I_0, phi)`` (eq. 4). With
        :attr:`work_size` set, this runs on the resized image and ``phi`` is resized back (sec. 3.2).

        Args:
            image: ``(B, C, *spatial)`` ``I_0``.
            level: ``T'`` in ``0 ... T``.
            generator: random generator of the diffused field (same state -> same output).
            return_trajectory: also return ``{"diffusion": [(t, ddf, image)] for t = 0..T', "recovery": [(t, ddf,
                image)] for t = T'..0}`` (the paper's Fig. 6), at the input's size.

        Returns:
            ``(ddf, deformed)`` (``(B, dims, *spatial)``, ``(B, C, *spatial)``), plus the trajectory if asked.
        """
        if image.ndim != self.dims + 2:
            raise ValueError(f"image must be (B, C, *spatial) with {self.dims} spatial dims, got {tuple(image.shape)}")
        B, spatial = image.shape[0], tuple(image.shape[2:])
        work = self._to_work(image)
        wspatial = tuple(work.shape[2:])

        def full(field: Tensor) -> Tensor:
            return resize_field(field, spatial) if wspatial != spatial else field

        fields = self.sample_ddf(wspatial, level, B, generator, image.device, trajectory=return_trajectory)
        if not return_trajectory:
            phi = fields
        else:
            phi = fields[-1] if fields else work.new_zeros(B, self.dims, *wspatial)
        current = warp(work, phi)
        traj: dict[str, list] = {"diffusion": [], "recovery": []}
        if return_trajectory:
            zero = image.new_zeros(B, self.dims, *spatial)
            traj["diffusion"] = [(0, zero, image)] + [(t + 1, full(f), warp(image, full(f)))
                                                      for t, f in enumerate(fields)]
            traj["recovery"].append((int(level), full(phi), warp(image, full(phi))))
        for t in range(int(level), 0, -1):
            psi_hat = self(current, t)
            phi = compose(psi_hat, phi)
            current = warp(work, phi)
            if return_trajectory:
                traj["recovery"].append((t - 1, full(phi), warp(image, full(phi))))
        phi = full(phi)
        deformed = warp(image, phi)
        return (phi, deformed, traj) if return_trajectory else (phi, deformed)

    @torch.no_grad()
    def synthesize_pairs(self, images: Tensor, levels: Sequence[tuple[int, int]], labels: Tensor | None = None,
                         generator: torch.Generator | None = None) -> list[dict[str, Tensor]]:
        """Alg. 4: registration pairs with known fields.

        For each ``(T_aug, T_syn)`` in ``levels``: ``phi_aug = deform(I_0, T_aug)``, ``moving = warp(I_0, phi_aug)``;
        ``phi_syn = deform(moving, T_syn)``, ``fixed = warp(I_0, phi_syn o phi_aug) = warp(moving, phi_syn)``
        (one resampling of ``I_0``; the paper's line 9 writes ``phi_syn o phi_syn``, a typo). With diffreg's pull
        convention ``moving(p + ddf(p)) = fixed(p)``, so ``ddf = phi_syn`` is the ground truth of registering
        ``moving`` to ``fixed``.

        Args:
            images: ``(B, C, *spatial)`` source images ``I_0``.
            levels: pairs ``(T_aug, T_syn)``.
            labels: optional ``(B, 1, *spatial)`` integer labels of ``images`` (deformed alongside).
            generator: random generator.

        Returns:
            One dict per level pair with ``moving``, ``fixed``, ``ddf`` (``phi_syn``), ``ddf_aug`` and, with labels,
            ``moving_label`` and ``fixed_label``.
        """
        out = []
        for t_aug, t_syn in levels:
            phi_aug, moving = self.deform(images, int(t_aug), generator)
            phi_syn, _ = self.deform(moving, int(t_syn), generator)
            total = compose(phi_syn, phi_aug)
            item = {"moving": moving, "fixed": warp(images, total), "ddf": phi_syn, "ddf_aug": phi_aug}
            if labels is not None:
                item["moving_label"] = self.deform_labels(labels, phi_aug)
                item["fixed_label"] = self.deform_labels(labels, total)
            out.append(item)
        return out
