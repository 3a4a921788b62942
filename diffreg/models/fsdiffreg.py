"""FSDiffReg (Qin and Li, MICCAI 2023): feature-wise and score-wise diffusion guidance for registration.

Explained in chapter 05 (``notebooks/05_fsdiffreg.md``). References (sec., eq., Fig., Table) are to the MICCAI 2023
paper; "sec. 3, implementation details" names the paragraph of sec. 3 with that title.

Method, top to bottom (paper sec. 2):

1. **Input** (eq. 1, sec. 2.1): ``x_t = sqrt(abar_t) f + sqrt(1 - abar_t) eps`` is the noised *fixed* image, and the
   network input is ``x_in = {f, m, x_t}``, stacked as channels ``concat(m, f, x_t)`` (the channel order of the
   official code and of :class:`~diffreg.models.DiffuseMorph`; the order of a first-layer concatenation is
   immaterial).
2. **Shared encoder** ``E_beta`` (sec. 2.1-2.2; sec. 3, implementation details): a DDPM U-Net encoder (sinusoidal
   time embedding, one ResBlock per level with GroupNorm and SiLU, strided-convolution down-sampling, a bottleneck
   of ResBlock, self-attention, ResBlock), producing ``z`` and the skip features ``F_E``. Built from MONAI
   ``DiffusionModelUNet`` blocks (``DownBlock``, ``AttnMidBlock``, ``DiffusionUNetResnetBlock``,
   ``get_timestep_embedding``).
3. **Two decoders** of the DDPM U-Net's shape (sec. 3, implementation details): the diffusion decoder ``G_sigma``
   predicts the noise, ``S = G(z) ~ eps`` (eq. 6), and the registration decoder ``R_theta`` whose layer ``i`` sees
   the diffusion feature of the same layer (eq. 2)::

       F_R^i = r_i(concat(F_R^{i-1}, F_E^i, F_G^i)),   i = 1 ... N                                    (eq. 2)

   Layers are the decoder ResBlocks (MONAI ``DiffusionUNetResnetBlock``; ``num_res_blocks + 1`` per level, as in
   the DDPM U-Net), each decoder with its own nearest-neighbour + convolution up-samplers.
4. **Feature-wise Diffusion-Guided module** (FDG, eq. 3, sec. 2.2): per layer a linear ("efficient") cross-attention
   :class:`LinearCrossAttention` with the registration feature as query and the normalised diffusion feature as key
   and value, a residual connection to ``F_R^i`` and a convolution to a field ``phi_i`` (:class:`FeatureGuidance`)::

       phi_i = Conv(softmax(F_R^i (GroupNorm(F_G^i)^T . F_G^i)) + F_R^i)                              (eq. 3)

   Every ``phi_i`` is enlarged to full size (:func:`diffreg.spatial.resize_field`, which also rescales the
   displacement to the new voxel units) and the fields are averaged into ``phi`` (sec. 2.2). As in the official code,
   one more field comes from the last registration feature concatenated with ``S`` (``2 * 4 + 1 = 9`` fields at
   the paper configuration).
5. **Score-wise Diffusion-Guided loss** (SDG, eq. 4, sec. 2.3): local NCC weighted voxel-wise by the diffusion
   score, :func:`sdg_weight` ``= sigmoid(S)^gamma``::

       L_scoreNCC(m, f, S) = -mean( sigmoid(S)^gamma * LNCC_9(m o phi, f) )                          (eq. 4)

6. **Total loss** (eq. 5-6, sec. 2.4)::

       L_total = L_diffusion + lambda * L_scoreNCC + lambda_phi * sum ||grad phi||^2                 (eq. 5)
       L_diffusion = mean (G(E(x_in, t)) - eps)^2                                                    (eq. 6)

   with ``lambda = lambda_phi = 20`` and ``gamma = 1`` (sec. 2.4, loss function; sec. 3, implementation details).
   The smoothness term is :func:`diffreg.losses.gradient_smoothness` (the mean of squared forward differences, as
   the official ``gradientLoss("l2")``).
7. **Inference** (sec. 2.4, inference): one pass with ``x_in = {f, m, f}`` at ``t = 0``.

Schedule (sec. 3, implementation details): betas linear from 1e-6 to 1e-2 over 2000 steps (0-based timesteps, as
in :mod:`diffreg.diffusion`). Optimiser (same paragraph): Adam, lr 2e-4, batch 1, 700 epochs (betas (0.5, 0.999)
from the official code).

Ablation switches (paper Tables 2 and 3; sec. 3, ablation study and analysis of gamma):

* ``fdg=False``: "the network without FDG also uses the denoising diffusion decoder but generates the deformation
  field from the encoded feature directly" (sec. 3, ablation study). Here: ``R`` gets no diffusion features
  (``F_R^i = r_i(concat(F_R^{i-1}, F_E^i))``), there are no cross-attention fields, and ``phi`` is one convolution
  head on the last registration feature.
* ``sdg=False``: plain LNCC ("vanilla NCC loss", sec. 3, ablation study). ``gamma = 0`` gives the same loss
  (weight 1).
* ``gamma``: the exponent of eq. 4 (Table 3 sweeps 0.5, 1, 2).

Facts taken from the official code where the paper is silent (documented choices):

* Widths 8, 16, 32, 32 (``inner_channel 8``, ``channel_multiplier [1, 2, 4, 4]``), one ResBlock per encoder level,
  GroupNorm with 4 groups, attention only at the bottleneck (``attn_res [10]`` never matches a 128/64/32/16
  resolution), 4 heads in the cross-attention, which normalises query, key and value with one shared GroupNorm,
  applies no projections, takes the softmax of the key over positions, and adds a 1x1 output convolution.
* The SDG weight uses the diffusion decoder's output at the *sampled* ``t`` during training and is **not detached**
  (the registration loss also trains ``G`` through the weight); ``detach_weight=True`` stops that gradient.
* The last field is ``Conv(SiLU(GroupNorm(concat(F_R^N, S))))`` (3 groups when the channel count allows, as the
  official ``Block(9, 3, groups=3)``).

Deviations (each also in the box of chapter 05):

* Per-layer fields are enlarged with linear interpolation and their vectors rescaled to full-resolution voxels
  (:func:`~diffreg.spatial.resize_field`); the official code enlarges with nearest-neighbour interpolation without
  rescaling and follows each enlarged field with a learned 3x3 convolution (3 -> 3 channels), which we omit (the
  paper's eq. 3 has no such layer). The field convolutions start at N(0, 1e-5) weights and zero bias (VoxelMorph's
  initialisation, so training starts at the identity); the official code initialises everything orthogonally.
* MONAI's DDPM blocks: time embedding ``Linear(c, 4c) - SiLU - Linear(4c, 4c)`` (official: ``Linear(c, 4c) - Swish
  - Linear(4c, c)``), zero-initialised second convolutions in the ResBlocks and the output convolution, and softmax
  (not linear) self-attention at the bottleneck. With these the 3D paper configuration has 1,331,487 parameters
  against the official 1,320,471 (+0.8 %).
* **Local NCC at the image border** (the NCC map that SDG weights, eq. 4): :func:`diffreg.losses.ncc_map` computes
  each window's statistics over the voxels inside the image only; the official ``crossCorrelation3D`` zero-pads. The
  official images are in [-1, 1], and its loss rescales only the fixed image (``target``) to [0, 1]; the warped
  moving image stays in [-1, 1] (a one-sided shift). In the interior this changes nothing (NCC is invariant to the
  affine rescaling, up to its 1e-5 stabiliser), but in the border band (within ``window // 2`` voxels of the edge)
  the zero padding continues the fixed image at the bottom of its range and the warped image at the middle of its
  range, so those windows see a step in the warped image that the fixed image does not have. Ours gives the same
  values in the interior, and at the border is exactly invariant to affine intensity changes of either image, with
  no artificial border band for any intensity range.
* ``fdg=False`` is our reading of "without FDG" (see the ablation switches above); the SDG weight is not detached,
  as in the official code (the paper does not say; see above).
* The loss weights are read from the configuration (the official code hard-codes 20 and 20).
* ``quick`` profile (:mod:`diffreg.config`): 2D 64 x 64 phantom slices, half the paper's widths (4, 8, 16, 16),
  lr 1e-3, 300 steps; the ``paper`` profile is the paper's 3D setting.

Shapes: ``moving``, ``fixed`` ``(B, 1, *spatial)`` with ``dims`` spatial axes, every size divisible by
``2 ** (len(widths) - 1)``; fields ``(B, dims, *spatial)`` in voxels (pull convention); scores ``(B, 1, *spatial)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from diffreg import losses
from diffreg.diffusion import NoiseSchedule
from diffreg.models.base import RegistrationModel, RegistrationResult, check_pair
from diffreg.spatial import resize_field, warp

__all__ = ["FSDiffReg", "FeatureGuidance", "LinearCrossAttention", "FSDiffRegOutput", "sdg_weight", "score_energy"]


# ----------------------------------------------------------------------------------------------------------------
# Score-wise guidance (eq. 4) and the per-voxel score energy of Fig. 1
# ----------------------------------------------------------------------------------------------------------------

def sdg_weight(score: Tensor, gamma: float = 1.0) -> Tensor:
    """Eq. 4's voxel weight ``sigmoid(S)^gamma`` of the LNCC, same shape as ``score``, values in (0, 1].

    ``gamma = 0`` gives 1 everywhere (plain LNCC); a larger ``gamma`` sharpens the re-weighting (Table 3).
    Explained in chapter 05.

    Raises:
        ValueError: negative ``gamma``.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return torch.sigmoid(score.float()) ** float(gamma)


