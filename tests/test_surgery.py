import pytest
import torch

from unlearn_core.surgery import combine_gradients, dot, project_off


def test_conflicting_forget_gradient_is_projected_orthogonal():
    forget = [torch.tensor([1.0, 0.0]), torch.tensor([-2.0])]
    remember = [torch.tensor([-1.0, 1.0]), torch.tensor([1.0])]
    assert dot(forget, remember) < 0
    projected, changed = project_off(forget, remember)
    assert changed
    assert abs(float(dot(projected, remember))) < 1e-6


def test_agreeing_gradients_are_untouched():
    forget = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])]
    remember = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    projected, changed = project_off(forget, remember)
    assert not changed
    assert all(p is f for p, f in zip(projected, forget))
    combined, stats = combine_gradients(forget, remember, "project_forget")
    assert torch.equal(combined[0], forget[0] + remember[0]) and stats["projected"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_modes(seed):
    g = torch.Generator().manual_seed(seed)
    forget = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    remember = [-f + 0.1 * torch.randn(f.shape, generator=g) for f in forget]  # strongly conflicting
    none, _ = combine_gradients(forget, remember, "none")
    assert all(torch.allclose(n, f + r) for n, f, r in zip(none, forget, remember))
    ours, stats = combine_gradients(forget, remember, "project_forget")
    assert stats["projected"] == 1.0 and stats["grad_cosine"] < 0
    # g - g_r is the projected forget gradient: orthogonal to g_r
    assert abs(float(dot([o - r for o, r in zip(ours, remember)], remember))) < 1e-4
    both, _ = combine_gradients(forget, remember, "pcgrad_both")
    forget_part, _ = project_off(forget, remember)
    remember_part, _ = project_off(remember, forget)
    assert all(torch.allclose(b, f + r, atol=1e-6) for b, f, r in zip(both, forget_part, remember_part))
    with pytest.raises(ValueError, match="unknown surgery"):
        combine_gradients(forget, remember, "bogus")
