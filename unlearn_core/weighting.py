r"""Timestep-aware weights :math:`\lambda(t)` between the forget and the remember loss.

METHOD.md section 4: high-noise timesteps shape global structure, low-noise ones fine detail,
so forgetting is emphasised at high noise and remembering at low noise, per sample:

.. math::  L = \lambda(t)\, L_f + (1 - \lambda(t))\, L_r

``t`` is the noise fraction in (0, 1] (for flow models it is s itself). Schedules are small
callables so the benchmark can compare them; :func:`make_weighting` builds one from config names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TimestepWeighting", "ConstantWeighting", "PowerWeighting", "make_weighting", "WEIGHTINGS"]


class TimestepWeighting:
    """lambda(t) in [0, 1] for noise fractions t of shape (B,)."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class ConstantWeighting(TimestepWeighting):
    """lambda(t) = c: the ablation without timestep awareness."""

    value: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"constant lambda must lie in [0, 1], got {self.value}")

    def __call__(self, t):
        return torch.full_like(t, self.value, dtype=torch.float32)


@dataclass(frozen=True)
class PowerWeighting(TimestepWeighting):
    """lambda(t) = t ** gamma: gamma > 0 moves the forget emphasis towards high noise."""

    gamma: float = 1.0

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    def __call__(self, t):
        return t.float().clamp(0.0, 1.0) ** self.gamma


WEIGHTINGS = ("power", "constant")


def make_weighting(name: str, gamma: float = 1.0, constant: float = 0.5) -> TimestepWeighting:
    if name == "power":
        return PowerWeighting(gamma)
    if name == "constant":
        return ConstantWeighting(constant)
    raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