def score_energy(score: Tensor) -> Tensor:
    """Per-voxel energy of a diffusion score latent, ``sum_c S_c^2``: ``(B, C, *spatial) -> (B, 1, *spatial)``.

    The quantity of the paper's Fig. 1 (its caption: "the per voxel energy score in the diffusion model's latent"),
    which is large where the deformation is hard. Explained in chapter 05.
    """
    return (score.float() ** 2).sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# Feature-wise guidance (eq. 3)
# ----------------------------------------------------------------------------------------------------------------

class LinearCrossAttention(nn.Module):
    """Linear ("efficient", Shen et al. 2021) cross-attention of eq. 3: query ``F_R``, key = value ``F_G``.

    With ``q = GN(F_R)``, ``k = v = GN(F_G)`` (one shared GroupNorm, as the official code), split into ``heads``
    groups of ``d = C / heads`` channels and flattened over the ``n`` voxels::

        context = softmax_n(k) v^T          (d x d per head: linear in n)
        out     = Conv1x1(context^T q)

    Args:
        dims: 2 or 3.
        channels: ``C`` of both features.
        heads: attention heads (``C % heads == 0``; 4 in the official code).
        norm_groups: GroupNorm groups.

    Shapes: ``f_r``, ``f_g`` ``(B, C, *spatial)`` -> ``(B, C, *spatial)``.
    """

    def __init__(self, dims: int, channels: int, heads: int = 4, norm_groups: int = 4) -> None:
        super().__init__()
        if channels % heads or channels % norm_groups:
            raise ValueError(f"channels={channels} must be divisible by heads={heads} and norm_groups={norm_groups}")
        self.heads = heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.out = (nn.Conv2d if dims == 2 else nn.Conv3d)(channels, channels, 1)

    def forward(self, f_r: Tensor, f_g: Tensor) -> Tensor:
        B, C, *spatial = f_r.shape
        h, d = self.heads, C // self.heads
        q = self.norm(f_r).reshape(B, h, d, -1)            # (B, h, d, n)
        k = self.norm(f_g).reshape(B, h, d, -1)
        v = k
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)   # (B, h, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q)                 # (B, h, d, n)
        return self.out(out.reshape(B, C, *spatial))


