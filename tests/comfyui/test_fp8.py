"""Training on float8 checkpoints: the stock loader's fp8 weight dtypes and ComfyUI's "scaled fp8" files.

The tiny SD3 is loaded in each format through the stock UNETLoader; the node trains on it, the
cached model stays bit-identical, and the saved LoRA loads with LoraLoaderModelOnly onto the
same fp8 model and onto the float32 original, where it gives the node's own output.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from .helpers import SURROGATE, TRAIN, assert_same_weights, denoiser_output, generate, run, snapshot

pytestmark = pytest.mark.comfyui

FP8_MAX = 448.0  # largest float8_e4m3fn value


def write_scaled_fp8(loaded, path) -> None:
    """ComfyUI's scaled-fp8 layout: every matrix weight as float8_e4m3fn divided by its per-tensor
    ``scale_weight``, the rest as it was, and the ``scaled_fp8`` marker."""
    tensors = {}
    for name, value in loaded["model"].model.diffusion_model.state_dict().items():
        value = value.detach().float()
        if name.endswith(".weight") and value.dim() == 2:
            scale = value.abs().max().clamp_min(1e-8) / FP8_MAX
            tensors[name] = (value / scale).to(torch.float8_e4m3fn)
            tensors[name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            tensors[name] = value.contiguous()
    tensors["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)  # two elements: matmuls in full precision
    save_file(tensors, str(path))


@pytest.fixture(scope="module", params=["fp8_e4m3fn", "fp8_e5m2", "scaled_fp8"])
def fp8_model(request, comfy, loaded, tiny_files):
    nodes = comfy["nodes"]
    name, weight_dtype = tiny_files["unet"], request.param
    if request.param == "scaled_fp8":
        name, weight_dtype = "tiny_sd3_scaled_fp8.safetensors", "default"
        write_scaled_fp8(loaded, comfy["base"] / "models" / "diffusion_models" / name)
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet(name, weight_dtype)[0]
    weights = list(model.model.diffusion_model.parameters())
    # ComfyUI 0.33 loads a scaled-fp8 file as quantized weights, 0.3.x as float8 weights beside
    # their scales: either way the weights stay 8-bit
    quantized = any(type(w.data).__name__ == "QuantizedTensor" for w in weights)
    assert quantized or {w.dtype for w in weights} & {torch.float8_e4m3fn, torch.float8_e5m2}, {w.dtype for w in weights}
    return request.param, name, weight_dtype, model


def test_training_on_an_fp8_model_keeps_it_intact_and_its_lora_loads_on_fp8_and_on_the_original(comfy, loaded, node,
                                                                                                  fp8_model):  # fmt: skip
    kind, name, weight_dtype, model = fp8_model
    latent, images = generate(comfy["nodes"], model, loaded["vae"], loaded["conditioning"], seed=21)
    assert torch.isfinite(latent["samples"]).all(), f"{kind}: the fp8 model does not sample"
    targets, _ = run(node["mark"], forget_set=f"fp8_{kind}", indices="0", images=images, latent=latent,
                     conditioning=loaded["conditioning"])  # fmt: skip
    built, _, _ = run(node["surrogate"], model=model, vae=loaded["vae"], targets=targets, **SURROGATE)
    before, base_output = snapshot(model), denoiser_output(model, loaded["conditioning"])
    trained, lora, loss, saved = run(node["train"], model=model, targets=built, lora_name=f"fp8/{kind}", **TRAIN)
    assert all(torch.isfinite(torch.tensor(loss["loss"]))), f"{kind}: losses {loss['loss']}"
    assert saved == f"fp8/{kind}.safetensors"
    node_output = denoiser_output(trained, loaded["conditioning"])
    assert not torch.allclose(node_output, base_output, atol=1e-6), f"{kind}: the LoRA changed nothing"
    # the cached fp8 model is exactly as it was, and gives the same output as before
    assert torch.equal(denoiser_output(model, loaded["conditioning"]), base_output)
    assert_same_weights(model, before)
    nodes = comfy["nodes"]
    with torch.inference_mode():
        reloaded = nodes.UNETLoader().load_unet(name, weight_dtype)[0]
        on_fp8 = nodes.LoraLoaderModelOnly().load_lora_model_only(reloaded, saved, 1.0)[0]
        on_original = nodes.LoraLoaderModelOnly().load_lora_model_only(loaded["model"], saved, 1.0)[0]
    # the stock loader puts the same LoRA on the same fp8 model: the node's output
    assert torch.allclose(denoiser_output(on_fp8, loaded["conditioning"]), node_output, atol=1e-5, rtol=1e-5)
    # on the float32 original it moves the output the same way (fp8 rounding apart)
    original = denoiser_output(loaded["model"], loaded["conditioning"])
    change_fp32 = denoiser_output(on_original, loaded["conditioning"]) - original
    change_fp8 = node_output - base_output
    cosine = torch.nn.functional.cosine_similarity(change_fp32.flatten(), change_fp8.flatten(), dim=0)
    assert cosine > 0.9, f"{kind}: the LoRA's change on the original differs from its change on fp8 (cosine {cosine:.3f})"


def test_cancel_while_training_on_an_fp8_model_leaves_it_intact(comfy, loaded, node, fp8_model, monkeypatch):
    import comfy.model_management as management

    from .test_node_faults import inside_step

    kind, _, _, model = fp8_model
    latent, images = generate(comfy["nodes"], model, loaded["vae"], loaded["conditioning"], seed=22)
    targets, _ = run(node["mark"], forget_set=f"fp8_cancel_{kind}", indices="0", images=images, latent=latent,
                     conditioning=loaded["conditioning"])  # fmt: skip
    built, _, _ = run(node["surrogate"], model=model, vae=loaded["vae"], targets=targets, **SURROGATE)
    before, base_output = snapshot(model), denoiser_output(model, loaded["conditioning"])

    def press_cancel(output):
        management.interrupt_current_processing(True)
        return output

    try:
        with inside_step(monkeypatch, 2, press_cancel):
            with pytest.raises(management.InterruptProcessingException):
                run(node["train"], model=model, targets=built, lora_name=f"fp8/cancelled_{kind}", **dict(TRAIN, steps=6))
    finally:
        management.interrupt_current_processing(False)
    assert not (comfy["base"] / "models" / "loras" / "fp8" / f"cancelled_{kind}.safetensors").exists()
    assert_same_weights(model, before)
    assert torch.equal(denoiser_output(model, loaded["conditioning"]), base_output)
