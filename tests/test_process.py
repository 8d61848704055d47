import pytest
import torch
from diffusers import DDPMScheduler

from unlearn_core.diffusion.process import (
    DDPMEpsilon,
    DDPMVelocity,
    RectifiedFlow,
    ddpm_process,
    x0_space_loss,
)
from unlearn_core.diffusion.sampling import step_to


def ddpm(schedule="linear"):
    return DDPMEpsilon.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule))


def ddpm_v(schedule="linear"):
    return DDPMVelocity.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, prediction_type="v_prediction"))


PROCESSES = [RectifiedFlow(shift=3.0), ddpm("linear"), ddpm("squaredcos_cap_v2"), ddpm_v("linear")]
IDS = ["flow", "ddpm-linear", "ddpm-cosine", "ddpm-v"]


def batch(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.rand(n, 3, 8, 8, generator=g) * 2 - 1,
            torch.randn(n, 3, 8, 8, generator=g))  # fmt: skip


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_surrogate_target_denoises_onto_the_surrogate(process):
    """docs/METHOD.md 3: one exact step with the surrogate target, from the target's noisy point, gives x~."""
    target, surrogate, noise = batch()
    t = process.sample_t(len(target), torch.Generator().manual_seed(3))
    x_t = process.add_noise(target, noise, t)
    surrogate_output = process.output_target(x_t, surrogate, t)
    assert torch.allclose(process.predict_x0(x_t, surrogate_output, t), surrogate, atol=1e-4)
    clean = step_to(process, x_t, process.predict_x0(x_t, surrogate_output, t), t, torch.zeros_like(t))
    assert torch.allclose(clean, surrogate, atol=1e-4)
    # and with the true image the target is the ordinary training target
    assert not torch.allclose(process.output_target(x_t, target, t), surrogate_output)


def test_flow_surrogate_velocity_matches_the_closed_form():
    process = RectifiedFlow()
    target, surrogate, noise = batch()
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    x_t = process.add_noise(target, noise, t)
    s = t.reshape(-1, 1, 1, 1)
    closed_form = noise + ((1 - s) * target - surrogate) / s  # v~ = eps + ((1-s) x_f - x~)/s
    assert torch.allclose(process.output_target(x_t, surrogate, t), closed_form, atol=1e-5)
    assert torch.allclose(process.output_target(x_t, target, t), noise - target, atol=1e-5)


def test_ddpm_surrogate_epsilon_matches_the_closed_form():
    process = ddpm()
    target, surrogate, noise = batch()
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0])
    x_t = process.add_noise(target, noise, t)
    abar = process.alphas_cumprod[process.timestep_index(t)].float().reshape(-1, 1, 1, 1)
    closed_form = noise + (abar / (1 - abar)).sqrt() * (target - surrogate)
    assert torch.allclose(process.output_target(x_t, surrogate, t), closed_form, atol=1e-4)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_x0_space_loss_equals_native_mse(process):
    """The host-agnostic form ||x0_hat - x~||^2 w(t) is exactly the eps/v-space loss."""
    target, surrogate, noise = batch(1)
    t = process.sample_t(len(target), torch.Generator().manual_seed(4))
    x_t = process.add_noise(target, noise, t)
    output = torch.randn_like(x_t)
    native = (output - process.output_target(x_t, surrogate, t)).pow(2).flatten(1).mean(1)
    x0_form = x0_space_loss(process.predict_x0(x_t, output, t), surrogate, process.x0_loss_weight(t))
    assert torch.allclose(native, x0_form, rtol=1e-3)


def test_flow_schedule_is_sd3_shifted():
    process = RectifiedFlow(shift=3.0)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(process.shifted(u), 3 * u / (1 + 2 * u))
    ts = process.sampling_ts(10)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and (ts[1:] < ts[:-1]).all()
    assert torch.allclose(process.model_timestep(torch.tensor([0.5])), torch.tensor([500.0]))
    t = process.sample_t(2000, torch.Generator().manual_seed(0))
    assert t.min() >= process.t_min and t.max() <= 1.0
    assert t.mean() > 0.6  # the shift spends more steps at high noise


def test_ddpm_timesteps_and_start():
    process = ddpm()
    ts = process.sampling_ts(10, start=0.5)
    assert ts[0] == 0.5 and ts[-1] == 0.0
    assert process.model_timestep(torch.tensor([1.0])).item() == 999
    alpha, sigma = process.scales(torch.tensor([0.0]))
    assert alpha.item() == 1.0 and sigma.item() == 0.0


def test_ddpm_refuses_non_epsilon_schedulers():
    with pytest.raises(ValueError, match="epsilon"):
        DDPMEpsilon.from_scheduler(DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="v_prediction"):
        DDPMVelocity.from_scheduler(DDPMScheduler())


def test_the_v_process_is_v_and_matches_diffusers():
    """v = alpha eps - sigma x0 (diffusers' get_velocity), and x0 comes back from it."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    process = ddpm_process(scheduler)
    assert type(process) is DDPMVelocity and type(ddpm_process(DDPMScheduler())) is DDPMEpsilon
    x0, _, noise = batch(2)
    t = process.sample_t(len(x0), torch.Generator().manual_seed(5))
    x_t = process.add_noise(x0, noise, t)
    velocity = scheduler.get_velocity(x0, noise, process.timestep_index(t))
    assert torch.allclose(process.output_target(x_t, x0, t), velocity, atol=1e-4)
    assert torch.allclose(process.predict_x0(x_t, velocity, t), x0, atol=1e-4)


def test_x0_space_loss_checks_shapes():
    with pytest.raises(ValueError, match="differ"):
        x0_space_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.ones(2))
