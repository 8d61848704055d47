"""The method's ideas, each pinned on toy problems where the right answer is known in closed form.

- the forget loss pulls the model's output at the target's noisy points towards the surrogate
  and away from the target;
- each half's loss weights its samples exactly as unlearn_core.method.weighting says (lambda(t), the
  forget space, the remember weight);
- surgery changes ours' update exactly when the two gradients conflict; balance bounds g_f;
- every baseline combines its gradients by its own paper's formula, not by ours.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from unlearn_core import UnlearnConfig
from unlearn_core.data.sets import ForgetTargets, RememberSet, UnlearnData
from unlearn_core.diffusion.process import DDPMEpsilon, RectifiedFlow
from unlearn_core.method.objectives import SISS, EraseDiff, NegGrad, SurrogateUnlearning
from unlearn_core.method.surgery import BALANCE_MODES, SURGERY_MODES, dot, project_off
from unlearn_core.method.trainer import make_objective, train_unlearning
from unlearn_core.method.weighting import FORGET_SPACES, REMEMBER_WEIGHTS, WEIGHTINGS

SHAPE = (2, 4, 4)


class MemorisingDenoiser:
    """x0_hat = memory + bias + t * slope: with memory = the target it reproduces the target at
    every noise level, as a model that memorised one output does. ``bias`` and ``slope`` train
    (the slope lets the noise levels' weights change the update's direction, not only its size)."""

    gradient_split = None

    def __init__(self, memory: torch.Tensor):
        self.memory = memory
        self.bias = torch.nn.Parameter(torch.zeros_like(memory))
        self.slope = torch.nn.Parameter(torch.zeros_like(memory))

    def predict_x0(self, x_t, t, cond):
        return self.memory + self.bias + t.reshape(-1, 1, 1, 1) * self.slope

    def trainable_parameters(self):
        return [self.bias, self.slope]


class InputReadingDenoiser(MemorisingDenoiser):
    """The memorising denoiser plus a trained gain on its noisy input, so the noise draws matter."""

    def __init__(self, memory: torch.Tensor):
        super().__init__(memory)
        self.gain = torch.nn.Parameter(torch.zeros_like(memory))

    def predict_x0(self, x_t, t, cond):
        return super().predict_x0(x_t, t, cond) + self.gain * x_t

    def trainable_parameters(self):
        return [*super().trainable_parameters(), self.gain]


def toy_data(seed: int = 0) -> UnlearnData:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(1, *SHAPE, generator=g)
    surrogate = target + 0.5 * torch.randn(1, *SHAPE, generator=g)
    remember = torch.randn(6, *SHAPE, generator=g)
    return UnlearnData(ForgetTargets(target, surrogate), RememberSet(remember))


def ours(**options) -> SurrogateUnlearning:
    """Ours with the remember half on the data (these tests score it against the samples)."""
    config = UnlearnConfig(forget_batch_size=8, remember_batch_size=8, **{"remember_target": "data", **options})
    objective = make_objective(config, RectifiedFlow())
    assert isinstance(objective, SurrogateUnlearning)
    return objective


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_forget_gradient_moves_the_output_towards_the_surrogate_and_away_from_the_target():
    data = toy_data()
    target, surrogate = data.forget.targets[0], data.forget.surrogates[0]
    for options in ({}, {"forget_space": "native"}, {"remember_weight": "complement", "balance": "none"}):
        denoiser = MemorisingDenoiser(target.clone())
        objective = ours(**options)
        plan = objective.plan(data, torch.Generator().manual_seed(1))
        loss, _ = objective.forget_half(data, plan).loss(denoiser)
        (grad,) = torch.autograd.grad(loss, [denoiser.bias])
        step = -grad / grad.norm()
        # the descent direction points from the target to the surrogate
        cosine = torch.nn.functional.cosine_similarity(step.flatten(), (surrogate - target).flatten(), dim=0)
        assert cosine > 0.999, (options, float(cosine))
        with torch.no_grad():
            denoiser.bias += 0.1 * step
            moved = denoiser.memory + denoiser.bias
        assert (moved - surrogate).norm() < (target - surrogate).norm()
        assert (moved - target).norm() > 0


def _x0_errors(objective, half, denoiser, reference):
    x0_hat = denoiser.predict_x0(half.x_t, half.t, half.cond)
    return (x0_hat - reference).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_forget_loss_is_lambda_times_the_x0_error(gamma):
    data = toy_data()
    denoiser = MemorisingDenoiser(torch.zeros(*SHAPE))
    objective = ours(gamma=gamma, forget_space="x0")
    plan = objective.plan(data, torch.Generator().manual_seed(2))
    half = objective.forget_half(data, plan)
    loss, reported = half.loss(denoiser)
    errors = _x0_errors(objective, half, denoiser, data.forget.surrogates[0])
    t = plan.forget_t
    assert t.std() > 0.05  # the draws span noise levels, so lambda matters
    assert torch.allclose(loss, (t**gamma * errors).mean(), rtol=1e-5)
    assert reported == pytest.approx(float((errors / t**2).mean().detach()), rel=1e-5)  # the chart shows the native loss


def test_native_forget_space_multiplies_lambda_by_the_process_weight():
    data = toy_data()
    denoiser = MemorisingDenoiser(torch.zeros(*SHAPE))
    objective = ours(gamma=2.0, forget_space="native")
    plan = objective.plan(data, torch.Generator().manual_seed(3))
    half = objective.forget_half(data, plan)
    loss, _ = half.loss(denoiser)
    errors = _x0_errors(objective, half, denoiser, data.forget.surrogates[0])
    t = plan.forget_t
    assert torch.allclose(loss, (t**2 * (1 / t**2) * errors).mean(), rtol=1e-5)  # lambda * w


@pytest.mark.parametrize("family", ["flow", "ddpm"])
def test_min_snr_forget_space_is_lambda_times_the_x0_error_capped_by_the_snr(family):
    process = RectifiedFlow() if family == "flow" else DDPMEpsilon.from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    config = UnlearnConfig(forget_batch_size=64, remember_batch_size=8, gamma=1.0, forget_space="min_snr")
    objective = make_objective(config, process)
    data = toy_data()
    denoiser = MemorisingDenoiser(torch.zeros(*SHAPE))
    plan = objective.plan(data, torch.Generator().manual_seed(3))
    half = objective.forget_half(data, plan)
    loss, _ = half.loss(denoiser)
    errors = _x0_errors(objective, half, denoiser, data.forget.surrogates[0])
    t = plan.forget_t
    alpha, sigma = process.scales(t)
    snr = (alpha / sigma) ** 2
    assert ((snr < 1).any() and (snr > 1).any()), "the draws must reach both sides of SNR 1"
    assert torch.allclose(loss, (t * snr.clamp(max=1) * errors).mean(), rtol=1e-5)
    # where the input is mostly noise the pull is weaker than plain x0's lambda(t)
    plain = make_objective(replace(config, forget_space="x0"), process)
    plain_loss, _ = plain.forget_half(data, plan).loss(denoiser)
    assert loss < plain_loss


@pytest.mark.parametrize("remember_weight", ["full", "complement"])
def test_remember_loss_weight(remember_weight):
    data = toy_data()
    denoiser = MemorisingDenoiser(torch.zeros(*SHAPE))
    objective = ours(gamma=1.0, remember_weight=remember_weight)
    plan = objective.plan(data, torch.Generator().manual_seed(4))
    half = objective.remember_half(data, plan)
    loss, _ = half.loss(denoiser)
    x0 = data.remember.samples[plan.remember_index]
    errors = (denoiser.predict_x0(half.x_t, half.t, half.cond) - x0).pow(2).flatten(1).mean(1)
    t = plan.remember_t
    weight = 1 / t**2 if remember_weight == "full" else (1 - t) / t**2
    assert torch.allclose(loss, (weight * errors).mean(), rtol=1e-5)


@pytest.mark.parametrize("spread", [0.0, 0.3])
def test_own_noise_draws_lie_around_the_targets_own_noise(spread):
    data = toy_data()
    own = torch.randn(data.forget.targets.shape, generator=torch.Generator().manual_seed(9))
    data = UnlearnData(ForgetTargets(data.forget.targets, data.forget.surrogates, noise=own), data.remember)
    base = ours()
    objective = SurrogateUnlearning(base.process, 64, 8, base.weights, base.surgery, own_noise_spread=spread)
    drawn = objective.plan(data, torch.Generator().manual_seed(5)).forget_noise
    cosine = torch.nn.functional.cosine_similarity(drawn.flatten(1), own.flatten(1).expand(len(drawn), -1))
    # slerp by at most `spread` of the angle to a fresh draw (about 90 degrees in many dimensions)
    assert (cosine >= torch.cos(torch.tensor(spread * torch.pi / 2)) - 0.05).all()
    if spread == 0:
        assert torch.allclose(drawn, own.expand_as(drawn), atol=1e-5)
    else:
        assert cosine.std() > 0.005  # the spread draws a neighbourhood, not one point
    # fresh draws (no own noise, or the option off) are nearly orthogonal to it
    fresh = ours(forget_noise="fresh").plan(data, torch.Generator().manual_seed(5)).forget_noise
    assert torch.nn.functional.cosine_similarity(fresh.flatten(1), own.flatten(1).expand(len(fresh), -1)).abs().max() < 0.9


def test_surgery_changes_ours_update_exactly_when_the_gradients_conflict():
    objective = ours(balance="none")
    g = torch.Generator().manual_seed(5)
    remember = torch.randn(20, generator=g)
    conflicting = -remember + 0.3 * torch.randn(20, generator=g)
    agreeing = remember + 0.3 * torch.randn(20, generator=g)
    update, stats = objective.combine(conflicting, remember)
    projected, _ = project_off(conflicting, remember)
    assert torch.allclose(update, projected + remember, atol=1e-6)
    assert not torch.allclose(update, conflicting + remember, atol=1e-3)
    assert stats["projected"] == 1.0 and stats["projected_fraction"] > 0.5 and stats["grad_cosine"] < 0
    assert dot(update - remember, remember) == pytest.approx(0.0, abs=1e-4)
    update, stats = objective.combine(agreeing, remember)
    assert torch.equal(update, agreeing + remember) and stats["projected"] == 0.0


@pytest.mark.parametrize("mode", ["scale", "cap"])
def test_balance_bounds_the_forget_gradient_before_surgery(mode):
    objective = ours(balance=mode, balance_ratio=0.5, surgery="none")
    remember = torch.tensor([0.0, 1.0, 0.0])
    big, small = torch.tensor([30.0, 0.0, 0.0]), torch.tensor([0.1, 0.0, 0.0])
    update, stats = objective.combine(big, remember)
    assert torch.allclose(update, torch.tensor([0.5, 1.0, 0.0]))
    assert stats["grad_norm_ratio"] == pytest.approx(30.0) and stats["forget_scale"] == pytest.approx(0.5 / 30)
    update, _ = objective.combine(small, remember)
    expected = torch.tensor([0.5, 1.0, 0.0]) if mode == "scale" else small + remember
    assert torch.allclose(update, expected)
    unbalanced, _ = ours(balance="none", surgery="none").combine(big, remember)
    assert torch.equal(unbalanced, big + remember)


def test_every_option_of_ours_changes_the_training():
    data = toy_data()

    def trained(**options):
        denoiser = MemorisingDenoiser(data.forget.targets[0].clone())
        config = UnlearnConfig(steps=5, learning_rate=0.01, forget_batch_size=4, remember_batch_size=4,
                               **{"remember_target": "data", **options})  # the toy has no adapter to switch off
        history = train_unlearning(denoiser, RectifiedFlow(), data, config).history
        return torch.cat([denoiser.bias.detach().flatten(), denoiser.slope.detach().flatten()]), history

    reference, history = trained()
    assert {"grad_norm_ratio", "grad_cosine", "projected_fraction", "forget_scale"} <= set(history[0])
    defaults = UnlearnConfig()
    for option, values in [("forget_space", FORGET_SPACES), ("remember_weight", REMEMBER_WEIGHTS),
                           ("gamma", (3.0,)), ("surgery", SURGERY_MODES), ("weighting", WEIGHTINGS)]:  # fmt: skip
        for value in [v for v in values if v != getattr(defaults, option)]:
            changed, _ = trained(**{option: value})
            assert not torch.allclose(changed, reference), f"{option}={value!r} did not change the LoRA"
    # every balance mode differs from every other at a ratio where cap binds (on this toy, in x0
    # space, ||g_f|| < ||g_r|| / 2, so at the default 0.1 it may not)
    by_mode = {mode: trained(balance=mode, balance_ratio=0.05, forget_space="x0")[0] for mode in BALANCE_MODES}
    for a in BALANCE_MODES:
        for b in BALANCE_MODES:
            assert a == b or not torch.allclose(by_mode[a], by_mode[b]), f"balance {a} and {b} trained alike"
    for ratio in (0.25, 2.0):  # the ratio acts when a balance mode is on
        scaled, _ = trained(balance="scale", balance_ratio=ratio)
        other, _ = trained(balance="scale", balance_ratio=1.0)
        assert not torch.allclose(scaled, other), f"balance_ratio={ratio} did not change the LoRA"
    # own noise acts when the targets' noise is known, and its spread then matters: the noisy
    # points themselves differ, seen by a denoiser that reads its input
    own = torch.randn(data.forget.targets.shape, generator=torch.Generator().manual_seed(11))
    noisy_data = UnlearnData(ForgetTargets(data.forget.targets, data.forget.surrogates, noise=own), data.remember)

    def trained_on_inputs(**options):
        denoiser = InputReadingDenoiser(data.forget.targets[0].clone())
        config = UnlearnConfig(steps=5, learning_rate=0.01, forget_batch_size=4, remember_batch_size=4, remember_target="data",
                               **options)  # fmt: skip
        train_unlearning(denoiser, RectifiedFlow(), noisy_data, config)
        return denoiser.gain.detach().flatten()

    fresh = trained_on_inputs(forget_noise="fresh")
    exact = trained_on_inputs(forget_noise="own", own_noise_spread=0.0)
    spread = trained_on_inputs(forget_noise="own", own_noise_spread=0.5)
    assert not torch.allclose(exact, fresh) and not torch.allclose(spread, exact)


def _baseline(method, **options):
    config = UnlearnConfig(method=method, forget_batch_size=4, remember_batch_size=4, **options)
    return make_objective(config, RectifiedFlow())


def _conflict(seed=6):
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(12, generator=g)
    remember = -0.5 * forget + 0.2 * torch.randn(12, generator=g)
    return forget, remember


def test_neggrad_ascends_the_target_loss_and_adds_the_gradients():
    objective = _baseline("neggrad")
    assert isinstance(objective, NegGrad)
    forget, remember = _conflict()
    update, _ = objective.combine(forget, remember)
    assert torch.equal(update, forget + remember)
    data = toy_data()
    denoiser = MemorisingDenoiser(torch.zeros(*SHAPE))
    plan = objective.plan(data, torch.Generator().manual_seed(7))
    half = objective.forget_half(data, plan)
    loss, reported = half.loss(denoiser)
    assert float(loss.detach()) < 0 < reported  # minimising it pushes the output away from the target
    (grad,) = torch.autograd.grad(loss, [denoiser.bias])
    towards_target = (data.forget.targets[0] - denoiser.memory).flatten()
    assert torch.nn.functional.cosine_similarity(-grad.flatten(), towards_target, dim=0) < -0.99


@pytest.mark.parametrize("eta", [0.1, 1.0])
def test_erasediff_combines_by_its_first_order_formula(eta):
    objective = _baseline("erasediff", erasediff_eta=eta)
    assert isinstance(objective, EraseDiff) and objective.eta == eta
    forget, remember = _conflict()
    update, stats = objective.combine(forget, remember)
    coefficient = max(eta - dot(remember, forget) / dot(forget, forget), 0.0)
    assert coefficient > 0
    assert torch.allclose(update, remember + coefficient * forget, atol=1e-6)
    assert stats["erase_coefficient"] == pytest.approx(coefficient)


def test_erasediff_noise_kinds():
    data = toy_data()
    draws = {}
    for noise in ("gaussian", "uniform"):
        plan = _baseline("erasediff", erasediff_noise=noise).plan(data, torch.Generator().manual_seed(8))
        draws[noise] = plan.extra["unrelated_noise"]
    assert draws["uniform"].min() >= 0 and draws["uniform"].max() < 1
    assert draws["gaussian"].min() < 0


@pytest.mark.parametrize("scale", [0.1, 0.5])
def test_siss_subtracts_the_normalised_forget_gradient(scale):
    objective = _baseline("siss", siss_scale=scale)
    assert isinstance(objective, SISS)
    forget, remember = _conflict()
    update, _ = objective.combine(forget, remember)
    expected = remember - scale * remember.norm() / forget.norm() * forget
    assert torch.allclose(update, expected, atol=1e-6)


def test_siss_importance_weights_make_each_term_unbiased():
    """Each half's weight is its density over the mixture's: E_mix[weight] = 1 per sample."""
    objective = _baseline("siss")
    data = toy_data()
    plan = objective.plan(data, torch.Generator().manual_seed(9))
    *_, keep_weight, forget_weight = objective._mixture(data, plan)
    assert torch.allclose(keep_weight + forget_weight, torch.full_like(keep_weight, 2.0), atol=1e-5)
