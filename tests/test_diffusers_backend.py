"""Invariants of training on diffusers models: identity at init, only adapters move, base intact."""

import pytest
import torch
from conftest import assert_bit_identical, make_data, sd3_cond, snapshot
from diffusers import DDPMScheduler

from unlearn_core import DDPMEpsilon, RectifiedFlow, UnlearnConfig
from unlearn_core.backends.diffusers_backend import (
    DiffusersDenoiser,
    lora_attached,
    unlearn_diffusers,
)
from unlearn_core.diffusion.denoiser import select
from unlearn_core.formats.lora import load_lora, save_lora
from unlearn_core.method.objectives import denoising_loss

FLOW = RectifiedFlow()
DDPM = DDPMEpsilon.from_scheduler(DDPMScheduler(num_train_timesteps=1000))


def probe(model, process, data):
    x = torch.randn(data.forget.targets.shape, generator=torch.Generator().manual_seed(9))
    t = torch.full((len(x),), 0.6)
    with torch.no_grad():
        return DiffusersDenoiser(model, process).predict_x0(x, t, data.forget.cond)


def quick(**overrides):
    values = dict(steps=4, learning_rate=1e-3, lora_rank=2, forget_batch_size=2, remember_batch_size=2)
    values.update(overrides)
    return UnlearnConfig(**values)


@pytest.fixture(params=["sd3", "unet"])
def case(request, tiny_sd3, tiny_unet, sd3_data, unet_data):
    if request.param == "sd3":
        return tiny_sd3, FLOW, sd3_data
    return tiny_unet, DDPM, unet_data


def test_zero_lora_is_the_identity(case):
    model, process, data = case
    base = probe(model, process, data)
    with lora_attached(model, rank=4) as lora:
        assert lora.parameters(), "no LoRA layer was attached"
        assert torch.equal(probe(model, process, data), base)


def test_unet_lora_includes_convolutions(tiny_unet):
    with lora_attached(tiny_unet, rank=2) as lora:
        names = [name for name, _ in lora.layers()]
    assert any(name.endswith("conv1") for name in names) and any(name.endswith("to_q") for name in names)


def test_training_changes_only_lora_and_leaves_base_bit_identical(case):
    model, process, data = case
    before = snapshot(model)
    base_output = probe(model, process, data)
    outcome = unlearn_diffusers(model, process, data, quick())
    assert_bit_identical(model, before)
    assert torch.equal(probe(model, process, data), base_output)
    ups = [layer.up for layer in outcome.lora.layers.values()]
    assert any(up.abs().sum() > 0 for up in ups), "training did not move the LoRA"
    with lora_attached(model, weights=outcome.lora):
        assert not torch.allclose(probe(model, process, data), base_output)
    assert_bit_identical(model, before)


def test_same_seed_same_lora_bytes(tmp_path, tiny_sd3, sd3_data):
    first = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(seed=5)).lora
    second = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(seed=5)).lora
    other = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(seed=6)).lora
    a = save_lora(tmp_path / "a.safetensors", first, "comfy").read_bytes()
    b = save_lora(tmp_path / "b.safetensors", second, "comfy").read_bytes()
    c = save_lora(tmp_path / "c.safetensors", other, "comfy").read_bytes()
    assert a == b
    assert a != c
    assert load_lora(tmp_path / "a.safetensors").metadata["unlearn.method"] == "surrogate"


def test_full_finetune_trains_a_copy(tiny_unet, unet_data):
    before = snapshot(tiny_unet)
    outcome = unlearn_diffusers(tiny_unet, DDPM, unet_data, quick(adapter="full", learning_rate=1e-3))
    assert_bit_identical(tiny_unet, before)
    changed = [n for n, t in outcome.finetuned.state_dict().items() if not torch.equal(t, before[n])]
    assert changed and outcome.lora is None


def fixed_draw_losses(model, process, data, n=64, seed=123):
    """Forget (target -> surrogate) and remember losses on fixed noise levels and noise."""
    g = torch.Generator().manual_seed(seed)
    t, noise = process.sample_t(n, g), torch.randn((n, *data.forget.targets.shape[1:]), generator=g)
    denoiser = DiffusersDenoiser(model, process)
    forget_index = torch.arange(n) % len(data.forget)
    remember_index = torch.arange(n) % len(data.remember)
    with torch.no_grad():
        forget = denoising_loss(denoiser, process, data.forget.targets[forget_index], data.forget.surrogates[forget_index],
                                select(data.forget.cond, forget_index), noise, t)  # fmt: skip
        remember = data.remember.samples[remember_index]
        keep = denoising_loss(denoiser, process, remember, remember, select(data.remember.cond, remember_index), noise, t)
    return float(forget.mean()), float(keep.mean())


def test_unlearning_lowers_the_forget_loss_and_keeps_remember_bounded(tiny_sd3):
    """Measured on fixed draws: the surrogate loss falls, the remember loss does not grow."""
    data = make_data(4, 8, sd3_cond, n_forget=1, n_remember=6)
    forget_before, remember_before = fixed_draw_losses(tiny_sd3, FLOW, data)
    config = quick(steps=60, learning_rate=1e-2, lora_rank=4, forget_batch_size=4, remember_batch_size=4, seed=1)
    outcome = unlearn_diffusers(tiny_sd3, FLOW, data, config)
    with lora_attached(tiny_sd3, weights=outcome.lora):
        forget_after, remember_after = fixed_draw_losses(tiny_sd3, FLOW, data)
    assert forget_after < 0.95 * forget_before, (forget_before, forget_after)
    assert remember_after < 1.1 * remember_before, (remember_before, remember_after)


@pytest.mark.parametrize("method", ["neggrad", "erasediff", "siss"])
def test_baselines_train_in_the_same_loop(method, tiny_sd3, sd3_data):
    before = snapshot(tiny_sd3)
    outcome = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(method=method))
    assert len(outcome.training.history) == 4
    assert all(torch.isfinite(layer.up).all() for layer in outcome.lora.layers.values())
    assert_bit_identical(tiny_sd3, before)
