"""Verified stopping, the rate that rises while a target is still produced, and the remember loss
that pulls towards the base model's own prediction (unlearn_core.method.stopping, trainer, objectives)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_data, make_tiny_sd3, sd3_cond

from unlearn_core import RectifiedFlow, UnlearnConfig
from unlearn_core.backends.diffusers_backend import (
    DiffusersDenoiser,
    lora_attached,
    unlearn_diffusers,
)
from unlearn_core.errors import InputError
from unlearn_core.method.stopping import (
    CheckResult,
    ForgettingCheck,
    RateRaise,
    StopRule,
    probe_weights,
)
from unlearn_core.method.trainer import train_unlearning
from unlearn_core.verify.metrics import PixelCopyDetector

FLOW = RectifiedFlow(shift=3.0)


def test_probes_are_the_own_noise_then_nearby_ones_over_the_range():
    assert probe_weights(0) == (0.0,)
    assert probe_weights(1) == (0.0, 0.2)
    assert probe_weights(3) == pytest.approx((0.0, 0.05, 0.125, 0.2))
    with pytest.raises(InputError):
        probe_weights(-1)


class Drifting:
    """A model whose regenerations move away from their target as ``drift`` grows: each output is
    the target plus drift times its probe's noise."""

    def __init__(self, targets: torch.Tensor):
        self.targets, self.drift, self.calls = targets, 0.0, []

    def __call__(self, noise, index):
        self.calls.append(len(noise))
        return self.targets[index] + self.drift * noise


def _check(drift_model, targets, noise, nearby=2, margin=0.05):
    return ForgettingCheck(drift_model, targets, noise, PixelCopyDetector(8), forget_below=0.8, margin=margin, nearby=nearby)


def test_the_check_counts_only_probes_the_base_model_copies_and_stages_the_nearby_ones():
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(2, 3, 8, 8, generator=generator)
    noise = torch.randn(2, 3, 8, 8, generator=generator)
    model = Drifting(targets)
    check = _check(model, targets, noise)
    baseline = check.baseline()
    assert baseline.counted.all() and check.verifiable == [True, True]  # drift 0: every probe is the target
    model.calls.clear()
    model.drift = 0.01
    result = check(10)
    assert result.forgotten == [False, False] and model.calls == [2]  # only the own probes while they are copies
    model.drift = 10.0
    result = check(20)
    assert result.forgotten == [True, True]
    assert model.calls[-2:] == [2, 4]  # then the nearby probes of the targets forgotten on their own
    assert result.summary()["worst_similarity"][0] < 0.75


def test_a_target_the_base_model_does_not_copy_from_its_noise_cannot_be_verified():
    generator = torch.Generator().manual_seed(1)
    targets = torch.rand(1, 3, 8, 8, generator=generator)
    noise = torch.randn(1, 3, 8, 8, generator=generator)
    model = Drifting(targets)
    model.drift = 10.0  # the "base" model already makes something else from this noise
    check = _check(model, targets, noise, nearby=1)
    check.baseline()
    assert check.verifiable == [False]
    assert check(10).forgotten == [False]  # never reported forgotten, however low the similarity


def test_an_earlier_requests_target_is_judged_by_the_marks_it_carries():
    """Its result is applied, so the model at hand no longer copies it: without the marks its own
    request measured it could never be verified again; with them it is, and only the new target's
    probes are regenerated for the baseline."""
    generator = torch.Generator().manual_seed(4)
    targets = torch.rand(2, 3, 8, 8, generator=generator)
    noise = torch.randn(2, 3, 8, 8, generator=generator)
    model = Drifting(targets)
    model.drift = 10.0  # target 0 already forgotten by the earlier result; target 1 too, as far as this model goes
    carried = torch.tensor([[True, True]])
    check = ForgettingCheck(model, targets, noise, PixelCopyDetector(8), forget_below=0.8, nearby=1, carried=carried)
    baseline = check.baseline()
    assert model.calls == [2]  # the new target's two probes only
    assert check.verifiable == [True, False] and torch.isnan(baseline.similarity[0]).all()
    assert check(10).forgotten == [True, False]
    uncarried = ForgettingCheck(model, targets, noise, PixelCopyDetector(8), forget_below=0.8, nearby=1)
    uncarried.baseline()
    assert uncarried(10).forgotten == [False, False]
    with pytest.raises(InputError, match="check_nearby"):
        ForgettingCheck(model, targets, noise, PixelCopyDetector(8), forget_below=0.8, nearby=2, carried=carried)


