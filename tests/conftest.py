"""Shared fixtures: tiny diffusers models (random weights) and small unlearning data sets."""

from __future__ import annotations

import hashlib
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


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up; scripts import each other by name
    spec.loader.exec_module(module)
    return module


class NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (the loss stays finite), for fault tests."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


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


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every weight and buffer, to prove later that the base model was not touched."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    """Same keys, same bits, no adapter module and no hook left behind."""
    after = model.state_dict()
    assert set(after) == set(before), "module structure changed (adapter left behind?)"
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"
    assert all(type(m).__module__.split(".")[0] != "peft" for m in model.modules())
    hooked = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert not hooked, f"hooks left on the model: {hooked[:3]}"


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a digest of its bytes: equal trees = nothing written.

    Files over 1 MiB (models) are identified by size, modification time and inode instead of
    their bytes, which any write or atomic replace changes as well.
    """
    root = Path(root)
    if not root.exists():
        return {}
    entries = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[relative] = "link -> " + str(path.readlink())
        elif path.is_dir():
            entries[relative] = "folder"
        elif (stat := path.stat()).st_size > 1 << 20:
            entries[relative] = f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}, inode {stat.st_ino}"
        else:
            entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return entries


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


# --- provider jobs on model folders --------------------------------------------------------------


def save_ddpm_pipeline(folder: Path, seed: int = 0, **scheduler_options) -> Path:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with a tiny random UNet.

    The schedule defaults to cosine betas, which a silent fallback to DDPMScheduler() (linear)
    would get wrong.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    options = {"beta_schedule": "squaredcos_cap_v2", **scheduler_options}
    DDPMPipeline(unet=make_tiny_unet(seed), scheduler=DDPMScheduler(**options)).save_pretrained(str(folder))
    return Path(folder)


def save_targets(path: Path, channels: int = 3, size: int = 8, cond: dict | None = None, n: int = 1, seed: int = 0) -> torch.Tensor:
    """A targets file in [-1, 1] (with conditioning if given); returns the targets."""
    from safetensors.torch import save_file

    targets = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    save_file({"targets": targets, **(cond or {})}, str(path))
    return targets


def quick_job(model_path: str, targets_path: str, output: str = "out/forget.safetensors", **sections) -> dict:
    """A job that runs in about a second on the tiny models; ``sections`` update its parts."""
    job = {"model": {"path": model_path}, "targets": targets_path, "surrogate": {"method": "sdedit", "strength": 0.5, "steps": 3},
           "remember": {"generate": 3, "steps": 3},
           "config": {"steps": 3, "lora_rank": 2, "forget_batch_size": 1, "remember_batch_size": 2}, "output": output}  # fmt: skip
    for section, values in sections.items():
        job[section] = {**job[section], **values} if isinstance(job.get(section), dict) and isinstance(values, dict) else values
    return job
