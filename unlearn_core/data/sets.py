"""What unlearning trains on: the forget targets with their surrogates, and the remember set.

Tensors are image-like batches (N, C, H, W) in the model's input space (pixels in [-1, 1] for
pixel models, processed latents for latent models); conditioning is a dict of batch-first
tensors aligned with them (see :mod:`unlearn_core.diffusion.denoiser`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion.denoiser import Conditioning, batch_size, concat
from ..errors import InputError

__all__ = ["ForgetTargets", "RememberSet", "UnlearnData"]


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(f"{name} holds {bad} NaN/inf values; regenerate or re-encode it")


def _check_cond(name: str, cond: Conditioning, n: int) -> None:
    try:
        size = batch_size(cond)
    except ValueError as error:
        raise InputError(f"{name} conditioning: {error}") from None
    if size is not None and size != n:
        raise InputError(f"{name} has {n} samples but its conditioning has {size}; give one per sample")
    for key, value in cond.items():
        _check_finite(f"{name} conditioning {key!r}", value)


@dataclass
class ForgetTargets:
    """Outputs to forget (``targets``) and their mildly edited copies (``surrogates``)."""

    targets: torch.Tensor
    surrogates: torch.Tensor
    cond: Conditioning = field(default_factory=dict)
    #: the noise each target was sampled from (its seed's), when known: ours draws its forget
    #: points around the target's own sampling path (``UnlearnConfig.forget_noise``)
    noise: torch.Tensor | None = None

    def __post_init__(self):
        if self.targets.dim() != 4 or len(self.targets) == 0:
            raise InputError(
                f"the forget set is empty or not an image batch (shape {tuple(self.targets.shape)}); "
                "mark at least one output first"
            )
        if self.surrogates.shape != self.targets.shape:
            raise InputError(
                f"surrogates {tuple(self.surrogates.shape)} do not match targets "
                f"{tuple(self.targets.shape)}; build one surrogate per target at the target's size"
            )
        _check_finite("a forget target", self.targets)
        _check_finite("a surrogate", self.surrogates)
        if self.noise is not None:
            if self.noise.shape != self.targets.shape:
                raise InputError(
                    f"target noise {tuple(self.noise.shape)} does not match targets {tuple(self.targets.shape)}; "
                    "give the noise each target was sampled from"
                )
            _check_finite("a target's noise", self.noise)
        _check_cond("the forget set", self.cond, len(self.targets))

    def unchanged(self) -> list[int]:
        """Indices whose surrogate equals its target (the surrogate loss has nothing to teach there)."""
        difference = (self.targets - self.surrogates).flatten(1).abs().amax(dim=1)
        return torch.nonzero(difference == 0).flatten().tolist()

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def joined(cls, parts: list[ForgetTargets]) -> ForgetTargets:
        """One forget set of several, in order (earlier requests' targets, then a new one's); the
        noise is kept only when every part knows it."""
        if any(set(p.cond) != set(parts[0].cond) for p in parts):
            raise InputError("forget sets to join carry different conditioning kinds: "
                             + " vs ".join(str(sorted(p.cond)) for p in parts))  # fmt: skip
        if any(p.targets.shape[1:] != parts[0].targets.shape[1:] for p in parts):
            raise InputError(f"forget sets to join differ in size: {[tuple(p.targets.shape[1:]) for p in parts]}")
        noise = None if any(p.noise is None for p in parts) else torch.cat([p.noise for p in parts])
        return cls(torch.cat([p.targets for p in parts]), torch.cat([p.surrogates for p in parts]),
                   concat([p.cond for p in parts]), noise)  # fmt: skip


@dataclass
class RememberSet:
    """Outputs the model must keep producing (other seeds, training data)."""

    samples: torch.Tensor
    cond: Conditioning = field(default_factory=dict)

    def __post_init__(self):
        if self.samples.dim() != 4 or len(self.samples) == 0:
            raise InputError(
                f"the remember set is empty or not an image batch (shape {tuple(self.samples.shape)}); "
                "give or generate at least one non-target sample"
            )
        _check_finite("a remember sample", self.samples)
        _check_cond("the remember set", self.cond, len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class UnlearnData:
    forget: ForgetTargets
    remember: RememberSet

    def __post_init__(self):
        if self.forget.targets.shape[1:] != self.remember.samples.shape[1:]:
            raise InputError(
                f"forget targets {tuple(self.forget.targets.shape[1:])} and remember samples "
                f"{tuple(self.remember.samples.shape[1:])} differ in channels or size; "
                "use outputs of the same model at the same resolution"
            )
        if set(self.forget.cond) != set(self.remember.cond):
            raise InputError(
                "forget and remember sets carry different conditioning kinds "
                f"({sorted(self.forget.cond)} vs {sorted(self.remember.cond)}); give both the same conditioning tensors"
            )
