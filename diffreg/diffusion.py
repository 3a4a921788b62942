"""Denoising diffusion: noise schedules, the forward process, x0/eps conversions and DDPM / DDIM samplers.

Explained in chapter 03 (``notebooks/03_ddpm.md``). Notation (Ho et al. 2020, "DDPM"; Song et al. 2021,
"DDIM"): ``beta_t`` the noise schedule, ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``, timesteps
``t = 0 ... T-1`` (0-based, as in diffusers / MONAI), ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

The samplers are generators that yield a :class:`SamplerStep` after every update, so a chapter can draw the
trajectory; :func:`final` runs one to the end and returns the sample. The model is any callable
``eps_fn(x_t, t) -> eps_hat`` with ``t`` a ``LongTensor (B,)`` on the device of ``x_t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor

__all__ = [
    "linear_beta_schedule", "cosine_beta_schedule", "NoiseSchedule", "q_sample", "predict_x0", "SamplerStep",
    "ddpm_sample", "ddim_sample", "ddim_invert", "ddim_timesteps", "final", "ldm_schedule",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]
ShapeOrTensor = Union[Sequence[int], Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------

def linear_beta_schedule(start: float = 1e-6, end: float = 1e-2, steps: int = 2000) -> Tensor:
    """Betas linear in ``t``: ``beta_t = start + (end - start) t / (T - 1)`` (DDPM sec. 4), float64.

    The defaults are DiffuseMorph's / FSDiffReg's schedule (T = 2000, 1e-6 ... 1e-2). Same values as MONAI
    ``DDPMScheduler(schedule="linear_beta")`` (which is linear in beta, computed in float32).

    Raises:
        ValueError: if ``steps < 1`` or the betas are not in (0, 1).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}.")
    if not (0 < start < 1 and 0 < end < 1):
        raise ValueError(f"beta start and end must lie in (0, 1), got {start}, {end}.")
    return torch.linspace(start, end, int(steps), dtype=torch.float64)


def cosine_beta_schedule(steps: int, s: float = 0.008) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ``abar(t) = f(t) / f(0)``,
    ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, ``beta_t = 1 - abar_{t+1} / abar_t`` clipped to 0.999, float64.

    Raises:
        ValueError: if ``steps < 1`` or ``s < 0``.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}.")
    if s < 0:
        raise ValueError(f"s must be non-negative, got {s}.")
    x = torch.linspace(0, int(steps), int(steps) + 1, dtype=torch.float64)
    f = torch.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(min=0.0, max=0.999)


def _extract(v: Tensor, t: Tensor, ref: Tensor) -> Tensor:
    """``v[t]`` reshaped to ``(B, 1, ..., 1)`` to broadcast over ``ref`` (``(B, ...)``), in ``ref``'s dtype/device."""
    t = torch.as_tensor(t, device=v.device).long()
    if t.ndim == 0:
        t = t.expand(ref.shape[0])
    if t.ndim != 1 or t.shape[0] != ref.shape[0]:
        raise ValueError(f"t must be a LongTensor of shape (B,) = ({ref.shape[0]},), got shape {tuple(t.shape)}.")
    if bool((t < 0).any()) or bool((t >= v.shape[0]).any()):
        raise ValueError(f"timesteps must lie in [0, {v.shape[0] - 1}], got {t.tolist()}.")
    out = v[t].to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    return out.view(-1, *([1] * (ref.ndim - 1)))


