"""Sampling noise: one tensor per seed, and the interpolation that moves between noises."""

from __future__ import annotations

import torch

__all__ = ["seeded_noise", "slerp"]


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed, independent of batch composition (seed s -> same image)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of noise batches (weight 0 = a, 1 = b), per sample when ``weight``
    is a (B,) tensor: the result stays on the Gaussian's shell, where a sampler's noise lies."""
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).clamp(-1 + 1e-7, 1 - 1e-7)
    angle = torch.acos(cosine).reshape(-1, *([1] * (a.dim() - 1)))
    weight = torch.as_tensor(weight, dtype=a.dtype, device=a.device).reshape(-1, *([1] * (a.dim() - 1)))
    return (torch.sin((1 - weight) * angle) * a + torch.sin(weight * angle) * b) / torch.sin(angle)
