r"""Forward (noising) processes and the surrogate targets of the forget loss.

Every process here is affine in the clean image:

.. math::  x_t = \alpha(t)\, x_0 + \sigma(t)\, \epsilon, \qquad t \in (0, 1]

where ``t`` is the *noise fraction* (0 = clean, 1 = pure noise) that the timestep weighting
:math:`\lambda(t)` reads. The network predicts some parameterisation of that point (epsilon for
DDPM, velocity :math:`v = \epsilon - x_0` for rectified flow); the trainer works in the
host-agnostic x0 form (docs/METHOD.md section 2): a denoiser returns :math:`\hat x_0` and the loss is
:math:`w(t)\,\lVert \hat x_0 - x_0^{target} \rVert^2`, where :math:`w(t)` is chosen so that this is
*exactly* the native epsilon- or velocity-space MSE.

The surrogate target (docs/METHOD.md section 3) is the native target that a clean image ``x~`` would
need to explain the noisy point made from the *forget* image:
:math:`\tilde\epsilon = (x_t^f - \alpha x~) / \sigma`; for flow :math:`\tilde v = (x_s^f - x~)/s`.
Denoising :math:`x_t^f` one exact step with that target lands on ``x~`` (tested).

Example::

    process = RectifiedFlow(shift=3.0)
    t = process.sample_t(4, generator=torch.Generator().manual_seed(0))
    x_t = process.add_noise(x_forget, noise, t)
    v_tilde = process.output_target(x_t, surrogate, t)      # surrogate velocity target
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["ForwardProcess", "RectifiedFlow", "DDPMEpsilon", "DDPMVelocity", "ddpm_process", "x0_space_loss"]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) broadcast against a batch (B, ...)."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class ForwardProcess(ABC):
    """An affine noising process with its network parameterisation.

    Subclasses define :meth:`scales` and how the network output relates to :math:`x_0`.
    ``t`` is always a float tensor of shape (B,) in (0, 1].
    """

    #: smallest noise fraction the trainer samples: targets divide by sigma(t).
    t_min: float = 0.02

    @abstractmethod
    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (alpha(t), sigma(t)), each of shape (B,)."""

    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise fractions, shape (n,), in [t_min, 1]."""

    @abstractmethod
    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the network was trained to receive for noise fraction ``t``."""

    @abstractmethod
    def predict_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate from the network's native output."""

    @abstractmethod
    def output_target(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Native target that explains noisy ``x_t`` as coming from clean ``x0``.

        With the true clean image this is the ordinary training target (eps or v); with a
        surrogate it is the surrogate target of the forget loss.
        """

    @abstractmethod
    def x0_loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) with w * ||x0_hat - x0||^2 == ||output - output_target||^2, shape (B,)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.scales(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise


class RectifiedFlow(ForwardProcess):
    """SD3's rectified flow: x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0.

    Training and sampling use SD3's shifted schedule s = k u / (1 + (k - 1) u) (k = ``shift``),
    and the network receives timestep = 1000 s. :meth:`sampling_ts` is its sampler's grid
    (:class:`~unlearn_core.sampling.SamplingGrid`), apart from the noise path.
    """

    def __init__(self, shift: float = 3.0, t_min: float = 0.02, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)
        self.t_min = float(t_min)
        self.num_train_timesteps = num_train_timesteps

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        k = self.shift
        return k * u / (1 + (k - 1) * u)

    def scales(self, t):
        return 1 - t, t

    def sample_t(self, n, generator=None):
        u = torch.rand(n, generator=generator)
        return self.shifted(u).clamp(min=self.t_min, max=1.0)

    def sampling_ts(self, steps: int, start: float = 1.0) -> torch.Tensor:
        """Decreasing noise fractions from ``start`` down to exactly 0, uniform in shifted time."""
        u_start = start / (self.shift - (self.shift - 1) * start)  # inverse of the shift
        return self.shifted(torch.linspace(u_start, 0.0, steps + 1))

    def model_timestep(self, t):
        return t * self.num_train_timesteps

    def predict_x0(self, x_t, output, t):
        return x_t - _expand(t, x_t) * output

    def output_target(self, x_t, x0, t):
        return (x_t - x0) / _expand(t, x_t)

    def x0_loss_weight(self, t):
        return 1.0 / t**2


class DDPMEpsilon(ForwardProcess):
    """Discrete DDPM with an epsilon-predicting network, for any ``alphas_cumprod`` schedule.

    Noise fraction t maps to the discrete timestep round(t * T) - 1, so t = 1 is the last
    training timestep and t -> 0 means clean. Build from a diffusers scheduler with
    :meth:`from_scheduler`. :meth:`sampling_ts` is its sampler's grid.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, t_min: float | None = None):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D schedule with at least 2 steps")
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = len(alphas_cumprod)
        self.t_min = 1.0 / self.num_train_timesteps if t_min is None else float(t_min)

    @classmethod
    def from_scheduler(cls, scheduler) -> DDPMEpsilon:
        """From a diffusers DDPMScheduler/DDIMScheduler (any beta schedule)."""
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"DDPMEpsilon needs an epsilon-prediction scheduler, got prediction_type={prediction!r}"
            )
        return cls(scheduler.alphas_cumprod)

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.num_train_timesteps).round().long().clamp(1, self.num_train_timesteps) - 1

    def scales(self, t):
        index = self.timestep_index(t)
        abar = torch.where(t > 0, self.alphas_cumprod[index], torch.ones_like(self.alphas_cumprod[index]))
        return abar.sqrt().float(), (1 - abar).sqrt().float()

    def sample_t(self, n, generator=None):
        low = max(1, int(round(self.t_min * self.num_train_timesteps)))
        index = torch.randint(low, self.num_train_timesteps + 1, (n,), generator=generator)
        return index.float() / self.num_train_timesteps

    def sampling_ts(self, steps: int, start: float = 1.0) -> torch.Tensor:
        """Decreasing noise fractions from ``start`` down to exactly 0, on the discrete timesteps."""
        top = max(1, int(round(start * self.num_train_timesteps)))
        index = torch.linspace(top, 0, steps + 1).round()
        return index / self.num_train_timesteps

    def model_timestep(self, t):
        return self.timestep_index(t)

    def predict_x0(self, x_t, output, t):
        alpha, sigma = self.scales(t)
        return (x_t - _expand(sigma, x_t) * output) / _expand(alpha, x_t)

    def output_target(self, x_t, x0, t):
        alpha, sigma = self.scales(t)
        return (x_t - _expand(alpha, x_t) * x0) / _expand(sigma, x_t)

    def x0_loss_weight(self, t):
        alpha, sigma = self.scales(t)
        return (alpha / sigma) ** 2


