"""The forget and the remember gradient from one forward and one backward pass.

A LoRA's weight gradient is a sum over the rows of the batch: for a linear layer
``dL/dW = sum_rows  dL/dy_row  x_row^T``. When the forget samples fill the first ``split`` rows
of the batch and the remember samples the rest, and the losses of the two halves are added,
each row's output gradient comes from its own half's loss only (samples do not interact inside
the network). Summing the rows of each half separately therefore gives ``g_f`` and ``g_r``
exactly, for the price of one ordinary training step on the whole batch.

:class:`LayerGradientSplit` works on LoRA pairs (down layer, up layer). During the forward pass
it keeps each down layer's output (rank-sized, so small) and hooks each up layer's output. The
backward pass is asked for the gradients of the down outputs only: it runs through every LoRA
branch but computes no weight gradient of its own. On the way, the up outputs' gradients and
the down outputs' gradients, with the layers' inputs (tensors autograd keeps anyway), give each
layer's two weight gradients. Layers are ``nn.Linear`` (any number of leading dimensions, batch
first) or ``nn.Conv2d`` without bias, which is what peft's LoRA layers are made of.

Example::

    split = LayerGradientSplit([(lora_down, lora_up)])
    with split.recording(k, len(batch)) as halves:
        out = model(batch)
        loss = forget_loss(out[:k]) + remember_loss(out[k:])
    g_forget, g_remember = split.gradients(loss, halves)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["LayerGradientSplit", "Halves"]


class Halves:
    """Per-layer weight gradients of the first ``split`` samples of the batch and of the rest."""

    def __init__(self, layers: list[nn.Module], split: int):
        self.layers, self.split = layers, split
        self.grads: list[torch.Tensor | None] = [None] * len(layers)  # (2, *weight.shape) per layer
        self.down_calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer index, input, output)
        self.up_calls = 0

    def add(self, index: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        both = _weight_grads(self.layers[index], x.detach().float(), grad.float(), self.split)
        self.grads[index] = both if self.grads[index] is None else self.grads[index] + both

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        both = [
            torch.zeros((2, *layer.weight.shape)) if grad is None else grad
            for layer, grad in zip(self.layers, self.grads, strict=True)
        ]
        forget, remember = (torch.cat([g[half].reshape(-1) for g in both]) for half in (0, 1))
        return forget, remember


class LayerGradientSplit:
    """Per-half weight gradients of LoRA (down, up) layer pairs (see the module docstring)."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]):
        for layer in (layer for pair in pairs for layer in pair):
            plain_conv = isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            if not (isinstance(layer, nn.Linear) or plain_conv) or layer.bias is not None:
                raise TypeError(f"gradient splitting handles bias-free Linear and zero-padded Conv2d layers, not {layer}")
        self.layers = [layer for pair in pairs for layer in pair]  # down0, up0, down1, up1, ...

    def parameters(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.layers]

    @contextlib.contextmanager
    def recording(self, split: int, batch: int) -> Iterator[Halves]:
        """Hook the layers for one forward pass over ``batch`` samples split at ``split``."""
        halves = Halves(self.layers, split)

        def hook(index: int, layer: nn.Module):
            def on_forward(module, args, output):
                if not output.requires_grad:
                    return
                x = args[0]
                if len(x) != batch:
                    raise ValueError(f"layer {layer} saw {len(x)} rows for a batch of {batch}: splitting needs batch-first inputs")
                if index % 2 == 0:
                    halves.down_calls.append((index, x, output))
                else:
                    halves.up_calls += 1
                    output.register_hook(lambda grad: halves.add(index, x, grad))

            return on_forward

        handles = [layer.register_forward_hook(hook(i, layer)) for i, layer in enumerate(self.layers)]
        try:
            yield halves
        finally:
            for handle in handles:
                handle.remove()

    def gradients(self, loss: torch.Tensor, halves: Halves) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backward pass; (g of the first half, g of the rest), flat float32, in layer order."""
        calls, halves.down_calls = halves.down_calls, []
        if calls:
            grads = torch.autograd.grad(loss, [output for _, _, output in calls], allow_unused=True)
            for (index, x, _), grad in zip(calls, grads, strict=True):
                if grad is not None:
                    halves.add(index, x, grad)
        return halves.flat()


def _weight_grads(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, split: int) -> torch.Tensor:
    """(2, *weight.shape): the weight gradient of rows [:split] and of rows [split:]."""
    if isinstance(layer, nn.Linear):
        batch = len(x)
        x, grad = x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1])
        if 2 * split == batch:  # equal halves (the usual case): one batched matmul
            return torch.bmm(grad.reshape(2, -1, grad.shape[-1]).transpose(1, 2), x.reshape(2, -1, x.shape[-1]))
        return torch.stack([grad[rows].flatten(0, 1).T @ x[rows].flatten(0, 1) for rows in (slice(None, split), slice(split, None))])
    return torch.stack([
        torch.nn.grad.conv2d_weight(x[rows], layer.weight.shape, grad[rows], layer.stride, layer.padding, layer.dilation, layer.groups)
        for rows in (slice(None, split), slice(split, None))
    ])  # fmt: skip
