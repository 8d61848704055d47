"""Shared fixtures: tiny diffusers models (random weights) and small unlearning data sets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


def import_pack(name: str = "instance_unlearn"):
    """The repository as ComfyUI imports a custom-node folder: a package (relative imports work)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


import_pack()


def make_tiny_sd3(seed: int = 0, channels: int = 4, size: int = 8):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=size,
    ).eval()  # fmt: skip


def make_tiny_unet(seed: int = 0, size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).eval()  # fmt: skip


def sd3_cond(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(n, 3, 16, generator=generator),
        "pooled_projections": torch.randn(n, 8, generator=generator),
    }


def make_data(channels: int, size: int, cond_factory=None, n_forget: int = 1, n_remember: int = 6, seed: int = 2):
    from unlearn_core import ForgetTargets, RememberSet, UnlearnData

    generator = torch.Generator().manual_seed(seed)
    targets = torch.rand(n_forget, channels, size, size, generator=generator) * 2 - 1
    surrogates = (targets + 0.5 * torch.randn(targets.shape, generator=generator)).clamp(-1, 1)
    remember = torch.rand(n_remember, channels, size, size, generator=generator) * 2 - 1
    forget_cond = cond_factory(n_forget) if cond_factory else {}
    remember_cond = cond_factory(n_remember) if cond_factory else {}
    return UnlearnData(ForgetTargets(targets, surrogates, forget_cond), RememberSet(remember, remember_cond))


@pytest.fixture
def tiny_sd3():
    return make_tiny_sd3()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def sd3_data():
    return make_data(4, 8, sd3_cond)


@pytest.fixture
def unet_data():
    return make_data(3, 8)
