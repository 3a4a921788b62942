"""DiffuseMorph (Kim, Han, Ye, ECCV 2022): unsupervised registration driven by a conditional diffusion score.

Explained in chapter 04 (``notebooks/04_diffusemorph.md``).

Method, top to bottom (paper sec. 3):

1. **Diffusion network** ``G_theta`` (sec. 3.1): a DDPM U-Net that takes the condition ``c = (m, f)`` and the
   noised *fixed* image ``x_t = sqrt(abar_t) f + sqrt(1 - abar_t) eps`` (``x_0 = f``) with the timestep ``t`` and
   predicts the noise ``eps_hat = G(c, x_t, t)``, the "latent feature of the conditional score". The network input
   is ``concat(m, f, x_t)`` (3 channels). Built with MONAI ``DiffusionModelUNet`` (sinusoidal time embedding,
   GroupNorm with ``norm_groups`` groups, one ResBlock per level, widths 8/16/32/32 as in the official 3D
   configuration: ``inner_channel 8``, ``channel_multiplier [1, 2, 4, 4]``, ``res_blocks 1``).
2. **Deformation network** ``M_psi`` (sec. 3.1): the VoxelMorph-1 backbone
   (:func:`diffreg.models.voxelmorph.voxelmorph_unet`, ``layout="vm1"``) on ``concat(m, eps_hat)``, returning the
   displacement ``phi`` (voxels, pull convention) used to warp ``m`` with a (bi/tri)linear spatial transformer.
3. **Loss** (eq. 7-9)::

       L = L_diffusion + lambda * L_regist
       L_diffusion = E ||G(c, x_t, t) - eps||_2^2                            (eq. 8; mean squared error)
       L_regist    = -NCC_9(m o phi, f) + lambda_phi * sum ||grad phi||^2    (eq. 9; lambda_phi = 1)

   with ``t ~ U{0, ..., T_train - 1}`` and ``phi = M(m, eps_hat)`` computed from the ``eps_hat`` at the *sampled*
   ``t`` (the paper: "phi = M(m, eps_hat) with eps_hat referring to the diffusion network output"; the official
   code feeds the same ``x_recon`` to the deformation network), so gradients of ``L_regist`` also train ``G``.
   The norm of eq. 8 is the squared L2 norm; the official code uses ``MSELoss(reduction="mean")`` (``loss_type='l2'``),
   which is what :meth:`DiffuseMorph.diffusion_loss` computes. The smoothness term is
   :func:`diffreg.losses.gradient_smoothness` (squared forward differences, averaged), as in VoxelMorph.
4. **Registration** (eq. 10): one pass with ``x_t = f`` at ``t = 0``: ``phi = M(m, G(c, f, 0))``.
5. **Continuous registration** (Alg. 1, eq. 11): ``phi_eta = M(m, eta * G(c, f, 0))`` for ``eta in [0, 1]``.
6. **Synthesis** (Alg. 2, eq. 12-13): forward-diffuse the *moving* image to ``T`` (``x_T = sqrt(abar_T) m +
   sqrt(1 - abar_T) eps``), then run the reverse diffusion conditioned on ``c = (m, f)`` down to ``x_0``, a
   synthetic deformed image close to ``f``. The paper reverses with eq. 13 (DDPM) and uses the accelerated
   sampling of its ref. [8] with at most 200 reverse steps; we offer the exact ancestral DDPM chain
   (``sampler="ddpm"``) and strided DDIM (``sampler="ddim"``, ``eta=1`` by default: DDPM-variance noise on the
   strided steps).

Schedule (sec. 4, implementation details): betas linear from 1e-6 to 1e-2 over ``T_train = 2000`` steps
(:meth:`diffreg.diffusion.NoiseSchedule.linear`). Timesteps are 0-based (``t = 0 ... T_train - 1``) as everywhere
in :mod:`diffreg.diffusion`; the paper's 1-based ``t`` maps to ``t - 1``.

Deviations and choices (each also in the box of chapter 04):

* **Diffusion U-Net blocks.** The official 3D U-Net has attention only at the bottleneck. MONAI's
  ``DiffusionModelUNet`` always puts one self-attention block in its middle (bottleneck) block, so
  ``attention_levels`` defaults to all ``False`` (no attention in the encoder/decoder levels), which reproduces
  "bottleneck only". That attention differs in kind: the official block is *linear* attention with 4 heads (softmax
  of the keys over positions, a channel-by-channel context), ours is MONAI's softmax self-attention with one head of
  32 channels. MONAI's other block details (time-embedding MLP ``Linear(c, 4c) - SiLU - Linear(4c, 4c)`` against
  the official ``Linear(c, 4c) - Swish - Linear(4c, c)``, zero-initialised second ResBlock convolutions and output
  convolution, skip/up/down-sampling arrangement) are not those of the SR3-style official U-Net. With
  ``widths=(8, 16, 32, 32)`` and ``norm_groups=4`` the 3D diffusion network has 724,425 parameters against the
  official 715,665 (+1.2 %).
* **Deformation network.** diffreg's VM-1 (:func:`diffreg.models.voxelmorph.voxelmorph_unet`, MONAI
  ``VoxelMorphUNet``: encoder 16, 32, 32, 32 with max-pooling before each down-sampling convolution, decoder
  32, 32, 32, 32, 8, 8 with nearest-neighbour up-sampling). The official ``registUnetBlock`` has an input
  convolution and four stride-2 convolution down blocks (encoder 16, 32, 32, 32, 32) and up-samples with transposed
  convolutions. The convolutions match in number and width (the official decoder reduces to 8 channels one level
  earlier); the difference is strided-convolution down-sampling and transposed-convolution up-sampling against
  max-pooling and nearest up-sampling. The four transposed convolutions are the whole difference in size: 276,523
  parameters in 3D against 361,299 (84,776 fewer), and the whole 3D model has 1,000,948 against 1,076,964 officially
  (7 % fewer). The flow layer keeps VoxelMorph's N(0, 1e-5) initialisation (the official code initialises both
  networks with its own normal / orthogonal schemes).
* **Local NCC at the image border.** :func:`diffreg.losses.ncc_map` computes each window's statistics over the
  voxels inside the image only; the official ``crossCorrelation3D`` (like MONAI's LNCC and VoxelMorph's ``NCC``)
  zero-pads. The official images are in [-1, 1], and its loss rescales only the fixed image (``target``) to
  [0, 1]; the warped moving image stays in [-1, 1] (a one-sided shift). In the interior this changes nothing (NCC
  is invariant to the affine rescaling, up to its 1e-5 stabiliser), but in the border band (within ``window // 2``
  voxels of the edge) the zero padding continues the fixed image at the bottom of its range and the warped image
  at the middle of its range, so those windows see a step in the warped image that the fixed image does not have.
  Ours gives the same values in the interior, and at the border is exactly invariant to affine intensity changes of
  either image, with no artificial border band for any intensity range.
* **The 2D ``paper`` profile is not a paper experiment.** The paper's 2D experiment registers faces (RaFD,
  ``lambda = 2``, lr 5e-6, 40 epochs); it has no 2D cardiac experiment. ``get_config("diffusemorph", "paper",
  dims=2)`` combines the 3D network widths with those face hyper-parameters and applies them to 2D cardiac slices
  (the official 2D face network is much wider: ``inner_channel 64``, deformation encoder 64 to 1024 channels). The
  ``quick`` profile uses the cardiac ``lambda = 20`` in 2D instead (:mod:`diffreg.config`).
* **Direction in ``quick``.** The paper (sec. 4.2, "end-diastolic images aligned with the end-systolic images") and
  its code register ED to ES; the ``quick`` profile registers ES to ED, as FSDiffReg and DiffuseReg state it (the
  ``paper`` profile keeps ED to ES).
* Time conditioning: the integer timestep through MONAI's sinusoidal embedding (the official 3D code also passes
  the integer ``t``).
* **Synthesis** (Alg. 2): :meth:`DiffuseMorph.synthesize` defaults to (and chapter 04 runs) 80 strided DDIM steps
  (``eta=1``, DDPM variance) from ``T = 200``; eq. 13 is the step-by-step DDPM update (``sampler="ddpm"``, 200
  steps). The ``x0`` estimate is clipped to ``[-1, 1]`` by
  default (images are normalised to [-1, 1], sec. 4); pass ``clip_x0=None`` to disable.

Shapes: ``moving``, ``fixed`` ``(B, 1, *spatial)`` with ``dims`` spatial axes, every size divisible by 16
(the VM-1 backbone pools four times); fields ``(B, dims, *spatial)`` in voxels; scores ``(B, 1, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffreg import losses
from diffreg.diffusion import NoiseSchedule, ddim_sample, ddpm_sample
from diffreg.models.base import RegistrationModel, RegistrationResult, check_pair
from diffreg.models.voxelmorph import voxelmorph_unet
from diffreg.spatial import warp

__all__ = ["DiffuseMorph"]


class DiffuseMorph(RegistrationModel):
    """DiffuseMorph: a conditional diffusion network ``G`` whose noise estimate drives a VoxelMorph-1 field network ``M``.

    Args:
        dims: 2 or 3 spatial dimensions.
        widths: channel widths of the diffusion U-Net levels (official 3D: 8, 16, 32, 32).
        norm_groups: GroupNorm groups (must divide every width).
        attention_levels: self-attention per encoder/decoder level (default all ``False``; MONAI's bottleneck
            always has one self-attention block, which is the paper's configuration).
        vm_layout: layout of the deformation network (``"vm1"``: VoxelMorph-1, as in the paper, sec. 4).
        lambda_reg: ``lambda`` of eq. 7 (2 for the 2D faces, 20 for 3D cardiac MR, 10 for brain MR).
        lambda_smooth: ``lambda_phi`` of eq. 9 (1 in the paper).
        ncc_window: local NCC window side (9, as in VoxelMorph).
        timesteps: ``T_train`` (2000).
        beta_start, beta_end: linear beta schedule end points (1e-6, 1e-2).

    Raises:
        ValueError: bad ``dims``, widths/groups, attention levels or schedule.
    """

    def __init__(
        self,
        dims: int = 2,
        widths: Sequence[int] = (8, 16, 32, 32),
        norm_groups: int = 4,
        attention_levels: Sequence[bool] | None = None,
        vm_layout: str = "vm1",
        lambda_reg: float = 20.0,
        lambda_smooth: float = 1.0,
        ncc_window: int = 9,
        timesteps: int = 2000,
        beta_start: float = 1e-6,
        beta_end: float = 1e-2,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1 or any(w < 1 or w % norm_groups for w in widths):
            raise ValueError(f"every width must be a positive multiple of norm_groups={norm_groups}, got {widths}")
        attention_levels = tuple(bool(a) for a in (attention_levels or (False,) * len(widths)))
        if len(attention_levels) != len(widths):
            raise ValueError(f"attention_levels needs one entry per width ({len(widths)}), got {attention_levels}")
        self.dims = dims
        self.widths = widths
        self.norm_groups = norm_groups
        self.attention_levels = attention_levels
        self.vm_layout = vm_layout
        self.lambda_reg = float(lambda_reg)
        self.lambda_smooth = float(lambda_smooth)
        self.ncc_window = ncc_window
        self.schedule = NoiseSchedule.linear(beta_start, beta_end, timesteps)

        # Imported here: ``monai.networks.nets`` is slow to import and pulls matplotlib (see voxelmorph_unet).
        from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

        #: G_theta: concat(m, f, x_t) -> eps_hat (sec. 3.1)
        self.diffusion_net = DiffusionModelUNet(
            spatial_dims=dims,
            in_channels=3,
            out_channels=1,
            channels=widths,
            attention_levels=attention_levels,
            num_res_blocks=1,
            norm_num_groups=norm_groups,
            num_head_channels=widths[-1],
        )
        #: M_psi: concat(m, eps_hat) -> phi (sec. 3.1, VoxelMorph-1 backbone)
        self.deformation_net = voxelmorph_unet(dims, in_channels=2, layout=vm_layout)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, widths={self.widths}, lambda_reg={self.lambda_reg}, "
                f"lambda_smooth={self.lambda_smooth}, T={self.schedule.num_timesteps}")

    # ------------------------------------------------------------------------------------------------------------
    # The two networks
    # ------------------------------------------------------------------------------------------------------------
    def _check(self, moving: Tensor, fixed: Tensor) -> None:
        check_pair(moving, fixed, self.dims)
        if any(s % 16 for s in moving.shape[2:]):
            raise ValueError(f"DiffuseMorph needs spatial sizes divisible by 16, got {tuple(moving.shape[2:])}")

    def score(self, moving: Tensor, fixed: Tensor, x_t: Tensor | None = None, t: Tensor | int = 0) -> Tensor:
        """``eps_hat = G(c, x_t, t)``, the latent feature of the conditional score, ``(B, 1, *spatial)``.

        Args:
            moving, fixed: the condition ``c = (m, f)``, ``(B, 1, *spatial)``.
            x_t: the noised fixed image (default: ``f`` itself, as at registration, eq. 10).
            t: timestep(s), an int or ``LongTensor (B,)`` in ``[0, T_train - 1]`` (default 0).
        """
        x_t = fixed if x_t is None else x_t
        if not isinstance(t, Tensor):
            t = torch.full((moving.shape[0],), int(t), device=moving.device, dtype=torch.long)
        return self.diffusion_net(torch.cat([moving, fixed, x_t], dim=1), timesteps=t).float()

    def deform(self, moving: Tensor, score: Tensor) -> Tensor:
        """``phi = M(m, score)``: the displacement ``(B, dims, *spatial)`` in voxels."""
        return self.deformation_net(torch.cat([moving, score.to(moving.dtype)], dim=1)).float()

    # ------------------------------------------------------------------------------------------------------------
    # Training (eq. 7-9)
    # ------------------------------------------------------------------------------------------------------------
    def diffusion_loss(self, moving: Tensor, fixed: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Eq. 8: ``mean (G(c, x_t, t) - eps)^2`` with ``x_t = q_sample(f, t, eps)``.

        ``t`` defaults to ``U{0, ..., T_train - 1}`` per sample and ``noise`` to N(0, I).

        Returns:
            ``(loss, eps_hat)``; ``eps_hat`` is what the deformation network sees in :meth:`loss`.
        """
        self._check(moving, fixed)
        B = fixed.shape[0]
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=generator,
                              device="cpu" if generator is None else generator.device).to(fixed.device)
        if noise is None:
            noise = torch.randn(fixed.shape, generator=generator, device=fixed.device, dtype=fixed.dtype)
        x_t = self.schedule.q_sample(fixed, t, noise).to(fixed.dtype)
        eps_hat = self.score(moving, fixed, x_t, t)
        return torch.mean((eps_hat - noise.float()) ** 2), eps_hat

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"total", "diffusion", "ncc", "smooth"}`` (eq. 7-9):
        ``total = diffusion + lambda_reg * (ncc + lambda_smooth * smooth)``, ``ncc`` being ``-NCC_9(m o phi, f)``
        and ``phi = M(m, eps_hat)`` with ``eps_hat`` at the sampled ``t``."""
        moving, fixed = batch["moving"], batch["fixed"]
        l_diff, eps_hat = self.diffusion_loss(moving, fixed)
        ddf = self.deform(moving, eps_hat)
        sim = losses.ncc_loss(warp(moving, ddf), fixed, window=self.ncc_window)
        smooth = losses.gradient_smoothness(ddf)
        total = l_diff + self.lambda_reg * (sim + self.lambda_smooth * smooth)
        return {"total": total, "diffusion": l_diff, "ncc": sim, "smooth": smooth}

    # ------------------------------------------------------------------------------------------------------------
    # Registration (eq. 10), continuous registration (Alg. 1), synthesis (Alg. 2)
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Eq. 10: ``phi = M(m, G(c, f, 0))``, ``(B, dims, *spatial)`` in voxels; one pass."""
        self._check(moving, fixed)
        return self.deform(moving, self.score(moving, fixed))

    @torch.no_grad()
    def register(self, moving: Tensor, fixed: Tensor, **options: Any) -> RegistrationResult:
        """Eq. 10 in one pass; ``extras["score"]`` is ``eps_hat^f = G(c, f, 0)``, ``(B, 1, *spatial)``."""
        if options:
            raise ValueError(f"DiffuseMorph.register takes no options, got {sorted(options)}")
        self._check(moving, fixed)
        eps = self.score(moving, fixed)
        ddf = self.deform(moving, eps)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={"score": eps})

    @torch.no_grad()
    def continuous(self, moving: Tensor, fixed: Tensor, etas: Sequence[float]) -> list[RegistrationResult]:
        """Alg. 1 / eq. 11: ``phi_eta = M(m, eta * G(c, f, 0))`` for each ``eta`` (the paper uses ``[0, 1]``).

        Returns:
            One :class:`RegistrationResult` per ``eta`` with ``extras = {"eta", "score"}`` (the scaled score).
        """
        self._check(moving, fixed)
        eps = self.score(moving, fixed)
        out = []
        for eta in etas:
            code = float(eta) * eps
            ddf = self.deform(moving, code)
            out.append(RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={"eta": float(eta), "score": code}))
        return out

    @torch.no_grad()
    def synthesize(self, moving: Tensor, fixed: Tensor, T: int = 200, steps: int = 80, sampler: str = "ddim",
                   eta: float = 1.0, clip_x0: float | None = 1.0,
                   generator: torch.Generator | None = None) -> list[tuple[int, Tensor]]:
        """Alg. 2 / eq. 12-13: synthetic deformed images by reverse diffusion started from the moving image.

        ``x_T = sqrt(abar_T) m + sqrt(1 - abar_T) eps`` (eq. 12), then the reverse chain with
        ``eps_hat = G(c, x_t, t)``, ``c = (m, f)``, down to ``x_0`` (eq. 13).

        Args:
            moving, fixed: ``(B, 1, *spatial)``.
            T: 0-based start timestep, ``0 <= T < T_train`` ("set not to lose the identity of the image").
            steps: model evaluations for ``sampler="ddim"`` (the paper uses at most 200 reverse steps);
                ignored by ``"ddpm"``, which runs all ``T + 1`` ancestral steps of eq. 13.
            sampler: ``"ddim"`` (strided, :func:`diffreg.diffusion.ddim_sample`) or ``"ddpm"``
                (:func:`diffreg.diffusion.ddpm_sample`).
            eta: DDIM stochasticity (1: DDPM variance on the strided steps, closest to eq. 13; 0: deterministic).
            clip_x0: clamp the ``x0`` estimate to ``[-clip_x0, clip_x0]`` (None: no clipping).
            generator: random generator for ``eps`` of eq. 12 and the sampler noise.

        Returns:
            ``[(t, x_t), ...]``: the start ``(T, x_T)`` followed by one state per update, ending with
            ``(-1, x_0)``; ``steps + 1`` entries for DDIM, ``T + 2`` for DDPM.

        Raises:
            ValueError: bad ``T``, ``steps`` or ``sampler``.
        """
        self._check(moving, fixed)
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        if int(T) != T or not 0 <= T < self.schedule.num_timesteps:
            raise ValueError(f"T must be an integer in [0, {self.schedule.num_timesteps - 1}], got {T}")
        T = int(T)
        noise = torch.randn(moving.shape, generator=generator, device=moving.device, dtype=moving.dtype)
        t0 = torch.full((moving.shape[0],), T, device=moving.device, dtype=torch.long)
        x_T = self.schedule.q_sample(moving, t0, noise).to(moving.dtype)  # eq. 12

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.score(moving, fixed, x_t, t).to(x_t.dtype)

        if sampler == "ddim":
            chain = ddim_sample(eps_fn, x_T, self.schedule, steps, eta=eta, generator=generator, clip_x0=clip_x0,
                                start_t=T)
        else:
            chain = ddpm_sample(eps_fn, x_T, self.schedule, generator=generator, clip_x0=clip_x0, start_t=T)
        states: list[tuple[int, Tensor]] = [(T, x_T)]
        for step in chain:
            states.append((step.t_next, step.x_next))
        return states
