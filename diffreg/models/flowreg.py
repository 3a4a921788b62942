"""FlowReg (Fu, Bai, Yan, Clarkson, Davies, Hu, arXiv 2603.01073, 2026): flow matching in displacement-field space,
with warmup-reflow training and an Initial Guess at test time.

The paper's full text is not in this project: its abstract, and the official MIT code (``mathpluscode/FlowReg``,
``flowreg/networks.py``, ``flowreg/train.py``, ``flowreg/test.py``, ``flowreg/train.yaml``, commit 286411e) are the
sources of every fact below; the code was read, not copied. Explained in the book's FlowReg chapter.

Method, top to bottom:

1. **The state and the path.** A displacement field ``phi_t`` (voxels, ``(B, dims, *spatial)``) moves along a
   straight path from noise ``phi_0 = eps * s`` (``eps ~ N(0, I)``; per axis ``s = 5 min(spacing) / spacing``) at
   ``t = 0`` to the registration ``phi_1`` at ``t = 1``: ``phi_t = t phi_1 + (1 - t) phi_0``.
2. **The network** (:class:`FlowRegNet`) predicts the *final* field from ``(fixed, moving, phi_t, t)``
   (x1-prediction): CorrMLP's encoder and coarse-to-fine decoder (:mod:`diffreg.models.corrmlp`), with a sinusoidal
   time embedding (256 frequencies, an MLP to 64 channels) added, through one ``SiLU, Linear`` per level, to the
   moving image's features, and the current field ``phi_t``, brought to each level's grid, warping the coarsest
   moving features and added to the coarsest head's output. The velocity of the ODE is
   ``v = (phi1_hat - phi_t) / (1 - t)``. About 0.7 % more parameters than CorrMLP (the abstract's figure).
3. **Warmup** (a stage trained before the main loop, :meth:`FlowReg.stages`): the network is trained as a
   single-step registration, ``phi1_hat = net(fixed, moving, phi_0, t = 0)``, on NCC (window 9) plus
   ``reg_weight`` times the smoothness of ``phi1_hat`` (``corrmlp.physical_smoothness``). The official code: 2 of
   100 epochs.
4. **Reflow** (the main loop, :meth:`FlowReg.loss`): an EMA copy of the network (momentum 0.99, started from the
   warmup weights) maps the same noise to a target ``phi_1 = ema(fixed, moving, phi_0, 0)``; ``t`` is drawn from a
   logit-normal (``sigmoid(N(0, 1))``); the student predicts from ``phi_t = t phi_1 + (1 - t) phi_0`` and is trained
   on the registration loss of its prediction (NCC + smoothness). ``v_mse_weight`` adds the flow-matching term
   ``mean (v_hat - v)^2`` with ``v = phi_1 - phi_0``.
5. **Sampling** (:meth:`FlowReg.register`): Heun's method on ``t = 0, 1/S, ..., 1`` from noise (the corrector is
   skipped at the last step, where ``1 - t = 0``): ``2 S - 1`` network evaluations for ``S`` steps. **Initial
   Guess** (``initial_guess=True``, the official sampler's ``recycle``): after the first step the state is replaced
   by the first prediction itself, which is fed back as the starting point of the rest of the trajectory.

Deviations from the official code (stated again in the chapter):

* The official training script computes the velocity MSE and a warped-image NCC in the reflow phase but does not add
  them to the loss it back-propagates (``loss = loss_ncc + loss_reg``), although ``train.yaml`` sets
  ``v_mse_weight: 1.0``. ``v_mse_weight=0`` (our default) reproduces the script; the term is reported as ``v_mse``.
* ``p_uncond`` (0.1 in ``train.yaml``) is not used by the official training script; it is not implemented.
* Warmup is a stage with its own optimiser (Adam, constant rate); the official script keeps one Adam through both
  phases. The EMA teacher is updated at the start of each reflow step from the weights after the previous step,
  which is the official order (update after each step) shifted by one call.
* 2D as well as 3D; fields resampled with :func:`diffreg.spatial.resize_field` (see :mod:`diffreg.models.corrmlp`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffreg.config import MethodConfig, TrainConfig
from diffreg.models.base import RegistrationModel, RegistrationResult, Stage, StageBudget
from diffreg.models.corrmlp import ConvEncoder, CorrMLPDecoder, check_size, registration_loss
from diffreg.spatial import warp

__all__ = ["FlowReg", "FlowRegNet", "TimeEmbedding", "noise_scale", "ode_sample"]


# ----------------------------------------------------------------------------------------------------------------
# 2. The network
# ----------------------------------------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """``t`` (``(B,)`` in [0, 1]) -> ``(B, channels)``: ``[cos(t f_k), sin(t f_k)]`` for 128 frequencies
    ``f_k = 10000^(-k / 128)``, then ``Linear(256, channels), SiLU, Linear(channels, channels)``."""

    def __init__(self, channels: int = 64, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = int(frequencies)
        self.mlp = nn.Sequential(nn.Linear(frequencies, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
        args = t[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class FlowRegNet(nn.Module):
    """``(moving, fixed, phi_t, t) -> phi1_hat``: CorrMLP's encoder and decoder with the time embedding added to the
    moving features of every level and ``phi_t`` as the decoder's starting field."""

    def __init__(self, dims: int = 3, in_channels: int = 1, enc_channels: int = 8, dec_channels: int = 16,
                 time_channels: int = 64) -> None:
        super().__init__()
        self.encoder = ConvEncoder(dims, in_channels, enc_channels)
        self.decoder = CorrMLPDecoder(dims, enc_channels, dec_channels)
        self.time = TimeEmbedding(time_channels)
        self.time_to_level = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(time_channels, enc_channels * 2 ** i))
                                           for i in range(4))

    def forward(self, moving: Tensor, fixed: Tensor, field: Tensor, t: Tensor) -> Tensor:
        temb = self.time(t.to(field.dtype))
        dims = field.shape[1]
        offsets = [proj(temb).view(*temb.shape[:1], -1, *([1] * dims)) for proj in self.time_to_level]
        return self.decoder(self.encoder(fixed), self.encoder(moving), offsets, field)


