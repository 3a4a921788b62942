"""VoxelMorph (Balakrishnan et al., IEEE TMI 2019) and VoxelMorph-diff (Dalca et al., MedIA 2019).

The learning-based registration baseline every diffusion paper compares against, and the "VoxelMorph-1 backbone"
that DiffuseMorph's deformation network reuses. Explained in chapter 02 (``notebooks/02_voxelmorph.md``).

Method, top to bottom:

1. A U-Net ``g_theta`` maps the concatenated pair ``[m, f]`` to a field (MONAI ``VoxelMorphUNet``: 3x3 convs,
   LeakyReLU 0.2, max-pooling, nearest upsampling, skip connections). Two published layouts (``LAYOUTS``):
   VM-1 (encoder 16,32,32,32; decoder 32,32,32,32,8,8) and VM-2 (decoder 32,32,32,32,32,16,16, the voxelmorph
   default: 327,331 parameters in 3D, exactly the official count). The last conv is initialised with
   N(0, 1e-5) weights and zero bias as in the official code, so training starts from the identity.
2. VoxelMorph: the field is the displacement ``u`` itself. VoxelMorph-diff: the field is a stationary velocity
   ``v``, optionally at ``1/int_downsize`` resolution, integrated by scaling and squaring (``int_steps`` = 7)
   into a diffeomorphic displacement, then resized back.
3. Loss: ``L = -NCC_9(m o phi, f) + lambda * R(u)`` (Balakrishnan 2019, eq. 5 with the local CC of eq. 4; or
   MSE), where ``R`` is :func:`diffreg.losses.gradient_smoothness`: squared forward differences averaged over
   voxels, components and axes, as the official ``Grad('l2')`` computes the paper's ``sum ||grad u||^2``. For VoxelMorph-diff the smoothness acts on the velocity, as the official code does.

Deviations (each also in the box of chapter 02):

* **VoxelMorph-diff is deterministic.** Dalca et al. train a probabilistic model (mean and log-variance of ``v``, a
  KL loss); we keep the deterministic velocity model of the voxelmorph library (``--int-steps 7``), which is what
  the diffusion papers compare with.
* **Local NCC at the image border.** :func:`diffreg.losses.ncc_map` computes each window's statistics over the
  voxels inside the image only; the official ``NCC`` (and MONAI's LNCC) zero-pads. The official code computes NCC on
  [0, 1] images, where the padding looks like background: in the interior both give the same values, and ours stays
  invariant to affine intensity changes at the border too, with no artificial border band for images in [-1, 1].
  Flat windows are held at ``cc = 0`` by a floor relative to the image variance (the official code adds 1e-5 to
  the product of the variances).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffreg import losses
from diffreg.models.base import RegistrationModel, RegistrationResult, check_pair
from diffreg.spatial import integrate, resize_field, warp

__all__ = ["VoxelMorph", "VoxelMorphDiff", "LAYOUTS", "voxelmorph_unet"]

#: U-Net layouts as (MONAI ``channels`` pairs, ``unet_out_channels``, ``final_conv_channels``). The MONAI spec lists
#: encoder/decoder widths as pairs per level; the official "decoder 32,32,32,32 + remaining convs" maps onto the
#: last decoder width (``unet_out_channels``) plus ``final_conv_channels``.
LAYOUTS: dict[str, tuple[tuple[int, ...], int, tuple[int, ...]]] = {
    # VM-1: enc [16, 32, 32, 32], dec [32, 32, 32, 32, 8, 8]  (Balakrishnan 2019, Fig. 3)
    "vm1": ((16, 32, 32, 32, 32, 32, 32, 32), 8, (8,)),
    # VM-2: enc [16, 32, 32, 32], dec [32, 32, 32, 32, 32, 16, 16]  (Balakrishnan 2019, Fig. 3; library default)
    "vm2": ((16, 32, 32, 32, 32, 32, 32, 32), 32, (16, 16)),
}


def voxelmorph_unet(dims: int, in_channels: int = 2, layout: str = "vm2") -> nn.Module:
    """The VoxelMorph U-Net: ``(B, in_channels, *spatial) -> (B, dims, *spatial)``.

    Spatial sizes must be divisible by 16 (four poolings). ``in_channels`` must be even (a MONAI requirement);
    DiffuseMorph feeds ``[moving, score]`` here.

    Raises:
        ValueError: unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VoxelMorph layout {layout!r}; known: {sorted(LAYOUTS)}")
    # Imported here: ``import monai.networks.nets`` takes seconds, and MONAI imports matplotlib.pyplot when it is
    # installed (monai.utils.jupyter_utils), so ``import diffreg.models`` stays light until a model is built.
    from monai.networks.nets.voxelmorph import VoxelMorphUNet

    channels, unet_out, final = LAYOUTS[layout]
    net = VoxelMorphUNet(
        spatial_dims=dims,
        in_channels=in_channels,
        unet_out_channels=unet_out,
        channels=channels,
        final_conv_channels=final,
    )
    # Official initialisation of the flow layer: N(0, 1e-5) weights, zero bias -> the identity at step 0.
    flow = net.net[1].final_conv_out.conv
    torch.nn.init.normal_(flow.weight, mean=0.0, std=1e-5)
    torch.nn.init.zeros_(flow.bias)
    return net


