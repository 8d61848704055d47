import pytest
import torch

from unlearn_core.method.surgery import combine_gradients, dot, project_off


def test_conflicting_forget_gradient_is_projected_orthogonal():
    forget = torch.tensor([1.0, 0.0, -2.0])
    remember = torch.tensor([-1.0, 1.0, 1.0])
    assert dot(forget, remember) < 0
    projected, changed = project_off(forget, remember)
    assert changed
    assert abs(dot(projected, remember)) < 1e-6


def test_agreeing_gradients_are_untouched():
    forget = torch.tensor([1.0, 2.0, 0.5])
    remember = torch.tensor([1.0, 0.0, 1.0])
    projected, changed = project_off(forget, remember)
    assert not changed and projected is forget
    combined, stats = combine_gradients(forget, remember, "project_forget")
    assert torch.equal(combined, forget + remember) and stats["projected"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_modes(seed):
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(17, generator=g)
    remember = -forget + 0.1 * torch.randn(17, generator=g)  # strongly conflicting
    none, _ = combine_gradients(forget, remember, "none")
    assert torch.allclose(none, forget + remember)
    ours, stats = combine_gradients(forget, remember, "project_forget")
    assert stats["projected"] == 1.0 and stats["grad_cosine"] < 0
    assert abs(dot(ours - remember, remember)) < 1e-4  # g - g_r is the projected g_f: orthogonal to g_r
    both, _ = combine_gradients(forget, remember, "pcgrad_both")
    forget_part, _ = project_off(forget, remember)
    remember_part, _ = project_off(remember, forget)
    assert torch.allclose(both, forget_part + remember_part, atol=1e-6)
    with pytest.raises(ValueError, match="unknown surgery"):
        combine_gradients(forget, remember, "bogus")
