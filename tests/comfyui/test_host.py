"""The host adapter's noise process against ComfyUI's own model_sampling, for flow, eps and v models."""

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

    prediction = ms.V_PREDICTION if kind == "v" else ms.EPS

    class Sampling(ms.ModelSamplingDiscrete, prediction):
        pass

    return Sampling()


@pytest.mark.parametrize("kind", ["flow", "eps", "v"])
def test_the_core_prediction_types_convert_as_comfyui_does(comfy, pack, kind):
    """x0 from the network's output, and the output that gives a chosen x0, as ComfyUI's own
    calculate_denoised: the host and the library share one conversion per prediction type."""
    from instance_unlearn.nodes.host.family import HostProcess

    sampling = sampling_for(kind)
    process = HostProcess(sampling, kind)
    g = torch.Generator().manual_seed(3)
    x0, noise, output = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    t = process.sample_t(5, g)
    sigma = process.sigma(t)
    x_noisy = process.add_noise(x0, noise, t)
    comfy_x0 = sampling.calculate_denoised(sigma, output, x_noisy)
    assert torch.allclose(process.predict_x0(x_noisy, output, t), comfy_x0, atol=1e-5)
    assert torch.allclose(process.output_target(x_noisy, comfy_x0, t), output, atol=1e-3)


@pytest.mark.parametrize("kind", ["flow", "eps", "v"])
def test_x0_loss_equals_the_native_loss_of_the_host(comfy, pack, kind):
    from instance_unlearn.nodes.host.family import HostProcess

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
    s = sigma.reshape(-1, 1, 1, 1)
    # the network's own training targets: velocity, epsilon, or v on the unit-variance point
    native_target = {"flow": (x_noisy - x0) / s, "eps": noise,
                     "v": (noise - s * x0) / (1 + s**2).sqrt()}[kind]  # fmt: skip
    native = (output - native_target).pow(2).flatten(1).mean(1)
    x0_form = (x0_hat - x0).pow(2).flatten(1).mean(1) * process.x0_loss_weight(t)
    assert torch.allclose(native, x0_form, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["flow", "eps", "v"])
def test_erasediff_aims_the_native_output_at_the_noise_on_the_host_as_in_the_library(comfy, pack, kind):
    """EraseDiff's forget target is the x0 whose *native* output (velocity, or epsilon) is the
    unrelated noise, on the host as in the library: its loss is zero exactly at that x0."""
    from instance_unlearn.nodes.host.family import HostProcess
    from instance_unlearn.unlearn_core.data.sets import ForgetTargets, RememberSet, UnlearnData
    from instance_unlearn.unlearn_core.diffusion.process import RectifiedFlow
    from instance_unlearn.unlearn_core.method.objectives import EraseDiff

    sampling = sampling_for(kind)
    process = HostProcess(sampling, kind)
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 4, 8, 8, generator=g)
    data = UnlearnData(ForgetTargets(targets, targets.clone(), {}, None), RememberSet(torch.randn(2, 4, 8, 8, generator=g), {}))
    objective = EraseDiff(process, 2, 2, eta=1.0)
    plan = objective.plan(data, torch.Generator().manual_seed(2))
    half = objective.forget_half(data, plan)
    unrelated, sigma = plan.extra["unrelated_noise"], process.sigma(half.t)
    # ComfyUI's own x0 for that native output: what the model must predict to output the noise
    aimed = sampling.calculate_denoised(sigma, unrelated, half.x_t)
    if kind == "flow":  # and the library's flow process on the same tensors agrees
        assert torch.allclose(RectifiedFlow().predict_x0(half.x_t, unrelated, half.t), aimed, atol=1e-5)
    assert float(half.score(aimed)[0]) < 1e-10
    assert float(half.score(unrelated)[0]) > 1e-3  # not x0 itself towards the noise
    assert torch.allclose(process.output_target(half.x_t, aimed, half.t), unrelated, atol=1e-4)


def test_eps_noise_fractions_map_to_increasing_sigmas(comfy, pack):
    from instance_unlearn.nodes.host.family import HostProcess

    process = HostProcess(sampling_for("eps"), "eps")
    sigmas = process.sigma(torch.tensor([0.05, 0.3, 0.6, 1.0]))
    assert (sigmas[1:] > sigmas[:-1]).all() and abs(float(sigmas[-1]) - float(process.model_sampling.sigma_max)) < 1e-3


