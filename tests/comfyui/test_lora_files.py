"""LoRA files of the core through ComfyUI's stock loader: what the core writes, ComfyUI applies."""

from __future__ import annotations

import pytest
import torch

from .helpers import denoiser_output

pytestmark = pytest.mark.comfyui


def test_a_merged_lora_loads_as_the_loras_it_sums_loaded_one_after_another(comfy, loaded):
    """The file of several results in one (lora.sum_of) gives, through the stock loader, the output of
    each result's own file stacked with LoraLoaderModelOnly after LoraLoaderModelOnly."""
    from instance_unlearn.unlearn_core.lora import LoraLayer, LoraWeights, save_lora, sum_of

    generator = torch.Generator().manual_seed(3)
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out")

    def random_lora(rank: int, blocks: range) -> LoraWeights:
        return LoraWeights({f"transformer_blocks.{block}.{part}": LoraLayer(torch.randn(rank, 128, generator=generator) * 0.05,
                                                                          torch.randn(128, rank, generator=generator) * 0.05,
                                                                          alpha=float(rank + block))
                            for block in blocks for part in parts}, "diffusers", kind="sd3")  # fmt: skip

    loras = [random_lora(4, range(2)), random_lora(2, range(1))]
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
