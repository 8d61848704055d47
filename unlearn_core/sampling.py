"""Deterministic sampling over any denoiser: full generation, SDEdit and masked repainting.

One update serves both families (:meth:`ForwardProcess.step_to`: DDIM with eta = 0 for
epsilon models, Euler for rectified flow), so surrogates and evaluation use the same sampler
for every model this library trains.
"""

from __future__ import annotations

import torch

from .denoiser import Conditioning, Denoiser
from .errors import InputError
from .process import ForwardProcess

__all__ = ["sample", "seeded_noise", "slerp"]


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


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    process: ForwardProcess,
    noise: torch.Tensor,
    cond: Conditioning,
    steps: int = 20,
    start: float = 1.0,
    init: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Denoise from noise fraction ``start`` to a clean batch.

    - ``start=1``: plain generation from ``noise``.
    - ``init`` with ``start<1``: SDEdit, ``init`` is noised to ``start`` with ``noise`` first.
    - ``keep`` and ``keep_mask`` (1 = regenerate, 0 = keep): after every step the kept region
      is reset to ``keep`` noised to the current level, so only the masked region changes.
    - ``clip``: clamp each x0 estimate to [-clip, clip] (diffusers' ``clip_sample``), which
      small pixel DDPMs need: their last steps magnify x0 errors many times.
    """
    if steps < 1:
        raise InputError(f"sampling needs at least one step, got {steps}")
    if not 0 < start <= 1:
        raise InputError(f"start (strength) must lie in (0, 1], got {start}")
    if init is not None and init.shape != noise.shape:
        raise InputError(f"init image {tuple(init.shape)} and noise {tuple(noise.shape)} differ")
    if (keep is None) != (keep_mask is None):
        raise InputError("repainting needs both the image to keep and the mask")
    ts = process.sampling_ts(steps, start)
    n = len(noise)
    x = noise if init is None else process.add_noise(init, noise, ts[0].expand(n))
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        t_batch, next_batch = t.expand(n).to(noise.device), t_next.expand(n).to(noise.device)
        x0_hat = denoiser.predict_x0(x, t_batch, cond)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        x = process.step_to(x, x0_hat, t_batch, next_batch)
        if keep is not None:
            known = keep if float(t_next) == 0 else process.add_noise(keep, noise, next_batch)
            x = keep_mask * x + (1 - keep_mask) * known
    return x
