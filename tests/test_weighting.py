import pytest
import torch

from unlearn_core.method.weighting import ConstantWeighting, PowerWeighting, make_weighting


def test_power_schedule_emphasises_forgetting_at_high_noise():
    t = torch.tensor([0.1, 0.5, 0.9])
    for gamma in (0.5, 1.0, 2.0):
        weights = PowerWeighting(gamma)(t)
        assert torch.allclose(weights, t**gamma)
        assert (weights[1:] > weights[:-1]).all()
    assert torch.allclose(PowerWeighting(0.0)(t), torch.ones(3))


def test_constant_schedule_and_factory():
    t = torch.rand(7)
    assert torch.equal(ConstantWeighting(0.3)(t), torch.full((7,), 0.3))
    assert make_weighting("power", gamma=2.0) == PowerWeighting(2.0)
    assert make_weighting("constant", constant=0.25) == ConstantWeighting(0.25)
    with pytest.raises(ValueError, match="unknown weighting"):
        make_weighting("cosine")
    with pytest.raises(ValueError):
        ConstantWeighting(1.5)
    with pytest.raises(ValueError):
        PowerWeighting(-1)