def test_the_margin_keeps_a_borderline_target_counted_as_produced():
    targets = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model = Drifting(targets)
    check = _check(model, targets, noise, nearby=0, margin=0.2)
    check.baseline()
    drift = 0.0
    while True:  # the smallest drift that takes the own probe just under the threshold
        drift += 0.01
        model.drift = drift
        similarity = float(check._similarity([(0, 0)])[0])
        if similarity < 0.8:
            break
    assert similarity > 0.6 and check(1).forgotten == [False]  # below 0.8, not below 0.8 - 0.2


def _result(step, forgotten):
    n = len(forgotten)
    return CheckResult(step, torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool), list(forgotten), n)


def test_stopping_needs_every_target_forgotten_at_two_checks_in_a_row():
    rule = StopRule(2, confirmations=2)
    assert not rule.update(_result(10, [True, False]))
    assert not rule.update(_result(20, [True, True]))
    assert rule.forgotten_at == [10, 20]
    assert not rule.update(_result(30, [False, True]))  # it came back: its step is forgotten, the streak too
    assert rule.forgotten_at == [None, 20]
    assert not rule.update(_result(40, [True, True]))
    assert rule.update(_result(50, [True, True]))
    assert rule.forgotten_at == [40, 20]


def test_the_rate_rises_only_after_its_budget_while_a_target_is_produced_and_stops_at_the_ceiling():
    schedule = RateRaise(1e-3, budget=20, factor=2.0, ceiling=5e-3)
    assert schedule.update(_result(10, [False])) is None  # within the budget
    assert schedule.update(_result(20, [False])) == pytest.approx(2e-3)
    assert schedule.update(_result(30, [False])) is None  # a new budget since the raise
    assert schedule.update(_result(40, [True])) is None  # forgotten: no raise
    assert schedule.update(_result(60, [False])) == pytest.approx(4e-3)
    assert schedule.update(_result(80, [False])) == pytest.approx(5e-3)
    assert schedule.update(_result(100, [False])) is None


# --- the loop ---------------------------------------------------------------------------------------


def _lora_check(lora, targets, noise, scale: float, nearby: int = 1):
    """A check whose regeneration drifts with the LoRA's size: the further training moved the
    adapter, the less the output is the target (a stand-in for a model forgetting)."""

    def regenerate(noise_batch, index):
        drift = scale * sum(float(p.detach().norm()) for p in lora.parameters()[1::2])
        return targets[index] + drift * noise_batch

    return ForgettingCheck(regenerate, targets, noise, PixelCopyDetector(8), forget_below=0.8, nearby=nearby)


def _train(config, scale, seed=0):
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=4)
    noise = torch.randn(data.forget.targets.shape, generator=torch.Generator().manual_seed(seed))
    with lora_attached(model, rank=2) as lora:
        check = _lora_check(lora, data.forget.targets, noise, scale)
        return train_unlearning(lora.denoiser(FLOW), FLOW, data, config, check=check)


def quick(**overrides):
    values = dict(steps=60, learning_rate=3e-3, lora_rank=2, forget_batch_size=2, remember_batch_size=2, check_every=5)
    return UnlearnConfig(**{**values, **overrides})


