r"""Timestep-aware weights: :math:`\lambda(t)` and where each loss really acts over t.

docs/METHOD.md section 4: high-noise timesteps shape global structure, low-noise ones fine detail,
so forgetting is emphasised at high noise and remembering at low noise, per sample:

.. math::  L = \lambda(t)\, L_f + \rho_r(t)\, L_r

``t`` is the noise fraction in (0, 1] (for flow models it is s itself). Schedules are small
callables so the benchmark can compare them; :func:`make_weighting` builds one from config names.

**The effective weight.** Every loss here is an x0-space error times a per-sample weight
(:func:`unlearn_core.diffusion.process.x0_space_loss`). The native epsilon/velocity MSE is the x0 error
times :math:`w(t)` (:meth:`~unlearn_core.diffusion.process.ForwardProcess.x0_loss_weight`:
:math:`1/s^2` for rectified flow, the SNR :math:`\bar\alpha/(1-\bar\alpha)` for DDPM). The two
halves' x0 errors behave differently:

- remember: the model fits its own samples, so its x0 error shrinks with the noise like
  :math:`1/w(t)` and the native loss :math:`w(t)\,\lVert\hat x_0 - x_0\rVert^2` has about the same
  scale at every t. The native weight is the right one.
- forget: the surrogate differs from the target by a fixed image, so at low noise the x0 error
  is about :math:`\lVert x_f - \tilde x\rVert^2` whatever t is. In native form its weight is
  :math:`\lambda(t)\,w(t)`, which for flow goes like :math:`s^{\gamma - 2}`: forgetting would act
  mostly at LOW noise, the opposite of the paper's idea.

``forget_space="x0"`` therefore puts :math:`\lambda(t)` on the forget half's x0
error itself, so :math:`\lambda(t)` *is* the forget term's effective weight over t and rises
with noise; ``"native"`` keeps :math:`\lambda(t)\,w(t)` (the paper's loss read literally) for the
ablation. The remember half keeps its native weight times :math:`1 - \lambda(t)`
(``remember_weight="complement"``) or times 1 (``"full"``: remembering at full strength at
every t, so the keep term still holds a flag's identity at high noise).
``benchmarks/weight_profile.py`` measures where each half's gradient sits over t: with
``native`` most of the forget gradient comes from t < 0.5 on both embedded models, with ``x0`` it
rises with the noise.

Near t = 1 the noisy input carries almost nothing of the clean image, so the x0 prediction
there is the model's mean over everything it could be: pulling it towards one surrogate moves
that mean for every output of the same conditioning, not just the target. For epsilon models it
is also numerically extreme: the x0 error is recovered through :math:`1/\sqrt{\bar\alpha}`, and its
gradient swamps everything else. ``"min_snr"`` weights the forget x0 error by
:math:`\lambda(t)\,\min(\mathrm{SNR}(t), 1)` with :math:`\mathrm{SNR} = \alpha^2/\sigma^2`: Min-SNR
weighting with :math:`\gamma = 1` (Hang et al., 2023) under :math:`\lambda(t)`. It is
:math:`\lambda(t)` wherever the signal still dominates (flow: s <= 1/2) and falls to 0 as the
input becomes pure noise, so the forget term acts at middle noise, where an instance is still
told apart from its neighbours. It is UnlearnConfig's default (chosen by the fair benchmark's
rule, ``benchmarks/effectiveness.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TimestepWeighting",
    "ConstantWeighting",
    "PowerWeighting",
    "LossWeights",
    "make_weighting",
    "WEIGHTINGS",
    "FORGET_SPACES",
    "REMEMBER_WEIGHTS",
]

WEIGHTINGS = ("power", "constant")
FORGET_SPACES = ("x0", "min_snr", "native")
REMEMBER_WEIGHTS = ("full", "complement")


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


def make_weighting(name: str, gamma: float = 1.0, constant: float = 0.5) -> TimestepWeighting:
    if name == "power":
        return PowerWeighting(gamma)
    if name == "constant":
        return ConstantWeighting(constant)
    raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")


@dataclass(frozen=True)
class LossWeights:
    r"""Per-sample weights on the x0-space errors of ours' two halves.

    ``forget(t, w)`` and ``remember(t, w)`` take the noise fractions and the process's native
    weight :math:`w(t)` (forget also the SNR :math:`\alpha^2/\sigma^2`) and return what multiplies :math:`\lVert \hat x_0 - x_0^{target}\rVert^2`:

    - forget: :math:`\lambda(t)` (``forget_space="x0"``), :math:`\lambda(t)\,\min(\mathrm{SNR}(t), 1)`
      (``"min_snr"``) or :math:`\lambda(t)\, w(t)` (``"native"``);
    - remember: :math:`w(t)` (``remember_weight="full"``) or :math:`(1 - \lambda(t))\, w(t)`
      (``"complement"``).
    """

    weighting: TimestepWeighting
    forget_space: str = "x0"
    remember_weight: str = "full"

    def __post_init__(self):
        if self.forget_space not in FORGET_SPACES:
            raise ValueError(f"unknown forget_space {self.forget_space!r}; choose one of {', '.join(FORGET_SPACES)}")
        if self.remember_weight not in REMEMBER_WEIGHTS:
            raise ValueError(
                f"unknown remember_weight {self.remember_weight!r}; choose one of {', '.join(REMEMBER_WEIGHTS)}"
            )

    def forget(self, t: torch.Tensor, native: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        weight = self.weighting(t).to(native)
        if self.forget_space == "x0":
            return weight
        if self.forget_space == "min_snr":
            return weight * snr.to(native).clamp(max=1.0)
        return weight * native

    def remember(self, t: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
        if self.remember_weight == "full":
            return native
        return (1 - self.weighting(t).to(native)) * native