class NoiseSchedule:
    """All the per-timestep quantities of a DDPM, built from ``betas`` (float64 tensors of shape ``(T,)``).

    Attributes: ``betas``, ``alphas``, ``alphas_cumprod`` (``abar_t``), ``alphas_cumprod_prev`` (``abar_{t-1}``,
    1 at ``t = 0``), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``,
    ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance`` (``beta~_t``, DDPM eq. 7; 0 at ``t = 0``),
    ``posterior_mean_coef1`` and ``posterior_mean_coef2``.

    Explained in chapter 03. ``t`` arguments are ``LongTensor (B,)`` (or an int) and broadcast over any
    ``(B, ...)`` tensor; results take the dtype and device of the data.

    Args:
        betas: ``(T,)`` noise variances in (0, 1).

    Raises:
        ValueError: if ``betas`` is not 1D or has values outside (0, 1).
    """

    def __init__(self, betas: Tensor | Sequence[float]) -> None:
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1D sequence, got shape {tuple(b.shape)}.")
        if bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ValueError("betas must lie strictly between 0 and 1.")
        self.betas = b
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # constructors -------------------------------------------------------------------------------------------------
    @classmethod
    def linear(cls, start: float = 1e-6, end: float = 1e-2, steps: int = 2000) -> "NoiseSchedule":
        """Schedule of :func:`linear_beta_schedule`."""
        return cls(linear_beta_schedule(start, end, steps))

    @classmethod
    def cosine(cls, steps: int, s: float = 0.008) -> "NoiseSchedule":
        """Schedule of :func:`cosine_beta_schedule`."""
        return cls(cosine_beta_schedule(steps, s))

    @property
    def num_timesteps(self) -> int:
        """``T``, the number of diffusion steps."""
        return int(self.betas.shape[0])

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_timesteps}, beta=[{float(self.betas[0]):.3g}, "
                f"{float(self.betas[-1]):.3g}], abar_T={float(self.alphas_cumprod[-1]):.3g})")

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy with every tensor on ``device`` (still float64)."""
        new = object.__new__(NoiseSchedule)
        for k, v in vars(self).items():
            setattr(new, k, v.to(device) if isinstance(v, torch.Tensor) else v)
        return new

    # forward process ----------------------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample ``q(x_t | x0)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (DDPM eq. 4).

        Args:
            x0: ``(B, ...)`` clean data.
            t: ``LongTensor (B,)`` timesteps in ``[0, T-1]``.
            noise: ``eps`` with the shape of ``x0``; drawn from N(0, I) with ``generator`` if omitted.
            generator: random generator for ``noise``.

        Raises:
            ValueError: on a bad ``t`` or a ``noise`` of the wrong shape.
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}.")
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert eq. 4 for ``x0``: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Invert eq. 4 for ``eps``: ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        num = x_t - _extract(self.sqrt_alphas_cumprod, t, x_t) * x0
        return num / _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x0)`` (DDPM eqs. 6-7).

        ``mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t``,
        ``var = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (0 at ``t = 0``, where the mean is ``x0``).

        Returns:
            ``(mean, var)``; ``var`` is ``(B, 1, ..., 1)``.
        """
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t)

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (float64, shape of ``t``)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        a = self.alphas_cumprod[t]
        return a / (1.0 - a)


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Functional form of :meth:`NoiseSchedule.q_sample` (DDPM eq. 4)."""
    return schedule.q_sample(x0, t, noise, generator)


def ldm_schedule(start: float = 0.0015, end: float = 0.0195, steps: int = 1000) -> NoiseSchedule:
    """LDM's noise schedule (eq. 1-3): ``beta_t = (sqrt(start) + (sqrt(end) - sqrt(start)) t / (T - 1))^2``.

    The defaults are the official LDM configuration (``linear_start 0.0015, linear_end 0.0195, timesteps 1000``;
    T = 1000 is in sec. 3.2). Used by LDM-Morph; explained in chapter 07.

    Raises:
        ValueError: bad end points or ``steps``.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not 0 < start < 1 or not 0 < end < 1:
        raise ValueError(f"start and end must lie in (0, 1), got {start}, {end}")
    betas = torch.linspace(math.sqrt(start), math.sqrt(end), int(steps), dtype=torch.float64) ** 2
    return NoiseSchedule(betas)