def test_training_stops_two_checks_after_every_target_is_forgotten():
    result = _train(quick(check_confirmations=2), scale=20.0)
    record = result.verification
    assert record["stopped_early"] and result.steps < 60
    assert record["forgotten_at"][0] is not None
    assert result.steps == record["forgotten_at"][0] + 5  # confirmed at the next check
    assert len(result.history) == result.steps
    assert record["baseline"]["own_similarity"][0] > 0.99  # the unchanged base model still makes the target


def test_more_confirmations_stop_later_and_repair_longer():
    result = _train(quick(check_confirmations=3), scale=20.0)
    first = result.verification["forgotten_at"][0]
    assert result.verification["stopped_early"] and result.steps == first + 10  # two more checks, 5 steps apart
    assert result.verification["repair_steps"] == 10


def test_without_verified_stopping_every_step_is_trained():
    result = _train(quick(stop_when_forgotten=False), scale=20.0)
    assert result.steps == 60 and not result.verification["stopped_early"]
    assert "off" in result.verification["status"]


def test_a_target_that_stays_produced_trains_to_the_maximum_and_says_so():
    result = _train(quick(steps=20), scale=1e-6)
    assert result.steps == 20 and not result.verification["stopped_early"]
    assert result.verification["forgotten_at"] == [None]
    assert "not verified" in result.verification["status"]


def test_between_the_forgotten_check_and_the_confirming_one_only_the_remember_half_trains():
    repaired = _train(quick(remember_target="base"), scale=20.0)
    pushed = _train(quick(remember_target="base", repair_when_forgotten=False), scale=20.0)
    first = repaired.verification["forgotten_at"][0]
    assert first is not None and first == pushed.verification["forgotten_at"][0]  # the same run up to there
    window = repaired.history[first:first + 5]
    assert [h.get("repairing") for h in repaired.history[:first]] == [None] * first
    assert all(h.get("repairing") == 1.0 for h in window) and not any("repairing" in h for h in pushed.history)
    assert repaired.verification["repair_steps"] == sum("repairing" in h for h in repaired.history) >= 5
    # the repair pulls the other outputs back towards the base model; the forget push moves them further
    assert repaired.history[first + 4]["remember_loss"] < pushed.history[first + 4]["remember_loss"]


class Scripted:
    """A check with given verdicts: target 0 is gone from the first check on, target 1 never."""

    verifiable = [True, True]

    def __len__(self):
        return 2

    def baseline(self):
        return CheckResult(0, torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool), [False, False], 2)

    def __call__(self, step):
        return CheckResult(step, torch.tensor([[0.1], [0.99]]), torch.ones(2, 1, dtype=torch.bool), [True, False], 2)


def test_once_a_target_is_gone_the_forget_draws_go_to_the_one_still_produced(monkeypatch):
    from unlearn_core.method import objectives

    drawn, plan = [], objectives.SurrogateUnlearning.plan

    def recording(self, data, generator):
        result = plan(self, data, generator)
        drawn.append(result.forget_index.tolist())
        return result

    monkeypatch.setattr(objectives.SurrogateUnlearning, "plan", recording)
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=2, n_remember=4)
    with lora_attached(model, rank=2) as lora:
        result = train_unlearning(lora.denoiser(FLOW), FLOW, data, quick(steps=15, forget_batch_size=4), check=Scripted())
    assert result.steps == 15 and result.verification["forgotten_at"] == [5, None]
    assert {0, 1} <= {i for step in drawn[:5] for i in step}, "before the first check both targets are drawn"
    assert all(i == 1 for step in drawn[5:] for i in step), "a target found gone still takes forget draws"


def test_the_raise_schedule_lifts_the_rate_while_the_target_is_produced():
    raised = _train(quick(steps=40, rate_schedule="raise", raise_after=10, learning_rate=1e-3), scale=1e-6)
    rates = [h["learning_rate"] for h in raised.history]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(8e-3)  # raised at 10, 20, 30 (x2 each)
    fixed = _train(quick(steps=40, learning_rate=1e-3), scale=1e-6)
    assert {h["learning_rate"] for h in fixed.history} == {1e-3}


