"""The undesired-region mask (1 = regenerate / undesired), validated in one place.

A mask is marked at the image's size (:func:`~unlearn_core.data.forget_set.check_target`) and used at
the latent's or the image's size when inpainting (:func:`~unlearn_core.data.surrogate.build_surrogate`:
a host sampler scales it). Either way it must be finite and have something painted.
"""

from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["checked_mask"]


def checked_mask(mask, size: tuple[int, int], what: str, batch: int = 1, scaled: bool = False) -> torch.Tensor:
    """``mask`` (h, w), (1 or batch, h, w) or (1 or batch, 1, h, w) as (n, 1, h, w) in [0, 1].

    ``size`` is the (height, width) it belongs to; with ``scaled`` it may be an integer multiple
    of that size (a pixel-size mask on a latent). ``what`` names that size in the message.
    """
    mask = torch.as_tensor(mask).detach().float()
    given = tuple(mask.shape)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    height, width = size
    scale = mask.shape[-2] / height if mask.dim() == 4 else 0
    exact = mask.dim() == 4 and tuple(mask.shape[-2:]) == (height, width)
    multiple = scaled and scale >= 1 and scale.is_integer() and mask.shape[-1] == width * scale
    if not (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, batch) and (exact or multiple)):
        raise InputError(
            f"mask {given} does not fit {what}: draw the mask on this image or resize it to the image size "
            "(one mask per target, or one for all)"
        )
    if not torch.isfinite(mask).all():
        raise InputError("the mask holds NaN/inf values; draw the mask again")
    if float(mask.max()) <= 0:
        raise InputError("the mask is empty (all zero): paint the undesired region")
    return mask.clamp(0, 1)