def predict_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Functional form of :meth:`NoiseSchedule.predict_x0`."""
    return schedule.predict_x0(x_t, t, eps)


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------

class SamplerStep(NamedTuple):
    """One update of a sampler.

    Attributes:
        t: timestep of ``x_t``, the state the model was evaluated on.
        x_t: the state before the update.
        x0_hat: the model's estimate of ``x0`` from ``x_t`` (after clipping, if any).
        t_next: timestep of ``x_next`` (-1 means the clean sample ``x0``; larger than ``t`` when inverting).
        x_next: the state after the update (``x_{t-1}``, the next strided state, or the final sample).
    """

    t: int
    x_t: Tensor
    x0_hat: Tensor
    t_next: int
    x_next: Tensor


def final(sampler: Iterator[SamplerStep]) -> Tensor:
    """Run a sampler generator to the end and return the last ``x_next`` (the sample)."""
    last = None
    for last in sampler:
        pass
    if last is None:
        raise ValueError("the sampler yielded no step.")
    return last.x_next


def _initial_state(shape_or_xT: ShapeOrTensor, generator: torch.Generator | None,
                   device: torch.device | str | None) -> Tensor:
    if isinstance(shape_or_xT, torch.Tensor):
        return shape_or_xT if device is None else shape_or_xT.to(device)
    shape = tuple(int(s) for s in shape_or_xT)
    if len(shape) < 1 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a sequence of positive sizes, got {shape}.")
    if device is None and generator is not None:
        device = generator.device
    return torch.randn(shape, generator=generator, device=device)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_start(schedule: NoiseSchedule, start_t: int | None) -> int:
    T = schedule.num_timesteps
    if start_t is None:
        return T - 1
    if int(start_t) != start_t or not 0 <= start_t < T:
        raise ValueError(f"start_t must be an integer in [0, {T - 1}], got {start_t}.")
    return int(start_t)


def _model_x0(eps_fn: EpsFn, schedule: NoiseSchedule, x: Tensor, t: int,
              clip_x0: float | None) -> tuple[Tensor, Tensor]:
    """Evaluate the model at ``(x, t)``; return ``(eps_hat, x0_hat)``, re-deriving ``eps`` if ``x0`` is clipped."""
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps = eps_fn(x, tb)
    if eps.shape != x.shape:
        raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}.")
    x0 = schedule.predict_x0(x, tb, eps)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = schedule.predict_eps(x, tb, x0)
    return eps, x0


def ddpm_sample(eps_fn: EpsFn, shape_or_xT: ShapeOrTensor, schedule: NoiseSchedule,
                generator: torch.Generator | None = None, clip_x0: float | None = None,
                device: torch.device | str | None = None, start_t: int | None = None) -> Iterator[SamplerStep]:
    """Ancestral DDPM sampling (DDPM algorithm 2) with the posterior variance ``beta~_t``.

    For ``t = start_t, ..., 0``: ``x0_hat = predict_x0(x_t, t, eps_fn(x_t, t))``, then
    ``x_{t-1} = posterior_mean(x0_hat, x_t, t) + sqrt(beta~_t) z`` with ``z ~ N(0, I)`` (no noise at ``t = 0``,
    where the posterior mean is ``x0_hat``). Yields one :class:`SamplerStep` per ``t``; the last ``x_next`` is
    the sample. No clipping of ``x0_hat`` unless ``clip_x0`` is given.

    Explained in chapter 03.

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps_hat``, ``t`` a ``LongTensor (B,)``.
        shape_or_xT: shape of ``x_T`` (drawn from N(0, I)), or the starting state itself (``x_T``, or
            ``x_{start_t}`` when ``start_t`` is given, e.g. a forward-diffused image as in DiffuseMorph).
        schedule: the noise schedule.
        generator: random generator (for ``x_T`` and every ``z``).
        clip_x0: clamp ``x0_hat`` to ``[-clip_x0, clip_x0]`` (None: no clipping).
        device: device for a drawn ``x_T`` (default: the generator's device, else CPU).
        start_t: timestep of the starting state (default ``T - 1``).

    Raises:
        ValueError: on a bad ``start_t``, shape, or ``eps_fn`` output shape.
    """
    t_start = _check_start(schedule, start_t)
    x = _initial_state(shape_or_xT, generator, device)
    for t in range(t_start, -1, -1):
        eps, x0 = _model_x0(eps_fn, schedule, x, t, clip_x0)
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        mean, var = schedule.posterior(x0, x, tb)
        x_next = mean + var.sqrt() * _randn_like(x, generator) if t > 0 else mean
        yield SamplerStep(t, x, x0, t - 1, x_next)
        x = x_next


def ddim_timesteps(schedule: NoiseSchedule, steps: int, start_t: int | None = None) -> list[int]:
    """The ``steps`` strided timesteps used by :func:`ddim_sample`, decreasing from ``start_t`` (default
    ``T - 1``) to 0, evenly spaced (``round(linspace(start_t, 0, steps))``).

    Raises:
        ValueError: if ``steps`` is not in ``[1, start_t + 1]``.
    """
    t_start = _check_start(schedule, start_t)
    if int(steps) != steps or not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must be an integer in [1, {t_start + 1}], got {steps}.")
    if steps == 1:
        return [t_start]
    ts = torch.linspace(t_start, 0, int(steps), dtype=torch.float64).round().long().tolist()
    return [int(t) for t in ts]


def _abar(schedule: NoiseSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def ddim_sample(eps_fn: EpsFn, shape_or_xT: ShapeOrTensor, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None, clip_x0: float | None = None,
                device: torch.device | str | None = None, start_t: int | None = None) -> Iterator[SamplerStep]:
    """DDIM sampling (DDIM eq. 12) on ``steps`` evenly strided timesteps (:func:`ddim_timesteps`).

    From ``t`` to the next strided ``s < t`` (``s = -1`` after the last, with ``abar_{-1} = 1``)::

        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)      (DDIM eq. 16)

    ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's variance. The last step returns ``x0_hat``.

    Explained in chapter 03.

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps_hat``.
        shape_or_xT: shape of ``x_T`` or the starting state (``x_{start_t}`` when ``start_t`` is given).
        schedule: the noise schedule.
        steps: number of model evaluations.
        eta: stochasticity (>= 0).
        generator: random generator (``x_T`` and, for ``eta > 0``, the ``z``).
        clip_x0: clamp ``x0_hat`` (None: no clipping).
        device: device for a drawn ``x_T``.
        start_t: timestep of the starting state (default ``T - 1``); e.g. DiffuseMorph's synthesis forward-diffuses
            to ``t = 200`` and reverses in 80 strided steps.

    Raises:
        ValueError: on bad ``steps``, ``eta``, ``start_t`` or shapes.
    """
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}.")
    ts = ddim_timesteps(schedule, steps, start_t)
    x = _initial_state(shape_or_xT, generator, device)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = _model_x0(eps_fn, schedule, x, t, clip_x0)
        a_t, a_s = _abar(schedule, t), _abar(schedule, s)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(max(1 - a_t / a_s, 0.0))
        x_next = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x_next = x_next + sigma * _randn_like(x, generator)
        yield SamplerStep(t, x, x0, s, x_next)
        x = x_next


def ddim_invert(eps_fn: EpsFn, x0: Tensor, schedule: NoiseSchedule, steps: int,
                end_t: int | None = None) -> Iterator[SamplerStep]:
    """Deterministic DDIM inversion: run the ``eta = 0`` DDIM update upwards, from ``x0`` to ``x_{end_t}``.

    The timesteps are those of :func:`ddim_timesteps` (``steps``, ``end_t``) in increasing order
    ``0 = tau_0 < ... < tau_{S-1} = end_t``; the state ``x`` at level ``tau_{k-1}`` (``x0`` at level -1) goes to
    ``x_{tau_k} = sqrt(abar_{tau_k}) x0_hat + sqrt(1 - abar_{tau_k}) eps_hat``, with ``eps_hat = eps_fn(x, tau_{k-1})``
    evaluated at the state's own level (the clean ``x0`` is evaluated at ``t = 0``). This is the explicit-Euler
    inverse of :func:`ddim_sample` with ``eta = 0`` on the same timesteps, so ``ddim_sample`` from the result
    approximately returns ``x0`` (exactly in the limit of small steps). Used by LDM-Morph (chapter 07).

    Explained in chapter 03.

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps_hat``.
        x0: ``(B, ...)`` clean data.
        schedule: the noise schedule.
        steps: number of model evaluations.
        end_t: timestep of the final noisy state (default ``T - 1``).

    Yields:
        :class:`SamplerStep` with ``t`` the level of ``x_t`` (-1 for ``x0``) and ``t_next > t``.

    Raises:
        ValueError: on bad ``steps`` or ``end_t``.
    """
    ts = ddim_timesteps(schedule, steps, end_t)[::-1]
    x = x0
    prev = -1
    for t in ts:
        eps, x0_hat = _model_x0(eps_fn, schedule, x, max(prev, 0), None)
        if prev < 0:
            x0_hat = x  # level -1 is the clean image itself
        a_next = _abar(schedule, t)
        x_next = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps
        yield SamplerStep(prev, x, x0_hat, t, x_next)
        x, prev = x_next, t