class FeatureGuidance(nn.Module):
    """One layer of the FDG module (eq. 3): ``phi_i = Conv(LinearCrossAttention(F_R^i, F_G^i) + F_R^i)``.

    Args:
        dims: 2 or 3; the field has ``dims`` channels.
        channels: channels of ``F_R^i`` and ``F_G^i``.
        heads, norm_groups: of :class:`LinearCrossAttention`.

    Shapes: ``(B, C, *s), (B, C, *s) -> (B, dims, *s)``, voxels of that layer's grid (enlarge with
    :func:`~diffreg.spatial.resize_field`). Explained in chapter 05.
    """

    def __init__(self, dims: int, channels: int, heads: int = 4, norm_groups: int = 4) -> None:
        super().__init__()
        self.attention = LinearCrossAttention(dims, channels, heads, norm_groups)
        self.to_field = _field_conv(dims, channels)

    def forward(self, f_r: Tensor, f_g: Tensor) -> Tensor:
        return self.to_field(self.attention(f_r, f_g) + f_r)


def _field_conv(dims: int, channels: int) -> nn.Module:
    """3x3 convolution to a ``dims``-channel field, N(0, 1e-5) weights and zero bias (start near the identity)."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(channels, dims, 3, padding=1)
    nn.init.normal_(conv.weight, 0.0, 1e-5)
    nn.init.zeros_(conv.bias)
    return conv


# ----------------------------------------------------------------------------------------------------------------
# The DDPM U-Net pieces: shared encoder, decoders
# ----------------------------------------------------------------------------------------------------------------

class _Decoder(nn.Module):
    """A DDPM U-Net decoder: per level ``num_res_blocks + 1`` ResBlocks, each on ``concat(h, skip, *guide)``, then a
    nearest + conv up-sampler (all levels but the last). Returns the output and every ResBlock's output (the layer
    features ``F^i``, i = 1 ... N, deepest first)."""

    def __init__(self, dims: int, widths: Sequence[int], skip_channels: Sequence[int], num_res_blocks: int,
                 temb_channels: int, norm_groups: int, guided: bool) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, WrappedUpsample

        skips = list(skip_channels)
        self.resnets = nn.ModuleList()
        self.upsamplers = nn.ModuleDict()  # after the ResBlock with this index (as a string)
        ch = widths[-1]
        for level, width in enumerate(reversed(widths)):
            for _ in range(num_res_blocks + 1):
                in_ch = ch + skips.pop() + (width if guided else 0)
                self.resnets.append(DiffusionUNetResnetBlock(dims, in_ch, temb_channels, width,
                                                             norm_num_groups=norm_groups))
                ch = width
            if level < len(widths) - 1:
                post = Convolution(dims, ch, ch, strides=1, kernel_size=3, padding=1, conv_only=True)
                self.upsamplers[str(len(self.resnets) - 1)] = WrappedUpsample(
                    spatial_dims=dims, mode="nontrainable", in_channels=ch, out_channels=ch, interp_mode="nearest",
                    scale_factor=2.0, post_conv=post, align_corners=None)
        assert not skips
        self.layer_channels = [r.out_channels for r in self.resnets]

    def forward(self, h: Tensor, skips: list[Tensor], temb: Tensor,
                guide: Sequence[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        skips = list(skips)
        feats = []
        for i, resnet in enumerate(self.resnets):
            parts = [h, skips.pop()] + ([guide[i]] if guide is not None else [])
            h = resnet(torch.cat(parts, dim=1), temb)
            feats.append(h)
            if str(i) in self.upsamplers:
                h = self.upsamplers[str(i)](h)
        return h, feats


class FSDiffRegOutput(NamedTuple):
    """What one pass of :meth:`FSDiffReg.network` gives.

    Attributes:
        score: ``S = G(E(x_in, t))``, ``(B, 1, *spatial)`` (the noise estimate, eq. 6).
        ddf: ``phi``, ``(B, dims, *spatial)`` in voxels: the mean of ``fields``.
        fields: the per-layer fields enlarged to full size (FDG, deepest first, then the last head's field);
            one field when ``fdg=False``.
        level_fields: the same fields on their own layer grids (their own voxel units).
    """

    score: Tensor
    ddf: Tensor
    fields: list[Tensor]
    level_fields: list[Tensor]


class FSDiffReg(RegistrationModel):
    """FSDiffReg: a shared DDPM encoder, a diffusion decoder and a diffusion-guided registration decoder.

    Args:
        dims: 2 or 3 spatial dimensions.
        widths: channel widths of the U-Net levels (official: 8, 16, 32, 32).
        num_res_blocks: ResBlocks per encoder level (decoders have one more; official: 1).
        norm_groups: GroupNorm groups (must divide every width).
        heads: heads of the FDG cross-attention (official: 4).
        fdg: use the Feature-wise Diffusion-Guided module (eq. 2-3); ``False`` is Table 2's "w/o FDG".
        sdg: weight the LNCC by the score (eq. 4); ``False`` is Table 2's "w/o SDG".
        gamma: exponent of eq. 4 (sec. 3, implementation details: 1).
        lambda_sim: ``lambda`` of eq. 5 (sec. 2.4, loss function: 20).
        lambda_smooth: ``lambda_phi`` of eq. 5 (sec. 2.4, loss function: 20).
        ncc_window: LNCC window (9, as the official ``crossCorrelation3D``).
        detach_weight: stop the gradient of the SDG weight into the diffusion decoder (official: not detached).
        timesteps: ``T`` (sec. 3, implementation details: 2000).
        beta_start, beta_end: linear beta schedule (sec. 3, implementation details: 1e-6 to 1e-2).

    Raises:
        ValueError: bad ``dims``, widths/groups/heads, ``num_res_blocks`` or ``gamma``.
    """

    def __init__(
        self,
        dims: int = 2,
        widths: Sequence[int] = (8, 16, 32, 32),
        num_res_blocks: int = 1,
        norm_groups: int = 4,
        heads: int = 4,
        fdg: bool = True,
        sdg: bool = True,
        gamma: float = 1.0,
        lambda_sim: float = 20.0,
        lambda_smooth: float = 20.0,
        ncc_window: int = 9,
        detach_weight: bool = False,
        timesteps: int = 2000,
        beta_start: float = 1e-6,
        beta_end: float = 1e-2,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1 or any(w < 1 or w % norm_groups or (fdg and w % heads) for w in widths):
            raise ValueError(f"every width must be a positive multiple of norm_groups={norm_groups}"
                             f"{f' and heads={heads}' if fdg else ''}, got {widths}")
        if int(num_res_blocks) != num_res_blocks or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be a positive integer, got {num_res_blocks}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.dims = dims
        self.widths = widths
        self.num_res_blocks = int(num_res_blocks)
        self.norm_groups = norm_groups
        self.fdg, self.sdg, self.gamma = bool(fdg), bool(sdg), float(gamma)
        self.lambda_sim = float(lambda_sim)
        self.lambda_smooth = float(lambda_smooth)
        self.ncc_window = int(ncc_window)
        self.detach_weight = bool(detach_weight)
        self.schedule = NoiseSchedule.linear(beta_start, beta_end, timesteps)

        # Imported here: ``monai.networks.nets`` is slow to import and pulls matplotlib (see voxelmorph_unet).
        from monai.networks.blocks import Convolution
        from monai.networks.nets.diffusion_model_unet import AttnMidBlock, DownBlock

        c0, temb = widths[0], 4 * widths[0]
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        #: sinusoidal embedding of t (dimension c0) -> MLP, as MONAI's DiffusionModelUNet
        self.time_embed = nn.Sequential(nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))

        # E_beta: the shared encoder (sec. 3, implementation details: "DDPM UNet's 3D encoder as our shared encoder")
        self.conv_in = Convolution(dims, 3, c0, strides=1, kernel_size=3, padding=1, conv_only=True)
        self.down_blocks = nn.ModuleList()
        skip_channels, ch = [c0], c0
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down_blocks.append(DownBlock(dims, ch, width, temb, num_res_blocks=self.num_res_blocks,
                                              norm_num_groups=norm_groups, add_downsample=not last))
            skip_channels += [width] * (self.num_res_blocks + (0 if last else 1))
            ch = width
        # bottleneck: ResBlock, self-attention (one head of all channels), ResBlock
        self.mid_block = AttnMidBlock(dims, ch, temb, norm_num_groups=norm_groups, num_head_channels=ch)

        # G_sigma: the diffusion decoder and its output S (eq. 6)
        self.diffusion_decoder = _Decoder(dims, widths, skip_channels, self.num_res_blocks, temb, norm_groups,
                                          guided=False)
        self.score_out = nn.Sequential(nn.GroupNorm(norm_groups, c0), nn.SiLU(), conv(c0, 1, 3, padding=1))
        nn.init.zeros_(self.score_out[-1].weight)
        nn.init.zeros_(self.score_out[-1].bias)

        # R_theta: the registration decoder (eq. 2: guided by F_G^i when fdg)
        self.registration_decoder = _Decoder(dims, widths, skip_channels, self.num_res_blocks, temb, norm_groups,
                                             guided=self.fdg)
        # FDG (eq. 3): one field per registration layer; the last field from concat(F_R^N, S)
        if self.fdg:
            self.guidance = nn.ModuleList(FeatureGuidance(dims, c, heads, norm_groups)
                                          for c in self.registration_decoder.layer_channels)
        head_in = c0 + (1 if self.fdg else 0)
        self.field_head = nn.Sequential(nn.GroupNorm(math.gcd(head_in, 3), head_in), nn.SiLU(),
                                        _field_conv(dims, head_in))

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, widths={self.widths}, fdg={self.fdg}, sdg={self.sdg}, gamma={self.gamma}, "
                f"lambda_sim={self.lambda_sim}, lambda_smooth={self.lambda_smooth}, T={self.schedule.num_timesteps}")

    # ------------------------------------------------------------------------------------------------------------
    # The network (eq. 2-3, 6)
    # ------------------------------------------------------------------------------------------------------------
    def _check(self, moving: Tensor, fixed: Tensor) -> None:
        check_pair(moving, fixed, self.dims)
        k = 2 ** (len(self.widths) - 1)
        if any(s % k for s in moving.shape[2:]):
            raise ValueError(f"FSDiffReg needs spatial sizes divisible by {k}, got {tuple(moving.shape[2:])}")

    def _timesteps(self, t: Tensor | int, x: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        return t.to(x.device)

    def encode(self, x_in: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """``E_beta``: ``x_in = concat(m, f, x_t)`` ``(B, 3, *spatial)`` -> ``(z, skips F_E, time embedding)``."""
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        temb = self.time_embed(get_timestep_embedding(t, self.widths[0]).to(x_in.dtype))
        h = self.conv_in(x_in)
        skips = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=temb)
            skips.extend(res)
        return self.mid_block(hidden_states=h, temb=temb), skips, temb

    def network(self, moving: Tensor, fixed: Tensor, x_t: Tensor | None = None, t: Tensor | int = 0) -> FSDiffRegOutput:
        """One pass: ``S = G(E(x_in, t))`` (eq. 6) and ``phi`` = mean of the enlarged per-layer fields (eq. 2-3).

        Args:
            moving, fixed: ``(B, 1, *spatial)``.
            x_t: the noised fixed image (eq. 1); default ``f`` (sec. 2.4, inference).
            t: timestep(s), an int or ``LongTensor (B,)`` in ``[0, T - 1]`` (default 0).
        """
        x_t = fixed if x_t is None else x_t
        t = self._timesteps(t, moving)
        z, skips, temb = self.encode(torch.cat([moving, fixed, x_t.to(moving.dtype)], dim=1), t)
        g, feats_g = self.diffusion_decoder(z, skips, temb)
        score = self.score_out(g)
        r, feats_r = self.registration_decoder(z, skips, temb, guide=feats_g if self.fdg else None)
        size = moving.shape[2:]
        if self.fdg:
            level = [fdg(fr, fg).float() for fdg, fr, fg in zip(self.guidance, feats_r, feats_g)]
            level.append(self.field_head(torch.cat([r, score], dim=1)).float())
        else:
            level = [self.field_head(r).float()]
        fields = [resize_field(f, size) for f in level]
        ddf = torch.stack(fields).mean(dim=0)
        return FSDiffRegOutput(score=score.float(), ddf=ddf, fields=fields, level_fields=level)

    def score(self, moving: Tensor, fixed: Tensor, x_t: Tensor | None = None, t: Tensor | int = 0) -> Tensor:
        """``S = G(E(x_in, t))``, ``(B, 1, *spatial)`` (default: ``x_in = {f, m, f}``, ``t = 0``)."""
        self._check(moving, fixed)
        return self.network(moving, fixed, x_t, t).score

    # ------------------------------------------------------------------------------------------------------------
    # Training (eq. 1, 4-6)
    # ------------------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"total", "diffusion", "score_ncc", "smooth"}`` (eq. 5):
        ``total = diffusion + lambda_sim * score_ncc + lambda_smooth * smooth``.

        ``x_t = q_sample(f, t, eps)`` (eq. 1) with ``t ~ U{0, ..., T - 1}`` and ``eps ~ N(0, I)`` unless given;
        ``diffusion = mean (S - eps)^2`` (eq. 6); ``score_ncc = -mean(w * LNCC(m o phi, f))`` with
        ``w = sigmoid(S)^gamma`` when ``sdg`` (eq. 4), ``w = 1`` otherwise; ``smooth`` is
        :func:`diffreg.losses.gradient_smoothness` of ``phi``.
        """
        moving, fixed = batch["moving"], batch["fixed"]
        self._check(moving, fixed)
        B = fixed.shape[0]
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=generator,
                              device="cpu" if generator is None else generator.device).to(fixed.device)
        if noise is None:
            noise = torch.randn(fixed.shape, generator=generator, device=fixed.device, dtype=fixed.dtype)
        x_t = self.schedule.q_sample(fixed, t, noise).to(fixed.dtype)              # eq. 1
        out = self.network(moving, fixed, x_t, t)
        l_diff = torch.mean((out.score - noise.float()) ** 2)                     # eq. 6
        weight = None
        if self.sdg:                                                              # eq. 4
            s = out.score.detach() if self.detach_weight else out.score
            weight = sdg_weight(s, self.gamma)
        sim = losses.ncc_loss(warp(moving, out.ddf), fixed, window=self.ncc_window, weight=weight)
        smooth = losses.gradient_smoothness(out.ddf)
        total = l_diff + self.lambda_sim * sim + self.lambda_smooth * smooth       # eq. 5
        return {"total": total, "diffusion": l_diff, "score_ncc": sim, "smooth": smooth}

    # ------------------------------------------------------------------------------------------------------------
    # Registration (sec. 2.4, inference)
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """``phi`` with ``x_in = {f, m, f}`` at ``t = 0`` (sec. 2.4, inference), ``(B, dims, *spatial)`` in voxels."""
        self._check(moving, fixed)
        return self.network(moving, fixed).ddf

    @torch.no_grad()
    def register(self, moving: Tensor, fixed: Tensor, **options: Any) -> RegistrationResult:
        """One pass (sec. 2.4, inference). ``extras``: ``"score"`` (``S``, ``(B, 1, *spatial)``), ``"weight"`` (eq. 4's
        ``sigmoid(S)^gamma``), ``"fields"`` (the enlarged per-layer fields averaged into ``ddf``) and
        ``"level_fields"`` (the same on their layer grids)."""
        if options:
            raise ValueError(f"FSDiffReg.register takes no options, got {sorted(options)}")
        self._check(moving, fixed)
        out = self.network(moving, fixed)
        extras = {"score": out.score, "weight": sdg_weight(out.score, self.gamma), "fields": out.fields,
                  "level_fields": out.level_fields}
        return RegistrationResult(ddf=out.ddf, warped=warp(moving, out.ddf), extras=extras)
