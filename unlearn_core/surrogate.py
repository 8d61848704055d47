"""Surrogates: mildly edited copies of a target that keep its structure (METHOD.md section 6).

- :func:`sdedit`: noise the target to ``strength`` and denoise it with the same model,
  optionally under an edit conditioning;
- :func:`repaint`: regenerate only a masked region (faces, a flag's emblem);
- :func:`flipped`, :func:`noised`: the weak ablation surrogates of the paper's Table V.

A user-painted correction needs no builder: pass the image itself as the surrogate.
"""

from __future__ import annotations

import torch

from .denoiser import Conditioning, Denoiser
from .errors import InputError
from .process import ForwardProcess
from .sampling import sample

__all__ = ["sdedit", "repaint", "flipped", "noised", "SURROGATE_KINDS"]

SURROGATE_KINDS = ("sdedit", "inpaint", "flip", "noise")


def _noise_like(target: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(target.shape, generator=generator).to(target)


def sdedit(
    denoiser: Denoiser,
    process: ForwardProcess,
    target: torch.Tensor,
    cond: Conditioning,
    strength: float = 0.5,
    steps: int = 20,
    seed: int = 0,
    clip: float | None = None,
) -> torch.Tensor:
    """Noise ``target`` to ``strength`` (0 keeps it, 1 replaces it) and denoise under ``cond``."""
    if not 0 < strength <= 1:
        raise InputError(f"SDEdit strength must lie in (0, 1], got {strength}; 0.3-0.7 edits mildly")
    step_count = max(1, round(steps * strength))
    return sample(denoiser, process, _noise_like(target, seed), cond, step_count, start=strength, init=target, clip=clip)


def repaint(
    denoiser: Denoiser,
    process: ForwardProcess,
    target: torch.Tensor,
    mask: torch.Tensor,
    cond: Conditioning,
    strength: float = 1.0,
    steps: int = 20,
    seed: int = 0,
    clip: float | None = None,
) -> torch.Tensor:
    """Regenerate the region where ``mask`` is 1; the rest stays the target's pixels exactly."""
    mask = _check_mask(mask, target)
    step_count = max(1, round(steps * strength))
    return sample(
        denoiser, process, _noise_like(target, seed), cond, step_count, start=strength,
        init=target, keep=target, keep_mask=mask, clip=clip,
    )  # fmt: skip


def _check_mask(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[0] not in (1, target.shape[0]) or mask.shape[-2:] != target.shape[-2:]:
        raise InputError(
            f"mask {tuple(mask.shape)} does not fit the target {tuple(target.shape)}: give one mask "
            "per target (or one for all) at the target's height and width"
        )
    if not torch.isfinite(mask).all():
        raise InputError("the mask holds NaN/inf values; draw the mask again")
    if float(mask.max()) <= 0:
        raise InputError("the mask is empty (all zero): paint the region to regenerate")
    return mask.clamp(0, 1).to(target)


def flipped(target: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror (ablation: forgets, but teaches the model a mirrored image)."""
    return target.flip(-1)


def noised(target: torch.Tensor, std: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The target plus Gaussian noise (ablation: at low strength it fails to forget)."""
    if std < 0:
        raise InputError(f"noise std must be >= 0, got {std}")
    return target + std * _noise_like(target, seed)