def noise_scale(dims: int, spacing: Sequence[float] | None = None, factor: float = 5.0) -> Tensor:
    """Per-axis scale of the noise field ``(1, dims, 1, ...)``: ``factor * min(spacing) / spacing_i`` (voxels), so
    the noise is isotropic in millimetres; ``factor`` 5 as in the official code."""
    sp = [1.0] * dims if spacing is None else [float(s) for s in spacing]
    return torch.tensor([factor * min(sp) / s for s in sp]).view(1, dims, *([1] * dims))


def ode_sample(predict: Callable[[Tensor, float], Tensor], phi0: Tensor, steps: int, initial_guess: bool = False,
               heun: bool = True) -> list[Tensor]:
    """Integrate the flow ODE ``d phi / dt = (phi1_hat(phi, t) - phi) / (1 - t)`` from ``phi0`` at ``t = 0`` to
    ``t = 1`` on ``steps`` equal steps, with x1-prediction ``predict(phi, t)``.

    Heun's method (``heun=True``): an Euler predictor, then the mean of the two velocities; the corrector is skipped
    at the last step, where ``1 - t = 0`` (the official sampler; ``2 steps - 1`` calls of ``predict``). Euler's method
    (``heun=False``): ``steps`` calls. ``initial_guess``: after the first step the state is replaced by that step's
    prediction. Used by :meth:`FlowReg.sample` and by the chapter's toy problem.

    Returns:
        The prediction of each step (the last one is the end point of the path).
    """
    ts = torch.linspace(0, 1, int(steps) + 1).tolist()
    phi, preds = phi0, []
    for i in range(int(steps)):
        t0, t1 = ts[i], ts[i + 1]
        pred = predict(phi, t0)
        delta = (pred - phi) / max(1.0 - t0, 1e-5) * (t1 - t0)
        if heun and i < steps - 1:   # Heun's corrector (skipped at the last step, where 1 - t1 = 0)
            nxt = phi + delta
            pred = predict(nxt, t1)
            delta = (delta + (pred - nxt) / max(1.0 - t1, 1e-5) * (t1 - t0)) / 2
        phi = pred if (initial_guess and i == 0) else phi + delta
        preds.append(pred)
    return preds


# ----------------------------------------------------------------------------------------------------------------
# 3-5. Warmup, reflow, sampling
# ----------------------------------------------------------------------------------------------------------------
class _Warmup(nn.Module):
    """The warmup objective: single-step registration from noise at ``t = 0``."""

    def __init__(self, model: "FlowReg") -> None:
        super().__init__()
        self.net = model.net   # the only submodule: the stage trains the network (the EMA teacher starts from it)
        self.noise_like, self.registration_loss = model.noise_like, model.registration_loss

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        moving, fixed = batch["moving"], batch["fixed"]
        phi0 = self.noise_like(moving)
        pred = self.net(moving, fixed, phi0, torch.zeros(moving.shape[0], device=moving.device))
        return self.registration_loss(moving, fixed, pred)


