"""The remember set: other outputs of the targets' prompts, made by the base model under the seed rule.

Training keeps these outputs unchanged. Every caller (the ComfyUI node, the demo, provider jobs)
builds it here: each :class:`RememberRequest` names a prompt, the seed of the target it belongs
to and how many outputs to make, and the seeds are :func:`~unlearn_core.data.seeds.remember_seeds`
of that seed, so they never overlap the preserve check's held-out seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..diffusion.sampling import Sampler
from ..errors import InputError
from .seeds import remember_seeds

__all__ = ["RememberRequest", "split_count", "generate_remember"]


@dataclass(frozen=True)
class RememberRequest:
    prompt: Any  # what the sampler conditions on (one row, or one per output)
    target_seed: int
    count: int


def split_count(count: int, parts: int) -> list[int]:
    """``count`` outputs over ``parts`` targets as evenly as possible, the first targets taking the rest."""
    if parts < 1:
        raise InputError("the remember set needs at least one target to take prompts from")
    return [count // parts + (1 if index < count % parts else 0) for index in range(parts)]


def generate_remember(sampler: Sampler, requests: list[RememberRequest], shape: tuple[int, ...]) -> tuple[torch.Tensor, list]:
    """(latents (N, *shape), the prompt of each output) for ``requests``, in order."""
    latents, prompts = [], []
    for request in requests:
        if request.count == 0:
            continue
        latents.append(sampler.generate(request.prompt, remember_seeds(request.target_seed, request.count), shape))
        prompts += [request.prompt] * request.count
    if not latents:
        raise InputError("the remember set is empty: ask for at least one remember output")
    return torch.cat(latents), prompts
