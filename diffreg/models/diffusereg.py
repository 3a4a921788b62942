"""DiffuseReg (Zhuo & Shen, MICCAI 2024): a diffusion model over the deformation field itself.

Explained in chapter 06 (``notebooks/06_diffusereg.md``); how the ``quick`` profile came to predict ``phi_0``
(the variants tried and what they measured) is in ``benchmarks/diffusereg_diagnosis/README.md``. References
(sec., eq., Fig., Table) are to the MICCAI 2024 paper; "sec. 2, training objective" names the paragraph of sec. 2
with that title.

Method, top to bottom (paper sec. 2):

1. **Problem** (eq. 1; sec. 2, problem formulation): the field ``phi`` is the DDPM variable. ``phi_T ~ N(0, I)``
   and ``phi_{t-1} = D(phi_t | f, m, t)`` for ``t = T ... 1``; the denoiser ``D`` predicts the noise ``eps``. Our
   ``phi`` is the displacement ``(B, dims, *spatial)`` in voxels (pull convention, channel ``i`` along array axis
   ``i``), z-scored per channel with training-set statistics (sec. 3, implementation details) before it is
   diffused: the state of the chain is ``x = (phi - mu) / sigma``. ``mu`` and ``sigma`` are buffers
   (``field_mean``, ``field_std``), so a checkpoint carries them. The paper's VTN statistics (sec. 3,
   implementation details) are ``mu = [0.0014, -0.0758, -0.1493]``, ``sigma = [0.4636, 1.1375, 1.2221]``; ours
   are computed from our teacher on our training set (:meth:`DiffuseReg.compute_field_stats`).
2. **Targets** ``phi_0`` (sec. 3, implementation details): "Pre-trained VTN (ADDD) provided the phi_0". We use a
   trained :class:`~diffreg.models.VoxelMorph` (chapter 02) as the teacher, a stage trained before the main loop
   (:meth:`DiffuseReg.stages`: ``diffreg.train.fit`` trains it as a run of its own in ``out / "teacher"``) unless
   one was given with :meth:`DiffuseReg.set_teacher`. The teacher stays
   inside the module, frozen (``requires_grad=False``, always in eval mode), so ``diffreg.train.load_run``
   restores it; its fields are recomputed on the fly for every training batch (one VoxelMorph pass, cheap next to
   the denoiser), as the official code does with its frozen VTN.
3. **Denoiser** (Fig. 2; sec. 2, architecture for denoising network to attention mask with conditions):
   :class:`DiffuseRegDenoiser`, a Swin-UNETR (Hatamizadeh et al., built from MONAI's ``swin_unetr`` pieces) with

   * an **image encoder**: a Swin transformer applied separately to ``f`` and to ``m`` (shared weights, as the
     official code: one ``swinViT_cond`` module called twice); the tokens entering each of its S/W-MSA layers
     (after the block's LayerNorm) are recorded (sec. 2, condition fusion in denoising network: "image encoder
     outputs preceding its S/W-MSA layers are injected into the backbone encoder's corresponding S/W-MSA
     inputs");
   * a **backbone encoder** on the noisy field whose window attention fuses, per window ``i``, the concatenation
     ``[T^t, T_i^F, T_i^M, T_i^phi]`` and keeps only the field tokens (eq. 2, :class:`ConditionalWindowAttention`);
     the time token is the sinusoidal embedding of ``t`` through an MLP, projected to each stage's width;
   * the **conditional attention mask** (sec. 2, attention mask with conditions; Fig. 2d;
     :func:`conditional_attention_mask`): ``mask="paper"`` lets an image/field token attend to the tokens of
     every group at *adjacent* window positions (Chebyshev distance <= 1, "sequential adjacency") and everything
     attend to the time token ("full attention between the time token and other tokens"); ``mask="shifted"`` is
     what the official code does instead: the standard shifted-window region mask tiled over the three token
     groups (no locality inside a window); ``mask="none"`` masks nothing (not even the shifted-window regions);
   * a **CNN decoder** of residual blocks (UNETR style) into which the time embedding is added after the first
     convolution of every ResBlock ("time-infused ResBlocks", Table 2 "RT"; sec. 3, ablation study on denoising
     network; switch off with ``time_in_resblocks=False``).

4. **Loss** (eq. 3-4; sec. 2, training objective and consistency regularization)::

       L = L_diffuse + lambda_1 L_sim(f, m o phi0_hat) + lambda_2 L_reg(phi0_hat)
       L_diffuse = mean (D(c, phi_t, t) - eps)^2                         (eq. 4)
       phi0_hat  = (phi_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)      (eq. 3, then de-normalised)
       L_sim     = 1 - SSIM_9(m o phi0_hat, f)      (sec. 3, implementation details: "SSIM with kernel size 9")
       L_reg     = mean ||grad phi0_hat||^2        (diffreg.losses.gradient_smoothness, as the official Grad('l2'))

   with ``lambda_1 = 1``, ``lambda_2 = 0.1`` (sec. 3, implementation details). The paper writes "alpha_t" in
   eq. 3 for DDPM's ``abar_t``. ``use_teacher=False`` is the ablation of Table 2 row 6 (sec. 3, ablation study on
   phi_0): no ``phi_0`` and no denoising loss, the network is trained by ``L_sim + L_reg`` on ``phi0_hat`` alone
   (the chain starts from ``x_0 ~ N(0, I)``).
5. **Sampling** (sec. 2, consistency regularization; sec. 3, results): ancestral DDPM over all ``T`` steps (the
   paper, 333 s per volume, Table 1) or DDIM with any number of steps (the paper mentions DDIM, 6.5 -> 0.5 min;
   the official code has none) via :func:`diffreg.diffusion.ddpm_sample` / :func:`~diffreg.diffusion.ddim_sample`.
   :meth:`DiffuseReg.sample` yields a :class:`FieldState` (``t``, ``phi_t``, ``phi0_hat``, warped image, ...) at
   every step, can stop early (``stop_at``: a timestep or a callable; sec. 3, results: "the inference process can
   be manually stopped") and can be **guided** (sec. 3, results: "adding prior information to guide the sampling
   process via a classifier-guided diffusion scheme, such as control the smoothness ... and the target organ";
   described, never released): at every step the estimate ``phi0_hat`` takes one gradient step on the energies of
   the given guidance callables (:func:`smoothness_guidance`, :func:`region_guidance`) before the sampler update
   uses it.

Schedule (sec. 3, implementation details): betas linear from 1e-6 to 1e-2 over ``T_train = 2000``; 0-based
timesteps as everywhere in :mod:`diffreg.diffusion`. Optimiser (same paragraph): AdamW, weight decay 1e-4, cosine
learning rate from 1e-4, batch 1, 1200 epochs (see :mod:`diffreg.config`).

Facts taken from the official code (the paper is silent): feature size 120, depths (2, 2, 2, 2), heads
(3, 6, 12, 24), window (2, 4, 4), patch size 2 (Swin-UNETR defaults otherwise); the image encoder shares its
weights between ``f`` and ``m``; the backbone's first convolution block sees only the noisy field (the images enter
through the attention only); the time embedding is added after the first conv/norm/activation of each ResBlock;
the relative position bias of a window is tiled over the three token groups; images are z-scored (jointly, ``m`` and
``f``) before the network; the decoder uses instance normalisation.

Deviations and choices (each also in the box of chapter 06):

* Teacher: a VoxelMorph (VM-2) trained by :meth:`prepare` instead of the paper's pre-trained VTN (ADDD).
* Only the field tokens' queries are computed in the fused attention: the other groups' outputs are discarded by
  eq. 2 anyway, so the result is identical and the cost drops to ``N x (3N + 1)`` per window.
* Masked attention weights are exactly zero (``-inf`` before the softmax; the time token is never masked, so no row
  is empty); MONAI's shifted-window mask uses ``-100``.
* The official code z-scores the image pair with one mean/std over the whole batch; we do it per pair, so a
  registration does not depend on the other pairs of its batch.
* ``mask="paper"`` is our reading of sec. 2, attention mask with conditions, and Fig. 2d (locality by relative
  position, time token unmasked); the official code uses ``mask="shifted"``. In the Table 2 ablation (chapter 06),
  row 3 "no conditional mask" is trained with ``mask="none"``; one extra row, not in the paper, trains row 2 with
  the official ``mask="shifted"``.
* **SSIM term** (``L_sim``, :func:`diffreg.losses.ssim_loss`: MONAI ``compute_ssim_and_cs``, Gaussian window 9,
  sigma 1.5): the constants use the fixed image's intensity range as ``data_range`` and the windows are not padded
  (the mean runs over the valid windows); the official ``SSIM3D(kernel_size=9)`` uses ``max_val = 1`` and reflect
  padding.
* The official denoiser cannot be built by its own model builder and has no DDIM; ours runs at every profile, batch
  size > 1, in 2D and 3D (2D windows default to 4 x 4). Spatial sizes must be divisible by 32 (patch 2 and four
  merges, as Swin-UNETR).
* ``parameterization="x0"`` with ``diffusion_weighting="x0"`` (``quick`` profile only): the network outputs the
  field estimate ``phi0_hat`` itself and ``eps_hat = (phi_t - sqrt(abar_t) phi0_hat) / sqrt(1 - abar_t)``; eq. 3
  then returns the network's output, and eq. 4 is weighted by ``(1 - abar_t) / abar_t``, i.e. the loss is the mean
  squared error of ``phi0_hat`` against the teacher field. Why: chapter 06 ("Why the samples fold") and
  ``benchmarks/diffusereg_diagnosis/README.md``. The ``paper`` profile keeps eq. 3-4 as written (``"eps"``,
  ``"none"``); ``parameterization="v"`` (with ``diffusion_weighting="v"``) and ``consistency_weighting="abar"``
  (the consistency terms weighted by ``abar_t``) are available but not used by either profile.
* ``quick`` also uses ``T = 200`` steps (betas 1e-5 ... 0.1, the paper's end-point noise level
  ``abar_T ~ e^-10``), a denoiser of feature size 8 (0.80 M parameters in 2D, 1.85 M in 3D, instead of the
  ``paper`` profile's 411 M in 3D; ``build(...).num_parameters()``), 1000 training steps at lr 2e-3 and a teacher
  VoxelMorph of 1000 steps in 2D (:mod:`diffreg.config`).
* Guidance (never released): one explicit gradient step on ``phi0_hat`` (in voxels) per sampling step, the noise
  estimate re-derived from the guided ``phi0_hat`` (like ``clip_x0`` in :mod:`diffreg.diffusion`); the paper
  names a "classifier-guided diffusion scheme" without details.

Shapes: ``moving``, ``fixed`` ``(B, 1, *spatial)``; fields ``(B, dims, *spatial)`` in voxels; timesteps
``LongTensor (B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffreg import losses
from diffreg.config import MethodConfig, TrainConfig
from diffreg.diffusion import NoiseSchedule, ddim_sample, ddpm_sample
from diffreg.models.base import RegistrationModel, RegistrationResult, Stage, StageBudget, check_pair
from diffreg.spatial import warp

__all__ = [
    "DiffuseReg", "DiffuseRegDenoiser", "ConditionalWindowAttention", "FusionSwinBlock", "ImageEncoder",
    "TimeResBlock", "conditional_attention_mask", "FieldState", "Guidance", "bending_energy", "smoothness_guidance",
    "region_guidance", "MASKS",
]

#: the conditional attention masks (see :func:`conditional_attention_mask`)
MASKS = ("paper", "shifted", "none")

#: a guidance energy: ``energy(phi0_hat, t) -> (B,)`` with ``phi0_hat`` in voxels; lower is better
Guidance = Callable[[Tensor, int], Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Eq. 2 and Fig. 2(d): fused window attention with the conditional mask
# ----------------------------------------------------------------------------------------------------------------

def _window_coords(window: Sequence[int]) -> Tensor:
    """``(N, ndim)`` integer positions of the tokens of one window, in ``window_partition`` order (row-major)."""
    grids = torch.meshgrid(*[torch.arange(int(w)) for w in window], indexing="ij")
    return torch.stack(grids).flatten(1).T


def conditional_attention_mask(window: Sequence[int], mode: str = "paper", region: Tensor | None = None) -> Tensor:
    """The conditional attention mask of DiffuseReg (Fig. 2d; sec. 2, attention mask with conditions): ``True``
    where attention is allowed.

    Token order in a window (eq. 2): ``[T^t, T^F_1..N, T^M_1..N, T^phi_1..N]`` (``N = prod(window)``), so the mask is
    ``(nW, 3N + 1, 3N + 1)`` (query rows, key columns).

    * ``"paper"``: the time token attends to and is attended by everything; an image/field token at window position
      ``p`` attends to the tokens of all three groups at positions ``q`` with ``max_k |p_k - q_k| <= 1`` (adjacent
      patches, "derived from the relative positional encoding", sec. 2, attention mask with conditions), and, in a
      shifted window, only within its own region.
    * ``"shifted"`` (official code): the standard Swin shifted-window region mask tiled 3 x 3 over the groups (every
      pair allowed in a regular window); the time token is unmasked.
    * ``"none"``: everything allowed.

    Args:
        window: window size (2 or 3 entries).
        mode: ``"paper"``, ``"shifted"`` or ``"none"``.
        region: ``(nW, N, N)`` additive Swin region mask (MONAI ``compute_mask``: 0 where two tokens share a region)
            for a shifted window, or ``None`` for a regular one (``nW = 1``).

    Returns:
        Bool tensor ``(nW, 3N + 1, 3N + 1)`` on ``region``'s device (CPU if ``None``).

    Raises:
        ValueError: unknown ``mode`` or a ``region`` of the wrong size.
    """
    if mode not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mode!r}")
    n = math.prod(int(w) for w in window)
    device = region.device if region is not None else torch.device("cpu")
    if region is not None and (region.ndim != 3 or region.shape[1:] != (n, n)):
        raise ValueError(f"region must be (nW, {n}, {n}), got {tuple(region.shape)}")
    coords = _window_coords(window).to(device)
    if mode == "paper":
        local = (coords[:, None, :] - coords[None, :, :]).abs().amax(-1) <= 1
    else:
        local = torch.ones(n, n, dtype=torch.bool, device=device)
    base = local[None]
    if region is not None and mode != "none":
        base = base & (region == 0)
    nw = base.shape[0]
    full = torch.ones(nw, 3 * n + 1, 3 * n + 1, dtype=torch.bool, device=device)
    full[:, 1:, 1:] = base.repeat(1, 3, 3)
    return full


class ConditionalWindowAttention(nn.Module):
    """Masked multi-head attention over ``[time, fixed, moving, field]`` tokens keeping the field tokens (eq. 2).

    Wraps MONAI's Swin ``WindowAttention`` (its ``qkv``, ``proj`` and relative position bias); the bias of the
    ``N x N`` window is tiled over the three token groups (official code) and is zero for the time token.

    Args:
        dim: token width ``C``.
        num_heads: attention heads (divide ``dim``).
        window: window size.
        qkv_bias: learnable bias of ``qkv``.
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], qkv_bias: bool = True) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import WindowAttention

        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.window = tuple(int(w) for w in window)
        self.num_heads = num_heads
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=self.window, qkv_bias=qkv_bias)

    def _bias(self, n: int) -> Tensor:
        """Relative position bias ``(heads, n, 3n + 1)`` for the field queries (``n`` tokens per window)."""
        a = self.attn
        rpb = a.relative_position_bias_table[a.relative_position_index[:n, :n].reshape(-1)].reshape(n, n, -1)
        rpb = rpb.permute(2, 0, 1)
        return torch.cat([rpb.new_zeros(rpb.shape[0], n, 1), rpb.repeat(1, 1, 3)], dim=-1)

    def forward(self, field: Tensor, cond: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Eq. 2 for a batch of windows.

        Args:
            field: ``(B * nW, N, C)`` field tokens ``T^phi``.
            cond: ``(B * nW, 2N + 1, C)``: ``[T^t, T^F, T^M]``.
            mask: additive ``(nW, N, 3N + 1)`` mask for the field queries (0 allowed, ``-inf`` masked) or ``None``.
            return_weights: also return the attention weights.

        Returns:
            ``T^phi'`` ``(B * nW, N, C)`` (and the weights ``(B * nW, heads, N, 3N + 1)``).
        """
        b, n, c = field.shape
        if cond.shape != (b, 2 * n + 1, c):
            raise ValueError(f"cond must be (B*nW, 2N+1, C) = {(b, 2 * n + 1, c)}, got {tuple(cond.shape)}")
        a = self.attn
        h = self.num_heads
        tokens = torch.cat([cond, field], dim=1)  # [T^t, T^F, T^M, T^phi]
        w, bias = a.qkv.weight, a.qkv.bias
        q = F.linear(field, w[:c], None if bias is None else bias[:c])  # queries of the kept tokens only
        kv = F.linear(tokens, w[c:], None if bias is None else bias[c:])
        q = q.reshape(b, n, h, c // h).transpose(1, 2) * a.scale
        k, v = kv.reshape(b, 3 * n + 1, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1) + self._bias(n).unsqueeze(0).to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, h, n, 3 * n + 1) + mask[None, :, None].to(attn.dtype)
            attn = attn.view(b, h, n, 3 * n + 1)
        weights = attn.softmax(dim=-1)
        out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c)
        out = a.proj(out)
        return (out, weights) if return_weights else out


def _additive(allowed: Tensor) -> Tensor:
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))


class FusionSwinBlock(nn.Module):
    """A backbone Swin block whose (S)W-MSA is :class:`ConditionalWindowAttention` (Fig. 2b).

    ``x -> x + Attn(LN(x) | LN_img(f), LN_img(m), time) -> x + MLP(LN(x))``, with regular (``shift = 0``) or
    shifted windows; the image tokens come from the image encoder's block at the same position.

    Args:
        dim, num_heads, window: as Swin.
        shift: window shift (0 or ``window // 2`` per axis).
        mask: ``"paper"``, ``"shifted"`` or ``"none"`` (:func:`conditional_attention_mask`).
        mlp_ratio: MLP hidden width / ``dim`` (4).
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], shift: Sequence[int], mask: str = "paper",
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        from monai.networks.blocks import MLPBlock

        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.window = tuple(int(w) for w in window)
        self.shift = tuple(int(s) for s in shift)
        self.mask = mask
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConditionalWindowAttention(dim, num_heads, self.window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(hidden_size=dim, mlp_dim=int(dim * mlp_ratio), act="GELU", dropout_mode="swin")
        self._mask_cache: dict[Any, Tensor] = {}

    def geometry(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Window and shift used on a token map of size ``spatial`` (MONAI ``get_window_size``: a window never
        exceeds the map, and a window covering the map is not shifted)."""
        from monai.networks.nets.swin_unetr import get_window_size

        return get_window_size(tuple(spatial), self.window, self.shift)

    def attention_mask(self, spatial: Sequence[int], device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
        """The boolean mask ``(nW, 3N + 1, 3N + 1)`` (:func:`conditional_attention_mask`) for a map of size
        ``spatial``, and the window used."""
        from monai.networks.nets.swin_unetr import compute_mask

        window, shift = self.geometry(spatial)
        key = (tuple(spatial), str(device))
        if key not in self._mask_cache:
            region = compute_mask(list(spatial), window, shift, device) if any(shift) else None
            self._mask_cache = {key: conditional_attention_mask(window, self.mask, region)}
        return self._mask_cache[key], window

    def forward(self, x: Tensor, cond_f: Tensor, cond_m: Tensor, time: Tensor) -> Tensor:
        """``x``, ``cond_f``, ``cond_m``: ``(B, *spatial, C)`` (channels last); ``time``: ``(B, C)``."""
        from monai.networks.nets.swin_unetr import window_partition, window_reverse

        spatial = tuple(x.shape[1:-1])
        b, c = x.shape[0], x.shape[-1]
        allowed, window = self.attention_mask(spatial, x.device)
        _, shift = self.geometry(spatial)
        if any(s % w for s, w in zip(spatial, window)):
            raise ValueError(f"token map {spatial} is not divisible by the window {window}")
        axes = tuple(range(1, 1 + len(spatial)))
        h = self.norm1(x)
        maps = [cond_f, cond_m, h]
        if any(shift):
            maps = [torch.roll(m, shifts=tuple(-s for s in shift), dims=axes) for m in maps]
        wf, wm, wx = (window_partition(m, window) for m in maps)
        n = wx.shape[1]
        nw = wx.shape[0] // b
        t_tok = time[:, None, None, :].expand(b, nw, 1, c).reshape(b * nw, 1, c)
        mask = None if self.mask == "none" else _additive(allowed[:, -n:, :])
        out = self.attn(wx, torch.cat([t_tok, wf, wm], dim=1), mask)
        out = window_reverse(out.view(-1, *window, c), window, [b, *spatial])
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=axes)
        x = x + out
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------------------------
# The image encoder (Fig. 2a, left) and the time-infused ResBlocks (Table 2 "RT")
# ----------------------------------------------------------------------------------------------------------------

def _channels_last(x: Tensor) -> Tensor:
    return x.movedim(1, -1).contiguous()


def _channels_first(x: Tensor) -> Tensor:
    return x.movedim(-1, 1).contiguous()


def _shifts(window: Sequence[int], depth: int) -> list[tuple[int, ...]]:
    """Swin alternation: regular windows in even blocks, shifted by ``window // 2`` in odd blocks."""
    return [tuple(0 for _ in window) if j % 2 == 0 else tuple(w // 2 for w in window) for j in range(depth)]


class ImageEncoder(nn.Module):
    """Swin transformer encoder of one image that records the tokens entering each (S)W-MSA layer.

    MONAI pieces: ``PatchEmbed`` (patch 2), ``SwinTransformerBlock`` and ``PatchMerging``. Called once for ``f`` and
    once for ``m`` (shared weights, official code). Its records are ``LN(x)`` of every block (the block's own
    ``norm1``): a list per stage of a list per block of ``(B, *spatial_i, C_i)`` maps.
    """

    def __init__(self, dims: int, feature_size: int, depths: Sequence[int], num_heads: Sequence[int],
                 window: Sequence[int], in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbed
        from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformerBlock

        self.window = tuple(window)
        self.patch_embed = PatchEmbed(patch_size=2, in_chans=in_channels, embed_dim=feature_size, norm_layer=None,
                                      spatial_dims=dims)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = feature_size * 2 ** i
            blocks: list[nn.Module] = [SwinTransformerBlock(dim, heads, self.window, shift, mlp_ratio=4.0, qkv_bias=True)
                                       for shift in _shifts(self.window, depth)]
            if i == len(depths) - 1:
                # only the LayerNorm of the very last block feeds the backbone; the rest of that block (and a last
                # merge) would be dead weights, which the official model carries (and DDP would reject)
                blocks[-1] = blocks[-1].norm1
            self.stages.append(nn.ModuleList(blocks))
            if i < len(depths) - 1:
                self.merges.append(PatchMerging(dim=dim, spatial_dims=dims))

    def forward(self, image: Tensor) -> list[list[Tensor]]:
        from monai.networks.nets.swin_unetr import compute_mask, get_window_size

        x = _channels_last(self.patch_embed(image))
        records: list[list[Tensor]] = []
        for i, blocks in enumerate(self.stages):
            spatial = tuple(x.shape[1:-1])
            rec = []
            for blk in blocks:
                if isinstance(blk, nn.LayerNorm):  # the last block: its input tokens are all the backbone needs
                    rec.append(blk(x))
                    continue
                window, shift = get_window_size(spatial, self.window, blk.shift_size)
                mask = compute_mask(list(spatial), window, shift, x.device) if any(shift) else None
                rec.append(blk.norm1(x))
                x = blk(x, mask)
            records.append(rec)
            if i < len(self.merges):
                x = self.merges[i](x)
        return records


class TimeResBlock(nn.Module):
    """MONAI's ``UnetResBlock`` (conv-norm-LeakyReLU-conv-norm + residual) with the time embedding added after the
    first activation (official code: ``out = act(norm1(conv1(x))) + Linear(SiLU(temb))``; Table 2 "RT").

    Args:
        dims, in_channels, out_channels: as MONAI.
        time_dim: width of the time embedding, or ``None`` for no time (the "RT" ablation).
        norm_name: MONAI norm name (``"instance"``, Swin-UNETR's default).
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, time_dim: int | None,
                 norm_name: str | tuple = "instance") -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetResBlock

        self.block = UnetResBlock(dims, in_channels, out_channels, kernel_size=3, stride=1, norm_name=norm_name)
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels)) if time_dim else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        blk = self.block
        out = blk.lrelu(blk.norm1(blk.conv1(x)))
        if self.time_mlp is not None and temb is not None:
            out = out + self.time_mlp(temb).view(*temb.shape[:1], -1, *([1] * (x.ndim - 2)))
        out = blk.norm2(blk.conv2(out))
        res = x
        if hasattr(blk, "conv3"):
            res = blk.norm3(blk.conv3(res))
        return blk.lrelu(out + res)


class _UpBlock(nn.Module):
    """UNETR up block: transposed conv (x2) then :class:`TimeResBlock` on ``[up, skip]``."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, time_dim: int | None, norm_name) -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import get_conv_layer

        self.up = get_conv_layer(dims, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True,
                                 is_transposed=True)
        self.res = TimeResBlock(dims, 2 * out_channels, out_channels, time_dim, norm_name)

    def forward(self, x: Tensor, skip: Tensor, temb: Tensor | None) -> Tensor:
        return self.res(torch.cat([self.up(x), skip], dim=1), temb)


# ----------------------------------------------------------------------------------------------------------------
# The denoiser D(phi_t | f, m, t) (Fig. 2a)
# ----------------------------------------------------------------------------------------------------------------

class DiffuseRegDenoiser(nn.Module):
    """``D(phi_t | f, m, t) -> eps_hat``: the conditional Swin-UNETR of DiffuseReg (Fig. 2, sec. 2).

    Layout (Swin-UNETR, feature size ``F``): image encoder and backbone encoder with four Swin stages of widths
    ``F, 2F, 4F, 8F`` (patch 2, merges in between; the backbone merges once more to ``16F``); decoder of
    :class:`TimeResBlock` s: ``enc0`` on the field, ``enc1..3`` on the backbone's hidden states, a ``16F``
    bottleneck block and five up blocks to full resolution, then a 1x1 convolution to ``dims`` channels.

    Args:
        dims: 2 or 3.
        feature_size: ``F`` (paper/official: 120).
        depths: Swin blocks per stage (official: 2, 2, 2, 2).
        num_heads: heads per stage (official: 3, 6, 12, 24).
        window: window size (official 3D: 2, 4, 4; 2D default 4, 4).
        mask: conditional attention mask, ``"paper"``, ``"shifted"`` or ``"none"``.
        time_in_resblocks: add the time embedding in every decoder ResBlock (Table 2 "RT").
        norm_name: decoder normalisation (``"instance"``).

    Shapes: ``phi_t`` ``(B, dims, *spatial)``, images ``(B, 1, *spatial)``, every spatial size divisible by 32.
    """

    def __init__(self, dims: int = 2, feature_size: int = 12, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window: Sequence[int] | None = None, mask: str = "paper",
                 time_in_resblocks: bool = True, norm_name: str | tuple = "instance") -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbed, UnetOutBlock
        from monai.networks.nets.swin_unetr import PatchMerging

        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 stages (Swin-UNETR), got {depths}, {num_heads}")
        for i, h in enumerate(num_heads):
            if (feature_size * 2 ** i) % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage width {feature_size * 2 ** i}")
        window = tuple(int(w) for w in (window or ((4, 4) if dims == 2 else (2, 4, 4))))
        if len(window) != dims:
            raise ValueError(f"window needs {dims} entries, got {window}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.dims, self.feature_size, self.depths, self.num_heads = dims, feature_size, depths, num_heads
        self.window, self.mask, self.time_in_resblocks = window, mask, bool(time_in_resblocks)
        fs = feature_size

        # time: sinusoidal embedding -> MLP (the time token), then one projection per stage (official code)
        self.time_embed = nn.Sequential(nn.Linear(fs, 4 * fs), nn.SiLU(), nn.Linear(4 * fs, fs))
        self.time_stage = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(fs, fs * 2 ** i)) for i in range(4)])

        #: the image encoder, applied to f and to m separately (shared weights)
        self.image_encoder = ImageEncoder(dims, fs, depths, num_heads, window)
        # the backbone encoder over the noisy field
        self.patch_embed = PatchEmbed(patch_size=2, in_chans=dims, embed_dim=fs, norm_layer=None, spatial_dims=dims)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = fs * 2 ** i
            self.stages.append(nn.ModuleList([FusionSwinBlock(dim, heads, window, shift, mask)
                                              for shift in _shifts(window, depth)]))
            self.merges.append(PatchMerging(dim=dim, spatial_dims=dims))

        # decoder (Swin-UNETR's encoder1..4, encoder10, decoder5..1, out), with time in every ResBlock
        td = fs if time_in_resblocks else None
        self.enc0 = TimeResBlock(dims, dims, fs, td, norm_name)
        self.enc1 = TimeResBlock(dims, fs, fs, td, norm_name)
        self.enc2 = TimeResBlock(dims, 2 * fs, 2 * fs, td, norm_name)
        self.enc3 = TimeResBlock(dims, 4 * fs, 4 * fs, td, norm_name)
        self.bottleneck = TimeResBlock(dims, 16 * fs, 16 * fs, td, norm_name)
        self.dec4 = _UpBlock(dims, 16 * fs, 8 * fs, td, norm_name)
        self.dec3 = _UpBlock(dims, 8 * fs, 4 * fs, td, norm_name)
        self.dec2 = _UpBlock(dims, 4 * fs, 2 * fs, td, norm_name)
        self.dec1 = _UpBlock(dims, 2 * fs, fs, td, norm_name)
        self.dec0 = _UpBlock(dims, fs, fs, td, norm_name)
        self.out = UnetOutBlock(dims, fs, dims)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, feature_size={self.feature_size}, depths={self.depths}, "
                f"num_heads={self.num_heads}, window={self.window}, mask={self.mask!r}, "
                f"time_in_resblocks={self.time_in_resblocks}")

    @staticmethod
    def normalize_images(moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """Z-score the pair jointly, per pair (official code: over the batch)."""
        both = torch.cat([moving, fixed], dim=1).flatten(1)
        mean = both.mean(1).view(-1, *([1] * (moving.ndim - 1)))
        std = both.std(1).clamp_min(1e-6).view(-1, *([1] * (moving.ndim - 1)))
        return (moving - mean) / std, (fixed - mean) / std

    def encode(self, moving: Tensor, fixed: Tensor) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """The image encoder's records for ``f`` and ``m`` (independent of ``t`` and ``phi_t``: a sampler computes
        them once per registration)."""
        m, f = self.normalize_images(moving, fixed)
        both = self.image_encoder(torch.cat([f, m], dim=0))  # one pass for the two images
        b = moving.shape[0]
        rec_f = [[r[:b] for r in stage] for stage in both]
        rec_m = [[r[b:] for r in stage] for stage in both]
        return rec_f, rec_m

    def time_embedding(self, t: Tensor) -> Tensor:
        """The time token ``(B, F)`` from integer timesteps ``(B,)``."""
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        return self.time_embed(get_timestep_embedding(t, self.feature_size))

    def forward(self, phi_t: Tensor, t: Tensor, moving: Tensor | None = None, fixed: Tensor | None = None,
                cond: tuple[list[list[Tensor]], list[list[Tensor]]] | None = None) -> Tensor:
        """``eps_hat`` ``(B, dims, *spatial)`` for the (normalised) noisy field ``phi_t``.

        Give the images, or ``cond = self.encode(moving, fixed)`` computed once.
        """
        if cond is None:
            if moving is None or fixed is None:
                raise ValueError("give moving and fixed, or cond=encode(moving, fixed)")
            cond = self.encode(moving, fixed)
        rec_f, rec_m = cond
        if any(s % 32 for s in phi_t.shape[2:]):
            raise ValueError(f"DiffuseReg needs spatial sizes divisible by 32, got {tuple(phi_t.shape[2:])}")
        temb = self.time_embedding(t.to(phi_t.device).long())
        rt = temb if self.time_in_resblocks else None

        x = _channels_last(self.patch_embed(phi_t))
        hidden = [x]
        for i, blocks in enumerate(self.stages):
            tok = self.time_stage[i](temb)
            for j, blk in enumerate(blocks):
                x = blk(x, rec_f[i][j], rec_m[i][j], tok)
            x = self.merges[i](x)
            hidden.append(x)
        # Swin-UNETR's "normalize" of the hidden states: a LayerNorm without parameters, channels first
        h = [_channels_first(F.layer_norm(s, s.shape[-1:])) for s in hidden]

        e0 = self.enc0(phi_t, rt)
        e1 = self.enc1(h[0], rt)
        e2 = self.enc2(h[1], rt)
        e3 = self.enc3(h[2], rt)
        d4 = self.bottleneck(h[4], rt)
        d3 = self.dec4(d4, h[3], rt)
        d2 = self.dec3(d3, e3, rt)
        d1 = self.dec2(d2, e2, rt)
        d0 = self.dec1(d1, e1, rt)
        return self.out(self.dec0(d0, e0, rt))


# ----------------------------------------------------------------------------------------------------------------
# Guidance energies (sec. 3, results: "control the smoothness ... and the target organ")
# ----------------------------------------------------------------------------------------------------------------

def bending_energy(ddf: Tensor) -> Tensor:
    """Discrete bending energy per batch item, summed over voxels and components: ``(B,)``.

    ``E(u) = sum_i sum_p [ sum_j (D_jj u_i)^2 + 2 sum_{j<k} (D_j D_k u_i)^2 ]`` with ``D_jj`` the central second
    difference ``u(p - e_j) - 2 u(p) + u(p + e_j)`` and ``D_j D_k`` the product of forward differences (valid voxels
    only). Its gradient is Lipschitz with constant at most ``2 (4 n)^2 = 32 n^2`` (the Fourier symbol is that of the
    squared Laplacian), which :func:`smoothness_guidance` uses to scale its step.

    Raises:
        ValueError: ``ddf`` is not ``(B, n, *spatial)`` with ``n`` spatial axes of >= 3 voxels.
    """
    if ddf.ndim < 3 or ddf.shape[1] != ddf.ndim - 2 or any(s < 3 for s in ddf.shape[2:]):
        raise ValueError(f"ddf must be (B, ndim, *spatial) with >= 3 voxels per axis, got {tuple(ddf.shape)}")
    n = ddf.ndim - 2
    total = ddf.new_zeros(ddf.shape[0])
    for j in range(n):
        ax = 2 + j
        d2 = ddf.narrow(ax, 0, ddf.shape[ax] - 2) - 2 * ddf.narrow(ax, 1, ddf.shape[ax] - 2) \
            + ddf.narrow(ax, 2, ddf.shape[ax] - 2)
        total = total + d2.pow(2).flatten(1).sum(1)
        for k in range(j + 1, n):
            djk = torch.diff(torch.diff(ddf, dim=ax), dim=2 + k)
            total = total + 2 * djk.pow(2).flatten(1).sum(1)
    return total


def smoothness_guidance(weight: float = 0.5, t_max: int | None = None) -> Guidance:
    """Guidance (a): pull ``phi0_hat`` towards smoothness by descending the bending energy.

    Energy ``weight / (32 n^2) * bending_energy(phi0_hat)``: one step of it is
    ``phi <- phi - weight * (A / (16 n^2)) phi`` with ``A`` the bending operator, whose eigenvalues scaled this way
    lie in [0, 1]; so ``weight`` in [0, 1] damps the roughest mode of ``phi0_hat`` by the factor ``1 - weight`` per
    sampling step and leaves affine motions untouched. ``weight = 0`` does nothing.

    Args:
        weight: step size in [0, 2) (stable; > 1 over-relaxes the roughest mode).
        t_max: guide only at timesteps ``t <= t_max`` (``None``: always).

    Returns:
        ``energy(phi0_hat, t) -> (B,)``.
    """
    if not 0 <= weight < 2:
        raise ValueError(f"weight must lie in [0, 2), got {weight}")

    def energy(phi: Tensor, t: int) -> Tensor:
        if t_max is not None and t > t_max:
            return phi.new_zeros(phi.shape[0])
        n = phi.ndim - 2
        return weight / (32 * n * n) * bending_energy(phi)

    energy.__name__ = f"smoothness_guidance(weight={weight})"
    return energy


def region_guidance(moving: Tensor, fixed: Tensor, region: Tensor, weight: float = 1.0, similarity: str = "mse",
                    window: int = 9, t_max: int | None = None) -> Guidance:
    """Guidance (b): steer ``phi0_hat`` to align ``m o phi`` with ``f`` inside a chosen region (an organ).

    ``similarity="mse"``: energy ``weight / 2 * sum_p r(p) (m o phi - f)^2(p)`` (step: ``weight`` voxels per unit
    intensity error times the image gradient); ``"ncc"``: ``-weight * sum_p r(p) cc(p)`` with ``cc`` the squared
    local NCC map (:func:`diffreg.losses.ncc_map`, window ``window``).

    Args:
        moving, fixed: the pair being registered, ``(B, 1, *spatial)``.
        region: ``(B, 1, *spatial)`` weights in the fixed image's space (e.g. a dilated label mask).
        weight: guidance strength (>= 0).
        similarity: ``"mse"`` or ``"ncc"``.
        window: NCC window.
        t_max: guide only at ``t <= t_max``.

    Raises:
        ValueError: shapes that do not match, a negative weight or an unknown similarity.
    """
    if region.shape[0] != fixed.shape[0] or region.shape[2:] != fixed.shape[2:] or region.shape[1] != 1:
        raise ValueError(f"region must be (B, 1, *spatial) like fixed {tuple(fixed.shape)}, got {tuple(region.shape)}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if similarity not in ("mse", "ncc"):
        raise ValueError(f"similarity must be 'mse' or 'ncc', got {similarity!r}")
    region = region.to(fixed.dtype)

    def energy(phi: Tensor, t: int) -> Tensor:
        if t_max is not None and t > t_max:
            return phi.new_zeros(phi.shape[0])
        warped = warp(moving, phi)
        if similarity == "mse":
            e = 0.5 * region * (warped - fixed) ** 2
        else:
            e = -region * losses.ncc_map(warped, fixed, window)
        return weight * e.flatten(1).sum(1)

    energy.__name__ = f"region_guidance(weight={weight}, similarity={similarity!r})"
    return energy


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

class FieldState(NamedTuple):
    """One step of DiffuseReg's sampling trajectory (fields in voxels, de-normalised).

    Attributes:
        t: timestep of ``phi_t``, the state the denoiser saw.
        t_next: timestep of ``phi_next`` (-1: the final field).
        phi_t: the noisy field ``phi_t`` ``(B, dims, *spatial)``.
        phi0_hat: the estimate of ``phi_0`` at this step (eq. 3, after guidance).
        warped: the moving image warped by ``phi0_hat``.
        phi_next: the state after the update.
    """

    t: int
    t_next: int
    phi_t: Tensor
    phi0_hat: Tensor
    warped: Tensor
    phi_next: Tensor


StopAt = Union[int, Callable[[FieldState], bool], None]


class DiffuseReg(RegistrationModel):
    """DiffuseReg: DDPM over the deformation field with a conditional Swin-UNETR denoiser (module docstring).

    Args:
        dims: 2 or 3.
        feature_size, depths, num_heads, window, mask, time_in_resblocks, norm_name: the denoiser
            (:class:`DiffuseRegDenoiser`).
        lambda_sim: ``lambda_1`` of eq. 3 (1, sec. 3, implementation details).
        lambda_reg: ``lambda_2`` (0.1, sec. 3, implementation details).
        ssim_kernel: SSIM window (9, sec. 3, implementation details).
        use_teacher: train on teacher fields ``phi_0`` (``False``: Table 2 row 6, similarity only).
        consistency_weighting: ``"none"`` (the paper: ``L_sim`` and ``L_reg`` on ``phi0_hat`` at every ``t``) or
            ``"abar"`` (each pair's ``L_sim`` and ``L_reg`` weighted by ``abar_t``, so the nearly pure-noise
            estimates at large ``t``, whose errors eq. 3 amplifies by ``1 / sqrt(abar_t)`` (~180 at ``t = T``), do
            not dominate; a deviation, not used by the profiles).
        parameterization: what the network outputs: ``"eps"`` (the paper: ``D`` predicts the noise), ``"v"``
            (it predicts ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) phi_0`` and ``eps_hat = sqrt(abar_t) v_hat +
            sqrt(1 - abar_t) phi_t``) or ``"x0"`` (it predicts ``phi_0`` and ``eps_hat = (phi_t - sqrt(abar_t)
            phi0_hat) / sqrt(1 - abar_t)``; the ``quick`` profile); eq. 3-4 are unchanged, only the network's
            output is re-expressed.
        diffusion_weighting: ``"none"`` (eq. 4 as written), ``"v"`` (eq. 4 weighted per pair by ``1 / abar_t``,
            i.e. ``mean (v_hat - v)^2``) or ``"x0"`` (weighted by ``(1 - abar_t) / abar_t``, i.e. the mean squared
            error of ``phi0_hat``; the ``quick`` profile): the weightings keep a learning signal for ``phi0_hat``
            at large ``t``, where eq. 4 weights its error by the vanishing SNR.
        timesteps, beta_start, beta_end: the linear schedule (2000, 1e-6, 1e-2; sec. 3, implementation details).
        sampler: default sampler of :meth:`register` (``"ddpm"`` or ``"ddim"``).
        sample_steps: default DDIM steps (``None``: all ``T``).
        eta: default DDIM stochasticity.
        teacher: keyword arguments of the teacher :class:`~diffreg.models.VoxelMorph` (default VM-2, NCC,
            lambda 1).
        teacher_steps, teacher_lr: the budget of the teacher stage (:meth:`stages`; Adam, constant rate, batch 1).

    Raises:
        ValueError: bad arguments.
    """

    def __init__(
        self,
        dims: int = 2,
        feature_size: int = 12,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window: Sequence[int] | None = None,
        mask: str = "paper",
        time_in_resblocks: bool = True,
        norm_name: str = "instance",
        lambda_sim: float = 1.0,
        lambda_reg: float = 0.1,
        ssim_kernel: int = 9,
        use_teacher: bool = True,
        consistency_weighting: str = "none",
        parameterization: str = "eps",
        diffusion_weighting: str = "none",
        timesteps: int = 2000,
        beta_start: float = 1e-6,
        beta_end: float = 1e-2,
        sampler: str = "ddpm",
        sample_steps: int | None = None,
        eta: float = 0.0,
        teacher: dict[str, Any] | None = None,
        teacher_steps: int = 1500,
        teacher_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if diffusion_weighting not in ("none", "v", "x0"):
            raise ValueError(f"diffusion_weighting must be 'none', 'v' or 'x0', got {diffusion_weighting!r}")
        if parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"parameterization must be 'eps', 'v' or 'x0', got {parameterization!r}")
        if consistency_weighting not in ("none", "abar"):
            raise ValueError(f"consistency_weighting must be 'none' or 'abar', got {consistency_weighting!r}")
        from diffreg.models.voxelmorph import VoxelMorph

        self.dims = dims
        self.lambda_sim, self.lambda_reg = float(lambda_sim), float(lambda_reg)
        self.ssim_kernel = int(ssim_kernel)
        self.use_teacher = bool(use_teacher)
        self.consistency_weighting = consistency_weighting
        self.parameterization = parameterization
        self.diffusion_weighting = diffusion_weighting
        with torch.device("cpu"):  # the schedule lives on the CPU (float64) even when built under a meta device
            self.schedule = NoiseSchedule.linear(beta_start, beta_end, timesteps)
        self.default_sampler, self.default_steps, self.default_eta = sampler, sample_steps, float(eta)
        self.teacher_kwargs = dict(teacher or {"layout": "vm2", "similarity": "ncc", "smooth_weight": 1.0})
        self.teacher_steps, self.teacher_lr = int(teacher_steps), float(teacher_lr)

        #: D(phi_t | f, m, t)
        self.denoiser = DiffuseRegDenoiser(dims, feature_size, depths, num_heads, window, mask, time_in_resblocks,
                                           norm_name)
        #: the frozen teacher that provides phi_0 (trained by prepare, or given by set_teacher)
        self.teacher = VoxelMorph(dims=dims, **self.teacher_kwargs)
        self.teacher.requires_grad_(False)
        # per-axis z-score statistics of the teacher fields on the training set (sec. 3, implementation details),
        # in voxels
        self.register_buffer("field_mean", torch.zeros(dims))
        self.register_buffer("field_std", torch.ones(dims))
        self.register_buffer("teacher_trained", torch.tensor(False))
        self.register_buffer("stats_ready", torch.tensor(False))

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, lambda_sim={self.lambda_sim}, lambda_reg={self.lambda_reg}, "
                f"use_teacher={self.use_teacher}, T={self.schedule.num_timesteps}, sampler={self.default_sampler!r}")

    def train(self, mode: bool = True) -> "DiffuseReg":
        super().train(mode)
        self.teacher.eval()  # frozen: always in eval mode
        return self

    def num_parameters(self) -> int:
        """Trainable parameters: the denoiser (the frozen teacher is not counted)."""
        return sum(p.numel() for p in self.denoiser.parameters() if p.requires_grad)

    # ------------------------------------------------------------------------------------------------------------
    # The teacher and the z-scoring of its fields (sec. 3, implementation details)
    # ------------------------------------------------------------------------------------------------------------
    def set_teacher(self, teacher: nn.Module) -> None:
        """Use an already trained VoxelMorph as the teacher (e.g. ``diffreg.train.load_run(run_dir)[0]``).

        Its architecture must match ``teacher`` of this model's configuration (the weights are copied in); the
        teacher stage is then done (:meth:`stages` returns none).

        Raises:
            ValueError: the architectures differ, or ``teacher`` is not a module.
        """
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"set_teacher takes a trained VoxelMorph module, got {type(teacher).__name__} (for a run "
                             "directory: set_teacher(diffreg.train.load_run(run_dir)[0]))")
        try:
            self.teacher.load_state_dict(teacher.state_dict())
        except RuntimeError as exc:
            raise ValueError(f"the teacher's architecture does not match {self.teacher_kwargs}: {exc}") from exc
        for name in ("int_steps", "int_downsize"):
            if getattr(teacher, name, None) != getattr(self.teacher, name):
                raise ValueError(f"teacher {name}={getattr(teacher, name, None)} differs from "
                                 f"{getattr(self.teacher, name)} of this model's teacher configuration")
        self._teacher_done()

    def _teacher_done(self, log_rows: list[dict[str, Any]] | None = None) -> None:
        """Freeze the teacher and mark it trained; its fields change, so the statistics are stale."""
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_trained.fill_(True)
        self.stats_ready.fill_(False)

    @torch.no_grad()
    def teacher_field(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """``phi_0`` of the teacher, ``(B, dims, *spatial)`` in voxels."""
        self.teacher.eval()
        return self.teacher(moving, fixed).float()

    @torch.no_grad()
    def compute_field_stats(self, data: Any, batch_size: int = 8) -> tuple[Tensor, Tensor]:
        """Per-axis mean and SD of the teacher fields over every voxel of every pair of ``data``; stored in the
        ``field_mean`` / ``field_std`` buffers and returned."""
        device = self.field_mean.device
        s = torch.zeros(self.dims, dtype=torch.float64, device=device)
        s2 = torch.zeros_like(s)
        count = 0
        for start in range(0, len(data), batch_size):
            items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            mov = torch.stack([it["moving"] for it in items]).to(device)
            fix = torch.stack([it["fixed"] for it in items]).to(device)
            phi = self.teacher_field(mov, fix).double().transpose(0, 1).flatten(1)
            s += phi.sum(1)
            s2 += (phi ** 2).sum(1)
            count += phi.shape[1]
        if count == 0:
            raise ValueError("cannot compute field statistics on an empty dataset")
        mean = s / count
        std = (s2 / count - mean ** 2).clamp_min(1e-12).sqrt()
        self.field_mean.copy_(mean.float())
        self.field_std.copy_(std.float().clamp_min(1e-3))
        self.stats_ready.fill_(True)
        return self.field_mean.clone(), self.field_std.clone()

    #: the teacher's budget in the configuration (``--stage-steps``, the benchmark's budget column)
    stage_budgets = (StageBudget("teacher", "teacher_steps", 1),)

    def stages(self, seed: int = 0) -> list[Stage]:
        """The teacher, as a stage trained before the main loop (none when it is trained, given with
        :meth:`set_teacher`, or not used): a :class:`~diffreg.models.VoxelMorph` run of its own, trained by
        :func:`diffreg.train.fit` in the run's sub-folder ``teacher`` (``diffreg.train.load_run`` opens it) with
        Adam at a constant rate, batch 1, ``teacher_steps`` steps and the run's ``seed``."""
        if not self.use_teacher or bool(self.teacher_trained):
            return []
        cfg = MethodConfig(
            method="voxelmorph", profile="teacher", model=dict(self.teacher_kwargs),
            train=TrainConfig(steps=self.teacher_steps, lr=self.teacher_lr, batch_size=1, scheduler="constant",
                              seed=int(seed), log_every=50,
                              checkpoint_every=max(1, min(500, self.teacher_steps // 4))),
            source="DiffuseReg teacher (the paper uses a pre-trained VTN, sec. 3, implementation details)")
        return [Stage("teacher", self.teacher, cfg, done=self._teacher_done)]

    def prepare(self, data: Any, out: Path | None = None, device: torch.device | None = None,
                progress: bool = False, seed: int = 0) -> None:
        """Before training, once the teacher is trained (:meth:`stages`): compute the field statistics.

        With ``use_teacher=False`` (Table 2 row 6) nothing is needed: the statistics stay (0, 1).

        Raises:
            RuntimeError: the teacher is neither trained nor given.
        """
        if not self.use_teacher:
            return
        if not bool(self.teacher_trained):
            raise RuntimeError("DiffuseReg's teacher is not trained: train the model with diffreg.train.fit (which "
                               "trains its stages first), call diffreg.train.train_stages, or give one with "
                               "set_teacher")
        device = torch.device(device) if device is not None else self.field_mean.device
        self.to(device)
        self.teacher.eval()
        self.compute_field_stats(data)

    # ------------------------------------------------------------------------------------------------------------
    # Normalised field space
    # ------------------------------------------------------------------------------------------------------------
    def _stat(self, v: Tensor, ref: Tensor) -> Tensor:
        return v.to(ref.device, ref.dtype).view(1, -1, *([1] * (ref.ndim - 2)))

    def normalize(self, phi: Tensor) -> Tensor:
        """``(phi - mu) / sigma`` per axis (sec. 3, implementation details)."""
        return (phi - self._stat(self.field_mean, phi)) / self._stat(self.field_std, phi)

    def denormalize(self, x: Tensor) -> Tensor:
        """``x * sigma + mu``: back to voxels."""
        return x * self._stat(self.field_std, x) + self._stat(self.field_mean, x)

    def _check(self, moving: Tensor, fixed: Tensor) -> None:
        check_pair(moving, fixed, self.dims)
        if any(s % 32 for s in moving.shape[2:]):
            raise ValueError(f"DiffuseReg needs spatial sizes divisible by 32, got {tuple(moving.shape[2:])}")

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """``eps_hat = D(phi_t | f, m, t)`` (normalised field space) with ``cond = denoiser.encode(moving, fixed)``;
        for ``parameterization="v"`` / ``"x0"`` the network's ``v_hat`` / ``phi0_hat`` is turned into ``eps_hat``."""
        out = self.denoiser(x_t, t, cond=cond).float()
        if self.parameterization == "eps":
            return out
        a = self.schedule.alphas_cumprod.to(x_t.device)[t.to(x_t.device).long()].float()
        a = a.view(-1, *([1] * (x_t.ndim - 1)))
        if self.parameterization == "x0":  # out = phi0_hat: eps_hat = (phi_t - sqrt(abar) phi0_hat) / sqrt(1 - abar)
            return (x_t.float() - a.sqrt() * out) / (1 - a).clamp_min(1e-12).sqrt()
        return a.sqrt() * out + (1 - a).sqrt() * x_t.float()

    # ------------------------------------------------------------------------------------------------------------
    # Training (eq. 3-4)
    # ------------------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"total", "diffuse", "sim", "reg"}`` (eq. 3-4):
        ``total = diffuse + lambda_1 sim + lambda_2 reg`` (``use_teacher=False``: ``lambda_1 sim + lambda_2 reg``).

        ``t ~ U{0, ..., T-1}`` and ``eps ~ N(0, I)`` unless given.
        """
        moving, fixed = batch["moving"], batch["fixed"]
        self._check(moving, fixed)
        b = moving.shape[0]
        shape = (b, self.dims, *moving.shape[2:])
        dev = moving.device
        if self.use_teacher:
            x0 = self.normalize(self.teacher_field(moving, fixed))
        else:  # Table 2 row 6: no phi_0
            x0 = torch.randn(shape, generator=generator, device=dev)
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=generator,
                              device="cpu" if generator is None else generator.device).to(dev)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=dev)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps_hat = self.predict_eps(x_t, t, self.denoiser.encode(moving, fixed))
        if self.diffusion_weighting == "none":
            diffuse = torch.mean((eps_hat - noise) ** 2)  # eq. 4
        else:
            a = self.schedule.alphas_cumprod.to(dev)[t].float().view(-1, *([1] * (noise.ndim - 1)))
            if self.diffusion_weighting == "v":  # eq. 4 / abar_t = mean (v_hat - v)^2 (deviation, class docstring)
                diffuse = torch.mean((eps_hat - noise) ** 2 / a)
            else:  # eq. 4 (1 - abar_t) / abar_t = mean (phi0_hat - phi0)^2 (deviation, class docstring)
                diffuse = torch.mean((eps_hat - noise) ** 2 * (1 - a) / a)
        phi0_hat = self.denormalize(self.schedule.predict_x0(x_t, t, eps_hat))  # eq. 3
        warped = warp(moving, phi0_hat)
        if self.consistency_weighting == "none":
            sim = losses.ssim_loss(warped, fixed, kernel=self.ssim_kernel)
            reg = losses.gradient_smoothness(phi0_hat)
        else:  # per pair, weighted by abar_t (deviation, see the class docstring)
            w = self.schedule.alphas_cumprod.to(dev)[t].float()
            sim = torch.stack([losses.ssim_loss(warped[i:i + 1], fixed[i:i + 1], kernel=self.ssim_kernel)
                               for i in range(b)])
            reg = torch.stack([losses.gradient_smoothness(phi0_hat[i:i + 1]) for i in range(b)])
            sim, reg = (w * sim).mean(), (w * reg).mean()
        total = self.lambda_sim * sim + self.lambda_reg * reg
        if self.use_teacher:
            total = total + diffuse
        return {"total": total, "diffuse": diffuse, "sim": sim, "reg": reg}

    # ------------------------------------------------------------------------------------------------------------
    # Sampling (eq. 1), guidance, early stopping
    # ------------------------------------------------------------------------------------------------------------
    def _guide(self, x0: Tensor, t: int, guidance: Sequence[Guidance]) -> Tensor:
        """One gradient step of the summed guidance energies on ``phi0_hat`` (voxels); returns the new ``x0``."""
        with torch.enable_grad():
            phi = self.denormalize(x0.detach().float()).requires_grad_(True)
            energy = sum(g(phi, t).sum() for g in guidance)
            grad, = torch.autograd.grad(energy, phi)
        return self.normalize(phi.detach() - grad).to(x0.dtype)

    def _trajectory(self, moving: Tensor, fixed: Tensor, sampler: str, steps: int | None, eta: float,
                    generator: torch.Generator | None, guidance: Sequence[Guidance], stop_at: StopAt,
                    x_T: Tensor | None) -> Iterator[FieldState]:
        # no autograd through the denoiser while sampling (guidance differentiates the energies only); a
        # ``torch.no_grad()`` around a generator body would leak into the caller's code between the yields
        with torch.no_grad():
            cond = self.denoiser.encode(moving, fixed)
        sched = self.schedule

        def eps_fn(x: Tensor, tb: Tensor) -> Tensor:
            with torch.no_grad():
                eps = self.predict_eps(x, tb, cond).to(x.dtype)
            if guidance:
                x0 = self._guide(sched.predict_x0(x, tb, eps), int(tb[0]), guidance)
                eps = sched.predict_eps(x, tb, x0)
            return eps

        shape = (moving.shape[0], self.dims, *moving.shape[2:])
        if x_T is None:
            x_T = torch.randn(shape, generator=generator, device=moving.device)
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        if sampler == "ddpm":
            chain = ddpm_sample(eps_fn, x_T, sched, generator=generator)
        else:
            chain = ddim_sample(eps_fn, x_T, sched, steps or sched.num_timesteps, eta=eta, generator=generator)
        for step in chain:
            phi0 = self.denormalize(step.x0_hat)
            state = FieldState(step.t, step.t_next, self.denormalize(step.x_t), phi0, warp(moving, phi0),
                               self.denormalize(step.x_next))
            yield state
            if stop_at is not None and (stop_at(state) if callable(stop_at) else step.t <= int(stop_at)):
                return

    def sample(self, moving: Tensor, fixed: Tensor, sampler: str | None = None, steps: int | None = None,
               eta: float | None = None, return_trajectory: bool = True, stop_at: StopAt = None,
               guidance: Guidance | Sequence[Guidance] | None = None, generator: torch.Generator | None = None,
               seed: int | None = None, x_T: Tensor | None = None) -> Iterator[FieldState] | FieldState:
        """Sample ``phi_0`` from ``phi_T ~ N(0, I)`` (eq. 1), one :class:`FieldState` per denoiser evaluation.

        Args:
            moving, fixed: ``(B, 1, *spatial)``.
            sampler: ``"ddpm"`` (ancestral, all ``T`` steps, :func:`diffreg.diffusion.ddpm_sample`) or ``"ddim"``
                (:func:`diffreg.diffusion.ddim_sample`, ``steps`` strided steps); default: the model's.
            steps: DDIM steps (default: the model's ``sample_steps``, else ``T``); for DDPM ``None`` or ``T``.
            eta: DDIM stochasticity (0: deterministic).
            return_trajectory: ``True``: a lazy iterator over the states (stop iterating whenever you like);
                ``False``: run to the end (or ``stop_at``) and return the last state.
            stop_at: stop after the state with ``t <= stop_at``, or when ``stop_at(state)`` is true; the registration
                is then that state's ``phi0_hat`` (sec. 3, results).
            guidance: energy callable(s) ``energy(phi0_hat, t) -> (B,)`` (:func:`smoothness_guidance`,
                :func:`region_guidance`); each step moves ``phi0_hat`` by minus the gradient of their sum.
            generator: random generator (``phi_T`` and the DDPM / DDIM noise).
            seed: seeds a new generator on the inputs' device when ``generator`` is not given.
            x_T: the starting noise (normalised field space) instead of drawing it.

        Raises:
            ValueError: bad inputs, sampler or steps.
        """
        self._check(moving, fixed)
        sampler = sampler or self.default_sampler
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        T = self.schedule.num_timesteps
        if sampler == "ddpm":
            if steps not in (None, T):
                raise ValueError(f"DDPM runs all T={T} steps; for fewer use sampler='ddim' (eta=1 for DDPM noise)")
        else:
            steps = steps if steps is not None else (self.default_steps or T)
            if int(steps) != steps or not 1 <= steps <= T:
                raise ValueError(f"steps must be an integer in [1, {T}], got {steps}")
            steps = int(steps)
        eta = self.default_eta if eta is None else float(eta)
        if guidance is None:
            guidance = []
        elif callable(guidance):
            guidance = [guidance]
        if generator is None and seed is not None:
            generator = torch.Generator(device=moving.device).manual_seed(int(seed))
        traj = self._trajectory(moving, fixed, sampler, steps, eta, generator, list(guidance), stop_at, x_T)
        if return_trajectory:
            return traj
        last = None
        for last in traj:
            pass
        return last

    @torch.no_grad()
    def register(self, moving: Tensor, fixed: Tensor, sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None, seed: int | None = 0, stop_at: StopAt = None,
                 guidance: Guidance | Sequence[Guidance] | None = None, keep_trajectory: bool = False,
                 **options: Any) -> RegistrationResult:
        """Sample a field and warp ``moving`` with it (the final ``phi0_hat``).

        Options as :meth:`sample` (``seed=0`` by default, so evaluations are reproducible). ``extras``: ``sampler``,
        ``steps`` (denoiser evaluations), ``t_stop`` (timestep of the last state) and, with ``keep_trajectory``,
        ``trajectory`` (the list of :class:`FieldState`).

        Raises:
            ValueError: unknown options.
        """
        if options:
            raise ValueError(f"unknown DiffuseReg.register options {sorted(options)}; known: sampler, steps, eta, "
                             f"seed, stop_at, guidance, keep_trajectory")
        states = [] if keep_trajectory else None
        last, n = None, 0
        for last in self.sample(moving, fixed, sampler, steps, eta, True, stop_at, guidance, seed=seed):
            n += 1
            if states is not None:
                states.append(last)
        extras: dict[str, Any] = {"sampler": sampler or self.default_sampler, "steps": n, "t_stop": last.t}
        if states is not None:
            extras["trajectory"] = states
        return RegistrationResult(ddf=last.phi0_hat, warped=last.warped, extras=extras)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """The registration field with the default sampler, ``(B, dims, *spatial)`` in voxels."""
        return self.register(moving, fixed).ddf
