r"""The unlearning objectives: ours (surrogate forget loss) and the baselines of docs/METHOD.md section 9.

Each objective describes one training step as a *forget half* and a *remember half* (the noisy
inputs of each and how to score the model's prediction on them, :class:`HalfBatch`) and says how
to combine the two gradients; the trainer decides how to run the halves (see
:mod:`unlearn_core.method.trainer`). All losses are computed in the host-agnostic x0 form
(:func:`unlearn_core.diffusion.process.x0_space_loss`), which equals the native epsilon/velocity MSE.

Ours (docs/METHOD.md sections 3-5), per sample with noise fraction t, :math:`\lambda(t)` and the
native weight :math:`w(t)` (:mod:`unlearn_core.method.weighting` says why the forget half drops it):

.. math::
    L_f = \lambda(t_f) \lVert \hat x_0(x_t^f) - \tilde x \rVert^2, \qquad
    L_r = w(t_r) \lVert \hat x_0(x_t^r) - x_0^r \rVert^2

where :math:`x_0^r` is the remember sample, or with ``remember_target="base"`` the frozen base
model's prediction :math:`\hat x_0^{base}(x_t^r)` at the same noisy input (the remember term is
then zero at the start and measures only the drift the adapter causes), and
:math:`g = \mathrm{surgery}(\mathrm{balance}(g_f, g_r), g_r)`. The loss reported for both
halves is always the native (eps/v) MSE, whatever the weights, so the curves stay comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..data.sets import UnlearnData
from ..diffusion.denoiser import Conditioning, Denoiser, select
from ..diffusion.noise import slerp
from ..diffusion.process import ForwardProcess, x0_space_loss
from .surgery import combine_gradients, dot
from .weighting import LossWeights

log = logging.getLogger(__name__)

__all__ = [
    "StepPlan",
    "HalfBatch",
    "BasePrediction",
    "Objective",
    "SurrogateUnlearning",
    "NegGrad",
    "EraseDiff",
    "SISS",
    "denoising_loss",
    "OBJECTIVES",
]


def denoising_loss(
    denoiser: Denoiser,
    process: ForwardProcess,
    noised: torch.Tensor,
    clean_target: torch.Tensor,
    cond: Conditioning,
    noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-sample loss of denoising ``noised`` (made noisy at t) towards ``clean_target``.

    ``noised == clean_target`` is the ordinary training loss; ``noised = target`` with
    ``clean_target = surrogate`` is the surrogate forget loss.
    """
    x_t = process.add_noise(noised, noise, t)
    x0_hat = denoiser.predict_x0(x_t, t, cond)
    return x0_space_loss(x0_hat, clean_target, process.x0_loss_weight(t))


@dataclass
class StepPlan:
    """The random draws of one step, made before any forward pass (so both passes agree)."""

    forget_index: torch.Tensor
    remember_index: torch.Tensor
    forget_t: torch.Tensor
    remember_t: torch.Tensor
    forget_noise: torch.Tensor
    remember_noise: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


