"""Each model family the pack trains, end to end on a tiny random-weight model that ComfyUI's own
detection recognises through the stock UNETLoader: mark -> surrogate -> train -> save -> the stock
LoraLoaderModelOnly applies every key of the file and gives the node's model -> Preserve Check, with
the base model bit-identical afterwards. A family the pack cannot train is refused with the list."""

from __future__ import annotations

import contextlib
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
    pooled_dim: int = tiny_models.POOLED_DIM  # 0: none (LLM text encoders)
    vae_writer: Callable | None = None  # its VAE when not the SD3 layout
    tiny_widths: bool = False  # ComfyUI's detection fixes its widths at the full model's (see tiny_models)


FAMILIES = {
    "sd3": Family(tiny_models.write_tiny_sd3, "SD3", "joint_blocks.0.x_block.attn.qkv.lora_up.weight"),
    "flux": Family(tiny_models.write_tiny_flux, "Flux", "double_blocks.0.img_attn.qkv.lora_up.weight", {"guidance": 1.5}),
    "flux_schnell": Family(tiny_models.write_tiny_flux_schnell, "Flux", "single_blocks.0.linear2.lora_up.weight"),
    "flux2": Family(tiny_models.write_tiny_flux2, "Flux2", "double_blocks.0.img_attn.qkv.lora_up.weight", {"guidance": 4.0},
                    latent_channels=128, pooled_dim=0, vae_writer=tiny_models.write_tiny_flux2_vae),
    "sd15": Family(tiny_models.write_tiny_sd15, "BaseModel", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight",
                   latent_channels=4, text_dim=tiny_models.SD15_TEXT_DIM),
    "sdxl": Family(tiny_models.write_tiny_sdxl, "SDXL", "input_blocks.3.1.transformer_blocks.0.attn2.to_k.lora_up.weight",
                   latent_channels=4, text_dim=tiny_models.SDXL_TEXT_DIM, pooled_dim=tiny_models.SDXL_POOLED_DIM),
    "chroma": Family(tiny_models.write_tiny_chroma, "Chroma", "single_blocks.0.linear1.lora_up.weight", pooled_dim=0,
                     tiny_widths=True),
    "hidream": Family(tiny_models.write_tiny_hidream, "HiDream", "double_stream_blocks.0.block.attn1.to_k_t.lora_up.weight",
                      {"conditioning_llama3": tiny_models.hidream_llama(0)}, tiny_widths=True),
    "qwen_image": Family(tiny_models.write_tiny_qwen_image, "QwenImage", "transformer_blocks.0.attn.add_k_proj.lora_up.weight",
                         pooled_dim=0, vae_writer=tiny_models.write_tiny_wan_vae, tiny_widths=True),
    "z_image": Family(tiny_models.write_tiny_z_image, "Lumina2", "context_refiner.0.attention.qkv.lora_up.weight", pooled_dim=0,
                      tiny_widths=True),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, comfy, loaded):
    name = request.param
    spec = FAMILIES[name]
    folder = comfy["base"] / "models"
    try:
        path = spec.writer(folder / "diffusion_models" / f"tiny_{name}_family.safetensors")
    except (ImportError, TypeError) as error:  # an older ComfyUI without the family's network (or its options)
        pytest.skip(f"this ComfyUI has no {name} network to build: {error}")
    widths = tiny_models.tiny_widths() if spec.tiny_widths else contextlib.nullcontext()
    with torch.inference_mode():
        try:
            with widths:
                model = comfy["nodes"].UNETLoader().load_unet(path.name, "default")[0]
        except RuntimeError as error:  # ComfyUI 0.3.x's detection fixes Flux's width at 3072
            if "size mismatch" not in str(error):
                raise
            pytest.skip(f"this ComfyUI's detection cannot load a tiny {name} (it fixes the network's width): {str(error)[:120]}")
        vae = loaded["vae"]
        if spec.latent_channels != 16 or spec.vae_writer:
            vae_path = folder / "vae" / f"tiny_{name}_vae.safetensors"
            vae_file = spec.vae_writer(vae_path) if spec.vae_writer else tiny_models.write_tiny_vae(vae_path, spec.latent_channels)
            vae = comfy["nodes"].VAELoader().load_vae(vae_file.name)[0]
    assert type(model.model).__name__ == spec.model_class, f"the tiny {name} was detected as {type(model.model).__name__}"
    text, pooled = tiny_models.conditioning(0, text_dim=spec.text_dim, pooled_dim=spec.pooled_dim)[0]
    return {"name": name, "model": model, "vae": vae, "spec": spec, "conditioning": [[text, {**pooled, **spec.extra}]]}


def test_a_family_trains_saves_and_loads_with_every_key(comfy, loaded, node, family, caplog, record_property):
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
    # what benchmarks/families.py reports per family (read from the JUnit XML of this run)
    from instance_unlearn.nodes.host import family

    record_property("family", json.dumps({
        "model_class": type(base.model).__name__, "network": type(base.model.diffusion_model).__name__,
        "model_type": base.model.model_type.name, "lora_targets": list(family.default_targets(base)),
        "example_key": next(k for k in sorted(lora) if k.endswith(spec.lora_key)), "file_layers": len(file_layers),
        "patched_by_stock_loader": len(stock.patches) - len(base.patches), "not_loaded_warnings": len(unloaded),
        "tiny_widths": spec.tiny_widths,
    }))  # fmt: skip


def test_a_family_the_pack_cannot_train_is_refused_with_the_supported_ones(loaded):
    from instance_unlearn.nodes.host import family
    from instance_unlearn.unlearn_core.errors import InputError

    class Unsupported:  # e.g. Stable Cascade or an image-to-image model
        model = type("Model", (), {"model_type": type("Kind", (), {"name": "STABLE_CASCADE"})()})()

    with pytest.raises(InputError, match=r"not supported.*SD3, SD3\.5, Flux\.1"):
        family.model_family(Unsupported())
