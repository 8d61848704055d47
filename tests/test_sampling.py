"""Sampler and surrogate builders over real (tiny) denoisers."""

import pytest
import torch
from conftest import sd3_cond
from diffusers import DDPMScheduler

from unlearn_core import DDPMEpsilon, InputError, RectifiedFlow
from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.sampling import sample, seeded_noise
from unlearn_core.surrogate import flipped, noised, repaint, sdedit


@pytest.fixture(params=["sd3", "unet"])
def setup(request, tiny_sd3, tiny_unet):
    if request.param == "sd3":
        return DiffusersDenoiser(tiny_sd3, RectifiedFlow()), sd3_cond(2), (4, 8, 8)
    process = DDPMEpsilon.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    return DiffusersDenoiser(tiny_unet, process), {}, (3, 8, 8)


def test_same_seed_same_image_whatever_the_batch(setup):
    denoiser, cond, shape = setup
    noise = seeded_noise([3, 4], shape)
    assert torch.equal(seeded_noise([4], shape)[0], noise[1])
    first = sample(denoiser, denoiser.process, noise, cond, steps=4)
    again = sample(denoiser, denoiser.process, noise, cond, steps=4)
    assert torch.equal(first, again) and torch.isfinite(first).all()


def test_sdedit_strength_moves_further_from_the_target(setup):
    denoiser, cond, shape = setup
    target = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mild = sdedit(denoiser, denoiser.process, target, cond, strength=0.2, steps=10)
    strong = sdedit(denoiser, denoiser.process, target, cond, strength=0.9, steps=10)
    assert (mild - target).abs().mean() < (strong - target).abs().mean()


def test_repaint_changes_only_the_mask(setup):
    denoiser, cond, shape = setup
    target = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(2, 1, *shape[1:])
    mask[..., 2:6, 2:6] = 1
    result = repaint(denoiser, denoiser.process, target, mask, cond, steps=6)
    outside = (1 - mask).bool().expand_as(target)
    assert torch.allclose(result[outside], target[outside], atol=1e-5)
    assert not torch.allclose(result[~outside], target[~outside], atol=1e-3)


def test_bad_masks_and_strengths_are_explained(setup):
    denoiser, cond, shape = setup
    target = torch.zeros(2, *shape)
    with pytest.raises(InputError, match="does not fit"):
        repaint(denoiser, denoiser.process, target, torch.ones(2, 1, 5, 5), cond)
    with pytest.raises(InputError, match="empty"):
        repaint(denoiser, denoiser.process, target, torch.zeros(2, 1, *shape[1:]), cond)
    with pytest.raises(InputError, match="strength"):
        sdedit(denoiser, denoiser.process, target, cond, strength=0.0)


def test_ablation_surrogates():
    x = torch.arange(8.0).reshape(1, 1, 2, 4)
    assert torch.equal(flipped(x)[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert torch.equal(noised(x, 0.0), x) and not torch.equal(noised(x, 0.1), x)
