"""The prediction types: each converts its native output to x0 and back, and its loss weight makes
the x0 error the native error, for variance-preserving, flow and sigma-form (ComfyUI) scales."""

from __future__ import annotations

import pytest
import torch

from unlearn_core.diffusion.prediction import Epsilon, FlowVelocity, Velocity

g = torch.Generator().manual_seed(0)
X0, NOISE, OUTPUT = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
SIGMA = torch.tensor([0.05, 0.3, 0.8, 0.99])
SCALES = {
    "variance preserving": ((1 - SIGMA**2).sqrt(), SIGMA),
    "flow": (1 - SIGMA, SIGMA),
    "sigma form": (torch.ones(4), SIGMA * 7),
}


def expand(values):
    return values.reshape(-1, 1, 1, 1)


def native_truth(prediction, alpha, sigma):
    """The training target each type names, written from the noise and the clean image."""
    a, s = expand(alpha), expand(sigma)
    if isinstance(prediction, Epsilon):
        return NOISE
    if isinstance(prediction, FlowVelocity):
        return NOISE - X0 if torch.allclose(a + s, torch.ones_like(a)) else None
    norm = (a**2 + s**2).sqrt()
    return (a * NOISE - s * X0) / norm


@pytest.mark.parametrize("prediction", [Epsilon(), Velocity(), FlowVelocity()], ids=repr)
@pytest.mark.parametrize("scales", list(SCALES), ids=str)
def test_output_and_x0_convert_both_ways_with_the_native_weight(prediction, scales):
    alpha, sigma = SCALES[scales]
    x_t = expand(alpha) * X0 + expand(sigma) * NOISE
    truth = native_truth(prediction, alpha, sigma)
    target = prediction.from_x0(x_t, X0, alpha, sigma)
    if truth is not None:
        assert torch.allclose(target, truth, atol=1e-4)
    assert torch.allclose(prediction.to_x0(x_t, target, alpha, sigma), X0, atol=1e-4)
    native = (OUTPUT - target).pow(2).flatten(1).mean(1)
    x0_form = (prediction.to_x0(x_t, OUTPUT, alpha, sigma) - X0).pow(2).flatten(1).mean(1)
    assert torch.allclose(native, x0_form * prediction.loss_weight(alpha, sigma), rtol=1e-4)


def test_the_types_differ_where_they_should():
    """One noisy point and one output mean three different clean images."""
    alpha, sigma = SCALES["variance preserving"]
    x_t = expand(alpha) * X0 + expand(sigma) * NOISE
    estimates = [p.to_x0(x_t, OUTPUT, alpha, sigma) for p in (Epsilon(), Velocity(), FlowVelocity())]
    assert not torch.allclose(estimates[0], estimates[1]) and not torch.allclose(estimates[1], estimates[2])


def test_sigma_form_v_is_comfyuis_v_prediction():
    """ComfyUI's V_PREDICTION with sigma_data 1: x0 = x / (s^2 + 1) - v s / sqrt(s^2 + 1)."""
    alpha, sigma = SCALES["sigma form"]
    x_t = X0 + expand(sigma) * NOISE
    s = expand(sigma)
    expected = x_t / (s**2 + 1) - OUTPUT * s / (s**2 + 1).sqrt()
    assert torch.allclose(Velocity().to_x0(x_t, OUTPUT, alpha, sigma), expected, atol=1e-5)
    assert torch.allclose(Velocity().loss_weight(alpha, sigma), (1 + sigma**2) / sigma**2)
