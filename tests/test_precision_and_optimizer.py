"""The memory options: the compute dtype ("auto" = bfloat16 on a CUDA GPU) and the 8-bit optimizer."""

import sys

import pytest
import torch
from conftest import assert_bit_identical, snapshot

from unlearn_core import RectifiedFlow, UnlearnConfig
from unlearn_core.backends.diffusers_backend import unlearn_diffusers
from unlearn_core.errors import InputError
from unlearn_core.method.trainer import compute_dtype, make_optimizer

FLOW = RectifiedFlow()


def quick(**overrides):
    values = dict(steps=6, learning_rate=1e-2, lora_rank=2, forget_batch_size=2, remember_batch_size=2, seed=3)
    values.update(overrides)
    return UnlearnConfig(**values)


def lora_tensors(outcome) -> list[torch.Tensor]:
    return [t for layer in outcome.lora.layers.values() for t in (layer.up, layer.down)]


def test_auto_dtype_is_bfloat16_only_on_a_cuda_gpu_that_has_it(monkeypatch):
    assert UnlearnConfig().dtype == "auto"
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a pre-Ampere card
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.float32
    assert compute_dtype("float16", torch.device("cuda", 0)) == torch.float16
    assert compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_auto_trains_in_float32_on_the_cpu_and_bfloat16_computes_differently(tiny_sd3, sd3_data):
    auto = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick())
    float32 = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(dtype="float32"))
    before = snapshot(tiny_sd3)
    bfloat16 = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(dtype="bfloat16"))
    assert_bit_identical(tiny_sd3, before)
    assert all(torch.equal(a, b) for a, b in zip(lora_tensors(auto), lora_tensors(float32), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(lora_tensors(bfloat16), lora_tensors(float32), strict=True))
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in lora_tensors(bfloat16))  # LoRA kept in float32


def test_8bit_adamw_keeps_its_state_in_8_bits():
    pytest.importorskip("bitsandbytes")
    large = torch.nn.Parameter(torch.randn(128, 64))  # bitsandbytes keeps tensors under 4096 entries in 32 bits
    optimizer = make_optimizer([large], quick(optimizer="adamw_8bit"))
    (large**2).sum().backward()
    optimizer.step()
    state = optimizer.state[large]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert type(make_optimizer([large], quick())) is torch.optim.AdamW


def test_8bit_adamw_trains_and_lowers_the_forget_loss(tiny_sd3, sd3_data):
    pytest.importorskip("bitsandbytes")
    before = snapshot(tiny_sd3)
    config = quick(steps=30, optimizer="adamw_8bit", forget_batch_size=4, remember_batch_size=4)
    outcome = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, config)
    assert_bit_identical(tiny_sd3, before)
    forget = [h["forget_loss"] for h in outcome.training.history]
    assert sum(forget[-10:]) < 0.9 * sum(forget[:10]), forget
    plain = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(steps=30, forget_batch_size=4, remember_batch_size=4))
    assert not all(torch.equal(a, b) for a, b in zip(lora_tensors(outcome), lora_tensors(plain), strict=True))


def test_8bit_adamw_without_bitsandbytes_is_refused_when_the_config_is_built(monkeypatch):
    """Before any work (a remember set generated, a model loaded), with what to install."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(InputError, match="pip install bitsandbytes"):
        quick(optimizer="adamw_8bit")
