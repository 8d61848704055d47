"""Surrogates: mildly edited copies of a target that keep its structure (docs/METHOD.md section 6).

:func:`build_surrogate` makes one for every caller (the ComfyUI node, the demo, the provider
jobs, the benchmarks), by one of :data:`SURROGATE_KINDS`:

- ``sdedit``: noise the target to ``strength`` and denoise it with the same model, optionally
  under an edit prompt;
- ``inpaint``: regenerate only a masked region (faces, a flag's emblem);
- ``edited_image``: the user's own correction, given as a latent of the target's size;
- ``flip``, ``noise``: the weak ablation surrogates of the paper's Table V.

Sampling goes through a :class:`~unlearn_core.diffusion.sampling.Sampler`, so the surrogate is made by the
model being unlearned, with whichever sampler its host has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..diffusion.sampling import Sampler
from ..errors import InputError
from ..verify.metrics import at_size, ssim
from .masks import checked_mask

__all__ = ["SURROGATE_KINDS", "SAMPLED_KINDS", "build_surrogate", "flipped", "noised", "surrogate_similarity", "away_from_copy"]

log = logging.getLogger(__name__)

SURROGATE_KINDS = ("sdedit", "inpaint", "edited_image", "flip", "noise")
SAMPLED_KINDS = ("sdedit", "inpaint")  # the kinds that need a sampler and a prompt


def build_surrogate(
    kind: str,
    target: torch.Tensor,
    *,
    sampler: Sampler | None = None,
    prompt: Any = None,
    strength: float = 0.5,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    edited: torch.Tensor | None = None,
    noise_std: float = 0.1,
) -> torch.Tensor:
    """The surrogate latent (B, C, h, w) of ``target`` (same shape), checked finite."""
    if kind not in SURROGATE_KINDS:
        raise InputError(f"surrogate method {kind!r} is unknown; choose one of {', '.join(SURROGATE_KINDS)}")
    if kind in SAMPLED_KINDS and (sampler is None or prompt is None):
        raise InputError(f"the {kind} surrogate needs the model's sampler and the target's prompt (conditioning)")
    if kind == "sdedit":
        surrogate = sampler.edit(prompt, target, strength, seed)
    elif kind == "inpaint":
        if mask is None:
            raise InputError("the inpaint surrogate needs a mask of the region to regenerate")
        # at the target's size, or a multiple of it (a pixel-size mask that a host sampler scales)
        mask = checked_mask(mask, tuple(target.shape[-2:]), f"the target {tuple(target.shape)}", len(target), scaled=True)
        surrogate = sampler.edit(prompt, target, strength, seed, mask)
    elif kind == "edited_image":
        if edited is None:
            raise InputError("the edited_image surrogate needs your corrected image")
        surrogate = edited.to(target)
    elif kind == "flip":
        surrogate = flipped(target)
    else:
        surrogate = noised(target, noise_std, seed)
    if surrogate.shape != target.shape:
        raise InputError(f"the surrogate {tuple(surrogate.shape)} differs in size from its target {tuple(target.shape)}")
    if not torch.isfinite(surrogate).all():
        raise InputError("the surrogate holds NaN/inf values; check the edited image, or lower cfg / use float32 weights")
    return surrogate  # one identical to its target is warned about where training reads it (trainer)


def flipped(target: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror (ablation: forgets, but teaches the model a mirrored image)."""
    return target.flip(-1)


def noised(target: torch.Tensor, std: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The target plus Gaussian noise (ablation: at low strength it fails to forget)."""
    if std < 0:
        raise InputError(f"noise std must be >= 0, got {std}")
    generator = torch.Generator().manual_seed(int(seed))
    return target + std * torch.randn(target.shape, generator=generator).to(target)


def surrogate_similarity(target: torch.Tensor, surrogate: torch.Tensor) -> float:
    """SSIM of two images (3, H, W) in [0, 1]; the surrogate is resized to the target to compare."""
    return float(ssim(target.float().unsqueeze(0), at_size(surrogate, target).clamp(0, 1)))


#: how far a surrogate that is still a copy of its target is rebuilt: other edit seeds first (the
#: mildest edit that is not a copy), then stronger edits in these steps up to a full repaint
REBUILD_SEEDS = 3
REBUILD_STRENGTH_STEP = 0.1


def away_from_copy(
    make: Callable[[float, int], torch.Tensor],
    target: torch.Tensor,
    similarity: Callable[[torch.Tensor, torch.Tensor], float],
    copy_at: float,
    strength: float,
    seed: int,
    what: str = "the surrogate",
) -> tuple[torch.Tensor, dict]:
    """A surrogate of one target that the copy detector does not call a copy of it.

    Training towards a copy cannot forget anything (the check would never see the target go),
    so ``make(strength, seed)`` is called with the given edit, then with the next
    :data:`REBUILD_SEEDS` - 1 seeds, then likewise at strengths raised by
    :data:`REBUILD_STRENGTH_STEP` up to 1; the first result with ``similarity(result, target) < copy_at`` is returned with a note of
    what was tried. ``copy_at`` is the bar the forgetting check can verify
    (:meth:`~unlearn_core.method.config.UnlearnConfig.surrogate_below`). None qualifying is an :class:`InputError` saying what to change.
    """
    tried = []
    strengths = [strength]
    while strengths[-1] < 1.0 - 1e-9:
        strengths.append(min(1.0, round(strengths[-1] + REBUILD_STRENGTH_STEP, 6)))
    # an edit from the target's own noise at strength 1 samples the target again, so every
    # strength tries several seeds
    attempts = [(s, seed + i) for s in strengths for i in range(REBUILD_SEEDS)]
    for attempt_strength, attempt_seed in attempts:
        surrogate = make(attempt_strength, attempt_seed)
        score = float(similarity(surrogate, target))
        tried.append({"strength": attempt_strength, "seed": attempt_seed, "copy_similarity": score})
        if score < copy_at:
            note = {"strength": attempt_strength, "seed": attempt_seed, "copy_similarity": score, "copy_at": copy_at,
                    "rebuilt": len(tried) > 1, "tried": tried}  # fmt: skip
            if len(tried) > 1:
                log.warning("%s was a copy of its target (copy similarity %.3f >= %g at strength %g, seed %d); rebuilt "
                            "at strength %g, seed %d (%.3f)", what, tried[0]["copy_similarity"], copy_at, strength, seed,
                            attempt_strength, attempt_seed, score)  # fmt: skip
            return surrogate, note
    raise InputError(f"{what} stays a copy of its target (copy similarity >= {copy_at:g}) at every edit tried "
                     f"(seeds {seed} to {seed + REBUILD_SEEDS - 1}, strengths {strength:g} to 1): training towards a copy "
                     "cannot forget it (nor one the forgetting check would not call forgotten); give an edited surrogate, "
                     "inpaint the undesired region, or raise the copy threshold or lower the check's margin")  # fmt: skip
