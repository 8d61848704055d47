r"""What a network predicts (epsilon, v or flow velocity), and how that converts to the clean image.

A noisy point is :math:`x_t = \alpha x_0 + \sigma \epsilon` with the scales of a forward process
(:mod:`unlearn_core.diffusion.process`). The trainer works in the x0 form (docs/METHOD.md section 2), so
each prediction type says three things, for any (alpha, sigma):

- :meth:`Prediction.to_x0`: the clean-image estimate from the network's native output;
- :meth:`Prediction.from_x0`: the native output that explains ``x_t`` as made from a given clean
  image (the ordinary training target with the true image, the surrogate target with a surrogate);
- :meth:`Prediction.loss_weight`: :math:`w` with
  :math:`w \lVert \hat x_0 - x_0 \rVert^2 = \lVert \hat o - o \rVert^2` in the native output o.

The library's diffusers processes and the ComfyUI host use the same three objects, so both train
on the same targets and weights (the host writes its eps / v noise in sigma form, alpha = 1).

Example::

    prediction = FlowVelocity()
    alpha, sigma = 1 - t, t
    v_tilde = prediction.from_x0(x_t, surrogate, alpha, sigma)   # the surrogate velocity target
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["Prediction", "Epsilon", "Velocity", "FlowVelocity", "per_sample"]


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) broadcast against a batch (B, ...), on its device and dtype."""
    return values.to(like).reshape(-1, *([1] * (like.dim() - 1)))


class Prediction(ABC):
    """One parameterisation of the network's output; ``alpha`` and ``sigma`` have shape (B,)."""

    #: the name diffusers' schedulers and the reports use
    name: str

    @abstractmethod
    def to_x0(self, x_t: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate from the native output."""

    @abstractmethod
    def from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The native output that :meth:`to_x0` turns into ``x0`` (affine in x0)."""

    @abstractmethod
    def loss_weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """w, shape (B,), with w * ||x0_hat - x0||^2 == ||output_hat - output||^2."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Epsilon(Prediction):
    r""":math:`\epsilon`: :math:`\hat x_0 = (x_t - \sigma \hat\epsilon) / \alpha`."""

    name = "epsilon"

    def to_x0(self, x_t, output, alpha, sigma):
        return (x_t - per_sample(sigma, x_t) * output) / per_sample(alpha, x_t)

    def from_x0(self, x_t, x0, alpha, sigma):
        return (x_t - per_sample(alpha, x_t) * x0) / per_sample(sigma, x_t)

    def loss_weight(self, alpha, sigma):
        return (alpha / sigma) ** 2


class Velocity(Prediction):
    r"""v-prediction (SD 2.x 768-v, v fine-tunes of SD1.5 / SDXL):
    :math:`v = \bar\alpha \epsilon - \bar\sigma x_0` on the unit-variance point
    :math:`x_t / r = \bar\alpha x_0 + \bar\sigma \epsilon`, with :math:`r = \sqrt{\alpha^2 + \sigma^2}`,
    :math:`\bar\alpha = \alpha / r`, :math:`\bar\sigma = \sigma / r`. For a variance-preserving DDPM
    r = 1; ComfyUI's sigma form (alpha = 1) is its ``V_PREDICTION`` with sigma_data 1."""

    name = "v_prediction"

    @staticmethod
    def _unit(alpha, sigma):
        norm = (alpha**2 + sigma**2).sqrt()
        return alpha / norm, sigma / norm, norm

    def to_x0(self, x_t, output, alpha, sigma):
        a, s, norm = self._unit(alpha, sigma)
        return per_sample(a / norm, x_t) * x_t - per_sample(s, x_t) * output

    def from_x0(self, x_t, x0, alpha, sigma):
        a, s, norm = self._unit(alpha, sigma)
        return (per_sample(a / norm, x_t) * x_t - x0) / per_sample(s, x_t)

    def loss_weight(self, alpha, sigma):
        _, s, _ = self._unit(alpha, sigma)
        return 1.0 / s**2


class FlowVelocity(Prediction):
    r"""Rectified-flow velocity :math:`v = \epsilon - x_0` (SD3, Flux, Qwen-Image, Z-Image), on
    :math:`x_t = (1 - \sigma) x_0 + \sigma \epsilon`: :math:`\hat x_0 = x_t - \sigma \hat v`. Written for
    any (alpha, sigma), :math:`\hat x_0 = (x_t - \sigma \hat v) / (\alpha + \sigma)`."""

    name = "flow"

    def to_x0(self, x_t, output, alpha, sigma):
        return (x_t - per_sample(sigma, x_t) * output) / per_sample(alpha + sigma, x_t)

    def from_x0(self, x_t, x0, alpha, sigma):
        return (x_t - per_sample(alpha + sigma, x_t) * x0) / per_sample(sigma, x_t)

    def loss_weight(self, alpha, sigma):
        return ((alpha + sigma) / sigma) ** 2
