"""The LoRA lifecycle every host shares (unlearn_core.method.lora_run): attach, check on the LoRA
in training, train, read inside the block, apply after it; the model untouched on error."""

import contextlib

import pytest
import torch
from conftest import assert_bit_identical, snapshot

from unlearn_core.backends.diffusers_backend import DiffusersModel
from unlearn_core.diffusion.process import RectifiedFlow
from unlearn_core.formats.lora import LoraWeights
from unlearn_core.method.config import UnlearnConfig
from unlearn_core.method.lora_run import train_lora

FLOW = RectifiedFlow()


class RecordingModel:
    """DiffusersModel with each lifecycle step written down, and a LoRA 'served' as its weights."""

    def __init__(self, module, fail_in_training: bool = False):
        self.inner = DiffusersModel(module)
        self.fail_in_training = fail_in_training
        self.steps: list[str] = []

    @contextlib.contextmanager
    def lora_training(self, config, process):
        with self.inner.lora_training(config, process) as training:
            self.steps.append("attached")
            outer = self

            class Recorded:
                denoiser = training.denoiser

                def weights(self):
                    outer.steps.append("read")
                    return training.weights()

            yield Recorded()
            if self.fail_in_training:
                raise RuntimeError("lost the device")
        self.steps.append("detached")

    def with_lora(self, weights: LoraWeights):
        self.steps.append("applied")
        return ("served", weights)


def quick(**overrides) -> UnlearnConfig:
    return UnlearnConfig(**{"steps": 3, "lora_rank": 2, "forget_batch_size": 1, "remember_batch_size": 2, **overrides})


def test_steps_in_order_with_the_check_built_on_the_lora_in_training(tiny_sd3, sd3_data):
    model = RecordingModel(tiny_sd3)
    seen = []

    def check(training):
        model.steps.append("check")
        seen.append(training.denoiser)
        return None

    trained = train_lora(model, FLOW, sd3_data, quick(), check=check)
    assert model.steps == ["attached", "check", "read", "detached", "applied"]
    assert trained.model == ("served", trained.weights)
    assert trained.result.steps == 3
    assert seen[0].trainable_parameters(), "the check regenerates with the LoRA in training"
    assert any(layer.up.abs().sum() > 0 for layer in trained.weights.layers.values()), "the LoRA was trained"


def test_trains_under_inference_mode(tiny_sd3, sd3_data):
    """ComfyUI runs nodes inside torch.inference_mode: the lifecycle leaves it for training."""
    with torch.inference_mode():
        trained = train_lora(RecordingModel(tiny_sd3), FLOW, sd3_data, quick())
    assert trained.result.steps == 3


def test_error_leaves_the_model_and_applies_nothing(tiny_sd3, sd3_data):
    before = snapshot(tiny_sd3)
    model = RecordingModel(tiny_sd3, fail_in_training=True)
    with pytest.raises(RuntimeError, match="lost the device"):
        train_lora(model, FLOW, sd3_data, quick())
    assert "applied" not in model.steps
    assert_bit_identical(tiny_sd3, before)
    assert not any("lora" in name for name, _ in tiny_sd3.named_modules())
