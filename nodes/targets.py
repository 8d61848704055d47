"""UNLEARN_TARGETS: the marked outputs travelling between the pack's nodes, and their store."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from comfy_api.latest import io

from ..unlearn_core.data.forget_set import ForgetSetStore
from ..unlearn_core.formats.files import safe_name
from . import paths

TargetsType = io.Custom("UNLEARN_TARGETS")


def store() -> ForgetSetStore:
    """The pack's forget-set store, under ComfyUI's output folder."""
    return ForgetSetStore(paths.forget_sets_folder())


@dataclass
class Target:
    """One output to forget, with what produced it and (later) its surrogate."""

    id: str
    image: torch.Tensor  # (H, W, 3) in [0, 1]
    latent: torch.Tensor | None = None  # (C, h, w) raw LATENT samples, when known
    mask: torch.Tensor | None = None  # (H, W) in [0, 1], 1 = undesired region
    conditioning: list | None = None  # the positive CONDITIONING that produced it
    negative: list | None = None  # the sampler's negative CONDITIONING, when it was recorded
    provenance: dict = field(default_factory=dict)
    surrogate_latent: torch.Tensor | None = None
    surrogate_image: torch.Tensor | None = None
    surrogate_method: str | None = None


@dataclass
class UnlearnTargets:
    forget_set: str
    targets: list[Target]

    def __post_init__(self):
        self.forget_set = safe_name(self.forget_set, "forget-set name")

    def with_targets(self, targets: list[Target]) -> UnlearnTargets:
        return replace(self, targets=targets)

    def __len__(self) -> int:
        return len(self.targets)
