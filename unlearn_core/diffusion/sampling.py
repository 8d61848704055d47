"""Sampling: the :class:`Sampler` protocol the core's steps ask for outputs through, and the
core's own deterministic sampler over any denoiser.

The surrogate, the remember set and the preserve check need outputs of the model being
unlearned: generated from a seed's noise, or edited from an image (SDEdit, or inpainting under a
mask). They ask a :class:`Sampler` for them, so the same steps run on a diffusers model
(:class:`DenoiserSampler`, here) and on a ComfyUI model (``HostSampler`` in the pack's
``nodes/host/sampling.py``, which runs ComfyUI's own KSampler). A *prompt* is whatever the
sampler conditions on (a :data:`~unlearn_core.diffusion.denoiser.Conditioning` here; positive,
negative and sampler settings in ComfyUI): the core passes it through and never reads it.

:func:`sample` walks a process's :class:`SamplingGrid` with one update for both families
(:func:`step_to`: DDIM with eta = 0 for epsilon models, Euler for rectified flow), so surrogates
and evaluation use the same sampler for every model this library trains. The grid is the
sampler's part of a process; the noise path (:class:`~unlearn_core.diffusion.process.ForwardProcess`) is
all the trainer needs, which is why a host that samples with its own sampler offers no grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..errors import InputError
from .denoiser import Conditioning, Denoiser
from .noise import seeded_noise
from .process import ForwardProcess

__all__ = ["Sampler", "DenoiserSampler", "SamplingGrid", "sample", "invert", "step_to"]


class SamplingGrid(Protocol):
    def sampling_ts(self, steps: int, start: float = 1.0) -> torch.Tensor:
        """Decreasing noise fractions for sampling from ``start`` down to exactly 0."""
        ...


def step_to(process: ForwardProcess, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor,
            t_next: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Deterministic move from t to t_next given an x0 estimate.

    DDIM (eta = 0) for epsilon models and the Euler step for rectified flow are both this one
    update: keep the implied noise, re-mix it with the x0 estimate at the next level.
    """
    alpha, sigma = process.scales(t)
    alpha_next, sigma_next = process.scales(t_next)
    shape = (-1, *([1] * (x_t.dim() - 1)))
    eps_hat = (x_t - alpha.to(x_t.dtype).reshape(shape) * x0_hat) / sigma.to(x_t.dtype).reshape(shape)
    return alpha_next.to(x_t.dtype).reshape(shape) * x0_hat + sigma_next.to(x_t.dtype).reshape(shape) * eps_hat