class FlowReg(RegistrationModel):
    """FlowReg as a :class:`~diffreg.models.RegistrationModel` (module docstring).

    Args:
        dims: 2 or 3 (the official code: 3).
        in_channels, enc_channels, dec_channels, time_channels: 1, 8, 16, 64 (``flowreg/train.yaml``).
        ncc_window, reg_weight, spacing: the registration loss (as :class:`~diffreg.models.corrmlp.CorrMLP`: 9, 1.0).
        ema_momentum: momentum of the EMA teacher (0.99).
        v_mse_weight: weight of the velocity MSE in the reflow loss (0: the official script; see the deviations).
        noise_factor: the noise's scale in voxels along the finest axis (5).
        warmup_steps, warmup_lr, warmup_batch: the warmup stage (Adam, constant rate).
        warmup_seed: seed of the warmup stage (``None``: the run's).
        sample_steps: default number of ODE steps of :meth:`register` (5, ``num_inference_steps``).
        initial_guess: default of :meth:`register`'s Initial Guess.

    Raises:
        ValueError: ``dims`` not 2 or 3, or a bad option.
    """

    stage_budgets = (StageBudget("warmup", "warmup_steps", "warmup_batch"),)

    def __init__(self, dims: int = 3, in_channels: int = 1, enc_channels: int = 8, dec_channels: int = 16,
                 time_channels: int = 64, ncc_window: int = 9, reg_weight: float = 1.0,
                 spacing: Sequence[float] | None = None, ema_momentum: float = 0.99, v_mse_weight: float = 0.0,
                 noise_factor: float = 5.0, warmup_steps: int = 1000, warmup_lr: float = 1e-4, warmup_batch: int = 4,
                 warmup_seed: int | None = None, sample_steps: int = 5, initial_guess: bool = False) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if not 0.0 <= ema_momentum < 1.0 or int(sample_steps) < 1:
            raise ValueError(f"need 0 <= ema_momentum < 1 and sample_steps >= 1, got {ema_momentum}, {sample_steps}")
        self.dims = dims
        self.ncc_window, self.reg_weight = int(ncc_window), float(reg_weight)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.ema_momentum, self.v_mse_weight = float(ema_momentum), float(v_mse_weight)
        self.noise_factor = float(noise_factor)
        self.warmup = dict(steps=int(warmup_steps), lr=float(warmup_lr), batch=int(warmup_batch), seed=warmup_seed)
        self.sample_steps, self.initial_guess = int(sample_steps), bool(initial_guess)
        self.net = FlowRegNet(dims, in_channels, enc_channels, dec_channels, time_channels)
        #: the EMA teacher of the reflow phase (frozen; in the state_dict, so a checkpoint carries it)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("warmup_done", torch.tensor(False))
        self.register_buffer("noise_std", noise_scale(dims, spacing, noise_factor))

    def registration_loss(self, moving: Tensor, fixed: Tensor, ddf: Tensor) -> dict[str, Tensor]:
        """:func:`diffreg.models.corrmlp.registration_loss` with this model's settings."""
        return registration_loss(moving, fixed, ddf, self.ncc_window, self.reg_weight, self.spacing)

    def num_parameters(self) -> int:
        """Parameters of the network (the EMA teacher is a copy, not counted)."""
        return sum(p.numel() for p in self.net.parameters())

    def train(self, mode: bool = True) -> "FlowReg":
        super().train(mode)
        self.ema.eval()
        return self

    def noise_like(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A noise field ``phi_0`` for ``image`` ``(B, 1, *spatial)``: ``(B, dims, *spatial)``, voxels."""
        shape = (image.shape[0], self.dims, *image.shape[2:])
        eps = torch.randn(shape, generator=generator, device="cpu" if generator is not None else image.device)
        return eps.to(image.device, image.dtype) * self.noise_std.to(image.device, image.dtype)

    # ---- 3. warmup -----------------------------------------------------------------------------------------------
    def stages(self, seed: int = 0) -> list[Stage]:
        """The warmup, a stage trained before the main loop (none once done): ``warmup_steps`` steps of
        ``warmup_batch`` pairs, Adam at ``warmup_lr`` (constant), the gradient norm clipped at 1 (as the official
        script does in both phases), seeded by ``warmup_seed`` or the run's ``seed``; the network is not frozen after
        it."""
        if bool(self.warmup_done):
            return []
        w = self.warmup
        steps = w["steps"]
        cfg = MethodConfig(method="flowreg", profile="warmup",
                           model={"dims": self.dims, "warmup_steps": steps},
                           train=TrainConfig(steps=steps, lr=w["lr"], batch_size=w["batch"], scheduler="constant",
                                             grad_clip=1.0, seed=int(seed if w["seed"] is None else w["seed"]),
                                             log_every=max(1, steps // 50),
                                             checkpoint_every=max(1, min(500, steps // 4))),
                           source="FlowReg warmup (flowreg/train.py: single-step registration from noise at t = 0)")
        return [Stage("warmup", _Warmup(self), cfg, done=self._warmup_done, frozen=False)]

    def _warmup_done(self, rows: list[dict[str, Any]]) -> None:
        """Start the EMA teacher from the warmup weights."""
        self.ema.load_state_dict(self.net.state_dict())
        self.warmup_done.fill_(True)

    # ---- 4. reflow ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        m = self.ema_momentum
        for t, s in zip(self.ema.parameters(), self.net.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The reflow loss (module docstring, 4): the registration loss of the student's prediction from a point of
        the straight path to the EMA teacher's field, plus ``v_mse_weight`` times the velocity MSE."""
        moving, fixed = batch["moving"], batch["fixed"]
        b = moving.shape[0]
        if self.training:
            self._update_ema()
        phi0 = self.noise_like(moving)
        with torch.no_grad():
            target = self.ema(moving, fixed, phi0, torch.zeros(b, device=moving.device))
        t = torch.sigmoid(torch.randn(b, device=moving.device))
        tt = t.view(b, *([1] * (moving.ndim - 1)))
        phi_t = tt * target + (1 - tt) * phi0
        pred = self.net(moving, fixed, phi_t, t)
        terms = self.registration_loss(moving, fixed, pred)
        v_mse = ((pred - target) ** 2).mean()   # (pred - phi0) - (target - phi0)
        terms["v_mse"] = v_mse
        if self.v_mse_weight:
            terms["total"] = terms["total"] + self.v_mse_weight * v_mse
        return terms

    # ---- 5. sampling ----------------------------------------------------------------------------------------------
    def forward(self, moving: Tensor, fixed: Tensor, steps: int | None = None, initial_guess: bool | None = None,
                generator: torch.Generator | None = None, heun: bool = True) -> Tensor:
        """The registration field ``(B, dims, *spatial)`` in voxels (:meth:`sample`'s last prediction)."""
        return self.sample(moving, fixed, steps, initial_guess, generator, heun)[-1]

    @torch.no_grad()
    def sample(self, moving: Tensor, fixed: Tensor, steps: int | None = None, initial_guess: bool | None = None,
               generator: torch.Generator | None = None, heun: bool = True) -> list[Tensor]:
        """Heun's method from noise at ``t = 0`` to ``t = 1`` in ``steps`` steps; the prediction ``phi1_hat`` of each
        step (the last is the registration). ``initial_guess``: after the first step the state becomes its
        prediction (Initial Guess). ``2 steps - 1`` network evaluations; ``heun=False``: Euler's method (the official
        sampler's ``no_heun``), ``steps`` evaluations."""
        check_size(moving, fixed, self.dims, "FlowReg")
        steps = int(self.sample_steps if steps is None else steps)
        guess = self.initial_guess if initial_guess is None else bool(initial_guess)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        b = moving.shape[0]

        def predict(phi: Tensor, t: float) -> Tensor:
            return self.net(moving, fixed, phi, torch.full((b,), t, device=phi.device))

        return ode_sample(predict, self.noise_like(moving, generator), steps, guess, heun)

    @torch.no_grad()
    def register(self, moving: Tensor, fixed: Tensor, steps: int | None = None, initial_guess: bool | None = None,
                 generator: torch.Generator | None = None, heun: bool = True, **options: Any) -> RegistrationResult:
        """Register with :meth:`sample`; ``extras``: ``trajectory`` (every step's prediction), ``steps``,
        ``evaluations`` (network calls)."""
        if options:
            raise ValueError(f"unknown FlowReg.register options {sorted(options)} "
                             "(steps, initial_guess, generator, heun)")
        preds = self.sample(moving, fixed, steps, initial_guess, generator, heun)
        ddf = preds[-1]
        calls = 2 * len(preds) - 1 if heun else len(preds)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf),
                                  extras={"trajectory": preds, "steps": len(preds), "evaluations": calls})
