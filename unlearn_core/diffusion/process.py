r"""Forward (noising) processes and the surrogate targets of the forget loss.

Every process here is affine in the clean image:

.. math::  x_t = \alpha(t)\, x_0 + \sigma(t)\, \epsilon, \qquad t \in (0, 1]

where ``t`` is the *noise fraction* (0 = clean, 1 = pure noise) that the timestep weighting
:math:`\lambda(t)` reads. A process is the noise path (scales, training noise levels, sampling
grid); what the network predicts of that point (epsilon or v for DDPM, velocity
:math:`v = \epsilon - x_0` for rectified flow) is its :mod:`~unlearn_core.diffusion.prediction` type. The trainer works in the
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

from .prediction import Epsilon, FlowVelocity, Prediction, Velocity, per_sample

__all__ = ["ForwardProcess", "RectifiedFlow", "DDPMEpsilon", "DDPMVelocity", "ddpm_process", "x0_space_loss"]


class ForwardProcess(ABC):
    """An affine noising process: its scales, its training noise levels and the network's
    :class:`~unlearn_core.diffusion.prediction.Prediction` type, which owns every conversion between the
    native output and x0 (the methods below only hand it this process's scales).

    ``t`` is always a float tensor of shape (B,) in (0, 1].
    """

    #: smallest noise fraction the trainer samples: targets divide by sigma(t).
    t_min: float = 0.02
    #: what the network predicts
    prediction: Prediction

    @abstractmethod
    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (alpha(t), sigma(t)), each of shape (B,)."""

    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise fractions, shape (n,), in [t_min, 1]."""

    def predict_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate from the network's native output."""
        return self.prediction.to_x0(x_t, output, *self.scales(t))

    def output_target(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Native target that explains noisy ``x_t`` as coming from clean ``x0``.

        With the true clean image this is the ordinary training target (eps or v); with a
        surrogate it is the surrogate target of the forget loss.
        """
        return self.prediction.from_x0(x_t, x0, *self.scales(t))

    def x0_loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) with w * ||x0_hat - x0||^2 == ||output - output_target||^2, shape (B,)."""
        return self.prediction.loss_weight(*self.scales(t))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.scales(t)
        return per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * noise


class RectifiedFlow(ForwardProcess):
    """SD3's rectified flow: x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0.

    Training and sampling use SD3's shifted schedule s = k u / (1 + (k - 1) u) (k = ``shift``),
    and the network receives timestep = 1000 s. :meth:`sampling_ts` is its sampler's grid
    (:class:`~unlearn_core.diffusion.sampling.SamplingGrid`), apart from the noise path.
    """

    prediction = FlowVelocity()

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

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network receives: 1000 s."""
        return t * self.num_train_timesteps


class DDPMEpsilon(ForwardProcess):
    """Discrete DDPM with an epsilon-predicting network, for any ``alphas_cumprod`` schedule.

    Noise fraction t maps to the discrete timestep round(t * T) - 1, so t = 1 is the last
    training timestep and t -> 0 means clean. Build from a diffusers scheduler with
    :meth:`from_scheduler`. :meth:`sampling_ts` is its sampler's grid.
    """

    prediction = Epsilon()

    def __init__(self, alphas_cumprod: torch.Tensor, t_min: float | None = None):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D schedule with at least 2 steps")
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = len(alphas_cumprod)
        self.t_min = 1.0 / self.num_train_timesteps if t_min is None else float(t_min)

    @classmethod
    def from_scheduler(cls, scheduler) -> DDPMEpsilon:
        """From a diffusers DDPMScheduler/DDIMScheduler (any beta schedule) of this prediction type."""
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction != cls.prediction.name:
            raise ValueError(f"{cls.__name__} needs a scheduler with prediction_type={cls.prediction.name!r}, "
                             f"got {prediction!r} (ddpm_process picks the class by it)")  # fmt: skip
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

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network receives: the discrete index."""
        return self.timestep_index(t)


class DDPMVelocity(DDPMEpsilon):
    """Discrete DDPM with a v-predicting network (SD 2.x 768-v, SDXL-v and v-prediction fine-tunes):
    the noise path and grid of :class:`DDPMEpsilon`, the :class:`~unlearn_core.diffusion.prediction.Velocity` output."""

    prediction = Velocity()


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
    docs/METHOD.md (eps or v space), on the host (ComfyUI, whose model returns x0) as in the library.
    """
    if x0_hat.shape != x0_target.shape:
        raise ValueError(f"prediction {tuple(x0_hat.shape)} and target {tuple(x0_target.shape)} differ")
    mse = (x0_hat.float() - x0_target.float()).pow(2).flatten(1).mean(dim=1)
    return weight.to(mse) * mse
