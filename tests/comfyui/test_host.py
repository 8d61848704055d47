"""The host adapter's noise process against ComfyUI's own model_sampling, for flow and eps models."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfyui


def sampling_for(kind: str):
    import comfy.model_sampling as ms

    if kind == "flow":
        class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass

        sampling = Sampling()
        sampling.set_parameters(shift=3.0)
        return sampling

    class Sampling(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    return Sampling()


@pytest.mark.parametrize("kind", ["flow", "eps"])
def test_x0_loss_equals_the_native_loss_of_the_host(comfy, pack, kind):
    from instance_unlearn.nodes.host import HostProcess

    sampling = sampling_for(kind)
    process = HostProcess(sampling, kind)
    g = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    t = process.sample_t(6, g)
    assert (t >= process.t_min).all() and (t <= 1).all()
    sigma = process.sigma(t)
    x_noisy = process.add_noise(x0, noise, t)
    assert torch.allclose(x_noisy, sampling.noise_scaling(sigma, noise, x0))
    x0_hat = sampling.calculate_denoised(sigma, output, x_noisy)  # what apply_model returns
    native_target = (x_noisy - x0) / sigma.reshape(-1, 1, 1, 1) if kind == "flow" else noise
    native = (output - native_target).pow(2).flatten(1).mean(1)
    x0_form = (x0_hat - x0).pow(2).flatten(1).mean(1) * process.x0_loss_weight(t)
    assert torch.allclose(native, x0_form, rtol=1e-3, atol=1e-4)


def test_eps_noise_fractions_map_to_increasing_sigmas(comfy, pack):
    from instance_unlearn.nodes.host import HostProcess

    process = HostProcess(sampling_for("eps"), "eps")
    sigmas = process.sigma(torch.tensor([0.05, 0.3, 0.6, 1.0]))
    assert (sigmas[1:] > sigmas[:-1]).all() and abs(float(sigmas[-1]) - float(process.model_sampling.sigma_max)) < 1e-3
