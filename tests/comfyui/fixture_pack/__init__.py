"""Test-only custom node: SD3-shaped conditioning for the tiny test model (no text encoder needed).

Copied into the temporary ComfyUI base directory by the server tests; never shipped.
"""

import torch

TEXT_DIM, POOLED_DIM, TOKENS = 64, 32, 8


class UnlearnTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed):
        generator = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, TOKENS, TEXT_DIM, generator=generator),
                  {"pooled_output": torch.randn(1, POOLED_DIM, generator=generator)}]],)  # fmt: skip


NODE_CLASS_MAPPINGS = {"UnlearnTest_Conditioning": UnlearnTestConditioning}
