"""The model-agnostic interface the trainer, samplers and metrics talk to.

A denoiser returns the clean-image estimate x0_hat for a noisy batch. diffusers models are
wrapped in :mod:`unlearn_core.backends.diffusers_backend`; the ComfyUI pack wraps a
ModelPatcher the same way. Conditioning is a dict of batch-first tensors (empty for
unconditional models) so that samples can be indexed and re-batched without knowing what the
keys mean.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Denoiser", "Conditioning", "select", "concat", "batch_size"]

Conditioning = dict[str, torch.Tensor]


@runtime_checkable
class Denoiser(Protocol):
    """``gradient_split`` is a :class:`~unlearn_core.method.split_gradients.LayerGradientSplit` over
    exactly ``trainable_parameters()`` when the denoiser can hand the trainer the forget and
    remember gradients from one pass, else None (the trainer then takes two passes)."""

    gradient_split: object | None

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0_hat for noisy ``x_t`` (B, C, H, W) at noise fractions ``t`` (B,)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters unlearning may change (LoRA tensors, or all weights of a copy)."""
        ...


def select(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """The samples at ``index`` of every tensor in ``cond``."""
    return {key: value[index.to(value.device)] for key, value in cond.items()}


def concat(conds: list[Conditioning]) -> Conditioning:
    """Batch-wise concatenation; every dict must have the same keys."""
    keys = set(conds[0])
    if any(set(c) != keys for c in conds):
        raise ValueError("conditionings to join have different keys: " + ", ".join(sorted(map(str, keys))))
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def batch_size(cond: Conditioning) -> int | None:
    sizes = {len(value) for value in cond.values()}
    if len(sizes) > 1:
        raise ValueError(f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else None
