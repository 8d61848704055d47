"""The training node's forgetting check on the host: each target regenerated with ComfyUI's own
sampler from its recorded settings, decoded by the VAE and judged with Preserve Check's detector.

The core decides what to regenerate and when (:class:`~unlearn_core.stopping.ForgettingCheck`);
this module only says how ComfyUI regenerates a target from a given noise.
"""

from __future__ import annotations

import torch

from ..unlearn_core.stopping import ForgettingCheck
from . import host, images, paths
from .targets import UnlearnTargets


def forgetting_check(clone, vae, targets: UnlearnTargets, noise: torch.Tensor | None, steps: int, copy_detector: str,
                     forget_threshold: float, margin: float, nearby: int, seed: int) -> ForgettingCheck | None:  # fmt: skip
    """The check over ``clone`` (the loaded model with the adapters being trained), or None when
    the targets' noise is unknown (no recorded seed) or no VAE is connected to decode with."""
    if noise is None or vae is None:
        return None
    prompts = [host.replay_prompt(t.provenance, t.conditioning, t.negative, steps, int(t.provenance.get("batch_index", 0) or 0))
               for t in targets.targets]  # fmt: skip
    seeds = [int(t.provenance["seed"]) for t in targets.targets]
    to_images = host.decoder(vae)

    def regenerate(probe_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        latents = [host.ksample_from_noise(clone, prompts[int(i)], row[None], seeds[int(i)]) for row, i in zip(probe_noise, index, strict=True)]
        return to_images(torch.cat(latents))

    target_images = torch.stack([images.to_core(t.image) for t in targets.targets])
    return ForgettingCheck(regenerate, target_images, noise, paths.load_copy_detector(copy_detector), forget_threshold, margin,
                           nearby, seed)  # fmt: skip