def test_node_modules_share_helpers_through_host_paths_and_images_not_through_each_other(pack):
    """A node module imports no other node module, and only the host package and paths.py import
    ComfyUI's model and folder modules (nodes may import comfy_api's io)."""
    import re
    from pathlib import Path

    from instance_unlearn import nodes
    from instance_unlearn.nodes.extension import NODES

    node_modules = {cls.__module__.rsplit(".", 1)[-1] for cls in NODES}
    host_import = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|folder_paths|server|nodes)\b[\s.]", re.M)
    relative_import = re.compile(r"^from \.(\w+) import|^from \. import ([\w, ]+)", re.M)
    for path in Path(nodes.__file__).parent.glob("*.py"):
        text = path.read_text()
        imported = {name.strip() for match in relative_import.findall(text) for part in match for name in part.split(",")}
        if path.stem in node_modules:
            assert not imported & node_modules, f"{path.name} imports node module(s) {imported & node_modules}"
        # extension imports the server on load; progress.py still drives ComfyUI's progress bar itself
        if path.stem not in ("paths", "extension", "progress"):
            assert not host_import.search(text), f"{path.name} imports a ComfyUI module directly"


def test_training_noises_with_the_graphs_model_sampling_patch(comfy, pack, loaded):
    """A ModelSamplingSD3 / ModelSamplingAuraFlow node in the graph (Z-Image and Qwen-Image workflows
    set the shift with one) is an object patch on the patcher: training must sample and noise with
    it, as the sampler does, not with the network's unpatched model_sampling."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from instance_unlearn.nodes.host.family import training_process

    base = loaded["model"]
    shifted = ModelSamplingSD3().patch(base, shift=12.0)[0]
    process = training_process(shifted)
    assert process.model_sampling is shifted.get_model_object("model_sampling")
    assert process.model_sampling is not base.model.model_sampling
    u = torch.Generator().manual_seed(0)
    assert process.sample_t(256, u).median() > training_process(base).sample_t(256, torch.Generator().manual_seed(0)).median()


def test_a_batch_constant_rides_per_sample_and_returns_as_one_number(comfy, pack):
    """Lumina 2 / Z-Image take the text length once per batch (CONDConstant): samples of different
    lengths cannot share a batch, which is refused with what to change, as ComfyUI cannot batch them."""
    from instance_unlearn.nodes.host.conditioning import CONSTANT, with_constants
    from instance_unlearn.unlearn_core.errors import InputError

    text = torch.zeros(3, 8, 4)
    out = with_constants({"c_crossattn": text, f"{CONSTANT}num_tokens": torch.full((3,), 8)})
    assert out["num_tokens"] == 8 and isinstance(out["num_tokens"], int) and out["c_crossattn"] is text
    with pytest.raises(InputError, match="num_tokens.*same length"):
        with_constants({f"{CONSTANT}num_tokens": torch.tensor([8, 8, 12])})


def test_a_sampler_in_the_networks_space_gives_ksamplers_outputs_converted(comfy, pack, loaded):
    """The remember set comes out of the sampler in the space the trainer takes: exactly ComfyUI's
    KSampler outputs through process_latent_in; an edit takes and gives that space too."""
    from instance_unlearn.nodes.host.latents import process_latent_in
    from instance_unlearn.nodes.host.sampling import HostPrompt, HostSampler

    model = loaded["model"]
    prompt = HostPrompt(loaded["conditioning"], None, 3, 1.0, "euler", "simple")
    raw, network = HostSampler(model), HostSampler(model, network_space=True)
    with torch.inference_mode():
        generated = raw.generate(prompt, [5, 6], (16, 8, 8))
        assert torch.equal(network.generate(prompt, [5, 6], (16, 8, 8)), process_latent_in(model, generated))
        assert not torch.equal(process_latent_in(model, generated), generated), "the tiny SD3 shifts and scales its latents"
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
        assert torch.equal(network.generate_from_noise(prompt, noise), process_latent_in(model, raw.generate_from_noise(prompt, noise)))
        edited = raw.edit(prompt, generated[:1], 0.5, 7)
        edited_in_network = network.edit(prompt, process_latent_in(model, generated[:1]), 0.5, 7)
    assert torch.allclose(edited_in_network, process_latent_in(model, edited), atol=1e-5)