class Sampler(Protocol):
    """How the core gets outputs of a model; latents in and out are in the sampler's own space."""

    def generate(self, prompt: Any, seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """One output (len(seeds), *shape) per seed, from the noise that seed gives: the same seed
        and prompt always give the same output, whatever else is in the batch."""
        ...

    def generate_from_noise(self, prompt: Any, noise: torch.Tensor) -> torch.Tensor:
        """One output per row of ``noise`` (B, *shape), the sampler's initial noise: a target whose
        seed is unknown, regenerated from the noise recovered for it."""
        ...

    def edit(self, prompt: Any, image: torch.Tensor, strength: float, seed: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``image`` (B, *shape) noised to ``strength`` with the seed's noise and denoised under
        ``prompt`` (SDEdit); with ``mask`` (1 = regenerate) only that region changes (inpainting)."""
        ...


class DenoiserSampler:
    """The core's :func:`sample` over a denoiser, as a :class:`Sampler`; a prompt is a Conditioning
    of batch 1 (shared by every seed) or of one row per seed."""

    def __init__(self, denoiser: Denoiser, process: ForwardProcess, steps: int = 20, clip: float | None = None,
                 batch: int = 64):  # fmt: skip
        self.denoiser, self.process, self.steps, self.clip, self.batch = denoiser, process, steps, clip, batch

    @torch.no_grad()
    def generate(self, prompt: Conditioning, seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        outputs = []
        for start in range(0, len(seeds), self.batch):
            chunk = list(seeds[start : start + self.batch])
            cond = {key: _rows(value, start, len(chunk), len(seeds)) for key, value in prompt.items()}
            noise = seeded_noise(chunk, shape).to(_device(self.denoiser, prompt))
            outputs.append(sample(self.denoiser, self.process, noise, cond, self.steps, clip=self.clip))
        return torch.cat(outputs)

    @torch.no_grad()
    def generate_from_noise(self, prompt: Conditioning, noise: torch.Tensor) -> torch.Tensor:
        return sample(self.denoiser, self.process, noise.to(_device(self.denoiser, prompt)), prompt, self.steps, clip=self.clip)

    def edit(self, prompt: Conditioning, image: torch.Tensor, strength: float, seed: int,
             mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if not 0 < strength <= 1:
            raise InputError(f"edit strength must lie in (0, 1], got {strength}; 0.3-0.7 edits mildly")
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(int(seed))).to(image)
        steps = max(1, round(self.steps * strength))
        if mask is None:
            return sample(self.denoiser, self.process, noise, prompt, steps, start=strength, init=image, clip=self.clip)
        if mask.shape[-2:] != image.shape[-2:]:
            raise InputError(f"mask {tuple(mask.shape)} does not have the image's size {tuple(image.shape[-2:])}")
        mask = mask.reshape(-1, 1, *mask.shape[-2:]).to(image)
        return sample(self.denoiser, self.process, noise, prompt, steps, start=strength, init=image,
                      keep=image, keep_mask=mask, clip=self.clip)  # fmt: skip


def _rows(value: torch.Tensor, start: int, count: int, total: int) -> torch.Tensor:
    """A shared (batch-1) prompt tensor for ``count`` samples, or rows ``start..`` of a per-seed one."""
    if len(value) == 1 and total != 1:
        return value.expand(count, *value.shape[1:])
    if len(value) != total:
        raise InputError(f"a prompt tensor has {len(value)} rows for {total} seeds: give one row, or one per seed")
    return value[start : start + count]


def _device(denoiser, prompt: Conditioning) -> torch.device:
    for value in prompt.values():
        return value.device
    parameters = getattr(getattr(denoiser, "model", None), "parameters", None)
    return next(parameters()).device if parameters is not None else torch.device("cpu")


def _x0(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, clip: float | None) -> torch.Tensor:
    """The sampler's x0 estimate: the denoiser's, clamped to [-clip, clip] when asked."""
    x0_hat = denoiser.predict_x0(x, t, cond)
    return x0_hat if clip is None else x0_hat.clamp(-clip, clip)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    process: ForwardProcess,  # with a SamplingGrid
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
        x = step_to(process, x, _x0(denoiser, x, t_batch, cond, clip), t_batch, next_batch)
        if keep is not None:
            known = keep if float(t_next) == 0 else process.add_noise(keep, noise, next_batch)
            x = keep_mask * x + (1 - keep_mask) * known
    return x


@torch.no_grad()
def invert(
    denoiser: Denoiser,
    process: ForwardProcess,  # with a SamplingGrid
    image: torch.Tensor,
    cond: Conditioning,
    steps: int = 20,
    clip: float | None = None,
    refine: int = 3,
) -> torch.Tensor:
    """The noise from which :func:`sample` (same ``steps`` and ``clip``) makes ``image``: its grid
    walked backwards (flow ODE / DDIM inversion), for a target that comes without its noise.

    Each backward step starts from the usual inversion guess (the update of :func:`step_to` with
    the model evaluated at the lower level, at ``t_min`` for the clean end) and then corrects it
    ``refine`` times by the fixed-point iteration :math:`x' \\leftarrow x' + (x - S(x'))`, where
    :math:`S` is the sampler's own step back down: an exact inverse makes :math:`S(x') = x`.
    The caller must still check that the noise reproduces the image (the model may not have
    made it, or the fixed point may not exist): see :func:`~unlearn_core.serve.provider` jobs.
    """
    if steps < 1:
        raise InputError(f"inversion needs at least one step, got {steps}")
    ts = process.sampling_ts(steps).flip(0)  # 0 -> 1
    n = len(image)
    x = image
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        t_eval = torch.clamp(t, min=process.t_min).expand(n).to(image.device)
        next_batch = t_next.expand(n).to(image.device)
        guess = step_to(process, x, _x0(denoiser, x, t_eval, cond, clip), t_eval, next_batch)
        for _ in range(refine):
            back = step_to(process, guess, _x0(denoiser, guess, next_batch, cond, clip), next_batch, t.expand(n).to(image.device))
            guess = guess + (x - back)
        x = guess
    return x
