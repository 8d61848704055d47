"""LoRA files of the core through ComfyUI's stock loader: what the core writes, ComfyUI applies."""

from __future__ import annotations

import pytest
import torch

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
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out")


def random_lora(generator: torch.Generator, rank: int, blocks: range, parts=ATTENTION):
    """A LoRA of the tiny SD3 (diffusers names, width 128) with small random weights, alpha = rank + block."""
    from instance_unlearn.unlearn_core.formats.lora import LoraLayer, LoraWeights

    return LoraWeights({f"transformer_blocks.{block}.{part}": LoraLayer(torch.randn(rank, 128, generator=generator) * 0.05,
                                                                      torch.randn(128, rank, generator=generator) * 0.05,
                                                                      alpha=float(rank + block))
                        for block in blocks for part in parts}, "diffusers", kind="sd3")  # fmt: skip


def test_a_merged_lora_loads_as_the_loras_it_sums_loaded_one_after_another(comfy, loaded):
    """The file of several results in one (lora.sum_of) gives, through the stock loader, the output of
    each result's own file stacked with LoraLoaderModelOnly after LoraLoaderModelOnly."""
    from instance_unlearn.unlearn_core.formats.lora import save_lora, sum_of

    generator = torch.Generator().manual_seed(3)
    loras = [random_lora(generator, 4, range(2)), random_lora(generator, 2, range(1))]
    folder = comfy["base"] / "models" / "loras"
    names = [save_lora(folder / f"stack_{i}.safetensors", lora, "comfy").name for i, lora in enumerate(loras)]
    merged = save_lora(folder / "stack_sum.safetensors", sum_of(loras), "comfy").name
    base, conditioning, loader = loaded["model"], loaded["conditioning"], comfy["nodes"].LoraLoaderModelOnly()
    with torch.inference_mode():
        stacked = loader.load_lora_model_only(loader.load_lora_model_only(base, names[0], 1.0)[0], names[1], 1.0)[0]
        summed = loader.load_lora_model_only(base, merged, 1.0)[0]
    once = denoiser_output(summed, conditioning)
    assert torch.allclose(once, denoiser_output(stacked, conditioning), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(once, denoiser_output(base, conditioning), atol=1e-3)


def test_training_on_a_model_with_an_earlier_lora_continues_from_it(comfy, loaded, node):
    """A second request trains on the model as it already is: the earlier result applied by the
    stock loader before the trainer. Its new LoRA, stacked on the earlier one by the stock loader
    again, gives the trainer's own output, and neither the base nor the earlier result changes."""
    from instance_unlearn.unlearn_core.formats.lora import save_lora

    earlier = random_lora(torch.Generator().manual_seed(5), 4, range(1), ("attn.to_q", "attn.to_v", "attn.add_k_proj"))
    earlier_name = save_lora(comfy["base"] / "models" / "loras" / "earlier_request.safetensors", earlier, "comfy").name
    base, vae, conditioning = loaded["model"], loaded["vae"], loaded["conditioning"]
    loader = comfy["nodes"].LoraLoaderModelOnly()
    with torch.inference_mode():
        served = loader.load_lora_model_only(base, earlier_name, 1.0)[0]  # the model as the provider serves it
    base_weights, base_output = snapshot(base), denoiser_output(base, conditioning)
    served_patches, served_output = dict(served.patches), denoiser_output(served, conditioning)

    latent, images = generate(comfy["nodes"], served, vae, conditioning, seed=31)
    prompt, node_id = prompt_for(31)
    targets, _ = run(node["mark"], {"PROMPT": prompt, "UNIQUE_ID": node_id}, forget_set="second_request", indices="0",
                     images=images, latent=latent, conditioning=conditioning)  # fmt: skip
    targets, _, _ = run(node["surrogate"], model=served, vae=vae, targets=targets, **SURROGATE, forget_threshold=0.999)
    model, _, loss, saved = run(node["train"], model=served, targets=targets, lora_name="tests/second_request",
                                **dict(TRAIN, learning_rate=1e-2))  # fmt: skip
    _, _, loss_on_base, _ = run(node["train"], model=base, targets=targets, lora_name="", **dict(TRAIN, learning_rate=1e-2))
    assert loss["forget_loss"][0] != loss_on_base["forget_loss"][0], "the trainer did not see the earlier result"

    with torch.inference_mode():
        stacked = loader.load_lora_model_only(loader.load_lora_model_only(base, earlier_name, 1.0)[0], saved, 1.0)[0]
    trained_output = denoiser_output(model, conditioning)
    assert torch.allclose(denoiser_output(stacked, conditioning), trained_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained_output, served_output, atol=1e-6), "the second request changed nothing"
    assert dict(served.patches) == served_patches and torch.equal(denoiser_output(served, conditioning), served_output)
    # the clones share one network, patched in place for whichever is loaded: load the base to look at it
    assert torch.equal(denoiser_output(base, conditioning), base_output)
    assert_same_weights(base, base_weights)
