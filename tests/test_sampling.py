"""Sampler and surrogate builders over real (tiny) denoisers."""

import pytest
import torch
from conftest import sd3_cond
from diffusers import DDPMScheduler

from unlearn_core import DDPMEpsilon, InputError, RectifiedFlow
from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.data.remember import RememberRequest, generate_remember, split_count
from unlearn_core.data.seeds import remember_seeds
from unlearn_core.data.surrogate import SURROGATE_KINDS, build_surrogate, flipped, noised
from unlearn_core.diffusion.noise import seeded_noise
from unlearn_core.diffusion.sampling import DenoiserSampler, sample


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


def test_generating_from_a_seed_s_noise_is_generating_from_the_seed(setup):
    denoiser, cond, shape = setup
    sampler = DenoiserSampler(denoiser, denoiser.process, steps=4)
    from_seeds = sampler.generate(cond, [3, 4], shape)
    assert torch.equal(sampler.generate_from_noise(cond, seeded_noise([3, 4], shape)), from_seeds)
    assert not torch.equal(sampler.generate_from_noise(cond, seeded_noise([4, 3], shape)), from_seeds)


def test_sdedit_strength_moves_further_from_the_target(setup):
    denoiser, cond, shape = setup
    target = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sampler = DenoiserSampler(denoiser, denoiser.process, steps=10)
    mild = build_surrogate("sdedit", target, sampler=sampler, prompt=cond, strength=0.2)
    strong = build_surrogate("sdedit", target, sampler=sampler, prompt=cond, strength=0.9)
    assert (mild - target).abs().mean() < (strong - target).abs().mean()


def test_repaint_changes_only_the_mask(setup):
    denoiser, cond, shape = setup
    target = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(2, 1, *shape[1:])
    mask[..., 2:6, 2:6] = 1
    sampler = DenoiserSampler(denoiser, denoiser.process, steps=6)
    result = build_surrogate("inpaint", target, sampler=sampler, prompt=cond, strength=1.0, mask=mask)
    outside = (1 - mask).bool().expand_as(target)
    assert torch.allclose(result[outside], target[outside], atol=1e-5)
    assert not torch.allclose(result[~outside], target[~outside], atol=1e-3)


def test_bad_masks_and_strengths_are_explained(setup):
    denoiser, cond, shape = setup
    target = torch.zeros(2, *shape)
    sampler = DenoiserSampler(denoiser, denoiser.process)
    with pytest.raises(InputError, match="does not fit"):
        build_surrogate("inpaint", target, sampler=sampler, prompt=cond, mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(InputError, match="empty"):
        build_surrogate("inpaint", target, sampler=sampler, prompt=cond, mask=torch.zeros(2, 1, *shape[1:]))
    with pytest.raises(InputError, match="strength"):
        build_surrogate("sdedit", target, sampler=sampler, prompt=cond, strength=0.0)
    with pytest.raises(InputError, match="unknown"):
        build_surrogate("blur", target, sampler=sampler, prompt=cond)
    with pytest.raises(InputError, match="needs the model's sampler"):
        build_surrogate("sdedit", target)


def test_ablation_surrogates():
    x = torch.arange(8.0).reshape(1, 1, 2, 4)
    assert torch.equal(flipped(x)[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert torch.equal(noised(x, 0.0), x) and not torch.equal(noised(x, 0.1), x)


class RecordingSampler:
    """A Sampler that records what the core asked of it (each output is its seed, as a constant)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt, seeds, shape):
        self.calls.append(("generate", prompt, list(seeds)))
        return torch.stack([torch.full(shape, float(seed)) for seed in seeds])

    def edit(self, prompt, image, strength, seed, mask=None):
        self.calls.append(("edit", prompt, strength, seed, None if mask is None else tuple(mask.shape)))
        return image + strength


def test_every_surrogate_kind_goes_through_one_builder():
    target = torch.zeros(1, 4, 8, 8)
    sampler = RecordingSampler()
    mask = torch.ones(64, 64)  # a pixel-size mask: a host sampler scales it to the latent
    made = {kind: build_surrogate(kind, target, sampler=sampler, prompt="p", strength=0.5, seed=3, mask=mask,
                                  edited=torch.ones(1, 4, 8, 8)) for kind in SURROGATE_KINDS}  # fmt: skip
    assert sampler.calls == [("edit", "p", 0.5, 3, None), ("edit", "p", 0.5, 3, (1, 1, 64, 64))]
    assert torch.equal(made["edited_image"], torch.ones(1, 4, 8, 8))
    assert torch.equal(made["flip"], flipped(target)) and torch.equal(made["noise"], noised(target, 0.1, 3))
    with pytest.raises(InputError, match="differs in size"):
        build_surrogate("edited_image", target, edited=torch.ones(1, 4, 4, 4))
    with pytest.raises(InputError, match="NaN"):
        build_surrogate("edited_image", target, edited=torch.full((1, 4, 8, 8), float("nan")))


def test_remember_set_follows_the_seed_rule_per_target():
    sampler = RecordingSampler()
    assert split_count(5, 2) == [3, 2] and split_count(1, 3) == [1, 0, 0]
    requests = [RememberRequest("a", 100, 3), RememberRequest("b", 7, 0), RememberRequest("c", 7, 2)]
    latents, prompts = generate_remember(sampler, requests, (1, 2, 2))
    assert prompts == ["a", "a", "a", "c", "c"]
    assert latents[:, 0, 0, 0].tolist() == [*remember_seeds(100, 3), *remember_seeds(7, 2)] == [101, 102, 103, 8, 9]
    with pytest.raises(InputError, match="empty"):
        generate_remember(sampler, [RememberRequest("a", 0, 0)], (1, 2, 2))


def test_denoiser_sampler_prompt_rows(setup):
    """A shared prompt and a per-seed prompt of equal rows give the same outputs; other row counts fail."""
    denoiser, cond, shape = setup
    sampler = DenoiserSampler(denoiser, denoiser.process, steps=3, batch=1)
    one = {key: value[:1] for key, value in cond.items()}
    per_seed = {key: value[:1].expand(2, *value.shape[1:]) for key, value in cond.items()}
    assert torch.allclose(sampler.generate(one, [5, 6], shape), sampler.generate(per_seed, [5, 6], shape), atol=1e-6)
    if cond:
        with pytest.raises(InputError, match="rows"):
            sampler.generate(per_seed, [1, 2, 3], shape)