def test_an_easy_target_gets_fewer_steps_than_a_hard_one():
    easy = _train(quick(rate_schedule="raise", raise_after=10, learning_rate=1e-3), scale=40.0)
    hard = _train(quick(rate_schedule="raise", raise_after=10, learning_rate=1e-3), scale=0.2)
    assert easy.steps < hard.steps
    assert hard.verification["final_learning_rate"] > easy.verification["final_learning_rate"]


def test_the_raise_schedule_needs_the_check():
    with pytest.raises(InputError, match="stop_when_forgotten"):
        UnlearnConfig(rate_schedule="raise", stop_when_forgotten=False)


def test_the_check_must_cover_the_forget_set():
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=4)
    targets = torch.cat([data.forget.targets] * 2)
    with lora_attached(model, rank=2) as lora, pytest.raises(InputError, match="covers 2 targets"):
        check = _lora_check(lora, targets, torch.randn(targets.shape), 1.0)
        train_unlearning(lora.denoiser(FLOW), FLOW, data, quick(), check=check)


# --- the base model's prediction as the remember target ----------------------------------------------


def test_the_base_remember_loss_is_zero_at_the_start_and_the_data_one_is_not():
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=4)
    base = unlearn_diffusers(model, FLOW, data, quick(steps=1, remember_target="base", stop_when_forgotten=False))
    plain = unlearn_diffusers(model, FLOW, data, quick(steps=1, stop_when_forgotten=False, remember_target="data"))
    assert base.training.history[0]["remember_loss"] == pytest.approx(0.0, abs=1e-10)
    assert plain.training.history[0]["remember_loss"] > 1e-3


def test_the_base_prediction_is_the_model_without_the_adapter_and_training_still_moves_it():
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=4)
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0.3, 0.8])
    cond = sd3_cond(2)
    with torch.no_grad():
        untouched = DiffusersDenoiser(model, FLOW).predict_x0(x_t, t, cond)
    outcome = unlearn_diffusers(model, FLOW, data, quick(steps=20, remember_target="base", stop_when_forgotten=False))
    with lora_attached(model, weights=outcome.lora) as lora, torch.no_grad():
        denoiser = lora.denoiser(FLOW)
        assert torch.allclose(denoiser.base_predict_x0(x_t, t, cond), untouched, atol=1e-6)
        assert not torch.allclose(denoiser.predict_x0(x_t, t, cond), untouched, atol=1e-4)  # the adapter is back on
        assert all(p.requires_grad for p in lora.parameters())
    losses = [h["remember_loss"] for h in outcome.training.history]
    assert losses[0] == pytest.approx(0.0, abs=1e-10) and max(losses[1:]) > 0  # drift shows once the adapter moves
    assert all(math.isfinite(v) for v in losses)


def test_the_full_adapter_compares_with_the_untouched_model():
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=4)
    outcome = unlearn_diffusers(model, FLOW, data, quick(steps=2, adapter="full", remember_target="base",
                                                         stop_when_forgotten=False))  # fmt: skip
    assert outcome.training.history[0]["remember_loss"] == pytest.approx(0.0, abs=1e-10)


def test_a_denoiser_without_a_base_prediction_is_refused_for_the_base_target():
    model = make_tiny_sd3()
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=4)
    with lora_attached(model, rank=2) as lora:
        denoiser = DiffusersDenoiser(model, FLOW, lora.parameters())
        with pytest.raises(InputError, match="remember_target='data'"):
            train_unlearning(denoiser, FLOW, data, quick(remember_target="base"))


def test_a_balance_against_the_base_remember_gradient_is_refused():
    """With the base target g_r starts at zero, so a balance relative to it would forget nothing."""
    with pytest.raises(InputError, match="balance='none'"):
        UnlearnConfig(remember_target="base", balance="cap")
    UnlearnConfig(remember_target="base", balance="cap", method="siss")  # a baseline ignores both
