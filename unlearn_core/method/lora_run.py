"""A LoRA trained on a host's model, in the order every host takes: attach, train, read, apply.

The trainer sees only a :class:`~unlearn_core.diffusion.denoiser.Denoiser`. Where that denoiser
comes from, how its LoRA is read back and how the trained LoRA is applied are the host's: a
diffusers module (:class:`~unlearn_core.backends.diffusers_backend.DiffusersModel`) and ComfyUI's
MODEL (``nodes/host/model.py``) each implement :class:`TrainableModel`, and :func:`train_lora`
drives both through the same steps:

1. ``model.lora_training(config, process)`` attaches a fresh LoRA for the duration of a block,
   leaving the model itself as it was whatever happens inside;
2. the forgetting check, if any, is built on that LoRA in training (it regenerates the targets with
   the model as it is at each check);
3. :func:`~unlearn_core.method.trainer.train_unlearning` trains it, and its weights are read before
   the block closes;
4. ``model.with_lora(weights)`` gives the model as the host serves it with the LoRA.

Training always runs outside inference mode (ComfyUI executes its nodes inside it), so a host
never has to remember to leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from ..data.sets import UnlearnData
from ..diffusion.denoiser import Denoiser
from ..diffusion.process import ForwardProcess
from ..formats.lora import LoraWeights
from .config import UnlearnConfig
from .stopping import ForgettingCheck
from .trainer import Callback, TrainResult, train_unlearning

__all__ = ["LoraInTraining", "TrainableModel", "TrainedLora", "train_lora"]


class LoraInTraining(Protocol):
    """A fresh LoRA attached to a host's model for the duration of a block."""

    #: the model with the LoRA as its trainable parameters (and, switched off, the base model)
    denoiser: Denoiser

    def weights(self) -> LoraWeights:
        """The LoRA as trained so far (a copy, read inside the block)."""
        ...


class TrainableModel(Protocol):
    """A host's model that a LoRA can be trained on and applied to."""

    def lora_training(self, config: UnlearnConfig, process: ForwardProcess) -> AbstractContextManager[LoraInTraining]:
        """A fresh LoRA with the config's rank, alpha, target layers, seed and gradient
        checkpointing; the denoiser reads noise levels through ``process``."""
        ...

    def with_lora(self, weights: LoraWeights) -> object | None:
        """The model as the host serves it with ``weights`` applied, or None for a host that applies
        a LoRA only for the duration of a block."""
        ...


#: builds the forgetting check on the LoRA in training (None: every step is trained)
CheckFor = Callable[[LoraInTraining], ForgettingCheck | None]


@dataclass
class TrainedLora:
    """What :func:`train_lora` produced: the LoRA, the trainer's result and the host's model with
    the LoRA applied (None where the host applies a LoRA only for a block)."""

    weights: LoraWeights
    result: TrainResult
    model: object | None


def train_lora(
    model: TrainableModel,
    process: ForwardProcess,
    data: UnlearnData,
    config: UnlearnConfig,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    check: CheckFor | None = None,
) -> TrainedLora:
    """Train a LoRA on ``model`` that forgets ``data.forget`` and keeps ``data.remember`` (the steps
    in the module's docstring); ``model`` itself is left as it was, on success, error or cancel."""
    with torch.inference_mode(False), model.lora_training(config, process) as training:
        forgetting = None if check is None else check(training)
        result = train_unlearning(training.denoiser, process, data, config, callback, should_stop, check=forgetting)
        weights = training.weights()
    return TrainedLora(weights, result, model.with_lora(weights))
