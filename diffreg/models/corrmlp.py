"""CorrMLP (Meng, Feng, Bi, Kim, CVPR 2024): correlation-aware coarse-to-fine MLPs for deformable registration.

FlowReg's backbone (``diffreg/models/flowreg.py``) and a strong non-generative baseline. The paper's full text is not
in this project; every architectural fact below comes from the official code (``MungoMeng/Registration-CorrMLP``)
as re-implemented in FlowReg's repository (``mathpluscode/FlowReg``, ``corrmlp/networks.py`` and
``corrmlp/train.yaml``, commit 286411e), read, not copied. Explained beside FlowReg (the book's FlowReg chapter).

Method, top to bottom:

1. **Encoder** (:class:`ConvEncoder`): four convolution blocks (3^n conv, LeakyReLU 0.2, instance norm, twice), the
   widths ``C, 2C, 4C, 8C`` (``C = enc_channels``, 8), average pooling by 2 between them. The fixed and the moving
   image go through the same encoder.
2. **Correlation-aware multi-window MLP block** (:class:`CMWBlock`), the decoder's unit: the local correlation of
   the two inputs over a ``3^n`` neighbourhood (the channel mean of ``x1 * shift(x2)``, zero padded: 27 channels in
   3D, 9 in 2D) is concatenated between them and projected by a 3^n convolution; then a multi-window gated MLP
   (:class:`MultiWindowMLP`: spatial-gating MLPs inside non-overlapping windows of 3, 5 and 7 voxels, mixed by
   learned softmax weights) and a residual channel-attention block (:class:`RCAB`), with a residual connection.
3. **Coarse-to-fine decoder** (:class:`CorrMLPDecoder`): at the coarsest level (1/8) a CMW block of the fixed and
   moving features and a field head; at each finer level the field so far is up-sampled (x2, vectors doubled), the
   moving features are warped by it, a CMW block correlates them with the fixed features, a second CMW block merges
   the result with the up-sampled (transposed-convolution) features of the level below, and a head adds a
   residual field. Heads are 3^n convolutions initialised at N(0, 1e-5) (a near-identity start).
4. **Loss** (``corrmlp/train.yaml``): local NCC (window 9) of the warped moving image and the fixed image, plus
   ``reg_weight`` (1.0) times the mean squared forward difference of the field (in mm when a voxel spacing is given,
   as the official ``Grad('l2')`` does).

Shapes: images ``(B, 1, *spatial)`` with every spatial size divisible by 8; the field ``(B, dims, *spatial)`` in
voxels, pull convention (``warped(p) = moving(p + ddf(p))``, channel ``i`` along array axis ``i``), as everywhere in
:mod:`diffreg`.

Deviations from the official code (stated again in the chapter):

* 2D as well as 3D (the official code is 3D only): windows ``w x w``, a ``3 x 3`` correlation (9 channels).
* Fields are up- and down-sampled with :func:`diffreg.spatial.resize_field` (cell-centred, ``align_corners=False``)
  instead of ``align_corners=True`` interpolation: one convention for the whole package.
* The image in the loss is warped with :func:`diffreg.spatial.warp` (border padding, the package's); features are
  warped with zero padding, as the official spatial transformer does.
* No gradient checkpointing (a memory option of the official code, not a change of the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffreg import losses
from diffreg.models.base import RegistrationModel, RegistrationResult, check_pair
from diffreg.spatial import resize_field, warp

__all__ = ["CorrMLP", "CorrMLPNet", "ConvEncoder", "CMWBlock", "CorrMLPDecoder", "local_correlation",
           "physical_smoothness", "registration_loss", "check_size"]


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _channels_last(x: Tensor) -> Tensor:
    return x.movedim(1, -1)


def _channels_first(x: Tensor) -> Tensor:
    return x.movedim(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# 1. The encoder
# ----------------------------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """Two 3^n convolutions, each followed by LeakyReLU(0.2) and instance normalisation (in that order)."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        conv, norm = _conv(dims), nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
        self.conv1, self.norm1 = conv(cin, cout, 3, padding=1), norm(cout)
        self.conv2, self.norm2 = conv(cout, cout, 3, padding=1), norm(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(F.leaky_relu(self.conv1(x), 0.2))
        return self.norm2(F.leaky_relu(self.conv2(x), 0.2))


class ConvEncoder(nn.Module):
    """Features at full, 1/2, 1/4 and 1/8 resolution with ``C, 2C, 4C, 8C`` channels (average pooling by 2)."""

    def __init__(self, dims: int, in_channels: int = 1, channels: int = 8) -> None:
        super().__init__()
        widths = [channels * 2 ** i for i in range(4)]
        self.blocks = nn.ModuleList(ConvBlock(dims, cin, cout) for cin, cout in zip([in_channels] + widths, widths))
        self.pool = nn.AvgPool3d(2) if dims == 3 else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, block in enumerate(self.blocks):
            x = block(self.pool(x) if i else x)
            out.append(x)
        return out


# ----------------------------------------------------------------------------------------------------------------
# 2. The correlation-aware multi-window MLP block
# ----------------------------------------------------------------------------------------------------------------
def local_correlation(x1: Tensor, x2: Tensor, max_disp: int = 1) -> Tensor:
    """The channel mean of ``x1 * x2`` shifted by every offset in ``[-max_disp, max_disp]^n`` (``x2`` zero padded).

    Args:
        x1, x2: ``(B, C, *spatial)`` feature maps of one shape.
        max_disp: largest offset per axis.

    Returns:
        ``(B, (2 max_disp + 1)^n, *spatial)``, offsets in row-major order over the axes.
    """
    dims = x1.ndim - 2
    spatial = x1.shape[2:]
    padded = F.pad(x2, (max_disp,) * (2 * dims))
    k = 2 * max_disp + 1
    out = []
    for offset in torch.cartesian_prod(*[torch.arange(k)] * dims).reshape(-1, dims).tolist():
        window = tuple(slice(o, o + s) for o, s in zip(offset, spatial))
        out.append((x1 * padded[(slice(None), slice(None), *window)]).mean(1, keepdim=True))
    return torch.cat(out, 1)


def _windows(x: Tensor, win: int) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(B, *spatial, C)`` padded to multiples of ``win`` and cut into windows: ``(B, G, win^n, C)``, the grid and
    the padded size."""
    dims = x.ndim - 2
    spatial = x.shape[1:-1]
    pads = [(win - s % win) % win for s in spatial]
    flat_pad = [0, 0]
    for p in reversed(pads):
        flat_pad += [0, p]
    x = F.pad(x, flat_pad)
    grid = tuple((s + p) // win for s, p in zip(spatial, pads))
    b, c = x.shape[0], x.shape[-1]
    shape = [b]
    for g in grid:
        shape += [g, win]
    x = x.reshape(*shape, c)
    order = [0] + [1 + 2 * i for i in range(dims)] + [2 + 2 * i for i in range(dims)] + [2 * dims + 1]
    return x.permute(order).reshape(b, -1, win ** dims, c), grid, tuple(s + p for s, p in zip(spatial, pads))


def _unwindows(x: Tensor, grid: tuple[int, ...], win: int, spatial: Sequence[int]) -> Tensor:
    """Inverse of :func:`_windows`, cropped back to ``spatial``."""
    dims = len(grid)
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, *grid, *([win] * dims), c)
    order = [0]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    x = x.permute(order + [2 * dims + 1]).reshape(b, *[g * win for g in grid], c)
    return x[(slice(None), *[slice(0, s) for s in spatial])].contiguous()


class SpatialGatingUnit(nn.Module):
    """gMLP's gate: split the channels into ``u, v``; ``u * (W_window(LayerNorm(v)) + 1)``, with ``W_window`` a
    linear map across the ``n`` positions of a window."""

    def __init__(self, channels: int, n: int) -> None:
        super().__init__()
        self.mix = nn.Linear(n, n)
        self.norm = nn.LayerNorm(channels // 2)

    def forward(self, x: Tensor) -> Tensor:
        u, v = x.chunk(2, dim=-1)
        v = self.mix(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
        return u * (v + 1.0)


class WindowGMLP(nn.Module):
    """A gated MLP inside non-overlapping ``win^n`` windows: LayerNorm, Linear(C, 2C), GELU, spatial gating,
    Linear(C, C), plus the input (channels last)."""

    def __init__(self, dims: int, win: int, channels: int) -> None:
        super().__init__()
        self.win = win
        self.norm = nn.LayerNorm(channels)
        self.inp = nn.Linear(channels, 2 * channels)
        self.gate = SpatialGatingUnit(2 * channels, win ** dims)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[1:-1]
        w, grid, _ = _windows(x, self.win)
        w = w + self.out(self.gate(F.gelu(self.inp(self.norm(w)))))
        return _unwindows(w, grid, self.win, spatial)


class MultiWindowMLP(nn.Module):
    """Window gMLPs of 3, 5 and 7 voxels on the normalised input, mixed per channel by softmax weights that an MLP
    (C -> C/4 -> 3C) predicts from their pooled sum; a linear projection and the input added (channels last)."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.branches = nn.ModuleList(WindowGMLP(dims, w, channels) for w in (3, 5, 7))
        self.reweight = nn.Sequential(nn.Linear(channels, channels // 4), nn.GELU(),
                                      nn.Linear(channels // 4, 3 * channels))
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[0], x.shape[-1]
        xs = [branch(self.norm(x)) for branch in self.branches]
        pooled = sum(xs).reshape(b, -1, c).mean(1)
        a = self.reweight(pooled).reshape(b, c, 3).permute(2, 0, 1).softmax(0)   # (3, B, C)
        shape = (b,) + (1,) * (x.ndim - 2) + (c,)
        mixed = sum(xi * ai.reshape(shape) for xi, ai in zip(xs, a))
        return self.out(mixed) + x


class RCAB(nn.Module):
    """Residual channel attention: LayerNorm, 3^n conv, LeakyReLU(0.2), 3^n conv, squeeze-and-excitation (reduction
    4), plus the input (channels last)."""

    def __init__(self, dims: int, channels: int, reduction: int = 4) -> None:
        super().__init__()
        conv = _conv(dims)
        self.norm = nn.LayerNorm(channels)
        self.conv1, self.conv2 = conv(channels, channels, 3, padding=1), conv(channels, channels, 3, padding=1)
        self.squeeze, self.excite = conv(channels, channels // reduction, 1), conv(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.leaky_relu(self.conv1(_channels_first(self.norm(x))), 0.2))
        w = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean(tuple(range(2, y.ndim)), keepdim=True)))))
        return _channels_last(y * w) + x


class CMWBlock(nn.Module):
    """Correlation-aware multi-window MLP block: ``proj([x1, corr(x1, x2), x2])``, then the multi-window MLP and the
    RCAB, plus the projection (channels first in and out)."""

    def __init__(self, dims: int, in_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = _conv(dims)(2 * in_channels + 3 ** dims, channels, 3, padding=1)
        self.mlp = MultiWindowMLP(dims, channels)
        self.rcab = RCAB(dims, channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x = self.proj(torch.cat([x1, local_correlation(x1, x2), x2], 1))
        return _channels_first(self.rcab(self.mlp(_channels_last(x)))) + x


# ----------------------------------------------------------------------------------------------------------------
# 3. The coarse-to-fine decoder
# ----------------------------------------------------------------------------------------------------------------
class PatchExpand(nn.Module):
    """Up-sampling by 2: a transposed convolution ``C -> C/2`` (kernel 2, stride 2) and a LayerNorm."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.up = (nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d)(channels, channels // 2, 2, stride=2)
        self.norm = nn.LayerNorm(channels // 2)

    def forward(self, x: Tensor) -> Tensor:
        return _channels_first(self.norm(_channels_last(self.up(x))))


def _head(dims: int, channels: int) -> nn.Module:
    """A 3^n convolution to a ``dims``-channel field, weights N(0, 1e-5) and bias 0 (a near-identity start)."""
    head = _conv(dims)(channels, dims, 3, padding=1)
    nn.init.normal_(head.weight, 0.0, 1e-5)
    nn.init.zeros_(head.bias)
    return head


def _up(flow: Tensor) -> Tensor:
    return resize_field(flow, [2 * s for s in flow.shape[2:]])


class CorrMLPDecoder(nn.Module):
    """Four levels from 1/8 to full resolution; level ``i`` (0 = full) has ``dec * 2^i`` channels.

    ``forward(fixed_features, moving_features, moving_offsets=None, field=None)``: ``moving_offsets`` (one tensor per
    level, broadcast-added to the moving features; FlowReg's time embedding) and ``field`` (a field the prediction
    starts from; FlowReg's current state) are optional; without them this is CorrMLP's decoder.
    """

    def __init__(self, dims: int, in_channels: int = 8, channels: int = 16) -> None:
        super().__init__()
        self.dims = dims
        ins = [in_channels * 2 ** i for i in range(4)]
        outs = [channels * 2 ** i for i in range(4)]
        self.correlate = nn.ModuleList(CMWBlock(dims, i, o) for i, o in zip(ins, outs))
        self.merge = nn.ModuleList(CMWBlock(dims, o, o) for o in outs[:3])
        self.expand = nn.ModuleList(PatchExpand(dims, o) for o in outs[1:])
        self.heads = nn.ModuleList(_head(dims, o) for o in outs)

    def forward(self, fixed: list[Tensor], moving: list[Tensor], moving_offsets: list[Tensor] | None = None,
                field: Tensor | None = None) -> Tensor:
        if moving_offsets is not None:
            moving = [m + o for m, o in zip(moving, moving_offsets)]
        fields = [None] * 4
        if field is not None:   # the starting field at each level (halved grids, halved vectors)
            fields[0] = field
            for i in range(1, 4):
                fields[i] = resize_field(fields[i - 1], fixed[i].shape[2:])
        m3 = moving[3] if fields[3] is None else warp(moving[3], fields[3], padding_mode="zeros")
        x = self.correlate[3](fixed[3], m3)
        flow = self.heads[3](x) + (0 if fields[3] is None else fields[3])
        for i in (2, 1, 0):
            flow = _up(flow)
            y = self.correlate[i](fixed[i], warp(moving[i], flow, padding_mode="zeros"))
            x = self.merge[i](y, self.expand[i](x))
            flow = self.heads[i](x) + flow
        return flow


class CorrMLPNet(nn.Module):
    """Encoder (shared by both images) and decoder: ``(moving, fixed) -> ddf``."""

    def __init__(self, dims: int = 3, in_channels: int = 1, enc_channels: int = 8, dec_channels: int = 16) -> None:
        super().__init__()
        self.encoder = ConvEncoder(dims, in_channels, enc_channels)
        self.decoder = CorrMLPDecoder(dims, enc_channels, dec_channels)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        return self.decoder(self.encoder(fixed), self.encoder(moving))


# ----------------------------------------------------------------------------------------------------------------
# 4. The loss and the model
# ----------------------------------------------------------------------------------------------------------------
def physical_smoothness(ddf: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """The official ``Grad('l2')``: the field in mm (component ``c`` times ``spacing[c]``), its forward differences
    along each axis divided by that axis' spacing, squared, averaged per axis, and the axes averaged. With unit
    spacing this is :func:`diffreg.losses.gradient_smoothness`."""
    dims = ddf.ndim - 2
    sp = [1.0] * dims if spacing is None else [float(s) for s in spacing]
    field = ddf * torch.tensor(sp, dtype=ddf.dtype, device=ddf.device).view(1, dims, *([1] * dims))
    terms = [(field.diff(dim=2 + a) / sp[a]).pow(2).mean() for a in range(dims)]
    return sum(terms) / dims


def registration_loss(moving: Tensor, fixed: Tensor, ddf: Tensor, ncc_window: int = 9, reg_weight: float = 1.0,
                      spacing: Sequence[float] | None = None) -> dict[str, Tensor]:
    """CorrMLP's (and FlowReg's) loss: ``-NCC(warp(moving, ddf), fixed) + reg_weight * physical_smoothness(ddf)``,
    with its two terms (``ncc``, ``smooth``)."""
    sim = losses.ncc_loss(warp(moving, ddf), fixed, ncc_window)
    reg = physical_smoothness(ddf, spacing)
    return {"total": sim + reg_weight * reg, "ncc": sim, "smooth": reg}


def check_size(moving: Tensor, fixed: Tensor, dims: int, name: str) -> None:
    """:func:`~diffreg.models.base.check_pair`, and every spatial size divisible by 8 (three poolings)."""
    check_pair(moving, fixed, dims)
    if any(s % 8 for s in moving.shape[2:]):
        raise ValueError(f"{name} needs spatial sizes divisible by 8, got {tuple(moving.shape[2:])}")


class CorrMLP(RegistrationModel):
    """CorrMLP as a :class:`~diffreg.models.RegistrationModel` (module docstring).

    Args:
        dims: 2 or 3 (the official code: 3).
        in_channels, enc_channels, dec_channels: image channels and the widths (1, 8, 16: ``corrmlp/train.yaml``).
        ncc_window: window of the local NCC (9).
        reg_weight: weight of the smoothness term (1.0).
        spacing: voxel spacing in mm per array axis for the smoothness term (``None``: 1; the official ACDC setting
            is (3.15, 1.5, 1.5)).

    Raises:
        ValueError: ``dims`` not 2 or 3.
    """

    def __init__(self, dims: int = 3, in_channels: int = 1, enc_channels: int = 8, dec_channels: int = 16,
                 ncc_window: int = 9, reg_weight: float = 1.0, spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.dims = dims
        self.ncc_window, self.reg_weight = int(ncc_window), float(reg_weight)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.net = CorrMLPNet(dims, in_channels, enc_channels, dec_channels)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """The field ``(B, dims, *spatial)`` in voxels."""
        check_size(moving, fixed, self.dims, "CorrMLP")
        return self.net(moving, fixed)

    def registration_loss(self, moving: Tensor, fixed: Tensor, ddf: Tensor) -> dict[str, Tensor]:
        """:func:`registration_loss` with this model's settings."""
        return registration_loss(moving, fixed, ddf, self.ncc_window, self.reg_weight, self.spacing)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        moving, fixed = batch["moving"], batch["fixed"]
        return self.registration_loss(moving, fixed, self(moving, fixed))

    @torch.no_grad()
    def register(self, moving: Tensor, fixed: Tensor, **options: Any) -> RegistrationResult:
        if options:
            raise ValueError(f"CorrMLP.register takes no options, got {sorted(options)}")
        ddf = self(moving, fixed)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={})