class DDPMVelocity(DDPMEpsilon):
    r"""Discrete DDPM with a v-predicting network (SD 2.x 768-v, SDXL-v and v-prediction fine-tunes):
    :math:`v = \alpha\,\epsilon - \sigma\,x_0`, so :math:`\hat x_0 = \alpha x_t - \sigma \hat v` and
    :math:`\lVert \hat v - v \rVert^2 = \lVert \hat x_0 - x_0 \rVert^2 / \sigma^2`. Same noise path and grid
    as :class:`DDPMEpsilon`."""

    @classmethod
    def from_scheduler(cls, scheduler) -> DDPMVelocity:
        """From a diffusers DDPMScheduler/DDIMScheduler with ``prediction_type="v_prediction"``."""
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction != "v_prediction":
            raise ValueError(f"DDPMVelocity needs a v-prediction scheduler, got prediction_type={prediction!r}")
        return cls(scheduler.alphas_cumprod)

    def predict_x0(self, x_t, output, t):
        alpha, sigma = self.scales(t)
        return _expand(alpha, x_t) * x_t - _expand(sigma, x_t) * output

    def output_target(self, x_t, x0, t):
        alpha, sigma = self.scales(t)
        return (_expand(alpha, x_t) * x_t - x0) / _expand(sigma, x_t)

    def x0_loss_weight(self, t):
        _, sigma = self.scales(t)
        return 1.0 / sigma**2


def ddpm_process(scheduler) -> DDPMEpsilon:
    """The process of a diffusers DDPM/DDIM scheduler, by its prediction type (epsilon or v)."""
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction == "v_prediction":
        return DDPMVelocity.from_scheduler(scheduler)
    return DDPMEpsilon.from_scheduler(scheduler)


def x0_space_loss(
    x0_hat: torch.Tensor, x0_target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Per-sample loss w(t) * mean((x0_hat - x0_target)^2), shape (B,).

    With the process's :meth:`ForwardProcess.x0_loss_weight` this equals the native MSE of
    docs/METHOD.md (eps or v space); a host that only exposes x0 predictions (ComfyUI) uses it as is,
    with its own weight 1 / sigma^2.
    """
    if x0_hat.shape != x0_target.shape:
        raise ValueError(f"prediction {tuple(x0_hat.shape)} and target {tuple(x0_target.shape)} differ")
    per_sample = (x0_hat.float() - x0_target.float()).pow(2).flatten(1).mean(dim=1)
    return weight.to(per_sample) * per_sample
