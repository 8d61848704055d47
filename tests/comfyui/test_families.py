"""Each model family the pack trains, end to end on a tiny random-weight model that ComfyUI's own
detection recognises through the stock UNETLoader: mark -> surrogate -> train -> save -> the stock
LoraLoaderModelOnly applies every key of the file and gives the node's model -> Preserve Check, with
the base model bit-identical afterwards. A family the pack cannot train is refused with the list."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from . import tiny_models
from .helpers import (
    SURROGATE,
    TRAIN,
    assert_same_weights,
    denoiser_output,
    generate,
    prompt_for,
    run,
    snapshot,
)

pytestmark = pytest.mark.comfyui

@dataclass(frozen=True)
class Family:
    writer: Callable  # writes its tiny network's file
    model_class: str  # the ComfyUI model class its file must be detected as
    lora_key: str  # a key every saved LoRA of it holds
    extra: dict = field(default_factory=dict)  # conditioning besides the text (Flux.1 dev: FluxGuidance's scale)
    latent_channels: int = 16  # and so its VAE's
    text_dim: int = tiny_models.TEXT_DIM


FAMILIES = {
    "sd3": Family(tiny_models.write_tiny_sd3, "SD3", "joint_blocks.0.x_block.attn.qkv.lora_up.weight"),
    "flux": Family(tiny_models.write_tiny_flux, "Flux", "double_blocks.0.img_attn.qkv.lora_up.weight", {"guidance": 1.5}),
    "sd15": Family(tiny_models.write_tiny_sd15, "BaseModel", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight",
                   latent_channels=4, text_dim=tiny_models.SD15_TEXT_DIM),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, comfy, loaded):
    name = request.param
    spec = FAMILIES[name]
    folder = comfy["base"] / "models"
    path = spec.writer(folder / "diffusion_models" / f"tiny_{name}_family.safetensors")
    with torch.inference_mode():
        try:
            model = comfy["nodes"].UNETLoader().load_unet(path.name, "default")[0]
        except RuntimeError as error:  # ComfyUI 0.3.x's detection fixes Flux's width at 3072
            if "size mismatch" not in str(error):
                raise
            pytest.skip(f"this ComfyUI's detection cannot load a tiny {name} (it fixes the network's width): {str(error)[:120]}")
        vae = loaded["vae"]
        if spec.latent_channels != 16:
            vae_file = tiny_models.write_tiny_vae(folder / "vae" / f"tiny_{name}_vae.safetensors", spec.latent_channels)
            vae = comfy["nodes"].VAELoader().load_vae(vae_file.name)[0]
    assert type(model.model).__name__ == spec.model_class, f"the tiny {name} was detected as {type(model.model).__name__}"
    text, pooled = tiny_models.conditioning(0, text_dim=spec.text_dim)[0]
    return {"name": name, "model": model, "vae": vae, "spec": spec, "conditioning": [[text, {**pooled, **spec.extra}]]}


def test_a_family_trains_saves_and_loads_with_every_key(comfy, loaded, node, family, caplog):
    base, vae, conditioning, spec = family["model"], family["vae"], family["conditioning"], family["spec"]
    before, base_output = snapshot(base), denoiser_output(base, conditioning)
    latent, images = generate(comfy["nodes"], base, vae, conditioning, seed=21, channels=spec.latent_channels)
    prompt, node_id = prompt_for(21)
    targets, _ = run(node["mark"], {"PROMPT": prompt, "UNIQUE_ID": node_id}, forget_set=f"family_{family['name']}",
                     indices="0", images=images, latent=latent, conditioning=conditioning)  # fmt: skip
    stored = targets.targets[0].conditioning[0][1]  # as read back from the forget set on disk
    assert stored.get("guidance") == conditioning[0][1].get("guidance")
    # random tiny networks make look-alike images: the copy check of surrogates is not what is tested here
    targets, _, _ = run(node["surrogate"], model=base, vae=vae, targets=targets, **SURROGATE, forget_threshold=0.999)
    name = f"tests/family_{family['name']}"
    model, lora, loss, saved = run(node["train"], model=base, targets=targets, lora_name=name, **dict(TRAIN, learning_rate=1e-2))
    assert all(torch.isfinite(torch.tensor(loss["loss"])))
    assert any(k.endswith(spec.lora_key) for k in lora), sorted(lora)[:4]
    file_layers = {k.removesuffix(".lora_up.weight") for k in lora if k.endswith(".lora_up.weight")}

    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        stock = comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(base, saved, 1.0)[0]
    unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert unloaded == [], unloaded[:3]
    assert len(stock.patches) - len(base.patches) == len(file_layers) > 0  # every layer of the file patched a weight
    stock_output, node_output = denoiser_output(stock, conditioning), denoiser_output(model, conditioning)
    assert torch.allclose(stock_output, node_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(node_output, base_output, atol=1e-6), "the LoRA changed nothing"

    _, report_text, _ = run(node["check"], base_model=base, unlearned_model=stock, vae=vae, targets=targets, preserve_seeds=1,
                            steps=3, forget_threshold=0.7, integrity_threshold=0.0, lora_name=saved)  # fmt: skip
    report = json.loads(report_text)
    assert report["targets"][0]["reproduced"] is True  # the base model replays its own target
    assert torch.equal(denoiser_output(base, conditioning), base_output)
    assert_same_weights(base, before)


def test_a_family_the_pack_cannot_train_is_refused_with_the_supported_ones(loaded):
    from instance_unlearn.nodes import host
    from instance_unlearn.unlearn_core.errors import InputError

    class Unsupported:  # e.g. Stable Cascade or an image-to-image model
        model = type("Model", (), {"model_type": type("Kind", (), {"name": "STABLE_CASCADE"})()})()

    with pytest.raises(InputError, match=r"not supported.*SD3, SD3\.5, Flux\.1"):
        host.model_family(Unsupported())