Score = Callable[[torch.Tensor], tuple[torch.Tensor, float]]
#: base(x_t, t, cond) -> the frozen base model's x0 prediction (no gradient)
BasePrediction = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class HalfBatch:
    """One half of a step: noisy inputs at noise fractions ``t`` under ``cond``, and ``score``,
    which maps the model's x0 prediction for them to (loss to differentiate, error to report)."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: Conditioning
    score: Score

    def loss(self, denoiser: Denoiser) -> tuple[torch.Tensor, float]:
        return self.score(denoiser.predict_x0(self.x_t, self.t, self.cond))


def _weighted(target: torch.Tensor, native: torch.Tensor, weights: torch.Tensor | None = None, sign: float = 1.0) -> Score:
    """A score against x0 ``target``: differentiates sign * mean(weights * e) for the per-sample x0
    error e (``weights`` default to the native weight), and reports the native loss mean(native * e)."""

    def score(x0_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
        error = x0_space_loss(x0_hat, target, torch.ones_like(native))
        weighted = (native if weights is None else weights).to(error) * error
        return sign * weighted.mean(), float((native.to(error) * error).detach().mean())

    return score


class Objective:
    """One unlearning method: how to draw a step, its two halves, and the gradient combination."""

    name = "objective"

    def __init__(self, process: ForwardProcess, forget_batch: int, remember_batch: int):
        self.process = process
        self.forget_batch = forget_batch
        self.remember_batch = remember_batch
        #: the targets the forget draws come from (None: every one); the trainer narrows it to the
        #: targets still produced while the forgetting check finds others gone
        self.draw_from: torch.Tensor | None = None

    def draw_targets(self, data: UnlearnData, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` forget-set indices, uniform over :attr:`draw_from` (the same random draws
        whatever it holds, so narrowing it changes which targets, not the rest of the step)."""
        pool = self.draw_from
        index = torch.randint(len(data.forget) if pool is None else len(pool), (count,), generator=generator)
        return index if pool is None else pool[index]

    def plan(self, data: UnlearnData, generator: torch.Generator) -> StepPlan:
        shape = data.forget.targets.shape[1:]
        forget_index = self.draw_targets(data, self.forget_batch, generator)
        remember_index = torch.randint(len(data.remember), (self.remember_batch,), generator=generator)
        return StepPlan(
            forget_index=forget_index,
            remember_index=remember_index,
            forget_t=self.process.sample_t(self.forget_batch, generator),
            remember_t=self.process.sample_t(self.remember_batch, generator),
            forget_noise=torch.randn((self.forget_batch, *shape), generator=generator),
            remember_noise=torch.randn((self.remember_batch, *shape), generator=generator),
        )

    def _forget_batch(self, data: UnlearnData, plan: StepPlan):
        device = data.forget.targets.device
        index = plan.forget_index.to(device)
        return (
            data.forget.targets[index],
            data.forget.surrogates[index],
            select(data.forget.cond, index),
            plan.forget_noise.to(device, data.forget.targets.dtype),
            plan.forget_t.to(device),
        )

    def _remember_half(self, data: UnlearnData, plan: StepPlan, weights: Callable | None = None,
                       base: BasePrediction | None = None) -> HalfBatch:  # fmt: skip
        """The plain training loss on remember samples; ``weights(t, native)`` replaces the native
        weight, and with ``base`` the target is the base model's prediction at the same noisy input
        instead of the sample (so the loss is zero until the adapter moves that output)."""
        device = data.remember.samples.device
        index = plan.remember_index.to(device)
        samples = data.remember.samples[index]
        t = plan.remember_t.to(device)
        cond = select(data.remember.cond, index)
        x_t = self.process.add_noise(samples, plan.remember_noise.to(device, samples.dtype), t)
        target = samples if base is None else base(x_t, t, cond).detach().to(samples)
        native = self.process.x0_loss_weight(t)
        return HalfBatch(x_t, t, cond, _weighted(target, native, None if weights is None else weights(t, native)))

    def forget_half(self, data: UnlearnData, plan: StepPlan) -> HalfBatch:
        raise NotImplementedError

    def remember_half(self, data: UnlearnData, plan: StepPlan) -> HalfBatch:
        return self._remember_half(data, plan)

    def combine(self, forget: torch.Tensor, remember: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The update from the flat forget and remember gradients (plus stats for reporting)."""
        return forget + remember, {}


class SurrogateUnlearning(Objective):
    """Ours: surrogate forget loss, timestep-aware weighting, balance and gradient surgery."""

    name = "surrogate"

    def __init__(self, process, forget_batch, remember_batch, weights: LossWeights, surgery: str,
                 balance: str = "none", balance_ratio: float = 0.5, own_noise_spread: float | None = None,
                 remember_base: BasePrediction | None = None):  # fmt: skip
        super().__init__(process, forget_batch, remember_batch)
        self.remember_base = remember_base
        self.weights = weights
        self.surgery = surgery
        self.balance = balance
        self.balance_ratio = balance_ratio
        self.own_noise_spread = own_noise_spread
        self._told_fresh = False

    def plan(self, data, generator):
        """With ``own_noise_spread`` and the targets' own noise known, the forget draws are that
        noise slerped towards fresh noise by U(0, spread): points on and around the path that
        sampled the target, rather than anywhere on the noise shell. Near t = 1 every seed's path
        starts from noise that looks alike, so fresh draws there pull every output of the
        conditioning towards the surrogate; the target's own path is where it differs from them."""
        plan = super().plan(data, generator)
        if self.own_noise_spread is not None and data.forget.noise is None and not self._told_fresh:
            log.warning("forget_noise=own, but the targets' sampling noise is unknown (no seed recorded): "
                        "their forget draws use fresh noise")  # fmt: skip
            self._told_fresh = True
        if self.own_noise_spread is not None and data.forget.noise is not None:
            own = data.forget.noise[plan.forget_index.to(data.forget.noise.device)].cpu().float()
            weight = torch.rand(len(own), generator=generator) * self.own_noise_spread
            plan.forget_noise = slerp(own, plan.forget_noise, weight)
        return plan

    def forget_weights(self, t: torch.Tensor) -> torch.Tensor:
        """The per-sample weights of the forget half's x0 error at noise fractions t."""
        alpha, sigma = self.process.scales(t)
        return self.weights.forget(t, self.process.x0_loss_weight(t), (alpha / sigma) ** 2)

    def forget_half(self, data, plan):
        targets, surrogates, cond, noise, t = self._forget_batch(data, plan)
        native = self.process.x0_loss_weight(t)
        return HalfBatch(self.process.add_noise(targets, noise, t), t, cond,
                         _weighted(surrogates, native, self.forget_weights(t)))  # fmt: skip

    def remember_half(self, data, plan):
        return self._remember_half(data, plan, self.weights.remember, self.remember_base)

    def combine(self, forget, remember):
        return combine_gradients(forget, remember, self.surgery, self.balance, self.balance_ratio)


class NegGrad(Objective):
    """Gradient ascent on the forget set: minimise L_r - L_f (unstable by design)."""

    name = "neggrad"

    def forget_half(self, data, plan):
        targets, _, cond, noise, t = self._forget_batch(data, plan)
        return HalfBatch(self.process.add_noise(targets, noise, t), t, cond,
                         _weighted(targets, self.process.x0_loss_weight(t), sign=-1.0))  # fmt: skip


class EraseDiff(Objective):
    r"""EraseDiff, first-order: the forget sample's native target becomes unrelated noise,
    and :math:`g = g_r + \max(\eta - \langle g_r, g_f\rangle / \lVert g_f\rVert^2, 0)\, g_f`.

    ``noise="uniform"`` draws that noise from U(0, 1) as EraseDiff's paper and SISS's code do;
    ``"gaussian"`` from N(0, 1).
    """

    name = "erasediff"
    NOISES = ("gaussian", "uniform")

    def __init__(self, process, forget_batch, remember_batch, eta: float, noise: str = "gaussian"):
        super().__init__(process, forget_batch, remember_batch)
        if noise not in self.NOISES:
            raise ValueError(f"unknown EraseDiff noise {noise!r}; choose one of {', '.join(self.NOISES)}")
        self.eta = eta
        self.noise = noise

    def plan(self, data, generator):
        plan = super().plan(data, generator)
        draw = torch.rand if self.noise == "uniform" else torch.randn
        plan.extra["unrelated_noise"] = draw(plan.forget_noise.shape, generator=generator)
        return plan

    def forget_half(self, data, plan):
        targets, _, cond, noise, t = self._forget_batch(data, plan)
        x_t = self.process.add_noise(targets, noise, t)
        unrelated = plan.extra["unrelated_noise"].to(x_t)
        # x0 whose native target (eps, or v) is the unrelated noise: predicting it maps the
        # forget sample to noise.
        erase_target = self.process.predict_x0(x_t, unrelated, t)
        return HalfBatch(x_t, t, cond, _weighted(erase_target, self.process.x0_loss_weight(t)))

    def combine(self, forget, remember):
        norm_sq = dot(forget, forget)
        coefficient = 0.0 if norm_sq == 0 else max(self.eta - dot(remember, forget) / norm_sq, 0.0)
        return remember + coefficient * forget, {"erase_coefficient": coefficient}


class SISS(Objective):
    r"""SISS (Alberti et al., ICLR 2025): importance-sampled mixture of keep and forget terms.

    The noisy point comes from the mixture :math:`q(x_t) = \tfrac12 q(x_t|x) + \tfrac12 q(x_t|a)`
    of a remember sample x and a forget sample a at the same t; each term is reweighted by its
    density ratio. The forget gradient is normalised and subtracted:
    :math:`g = g_x - s \frac{\lVert g_x\rVert}{\lVert g_a\rVert} g_a`. We express s relative to
    :math:`\lVert g_x\rVert` so one value suits any model size (``siss_scale``).
    """

    name = "siss"

    def __init__(self, process, forget_batch, remember_batch, scale: float):
        super().__init__(process, forget_batch, remember_batch)
        self.scale = scale

    def plan(self, data, generator):
        plan = super().plan(data, generator)
        n = self.remember_batch
        plan.forget_index = self.draw_targets(data, n, generator)
        plan.forget_t = plan.remember_t
        plan.forget_noise = plan.remember_noise
        plan.extra["from_forget"] = torch.rand(n, generator=generator) < 0.5
        return plan

    def _mixture(self, data: UnlearnData, plan: StepPlan):
        device = data.remember.samples.device
        keep = data.remember.samples[plan.remember_index.to(device)]
        forget = data.forget.targets[plan.forget_index.to(device)]
        t = plan.remember_t.to(device)
        noise = plan.remember_noise.to(device, keep.dtype)
        from_forget = plan.extra["from_forget"].to(device).reshape(-1, 1, 1, 1)
        x_t = self.process.add_noise(torch.where(from_forget, forget, keep), noise, t)
        alpha, sigma = self.process.scales(t)
        alpha, sigma = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)

        def log_density(x0):
            return -((x_t - alpha * x0) ** 2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)

        log_keep, log_forget = log_density(keep), log_density(forget)
        log_mix = torch.logaddexp(log_keep, log_forget) - torch.log(torch.tensor(2.0))
        return x_t, t, keep, forget, (log_keep - log_mix).exp(), (log_forget - log_mix).exp()

    def forget_half(self, data, plan):
        x_t, t, _, forget, _, forget_weight = self._mixture(data, plan)
        native = self.process.x0_loss_weight(t)
        return HalfBatch(x_t, t, select(data.forget.cond, plan.forget_index),
                         _weighted(forget, native, forget_weight.to(native) * native))  # fmt: skip

    def remember_half(self, data, plan):
        x_t, t, keep, _, keep_weight, _ = self._mixture(data, plan)
        native = self.process.x0_loss_weight(t)
        return HalfBatch(x_t, t, select(data.remember.cond, plan.remember_index),
                         _weighted(keep, native, keep_weight.to(native) * native))  # fmt: skip

    def combine(self, forget, remember):
        forget_norm = dot(forget, forget) ** 0.5
        keep_norm = dot(remember, remember) ** 0.5
        coefficient = 0.0 if forget_norm == 0 else self.scale * keep_norm / forget_norm
        return remember - coefficient * forget, {}


OBJECTIVES = ("surrogate", "neggrad", "erasediff", "siss")
