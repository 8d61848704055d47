"""Which noise made each target, and the training node's forgetting check on the host: each target
regenerated with ComfyUI's own sampler from that noise and its recorded settings, decoded by the
VAE and judged with Preserve Check's detector.

The core decides what to regenerate and when (:class:`~unlearn_core.method.stopping.ForgettingCheck`);
this module only says how ComfyUI regenerates a target from a given noise.
"""

from __future__ import annotations

import logging

import torch

from ..unlearn_core.method.stopping import ForgettingCheck
from . import host, images, paths
from .targets import UnlearnTargets

log = logging.getLogger(__name__)


def target_noises(model, targets: UnlearnTargets, steps: int, vae=None) -> tuple[torch.Tensor, list[dict]]:
    """The noise each target was sampled from, and where it came from: its recorded seed (with a
    full denoise), else recovered by inverting ComfyUI's sampler (an image loaded into ComfyUI, or
    an output made from an input image, which did not start from its seed's noise). Whether the
    noise reproduces its target is the forgetting check's baseline (``verifiable``). A target
    without its latent is encoded with ``vae`` first."""
    noises, sources = [], []
    for target in targets.targets:
        seed, denoise = target.provenance.get("seed"), target.provenance.get("denoise")
        latent = target.latent if target.latent is not None else host.encode(vae, target.image[None])[0]
        if seed is not None and (denoise is None or float(denoise) >= 1.0):
            batch_index = int(target.provenance.get("batch_index", 0) or 0)
            noises.append(host.sampling_noise(model, tuple(latent.shape), int(seed), batch_index))
            sources.append({"source": "seed", "seed": int(seed), "batch_index": batch_index})
            continue
        prompt = host.replay_prompt(target.provenance, target.conditioning, target.negative, steps)
        noises.append(host.invert_to_noise(model, prompt, latent[None].float())[0])
        sources.append({"source": f"recovered by inverting the sampler ({prompt.scheduler}, {prompt.steps} steps, cfg {prompt.cfg:g})",
                        "why": "no recorded seed" if seed is None else f"made at denoise {float(denoise):g}"})  # fmt: skip
        log.info("target %s: no seed that made it (%s), its noise is %s", target.id, sources[-1]["why"], sources[-1]["source"])
    return torch.stack(noises), sources


def forgetting_check(clone, vae, targets: UnlearnTargets, noise: torch.Tensor, steps: int, copy_detector: str,
                     forget_threshold: float, margin: float, nearby: int, seed: int) -> ForgettingCheck | None:  # fmt: skip
    """The check over ``clone`` (the loaded model with the adapters being trained) from each
    target's sampler ``noise``, or None when no VAE is connected to decode with."""
    if vae is None:
        return None
    prompts = [host.replay_prompt(t.provenance, t.conditioning, t.negative, steps, int(t.provenance.get("batch_index", 0) or 0))
               for t in targets.targets]  # fmt: skip
    seeds = [int(t.provenance.get("seed") or 0) for t in targets.targets]  # only ancestral samplers draw from it
    to_images = host.decoder(vae)

    def regenerate(probe_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        latents = [host.ksample_from_noise(clone, prompts[int(i)], row[None], seeds[int(i)]) for row, i in zip(probe_noise, index, strict=True)]
        return to_images(torch.cat(latents))

    target_images = torch.stack([images.to_core(t.image) for t in targets.targets])
    return ForgettingCheck(regenerate, target_images, noise, paths.load_copy_detector(copy_detector), forget_threshold, margin,
                           nearby, seed)  # fmt: skip
