"""LDM-Morph (Wu & Gong, 2024): registration guided by latent-diffusion features, with a latent/global cross-attention
(LGCA) and a hierarchical (pixel + latent) similarity.

Explained in chapter 07 (``notebooks/07_ldm_morph.md``). References (sec., eq., Fig., Table) are to the paper
(2024 preprint).

Method, top to bottom (paper sec. 3, Fig. 1):

1. **Stage 1: latent diffusion model (LDM-FE, sec. 3.2).** An autoencoder ``E``/``D`` maps an image to a latent four
   times smaller per axis (sec. 4.2: "a VQGAN ... a single feature map ... one-quarter of the original image's
   resolution"; 1 x 32 x 32 for 128 x 128 images), built with MONAI :class:`~monai.networks.nets.VQVAE`; ``E(I)`` is
   the encoder output *before* quantisation (what the LDM diffuses and what ``L_lat`` compares, as in the official
   code's ``get_first_stage_encoding``). A denoising U-Net ``eps_omega`` (MONAI
   :class:`~monai.networks.nets.DiffusionModelUNet`) is trained on the latents with the noise-prediction loss of
   eq. 6 over ``T = 1000`` steps (eq. 1-5; sec. 3.2). Both are then frozen (sec. 3.2).
2. **Feature extraction (sec. 3.2 and 4.2).** ``M`` and ``F`` are encoded, brought to step ``t`` by **DDIM inversion**
   (:func:`diffreg.diffusion.ddim_invert`; the official code draws ``z_t = q_sample(z_0, t)`` instead:
   ``feature_noise="q_sample"``), and the U-Net is run at ``(z_t, t)``. Each of its ``n = 4`` encoder levels has three
   layers (the level's entry: ``conv_in`` or the previous level's down-sampler, then two ResBlocks); the outputs of
   the first and the third are concatenated, for ``M`` and for ``F``: ``f_M^i (+) f_F^i`` (sec. 3.2 and 4.2).
3. **Stage 2: dual-stream encoder (sec. 3.3).**

   * lower stream, global feature extraction (sec. 3.3.1, eq. 7-8): the pair ``concat(M, F)`` is cut into
     4 x 4 patches (MONAI ``PatchEmbed``) and passed through Swin levels (MONAI ``BasicLayer`` = alternating W-MSA and
     SW-MSA blocks, eq. 7) with patch merging between levels (MONAI ``PatchMerging``);
   * upper stream: each level's latent features pass one 3 x 3 convolution + PReLU to the lower stream's width
     (sec. 3.3);
   * **LGCA** at every level (sec. 3.3.2, eq. 9-11, :class:`LGCA`): two branches of window cross-attention that
     swap queries -- the global branch attends with the latent queries (eq. 9) and the latent branch with the global
     queries (eq. 10), each followed by MLP, SW-MSA and MLP ("the last three formulas of eq. 7"), then concatenated.

4. **Decoder (sec. 3.3.3).** Five up-sampling (bicubic x 2) + 3 x 3 convolution stages (``levels + 1`` in general)
   from the deepest LGCA output to full resolution, with the LGCA outputs of each level as skip connections and a
   low-level branch (one convolution on the average-pooled pair) concatenated at half resolution; a 3 x 3 head gives
   the field.
5. **Hierarchical similarity (sec. 3.4, eq. 12-16)**, :func:`hierarchical_similarity`::

       L = beta * MSE(M o phi, F) + (1 - beta) * MSE(E(M o phi), E(F)) + lambda * L_smooth(phi)

   with ``beta = 0.6``, ``lambda = 0.01`` (sec. 4.2). Gradients of the latent term flow through the frozen encoder
   to ``phi`` (the official code detaches ``E(M o phi)``, so there its latent term trains nothing).

Ablation switches (Table 3): ``use_ldm_features=False`` (lower stream only), ``use_lgca=False`` (latent features
concatenated to the global ones without cross-attention), ``beta=1`` (no ``L_lat``).

Choices and deviations (each also in the box of chapter 07; the paper is silent unless stated):

* **Autoencoder.** MONAI's VQ-VAE (strided convolutions, residual units, EMA codebook) stands in for the VQGAN of
  Esser et al.: widths 128/256/512 with two 2x down-samplings, two residual units per level, a 1-channel latent
  (``embedding_dim = 1``) and 16,384 codes (official config ``autoencoder_camus_vq16``: ``ch 128, ch_mult 1,2,4,
  num_res_blocks 2, z_channels 1, n_embed 16384``). It has no attention and no middle block, and it is trained with
  an L1 reconstruction + commitment loss only (no LPIPS perceptual or adversarial terms: they need pretrained
  weights; the official discriminator starts after 40,001 steps).
* **Latent U-Net.** MONAI ``DiffusionModelUNet`` with widths 64/128/192/256, two ResBlocks per level, attention at
  levels 2-4 with 32-channel heads (official ``casmus-ldm-vq16-64ch``: ``model_channels 64, channel_mult 1,2,3,4,
  num_res_blocks 2, attention_resolutions 8,4,2, num_head_channels 32``; the paper, sec. 4.2: "three layers per
  encoder block with a channel size of 64"). LDM's schedule: ``beta_t`` linear in ``sqrt(beta)`` from 0.0015 to
  0.0195, ``T = 1000`` (:func:`diffreg.diffusion.ldm_schedule`).
* **Feature step.** ``t = 1`` (sec. 4.2), 0-based as in the official code (``t_enc = 1`` on a 0-based LDM). DDIM
  inversion runs ``t + 1`` unit steps by default (``invert_steps``).
* **Four** upper-stream convolutions (one per level; the text says "three groups", sec. 3.3, but ``n = 4`` levels and
  the official code has four).
* **Swin configuration** from the official code (``get_SelfAttention_config``): patch 4, embedding 64, depths
  2/2/4/2, heads 4/4/8/8, window 7, MLP ratio 4, no qkv bias, stochastic depth 0.3; one LayerNorm per output level.
* **LGCA.** One set of weights serves both branches (the paper writes one ``W-MCA`` for both lines of eq. 11; the
  official ``LWCA`` module is also shared), 4 heads at every level and a window of 7 (official
  ``get_CrossAttention_config``). The second block is SW-**MSA** (self-attention, shifted windows) as the paper
  says; the official code uses a shifted *cross*-attention there. The deepest level's output is the concatenation
  of both branches, as sec. 3.3.2 describes (the official decoder takes only one branch at the deepest level, hence
  about 1.2 M more parameters here).
* **Decoder and head** from the official code: conv 3 x 3 + InstanceNorm + LeakyReLU (two per stage), bicubic
  up-sampling (trilinear in 3D), the low-level branch on the 2x average-pooled pair with half the first width, and
  a head initialised with N(0, 1e-5) weights followed by Softsign: the official field lives in normalised
  ``[-1, 1]`` coordinates, here it is converted to voxels, ``ddf_i = softsign(h_i) (S_i - 1) / 2``.
* **Loss weighting.** Eq. 14-15 repeat ``beta`` and ``1 - beta`` inside the sums, which would square the weights;
  eq. 13 and the official code weight each term once, as here. ``L_smooth`` is
  :func:`diffreg.losses.gradient_smoothness` on the voxel field (the official ``smoothloss`` computes the same
  mean of squared differences, with ``S / 2`` instead of ``(S - 1) / 2`` as the unit conversion).
* **Checkpoint.** The paper keeps the checkpoint with the highest validation Dice (sec. 4.2); ``diffreg.train`` keeps
  the last one. Stage 1's training schedule is not in the paper: learning rates and batches from the official
  configs, step counts ours (:mod:`diffreg.config`).
* ``quick`` profile (:mod:`diffreg.config`): three levels instead of four (a 64 x 64 image has 2 x 2 tokens at a
  fourth), embedding 16, a VQ-VAE with 8 and 16 channels, a latent U-Net with 8-16 channels, stage 1 in a few
  hundred steps, and 150 registration steps at lr 1e-3 with batch 4 (the paper: lr 1e-4, batch 1).
* 3D works the same way (trilinear up-sampling; the paper is 2D).

Shapes: ``moving``, ``fixed`` ``(B, 1, *spatial)``, every size divisible by ``4 * 2**(levels - 1)`` (32 with four
levels); ``ddf`` ``(B, dims, *spatial)`` in voxels (pull convention); latents ``(B, z, *spatial / 4)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffreg import losses
from diffreg.config import MethodConfig, TrainConfig
from diffreg.diffusion import NoiseSchedule, ddim_invert, final, ldm_schedule
from diffreg.models.base import RegistrationModel, RegistrationResult, Stage, StageBudget, check_pair
from diffreg.spatial import warp

__all__ = [
    "LDMMorph", "LGCA", "window_cross_attention", "hierarchical_similarity", "STAGE1_STAGES",
]

#: the run sub-folders of stage 1 (the autoencoder, then the latent U-Net), each a run of ``diffreg.train.fit``
STAGE1_STAGES = ("autoencoder", "latent_unet")


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the latent diffusion model (sec. 3.2, eq. 1-6)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# LGCA: window cross-attention with swapped queries (sec. 3.3.2, eq. 9-11)
# ----------------------------------------------------------------------------------------------------------------


def window_cross_attention(attn: nn.Module, kv: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Window multi-head cross-attention (W-MCA, eq. 9-10): ``softmax(Q K^T / sqrt(d) + B) V`` with the *queries*
    from ``q`` and the keys and values from ``kv``.

    ``attn`` is a MONAI :class:`~monai.networks.nets.swin_unetr.WindowAttention`; its ``qkv`` projection, relative
    position bias ``B`` and output projection are used, so with ``q is kv`` this equals ``attn(kv, mask)``
    (self-attention, eq. 8). Eq. 9 is ``window_cross_attention(attn, s, g)`` (queries ``Q_g``, keys/values of
    ``s``), eq. 10 ``window_cross_attention(attn, g, s)``.

    Args:
        attn: the window attention whose weights are used.
        kv: ``(B * windows, N, C)`` tokens giving keys and values.
        q: ``(B * windows, N, C)`` tokens giving queries.
        mask: optional ``(windows, N, N)`` additive mask (shifted windows).

    Returns:
        ``(B * windows, N, C)``.

    Raises:
        ValueError: ``kv`` and ``q`` of different shapes.
    """
    if kv.shape != q.shape:
        raise ValueError(f"kv {tuple(kv.shape)} and q {tuple(q.shape)} must have the same shape")
    b, n, c = kv.shape
    h = attn.num_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    q_ = F.linear(q, w[:c], None if bias is None else bias[:c])
    kv_ = F.linear(kv, w[c:], None if bias is None else bias[c:])
    q_ = q_.reshape(b, n, h, c // h).transpose(1, 2)
    k_, v_ = kv_.reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
    rel = attn.relative_position_bias_table[attn.relative_position_index.clone()[:n, :n].reshape(-1)]
    rel = rel.reshape(n, n, -1).permute(2, 0, 1)
    logits = (q_ * attn.scale) @ k_.transpose(-2, -1) + rel.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        logits = logits.view(b // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0).to(logits.dtype)
        logits = logits.view(-1, h, n, n)
    weights = attn.attn_drop(logits.softmax(dim=-1)).to(v_.dtype)
    out = (weights @ v_).transpose(1, 2).reshape(b, n, c)
    return attn.proj_drop(attn.proj(out))


def _pad_to_windows(x: Tensor, window: Sequence[int]) -> Tensor:
    """Zero-pad a channels-last ``(B, *S, C)`` tensor at the end of each spatial axis to a multiple of ``window``."""
    pads: list[int] = [0, 0]
    for s, w in reversed(list(zip(x.shape[1:-1], window))):
        pads += [0, (w - s % w) % w]
    return F.pad(x, pads) if any(pads) else x


class LGCABranch(nn.Module):
    """One LGCA branch (eq. 11 and "the last three formulas of eq. 7", sec. 3.3.2), channels-last ``(B, *S, C)``::

        x_hat = W-MCA(LN(x), LN(y)) + x        (queries from y, keys/values from x: eq. 9 / eq. 10)
        x'    = MLP(LN(x_hat)) + x_hat
        x''   = SW-MSA(LN(x')) + x',   out = LN(MLP(LN(x'')) + x'')

    The SW-MSA + MLP part is a MONAI :class:`~monai.networks.nets.swin_unetr.SwinTransformerBlock` with shifted
    windows; the output LayerNorm follows the official code. Explained in chapter 07.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        from monai.networks.blocks import MLPBlock
        from monai.networks.layers import DropPath
        from monai.networks.nets.swin_unetr import SwinTransformerBlock, WindowAttention

        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=self.window_size, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(hidden_size=dim, mlp_dim=int(dim * mlp_ratio), act="GELU", dropout_mode="swin")
        self.sw_msa = SwinTransformerBlock(dim, num_heads=num_heads, window_size=self.window_size,
                                           shift_size=self.shift_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                           drop_path=drop_path)
        self.norm_out = nn.LayerNorm(dim)

    def cross(self, x: Tensor, y: Tensor) -> Tensor:
        """``W-MCA(LN(x), LN(y))`` on regular windows, ``(B, *S, C)`` -> ``(B, *S, C)``."""
        from monai.networks.nets.swin_unetr import get_window_size, window_partition, window_reverse

        spatial = tuple(x.shape[1:-1])
        ws = get_window_size(spatial, self.window_size)
        xn, yn = _pad_to_windows(self.norm1(x), ws), _pad_to_windows(self.norm1(y), ws)
        padded = tuple(xn.shape[1:-1])
        out = window_cross_attention(self.attn, window_partition(xn, ws), window_partition(yn, ws))
        out = window_reverse(out.view(-1, *ws, x.shape[-1]), ws, [x.shape[0], *padded])
        return out[(slice(None), *(slice(0, s) for s in spatial))]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        from monai.networks.nets.swin_unetr import compute_mask, get_window_size

        x = x + self.drop_path(self.cross(x, y))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        spatial = tuple(x.shape[1:-1])
        ws, ss = get_window_size(spatial, self.window_size, self.shift_size)
        padded = [int(math.ceil(s / w)) * w for s, w in zip(spatial, ws)]
        mask = compute_mask(padded, ws, ss, x.device)
        return self.norm_out(self.sw_msa(x, mask))


class LGCA(nn.Module):
    """Latent and global feature cross-attention (sec. 3.3.2, Fig. 3, eq. 9-11).

    ``LGCA(s, g) = concat(branch(s, g), branch(g, s))``: the global branch ``s`` (lower stream) attends with the
    latent queries ``Q_g`` over its own keys and values (eq. 9), the latent branch ``g`` (upper stream) with the
    global queries ``Q_s`` (eq. 10); both branches share one :class:`LGCABranch` (see the module docstring).
    Explained in chapter 07.

    Args:
        dim: channels of ``s`` and ``g``.
        num_heads: attention heads.
        window_size: window side(s); ``dims`` entries.
        mlp_ratio, qkv_bias, drop_path: as in Swin.

    Shapes: ``s``, ``g`` ``(B, dim, *S)`` -> ``(B, 2 dim, *S)``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.branch = LGCABranch(dim, num_heads, window_size, mlp_ratio, qkv_bias, drop_path)

    def forward(self, s: Tensor, g: Tensor) -> Tensor:
        if s.shape != g.shape:
            raise ValueError(f"s {tuple(s.shape)} and g {tuple(g.shape)} must have the same shape")
        s_cl, g_cl = s.movedim(1, -1), g.movedim(1, -1)
        s_hat = self.branch(s_cl, g_cl)  # eq. 9, first line of eq. 11
        g_hat = self.branch(g_cl, s_cl)  # eq. 10, second line of eq. 11
        return torch.cat([s_hat, g_hat], dim=-1).movedim(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Lower stream: global feature extraction (sec. 3.3.1, eq. 7-8) and the decoder (sec. 3.3.3)
# ----------------------------------------------------------------------------------------------------------------


class GlobalFeatures(nn.Module):
    """Swin encoder of the pair (eq. 7-8): 4 x 4 patch embedding, then per level a MONAI ``BasicLayer`` (W-MSA and
    SW-MSA blocks alternating) and an output LayerNorm, with ``PatchMerging`` between levels.

    Shapes: ``(B, 2, *S)`` -> list of ``(B, embed * 2^i, *S / (patch * 2^i))``, ``i = 0 ... levels - 1``.
    """

    def __init__(self, dims: int, in_channels: int, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                 window_size: int, patch_size: int, mlp_ratio: float, qkv_bias: bool, drop_path_rate: float) -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbed
        from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_channels, embed_dim=embed_dim,
                                      norm_layer=nn.LayerNorm, spatial_dims=dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            self.layers.append(BasicLayer(dim=dim, depth=depth, num_heads=heads, window_size=(window_size,) * dims,
                                          drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio=mlp_ratio,
                                          qkv_bias=qkv_bias, downsample=None))
            self.norms.append(nn.LayerNorm(dim))
            if i < len(depths) - 1:
                self.merges.append(PatchMerging(dim, spatial_dims=dims))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            cl = x.movedim(1, -1)
            outs.append(self.norms[i](cl).movedim(-1, 1))
            if i < len(self.merges):
                x = self.merges[i](cl).movedim(-1, 1)
        return outs


def _conv(dims: int, cin: int, cout: int, bias: bool = True) -> nn.Module:
    return getattr(nn, f"Conv{dims}d")(cin, cout, 3, padding=1, bias=bias)


class _ConvNormAct(nn.Sequential):
    """3 x 3 convolution (no bias) + InstanceNorm + LeakyReLU (the official ``Conv2dReLU``)."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__(_conv(dims, cin, cout, bias=False), getattr(nn, f"InstanceNorm{dims}d")(cout),
                         nn.LeakyReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Up-sample x 2 (bicubic in 2D, trilinear in 3D), concatenate the skip, two 3 x 3 conv stages (sec. 3.3.3)."""

    def __init__(self, dims: int, cin: int, cout: int, skip: int) -> None:
        super().__init__()
        self.mode = "bicubic" if dims == 2 else "trilinear"
        self.conv1 = _ConvNormAct(dims, cin + skip, cout)
        self.conv2 = _ConvNormAct(dims, cout, cout)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


# ----------------------------------------------------------------------------------------------------------------
# Hierarchical similarity (sec. 3.4, eq. 12-16)
# ----------------------------------------------------------------------------------------------------------------


def hierarchical_similarity(warped: Tensor, fixed: Tensor, encoder, beta: float,
                            fixed_latent: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Eq. 13-15: ``L_sim = beta * L_org + (1 - beta) * L_lat``.

    ``L_org = mean (M o phi - F)^2`` (pixel space, eq. 14), ``L_lat = mean (E(M o phi) - E(F))^2`` (latent space,
    eq. 15). ``encoder`` is called on ``warped`` *with* gradients (its parameters may be frozen; the gradient still
    reaches ``phi`` through the warp); ``E(F)`` is computed without gradients unless given. Explained in chapter 07.

    Args:
        warped: ``M o phi``, ``(B, 1, *S)``.
        fixed: ``F``, same shape.
        encoder: callable image -> latent (``None`` only when ``beta == 1``).
        beta: weight in ``[0, 1]`` (0.6 in the paper, sec. 4.2).
        fixed_latent: ``E(F)`` if already computed.

    Returns:
        ``(L_sim, L_org, L_lat)``; ``L_lat`` is ``None`` when ``beta == 1`` (not computed).

    Raises:
        ValueError: ``beta`` outside ``[0, 1]`` or no encoder for ``beta < 1``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    org = losses.mse(warped, fixed)
    if beta == 1.0:
        return org, org, None
    if encoder is None:
        raise ValueError("beta < 1 needs the stage-1 encoder E")
    if fixed_latent is None:
        with torch.no_grad():
            fixed_latent = encoder(fixed)
    lat = losses.mse(encoder(warped), fixed_latent)
    return beta * org + (1.0 - beta) * lat, org, lat


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_arguments(dims: int, depths: tuple[int, ...], num_heads: tuple[int, ...], use_ldm_features: bool,
                     ldm_channels: Sequence[int], beta: float, feature_noise: str, feature_t: int, timesteps: int,
                     ae_channels: tuple[int, ...], patch_size: int, embed_dim: int) -> None:
    """Raise ``ValueError`` for inconsistent :class:`LDMMorph` arguments."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if len(depths) != len(num_heads) or len(depths) < 1:
        raise ValueError(f"depths {depths} and num_heads {num_heads} need one entry per level")
    if use_ldm_features and len(ldm_channels) != len(depths):
        raise ValueError(f"the latent U-Net needs one width per level ({len(depths)}), got {tuple(ldm_channels)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if feature_noise not in ("ddim", "q_sample"):
        raise ValueError(f"feature_noise must be 'ddim' or 'q_sample', got {feature_noise!r}")
    if not 0 <= feature_t < timesteps:
        raise ValueError(f"feature_t must lie in [0, {timesteps - 1}], got {feature_t}")
    if len(ae_channels) < 2:
        raise ValueError(f"the autoencoder needs at least two levels (two 2x down-samplings), got {ae_channels}")
    if patch_size != 4:
        raise ValueError(f"patch_size must be 4, the autoencoder's down-sampling factor (sec. 4.2), "
                         f"got {patch_size}")
    if embed_dim % 2 or any((embed_dim * 2 ** i) % h for i, h in enumerate(num_heads)):
        raise ValueError(f"embed_dim {embed_dim} must be even and every level width divisible by its heads")


def _stage1_networks(dims: int, ae_channels: Sequence[int], ae_res_layers: int, ae_embeddings: int,
                     ae_embedding_dim: int, ldm_channels: Sequence[int], ldm_attention: Sequence[bool],
                     ldm_res_blocks: int, ldm_head_channels: int, ldm_norm_groups: int,
                     **schedule: Any) -> tuple[nn.Module, nn.Module]:
    """Stage 1 (sec. 3.2): MONAI's VQ-VAE (the first two levels down-sample by 2: a 4x smaller latent) and its
    ``DiffusionModelUNet`` on the latents (eq. 5-6). ``schedule`` (the noise schedule's settings) is not used."""
    from monai.networks.nets import VQVAE
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

    ae_channels = tuple(ae_channels)
    n = len(ae_channels)
    down = tuple((2, 4, 1, 1) if i < 2 else (1, 3, 1, 1) for i in range(n))
    up = tuple((2, 4, 1, 1, 0) if i >= n - 2 else (1, 3, 1, 1, 0) for i in range(n))
    autoencoder = VQVAE(spatial_dims=dims, in_channels=1, out_channels=1, channels=ae_channels,
                        num_res_layers=int(ae_res_layers), num_res_channels=ae_channels,
                        downsample_parameters=down, upsample_parameters=up,
                        num_embeddings=int(ae_embeddings), embedding_dim=int(ae_embedding_dim), ddp_sync=False)
    unet = DiffusionModelUNet(spatial_dims=dims, in_channels=int(ae_embedding_dim), out_channels=int(ae_embedding_dim),
                              channels=_tuple(ldm_channels), attention_levels=tuple(bool(a) for a in ldm_attention),
                              num_res_blocks=int(ldm_res_blocks), num_head_channels=int(ldm_head_channels),
                              norm_num_groups=int(ldm_norm_groups))
    return autoencoder, unet


def _decoder(dims: int, widths: Sequence[int], skip: Sequence[int]) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """The decoder of sec. 3.3.3: the low-level branch (one conv on the pooled pair, ``widths[0] / 2`` channels), one
    :class:`DecoderBlock` per level from the coarsest up (skip widths ``skip``) and a last one at the low-level
    width, and the field head initialised near zero (weights N(0, 1e-5), bias 0)."""
    low = widths[0] // 2
    low_level = _ConvNormAct(dims, 2, low)
    blocks = []
    cin = skip[-1]
    for i in range(len(widths) - 2, -1, -1):
        blocks.append(DecoderBlock(dims, cin, widths[i], skip[i]))
        cin = widths[i]
    blocks.append(DecoderBlock(dims, cin, low, low))
    head = _conv(dims, low, dims)
    nn.init.normal_(head.weight, 0.0, 1e-5)
    nn.init.zeros_(head.bias)
    return low_level, nn.ModuleList(blocks), head


class LDMMorph(RegistrationModel):
    """LDM-Morph: LDM features + Swin global features fused by LGCA, decoded to a displacement field.

    Stage 1 (autoencoder, then latent U-Net) is declared by :meth:`stages`: :func:`diffreg.train.fit` trains each
    before the registration network's optimiser is built, as a run of its own in the sub-folders ``autoencoder`` and
    ``latent_unet`` (checkpointed and resumed like the main loop), and freezes it; the weights stay in the
    ``state_dict``, so :func:`diffreg.train.load_run` restores the whole model. :meth:`num_parameters` counts the registration network
    (the trainable part). Explained in chapter 07.

    Args:
        dims: 2 (the paper) or 3.
        embed_dim: lower-stream width at level 1 (64, official); level ``i`` has ``embed_dim * 2^i``.
        depths: Swin blocks per level (2, 2, 4, 2).
        num_heads: heads per level (4, 4, 8, 8).
        window_size: attention window side (7).
        patch_size: patch side of the lower stream (4; must equal the autoencoder's down-sampling).
        mlp_ratio, qkv_bias, drop_path_rate: Swin MLP ratio (4), qkv bias (False), stochastic depth (0.3).
        lgca_heads: heads of every LGCA module (4).
        use_ldm_features: LDM-FE on (upper stream + LGCA); ``False``: lower stream only (Table 3, row 1).
        use_lgca: fuse by LGCA; ``False``: concatenate the two streams (Table 3, row 2).
        beta: ``beta`` of eq. 13 (0.6); 1 switches ``L_lat`` off.
        lambda_smooth: ``lambda`` of eq. 12 (0.01).
        ae_channels, ae_res_layers: VQ-VAE widths per level and residual units per level (the first two levels
            down-sample by 2).
        ae_embeddings, ae_embedding_dim: codebook size and latent channels (16384, 1).
        ldm_channels, ldm_attention, ldm_res_blocks, ldm_head_channels, ldm_norm_groups: latent U-Net widths,
            attention per level, ResBlocks per level (2: three layers per level), head channels, GroupNorm groups.
        timesteps, beta_start, beta_end: LDM schedule (:func:`diffreg.diffusion.ldm_schedule`).
        feature_t: diffusion step of the features (1).
        feature_noise: ``"ddim"`` (DDIM inversion, the paper) or ``"q_sample"`` (random forward noising, the
            official code).
        invert_steps: DDIM inversion steps (``None``: ``t + 1``, i.e. unit steps, 2 at ``t = 1``).
        ae_steps, ae_lr, ae_batch, ldm_steps, ldm_lr, ldm_batch: stage-1 training (Adam, constant rate).
        stage1_seed: seed of stage-1 training (initial data order and noise of both stage-1 runs).
        cache_features: reuse the LDM features of images seen before (keyed by their bytes). A pure speed option,
            exact with ``feature_noise="ddim"`` because stage 1 is frozen and deterministic; ignored for
            ``"q_sample"``. The cache is cleared when stage 1 is done and by :meth:`load_state_dict`.

    Raises:
        ValueError: inconsistent sizes or options.
    """

    def __init__(
        self,
        dims: int = 2,
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 2, 4, 2),
        num_heads: Sequence[int] = (4, 4, 8, 8),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path_rate: float = 0.3,
        lgca_heads: int = 4,
        use_ldm_features: bool = True,
        use_lgca: bool = True,
        beta: float = 0.6,
        lambda_smooth: float = 0.01,
        ae_channels: Sequence[int] = (128, 256, 512),
        ae_res_layers: int = 2,
        ae_embeddings: int = 16384,
        ae_embedding_dim: int = 1,
        ldm_channels: Sequence[int] = (64, 128, 192, 256),
        ldm_attention: Sequence[bool] = (False, True, True, True),
        ldm_res_blocks: int = 2,
        ldm_head_channels: int = 32,
        ldm_norm_groups: int = 32,
        timesteps: int = 1000,
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        feature_t: int = 1,
        feature_noise: str = "ddim",
        invert_steps: int | None = None,
        ae_steps: int = 50_000,
        ae_lr: float = 9e-5,
        ae_batch: int = 20,
        ldm_steps: int = 50_000,
        ldm_lr: float = 2e-5,
        ldm_batch: int = 20,
        stage1_seed: int = 0,
        cache_features: bool = False,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        ae_channels = tuple(int(c) for c in ae_channels)
        _check_arguments(dims, depths, num_heads, use_ldm_features, ldm_channels, beta, feature_noise, feature_t,
                         timesteps, ae_channels, patch_size, embed_dim)
        levels = len(depths)
        self.dims = dims
        self.levels = levels
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.size_multiple = self.patch_size * 2 ** (levels - 1)
        self.use_ldm_features = bool(use_ldm_features)
        self.use_lgca = bool(use_lgca)
        self.beta = float(beta)
        self.lambda_smooth = float(lambda_smooth)
        self.feature_t = int(feature_t)
        self.feature_noise = feature_noise
        self.invert_steps = int(invert_steps) if invert_steps is not None else None
        self.ldm_res_blocks = int(ldm_res_blocks)
        self.stage1_options = dict(ae_steps=int(ae_steps), ae_lr=float(ae_lr), ae_batch=int(ae_batch),
                                   ldm_steps=int(ldm_steps), ldm_lr=float(ldm_lr), ldm_batch=int(ldm_batch),
                                   seed=int(stage1_seed))
        #: what stage 1 is (a stage-1 run folder resumes only into the same networks and schedule)
        self.stage1_settings = dict(ae_channels=[int(c) for c in ae_channels], ae_res_layers=int(ae_res_layers),
                                    ae_embeddings=int(ae_embeddings), ae_embedding_dim=int(ae_embedding_dim),
                                    ldm_channels=[int(c) for c in ldm_channels],
                                    ldm_attention=[bool(a) for a in ldm_attention],
                                    ldm_res_blocks=int(ldm_res_blocks), ldm_head_channels=int(ldm_head_channels),
                                    ldm_norm_groups=int(ldm_norm_groups), timesteps=int(timesteps),
                                    beta_start=float(beta_start), beta_end=float(beta_end))
        self.schedule = ldm_schedule(beta_start, beta_end, timesteps)
        widths = [self.embed_dim * 2 ** i for i in range(levels)]
        self.widths = widths

        # ---- stage 1 (built only when a component needs it) ---------------------------------------------------
        self.needs_stage1 = self.use_ldm_features or self.beta < 1.0
        #: True once stage 1 is trained or loaded (a buffer, so checkpoints carry it)
        self.register_buffer("stage1_ready", torch.tensor(False))
        self.autoencoder: nn.Module | None = None
        self.unet: nn.Module | None = None
        if self.needs_stage1:
            #: E / D (sec. 3.2): VQ-VAE with a 4x smaller latent; eps_omega (eq. 5-6): denoising U-Net on latents
            self.autoencoder, self.unet = _stage1_networks(dims, **self.stage1_settings)
            for p in self._stage1_parameters():
                p.requires_grad_(False)
        self.stage1_log: dict[str, list[float]] = {}
        self.cache_features = bool(cache_features)
        self._feature_cache: dict[tuple, tuple[list[Tensor], Tensor]] = {}

        # ---- stage 2: dual-stream encoder ---------------------------------------------------------------------
        #: lower stream (sec. 3.3.1, eq. 7-8)
        self.global_features = GlobalFeatures(dims, 2, self.embed_dim, depths, num_heads, window_size, patch_size,
                                              mlp_ratio, qkv_bias, drop_path_rate)
        if self.use_ldm_features:
            lc = [int(c) for c in ldm_channels]
            per_image = [lc[0] + lc[0]] + [lc[i - 1] + lc[i] for i in range(1, levels)]
            #: upper stream: one 3x3 conv + PReLU per level to the lower stream's width (sec. 3.3)
            self.latent_convs = nn.ModuleList(
                nn.Sequential(_conv(dims, 2 * c, w), nn.PReLU()) for c, w in zip(per_image, widths))
            if self.use_lgca:
                #: LGCA per level (sec. 3.3.2)
                self.lgca = nn.ModuleList(
                    LGCA(w, lgca_heads, (window_size,) * dims, mlp_ratio, qkv_bias) for w in widths)
        skip = [2 * w if self.use_ldm_features else w for w in widths]

        # ---- decoder (sec. 3.3.3) -----------------------------------------------------------------------------
        #: low-level branch: one conv on the (2x average-pooled) pair; decoder blocks; a near-zero field head
        self.low_level, self.decoder, self.head = _decoder(dims, widths, skip)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, widths={self.widths}, use_ldm_features={self.use_ldm_features}, "
                f"use_lgca={self.use_lgca}, beta={self.beta}, lambda_smooth={self.lambda_smooth}, "
                f"feature_t={self.feature_t}, feature_noise={self.feature_noise!r}")

    # ------------------------------------------------------------------------------------------------------------
    # housekeeping
    # ------------------------------------------------------------------------------------------------------------
    def _stage1_parameters(self) -> list[nn.Parameter]:
        mods = [m for m in (self.autoencoder, self.unet) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def train(self, mode: bool = True) -> "LDMMorph":
        """Stage-1 networks stay in eval mode (frozen; no codebook updates) whatever ``mode`` is."""
        super().train(mode)
        for m in (self.autoencoder, self.unet):
            if m is not None:
                m.eval()
        return self

    def registration_parameters(self) -> int:
        """Parameters of the registration network (stage 2), the number the paper's code prints."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("autoencoder.", "unet.")))

    def stage1_parameters(self) -> dict[str, int]:
        """Parameters of the frozen stage-1 networks: ``{"autoencoder": ..., "unet": ...}``."""
        return {k: sum(p.numel() for p in m.parameters()) if m is not None else 0
                for k, m in (("autoencoder", self.autoencoder), ("unet", self.unet))}

    def _check(self, moving: Tensor, fixed: Tensor) -> None:
        check_pair(moving, fixed, self.dims)
        if any(s % self.size_multiple for s in moving.shape[2:]):
            raise ValueError(f"LDM-Morph needs spatial sizes divisible by {self.size_multiple}, "
                             f"got {tuple(moving.shape[2:])}")

    def _require_stage1(self) -> None:
        if self.needs_stage1 and not bool(self.stage1_ready):
            raise RuntimeError("stage 1 (autoencoder + latent U-Net) is not trained: train the model with "
                               "diffreg.train.fit (which trains its stages first), call diffreg.train.train_stages, "
                               "or load a trained checkpoint")

    # ------------------------------------------------------------------------------------------------------------
    # Stage 1: E, D, the LDM and its features (sec. 3.2)
    # ------------------------------------------------------------------------------------------------------------
    def encode(self, image: Tensor) -> Tensor:
        """``z = E(I)``, the pre-quantisation latent ``(B, z, *S / 4)`` (differentiable in ``image``)."""
        if self.autoencoder is None:
            raise RuntimeError("this configuration has no autoencoder (use_ldm_features=False and beta=1)")
        return self.autoencoder.encode(image)

    @torch.no_grad()
    def reconstruct(self, image: Tensor) -> Tensor:
        """``D(quantise(E(I)))``, the autoencoder's reconstruction ``(B, 1, *S)``."""
        z = self.encode(image)
        q, _ = self.autoencoder.quantize(z)
        return self.autoencoder.decode(q)

    def eps(self, z_t: Tensor, t: Tensor) -> Tensor:
        """``eps_omega(z_t, t)`` (eq. 5-6), ``t`` a ``LongTensor (B,)``."""
        return self.unet(z_t, timesteps=t)

    def diffuse(self, z0: Tensor, t: int | None = None, mode: str | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Bring clean latents to step ``t``: DDIM inversion (``mode="ddim"``, sec. 3.2) or ``q_sample`` (eq. 3, the
        official code; one noise draw shared by the whole batch element-wise as drawn)."""
        t = self.feature_t if t is None else int(t)
        mode = self.feature_noise if mode is None else mode
        if mode == "ddim":
            steps = t + 1 if self.invert_steps is None else min(self.invert_steps, t + 1)
            return final(ddim_invert(lambda x, tt: self.eps(x, tt), z0, self.schedule, steps, end_t=t))
        if mode == "q_sample":
            tb = torch.full((z0.shape[0],), t, device=z0.device, dtype=torch.long)
            noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
            return self.schedule.q_sample(z0, tb, noise).to(z0.dtype)
        raise ValueError(f"mode must be 'ddim' or 'q_sample', got {mode!r}")

    def unet_features(self, z_t: Tensor, t: int | None = None) -> list[Tensor]:
        """The U-Net's encoder features at ``(z_t, t)``: per level ``concat(first layer, third layer)`` (sec. 4.2).

        Level ``i`` has ``ldm_res_blocks + 1`` layers: its entry (``conv_in`` for ``i = 0``, else the previous
        level's down-sampler) and its ResBlocks (+ attention); with two ResBlocks the first and third are the entry
        and the last ResBlock (official indices 0/2, 3/5, 6/8, 9/11 of the LDM ``input_blocks``). Collected with
        forward hooks on MONAI's ``conv_in`` and ``down_blocks``.

        Returns:
            ``levels`` tensors ``(B, c_i, *S_latent / 2^i)``.
        """
        t = self.feature_t if t is None else int(t)
        layers: list[Tensor] = []
        hooks = [self.unet.conv_in.register_forward_hook(lambda m, i, o: layers.append(o))]
        hooks += [b.register_forward_hook(lambda m, i, o: layers.extend(o[1])) for b in self.unet.down_blocks]
        try:
            tb = torch.full((z_t.shape[0],), t, device=z_t.device, dtype=torch.long)
            self.unet(z_t, timesteps=tb)
        finally:
            for h in hooks:
                h.remove()
        per = self.ldm_res_blocks + 1
        return [torch.cat([layers[per * i], layers[per * i + per - 1]], dim=1) for i in range(self.levels)]

    def _image_features(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """``E``, DDIM inversion and U-Net features of a batch of images: (per-level features, ``z_0``)."""
        z0 = self.encode(images)
        return self.unet_features(self.diffuse(z0)), z0

    def _cached_features(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        import hashlib

        keys = [(tuple(x.shape), hashlib.sha1(x.detach().float().cpu().numpy().tobytes()).hexdigest()) for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self._feature_cache]
        if missing:
            feats, z0 = self._image_features(images[missing])
            if len(self._feature_cache) + len(missing) > 65536:
                self._feature_cache.clear()
            for j, i in enumerate(missing):
                self._feature_cache[keys[i]] = ([f[j] for f in feats], z0[j])
        entries = [self._feature_cache[k] for k in keys]
        feats = [torch.stack([e[0][lvl] for e in entries]) for lvl in range(self.levels)]
        return feats, torch.stack([e[1] for e in entries])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._feature_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def ldm_features(self, moving: Tensor, fixed: Tensor,
                     generator: torch.Generator | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """LDM-FE (sec. 3.2): ``[f_M^i (+) f_F^i]`` for every level, and the latents ``z_0^M``, ``z_0^F``.

        ``M`` and ``F`` go through ``E``, :meth:`diffuse` and :meth:`unet_features` as one batch. With
        ``feature_noise="q_sample"`` one noise draw serves ``M`` and ``F`` (as in the official code).

        Returns:
            ``(features, z_M, z_F)``: ``levels`` tensors ``(B, 2 c_i, *S_latent / 2^i)`` and two ``(B, z, *S / 4)``.
        """
        self._require_stage1()
        b = moving.shape[0]
        images = torch.cat([moving, fixed], dim=0)
        if self.feature_noise == "q_sample":
            z0 = self.encode(images)
            tb = torch.full((b,), self.feature_t, device=z0.device, dtype=torch.long)
            noise = torch.randn(z0[:b].shape, generator=generator, device=z0.device, dtype=z0.dtype)
            z_t = torch.cat([self.schedule.q_sample(z0[:b], tb, noise), self.schedule.q_sample(z0[b:], tb, noise)])
            feats = self.unet_features(z_t.to(z0.dtype))
        elif self.cache_features:
            feats, z0 = self._cached_features(images)
        else:
            feats, z0 = self._image_features(images)
        return [torch.cat([f[:b], f[b:]], dim=1) for f in feats], z0[:b], z0[b:]

    # ------------------------------------------------------------------------------------------------------------
    # Stage 2: the registration network (sec. 3.3)
    # ------------------------------------------------------------------------------------------------------------
    def field(self, moving: Tensor, fixed: Tensor, latent: Sequence[Tensor] | None = None) -> Tensor:
        """``phi = Phi_theta(M, F)``: the displacement ``(B, dims, *S)`` in voxels.

        Args:
            moving, fixed: ``(B, 1, *S)``.
            latent: the LDM features of :meth:`ldm_features` (computed here when ``None`` and LDM-FE is on).
        """
        pair = torch.cat([moving, fixed], dim=1)
        s = self.global_features(pair)  # lower stream, eq. 7
        if self.use_ldm_features:
            if latent is None:
                latent = self.ldm_features(moving, fixed)[0]
            g = [conv(f.to(pair.dtype)) for conv, f in zip(self.latent_convs, latent)]  # upper stream
            if self.use_lgca:
                skips = [lgca(si, gi) for lgca, si, gi in zip(self.lgca, s, g)]  # eq. 9-11
            else:
                skips = [torch.cat([si, gi], dim=1) for si, gi in zip(s, g)]
        else:
            skips = s
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        low = self.low_level(pool(pair, 3, stride=2, padding=1))
        x = skips[-1]
        for block, skip in zip(self.decoder, [*skips[-2::-1], low]):
            x = block(x, skip)
        x = F.interpolate(x, scale_factor=2.0, mode="bicubic" if self.dims == 2 else "trilinear",
                          align_corners=False)
        half = torch.tensor([(s - 1) / 2 for s in moving.shape[2:]], device=x.device, dtype=torch.float32)
        return F.softsign(self.head(x)).float() * half.view(1, -1, *([1] * self.dims))

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """The registration field ``(B, dims, *S)`` in voxels."""
        self._check(moving, fixed)
        self._require_stage1()
        return self.field(moving, fixed)

    @torch.no_grad()
    def register(self, moving: Tensor, fixed: Tensor, **options: Any) -> RegistrationResult:
        """One pass; ``extras``: ``features`` (the LDM features per level), ``latent_moving``, ``latent_fixed``
        (``E(M)``, ``E(F)``) when LDM-FE is on."""
        if options:
            raise ValueError(f"LDMMorph.register takes no options, got {sorted(options)}")
        self._check(moving, fixed)
        self._require_stage1()
        extras: dict[str, Any] = {}
        latent = None
        if self.use_ldm_features:
            latent, zm, zf = self.ldm_features(moving, fixed)
            extras.update(features=latent, latent_moving=zm, latent_fixed=zf)
        ddf = self.field(moving, fixed, latent)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras=extras)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"total", "sim", "org", "smooth"}`` plus ``"lat"`` when stage 1 exists (eq. 12-16):
        ``total = beta * org + (1 - beta) * lat + lambda * smooth``. With ``beta = 1`` ``lat`` is only reported
        (computed without gradients)."""
        moving, fixed = batch["moving"], batch["fixed"]
        self._check(moving, fixed)
        self._require_stage1()
        latent, zf = None, None
        if self.use_ldm_features:
            latent, _, zf = self.ldm_features(moving, fixed)
        ddf = self.field(moving, fixed, latent)
        warped = warp(moving, ddf)
        encoder = self.encode if self.autoencoder is not None else None
        sim, org, lat = hierarchical_similarity(warped, fixed, encoder, self.beta, zf)
        smooth = losses.gradient_smoothness(ddf)
        out = {"total": sim + self.lambda_smooth * smooth, "sim": sim, "org": org, "smooth": smooth}
        if lat is not None:
            out["lat"] = lat
        elif encoder is not None:
            with torch.no_grad():
                out["lat"] = losses.mse(encoder(warped), zf if zf is not None else encoder(fixed))
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Stage 1 training: two runs of the trainer before the main loop
    # ------------------------------------------------------------------------------------------------------------
    #: the stage-1 budgets in the configuration (``--stage-steps``, the benchmark's budget column)
    stage_budgets = (StageBudget("autoencoder", "ae_steps", "ae_batch"),
                     StageBudget("latent U-Net", "ldm_steps", "ldm_batch"))

    def stages(self, seed: int = 0) -> list[Stage]:
        """Stage 1 as two stages trained before the main loop (none once stage 1 is ready or not needed), both
        seeded by ``stage1_seed`` (``seed`` is not used) with Adam at a constant rate:

        1. ``autoencoder``: L1 reconstruction + VQ commitment (EMA codebook) on every moving and fixed image of the
           training pairs, ``ae_steps`` steps of ``ae_batch`` images;
        2. ``latent_unet``: eq. 6, ``E ||eps - eps_omega(z_t, t)||^2`` on the frozen latents ``E(I)`` of the same
           images, ``ldm_steps`` steps of ``ldm_batch`` latents.
        """
        if not self.needs_stage1 or bool(self.stage1_ready):
            return []
        opt = self.stage1_options

        def config(name: str, steps: int, lr: float, batch: int, settings: dict[str, Any]) -> MethodConfig:
            return MethodConfig(method="ldm-morph", profile=f"stage 1: {name}", model=settings,
                                train=TrainConfig(steps=steps, lr=lr, batch_size=batch, scheduler="constant",
                                                  seed=opt["seed"], log_every=max(1, steps // 50),
                                                  checkpoint_every=max(1, min(500, steps // 4))),
                                source="LDM-Morph stage 1 (sec. 3.2)")

        ae_settings = {k: v for k, v in self.stage1_settings.items() if k.startswith("ae")}
        return [
            Stage("autoencoder", _AutoencoderStage(self.autoencoder),
                  config("autoencoder", opt["ae_steps"], opt["ae_lr"], opt["ae_batch"], ae_settings),
                  dataset=_Images, done=self._autoencoder_done),
            Stage("latent_unet", _LatentStage(self.unet, self.schedule),
                  config("latent U-Net", opt["ldm_steps"], opt["ldm_lr"], opt["ldm_batch"], self.stage1_settings),
                  dataset=lambda pairs: _Latents(pairs, self.encode, self.device), done=self._stage1_done),
        ]

    def _autoencoder_done(self, rows: list[dict[str, Any]]) -> None:
        self.autoencoder.eval()
        self.stage1_log = {"ae_step": [r["step"] for r in rows], "ae_l1": [r["l1"] for r in rows],
                           "ae_vq": [r["vq"] for r in rows], "seconds": [rows[-1]["seconds"] if rows else 0.0]}

    def _stage1_done(self, rows: list[dict[str, Any]]) -> None:
        """Freeze stage 1 and mark it ready (the registration network can now be trained)."""
        log = self.stage1_log or {"seconds": [0.0]}
        log.update(ldm_step=[r["step"] for r in rows], ldm_mse=[r["mse"] for r in rows],
                   seconds=[log["seconds"][0] + (rows[-1]["seconds"] if rows else 0.0)])
        self.stage1_log = log
        for p in self._stage1_parameters():
            p.requires_grad_(False)
        self._feature_cache.clear()
        self.stage1_ready.fill_(True)
        self.train(self.training)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 as the trainer sees it: a module with a loss, on a dataset of images or latents
# ----------------------------------------------------------------------------------------------------------------
class _AutoencoderStage(nn.Module):
    """The VQ-VAE's training objective: L1 reconstruction + VQ commitment (the codebook is an EMA)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        recon, vq = self.autoencoder(x)
        l1 = (recon - x).abs().mean()
        return {"total": l1 + vq.mean(), "l1": l1, "vq": vq.mean()}


class _LatentStage(nn.Module):
    """Eq. 6 on clean latents ``z0``: ``mean (eps - eps_omega(z_t, t))^2`` with ``t`` uniform and ``z_t`` from
    ``q_sample``."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        z0 = batch["z0"]
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],)).to(z0.device)
        noise = torch.randn(z0.shape).to(z0.device)
        z_t = self.schedule.q_sample(z0, t, noise).to(z0.dtype)
        mse = torch.mean((self.unet(z_t, timesteps=t) - noise) ** 2)
        return {"total": mse, "mse": mse}


class _Images(torch.utils.data.Dataset):
    """Every moving and fixed image of a pair dataset, ``{"image": (1, *S)}`` (read once)."""

    def __init__(self, pairs: Any) -> None:
        images = []
        for i in range(len(pairs)):
            item = pairs[i]
            images += [item["moving"], item["fixed"]]
        self.images = torch.stack(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i]}


class _Latents(torch.utils.data.Dataset):
    """``{"z0": E(I)}`` for every image of :class:`_Images` (the frozen encoder, run once on ``device``)."""

    def __init__(self, pairs: Any, encode, device: torch.device) -> None:
        images = _Images(pairs).images
        with torch.no_grad():
            self.latents = torch.cat([encode(images[i:i + 64].to(device)).cpu() for i in range(0, len(images), 64)])

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"z0": self.latents[i]}