class VoxelMorph(RegistrationModel):
    """VoxelMorph: ``forward(moving, fixed) -> ddf`` with a U-Net predicting the displacement directly.

    Args:
        dims: 2 or 3 spatial dimensions.
        layout: ``"vm1"`` or ``"vm2"`` (see :data:`LAYOUTS`).
        similarity: ``"ncc"`` (local NCC, window ``ncc_window``) or ``"mse"``.
        ncc_window: NCC window side (9 in the paper).
        smooth_weight: lambda of the smoothness term.
        int_steps: 0 for VoxelMorph; > 0 makes the network output a velocity integrated with that many
            scaling-and-squaring steps (VoxelMorph-diff).
        int_downsize: integrate the velocity at ``1 / int_downsize`` resolution (1 = full resolution).

    Shapes: ``moving``, ``fixed`` ``(B, 1, *spatial)`` with every spatial size divisible by 16; output
    ``(B, dims, *spatial)`` in voxels.
    """

    def __init__(
        self,
        dims: int = 2,
        layout: str = "vm2",
        similarity: str = "ncc",
        ncc_window: int = 9,
        smooth_weight: float = 1.0,
        int_steps: int = 0,
        int_downsize: int = 1,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if similarity not in ("ncc", "mse"):
            raise ValueError(f"similarity must be 'ncc' or 'mse', got {similarity!r}")
        if int_steps < 0 or int_downsize < 1:
            raise ValueError("int_steps must be >= 0 and int_downsize >= 1")
        self.dims = dims
        self.layout = layout
        self.similarity = similarity
        self.ncc_window = ncc_window
        self.smooth_weight = smooth_weight
        self.int_steps = int_steps
        self.int_downsize = int_downsize
        self.unet = voxelmorph_unet(dims, in_channels=2, layout=layout)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, layout={self.layout!r}, similarity={self.similarity!r}, "
                f"smooth_weight={self.smooth_weight}, int_steps={self.int_steps}, int_downsize={self.int_downsize}")

    def _check_size(self, x: torch.Tensor) -> None:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"VoxelMorph needs spatial sizes divisible by 16, got {tuple(x.shape[2:])}")

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ddf, preint)``: the displacement and the field the smoothness acts on (the velocity for
        VoxelMorph-diff, possibly at reduced resolution; the displacement itself otherwise)."""
        check_pair(moving, fixed, self.dims)
        self._check_size(moving)
        out = self.unet(torch.cat([moving, fixed], dim=1)).float()  # fields in float32 under mixed precision
        if self.int_steps == 0:
            return out, out
        size = tuple(moving.shape[2:])
        svf = out
        if self.int_downsize > 1:
            svf = resize_field(out, tuple(s // self.int_downsize for s in size))
        ddf = integrate(svf, steps=self.int_steps)
        if self.int_downsize > 1:
            ddf = resize_field(ddf, size)
        return ddf, svf

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement ``(B, dims, *spatial)`` in voxels that warps ``moving`` onto ``fixed``."""
        return self.field(moving, fixed)[0]

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"total", "similarity", "smooth"}`` for a batch with ``moving`` and ``fixed`` (Balakrishnan 2019, eq. 5)."""
        moving, fixed = batch["moving"], batch["fixed"]
        ddf, preint = self.field(moving, fixed)
        warped = warp(moving, ddf)
        if self.similarity == "ncc":
            sim = losses.ncc_loss(warped, fixed, window=self.ncc_window)
        else:
            sim = losses.mse(warped, fixed)
        smooth = losses.gradient_smoothness(preint)
        return {"total": sim + self.smooth_weight * smooth, "similarity": sim, "smooth": smooth}

    @torch.no_grad()
    def register(self, moving: torch.Tensor, fixed: torch.Tensor, **options: Any) -> RegistrationResult:
        """One forward pass; ``extras["velocity"]`` holds the velocity field for VoxelMorph-diff."""
        if options:
            raise ValueError(f"VoxelMorph.register takes no options, got {sorted(options)}")
        ddf, preint = self.field(moving, fixed)
        extras = {"velocity": preint} if self.int_steps else {}
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras=extras)


class VoxelMorphDiff(VoxelMorph):
    """VoxelMorph-diff: the U-Net predicts a stationary velocity field integrated by scaling and squaring.

    Same arguments as :class:`VoxelMorph`; ``int_steps`` defaults to 7 and must be > 0.
    """

    def __init__(self, dims: int = 2, int_steps: int = 7, **kwargs: Any) -> None:
        if int_steps < 1:
            raise ValueError("VoxelMorphDiff needs int_steps >= 1")
        super().__init__(dims=dims, int_steps=int_steps, **kwargs)
